"""`xray-pretrain evaluate --checkpoint DIR [--split test|val] [--shards DIR ...] --out FILE.json
[section.key=value ...]`: a classifier's metrics on a whole split, plus a per-sample CSV beside the JSON.

DIR: a run folder (its `best`), its checkpoints folder (latest) or one step folder. `--shards`
evaluates on other shard folders (an external test set; labels matched by name). Thresholds for F1
are the ones validation chose for that checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="run, checkpoints or step folder")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--shards", nargs="+", default=None, help="shard folders (default: the run's)")
    parser.add_argument("--out", required=True, type=Path, help="metrics JSON; FILE.csv gets the samples")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.num_workers=0")


def run(args) -> int:
    from xray_pretrain.inference import evaluate, load_classifier

    result = evaluate(load_classifier(args.checkpoint), args.split, args.shards, args.out, args.overrides)
    print(json.dumps({k: result["metrics"][k] for k in ("mean_auroc", "mean_ap", "mean_f1", "num_samples")}))
    return 0
