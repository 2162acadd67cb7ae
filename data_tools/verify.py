"""`xray-shard verify DIR`: re-read everything a conversion wrote; non-zero exit on any mismatch.

Checks, per shard listed in manifest.json: the tar's size and sha256; the idx parses and equals a
fresh scan of the tar (shardio.index_tar: same keys, components, offsets, sizes); every sample
decodes (image in the manifest's format and bit depth, size = json "size"; roi.png 0/255 with the
contract's size; labels.npy float32 of len(label_names) with values 1/0/-1/NaN matching the json);
json keys, key, dataset and split. Over the folder: no stray or missing tars, no duplicate keys,
counts per shard/split/label and intensity mean/std recomputed from the decoded pixels equal the
manifest, skipped.jsonl has num_skipped lines, and samples + skipped = inputs.
Library use: `verify(folder) -> list[str]` (the problems; empty means the folder is consistent).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from data_tools.encode import FORMAT_EXTENSION, pixel_sums
from data_tools.manifest import count_label, empty_label_counts, intensity_stats, read_manifest
from data_tools.writer import sha256_file
from xray_core.images import FULL_SCALE
from xray_core.roi import roi_size
from xray_core.shardio import (
    IMAGE_EXTENSIONS,
    SKIPPED_NAME,
    idx_path_for,
    index_tar,
    read_idx,
    read_sample,
)

JSON_KEYS = {
    "key", "dataset", "patient", "study", "view", "labels", "report", "split", "original_size", "size",
    "pixel_spacing", "photometric", "intensity_policy", "flags", "roi_box",
}  # fmt: skip
KEEP_PATHS_KEYS = {"source_id", "source_path", "patient_id", "study_id"}
ROI_KEYS = {"roi_method", "roi_confidence"}  # since the atlas estimate; older shards lack them
IMAGE_MODES = {"png16": {"I;16", "I;16B", "I;16L"}, "jp2": {"I;16", "I;16B", "I;16L"}, "jpg": {"L"}}
MANIFEST_KEYS = {
    "format_version", "tool", "tool_version", "command", "dataset", "source", "image_format", "options",
    "salt_fingerprint", "label_names", "num_inputs", "num_samples", "num_skipped", "splits", "shards",
    "label_counts", "intensity",
}  # fmt: skip
MAX_PROBLEMS_PER_SHARD = 20
INTENSITY_TOLERANCE = 1e-9


class _Totals:
    """Counts recomputed from the samples, compared with the manifest at the end."""

    def __init__(self, label_names: list[str]):
        self.splits: dict[str, int] = {}
        self.label_counts: dict[str, dict] = {}
        self.label_names = label_names
        self.keys: set[str] = set()
        self.sums = {}  # split -> [sum, sumsq, num_pixels]

    def add(self, split: str, labels: np.ndarray, pixels: np.ndarray) -> None:
        self.splits[split] = self.splits.get(split, 0) + 1
        # The writer's counting and sums, applied to what was decoded from the tar: what is checked
        # is the stored data against the manifest, not the arithmetic a second time.
        counts = self.label_counts.setdefault(split, empty_label_counts(self.label_names))
        values = [None if np.isnan(v) else v for v in labels.tolist()]
        count_label(counts, dict(zip(self.label_names, values)))
        pixel_sum, pixel_sumsq = pixel_sums(pixels)
        acc = self.sums.setdefault(split, [0, 0, 0])
        acc[0] += pixel_sum
        acc[1] += pixel_sumsq
        acc[2] += pixels.size


def _decode(data: bytes) -> tuple[np.ndarray, str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image), image.mode


def _check_image(comps, meta, manifest, where) -> tuple[list[str], np.ndarray | None]:
    image_format = manifest.get("image_format")
    ext = FORMAT_EXTENSION.get(image_format)
    present = [e for e in IMAGE_EXTENSIONS if e in comps]
    if present != [ext]:
        return [f"{where}: image components {present}, manifest format {image_format} needs [{ext!r}]"], None
    pixels, mode = _decode(comps[ext])
    problems = []
    if mode not in IMAGE_MODES[image_format]:
        problems.append(
            f"{where}: {ext} decodes to mode {mode}, expected {sorted(IMAGE_MODES[image_format])}"
        )
    if list(pixels.shape) != list(meta.get("size", [])):
        problems.append(f"{where}: image is {list(pixels.shape)} but json size says {meta.get('size')}")
    return problems, pixels


def _check_roi(comps, pixels, where) -> list[str]:
    if "roi.png" not in comps:
        return [f"{where}: no roi.png"]
    mask, mode = _decode(comps["roi.png"])
    problems = []
    if mode != "L" or not np.isin(mask, (0, 255)).all():
        problems.append(f"{where}: roi.png must be 8-bit 0/255 (mode {mode}, values {np.unique(mask)[:5]})")
    expected = roi_size(pixels.shape)
    if mask.shape != expected:
        problems.append(
            f"{where}: roi.png is {mask.shape}, expected {expected} (image aspect, long side <= 128)"
        )
    return problems


def _check_labels(comps, meta, label_names, where) -> tuple[list[str], np.ndarray | None]:
    if "labels.npy" not in comps:
        return [f"{where}: no labels.npy"], None
    labels = np.load(io.BytesIO(comps["labels.npy"]), allow_pickle=False)
    if labels.dtype != np.float32 or labels.shape != (len(label_names),):
        return [
            f"{where}: labels.npy {labels.dtype}{labels.shape}, expected float32 ({len(label_names)},)"
        ], None
    known = labels[~np.isnan(labels)]
    problems = (
        [] if np.isin(known, (1.0, 0.0, -1.0)).all() else [f"{where}: label values {sorted(set(known))}"]
    )
    json_labels = meta.get("labels", {})
    as_json = {n: (None if np.isnan(v) else int(v)) for n, v in zip(label_names, labels.tolist())}
    if json_labels != as_json:
        problems.append(f"{where}: json labels {json_labels} != labels.npy {as_json}")
    return problems, labels


def _check_meta(comps, key, manifest, split, where) -> tuple[list[str], dict]:
    try:
        meta = json.loads(comps["json"])
    except (KeyError, ValueError) as error:
        return [f"{where}: json missing or invalid ({error})"], {}
    problems = []
    allowed = (
        JSON_KEYS | ROI_KEYS | (KEEP_PATHS_KEYS if manifest.get("options", {}).get("keep_paths") else set())
    )
    if not JSON_KEYS <= set(meta) <= allowed:
        problems.append(
            f"{where}: json keys missing {sorted(JSON_KEYS - set(meta))}, extra {sorted(set(meta) - allowed)}"
        )
    for field, expected in (("key", key), ("dataset", manifest.get("dataset")), ("split", split)):
        if meta.get(field) != expected:
            problems.append(f"{where}: json {field} {meta.get(field)!r} != {expected!r}")
    box = meta.get("roi_box")
    if not (
        isinstance(box, list) and len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
    ):
        problems.append(f"{where}: roi_box {box} is not [y0, x0, y1, x1] fractions with y0<y1, x0<x1")
    return problems, meta


def _check_sample(comps, key, manifest, split, totals, where) -> list[str]:
    problems, meta = _check_meta(comps, key, manifest, split, where)
    image_problems, pixels = _check_image(comps, meta, manifest, where)
    problems += image_problems
    if pixels is None:
        return problems
    problems += _check_roi(comps, pixels, where)
    label_problems, labels = _check_labels(comps, meta, manifest.get("label_names", []), where)
    problems += label_problems
    if labels is not None:
        totals.add(split, labels, pixels)
    return problems


def _check_index(tar_path: Path) -> tuple[list[str], list]:
    idx_path = idx_path_for(tar_path)
    try:
        indexed = read_idx(idx_path)
    except (OSError, ValueError) as error:
        return [f"{idx_path.name}: {error}"], []
    try:
        scanned = index_tar(tar_path)
    except Exception as error:  # tarfile raises several types for a damaged tar
        return [f"{tar_path.name}: unreadable tar ({type(error).__name__}: {error})"], indexed
    if [(s.key, s.components) for s in indexed] != [(s.key, s.components) for s in scanned]:
        return [
            f"{idx_path.name}: does not match the tar's members/offsets (re-run `xray-shard index`)"
        ], indexed
    return [], indexed


def _check_shard(folder: Path, entry: dict, manifest: dict, totals: _Totals) -> list[str]:
    tar_path = folder / entry["name"]
    if not tar_path.is_file():
        return [f"{entry['name']}: listed in the manifest but missing"]
    problems = []
    if tar_path.stat().st_size != entry.get("num_bytes"):
        problems.append(
            f"{entry['name']}: {tar_path.stat().st_size} bytes, manifest says {entry.get('num_bytes')}"
        )
    if sha256_file(tar_path) != entry.get("sha256"):
        problems.append(f"{entry['name']}: sha256 differs from the manifest")
    index_problems, indexed = _check_index(tar_path)
    problems += index_problems
    if len(indexed) != entry.get("num_samples"):
        problems.append(f"{entry['name']}: {len(indexed)} samples, manifest says {entry.get('num_samples')}")
    with open(tar_path, "rb") as f:
        for sample in indexed:
            where = f"{entry['name']}:{sample.key}"
            if sample.key in totals.keys:
                problems.append(f"{where}: duplicate key")
            totals.keys.add(sample.key)
            try:
                problems += _check_sample(
                    read_sample(f, sample), sample.key, manifest, entry["split"], totals, where
                )
            except Exception as error:  # a corrupt member must be reported, not crash verify
                problems.append(f"{where}: undecodable ({type(error).__name__}: {error})")
            if len(problems) > MAX_PROBLEMS_PER_SHARD:
                return [*problems, f"{entry['name']}: more problems not listed"]
    return problems


def _check_totals(manifest: dict, totals: _Totals, folder: Path) -> list[str]:
    problems = []
    splits = {s: totals.splits.get(s, 0) for s in manifest.get("splits", {})}
    if splits != manifest.get("splits"):
        problems.append(f"split counts {splits} != manifest {manifest.get('splits')}")
    label_counts = {s: totals.label_counts.get(s, empty_label_counts(totals.label_names)) for s in splits}
    if label_counts != manifest.get("label_counts"):
        problems.append("label counts recomputed from labels.npy differ from the manifest's label_counts")
    num_samples = sum(totals.splits.values())
    if num_samples != manifest.get("num_samples"):
        problems.append(f"{num_samples} samples in the tars, manifest says {manifest.get('num_samples')}")
    stats_split = ["train"] if totals.sums.get("train") else list(totals.sums)
    acc = [sum(totals.sums[s][i] for s in stats_split) for i in range(3)]
    expected = intensity_stats(*acc, FULL_SCALE.get(manifest.get("image_format"), 65535))
    found = manifest.get("intensity", {})
    for name in ("mean", "std"):
        if abs(expected[name] - float(found.get(name, np.nan))) > INTENSITY_TOLERANCE or np.isnan(
            found.get(name, np.nan)
        ):
            problems.append(
                f"intensity {name} {found.get(name)} != {expected[name]} recomputed from the pixels"
            )
    skipped_path = folder / SKIPPED_NAME
    lines = skipped_path.read_text().splitlines() if skipped_path.is_file() else None
    if lines is None:
        problems.append(f"{SKIPPED_NAME} missing")
    elif len(lines) != manifest.get("num_skipped"):
        problems.append(f"{SKIPPED_NAME} has {len(lines)} lines, manifest says {manifest.get('num_skipped')}")
    if manifest.get("num_samples", 0) + manifest.get("num_skipped", 0) != manifest.get("num_inputs"):
        problems.append("manifest num_samples + num_skipped != num_inputs")
    return problems


def verify(folder: Path) -> list[str]:
    """Every problem found in a shard folder (see the module docstring); [] when all is consistent."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ValueError as error:
        return [str(error)]
    problems = []
    if set(manifest) != MANIFEST_KEYS:
        problems.append(
            f"manifest keys: missing {sorted(MANIFEST_KEYS - set(manifest))}, extra {sorted(set(manifest) - MANIFEST_KEYS)}"
        )
    if manifest.get("image_format") not in FULL_SCALE:
        return [*problems, f"manifest image_format {manifest.get('image_format')!r} unknown"]
    listed = {entry["name"] for entry in manifest.get("shards", [])}
    on_disk = {p.name for p in folder.glob("*.tar")}
    problems += [f"{name}: tar on disk but not in the manifest" for name in sorted(on_disk - listed)]
    totals = _Totals(list(manifest.get("label_names", [])))
    for entry in manifest.get("shards", []):
        problems += _check_shard(folder, entry, manifest, totals)
    return problems + _check_totals(manifest, totals, folder)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a folder written by `xray-shard convert`")


def run(args: argparse.Namespace) -> int:
    if not Path(args.folder).is_dir():
        raise ValueError(f"{args.folder}: no such shard folder")
    problems = verify(args.folder)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"xray-shard verify: {len(problems)} problem(s) in {args.folder}", file=sys.stderr)
        return 1
    print(f"xray-shard verify: {args.folder} is consistent")
    return 0
