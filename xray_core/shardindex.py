"""The compact index of a shard folder: one packed record per sample, memory-mapped, built once.

The idx text files (`shardio`) are what DALI reads; parsing them into Python objects costs about
1 KB and 12 us per sample, in every process. This index holds the same facts as flat records in one
file beside the shards (``INDEX_NAME``), which every process on a node maps read-only, so ranks and
their workers share one copy through the page cache and no per-sample Python object exists.

One record (``record_dtype``, packed, 61 bytes with 16-char keys):

    shard  u4        row of the shard in the header's ``shards`` list
    key    S{w}      sample key as bytes (w = longest key in the folder; 16 for our writer)
    image  u1        which image component: index into IMAGE_EXTENSIONS
    base   u8        data offset of the sample's first member, bytes into the tar
    rel    u4[4]     data offset of each SLOT minus `base` (MISSING when the sample lacks it)
    size   u4[4]     bytes of each SLOT

Rows are grouped by split (splits in order of first appearance in the manifest), shards in
manifest order, samples in idx order, so a split is one contiguous slice. The file starts with a
JSON header (shards with their split, row range and the idx/tar stat it was built from; split
ranges; the dtype), padded to 64 bytes; the records follow. It is written to a temporary name and
renamed, so concurrent builders (ranks on one node) never expose a half-written file.

Staleness: the header keeps (size, mtime_ns, inode) of manifest.json and of every idx, and every
tar's size; `load_index` rebuilds when any differs.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from xray_core.shardio import (
    IMAGE_EXTENSIONS,
    LABELS_EXTENSION,
    MANIFEST_NAME,
    META_EXTENSION,
    ROI_EXTENSION,
    idx_line_error,
    idx_name_for,
    idx_path_for,
    idx_sample_lines,
    split_member_name,
)

log = logging.getLogger(__name__)

INDEX_NAME = "shards.index"
INDEX_MAGIC = b"XRAYIDX1"
INDEX_VERSION = 1
SLOTS = ("image", ROI_EXTENSION, LABELS_EXTENSION, META_EXTENSION)
IMAGE_SLOT, ROI_SLOT, LABELS_SLOT, META_SLOT = range(len(SLOTS))
MISSING = np.iinfo(np.uint32).max
TAR_BLOCK = 512
HEADER_ALIGN = 64


def record_dtype(key_width: int) -> np.dtype:
    """The packed per-sample record (see the module docstring)."""
    return np.dtype(
        [
            ("shard", "<u4"),
            ("key", f"S{key_width}"),
            ("image", "u1"),
            ("base", "<u8"),
            ("rel", "<u4", (len(SLOTS),)),
            ("size", "<u4", (len(SLOTS),)),
        ]
    )


def _stat_key(path: str | Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def parse_idx(idx_path: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray, np.ndarray]:
    """A wds2idx v1.2 file as flat columns: (keys per sample, members per sample, then per member:
    extension, data offset, size). Raises ValueError naming the file and line on any malformation
    (as `shardio.read_idx`)."""
    keys, counts, exts, offsets, sizes = [], [], [], [], []
    for line_no, line in enumerate(idx_sample_lines(idx_path), start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise idx_line_error(idx_path, line_no)
        keys.append(split_member_name(fields[3])[0])
        counts.append(len(fields) // 4)
        exts += fields[0::4]
        offsets += fields[1::4]
        sizes += fields[2::4]
    # map(int) then one array: several times faster than numpy's own str -> int64 cast
    offsets_M, sizes_M = (np.fromiter(map(int, column), np.int64, len(column)) for column in (offsets, sizes))
    return keys, np.array(counts, dtype=np.int64), exts, offsets_M, sizes_M


# member extension -> SLOTS index; absent: a component no loader reads
SLOT_OF = {**{ext: IMAGE_SLOT for ext in IMAGE_EXTENSIONS}, **{ext: SLOTS.index(ext) for ext in SLOTS[1:]}}


def shard_records(idx_path: Path, shard_row: int, tar_size: int, folder: Path) -> np.ndarray:
    """Records of one shard (`record_dtype` with this shard's longest key), offsets checked against the tar (a bad idx is caught here, not as an
    undecodable image deep inside a worker). Vectorized over the shard's members."""
    keys, counts, exts, offsets, sizes = parse_idx(idx_path)  # per member (M of them), but keys
    bad = (offsets < TAR_BLOCK) | (offsets % TAR_BLOCK != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        key = keys[int(np.searchsorted(np.cumsum(counts), i, side="right"))]
        raise ValueError(
            f"{idx_path}: {key}.{exts[i]} has data offset {offsets[i]} (size {sizes[i]}), impossible in a "
            f"{tar_size}-byte tar; rebuild the index: `xray-shard index {folder}`"
        )
    # Members past the tar's end: the tar was cut short (a copy or a disk that failed). The samples
    # before the cut are intact, so the index keeps every record and the loaders skip the lost ones
    # when they read them (a short read), naming each.
    past_end = offsets + sizes > tar_size
    if past_end.any():
        lost = np.unique(np.searchsorted(np.cumsum(counts), np.flatnonzero(past_end), side="right"))
        log.warning(
            "%s: %d sample(s) from %s on lie past the end of its %d-byte tar (truncated?); loaders skip "
            "them: run `xray-shard verify %s`", idx_path, len(lost), keys[int(lost[0])], tar_size, folder,
        )  # fmt: skip
    keys = [key.encode() for key in keys]
    records = np.zeros(len(keys), dtype=record_dtype(max(map(len, keys), default=1)))
    if not keys:
        return records
    if int(sizes.max()) >= MISSING:
        raise ValueError(f"{idx_path}: a member of 4 GiB or more")
    rows = np.repeat(np.arange(len(keys)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    base = np.minimum.reduceat(offsets, starts)
    slots = np.fromiter((SLOT_OF.get(e, -1) for e in exts), np.int64, len(exts))
    kept = slots >= 0
    if int(np.bincount(rows[slots == IMAGE_SLOT], minlength=len(keys)).max()) > 1:
        raise ValueError(f"{idx_path}: a sample has more than one image component ({IMAGE_EXTENSIONS})")
    rel = np.full((len(keys), len(SLOTS)), MISSING, dtype=np.uint32)
    size = np.zeros((len(keys), len(SLOTS)), dtype=np.uint32)
    spans = offsets[kept] - base[rows[kept]]
    if spans.size and int(spans.max()) >= MISSING:
        raise ValueError(f"{idx_path}: a sample spans 4 GiB or more of its tar")
    rel[rows[kept], slots[kept]] = spans
    size[rows[kept], slots[kept]] = sizes[kept]
    image = np.zeros(len(keys), dtype=np.uint8)
    is_image = slots == IMAGE_SLOT
    image[rows[is_image]] = [IMAGE_EXTENSIONS.index(exts[i]) for i in np.flatnonzero(is_image)]
    records["shard"], records["key"], records["image"] = shard_row, keys, image
    records["base"], records["rel"], records["size"] = base, rel, size
    return records


def _shard_task(task: tuple[Path, int, int, Path]) -> np.ndarray:
    idx, shard_row, tar_size, folder = task
    return shard_records(idx, shard_row, tar_size, folder)


def build_parts(folder: str | Path, manifest: dict, num_workers: int = 1) -> tuple[dict, list[np.ndarray]]:
    """(header, records per shard in row order) from the manifest and idx files; shards are parsed
    by `num_workers` processes when > 1 (about 2-10 us per sample on one core)."""
    folder = Path(folder)
    entries = manifest["shards"]
    split_order = list(dict.fromkeys(e["split"] for e in entries))
    entries = sorted(entries, key=lambda e: split_order.index(e["split"]))  # stable: manifest order
    tars = [folder / e["name"] for e in entries]
    idx_stats = [_stat_key(idx_path_for(tar)) for tar in tars]  # before reading: a later rewrite shows
    tasks = [(idx_path_for(tar), row, tar.stat().st_size, folder) for row, tar in enumerate(tars)]
    if num_workers > 1 and len(tasks) > 1:
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            parts = list(pool.map(_shard_task, tasks, chunksize=max(1, len(tasks) // (8 * num_workers))))
    else:
        parts = [_shard_task(task) for task in tasks]
    shards, splits, start = [], {}, 0
    for entry, part, idx_stat, task in zip(entries, parts, idx_stats, tasks):
        if len(part) != int(entry["num_samples"]):
            raise ValueError(
                f"{folder / entry['name']}: idx lists {len(part)} samples, manifest says "
                f"{entry['num_samples']}; run `xray-shard index {folder}` or re-convert"
            )
        shards.append({"name": entry["name"], "split": entry["split"], "start": start,
                       "stop": start + len(part), "idx_stat": idx_stat, "tar_size": task[2]})  # fmt: skip
        lo, _hi = splits.get(entry["split"], (start, start))
        start += len(part)
        splits[entry["split"]] = (lo, start)
    header = {
        "version": INDEX_VERSION,
        "manifest_stat": _stat_key(folder / MANIFEST_NAME),
        "key_width": max([p.dtype["key"].itemsize for p in parts], default=1),
        "num_samples": start,
        "splits": {name: list(rows) for name, rows in splits.items()},
        "shards": shards,
    }
    return header, parts


def _joined(header: dict, parts: list[np.ndarray]) -> np.ndarray:
    dtype = record_dtype(header["key_width"])
    return np.concatenate([p.astype(dtype) for p in parts]) if parts else np.zeros(0, dtype)


def write_index(folder: str | Path, header: dict, parts: list[np.ndarray]) -> Path:
    """Write INDEX_NAME atomically (temporary name, then rename), one shard's records at a time
    (no second copy of the whole index in memory); returns its path."""
    path = Path(folder) / INDEX_NAME
    text = json.dumps(header).encode()
    preamble = len(INDEX_MAGIC) + 8 + len(text)
    padding = -preamble % HEADER_ALIGN
    dtype = record_dtype(header["key_width"])
    tmp = path.with_name(f"{INDEX_NAME}.{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        f.write(INDEX_MAGIC + np.uint64(len(text) + padding).tobytes() + text + b" " * padding)
        for part in parts:
            f.write(part.astype(dtype).tobytes())
    os.replace(tmp, path)
    return path


def index_folder(folder: str | Path, num_workers: int = 1) -> Path:
    """(Re)build a shard folder's index from its manifest and idx files and write it beside them."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    return write_index(folder, *build_parts(folder, manifest, num_workers))


def read_index(folder: str | Path) -> tuple[dict, np.ndarray] | None:
    """(header, memory-mapped records) of the index file, or None when it is absent or unreadable."""
    path = Path(folder) / INDEX_NAME
    try:
        with open(path, "rb") as f:
            if f.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
                return None
            header_size = int(np.frombuffer(f.read(8), dtype=np.uint64)[0])
            header = json.loads(f.read(header_size))
    except (OSError, ValueError, IndexError):
        return None
    if header.get("version") != INDEX_VERSION:
        return None
    if header["num_samples"] == 0:
        return header, np.zeros(0, dtype=record_dtype(header["key_width"]))
    records = np.memmap(
        path, dtype=record_dtype(header["key_width"]), mode="r", offset=len(INDEX_MAGIC) + 8 + header_size,
        shape=(header["num_samples"],),
    )  # fmt: skip
    return header, records


def is_current(folder: Path, header: dict, manifest: dict) -> bool:
    """True when the index was built from the folder's present manifest, idx files and tar sizes.
    Two stats per shard on string paths (every rank runs this: pathlib would triple its cost)."""
    base = str(folder)
    try:
        if header["manifest_stat"] != _stat_key(os.path.join(base, MANIFEST_NAME)):
            return False
        if sorted(s["name"] for s in header["shards"]) != sorted(e["name"] for e in manifest["shards"]):
            return False
        for shard in header["shards"]:
            tar = os.path.join(base, shard["name"])
            if shard["idx_stat"] != _stat_key(idx_name_for(tar)) or shard["tar_size"] != os.stat(tar).st_size:
                return False
    except (OSError, KeyError):
        return False
    return True


def load_index(folder: str | Path, manifest: dict, write: bool = True) -> tuple[dict, np.ndarray]:
    """The folder's index, memory-mapped; built (and written beside the shards when `write` and the
    folder is writable) when absent or stale. Raises ValueError for a bad idx (see `build_parts`)."""
    folder = Path(folder)
    found = read_index(folder)
    if found is not None and is_current(folder, found[0], manifest):
        return found
    log.warning(
        "%s: shard index %s; building it from %d idx files (run `xray-shard index %s` once so that "
        "ranks only map it)", folder, "stale" if found else "missing", len(manifest["shards"]), folder,
    )  # fmt: skip
    header, parts = build_parts(folder, manifest)
    if write and os.access(folder, os.W_OK):
        write_index(folder, header, parts)
        found = read_index(folder)
        if found is not None:
            return found
    return header, _joined(header, parts)
