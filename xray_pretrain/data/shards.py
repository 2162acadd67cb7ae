"""Shard folders: manifest validation, the samples of a split, label alignment, random-access reads.

A shard folder (written by `xray-shard convert`) holds ``manifest.json``, the tars and one DALI
``.idx`` beside each tar (format: `xray_core.shardio`). Loaders never stream tars: they read
one sample at a time at the offsets the idx gives, which is what makes the global sample order exact.
They read those offsets from the folder's compact index (`xray_core.shardindex`): flat records,
memory-mapped, shared by every process of a node, no Python object per sample.

Several folders can be mixed; their labels align by name (`union_label_names`, `label_scatter`).
"""

from __future__ import annotations

import json
import math
import os
import resource
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_core.shardindex import IMAGE_SLOT, MISSING, SLOTS, load_index
from xray_core.shardio import (
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    META_EXTENSION,
    ROI_EXTENSION,
    changed_members,
    idx_name_for,
)
from xray_pretrain.data.decode import decode_labels
from xray_pretrain.data.heap import release_freed_heap

FORMAT_VERSION = 1
IMAGE_FORMATS = ("png16", "jpg", "jp2")
TAR_BLOCK = 512  # a tar member's data follows its 512-byte header


class CorruptSample(ValueError):
    """One sample's stored bytes are unusable (short read, an idx entry that does not point at its
    member, undecodable labels or json, an image that does not decode). Loaders skip and replace such
    samples (`data.badsamples`); `shard` and `key` name it."""

    def __init__(self, message: str, shard: str = "", key: str = ""):
        super().__init__(message)
        self.shard, self.key = shard, key


class ShardFolder:
    """A validated shard folder. Reads the manifest now and each split's idx files on first use.

    Raises ValueError naming the folder and the fix when the manifest is missing or malformed, or a
    shard or its idx is missing.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ValueError(
                f"{self.path}: no {MANIFEST_NAME}; is this a shard folder written by `xray-shard convert`? "
                "(data.shards takes shard folders, not tar files)"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{manifest_path}: not valid JSON ({error}); re-run `xray-shard convert`"
            ) from error
        self._validate_manifest()
        self.dataset: str = self.manifest.get("dataset", self.path.name)
        self.label_names: list[str] = list(self.manifest["label_names"])
        self.image_format: str = self.manifest.get("image_format", "")
        intensity = self.manifest["intensity"]
        self.intensity_mean = float(intensity["mean"])
        self.intensity_std = float(intensity["std"])
        self._index: tuple[dict, np.ndarray] | None = None
        self.tar_paths: list[str] = []  # by the index's shard row (filled with the index)

    def _validate_manifest(self) -> None:
        m, where = self.manifest, f"{self.path / MANIFEST_NAME}"
        if m.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{where}: format_version {m.get('format_version')!r}, this loader reads {FORMAT_VERSION}; "
                "re-run `xray-shard convert` with this version of the tools"
            )
        names = m.get("label_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: 'label_names' must be a list of strings")
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: 'label_names' has duplicates")
        intensity = m.get("intensity") or {}
        mean, std = intensity.get("mean"), intensity.get("std")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, std)) or std <= 0:
            raise ValueError(
                f"{where}: 'intensity' needs finite 'mean' and positive 'std' (fractions of full scale), "
                f"got {intensity!r}"
            )
        shards = m.get("shards")
        if not isinstance(shards, list):
            raise ValueError(f"{where}: 'shards' must be a list")
        # One directory listing instead of two stats per shard (10k shards: ~20 ms instead of ~1 s).
        present = {item.name for item in os.scandir(self.path) if item.is_file()}
        for entry in shards:
            if entry["name"] not in present:
                raise ValueError(
                    f"{where}: shard {entry['name']} is listed but {self.path / entry['name']} does not exist"
                )
            if idx_name_for(entry["name"]) not in present:
                raise ValueError(
                    f"{self.path}: {idx_name_for(entry['name'])} is missing (loaders read samples through the "
                    f"DALI index); run `xray-shard index {self.path}`"
                )

    def num_samples(self, split: str) -> int:
        """Samples of `split` as the manifest counts them (no idx read)."""
        return sum(int(e["num_samples"]) for e in self.manifest["shards"] if e["split"] == split)

    def _load_index(self) -> tuple[dict, np.ndarray]:
        """(header, records) of the folder's compact index (`xray_core.shardindex`), built and cached
        beside the shards when absent or stale, then memory-mapped: every process shares one copy."""
        if self._index is None:
            self._index = load_index(self.path, self.manifest)
            base = str(self.path)
            self.tar_paths = [os.path.join(base, shard["name"]) for shard in self._index[0]["shards"]]
        return self._index

    def split_samples(self, split: str) -> np.ndarray:
        """The records of `split` (`shardindex.record_dtype`, memory-mapped, no copy) in manifest shard
        order, then idx order. Raises ValueError when an idx disagrees with the manifest or its tar."""
        header, records = self._load_index()
        start, stop = header["splits"].get(split, (0, 0))
        return records[start:stop]


def union_label_names(folders: list[ShardFolder]) -> list[str]:
    """Ordered union of the folders' label names (first folder's order, then new names as met)."""
    names: list[str] = []
    for folder in folders:
        names.extend(n for n in folder.label_names if n not in names)
    return names


def label_scatter(folder_names: list[str], union_names: list[str]) -> np.ndarray:
    """Index of each of a folder's labels in the union: `out[scatter] = folder_vector`."""
    return np.array([union_names.index(n) for n in folder_names], dtype=np.int64)


FD_RESERVE_FRACTION = 4  # a quarter of the descriptor limit stays free for sockets, pipes, DALI, torch


def open_file_budget() -> int:
    """How many tar handles one process may keep open: raise the soft RLIMIT_NOFILE to the hard limit
    where permitted, keep a quarter of it (at least 256) for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_FD_TARGET if hard == resource.RLIM_INFINITY else min(hard, MAX_FD_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # not permitted here: live with the soft limit
            pass
    soft = MAX_FD_TARGET if soft == resource.RLIM_INFINITY else soft
    return max(16, soft - max(256, soft // FD_RESERVE_FRACTION))


MAX_FD_TARGET = 1 << 20


def _member_header_problem(header: bytes, member: str, size: int) -> str | None:
    """Why `header` (512 bytes) is not the ustar header of `member` with `size` data bytes, or None."""
    if len(header) < TAR_BLOCK:
        return None  # the short read is reported instead
    stored_sum = header[148:156].split(b"\0")[0].strip()
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if not stored_sum or not stored_sum.isdigit() or int(stored_sum, 8) != computed:
        return "no tar header before the idx offset (the idx disagrees with the tar: rebuild it with `xray-shard index`)"
    name = header[:100].split(b"\0")[0].decode(errors="replace")
    prefix = header[345:500].split(b"\0")[0].decode(errors="replace") if header[257:262] == b"ustar" else ""
    name = f"{prefix}/{name}" if prefix else name
    stored_size = header[124:136].split(b"\0")[0].strip()
    if len(member) < 100 and name != member:  # longer names live in pax/GNU records, not checked here
        return f"the idx offset points at member {name!r} (the idx disagrees with the tar: rebuild it with `xray-shard index`)"
    if not stored_size.isdigit() or int(stored_size, 8) != size:
        return f"the tar member holds {stored_size.decode(errors='replace')!r} (octal) bytes, the idx says {size}"
    return None


class ShardReader:
    """Reads samples with `os.pread` on tar descriptors kept open in an LRU as large as the process's
    descriptor budget (`open_file_budget`), so a training run opens each tar about once per process.

    pread takes the offset with each call, so a descriptor has no file position to share: threads may
    share a reader, and a forked DataLoader worker keeps using the descriptors it inherited (each
    process closes only its own copies). `num_opens` / `num_reads` count this process's opens and
    sample reads (benchmarks).
    """

    def __init__(self, max_open_files: int | None = None):
        self.max_open_files = open_file_budget() if max_open_files is None else max_open_files
        self._fds: OrderedDict[str, int] = OrderedDict()
        self.num_opens = self.num_reads = 0

    def read(self, tar_path: str, record: np.void, only: tuple[str, ...] | None = None) -> dict[str, bytes]:
        """Component name -> bytes for one index record (`shardindex.record_dtype`); `only`: just these
        components (e.g. the json, without the image).

        Each member is read with the tar header before it (same pread), and the header must name
        this member with this size: an idx that disagrees with its tar (shifted offsets, another
        tar's idx) or a tar cut short raises `CorruptSample` instead of handing on foreign bytes."""
        fd = self._fd(tar_path)
        key = record["key"].decode()
        base, rel, size = int(record["base"]), record["rel"], record["size"]
        out = {}
        for slot, name in enumerate(SLOTS):  # "image" whatever its format, then roi.png ...
            if rel[slot] == MISSING or (only is not None and name not in only):
                continue
            offset, length = base + int(rel[slot]), int(size[slot])
            data = os.pread(fd, length + TAR_BLOCK, offset - TAR_BLOCK)
            member = f"{key}.{IMAGE_EXTENSIONS[record['image']] if slot == IMAGE_SLOT else name}"
            problem = _member_header_problem(data[:TAR_BLOCK], member, length)
            if len(data) != length + TAR_BLOCK:
                problem = (
                    f"short read: wanted {length} bytes at {offset}, got {max(0, len(data) - TAR_BLOCK)} "
                    "(tar truncated, or changed after indexing)"
                )
            if problem:
                raise CorruptSample(f"{tar_path}:{key}: {member}: {problem}", Path(tar_path).name, key)
            out[name] = data[TAR_BLOCK:]
        self.num_reads += 1
        return out

    def _fd(self, tar_path: str) -> int:
        fd = self._fds.get(tar_path)
        if fd is None:
            if len(self._fds) >= self.max_open_files:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(tar_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self.num_opens += 1
            self._fds[tar_path] = fd
        else:
            self._fds.move_to_end(tar_path)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):  # pickled into spawned workers: never ship descriptors
        return {"max_open_files": self.max_open_files}

    def __setstate__(self, state):
        self.__init__(state["max_open_files"])


@dataclass(frozen=True)
class StoredSample:
    """One sample as both backends take it from the host: the image still encoded (wds decodes it
    with Pillow, DALI on its own), labels already in the table's order."""

    key: str
    image: bytes  # encoded png16 / jpg / jp2
    roi: bytes | None  # roi.png (0/255); None for tars written without one
    labels: np.ndarray  # (num_labels,) float32 in the table's label order, NaN unknown
    mean: float  # the folder's intensity statistics, fractions of full scale
    std: float
    meta: bytes | None = None  # the sample's json (report text, ids) for tasks that need it
    shard: str = ""  # the tar's file name (for messages about this sample)


class SplitTable:
    """One split over several folders: its samples, labels aligned by name, per-folder intensity.

    Both backends read through `read`, so they see the same samples, labels and statistics.
    """

    def __init__(self, folders: list[ShardFolder], split: str, label_names: list[str] | None = None):
        """`label_names`: the label order to align to (default: the union over `folders`)."""
        self.folders = folders
        self.split = split
        self.records = [folder.split_samples(split) for folder in folders]  # memory-mapped, shared
        self.label_names = list(label_names) if label_names is not None else union_label_names(folders)
        missing = [n for folder in folders for n in folder.label_names if n not in self.label_names]
        assert not missing, f"label_names lacks {missing}"
        self._scatters = [label_scatter(folder.label_names, self.label_names) for folder in folders]

    @property
    def folder_sizes(self) -> list[int]:
        return [len(records) for records in self.records]

    def key(self, folder: int, index: int) -> str:
        return self.records[folder][index]["key"].decode()

    def read(self, reader: ShardReader, folder: int, index: int) -> StoredSample:
        """Sample `index` of `folder`: its bytes through `reader` (preads, no image decode), checked
        as far as that costs little next to the image decode: every member where the idx says,
        labels.npy of the manifest's length, a json that parses, every member's CRC-32 equal to the
        json's (`shardio.changed_members`; about 1 ms per MB). Raises `CorruptSample` otherwise."""
        record = self.records[folder][index]
        source = self.folders[folder]
        tar_path = source.tar_paths[record["shard"]]
        components = reader.read(tar_path, record)
        key = record["key"].decode()
        where = f"{tar_path}:{key}"
        try:
            folder_labels = decode_labels(components, len(source.label_names), where)
        except Exception as error:  # np.load raises several types for damaged bytes
            message = str(error) if str(error).startswith(where) else _reason(where, "labels.npy", error)
            raise CorruptSample(message, Path(tar_path).name, key) from error
        meta = components.get(META_EXTENSION)
        try:
            parsed = json.loads(meta if meta is not None else b"null")
            if not isinstance(parsed, dict):
                raise ValueError("missing, or not a JSON object")
        except ValueError as error:
            raise CorruptSample(_reason(where, "json", error), Path(tar_path).name, key) from error
        image_ext = IMAGE_EXTENSIONS[record["image"]]  # the reader names the image slot "image"
        changed = changed_members(
            {image_ext if n == "image" else n: v for n, v in components.items()}, parsed
        )
        if changed:  # found here, before any decoder, so both backends skip exactly the same samples
            raise CorruptSample(
                f"{where}: {', '.join(changed)} changed since conversion (crc32 differs from the json's)",
                Path(tar_path).name,
                key,
            )
        return StoredSample(
            key=key,
            image=components[SLOTS[IMAGE_SLOT]],
            roi=components.get(ROI_EXTENSION),
            labels=self.labels(folder, folder_labels),
            mean=source.intensity_mean,
            std=source.intensity_std,
            meta=meta,
            shard=Path(tar_path).name,
        )

    def intensities(self) -> list[dict]:
        return [
            {
                "folder": str(f.path),
                "mean": f.intensity_mean,
                "std": f.intensity_std,
                "image_format": f.image_format,
            }
            for f in self.folders
        ]

    def labels(self, folder: int, folder_labels: np.ndarray) -> np.ndarray:
        """A folder's label vector scattered into the union order: (num_labels,) float32, NaN unknown."""
        out = np.full(len(self.label_names), np.nan, dtype=np.float32)
        out[self._scatters[folder]] = folder_labels
        return out

    def subset(self, keep: list[list[int]]) -> SplitTable:
        """The same table restricted to sample indices `keep[folder]` (e.g. a label fraction)."""
        table = SplitTable(self.folders, self.split, self.label_names)
        table.records = [
            records[np.asarray(rows, dtype=np.int64)] for records, rows in zip(self.records, keep)
        ]
        return table

    def metadata(self, reader: ShardReader, folder: int, index: int) -> dict:
        """One sample's json component (patient, study, view, labels as written; no image read)."""
        record = self.records[folder][index]
        tar_path = self.folders[folder].tar_paths[record["shard"]]
        return json.loads(reader.read(tar_path, record, only=(META_EXTENSION,))[META_EXTENSION])

    def first_by_key(self, num_samples: int) -> np.ndarray:
        """(folder, index) int64 rows (n, 2) of the first `num_samples` samples in sorted-key order
        (folder, then index, break ties). O(split), never a sort of the whole split: the keys' first 8
        bytes (`key_prefixes`) are partitioned to find the n-th smallest prefix; only rows whose
        prefix is at most that one can be among the first n, and only they are sorted by full key."""
        starts = np.cumsum([0, *self.folder_sizes])
        num = min(num_samples, int(starts[-1]))
        if num == 0:
            return np.zeros((0, 2), dtype=np.int64)
        prefixes = np.concatenate([key_prefixes(records["key"]) for records in self.records])
        if num < len(prefixes):  # everything tied with the n-th prefix competes for the last places
            chosen = np.flatnonzero(prefixes <= np.partition(prefixes, num - 1)[num - 1])
        else:
            chosen = np.arange(len(prefixes))
        del prefixes
        folder = np.searchsorted(starts, chosen, side="right") - 1
        index = chosen - starts[folder]
        # chosen ascends, so its rows come folder by folder: gather each folder's keys in that order
        keys = np.concatenate([r["key"][index[folder == f]] for f, r in enumerate(self.records)])
        ranked = np.lexsort((index, folder, keys))[:num]
        release_freed_heap()
        return np.stack([folder[ranked], index[ranked]], axis=1).astype(np.int64)


def key_prefixes(keys: np.ndarray) -> np.ndarray:
    """(n,) uint64: the first 8 bytes of each key (bytes dtype, NUL-padded) read big-endian, so
    prefixes order as the keys do wherever the prefixes differ. A uint64 partition is ~50x faster
    than one over bytes, which numpy sorts rather than selects."""
    width = keys.dtype.itemsize
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), width)
    head = np.zeros((len(keys), 8), dtype=np.uint8)
    head[:, : min(8, width)] = raw[:, :8]
    return head.view(">u8").ravel().astype(np.uint64)


def _reason(where: str, component: str, error: Exception) -> str:
    return f"{where}: {component}: {type(error).__name__}: {error}"


def open_folders(paths: list[str]) -> list[ShardFolder]:
    """ShardFolder per path, opening each distinct path once."""
    cache: dict[Path, ShardFolder] = {}
    for path in paths:
        resolved = Path(path).resolve()
        if resolved not in cache:
            cache[resolved] = ShardFolder(path)
    return [cache[Path(path).resolve()] for path in paths]
