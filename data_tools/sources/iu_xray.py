"""IU X-ray (OpenI) as prepared by R2Gen: annotation.json with reports and the official split, and
the PNGs it lists under images/.

Layout read:
    INPUT/annotation.json (or --iu-annotation PATH):
        {"train": [{"id": "CXR2384_IM-0942", "report": "...",
                    "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "train"}],
         "val": [...], "test": [...]}
    INPUT/images/<image_path>: the PNGs

Verified on real files: annotation.json (R2Gen's, as copied in SERPENT-VLM) and the MRG_RL variant
with flat OpenI file names (cxr-corpus). No IU X-ray PNG was available; the images/ folder follows
R2Gen's documentation. Upstream, the "test" key of annotation.json is corrupted to four spaces: a
blank key takes each entry's own "split" field, and an entry with neither is a ValueError.

Each entry (one report, usually a frontal and a lateral image) is a study; IU X-ray publishes no
patient id, so each study is its own patient. The report is one string: it goes in findings, with
an empty impression. There are no labels. Splits: official; a study id found in several splits goes
to the first of test > val > train (counted in a warning), and an image listed by several entries
keeps the entry of the first of those splits. Views are not in the annotation: None; each image's
position in its entry's `image_path` is kept as `view_order`, so a two-view report model pairs
[0] then [1] as R2Gen does (whatever the salted keys' order).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from data_tools.labels import LABEL_NAMES, unknown_labels
from data_tools.records import Record, Skip
from data_tools.sources._common import (
    IMAGE_SUFFIXES,
    SPLIT_PRIORITY,
    iter_listed_files,
    normalize_split,
    relative_id,
    resolve_patient_splits,
    warn_split_conflicts,
)

DATASET = "iu-xray"
IMAGES_FOLDER = "images"
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--iu-annotation",
        metavar="PATH",
        help="iu-xray: R2Gen annotation.json (default: INPUT/annotation.json)",
    )


def label_names(input_dir: Path, args: argparse.Namespace) -> list[str]:
    return list(LABEL_NAMES)


def read_annotation(path: Path) -> dict[str, tuple[dict, str]]:
    """image path (relative to images/) -> (its entry, the entry's official split).

    An image listed by several entries keeps the entry of the first of test > val > train.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of split -> entries, got {type(data).__name__}")
    listed: list[tuple[str, dict]] = []
    for key, entries in data.items():
        for entry in entries:
            raw = key.strip() or str(entry.get("split", "")).strip()
            if not raw:
                raise ValueError(
                    f"{path}: entry {entry.get('id')!r} has a blank split key and no 'split' field"
                )
            if "id" not in entry or not isinstance(entry.get("image_path"), list):
                raise ValueError(
                    f"{path}: every entry needs an 'id' and an 'image_path' list; got {entry!r:.200}"
                )
            listed.append((normalize_split(raw, f"{path.name} entry {entry['id']!r}"), entry))
    images: dict[str, tuple[dict, str]] = {}
    for split, entry in sorted(listed, key=lambda item: SPLIT_PRIORITY.index(item[0])):
        for image_path in entry["image_path"]:
            images.setdefault(PurePosixPath(image_path).as_posix(), (entry, split))
    return images


def iter_records(input_dir: Path, args: argparse.Namespace) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    annotation = Path(getattr(args, "iu_annotation", None) or input_dir / "annotation.json")
    if not annotation.is_file():
        raise ValueError(f"no {annotation}; pass --iu-annotation PATH (R2Gen's iu_xray annotation.json)")
    images = read_annotation(annotation)
    splits, num_conflicts = resolve_patient_splits(
        {image_id: split for image_id, (_, split) in images.items()},
        {image_id: str(entry["id"]) for image_id, (entry, _) in images.items()},
    )
    warn_split_conflicts(logger, DATASET, num_conflicts)
    images_dir = input_dir / IMAGES_FOLDER

    def to_record(path: Path, image_id: str) -> Record:
        entry = images[image_id][0]
        study_id = str(entry["id"])
        listed = [PurePosixPath(p).as_posix() for p in entry["image_path"]]
        return Record(
            source_path=path,
            source_id=relative_id(path, input_dir),
            dataset=DATASET,
            patient_id=study_id,
            study_id=study_id,
            view_order=listed.index(image_id),  # R2Gen's two-view model reads image_path[0], then [1]
            labels=unknown_labels(),
            report={"findings": " ".join(str(entry.get("report", "")).split()), "impression": ""},
            split=splits[image_id],
        )

    yield from iter_listed_files(
        input_dir,
        IMAGE_SUFFIXES,
        images,
        lambda path: relative_id(path, images_dir) if images_dir in path.parents else None,
        to_record,
        dataset=DATASET,
        listing=f"{annotation.name} (under {IMAGES_FOLDER}/)",
        logger=logger,
    )
