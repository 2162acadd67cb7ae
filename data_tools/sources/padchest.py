"""PadChest (BIMCV): the PADCHEST_chest_x_ray_images_labels_160K CSV and its 16-bit PNGs.

Layout read (the BIMCV PadChest README's column list and public loaders such as torchxrayvision):
    INPUT/PADCHEST_chest_x_ray_images_labels_160K*.csv[.gz] (or --padchest-csv PATH): a leading
        unnamed index column, then ImageID, ImageDir, StudyDate_DICOM, StudyID, PatientID,
        PatientBirth, PatientSex_DICOM, ViewPosition_DICOM, Projection, ..., Report, MethodLabel,
        Labels, Localizations, ...; `Labels` is a Python-style list such as
        "['pleural effusion', 'cardiomegaly']"
    INPUT/<ImageDir>/<ImageID>: the PNGs in folders 0..54 (or flat), matched to rows by file name

NOT verified on real files: neither the CSV nor a PadChest PNG was available (SOURCES.md); the exact
column order and spelling follow the README. Only ImageID, PatientID, Projection and Labels are
required; the other columns are used when present.

Labels: see docs/labels.md (listed -> 1, other mapped findings -> 0). Views: `Projection` (PA, L, AP,
AP_horizontal = supine AP, COSTAL, ...), else ViewPosition_DICOM. Splits: PadChest has none, so by
patient hash. The `Report` column is not used as a report: it is pre-processed (stemmed, stop words
removed) Spanish, unlike every other dataset's report text.
"""

from __future__ import annotations

import argparse
import ast
import logging
from collections.abc import Iterator
from pathlib import Path

from data_tools.labels import LABEL_NAMES, PADCHEST, map_findings, unknown_labels
from data_tools.records import Record, Skip, split_for_patient
from data_tools.sources._common import (
    SAME_FILE_NAME,
    SUPINE_VIEWS,
    canonical_view_text,
    find_file,
    iter_listed_files,
    normalize_sex,
    normalize_view,
    read_csv,
    relative_id,
)

DATASET = "padchest"
REQUIRED_COLUMNS = ("ImageID", "PatientID", "Projection", "Labels")
# Columns kept from each row (the CSV's Report text is large and unused).
OPTIONAL_COLUMNS = (
    "StudyID",
    "PatientBirth",
    "PatientSex_DICOM",
    "StudyDate_DICOM",
    "ViewPosition_DICOM",
    "MethodLabel",
)
KEPT_COLUMNS = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--padchest-csv",
        metavar="PATH",
        help="padchest: the PADCHEST_chest_x_ray_images_labels_160K*.csv[.gz] (default: the one in INPUT)",
    )


def label_names(input_dir: Path, args: argparse.Namespace) -> list[str]:
    return list(LABEL_NAMES)


def parse_padchest_labels(text: str | None) -> list[str] | None:
    """ "['pleural effusion', ' cardiomegaly ']" -> ['pleural effusion', 'cardiomegaly'] (stripped,
    lower-case); None when the cell is blank, not a list, or lists no finding."""
    try:
        value = ast.literal_eval((text or "").strip())
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, (list, tuple)):
        return None
    findings = [str(v).strip().lower() for v in value if str(v).strip()]
    return findings or None


def _extra(row: dict[str, str], raw_view: str) -> dict:
    extra: dict = {"sex": normalize_sex(row.get("PatientSex_DICOM"))}
    birth, study_date = (row.get("PatientBirth") or "").strip(), (row.get("StudyDate_DICOM") or "").strip()
    try:
        extra["age"] = int(study_date[:4]) - int(float(birth))  # birth is a year; age in whole years
    except ValueError:
        extra["age"] = None
    if row.get("MethodLabel"):
        extra["label_method"] = row["MethodLabel"].strip()  # Physician or RNN_model
    if canonical_view_text(raw_view) in SUPINE_VIEWS:
        extra["supine"] = True
    return extra


def _record(path: Path, input_dir: Path, row: dict[str, str]) -> Record:
    findings = parse_padchest_labels(row["Labels"])
    labels = map_findings(PADCHEST, findings)[0] if findings else unknown_labels()
    raw_view = row["Projection"] if normalize_view(row["Projection"]) else row.get("ViewPosition_DICOM", "")
    patient_id = row["PatientID"].strip()
    return Record(
        source_path=path,
        source_id=relative_id(path, input_dir),
        dataset=DATASET,
        patient_id=patient_id,
        study_id=(row.get("StudyID") or "").strip() or None,
        view=normalize_view(raw_view),
        labels=labels,
        split=split_for_patient(patient_id),
        extra=_extra(row, raw_view),
    )


def iter_records(input_dir: Path, args: argparse.Namespace) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    patterns = [
        "PADCHEST_chest_x_ray_images_labels_160K*.csv",
        "PADCHEST_chest_x_ray_images_labels_160K*.csv.gz",
    ]
    csv_path = find_file(input_dir, getattr(args, "padchest_csv", None), patterns, "--padchest-csv")
    rows = {
        row["ImageID"].strip(): {c: row[c] for c in KEPT_COLUMNS if c in row}
        for row in read_csv(csv_path, REQUIRED_COLUMNS)
    }
    yield from iter_listed_files(
        input_dir,
        (".png",),
        rows,
        lambda path: path.name,
        lambda path, image_id: _record(path, input_dir, rows[image_id]),
        dataset=DATASET,
        listing=csv_path.name,
        logger=logger,
        duplicate=SAME_FILE_NAME,
    )
