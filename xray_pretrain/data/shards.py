"""Shard folders: manifest validation, the samples of a split, label alignment, random-access reads.

A shard folder (written by `xray-shard convert`) holds ``manifest.json``, the tars and one DALI
``.idx`` beside each tar (format: `xray_core.shardio`). Loaders never stream tars: they read
one sample at a time at the offsets the idx gives, which is what makes the global sample order exact.

Several folders can be mixed; their labels align by name (`union_label_names`, `label_scatter`).
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_core.shardio import (
    MANIFEST_NAME,
    META_EXTENSION,
    ROI_EXTENSION,
    IndexedSample,
    idx_path_for,
    read_idx,
    read_sample,
)
from xray_pretrain.data.decode import decode_labels

FORMAT_VERSION = 1
IMAGE_FORMATS = ("png16", "jpg", "jp2")


@dataclass(frozen=True)
class SampleRef:
    """One sample of one folder: the tar it lives in and its members' offsets."""

    tar_path: Path
    sample: IndexedSample

    @property
    def key(self) -> str:
        return self.sample.key


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
        self._split_cache: dict[str, list[SampleRef]] = {}

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
        for entry in shards:
            tar = self.path / entry["name"]
            if not tar.is_file():
                raise ValueError(f"{where}: shard {entry['name']} is listed but {tar} does not exist")
            if not idx_path_for(tar).is_file():
                raise ValueError(
                    f"{self.path}: {idx_path_for(tar).name} is missing (loaders read samples through the "
                    f"DALI index); run `xray-shard index {self.path}`"
                )

    def num_samples(self, split: str) -> int:
        """Samples of `split` as the manifest counts them (no idx read)."""
        return sum(int(e["num_samples"]) for e in self.manifest["shards"] if e["split"] == split)

    def split_samples(self, split: str) -> list[SampleRef]:
        """The samples of `split` in manifest shard order, then idx order (cached)."""
        if split not in self._split_cache:
            refs = []
            for entry in self.manifest["shards"]:
                if entry["split"] != split:
                    continue
                tar = self.path / entry["name"]
                samples = read_idx(idx_path_for(tar))
                if len(samples) != int(entry["num_samples"]):
                    raise ValueError(
                        f"{tar}: idx lists {len(samples)} samples, manifest says {entry['num_samples']}; "
                        f"run `xray-shard index {self.path}` or re-convert"
                    )
                _check_offsets(tar, samples, self.path)
                refs.extend(SampleRef(tar, s) for s in samples)
            self._split_cache[split] = refs
        return self._split_cache[split]


TAR_BLOCK = 512


def _check_offsets(tar: Path, samples: list[IndexedSample], folder: Path) -> None:
    """Data offsets inside a tar follow a 512-byte header and start on a block: catch a bad idx now,
    not as an undecodable image deep inside a worker."""
    tar_size = tar.stat().st_size
    for sample in samples:
        for ext, (offset, size) in sample.components.items():
            if offset < TAR_BLOCK or offset % TAR_BLOCK or offset + size > tar_size:
                raise ValueError(
                    f"{idx_path_for(tar)}: {sample.key}.{ext} has data offset {offset} (size {size}), impossible "
                    f"in a {tar_size}-byte tar; rebuild the index: `xray-shard index {folder}`"
                )


def union_label_names(folders: list[ShardFolder]) -> list[str]:
    """Ordered union of the folders' label names (first folder's order, then new names as met)."""
    names: list[str] = []
    for folder in folders:
        names.extend(n for n in folder.label_names if n not in names)
    return names


def label_scatter(folder_names: list[str], union_names: list[str]) -> np.ndarray:
    """Index of each of a folder's labels in the union: `out[scatter] = folder_vector`."""
    return np.array([union_names.index(n) for n in folder_names], dtype=np.int64)


class ShardReader:
    """Reads samples by idx offsets, keeping a small cache of open tar files.

    Handles are opened lazily and re-opened after a fork (the pid check), so every DataLoader worker
    and DALI external-source worker owns its own file offsets.
    """

    def __init__(self, max_open_files: int = 64):
        self.max_open_files = max_open_files
        self._files: OrderedDict[Path, object] = OrderedDict()
        self._pid = os.getpid()

    def read(self, ref: SampleRef) -> dict[str, bytes]:
        """component name -> bytes for one sample."""
        return read_sample(self._handle(ref.tar_path), ref.sample)

    def read_component(self, ref: SampleRef, extension: str) -> bytes:
        """One component's bytes (e.g. the json alone, without the image)."""
        return read_sample(self._handle(ref.tar_path), ref.sample, (extension,))[extension]

    def _handle(self, tar_path: Path):
        if self._pid != os.getpid():  # inherited across fork: these share file offsets with the parent
            self.close()  # closes this process's copies only
            self._pid = os.getpid()
        handle = self._files.get(tar_path)
        if handle is None:
            if len(self._files) >= self.max_open_files:
                self._files.popitem(last=False)[1].close()
            handle = open(tar_path, "rb")  # kept open across reads on purpose (closed by close())
            self._files[tar_path] = handle
        self._files.move_to_end(tar_path)
        return handle

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __getstate__(self):  # pickled into spawned workers: never ship open files
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


class SplitTable:
    """One split over several folders: its samples, labels aligned by name, per-folder intensity.

    Both backends read through `read`, so they see the same samples, labels and statistics.
    """

    def __init__(self, folders: list[ShardFolder], split: str, label_names: list[str] | None = None):
        """`label_names`: the label order to align to (default: the union over `folders`)."""
        self.folders = folders
        self.split = split
        self.refs = [folder.split_samples(split) for folder in folders]
        self.label_names = list(label_names) if label_names is not None else union_label_names(folders)
        missing = [n for folder in folders for n in folder.label_names if n not in self.label_names]
        assert not missing, f"label_names lacks {missing}"
        self._scatters = [label_scatter(folder.label_names, self.label_names) for folder in folders]

    @property
    def folder_sizes(self) -> list[int]:
        return [len(refs) for refs in self.refs]

    def ref(self, folder: int, index: int) -> SampleRef:
        return self.refs[folder][index]

    def read(self, reader: ShardReader, folder: int, index: int) -> StoredSample:
        """Sample `index` of `folder`: its bytes through `reader` (a seek and a read, no image decode)."""
        ref = self.refs[folder][index]
        components = reader.read(ref)
        source = self.folders[folder]
        folder_labels = decode_labels(components, len(source.label_names), f"{ref.tar_path}:{ref.key}")
        return StoredSample(
            key=ref.key,
            image=components[ref.sample.image_extension],
            roi=components.get(ROI_EXTENSION),
            labels=self.labels(folder, folder_labels),
            mean=source.intensity_mean,
            std=source.intensity_std,
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
        table.refs = [[refs[i] for i in indices] for refs, indices in zip(self.refs, keep)]
        return table

    def metadata(self, reader: ShardReader, folder: int, index: int) -> dict:
        """One sample's json component (patient, study, view, labels as written; no image read)."""
        return json.loads(reader.read_component(self.refs[folder][index], META_EXTENSION))

    def sorted_by_key(self, num_samples: int | None = None) -> list[tuple[int, int]]:
        """The first `num_samples` (all: None) (folder, index) pairs in sorted-key order (folder breaks
        ties)."""
        pairs = [(ref.key, f, i) for f, refs in enumerate(self.refs) for i, ref in enumerate(refs)]
        pairs.sort()
        return [(f, i) for _key, f, i in pairs[:num_samples]]


def open_folders(paths: list[str]) -> list[ShardFolder]:
    """ShardFolder per path, opening each distinct path once."""
    cache: dict[Path, ShardFolder] = {}
    for path in paths:
        resolved = Path(path).resolve()
        if resolved not in cache:
            cache[resolved] = ShardFolder(path)
    return [cache[Path(path).resolve()] for path in paths]
