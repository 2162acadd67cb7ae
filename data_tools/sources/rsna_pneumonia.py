"""RSNA Pneumonia Detection Challenge (Kaggle, stage 2): the train labels CSV and its DICOMs.

Layout read:
    INPUT/stage_2_train_labels.csv (or stage_1_..., or --rsna-labels PATH), header
        patientId,x,y,width,height,Target: one row per box; a Target-0 image has one row, no box
    INPUT/stage_2_detailed_class_info.csv (optional, beside the labels CSV), header patientId,class:
        `Lung Opacity`, `No Lung Opacity / Not Normal` or `Normal`
    INPUT/stage_2_train_images/<patientId>.dcm (any folder below INPUT), matched by file stem;
        stage_2_test_images/*.dcm have no labels, so they become Skips like any unlisted file

Verified on real files: the labels CSV header and rows and the DICOM header fields (BodyPartExamined,
PatientAge, PatientID, PatientSex, ViewPosition, ...) of the Kaggle DICOMs (cxr-corpus header dump).
The class-info CSV and the images themselves were not available.

The challenge's `patientId` names one image (the DICOM PatientID equals it), so each image is its
own patient. Labels: see docs/labels.md. View, sex and age come from the DICOM header. Splits: the
challenge's labelled test set was never released, so by patient hash. extra["boxes"] holds the
opacity boxes as [x, y, width, height] in pixels of the original image.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

from data_tools.labels import LABEL_NAMES, RSNA_PNEUMONIA, map_findings
from data_tools.records import Record, Skip, split_for_patient
from data_tools.sources._common import (
    DICOM_SUFFIXES,
    dicom_header_fields,
    find_file,
    iter_listed_files,
    normalize_sex,
    normalize_view,
    parse_age,
    read_csv,
    relative_id,
)

DATASET = "rsna-pneumonia"
CLASS_INFO_PATTERN = "stage_*_detailed_class_info.csv"
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rsna-labels",
        metavar="PATH",
        help="rsna-pneumonia: the stage_*_train_labels.csv (default: the one in INPUT)",
    )


def label_names(input_dir: Path, args: argparse.Namespace) -> list[str]:
    return list(LABEL_NAMES)


def read_targets(csv_path: Path) -> tuple[dict[str, int], dict[str, list[list[float]]]]:
    """(patientId -> Target 0/1, patientId -> boxes [x, y, width, height])."""
    targets: dict[str, int] = {}
    boxes: dict[str, list[list[float]]] = {}
    for line, row in enumerate(read_csv(csv_path, ("patientId", "Target")), start=2):
        image_id, target = row["patientId"].strip(), row["Target"].strip()
        if target not in ("0", "1"):
            raise ValueError(f"{csv_path.name}:{line}: Target {target!r} is not 0 or 1")
        if targets.get(image_id, int(target)) != int(target):
            raise ValueError(f"{csv_path.name}:{line}: {image_id} has both Target 0 and 1 rows")
        targets[image_id] = int(target)
        box = [row.get(k, "").strip() for k in ("x", "y", "width", "height")]
        if all(box):
            boxes.setdefault(image_id, []).append([float(v) for v in box])
    return targets, boxes


def read_class_info(folder: Path, targets: dict[str, int]) -> dict[str, str]:
    """patientId -> class from the optional detailed-class-info CSV ({} when there is none); raises
    ValueError when a class contradicts the image's Target."""
    paths = sorted(folder.glob(CLASS_INFO_PATTERN))
    if not paths:
        return {}
    if len(paths) > 1:
        raise ValueError(f"several {CLASS_INFO_PATTERN} in {folder}: keep one")
    classes = {}
    for line, row in enumerate(read_csv(paths[0], ("patientId", "class")), start=2):
        image_id, detailed_class = row["patientId"].strip(), row["class"].strip()
        if detailed_class not in RSNA_PNEUMONIA:
            raise ValueError(f"{paths[0].name}:{line}: unknown class {detailed_class!r}")
        if image_id in targets and (detailed_class == "Lung Opacity") != bool(targets[image_id]):
            raise ValueError(f"{paths[0].name}:{line}: class {detailed_class!r} contradicts Target")
        classes[image_id] = detailed_class
    return classes


def image_labels(target: int, detailed_class: str | None) -> dict[str, float | None]:
    """Target (and the detailed class, when known) -> full LABEL_NAMES dict."""
    if detailed_class is not None:
        return map_findings(RSNA_PNEUMONIA, [detailed_class])[0]
    return map_findings(RSNA_PNEUMONIA, ["Lung Opacity"] if target else [], ["Lung Opacity"])[0]


def _record(
    path: Path, input_dir: Path, image_id: str, target: int, detailed_class: str | None, boxes: list
) -> Record:
    header = dicom_header_fields(path, ["ViewPosition", "PatientSex", "PatientAge"])
    return Record(
        source_path=path,
        source_id=relative_id(path, input_dir),
        dataset=DATASET,
        patient_id=image_id,
        study_id=image_id,
        view=normalize_view(header.get("ViewPosition")),
        labels=image_labels(target, detailed_class),
        split=split_for_patient(image_id),
        extra={
            "age": parse_age(header.get("PatientAge")),
            "sex": normalize_sex(header.get("PatientSex")),
            "boxes": boxes,
        },
    )


def iter_records(input_dir: Path, args: argparse.Namespace) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    csv_path = find_file(
        input_dir, getattr(args, "rsna_labels", None), ["stage_*_train_labels.csv"], "--rsna-labels"
    )
    targets, boxes = read_targets(csv_path)
    classes = read_class_info(csv_path.parent, targets)
    if not classes:
        logger.warning(
            "%s: no %s beside %s; no_finding stays unknown", DATASET, CLASS_INFO_PATTERN, csv_path.name
        )
    yield from iter_listed_files(
        input_dir,
        DICOM_SUFFIXES,
        targets,
        lambda path: path.stem,
        lambda path, i: _record(path, input_dir, i, targets[i], classes.get(i), boxes.get(i, [])),
        dataset=DATASET,
        listing=csv_path.name,
        logger=logger,
        duplicate="patientId {key} is already read from {first}",
    )
