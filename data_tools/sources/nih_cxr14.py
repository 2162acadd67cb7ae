"""ChestX-ray14 (NIH): Data_Entry_2017*.csv, PNGs, and the official train_val / test lists.

Layout read:
    INPUT/Data_Entry_2017.csv or Data_Entry_2017_v2020.csv (or --nih-csv PATH), header
        Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,
        OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]
    INPUT/train_val_list.txt and INPUT/test_list.txt (or beside the CSV): one image name per line
    INPUT/**/*.png: the images (images_001/images/... or flat), matched to rows by file name

Verified on real files: the Data_Entry_2017_v2020 header and rows and NIH PNGs (cxr-corpus,
SOURCES.md). The two list files were not available; they are read as NIH documents them.

Splits: the official lists are patient-disjoint; `test_list.txt` patients go to test and
`train_val_list.txt` patients are divided 90/10 into train/val by patient hash. A patient found in
both lists goes to test (counted in a warning); an image in neither list takes its patient's split,
or the patient-hash split when no image of that patient is listed. Without the lists every patient
gets `split_for_patient`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

from data_tools.labels import LABEL_NAMES, NIH_CXR14, map_findings
from data_tools.records import Record, Skip
from data_tools.sources._common import (
    SAME_FILE_NAME,
    find_file,
    iter_listed_files,
    normalize_sex,
    normalize_view,
    parse_age,
    read_csv,
    relative_id,
    resolve_patient_splits,
    warn_split_conflicts,
)

DATASET = "nih-cxr14"
LIST_FILES = {"train_val_list.txt": "train", "test_list.txt": "test"}
TRAIN_VAL_FRACTIONS = {"train": 0.9, "val": 0.1}
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nih-csv", metavar="PATH", help="nih-cxr14: the Data_Entry_2017*.csv (default: the one in INPUT)"
    )


def label_names(input_dir: Path, args: argparse.Namespace) -> list[str]:
    return list(LABEL_NAMES)


def read_official_lists(folders: list[Path]) -> dict[str, str]:
    """Image name -> 'train' (train_val_list) | 'test' from the first folder holding each list file.

    Returns {} when neither list exists; raises ValueError when only one does. A name in both lists
    counts as test.
    """
    found = {name: next((d / name for d in folders if (d / name).is_file()), None) for name in LIST_FILES}
    present = [name for name, path in found.items() if path]
    if not present:
        return {}
    if len(present) == 1:
        missing = next(name for name in LIST_FILES if name not in present)
        raise ValueError(f"found {found[present[0]]} but no {missing} beside it; provide both or neither")
    official: dict[str, str] = {}
    for name, split in LIST_FILES.items():
        for image_name in found[name].read_text().split():
            if official.get(image_name) != "test":
                official[image_name] = split
    return official


def _extra(row: dict[str, str]) -> dict:
    extra: dict = {"age": parse_age(row.get("Patient Age")), "sex": normalize_sex(row.get("Patient Gender"))}
    try:
        extra["follow_up"] = int(row.get("Follow-up #", ""))
        # The header's "[Width,Height]" is split by the CSV comma into two columns.
        extra["original_size"] = [int(row["Height]"]), int(row["OriginalImage[Width"])]
        extra["original_pixel_spacing"] = [float(row["y]"]), float(row["OriginalImagePixelSpacing[x"])]
    except (KeyError, ValueError):
        pass  # older copies of the CSV lack or blank these; they are informational only
    return extra


def _record(path: Path, input_dir: Path, row: dict[str, str], split: str, unmapped: set[str]) -> Record:
    findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
    labels, unknown = map_findings(NIH_CXR14, findings)
    unmapped.update(unknown)
    return Record(
        source_path=path,
        source_id=relative_id(path, input_dir),
        dataset=DATASET,
        patient_id=row["Patient ID"].strip(),
        study_id=path.stem,  # one image per study in ChestX-ray14
        view=normalize_view(row["View Position"]),
        labels=labels,
        split=split,
        extra=_extra(row),
    )


def iter_records(input_dir: Path, args: argparse.Namespace) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    csv_path = find_file(input_dir, getattr(args, "nih_csv", None), ["Data_Entry_2017*.csv"], "--nih-csv")
    rows = {row["Image Index"].strip(): row for row in read_csv(csv_path, REQUIRED_COLUMNS)}
    official = read_official_lists([csv_path.parent, input_dir])
    patient_of = {name: row["Patient ID"].strip() for name, row in rows.items()}
    splits, num_conflicts = resolve_patient_splits(
        {name: official.get(name) for name in rows}, patient_of, TRAIN_VAL_FRACTIONS if official else None
    )
    warn_split_conflicts(logger, DATASET, num_conflicts)
    unmapped: set[str] = set()
    yield from iter_listed_files(
        input_dir,
        (".png",),
        rows,
        lambda path: path.name,
        lambda path, name: _record(path, input_dir, rows[name], splits[name], unmapped),
        dataset=DATASET,
        listing=csv_path.name,
        logger=logger,
        duplicate=SAME_FILE_NAME,
    )
    if unmapped:
        logger.warning("%s: finding names not in the label map were ignored: %s", DATASET, sorted(unmapped))
