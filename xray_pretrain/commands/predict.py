"""`xray-pretrain predict --checkpoint DIR FILE...`: classify raw DICOM / PNG / JPEG files.

Standard output: one JSON line per input, in input order:
`{"file": PATH, "task": "classify", "probabilities": {LABEL: P, ...}, "positive": [LABEL, ...]}`, or
`{"file": PATH, "error": REASON}` for a file that cannot be read (the others are still predicted).
Exit 0 when every file worked, 1 when any failed, 2 on bad usage (e.g. not a classifier checkpoint).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="run (its best), checkpoints or step folder"
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="DICOM, PNG or JPEG files")


def run(args) -> int:
    from xray_pretrain.inference import load_classifier, predict_file

    classifier = load_classifier(args.checkpoint)
    num_failed = 0
    for path in args.files:
        line = predict_file(classifier, path)
        num_failed += "error" in line
        print(json.dumps(line), flush=True)
    if num_failed:
        print(
            f"xray-pretrain predict: {num_failed} of {len(args.files)} files could not be read",
            file=sys.stderr,
        )
    return 1 if num_failed else 0
