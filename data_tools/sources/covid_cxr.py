"""covid-chestxray-dataset (ieee8023): metadata.csv and the images it lists.

Layout read:
    INPUT/metadata.csv (or --covid-metadata PATH), header
        patientid,offset,sex,age,finding,survival,intubated,intubation_present,went_icu,in_icu,
        needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,
        neutrophil_count,lymphocyte_count,view,modality,date,location,folder,filename,doi,url,
        license,clinical_notes,other_notes,
    INPUT/<folder>/<filename>: folder is `images` for radiographs (`volumes` holds CT volumes)

Verified on real files: the metadata.csv header, 14 of its rows and their images (cxr-corpus,
hida6 fork of 2020-06-22, where `finding` is flat, e.g. "COVID-19"). Newer releases write it as a
path ("Pneumonia/Viral/COVID-19"); both are mapped (docs/labels.md).

Rows whose modality is not X-ray (CT) make their image files Skips. Views: PA / AP / AP Supine
(-> AP, extra["supine"]) / L (-> LATERAL). Splits: none official, so by patient hash. The
clinical_notes column describes the case, not the image, so it is not used as a report.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from data_tools.labels import COVID_CXR, LABEL_NAMES, map_findings, unknown_labels
from data_tools.records import Record, Skip, split_for_patient
from data_tools.sources._common import (
    IMAGE_SUFFIXES,
    SUPINE_VIEWS,
    canonical_view_text,
    iter_listed_files,
    normalize_sex,
    normalize_view,
    parse_age,
    read_csv,
    relative_id,
)

DATASET = "covid-cxr"
REQUIRED_COLUMNS = ("patientid", "finding", "view", "modality", "folder", "filename")
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--covid-metadata", metavar="PATH", help="covid-cxr: the metadata.csv (default: INPUT/metadata.csv)"
    )


def label_names(input_dir: Path, args: argparse.Namespace) -> list[str]:
    return list(LABEL_NAMES)


def finding_labels(finding: str) -> tuple[dict[str, float | None], list[str]]:
    """The `finding` column -> (full LABEL_NAMES dict, parts not in the label map).

    An unmapped part leaves every name unknown: the column is the image's whole diagnosis, so absence
    can only be claimed when every part of it is understood.
    """
    parts = [p.strip().lower() for p in re.split(r"[/,]", finding) if p.strip()]
    labels, unmapped = map_findings(COVID_CXR, parts)
    return (labels if parts and not unmapped else unknown_labels()), unmapped


def _is_xray(row: dict[str, str]) -> bool:
    return row["modality"].strip().lower() == "x-ray"


def _record(path: Path, input_dir: Path, row: dict[str, str], unmapped: set[str]) -> Record:
    labels, unknown = finding_labels(row["finding"])
    unmapped.update(unknown)
    patient_id = row["patientid"].strip()
    offset = (row.get("offset") or "").strip()
    extra = {
        "age": parse_age(row.get("age")),
        "sex": normalize_sex(row.get("sex")),
        "finding": row["finding"],
    }
    if canonical_view_text(row["view"]) in SUPINE_VIEWS:
        extra["supine"] = True
    return Record(
        source_path=path,
        source_id=relative_id(path, input_dir),
        dataset=DATASET,
        patient_id=patient_id,
        study_id=f"{patient_id}@{offset}" if offset else None,  # offset: days since symptom onset
        view=normalize_view(row["view"]),
        labels=labels,
        split=split_for_patient(patient_id),
        extra=extra,
    )


def iter_records(input_dir: Path, args: argparse.Namespace) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    metadata = Path(getattr(args, "covid_metadata", None) or input_dir / "metadata.csv")
    if not metadata.is_file():
        raise ValueError(f"no {metadata}; pass --covid-metadata PATH")
    rows: dict[str, dict[str, str]] = {}
    for row in read_csv(metadata, REQUIRED_COLUMNS):
        image_id = PurePosixPath(row["folder"].strip(), row["filename"].strip()).as_posix()
        rows.setdefault(image_id, row)  # a file listed twice keeps its first row
    unmapped: set[str] = set()

    def to_record(path: Path, image_id: str) -> Record | Skip:
        row = rows[image_id]
        if not _is_xray(row):
            reason = f"modality {row['modality'].strip()!r} in {metadata.name}, not X-ray"
            return Skip(image_id, reason, DATASET, path)
        return _record(path, input_dir, row, unmapped)

    yield from iter_listed_files(
        input_dir,
        IMAGE_SUFFIXES,
        rows,
        lambda path: relative_id(path, input_dir),
        to_record,
        dataset=DATASET,
        listing=metadata.name,
        logger=logger,
        # CT rows name volumes, which are no inputs: only X-ray rows without a file are worth a warning.
        expected=[image_id for image_id, row in rows.items() if _is_xray(row)],
    )
    if unmapped:
        logger.warning(
            "%s: findings not in the label map (labels left unknown): %s", DATASET, sorted(unmapped)
        )
