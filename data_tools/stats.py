"""`xray-shard stats DIR`: counts, per-split label tables, intensity, image sizes, flags, chest-region
paths (fitted box or the fixed rectangle, and why), skip reasons.

Counts and intensity come from manifest.json; image sizes and flags from each sample's json member
(read through the idx, no image decoding).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from data_tools.encode import roi_path
from data_tools.manifest import read_manifest
from xray_core.shardio import META_EXTENSION, SKIPPED_NAME, idx_path_for, read_idx

TOP = 8  # rows shown for sizes, flags and skip reasons


def _sample_metas(folder: Path, manifest: dict):
    for entry in manifest["shards"]:
        tar = folder / entry["name"]
        with open(tar, "rb") as f:
            for sample in read_idx(idx_path_for(tar)):
                offset, size = sample.components[META_EXTENSION]
                f.seek(offset)
                yield json.loads(f.read(size))


def _skip_reason_kind(reason: str) -> str:
    """Group reasons by their stable part: 'filtered: Modality MR not in ...' -> 'filtered: Modality'."""
    head = reason.split(":")[0]
    if head == "filtered":
        return " ".join(reason.split()[:2])
    if head.startswith("duplicate of"):
        return "duplicate"
    return head.split(" (")[0]


def folder_stats(folder: Path) -> dict:
    """The numbers `stats` prints, as a dict."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    sizes, flags, policies, roi_paths = Counter(), Counter(), Counter(), Counter()
    for meta in _sample_metas(folder, manifest):
        sizes[tuple(meta["size"])] += 1
        flags.update(meta["flags"])
        policies[meta["intensity_policy"]] += 1
        roi_paths[roi_path(meta)] += 1
    skipped_path = folder / SKIPPED_NAME
    reasons = (
        Counter(
            _skip_reason_kind(json.loads(line)["reason"])
            for line in skipped_path.read_text().splitlines()
            if line
        )
        if skipped_path.is_file()
        else Counter()
    )
    return {
        "manifest": manifest,
        "num_bytes": sum(s["num_bytes"] for s in manifest["shards"]),
        "sizes": sizes,
        "flags": flags,
        "intensity_policies": policies,
        "roi_paths": roi_paths,
        "skip_reasons": reasons,
    }


def _label_table(manifest: dict) -> list[str]:
    names = manifest["label_names"]
    if not names:
        return ["labels: none"]
    width = max(len(n) for n in names)
    lines = []
    for split, counts in manifest["label_counts"].items():
        if not manifest["splits"].get(split):
            continue
        lines.append(f"labels, {split} ({manifest['splits'][split]} samples):")
        lines.append(f"  {'':{width}}  {'1':>7} {'0':>7} {'-1':>7} {'null':>7}")
        for name in names:
            c = counts[name]
            lines.append(f"  {name:{width}}  {c['1']:>7} {c['0']:>7} {c['-1']:>7} {c['null']:>7}")
    return lines


def _shares(counts: Counter) -> str:
    total = sum(counts.values())
    return ", ".join(f"{k} {n} ({100 * n / total:.1f}%)" for k, n in counts.most_common()) or "none"


def format_stats(stats: dict) -> str:
    m = stats["manifest"]
    splits = ", ".join(f"{k} {v}" for k, v in m["splits"].items())
    intensity = m["intensity"]
    lines = [
        f"dataset {m['dataset']} (source {m['source']}), format {m['image_format']}, {m['tool']} {m['tool_version']}",
        f"inputs {m['num_inputs']}: samples {m['num_samples']} ({splits}), skipped {m['num_skipped']}",
        f"shards {len(m['shards'])}, {stats['num_bytes'] / 1e6:.1f} MB",
        f"intensity mean {intensity['mean']:.4f} std {intensity['std']:.4f} ({intensity['unit']})",
        *_label_table(m),
        "image sizes (H x W: samples): "
        + ", ".join(f"{h}x{w}: {n}" for (h, w), n in stats["sizes"].most_common(TOP)),
        "intensity policies: " + ", ".join(f"{k}: {n}" for k, n in stats["intensity_policies"].most_common()),
        "flags: " + (", ".join(f"{k}: {n}" for k, n in stats["flags"].most_common(TOP)) or "none"),
        "chest region: " + _shares(stats["roi_paths"]),
        "skip reasons: "
        + (", ".join(f"{k}: {n}" for k, n in stats["skip_reasons"].most_common(TOP)) or "none"),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a folder written by `xray-shard convert`")


def run(args: argparse.Namespace) -> int:
    print(format_stats(folder_stats(args.folder)))
    return 0
