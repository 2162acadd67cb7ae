"""Tiny shard folders for tests, written with the real shard writer (`shardio.ShardTarWriter`).

`write_shard_folder(root, ...)` writes tars + idx + manifest.json + skipped.jsonl per the shard
format contract and returns the source arrays, so tests can compare what a loader decodes with what
was stored. Any test module may import it (`from data_fixtures import write_shard_folder`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_core.shardio import (
    CHECKSUM_FIELD,
    MANIFEST_NAME,
    SKIPPED_NAME,
    ShardTarWriter,
    idx_path_for,
    index_tar,
    member_checksums,
    read_idx,
    sample_key,
    shard_name,
)
from xray_pretrain.data.config import dali_available

needs_dali = pytest.mark.skipif(
    not dali_available(), reason="nvidia.dali is not installed (pip install nvidia-dali-cuda130)"
)

FULL_SCALE = {"png16": 65535.0, "jp2": 65535.0, "jpg": 255.0}
EXTENSION = {"png16": "png", "jp2": "jp2", "jpg": "jpg"}


@dataclass
class FixtureSample:
    key: str
    split: str
    image: np.ndarray  # as stored: uint16 (png16, jp2) or uint8 (jpg), (H, W)
    roi: np.ndarray | None  # as stored: uint8 0/255, long side min(128, image long side)
    labels: np.ndarray | None  # float32 in the manifest's label order
    meta: dict = field(default_factory=dict)  # json keys beyond key/split/size (study, view, report ...)


@dataclass
class FixtureFolder:
    path: Path
    manifest: dict
    samples: dict[str, FixtureSample] = field(default_factory=dict)

    def keys(self, split: str) -> list[str]:
        return [k for k, s in self.samples.items() if s.split == split]


def smooth_image(rng: np.random.Generator, size_hw: tuple[int, int], image_format: str) -> np.ndarray:
    """A smooth random image (JPEG keeps it within a grey level or two), dark corners like air."""
    height, width = size_hw
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    a, b, c = rng.uniform(0.2, 0.8, size=3)
    value = 0.5 + 0.3 * np.sin(a * 6 * y / height + c) * np.cos(b * 6 * x / width)
    value *= np.clip(1.2 - np.hypot((y - height / 2) / height, (x - width / 2) / width) * 1.5, 0, 1)
    scale = FULL_SCALE[image_format]
    return np.clip(np.round(value * scale), 0, scale).astype(np.uint8 if scale == 255 else np.uint16)


def ellipse_roi(size_hw: tuple[int, int]) -> np.ndarray:
    """An elliptical chest region (0/255) at the stored roi size (long side min(128, image's))."""
    height, width = roi_size(size_hw)
    y, x = np.mgrid[0:height, 0:width]
    inside = ((y + 0.5) / height - 0.5) ** 2 / 0.16 + ((x + 0.5) / width - 0.5) ** 2 / 0.16 <= 1
    return inside.astype(np.uint8) * 255


def roi_size(size_hw: tuple[int, int]) -> tuple[int, int]:
    long_side = min(128, max(size_hw))
    scale = long_side / max(size_hw)
    return max(1, round(size_hw[0] * scale)), max(1, round(size_hw[1] * scale))


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png16":
        Image.fromarray(image.astype(np.uint16)).save(buffer, format="PNG")
    elif image_format == "jp2":  # 16-bit lossless (reversible 5/3 wavelet)
        Image.fromarray(image.astype(np.uint16)).save(buffer, format="JPEG2000", irreversible=False)
    elif image_format == "jpg":
        Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format {image_format}")
    return buffer.getvalue()


def encode_png8(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


ImageFn = Callable[[np.random.Generator, int, tuple[int, int], str], np.ndarray]
RoiFn = Callable[[np.ndarray], np.ndarray]
MetaFn = Callable[[int, str], dict]  # (sample number over all splits, split) -> extra json keys


def write_shard_folder(
    root: str | Path,
    *,
    dataset: str = "phantom",
    image_format: str = "png16",
    splits: dict[str, int] | None = None,
    samples_per_shard: int = 4,
    label_names: tuple[str, ...] = ("cardiomegaly", "effusion"),
    size_hw: tuple[int, int] = (40, 32),
    with_roi: bool = True,
    with_labels: bool = True,
    seed: int = 0,
    image_fn: ImageFn | None = None,
    roi_fn: RoiFn | None = None,
    meta_fn: MetaFn | None = None,
    checksums: bool = False,
) -> FixtureFolder:
    """Write a shard folder at `root` with `splits` {split: num_samples}; returns paths and arrays.
    `checksums`: each json records its members' crc32 as `xray-shard convert` writes it (off: as
    shards converted before the field existed, so the decoders are what find damage).

    image_fn(rng, i, size_hw, image_format) -> stored array; roi_fn(image) -> stored 0/255 mask;
    meta_fn(i, split) -> json keys added to sample i's json (e.g. dataset, study, view, report).
    Labels of sample i: label j is 1 when (i + j) % 3 == 0, NaN when == 1, else 0.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": 6, "val": 2} if splits is None else splits
    rng = np.random.default_rng(seed)
    make_image = image_fn or (lambda r, i, s, f: smooth_image(r, s, f))
    folder = FixtureFolder(root, {})
    shard_entries, sample_index = [], 0
    for split, num_samples in splits.items():
        keys_written = 0
        for shard_i in range(-(-num_samples // samples_per_shard)):
            writer = ShardTarWriter(root / shard_name(dataset, split, shard_i))
            for _ in range(min(samples_per_shard, num_samples - keys_written)):
                sample = _make_sample(rng, dataset, split, sample_index, size_hw, image_format, label_names,
                                      make_image, roi_fn, with_roi, with_labels)  # fmt: skip
                sample.meta = meta_fn(sample_index, split) if meta_fn else {}
                writer.write_sample(sample.key, _components(sample, image_format, split, checksums))
                folder.samples[sample.key] = sample
                sample_index += 1
                keys_written += 1
            writer.close()
            _check_idx(writer.tar_path)
            shard_entries.append(_shard_entry(writer, split))
    folder.manifest = _manifest(folder, dataset, image_format, label_names, shard_entries, splits)
    (root / MANIFEST_NAME).write_text(json.dumps(folder.manifest, indent=2))
    (root / SKIPPED_NAME).write_text("")
    return folder


def _make_sample(
    rng, dataset, split, i, size_hw, image_format, label_names, make_image, roi_fn, with_roi, with_labels
):
    image = make_image(rng, i, size_hw, image_format)
    roi = (roi_fn(image) if roi_fn else ellipse_roi(image.shape)) if with_roi else None
    labels = None
    if with_labels:
        codes = [(i + j) % 3 for j in range(len(label_names))]
        labels = np.array([1.0 if c == 0 else np.nan if c == 1 else 0.0 for c in codes], dtype=np.float32)
    return FixtureSample(sample_key(dataset, f"{split}/{i:05d}.dcm"), split, image, roi, labels)


def _components(sample: FixtureSample, image_format: str, split: str, checksums: bool) -> dict[str, bytes]:
    components = {EXTENSION[image_format]: encode_image(sample.image, image_format)}
    if sample.roi is not None:
        components["roi.png"] = encode_png8(sample.roi)
    if sample.labels is not None:
        components["labels.npy"] = encode_npy(sample.labels)
    meta = {
        "key": sample.key,
        "split": split,
        "size": list(sample.image.shape),
        "original_size": list(sample.image.shape),
        **sample.meta,
    }
    if checksums:
        meta[CHECKSUM_FIELD] = member_checksums(components)
    components["json"] = json.dumps(meta).encode()
    return components


def _check_idx(tar_path: Path) -> None:
    """The writer's idx must agree with a scan of the tar (what DALI's wds2idx computes): the loaders
    seek to these offsets."""
    scanned = [(s.key, s.components) for s in index_tar(tar_path)]
    written = [(s.key, s.components) for s in read_idx(idx_path_for(tar_path))]
    if scanned != written:
        raise AssertionError(
            f"ShardTarWriter's idx for {tar_path.name} disagrees with index_tar: {written[:1]} vs {scanned[:1]}"
        )


def _shard_entry(writer: ShardTarWriter, split: str) -> dict:
    digest = hashlib.sha256(writer.tar_path.read_bytes()).hexdigest()
    return {
        "name": writer.tar_path.name,
        "split": split,
        "num_samples": len(writer.samples),
        "num_bytes": writer.num_bytes,
        "sha256": digest,
    }


def _manifest(folder: FixtureFolder, dataset, image_format, label_names, shard_entries, splits) -> dict:
    train = [
        s.image.astype(np.float64) / FULL_SCALE[image_format]
        for s in folder.samples.values()
        if s.split == "train"
    ]
    pixels = np.concatenate([t.ravel() for t in train]) if train else np.array([0.5, 0.5])
    return {
        "format_version": 1,
        "tool": "xray-shard",
        "tool_version": "test",
        "command": "convert",
        "dataset": dataset,
        "source": "tests/data_fixtures.py",
        "image_format": image_format,
        "options": {},
        "salt_fingerprint": "test",
        "label_names": list(label_names),
        "num_inputs": len(folder.samples),
        "num_samples": len(folder.samples),
        "num_skipped": 0,
        "splits": dict(splits),
        "shards": shard_entries,
        "label_counts": {},
        "intensity": {
            "mean": float(pixels.mean()),
            "std": float(max(pixels.std(), 1e-3)),
            "unit": "fraction of full scale",
        },
    }


# Alignment fixture: a bright square that is exactly the roi (the roi at half the image's resolution).


def bright_square_image(rng, i, size_hw, image_format):
    """Dark image with a bright square exactly on roi pixels (roi is half the image's resolution)."""
    image = np.full(size_hw, 2000, dtype=np.uint16)
    image[16:48, 24:56] = 60000
    return image


def square_roi(image):
    roi = np.zeros((image.shape[0] // 2, image.shape[1] // 2), dtype=np.uint8)
    roi[8:24, 12:28] = 255
    return roi


def edge_band(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel (8-neighbourhood) of a change in `mask`."""
    padded = np.pad(mask, 1, mode="edge")
    band = np.zeros_like(mask)
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        band |= padded[1 + dy : 1 + dy + mask.shape[0], 1 + dx : 1 + dx + mask.shape[1]] != mask
    return band


def link_scaled_folder(real: Path, out: Path, num_links: dict[str, int]) -> dict:
    """A large shard folder from a small real one, for scale tests and benchmarks/data_scale.py.

    Split s gets num_links[s] shards, each a hard link to one of `real`'s shards of that split (in
    turn) with a copy of its idx beside it: real tars, real idx files, and a manifest consistent with
    them (names, splits, counts, sizes, sha256). Keys repeat from one link of a tar to the next.
    Returns the manifest written.
    """
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((real / MANIFEST_NAME).read_text())
    entries = []
    for split, num in num_links.items():
        sources = [e for e in manifest["shards"] if e["split"] == split]
        for i in range(num):
            source = sources[i % len(sources)]
            name = shard_name(f"{manifest['dataset']}x", split, i)
            os.link(real / source["name"], out / name)
            shutil.copyfile(idx_path_for(real / source["name"]), idx_path_for(out / name))
            entries.append({**source, "name": name})
    splits = {split: sum(e["num_samples"] for e in entries if e["split"] == split) for split in num_links}
    num_samples = sum(splits.values())
    manifest = {**manifest, "shards": entries, "splits": splits, "num_samples": num_samples,
                "num_inputs": num_samples, "num_skipped": 0}  # fmt: skip
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    (out / SKIPPED_NAME).write_text("")
    return manifest


def damage_member(
    folder: Path, key: str, component: str, where: str = "middle", pattern: bytes | None = None
) -> str:
    """Flip 4 bytes of `key`'s `component` in place (its image header at "start", else inside its
    data), or write `pattern` there instead; returns the tar's name."""
    for tar in sorted(folder.glob("*.tar")):
        sample = next((s for s in read_idx(tar.with_suffix(".idx")) if s.key == key), None)
        if sample is not None:
            offset, size = sample.components[component]
            at = offset + (0 if where == "start" else size // 2)
            data = bytearray(tar.read_bytes())
            data[at : at + 4] = pattern or bytes(b ^ 0xFF for b in data[at : at + 4])
            tar.write_bytes(bytes(data))
            return tar.name
    raise KeyError(key)
