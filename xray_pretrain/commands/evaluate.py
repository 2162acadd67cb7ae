"""`xray-pretrain evaluate --checkpoint DIR [--split test|val] [--shards DIR ...] --out FILE.json
[section.key=value ...]`: a fine-tuned model's metrics on a whole split, plus a CSV beside the JSON:
a classifier's per-sample labels and probabilities, a report model's key, reference and generated report.

DIR: a run folder (its `best`), its checkpoints folder (latest) or one step folder. `--shards`
evaluates on other shard folders (an external test set; labels matched by name). Thresholds for F1
are the ones validation chose for that checkpoint; reports are scored with pycocoevalcap against the
full cleaned references (METEOR null without Java).
"""

from __future__ import annotations

import json
from pathlib import Path

SHOWN = {  # the metrics printed (the JSON file has them all)
    "classify": ("mean_auroc", "mean_ap", "mean_f1", "num_samples"),
    "report": ("bleu_4", "meteor", "rouge_l", "cider", "num_reports"),
}


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="run, checkpoints or step folder")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--shards", nargs="+", default=None, help="shard folders (default: the run's)")
    parser.add_argument("--out", required=True, type=Path, help="metrics JSON; FILE.csv gets the samples")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.num_workers=0")


def run(args) -> int:
    from xray_pretrain.inference import evaluate, load_trained

    trained = load_trained(args.checkpoint)
    result = evaluate(trained, args.split, args.shards, args.out, args.overrides)
    shown = SHOWN[trained.cfg.task]
    print(json.dumps({k: result["metrics"][k] for k in shown}))
    return 0
