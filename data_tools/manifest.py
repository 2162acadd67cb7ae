"""What sits beside the tars: manifest.json, skipped.jsonl, id_map.csv, and the salted ids they use.

Privacy: patient and study ids are stored as salted hashes (`salted_id`); the manifest holds only
the salt's fingerprint (first 12 hex digits of its sha256). `id_map.csv` (key, hashed patient,
hashed study, source_id, source path) is the only link back to the sources; it lies beside the
shards, never inside a tar, so shards can be shared without it.

The default salt is public (it is written here), so its hashes can be reversed by anyone who can
guess the ids; `convert` warns when it is used. Pass your own `--salt` for real data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path

from data_tools.records import SPLITS
from data_tools.version import TOOL_NAME, TOOL_VERSION
from xray_core.images import FULL_SCALE
from xray_core.shardio import MANIFEST_NAME, SKIPPED_NAME

DEFAULT_SALT = "xray-shard-public-default-salt-v1"
ID_MAP_NAME = "id_map.csv"
FORMAT_VERSION = 1
LABEL_VALUE_NAMES = {1.0: "1", 0.0: "0", -1.0: "-1", None: "null"}


def salted_id(salt: str, kind: str, value: str | None) -> str | None:
    """16 hex digits of sha256(salt, kind, value); None stays None (unknown)."""
    if value is None or value == "":
        return None
    return hashlib.sha256(f"{salt}\0{kind}\0{value}".encode()).hexdigest()[:16]


def salt_fingerprint(salt: str) -> str:
    return hashlib.sha256(salt.encode()).hexdigest()[:12]


def empty_label_counts(label_names: list[str]) -> dict[str, dict[str, int]]:
    return {name: {"1": 0, "0": 0, "-1": 0, "null": 0} for name in label_names}


def count_label(counts: dict[str, dict[str, int]], labels: dict[str, float | None]) -> None:
    for name, value in labels.items():
        counts[name][LABEL_VALUE_NAMES[value]] += 1


def add_label_counts(total: dict[str, dict[str, int]], part: dict[str, dict[str, int]]) -> None:
    for name, counts in part.items():
        for value, n in counts.items():
            total[name][value] += n


def intensity_stats(pixel_sum: int, pixel_sumsq: int, num_pixels: int, full_scale: int) -> dict:
    """Mean/std of stored pixels as fractions of full scale, exact from integer sums.

    var = (N * sum(x^2) - sum(x)^2) / N^2 is evaluated in Python integers, so the only rounding is
    the final division.
    """
    if num_pixels == 0:
        return {"mean": 0.0, "std": 0.0, "unit": "fraction of full scale"}
    variance_scaled = num_pixels * pixel_sumsq - pixel_sum * pixel_sum  # = N^2 var, exact
    mean = pixel_sum / (num_pixels * full_scale)
    std = math.sqrt(variance_scaled) / (num_pixels * full_scale)
    return {"mean": mean, "std": std, "unit": "fraction of full scale"}


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")  # unique: parallel --part tasks share files
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: leave no half-written .partial behind
        tmp.unlink(missing_ok=True)
        raise


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n").encode()


def write_manifest(out_dir: Path, manifest: dict) -> None:
    write_atomic(out_dir / MANIFEST_NAME, dump_json(manifest))


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no manifest.json; is {out_dir} a folder written by `xray-shard convert`?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def write_skipped(out_dir: Path, skipped: list[dict]) -> None:
    """skipped.jsonl: one {"source_id", "dataset", "reason"} per line, sorted by source_id."""
    lines = [
        json.dumps({"source_id": s["source_id"], "dataset": s["dataset"], "reason": s["reason"]}) + "\n"
        for s in sorted(skipped, key=lambda s: (s["source_id"], s["reason"]))
    ]
    write_atomic(out_dir / SKIPPED_NAME, "".join(lines).encode())


def write_id_map(out_dir: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    """id_map.csv: key, hashed patient, hashed study -> source_id and source path, sorted by key."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", "patient", "study", "source_id", "source_path"])
    writer.writerows(sorted(rows))
    write_atomic(out_dir / ID_MAP_NAME, buffer.getvalue().encode())


def build_manifest(
    dataset: str,
    source: str,
    settings: dict,
    label_names,
    salt_print: str,
    states,
    num_inputs: int,
    num_skipped: int,
) -> dict:
    """manifest.json (format_version 1) from the shard states (writer.ShardState), in plan order.

    Intensity mean/std are over the train split's stored pixels (all splits if there is no train
    sample), exact from the integer sums each shard recorded.
    """
    splits = {split: 0 for split in SPLITS}
    label_counts = {split: empty_label_counts(label_names) for split in SPLITS}
    for state in states:
        splits[state.split] += state.num_samples
        add_label_counts(label_counts[state.split], state.label_counts)
    with_samples = [s for s in states if s.num_samples]
    stats_states = [s for s in with_samples if s.split == "train"] or with_samples
    intensity = intensity_stats(
        sum(s.pixel_sum for s in stats_states),
        sum(s.pixel_sumsq for s in stats_states),
        sum(s.num_pixels for s in stats_states),
        FULL_SCALE[settings["image_format"]],
    )
    intensity["split"] = "train" if splits["train"] else "all"
    shards = [
        {
            "name": s.name,
            "split": s.split,
            "num_samples": s.num_samples,
            "num_bytes": s.num_bytes,
            "sha256": s.sha256,
            "roi_paths": s.roi_paths,  # samples per chest-region path (see data_tools.encode.roi_path)
        }
        for s in with_samples
    ]
    return {
        "format_version": FORMAT_VERSION,
        "tool": TOOL_NAME,
        "tool_version": TOOL_VERSION,
        "command": "convert",
        "dataset": dataset,
        "source": source,
        "image_format": settings["image_format"],
        "options": settings,
        "salt_fingerprint": salt_print,
        "label_names": list(label_names),
        "num_inputs": num_inputs,
        "num_samples": sum(splits.values()),
        "num_skipped": num_skipped,
        "splits": splits,
        "shards": shards,
        "label_counts": label_counts,
        "intensity": intensity,
    }
