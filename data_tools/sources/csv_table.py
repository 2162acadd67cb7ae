"""`--source csv`: a CSV table of images and labels (the phantom's labels.csv, or any such table).

Columns: `--path-column` (default `path`: the image path, relative to the CSV's folder or absolute);
optional `patient_id`, `study_id`, `view`, `split` (train / val|valid|validate / test; blank = by
patient hash), `report` (split at its 'IMPRESSION:' heading) or `findings` + `impression`; label
columns = `--label-columns a,b,c`, or by default every other column. Label cells: 1 / 0 / -1 / blank (unknown); 1.0-style floats are
accepted. Each row is one input: a row whose file is missing becomes a skipped line.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections.abc import Iterator
from pathlib import Path

from data_tools.records import Record, Skip
from data_tools.sources._common import normalize_split, normalize_view, parse_label_value, read_csv

DATASET = "csv"
DEFAULT_CSV = "labels.csv"
META_COLUMNS = ("patient_id", "study_id", "view", "split", "report", "findings", "impression")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, help=f"the label table (default INPUT/{DEFAULT_CSV})")
    parser.add_argument("--path-column", default="path", help="column holding image paths (default path)")
    parser.add_argument(
        "--label-columns",
        help="comma-separated label columns (default: every column except the path and "
        f"{', '.join(META_COLUMNS)})",
    )


def csv_path(input_dir: Path, args) -> Path:
    path = Path(getattr(args, "csv", None) or Path(input_dir) / DEFAULT_CSV)
    if not path.is_file():
        raise ValueError(f"no label table {path}; pass --csv PATH")
    return path


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise ValueError(f"{path}: empty table (no header)")
    return [h.strip() for h in header]


def label_names(input_dir: Path, args) -> list[str]:
    path = csv_path(input_dir, args)
    header = _header(path)
    path_column = getattr(args, "path_column", "path")
    if getattr(args, "label_columns", None):
        names = [n.strip() for n in args.label_columns.split(",") if n.strip()]
        missing = [n for n in names if n not in header]
        if missing:
            raise ValueError(f"{path}: --label-columns {missing} not in header {header}")
        return names
    return [c for c in header if c != path_column and c not in META_COLUMNS]


def split_report(text: str) -> tuple[str, str]:
    """'FINDINGS: a. IMPRESSION: b.' -> ('a.', 'b.'); text without an IMPRESSION: heading is all findings."""
    match = re.search(r"\bIMPRESSION\s*:", text, flags=re.IGNORECASE)
    findings, impression = (text[: match.start()], text[match.end() :]) if match else (text, "")
    findings = re.sub(r"^\s*FINDINGS\s*:", "", findings, flags=re.IGNORECASE)
    return findings.strip(), impression.strip()


def _report(row: dict[str, str]) -> dict[str, str] | None:
    """`findings` + `impression` columns, or one `report` column split at its IMPRESSION: heading."""
    if row.get("findings") or row.get("impression"):
        findings, impression = (row.get("findings") or "").strip(), (row.get("impression") or "").strip()
    else:
        findings, impression = split_report(row.get("report") or "")
    return {"findings": findings, "impression": impression} if findings or impression else None


def iter_records(input_dir: Path, args) -> Iterator[Record | Skip]:
    path = csv_path(input_dir, args)
    path_column = getattr(args, "path_column", "path")
    names = label_names(input_dir, args)
    for line_no, row in enumerate(read_csv(path, required=(path_column, *names)), start=2):
        where = f"{path}:{line_no}"
        source_id = (row.get(path_column) or "").strip()
        if not source_id:
            raise ValueError(f"{where}: empty {path_column!r} cell")
        image = Path(source_id) if Path(source_id).is_absolute() else path.parent / source_id
        if not image.is_file():
            yield Skip(source_id, f"listed in {path.name} but no such file", DATASET, image)
            continue
        split = (row.get("split") or "").strip()
        yield Record(
            source_path=image,
            source_id=source_id,
            dataset=DATASET,
            patient_id=(row.get("patient_id") or "").strip() or None,
            study_id=(row.get("study_id") or "").strip() or None,
            view=normalize_view(row.get("view")),
            labels={name: parse_label_value(row.get(name), f"{where} column {name}") for name in names},
            report=_report(row),
            split=normalize_split(split, where) if split else None,
        )
