"""`xray-shard refresh-roi DIR`: re-estimate the chest region of every sample of a shard folder in place.

For shards converted with an older chest-region estimate: the original archive is not needed, the
estimate runs on the stored image (what `convert` estimates on, too; for --format jpg, on its
decoded JPEG, which differs from convert's input by the compression error only). Per sample, `roi.png` and the
json's `roi_box`, `roi_method`, `roi_confidence` and `roi_*` flags are replaced; the image, labels and
every other json field stay byte-identical. Each tar is rewritten to a temporary name and renamed
(its idx first, as `convert` does), then manifest.json (and the resume state, when present) gets the
tar's new size and sha256, so `xray-shard verify` passes afterwards. Shards run in parallel
(`--workers`); a shard whose samples already carry the current estimate is rewritten identically.
"""

from __future__ import annotations

import argparse
import json
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from data_tools.encode import (
    ROI_PNG_LEVEL,
    decode_stored,
    encode_json,
    encode_png,
    region_flags,
    region_meta,
    roi_path,
)
from data_tools.manifest import read_manifest, write_atomic, write_manifest
from data_tools.writer import STATE_DIR
from xray_core.roi import estimate_chest_region_detail, small_copy
from xray_core.shardio import (
    CHECKSUM_FIELD,
    META_EXTENSION,
    ROI_EXTENSION,
    ShardTarWriter,
    idx_path_for,
    member_checksums,
    read_idx,
    read_sample,
)

# roi flags of this and of earlier estimates (roi_body / roi_fallback: the Otsu estimate's fallbacks)
ROI_FLAGS = frozenset({"roi_lateral", "roi_not_chest", "roi_unsure", "roi_body", "roi_fallback"})


def refresh_components(components: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    """One sample's components with a new roi.png and json; also the sample's chest-region path."""
    meta = json.loads(components["json"])
    image_ext = next(ext for ext in ("png", "jpg", "jp2") if ext in components)
    stored = decode_stored(components[image_ext])
    region = estimate_chest_region_detail(stored, small_copy(stored), view=meta.get("view"))
    meta.update(region_meta(region))
    meta["flags"] = [flag for flag in meta["flags"] if flag not in ROI_FLAGS] + region_flags(region)
    refreshed = dict(components)
    refreshed[ROI_EXTENSION] = encode_png(region.mask_hw, ROI_PNG_LEVEL, zlib.Z_DEFAULT_STRATEGY)
    meta[CHECKSUM_FIELD] = member_checksums(refreshed)  # the roi.png changed
    refreshed[META_EXTENSION] = encode_json(meta)
    return refreshed, roi_path(meta)


def refresh_shard(tar_path: Path) -> tuple[str, int, str, dict[str, int]]:
    """Rewrite one tar (and its idx): (name, new size in bytes, new sha256, samples per region path)."""
    paths: dict[str, int] = {}
    writer = ShardTarWriter(tar_path)
    try:
        with open(tar_path, "rb") as f:
            for sample in read_idx(idx_path_for(tar_path)):
                components, path = refresh_components(read_sample(f, sample))
                writer.write_sample(sample.key, components)
                paths[path] = paths.get(path, 0) + 1
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return tar_path.name, writer.num_bytes, writer.sha256, paths


def _update_state(folder: Path, name: str, num_bytes: int, sha256: str, roi_paths: dict) -> None:
    """Keep a resumable conversion's state in step with the rewritten tar (else resume redoes it)."""
    state_path = folder / STATE_DIR / "shards" / f"{name}.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        state.update(num_bytes=num_bytes, sha256=sha256, roi_paths=roi_paths)
        write_atomic(state_path, json.dumps(state).encode())


def refresh_roi(folder: Path, num_workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Refresh every shard of `folder`; returns the number of samples on each chest-region path."""
    from tqdm import tqdm

    folder = Path(folder)
    manifest = read_manifest(folder)
    entries = {entry["name"]: entry for entry in manifest["shards"]}
    missing = [
        name for name in entries if not (folder / name).is_file() or not idx_path_for(folder / name).is_file()
    ]
    if missing:
        raise ValueError(f"{folder}: shards or idx files listed in manifest.json are missing: {missing[:3]}")
    totals: dict[str, int] = {}
    tars = [folder / name for name in entries]
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        results = pool.map(refresh_shard, tars) if num_workers > 1 else map(refresh_shard, tars)
        for name, num_bytes, sha256, paths in tqdm(
            results, total=len(tars), desc="refresh-roi", disable=not progress
        ):
            entries[name].update(num_bytes=num_bytes, sha256=sha256, roi_paths=paths)
            write_manifest(folder, manifest)  # after every shard: an interrupted run leaves a valid folder
            _update_state(folder, name, num_bytes, sha256, paths)
            for path, count in paths.items():
                totals[path] = totals.get(path, 0) + count
    return totals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a folder written by `xray-shard convert`")
    parser.add_argument("--workers", type=int, default=1, help="shards refreshed in parallel (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ValueError("--workers must be >= 1")
    totals = refresh_roi(args.folder, args.workers, progress=not args.no_progress)
    num = sum(totals.values())
    shares = ", ".join(
        f"{path} {count} ({100 * count / max(num, 1):.1f}%)" for path, count in sorted(totals.items())
    )
    print(f"xray-shard refresh-roi: {num} samples in {args.folder}; chest region: {shares or 'none'}")
    return 0
