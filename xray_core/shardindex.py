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
import os
from pathlib import Path

import numpy as np

from xray_core.shardio import (
    IDX_VERSION,
    IMAGE_EXTENSIONS,
    LABELS_EXTENSION,
    MANIFEST_NAME,
    META_EXTENSION,
    ROI_EXTENSION,
    idx_path_for,
    split_member_name,
)

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


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def parse_idx(idx_path: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray, np.ndarray]:
    """A wds2idx v1.2 file as flat columns: (keys per sample, members per sample, then per member:
    extension, data offset, size). Raises ValueError naming the file and line on any malformation
    (as `shardio.read_idx`)."""
    lines = idx_path.read_text().splitlines()
    if not lines:
        raise ValueError(f"{idx_path}: empty index file")
    header = lines[0].split()
    if len(header) != 2 or header[0] != IDX_VERSION or not header[1].isdigit():
        raise ValueError(f"{idx_path}: header {lines[0]!r} is not '{IDX_VERSION} <num_samples>'")
    keys, counts, exts, offsets, sizes = [], [], [], [], []
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"{idx_path}:{line_no}: expected groups of '<ext> <offset> <size> <name>'")
        keys.append(split_member_name(fields[3])[0])
        counts.append(len(fields) // 4)
        exts += fields[0::4]
        offsets += fields[1::4]
        sizes += fields[2::4]
    if len(keys) != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(keys)}")
    as_int = (lambda values: np.array(values).astype(np.int64)) if keys else (lambda v: np.zeros(0, np.int64))
    return keys, np.array(counts, dtype=np.int64), exts, as_int(offsets), as_int(sizes)


def _slot_of(ext: str) -> int:
    """SLOTS index of a member extension; -1 for a component no loader reads."""
    if ext in IMAGE_EXTENSIONS:
        return IMAGE_SLOT
    return SLOTS.index(ext) if ext in SLOTS else -1


def _shard_records(idx_path: Path, shard_row: int, tar_size: int, folder: Path, key_width: int) -> np.ndarray:
    """Records of one shard, offsets checked against the tar (a bad idx is caught here, not as an
    undecodable image deep inside a worker). Vectorized over the shard's members."""
    keys, counts, exts, offsets, sizes = parse_idx(idx_path)
    bad = (offsets < TAR_BLOCK) | (offsets % TAR_BLOCK != 0) | (offsets + sizes > tar_size)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        key = keys[int(np.searchsorted(np.cumsum(counts), i, side="right"))]
        raise ValueError(
            f"{idx_path}: {key}.{exts[i]} has data offset {offsets[i]} (size {sizes[i]}), impossible in a "
            f"{tar_size}-byte tar; rebuild the index: `xray-shard index {folder}`"
        )
    records = np.zeros(len(keys), dtype=record_dtype(key_width))
    if not keys:
        return records
    if max(map(len, keys)) > key_width or int(sizes.max()) > MISSING - 1:
        raise ValueError(f"{idx_path}: a key longer than {key_width} or a member of 4 GiB or more")
    rows = np.repeat(np.arange(len(keys)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    base = np.minimum.reduceat(offsets, starts)
    slots = np.array([_slot_of(e) for e in exts], dtype=np.int64)
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


def build_index(folder: str | Path, manifest: dict) -> tuple[dict, np.ndarray]:
    """(header, records) for a shard folder from its manifest and idx files (see the module docstring)."""
    folder = Path(folder)
    entries = manifest["shards"]
    split_order = list(dict.fromkeys(e["split"] for e in entries))
    ordered = sorted(range(len(entries)), key=lambda i: split_order.index(entries[i]["split"]))
    parts, shards, splits, start = [], [], {}, 0
    for shard_row, i in enumerate(ordered):
        entry = entries[i]
        tar = folder / entry["name"]
        idx = idx_path_for(tar)
        tar_size = tar.stat().st_size
        records = _shard_records(idx, shard_row, tar_size, folder, key_width=64)
        if len(records) != int(entry["num_samples"]):
            raise ValueError(
                f"{tar}: idx lists {len(records)} samples, manifest says {entry['num_samples']}; "
                f"run `xray-shard index {folder}` or re-convert"
            )
        shards.append(
            {
                "name": entry["name"],
                "split": entry["split"],
                "start": start,
                "stop": start + len(records),
                "idx_stat": _stat_key(idx),
                "tar_size": tar_size,
            }  # fmt: skip
        )
        lo, _hi = splits.get(entry["split"], (start, start))
        start += len(records)
        splits[entry["split"]] = (lo, start)
        parts.append(records)
    records = np.concatenate(parts) if parts else np.zeros(0, dtype=record_dtype(64))
    key_width = max(1, int(np.char.str_len(records["key"]).max(initial=1)))
    header = {
        "version": INDEX_VERSION,
        "manifest_stat": _stat_key(folder / MANIFEST_NAME),
        "key_width": key_width,
        "num_samples": len(records),
        "splits": {name: list(rng) for name, rng in splits.items()},
        "shards": shards,
    }
    return header, records.astype(record_dtype(key_width))


def write_index(folder: str | Path, header: dict, records: np.ndarray) -> Path:
    """Write INDEX_NAME atomically (temporary name, then rename); returns its path."""
    path = Path(folder) / INDEX_NAME
    text = json.dumps(header).encode()
    preamble = len(INDEX_MAGIC) + 8 + len(text)
    padding = -preamble % HEADER_ALIGN
    tmp = path.with_name(f"{INDEX_NAME}.{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        f.write(INDEX_MAGIC + np.uint64(len(text) + padding).tobytes() + text + b" " * padding)
        f.write(records.tobytes())
    os.replace(tmp, path)
    return path


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
    """True when the index was built from the folder's present manifest, idx files and tar sizes."""
    try:
        if header["manifest_stat"] != _stat_key(folder / MANIFEST_NAME):
            return False
        if sorted(s["name"] for s in header["shards"]) != sorted(e["name"] for e in manifest["shards"]):
            return False
        for shard in header["shards"]:
            tar = folder / shard["name"]
            if shard["idx_stat"] != _stat_key(idx_path_for(tar)) or shard["tar_size"] != tar.stat().st_size:
                return False
    except (OSError, KeyError):
        return False
    return True


def load_index(folder: str | Path, manifest: dict, write: bool = True) -> tuple[dict, np.ndarray]:
    """The folder's index, memory-mapped; built (and written beside the shards when `write` and the
    folder is writable) when absent or stale. Raises ValueError for a bad idx (see `build_index`)."""
    folder = Path(folder)
    found = read_index(folder)
    if found is not None and is_current(folder, found[0], manifest):
        return found
    header, records = build_index(folder, manifest)
    if write and os.access(folder, os.W_OK):
        write_index(folder, header, records)
        found = read_index(folder)
        if found is not None:
            return found
    return header, records
