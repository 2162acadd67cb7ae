"""MIMIC-CXR 2.0.0 (DICOM): files/pNN/pSUBJECT/sSTUDY/*.dcm, the free-text reports beside each study,
and, when given, the MIMIC-CXR-JPG CSVs for labels, views and the official split.

Layout read (PhysioNet's documentation of MIMIC-CXR 2.0.0):
    INPUT/files/pNN/pSUBJECT/sSTUDY/DICOM_ID.dcm
    INPUT/files/pNN/pSUBJECT/sSTUDY.txt   report (or under --mimic-reports DIR, see mimic_cxr_jpg)
    --mimic-csv-dir DIR (optional): the MIMIC-CXR-JPG mimic-cxr-2.0.0-*.csv[.gz]; both releases share
    dicom_id, so the JPG release's metadata, labels and split apply to the DICOMs.

NOT verified on real files (MIMIC is credentialed).

Without --mimic-csv-dir: subject and study come from the path, the view from the DICOM header
(ViewPosition), labels are unknown and splits are by patient hash; a .dcm outside the
pNN/pSUBJECT/sSTUDY/ layout becomes a Skip. With it: the metadata CSV defines the inputs (a .dcm
whose dicom_id it lacks becomes a Skip) and splits follow mimic_cxr_jpg.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from data_tools.labels import LABEL_NAMES, unknown_labels
from data_tools.records import Record, Skip, split_for_patient
from data_tools.sources import mimic_cxr_jpg
from data_tools.sources._common import (
    DICOM_SUFFIXES,
    dicom_header_fields,
    normalize_view,
    relative_id,
    walk_files,
)

DATASET = "mimic-cxr"
_LAYOUT = re.compile(r"(?:^|/)p\d{2}/p(\d+)/s(\d+)/[^/]+$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mimic_cxr_jpg.add_arguments(parser)


def label_names(input_dir: Path, args: argparse.Namespace) -> list[str]:
    return list(LABEL_NAMES)


def _iter_without_csvs(input_dir: Path, reports: mimic_cxr_jpg.ReportFinder) -> Iterator[Record | Skip]:
    for path in walk_files(input_dir, DICOM_SUFFIXES):
        source_id = relative_id(path, input_dir)
        match = _LAYOUT.search(source_id)
        if match is None:
            yield Skip(source_id, "path is not files/pNN/pSUBJECT/sSTUDY/*.dcm", DATASET, path)
            continue
        subject_id, study_id = match.groups()
        yield Record(
            source_path=path,
            source_id=source_id,
            dataset=DATASET,
            patient_id=subject_id,
            study_id=study_id,
            view=normalize_view(dicom_header_fields(path, ["ViewPosition"]).get("ViewPosition")),
            labels=unknown_labels(),
            report=reports.report(subject_id, study_id),
            split=split_for_patient(subject_id),
        )


def iter_records(input_dir: Path, args: argparse.Namespace) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    reports = mimic_cxr_jpg.ReportFinder(getattr(args, "mimic_reports", None), input_dir)
    csv_dir = getattr(args, "mimic_csv_dir", None)
    labeler = getattr(args, "mimic_labels", "chexpert")
    if csv_dir:
        tables = mimic_cxr_jpg.load_tables(Path(csv_dir), labeler)
        yield from mimic_cxr_jpg.iter_listed(input_dir, DICOM_SUFFIXES, DATASET, tables, reports)
        return
    if labeler != "chexpert":
        raise ValueError(f"--mimic-labels {labeler} needs --mimic-csv-dir (the MIMIC-CXR-JPG CSVs)")
    yield from _iter_without_csvs(input_dir, reports)
    reports.warn()
