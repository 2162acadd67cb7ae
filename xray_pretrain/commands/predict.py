"""`xray-pretrain predict --checkpoint DIR FILE...`: classify raw DICOM / PNG / JPEG files, or write
their radiology reports.

Standard output: one JSON line per input, in input order:
`{"file": PATH, "task": "classify", "probabilities": {LABEL: P, ...}, "positive": [LABEL, ...]}`,
`{"file": PATH, "task": "report", "report": TEXT}`, or `{"file": PATH, "error": REASON}` for a file
that cannot be read (the others are still predicted). A report model trained on a study's two views
(report.views=2) takes `FRONTAL,LATERAL` in one argument (PATH is then that argument).
Exit 0 when every input worked, 1 when any failed, 2 on bad usage (e.g. not a fine-tuned checkpoint,
a pair for a one-view model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="run (its best), checkpoints or step folder"
    )
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="DICOM, PNG or JPEG files; FRONTAL,LATERAL for a two-view model",
    )


def run(args) -> int:
    from xray_pretrain.inference import load_trained, predict_file, predict_inputs

    trained = load_trained(args.checkpoint)
    inputs = predict_inputs(trained, args.files)
    num_failed = 0
    for paths in inputs:
        line = predict_file(trained, paths)
        num_failed += "error" in line
        print(json.dumps(line), flush=True)
    if num_failed:
        print(
            f"xray-pretrain predict: {num_failed} of {len(inputs)} inputs could not be read",
            file=sys.stderr,
        )
    return 1 if num_failed else 0
