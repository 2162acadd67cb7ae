"""`--source folder`: every regular file under the input folder, sorted, no labels.

Each file is one input: the converter decodes what it can (DICOM by content, PNG/JPEG/TIFF...) and
writes a skipped line for the rest. Patient and study ids come from DICOM headers when present
(read by the converter before splitting), otherwise each file is its own patient.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from data_tools.records import Record, Skip

DATASET = "folder"


def label_names(input_dir: Path, args) -> list[str]:
    return []


def list_files(input_dir: Path) -> list[Path]:
    """Every regular file (symlinks to files included; symlinked folders not followed, so no
    cycles) under `input_dir`, sorted by path relative to it. A broken symlink is listed too: it is an
    input, and the decoder reports it as a skip."""
    found = []
    for dirpath, dirnames, filenames in os.walk(input_dir):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() or (path.is_symlink() and not path.exists()):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(input_dir).as_posix())


def iter_records(input_dir: Path, args) -> Iterator[Record | Skip]:
    input_dir = Path(input_dir)
    for path in list_files(input_dir):
        yield Record(source_path=path, source_id=path.relative_to(input_dir).as_posix(), dataset=DATASET)
