"""VinDr-CXR: the PhysioNet 1.0.0 release, or the Kaggle VinBigData challenge copy.

Layouts read (the first that is present):
    PhysioNet: INPUT/annotations/image_labels_train.csv and image_labels_test.csv (or in INPUT),
        header image_id,rad_id,<22 local labels>,<6 global labels>, one row per radiologist (3 per
        training image, 1 consensus row per test image); values 1 / 0 (blank = 0).
    Kaggle: INPUT/train.csv, header image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max,
        one row per box (or one `No finding` row) per radiologist; its test images have no labels.
    Images: INPUT/train/<image_id>.dicom and INPUT/test/<image_id>.dicom (.dcm / .png / .jpg
        accepted too), matched to rows by file stem.

Verified on real files: the Kaggle train.csv header and rows (cxr-corpus). The PhysioNet label
columns follow the VinDr-CXR paper and public loaders (not verified; credentialed); the train file's
`Other diseases` is `Other disease` in the test file, and both spellings are read. No VinDr image was
available.

Views: ViewPosition from the DICOM header (None for PNG/JPEG copies).
Labels: per label, 1 when most of the image's radiologists marked it, -1 when some but not most did,
0 when none did (see docs/labels.md). Splits: official train / test by the file that lists the image.
VinDr publishes no patient id, so each image is its own patient (a patient with several images
cannot be kept together; the official split has the same limitation).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

from data_tools.labels import LABEL_NAMES, VINDR_CXR, VINDR_KAGGLE_CLASSES, map_values
from data_tools.records import Record, Skip
from data_tools.sources._common import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    dicom_header_fields,
    iter_listed_files,
    normalize_view,
    read_csv,
    relative_id,
)

DATASET = "vindr-cxr"
PHYSIONET_FILES = {"image_labels_train.csv": "train", "image_labels_test.csv": "test"}
logger = logging.getLogger(__name__)


def label_names(input_dir: Path, args: argparse.Namespace) -> list[str]:
    return list(LABEL_NAMES)


def vote(marks: list[bool]) -> float:
    """Radiologists' marks for one label -> 1 (most marked), -1 (some, not most), 0 (none)."""
    num_marked = sum(marks)
    if 2 * num_marked > len(marks):
        return 1.0
    return -1.0 if num_marked else 0.0


def _votes_to_labels(marks_by_label: dict[str, list[bool]]) -> dict[str, float | None]:
    return map_values(VINDR_CXR, {label: vote(marks) for label, marks in marks_by_label.items()})


def _read_physionet(csv_path: Path) -> dict[str, dict[str, list[bool]]]:
    """image_id -> label -> one mark per radiologist row."""
    marks: dict[str, dict[str, list[bool]]] = {}
    for line, row in enumerate(read_csv(csv_path, ("image_id",)), start=2):
        per_label = marks.setdefault(row["image_id"].strip(), {})
        for column in VINDR_CXR:
            if column not in row:
                continue
            cell = row[column].strip()
            if cell not in ("", "0", "1", "0.0", "1.0"):
                raise ValueError(f"{csv_path.name}:{line} {column}: value {cell!r} is not 0, 1 or blank")
            per_label.setdefault(column, []).append(cell in ("1", "1.0"))
    return marks


def _read_kaggle(csv_path: Path) -> dict[str, dict[str, list[bool]]]:
    """image_id -> class -> one mark per radiologist who read the image."""
    classes_by_reader: dict[str, dict[str, set[str]]] = {}
    for line, row in enumerate(read_csv(csv_path, ("image_id", "class_name", "rad_id")), start=2):
        class_name = row["class_name"].strip()
        if class_name not in VINDR_KAGGLE_CLASSES:
            raise ValueError(f"{csv_path.name}:{line}: unknown class_name {class_name!r}")
        readers = classes_by_reader.setdefault(row["image_id"].strip(), {})
        readers.setdefault(row["rad_id"].strip(), set()).add(class_name)
    return {
        image_id: {c: [c in marked for marked in readers.values()] for c in VINDR_KAGGLE_CLASSES}
        for image_id, readers in classes_by_reader.items()
    }


def read_labels(input_dir: Path) -> tuple[dict[str, dict[str, float | None]], dict[str, str], str]:
    """(image_id -> labels, image_id -> official split, name of the label files) for either layout."""
    for folder in (input_dir / "annotations", input_dir):
        found = {name: split for name, split in PHYSIONET_FILES.items() if (folder / name).is_file()}
        if found:
            labels, splits = {}, {}
            for name, split in found.items():  # train, then test: an image in both ends up in test
                for image_id, marks in _read_physionet(folder / name).items():
                    if image_id in splits:
                        logger.warning("%s: %s is in both label files; kept as test", DATASET, image_id)
                    labels[image_id], splits[image_id] = _votes_to_labels(marks), split
            return labels, splits, " / ".join(found)
    kaggle = input_dir / "train.csv"
    if kaggle.is_file():
        marks = _read_kaggle(kaggle)
        labels = {image_id: _votes_to_labels(m) for image_id, m in marks.items()}
        return labels, dict.fromkeys(labels, "train"), kaggle.name
    raise ValueError(
        f"no VinDr-CXR labels in {input_dir}: expected annotations/image_labels_train.csv "
        "(PhysioNet) or train.csv (Kaggle VinBigData)"
    )


def _record(path: Path, input_dir: Path, image_id: str, labels: dict, split: str) -> Record:
    is_dicom = path.suffix.lower() in DICOM_SUFFIXES
    view = dicom_header_fields(path, ["ViewPosition"]).get("ViewPosition") if is_dicom else None
    return Record(
        source_path=path,
        source_id=relative_id(path, input_dir),
        dataset=DATASET,
        patient_id=image_id,
        study_id=image_id,
        view=normalize_view(view),
        labels=dict(labels),
        split=split,
    )


def iter_records(input_dir: Path, args: argparse.Namespace) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    labels, splits, listing = read_labels(input_dir)
    yield from iter_listed_files(
        input_dir,
        (*DICOM_SUFFIXES, *IMAGE_SUFFIXES),
        labels,
        lambda path: path.stem,
        lambda path, image_id: _record(path, input_dir, image_id, labels[image_id], splits[image_id]),
        dataset=DATASET,
        listing=listing,
        logger=logger,
        duplicate="image_id {key} is already read from {first}",
    )
