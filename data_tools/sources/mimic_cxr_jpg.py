"""MIMIC-CXR-JPG 2.0.0: JPEGs under files/, the metadata, CheXpert (or NegBio) and split CSVs, reports.

Layout read (PhysioNet's documentation of MIMIC-CXR-JPG 2.0.0 and MIMIC-CXR 2.0.0):
    INPUT/files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg
    CSV folder (INPUT, or --mimic-csv-dir DIR), each as .csv or .csv.gz:
        mimic-cxr-2.0.0-metadata.csv  dicom_id,subject_id,study_id,PerformedProcedureStepDescription,
                                      ViewPosition,Rows,Columns,StudyDate,StudyTime,...
        mimic-cxr-2.0.0-chexpert.csv  subject_id,study_id,<the 14 CheXpert labels> (or -negbio.csv,
                                      --mimic-labels negbio); values 1.0 / 0.0 / -1.0 / blank
        mimic-cxr-2.0.0-split.csv     dicom_id,study_id,subject_id,split (train / validate / test)
    reports (optional, --mimic-reports DIR, the unpacked mimic-cxr-reports.zip):
        DIR/files/pNN/pSUBJECT/sSTUDY.txt or DIR/pNN/pSUBJECT/sSTUDY.txt

NOT verified on real files (MIMIC is credentialed): the metadata and label headers come from
SOURCES.md (public code that writes mock files in this format), the split header is unverified.

The metadata CSV defines the inputs: a JPEG whose dicom_id it lacks becomes a Skip. Labels are per
study (no row -> all unknown). Splits: the official split CSV (validate -> val); a patient found in
several splits goes to the highest of test > val > train (counted in a warning); an image the split
CSV lacks takes its patient's split, or the patient-hash split. Reports: FINDINGS / IMPRESSION
sections of the free text (see `parse_report`).

`mimic_cxr` (the DICOM release) reuses this module's CSV and report readers.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.labels import CHEXPERT, LABEL_NAMES, map_values
from data_tools.records import Record, Skip
from data_tools.sources._common import (
    find_file,
    iter_listed_files,
    normalize_split,
    normalize_view,
    parse_label_value,
    read_csv,
    relative_id,
    resolve_patient_splits,
    warn_split_conflicts,
)

DATASET = "mimic-cxr-jpg"
CSV_PREFIX = "mimic-cxr-2.0.0"
logger = logging.getLogger(__name__)


def _add_once(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """Both MIMIC adapters share these options; the second to register them finds them present."""
    with contextlib.suppress(argparse.ArgumentError):
        parser.add_argument(*flags, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_once(
        parser,
        "--mimic-csv-dir",
        metavar="DIR",
        help="mimic-cxr(-jpg): folder of the mimic-cxr-2.0.0-{metadata,chexpert,negbio,split}.csv[.gz] "
        "files (default: INPUT for mimic-cxr-jpg; none for mimic-cxr)",
    )
    _add_once(
        parser,
        "--mimic-labels",
        choices=("chexpert", "negbio"),
        default="chexpert",
        help="mimic-cxr(-jpg): which labeler's CSV gives the labels (default: chexpert)",
    )
    _add_once(
        parser,
        "--mimic-reports",
        metavar="DIR",
        help="mimic-cxr(-jpg): unpacked mimic-cxr-reports (DIR/[files/]pNN/pSUBJECT/sSTUDY.txt)",
    )


def label_names(input_dir: Path, args: argparse.Namespace) -> list[str]:
    return list(LABEL_NAMES)


@dataclass
class MimicTables:
    """What the MIMIC-CXR-JPG CSVs say, keyed for lookup."""

    metadata_name: str
    images: dict[str, tuple[str, str, str]]  # dicom_id -> (subject_id, study_id, ViewPosition)
    study_labels: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # study_id -> CheXpert column -> value
    official_split: dict[str, str] = field(default_factory=dict)  # dicom_id -> train | val | test


def _csv(csv_dir: Path, name: str, required: bool) -> Path | None:
    patterns = [f"{CSV_PREFIX}-{name}.csv", f"{CSV_PREFIX}-{name}.csv.gz"]
    if not required and not any((csv_dir / p).is_file() for p in patterns):
        logger.warning("%s: no %s-%s.csv[.gz] in %s", DATASET, CSV_PREFIX, name, csv_dir)
        return None
    return find_file(csv_dir, None, patterns, "--mimic-csv-dir")


def load_tables(csv_dir: Path, labeler: str) -> MimicTables:
    """Read the metadata (required), label and split CSVs (each optional, with a warning) in csv_dir."""
    if not csv_dir.is_dir():
        raise ValueError(f"--mimic-csv-dir {csv_dir}: no such folder")
    metadata = _csv(csv_dir, "metadata", required=True)
    images = {
        row["dicom_id"].strip(): (row["subject_id"].strip(), row["study_id"].strip(), row["ViewPosition"])
        for row in read_csv(metadata, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    }
    tables = MimicTables(metadata.name, images)
    label_csv = _csv(csv_dir, labeler, required=False)
    if label_csv is not None:
        for line, row in enumerate(read_csv(label_csv, ("subject_id", "study_id")), start=2):
            values = {
                c: parse_label_value(row.get(c), f"{label_csv.name}:{line} {c}") for c in CHEXPERT if c in row
            }
            # Only the non-blank cells are kept: most are blank, and there are ~230k studies.
            tables.study_labels[row["study_id"].strip()] = {c: v for c, v in values.items() if v is not None}
    split_csv = _csv(csv_dir, "split", required=False)
    if split_csv is not None:
        for line, row in enumerate(read_csv(split_csv, ("dicom_id", "split")), start=2):
            tables.official_split[row["dicom_id"].strip()] = normalize_split(
                row["split"], f"{split_csv.name}:{line}"
            )
    return tables


_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z ]{2,40}):", re.MULTILINE)


def parse_report(text: str) -> dict[str, str] | None:
    """A MIMIC-CXR free-text report -> {"findings", "impression"} (whitespace collapsed, '' if absent).

    Sections start with an upper-case name and a colon at the start of a line ("FINDINGS:",
    "IMPRESSION:", "FINDINGS AND IMPRESSION:" counts as findings). A report with neither section
    keeps its last paragraph as findings, as the MIMIC-CXR authors' section splitter does.
    Returns None for an empty report.
    """
    matches = list(_SECTION.finditer(text))
    sections: dict[str, str] = {}
    for match, following in zip(matches, [*matches[1:], None]):
        body = text[match.end() : following.start() if following else len(text)]
        sections.setdefault(match.group(1).strip(), " ".join(body.split()))
    findings = sections.get("FINDINGS") or sections.get("FINDINGS AND IMPRESSION", "")
    impression = sections.get("IMPRESSION", "")
    if not findings and not impression:
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
        findings = paragraphs[-1] if paragraphs else ""
    return {"findings": findings, "impression": impression} if findings or impression else None


class ReportFinder:
    """Looks up sSTUDY.txt for a study, in the reports folder and beside the study folder."""

    def __init__(self, reports_dir: str | None, input_dir: Path):
        self.folders = [input_dir / "files", input_dir]
        if reports_dir:
            if not Path(reports_dir).is_dir():
                raise ValueError(f"--mimic-reports {reports_dir}: no such folder")
            self.folders = [Path(reports_dir) / "files", Path(reports_dir)]
        self.explicit = bool(reports_dir)
        self.num_missing = 0
        self._cache: dict[str, dict[str, str] | None] = {}

    def report(self, subject_id: str, study_id: str) -> dict[str, str] | None:
        if study_id not in self._cache:
            rel = Path(f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}.txt")
            path = next((d / rel for d in self.folders if (d / rel).is_file()), None)
            self.num_missing += path is None
            self._cache[study_id] = parse_report(path.read_text(errors="replace")) if path else None
        report = self._cache[study_id]
        return dict(report) if report else None

    def warn(self) -> None:
        if self.explicit and self.num_missing:
            logger.warning("%d studies have no report in --mimic-reports", self.num_missing)


def iter_listed(
    input_dir: Path, suffixes: tuple[str, ...], dataset: str, tables: MimicTables, reports: ReportFinder
) -> Iterator[Record | Skip]:
    """One Record per image file (of `suffixes`) whose dicom_id (file stem) the metadata CSV lists;
    one Skip for every other image file. Shared by the JPG and the DICOM release."""
    patient_of = {d: subject for d, (subject, _, _) in tables.images.items()}
    official = {d: tables.official_split.get(d) for d in tables.images}
    splits, num_conflicts = resolve_patient_splits(official, patient_of)
    warn_split_conflicts(logger, dataset, num_conflicts)

    def to_record(path: Path, dicom_id: str) -> Record:
        subject_id, study_id, view = tables.images[dicom_id]
        return Record(
            source_path=path,
            source_id=relative_id(path, input_dir),
            dataset=dataset,
            patient_id=subject_id,
            study_id=study_id,
            view=normalize_view(view),
            labels=map_values(CHEXPERT, tables.study_labels.get(study_id, {})),
            report=reports.report(subject_id, study_id),
            split=splits[dicom_id],
        )

    yield from iter_listed_files(
        input_dir,
        suffixes,
        tables.images,
        lambda path: path.stem,
        to_record,
        dataset=dataset,
        listing=tables.metadata_name,
        logger=logger,
        duplicate="dicom_id {key} is already read from {first}",
    )
    reports.warn()


def iter_records(input_dir: Path, args: argparse.Namespace) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    csv_dir = Path(getattr(args, "mimic_csv_dir", None) or input_dir)
    tables = load_tables(csv_dir, getattr(args, "mimic_labels", "chexpert"))
    reports = ReportFinder(getattr(args, "mimic_reports", None), input_dir)
    yield from iter_listed(input_dir, (".jpg", ".jpeg"), DATASET, tables, reports)
