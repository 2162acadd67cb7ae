"""`xray-shard index DIR|TAR...`: DALI .idx files (wds2idx v1.2) for tars made elsewhere, and the
compact index of every shard folder given.

Each tar is scanned with shardio.index_tar (consecutive members with one key form a sample) and its
idx written beside it with shardio.write_idx. Existing idx files are kept unless --overwrite. A
folder with a manifest.json then gets its compact index (`xray_core.shardindex`, the file every
loader process memory-maps) rebuilt from its idx files, `--workers` shards in parallel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xray_core.shardindex import INDEX_NAME, index_folder
from xray_core.shardio import MANIFEST_NAME, idx_path_for, index_tar, write_idx


def tar_paths(paths: list[Path]) -> list[Path]:
    """Folders expand to their *.tar files (sorted); files are taken as given."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(path.glob("*.tar"))
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return found


def index_tars(paths: list[Path], overwrite: bool = False) -> dict[Path, int]:
    """Write the idx of every tar that lacks one (all with overwrite); returns tar -> samples indexed."""
    written = {}
    for tar in tar_paths(paths):
        if idx_path_for(tar).exists() and not overwrite:
            continue
        samples = index_tar(tar)
        write_idx(samples, idx_path_for(tar))
        written[tar] = len(samples)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", type=Path, nargs="+", help="shard folders and/or tar files")
    parser.add_argument("--overwrite", action="store_true", help="rewrite idx files that already exist")
    parser.add_argument(
        "--workers", type=int, default=1, help=f"processes parsing idx files into {INDEX_NAME} (default 1)"
    )


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    written = index_tars(args.paths, args.overwrite)
    for tar, num in written.items():
        print(f"{idx_path_for(tar)}: {num} samples")
    print(f"xray-shard index: {len(written)} idx file(s) written")
    for folder in [p for p in args.paths if (p / MANIFEST_NAME).is_file()]:
        print(f"{index_folder(folder, args.workers)}: written")
    return 0
