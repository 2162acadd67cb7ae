"""`xray-pretrain embed --checkpoint DIR --shards DIR [DIR ...] --out FILE.npz [--split NAME ...]`:
one pooled encoder feature vector per sample (`key`, `split`, `features` (N, D) in an .npz file).

DIR: a classifier (its pooling: cls, mean, or blocks: D * depth features) or a pre-training run (its encoder's cls token): a run
folder (best, else latest), its checkpoints folder (latest) or one step folder."""

from __future__ import annotations

import json
from pathlib import Path

SPLITS = ("train", "val", "test")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="run (its best), checkpoints or step folder"
    )
    parser.add_argument("--shards", required=True, nargs="+", help="shard folders")
    parser.add_argument("--out", required=True, type=Path, help="output .npz")
    parser.add_argument("--split", nargs="+", default=list(SPLITS), help="splits to embed (default: all)")


def run(args) -> int:
    from xray_pretrain.inference import embed, load_feature_model

    print(json.dumps(embed(load_feature_model(args.checkpoint), args.shards, args.split, args.out)))
    return 0
