"""CheXpert (v1.0 and v1.0-small): train.csv / valid.csv and the JPEGs they list.

Layout read:
    INPUT/train.csv, INPUT/valid.csv, or the same inside one sub-folder (INPUT/CheXpert-v1.0-small/),
    header
        Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,
        Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,
        Pleural Effusion,Pleural Other,Fracture,Support Devices
    Path = CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg: relative to the folder
    *above* the CSVs. Its first part is replaced by the CSV folder, so a renamed folder still works.

Verified on real files: the train.csv header and rows (cxr-corpus, CheXpert-v1.0-small paths). No
CheXpert images were available; the image tree follows the paths in the CSV.

Labels: 1.0 / 0.0 / -1.0 (uncertain, kept as -1) / blank (unknown, None). Splits: train.csv -> train,
valid.csv -> val (official; CheXpert's patients are disjoint between them, a patient found in both goes
to val, counted in a warning). There is no test split: CheXpert's test labels are not in these files.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from data_tools.labels import CHEXPERT, LABEL_NAMES, map_values
from data_tools.records import Record, Skip
from data_tools.sources._common import (
    IMAGE_SUFFIXES,
    iter_listed_files,
    normalize_sex,
    normalize_view,
    parse_age,
    parse_label_value,
    read_csv,
    relative_id,
    resolve_patient_splits,
    warn_split_conflicts,
)

DATASET = "chexpert"
CSV_SPLITS = {"train.csv": "train", "valid.csv": "val"}
REQUIRED_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA")
_PATIENT_STUDY = re.compile(r"(patient\d+)/(study\d+)/")
logger = logging.getLogger(__name__)


def label_names(input_dir: Path, args: argparse.Namespace) -> list[str]:
    return list(LABEL_NAMES)


def find_csv_folder(input_dir: Path) -> Path:
    """INPUT itself or its one sub-folder that holds train.csv and/or valid.csv."""
    candidates = [input_dir, *sorted(d for d in input_dir.iterdir() if d.is_dir())]
    folders = [d for d in candidates if any((d / name).is_file() for name in CSV_SPLITS)]
    if not folders:
        raise ValueError(f"no train.csv or valid.csv in {input_dir} or its sub-folders")
    if len(folders) > 1 and folders[0] != input_dir:
        raise ValueError(f"train.csv/valid.csv found in several folders of {input_dir}: {folders}")
    return folders[0]


def _image_id(csv_path_value: str, csv_folder: Path, input_dir: Path) -> str:
    """The source_id a CSV `Path` names: its first part (the dataset folder name) -> the CSV folder."""
    parts = PurePosixPath(csv_path_value.strip()).parts
    if parts and parts[0] not in ("train", "valid", "test"):
        parts = parts[1:]
    return relative_id(csv_folder.joinpath(*parts), input_dir)


def _view(row: dict[str, str]) -> str | None:
    if row["Frontal/Lateral"].strip().lower() == "lateral":
        return "LATERAL"
    return normalize_view(row["AP/PA"]) or ("FRONTAL" if row["Frontal/Lateral"].strip() else None)


def _read_rows(csv_folder: Path, input_dir: Path) -> tuple[dict[str, dict], dict[str, str], list[str]]:
    """(source_id -> row, source_id -> official split, names of the CSVs read)."""
    rows: dict[str, dict] = {}
    official: dict[str, str] = {}
    names = []
    for name, split in CSV_SPLITS.items():
        if not (csv_folder / name).is_file():
            continue
        names.append(name)
        for line, row in enumerate(read_csv(csv_folder / name, REQUIRED_COLUMNS), start=2):
            image_id = _image_id(row["Path"], csv_folder, input_dir)
            if _PATIENT_STUDY.search(row["Path"]) is None:
                raise ValueError(f"{csv_folder / name}:{line}: Path {row['Path']!r} has no patientN/studyN")
            row["_where"] = f"{name}:{line}"
            rows[image_id] = row
            official[image_id] = split
    return rows, official, names


def _record(path: Path, image_id: str, row: dict[str, str], split: str) -> Record:
    patient, study = _PATIENT_STUDY.search(row["Path"]).groups()
    values = {
        column: parse_label_value(row.get(column), f"{row['_where']} {column}")
        for column in CHEXPERT
        if column in row
    }
    return Record(
        source_path=path,
        source_id=image_id,
        dataset=DATASET,
        patient_id=patient,
        study_id=f"{patient}/{study}",
        view=_view(row),
        labels=map_values(CHEXPERT, values),
        split=split,
        extra={"age": parse_age(row.get("Age")), "sex": normalize_sex(row.get("Sex"))},
    )


def iter_records(input_dir: Path, args: argparse.Namespace) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    csv_folder = find_csv_folder(input_dir)
    rows, official, csv_names = _read_rows(csv_folder, input_dir)
    patient_of = {image_id: _PATIENT_STUDY.search(row["Path"]).group(1) for image_id, row in rows.items()}
    splits, num_conflicts = resolve_patient_splits(official, patient_of)
    warn_split_conflicts(logger, DATASET, num_conflicts)
    yield from iter_listed_files(
        input_dir,
        IMAGE_SUFFIXES,
        rows,
        lambda path: relative_id(path, input_dir),
        lambda path, image_id: _record(path, image_id, rows[image_id], splits[image_id]),
        dataset=DATASET,
        listing=" / ".join(csv_names),
        logger=logger,
    )
