"""`xray-shard verify DIR`: re-read everything a conversion wrote; non-zero exit on any mismatch.

Checks, per shard listed in manifest.json: the tar's size and sha256; the idx parses and equals a
fresh scan of the tar (shardio.index_tar: same keys, components, offsets, sizes); every sample
decodes (image in the manifest's format and bit depth, size = json "size"; roi.png 0/255 with the
contract's size; labels.npy float32 of len(label_names) with values 1/0/-1/NaN matching the json);
json keys, key, dataset and split, and each member's crc32 equal to the json's (where recorded).
Over the folder: no stray or missing tars, no duplicate keys, counts per shard/split/label and
intensity mean/std recomputed from the decoded pixels equal the manifest, skipped.jsonl has
num_skipped lines, and samples + skipped = inputs.
`--quick` decodes nothing: manifest keys, stray/missing tars, each tar's size and sha256, each idx
parses with offsets inside its tar, per-sample components present (image of the manifest's format,
roi.png, labels.npy, json), counts per shard/split/folder, no duplicate keys, skipped.jsonl; label
counts, intensity statistics, json contents and the idx-vs-tar-members scan need the full check.
`--workers N` checks N shards at once (either mode); problems come in manifest shard order all the
same, duplicate keys after their shard's other problems.
Library use: `verify(folder, quick, num_workers) -> list[str]` (the problems; empty = consistent).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from data_tools.encode import FORMAT_EXTENSION, pixel_sums
from data_tools.manifest import (
    add_label_counts,
    count_label,
    empty_label_counts,
    intensity_stats,
    read_manifest,
)
from data_tools.writer import sha256_file
from xray_core.images import FULL_SCALE
from xray_core.roi import roi_size
from xray_core.shardindex import IMAGE_SLOT, MISSING, SLOTS, shard_records
from xray_core.shardio import (
    CHECKSUM_FIELD,
    IMAGE_EXTENSIONS,
    META_EXTENSION,
    SKIPPED_NAME,
    changed_members,
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
OPTIONAL_KEYS = {"view_order"}  # only where the source orders a study's images (iu-xray)
CHECKSUM_KEYS = {CHECKSUM_FIELD}  # the members' crc32, since loaders check them; older shards lack it
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

    def merge(self, part: _Totals) -> None:
        """Add one shard's totals (shards are checked apart, possibly in other processes)."""
        for split, num in part.splits.items():
            self.splits[split] = self.splits.get(split, 0) + num
        for split, counts in part.label_counts.items():
            add_label_counts(
                self.label_counts.setdefault(split, empty_label_counts(self.label_names)), counts
            )
        for split, acc in part.sums.items():
            total = self.sums.setdefault(split, [0, 0, 0])
            for i in range(3):
                total[i] += acc[i]


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
    if "json" not in comps:
        return [f"{where}: no json member"], {}
    try:
        meta = json.loads(comps["json"])
    except ValueError as error:
        return [f"{where}: json invalid ({error})"], {}
    problems = []
    allowed = (
        JSON_KEYS
        | ROI_KEYS
        | OPTIONAL_KEYS
        | CHECKSUM_KEYS
        | (KEEP_PATHS_KEYS if manifest.get("options", {}).get("keep_paths") else set())
    )
    if not JSON_KEYS <= set(meta) <= allowed:
        problems.append(
            f"{where}: json keys missing {sorted(JSON_KEYS - set(meta))}, extra {sorted(set(meta) - allowed)}"
        )
    for field, expected in (("key", key), ("dataset", manifest.get("dataset")), ("split", split)):
        if meta.get(field) != expected:
            problems.append(f"{where}: json {field} {meta.get(field)!r} != {expected!r}")
    recorded = meta.get(CHECKSUM_FIELD)
    if recorded is not None and set(recorded) != set(comps) - {META_EXTENSION}:
        problems.append(f"{where}: json crc32 covers {sorted(recorded)}, the members are {sorted(comps)}")
    problems += [f"{where}: {ext} changed since conversion (crc32)" for ext in changed_members(comps, meta)]
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
        in_tar = {s.key: s.components for s in scanned}
        differing = [s.key for s in indexed if in_tar.get(s.key) != s.components]
        named = [
            f"{tar_path.name}:{key}: the idx entry does not match the tar's members/offsets (re-run `xray-shard index`)"
            for key in differing[:MAX_PROBLEMS_PER_SHARD]
        ]
        return named or [
            f"{idx_path.name}: does not match the tar's members/offsets (order; re-run `xray-shard index`)"
        ], indexed
    return [], indexed


def _check_tar_file(folder: Path, entry: dict) -> list[str]:
    """Size and sha256 of a listed tar against the manifest."""
    tar_path = folder / entry["name"]
    problems = []
    if tar_path.stat().st_size != entry.get("num_bytes"):
        problems.append(
            f"{entry['name']}: {tar_path.stat().st_size} bytes, manifest says {entry.get('num_bytes')}"
        )
    if sha256_file(tar_path) != entry.get("sha256"):
        problems.append(f"{entry['name']}: sha256 differs from the manifest")
    return problems


def _check_shard(folder: Path, entry: dict, manifest: dict, totals: _Totals) -> tuple[list[str], np.ndarray]:
    """(problems, keys as bytes in order) of one shard, every sample decoded; counts go into `totals`."""
    tar_path = folder / entry["name"]
    problems = _check_tar_file(folder, entry)
    index_problems, indexed = _check_index(tar_path)
    problems += index_problems
    if len(indexed) != entry.get("num_samples"):
        problems.append(f"{entry['name']}: {len(indexed)} samples, manifest says {entry.get('num_samples')}")
    keys = np.array([sample.key.encode() for sample in indexed], dtype=bytes)
    with open(tar_path, "rb") as f:
        for sample in indexed:
            where = f"{entry['name']}:{sample.key}"
            try:
                problems += _check_sample(
                    read_sample(f, sample), sample.key, manifest, entry["split"], totals, where
                )
            except Exception as error:  # a corrupt member must be reported, not crash verify
                problems.append(f"{where}: undecodable ({type(error).__name__}: {error})")
            if len(problems) > MAX_PROBLEMS_PER_SHARD:
                return [*problems, f"{entry['name']}: more problems not listed"], keys
    return problems, keys


def _check_shard_quick(
    folder: Path, entry: dict, manifest: dict, totals: _Totals
) -> tuple[list[str], np.ndarray]:
    """(problems, keys as bytes in order) of one shard without decoding: tar size and sha256, the idx parses
    with offsets inside the tar, the sample count, and each sample's components are present."""
    tar_path = folder / entry["name"]
    problems = _check_tar_file(folder, entry)
    try:
        records = shard_records(idx_path_for(tar_path), 0, tar_path.stat().st_size, folder)
    except (OSError, ValueError) as error:
        return [*problems, f"{idx_path_for(tar_path).name}: {error}"], np.zeros(0, "S1")
    if len(records) != entry.get("num_samples"):
        problems.append(f"{entry['name']}: {len(records)} samples, manifest says {entry.get('num_samples')}")
    keys = records["key"]
    totals.splits[entry["split"]] = totals.splits.get(entry["split"], 0) + len(records)
    present = records["rel"] != MISSING  # (N, slots)
    ends = np.where(present, records["base"][:, None] + records["rel"] + records["size"], 0).max(axis=1)
    for row in np.flatnonzero(ends > tar_path.stat().st_size)[:MAX_PROBLEMS_PER_SHARD]:
        problems.append(
            f"{entry['name']}:{keys[row].decode()}: data past the end of the {tar_path.stat().st_size}-byte "
            "tar (truncated tar, or an idx of another tar)"
        )
    image_ext = FORMAT_EXTENSION.get(manifest.get("image_format"))
    image_ok = present[:, IMAGE_SLOT] & (records["image"] == IMAGE_EXTENSIONS.index(image_ext))
    for row in np.flatnonzero(~image_ok | ~present.all(axis=1)):
        where = f"{entry['name']}:{keys[row].decode()}"
        if not image_ok[row]:
            problems.append(f"{where}: no {image_ext} image (manifest format {manifest.get('image_format')})")
        problems += [f"{where}: no {SLOTS[slot]}" for slot in range(1, len(SLOTS)) if not present[row, slot]]
        if len(problems) > MAX_PROBLEMS_PER_SHARD:
            return [*problems, f"{entry['name']}: more problems not listed"], keys
    return problems, keys


def _shard_task(task: tuple[Path, dict, dict, bool]) -> tuple[list[str], np.ndarray, _Totals]:
    """One shard's check (in a worker process when --workers > 1)."""
    folder, entry, manifest, quick = task
    totals = _Totals(list(manifest.get("label_names", [])))
    if not (folder / entry["name"]).is_file():
        return [f"{entry['name']}: listed in the manifest but missing"], np.zeros(0, "S1"), totals
    check = _check_shard_quick if quick else _check_shard
    problems, keys = check(folder, entry, manifest, totals)
    return problems, keys, totals


def _check_shards(folder: Path, manifest: dict, quick: bool, num_workers: int) -> tuple[list[str], _Totals]:
    """Every listed shard, in manifest order whatever the workers; then duplicate keys over the folder
    (found with one sort of all keys, no per-key Python object), each listed after its shard's other
    problems, within the same per-shard limit."""
    from tqdm import tqdm

    entries = manifest.get("shards", [])
    tasks = [(folder, entry, manifest, quick) for entry in entries]
    totals = _Totals(list(manifest.get("label_names", [])))
    shard_problems, shard_keys = [], []
    pool = None
    if num_workers > 1 and len(tasks) > 1:
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("forkserver"))
    try:
        results = pool.map(_shard_task, tasks, chunksize=4) if pool else map(_shard_task, tasks)
        for problems, keys, part in tqdm(
            results, total=len(tasks), desc="verify", unit="shard", disable=len(tasks) < 2
        ):
            shard_problems.append(problems)
            shard_keys.append(keys)
            totals.merge(part)
    finally:
        if pool:
            pool.shutdown()
    duplicate = _repeated(np.concatenate(shard_keys) if shard_keys else np.zeros(0, "S1"))
    problems, start = [], 0
    for entry, found, keys in zip(entries, shard_problems, shard_keys):
        for key in keys[duplicate[start : start + len(keys)]]:
            if len(found) > MAX_PROBLEMS_PER_SHARD:
                if not found[-1].endswith("more problems not listed"):
                    found.append(f"{entry['name']}: more problems not listed")
                break
            found.append(f"{entry['name']}:{key.decode()}: duplicate key")
        problems += found
        start += len(keys)
    return problems, totals


def _repeated(keys: np.ndarray) -> np.ndarray:
    """bool per key: True where the same key occurred earlier in `keys`."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[order[1:]] = sorted_keys[1:] == sorted_keys[:-1]
    return repeated


def _check_totals(manifest: dict, totals: _Totals, folder: Path, quick: bool) -> list[str]:
    problems = []
    splits = {s: totals.splits.get(s, 0) for s in manifest.get("splits", {})}
    if splits != manifest.get("splits"):
        problems.append(f"split counts {splits} != manifest {manifest.get('splits')}")
    problems += _check_files_and_counts(manifest, totals, folder)
    return problems if quick else problems + _check_decoded_totals(manifest, totals)


def _check_decoded_totals(manifest: dict, totals: _Totals) -> list[str]:
    """Label counts and intensity statistics recomputed from the decoded samples."""
    problems = []
    label_counts = {
        s: totals.label_counts.get(s, empty_label_counts(totals.label_names))
        for s in manifest.get("splits", {})
    }
    if label_counts != manifest.get("label_counts"):
        problems.append("label counts recomputed from labels.npy differ from the manifest's label_counts")
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
    return problems


def _check_files_and_counts(manifest: dict, totals: _Totals, folder: Path) -> list[str]:
    """Sample total, skipped.jsonl and samples + skipped = inputs."""
    problems = []
    num_samples = sum(totals.splits.values())
    if num_samples != manifest.get("num_samples"):
        problems.append(f"{num_samples} samples in the tars, manifest says {manifest.get('num_samples')}")
    skipped_path = folder / SKIPPED_NAME
    lines = skipped_path.read_text().splitlines() if skipped_path.is_file() else None
    if lines is None:
        problems.append(f"{SKIPPED_NAME} missing")
    elif len(lines) != manifest.get("num_skipped"):
        problems.append(f"{SKIPPED_NAME} has {len(lines)} lines, manifest says {manifest.get('num_skipped')}")
    if manifest.get("num_samples", 0) + manifest.get("num_skipped", 0) != manifest.get("num_inputs"):
        problems.append("manifest num_samples + num_skipped != num_inputs")
    return problems


def verify(folder: Path, quick: bool = False, num_workers: int = 1) -> list[str]:
    """Every problem found in a shard folder (see the module docstring); [] when all is consistent.

    quick: no decode (see the module docstring); num_workers: shards checked in parallel processes."""
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
    shard_problems, totals = _check_shards(folder, manifest, quick, num_workers)
    return problems + shard_problems + _check_totals(manifest, totals, folder, quick)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a folder written by `xray-shard convert`")
    parser.add_argument(
        "--quick", action="store_true",
        help="no decode: manifest, tar sizes and sha256, idx offsets, components present, counts, keys",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="processes checking shards in parallel")


def run(args: argparse.Namespace) -> int:
    if not Path(args.folder).is_dir():
        raise ValueError(f"{args.folder}: no such shard folder")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    problems = verify(args.folder, quick=args.quick, num_workers=args.workers)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"xray-shard verify: {len(problems)} problem(s) in {args.folder}", file=sys.stderr)
        return 1
    print(f"xray-shard verify: {args.folder} is consistent")
    return 0
