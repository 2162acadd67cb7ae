"""`xray-pretrain bench loader`: training-loader throughput on real shards, one JSON line.

    xray-pretrain bench loader --shards DIR --backend dali --image-size 1280 --batch-size 8 \\
        --num-batches 50 --num-workers 4 [--device cuda]

Times `--num-batches` training batches (default augmentation: random resized crop) after
`--warmup` batches that are not timed (pipeline build, worker start, first decodes). Reports
images_per_s and mb_per_s (encoded image bytes read per second), with the backend and the decode
device. `--num-workers` (alias `--workers`; `data.num_workers` in a run config) is the number of
DataLoader worker processes (wds) or DALI CPU threads (dali), so both backends get the same cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from xray_pretrain.data.config import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards", nargs="+", required=True, help="shard folder(s) written by `xray-shard convert`"
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--image-size", type=int, default=1280, help="square output size in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=50, help="timed batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument(
        "--num-workers",
        "--workers",
        dest="num_workers",
        type=int,
        default=4,
        help="wds: DataLoader workers; dali: CPU threads (data.num_workers)",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda (dali decodes on the GPU with cuda)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from xray_pretrain.data.config import DataConfig
    from xray_pretrain.data.loader import build_train_loader
    from xray_pretrain.data.shards import IMAGE_SLOT, open_folders

    if args.num_batches < 1 or args.batch_size < 1 or args.warmup < 0 or args.image_size < 1:
        raise SystemExit(
            "bench loader: --num-batches, --batch-size and --image-size must be >= 1, --warmup >= 0"
        )
    cfg = DataConfig(
        shards=list(args.shards), train_split=args.split, backend=args.backend, num_workers=args.num_workers
    )
    cfg.validate()
    image_bytes = {}  # key -> encoded image bytes, from the compact index
    for folder in open_folders(cfg.shards):
        records = folder.split_samples(args.split)
        image_bytes.update(
            zip(np.char.decode(records["key"]).tolist(), records["size"][:, IMAGE_SLOT].tolist())
        )
    loader = build_train_loader(
        cfg, image_size=(args.image_size, args.image_size), micro_batch=args.batch_size, accum_steps=1,
        rank=0, world_size=1, seed=args.seed, device=args.device,
    )  # fmt: skip
    batches = iter(loader)
    for batch in itertools.islice(batches, args.warmup):
        _wait(batch)
    num_images = num_bytes = 0
    start = time.perf_counter()
    for batch in tqdm(itertools.islice(batches, args.num_batches), total=args.num_batches, desc="batches"):
        _wait(batch)
        num_images += len(batch["key"])
        num_bytes += sum(image_bytes[k] for k in batch["key"])
    elapsed = time.perf_counter() - start
    result = {
        "bench": "loader",
        "backend": loader.backend,
        "decode_device": loader.decode_device,
        "image_formats": sorted({f["image_format"] for f in loader.intensity}),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "num_batches": args.num_batches,
        "images_per_s": round(num_images / elapsed, 2),
        "mb_per_s": round(num_bytes / elapsed / 1e6, 2),
        "elapsed_s": round(elapsed, 3),
    }
    print(json.dumps(result))
    return 0


def _wait(batch: dict) -> None:
    """Make the timing honest for GPU outputs: wait until the batch's image exists."""
    image = batch["image"]
    if image.is_cuda:
        import torch

        torch.cuda.synchronize(image.device)
