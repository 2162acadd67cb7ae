"""Helpers the dataset adapters share: finding files, reading CSVs, view names, patient-level splits."""

from __future__ import annotations

import csv
import gzip
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path

from data_tools.records import SPLITS, Record, Skip, split_for_patient

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")

# Raw view strings (upper-case, runs of space/_/- collapsed to one space) -> normalized view.
_VIEW_ALIASES = {
    "PA": "PA",
    "POSTEROANTERIOR": "PA",
    "POSTERO ANTERIOR": "PA",
    "AP": "AP",
    "ANTEROPOSTERIOR": "AP",
    "ANTERO POSTERIOR": "AP",
    "AP SUPINE": "AP",
    "AP HORIZONTAL": "AP",
    "AP ERECT": "AP",
    "L": "LATERAL",
    "LAT": "LATERAL",
    "LATERAL": "LATERAL",
    "LL": "LL",
    "LEFT LATERAL": "LL",
    "RL": "RL",
    "RIGHT LATERAL": "RL",
}
_UNKNOWN_VIEWS = {"", "UNK", "UNKNOWN", "NAN", "NONE", "NULL"}
# Raw views that say the patient lay on their back, kept as extra["supine"] = True.
SUPINE_VIEWS = {"AP SUPINE", "AP HORIZONTAL"}


def canonical_view_text(raw: str | None) -> str:
    return re.sub(r"[\s_\-]+", " ", (raw or "").strip().upper())


def normalize_view(raw: str | None) -> str | None:
    """'PA', 'postero-anterior', 'AP Supine', 'L', 'Lateral', ... -> 'PA' | 'AP' | 'LATERAL' | 'LL' | 'RL'.

    Unknown/blank -> None; any other view (e.g. MIMIC's 'AP AXIAL', 'SWIMMERS') is kept, upper-case
    with '_' for spaces ('AP_AXIAL'), so no information is lost.
    """
    text = canonical_view_text(raw)
    if text in _UNKNOWN_VIEWS:
        return None
    return _VIEW_ALIASES.get(text, text.replace(" ", "_"))


def dicom_header_fields(path: Path, keywords: Iterable[str]) -> dict[str, str]:
    """Text of the named DICOM attributes (pixels are not read); '' for an absent attribute, {} when
    the file cannot be read as DICOM (rejecting it is the converter's job, not the adapter's)."""
    import pydicom

    keywords = list(keywords)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keywords, force=True)
        return {k: str(ds.get(k, "") or "").strip() for k in keywords}
    except Exception:
        return {}


def relative_id(path: Path, root: Path) -> str:
    """The source_id of a file: its path relative to the input root, with '/' separators."""
    return path.relative_to(root).as_posix()


def walk_files(root: Path, suffixes: Iterable[str]) -> list[Path]:
    """Every file under `root` whose lower-case suffix is in `suffixes`, sorted by relative path.

    Hidden files and folders are skipped; symlinked folders are followed (datasets are often linked in),
    each real folder once: a symlink loop, or a second link to the same folder, adds no inputs.
    """
    suffixes = tuple(suffixes)
    found = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of every folder walked
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        status = os.stat(dirpath)
        if (status.st_dev, status.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: relative_id(p, root))


def find_file(
    input_dir: Path, explicit: str | os.PathLike | None, patterns: Iterable[str], option: str
) -> Path:
    """The one file named by `explicit` (an adapter option) or matching one of `patterns` in input_dir.

    Raises ValueError, naming `option`, when there is none or when several match.
    """
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ValueError(f"{option} {path}: no such file")
        return path
    patterns = list(patterns)
    matches = sorted({p for pattern in patterns for p in input_dir.glob(pattern) if p.is_file()})
    if not matches:
        raise ValueError(f"no {' or '.join(patterns)} in {input_dir}; pass {option} PATH")
    if len(matches) > 1:
        names = ", ".join(str(m.relative_to(input_dir)) for m in matches)
        raise ValueError(f"several label files in {input_dir} ({names}); choose one with {option} PATH")
    return matches[0]


def read_csv(path: Path, required: Iterable[str]) -> Iterator[dict[str, str]]:
    """Rows of a CSV (plain or .gz, optional BOM) as dicts; raises ValueError if a required column is
    missing. Header names are stripped of surrounding spaces."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        for values in reader:
            if values:  # a short row (trailing cells left out) reads as blanks
                yield dict(zip(header, values + [""] * (len(header) - len(values))))


def parse_label_value(text: str | None, where: str) -> float | None:
    """A CheXpert-style cell: '1.0' / '0' / '-1.0' -> float, blank -> None; anything else -> ValueError."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: label value {text!r} is not 1, 0, -1 or blank") from None
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"{where}: label value {text!r} is not 1, 0, -1 or blank")
    return value


def parse_age(text: str | None) -> int | None:
    """'57', '058Y', '45.0' -> years as int; blank or months/days ('007M') or unparsable -> None."""
    match = re.fullmatch(r"0*(\d+(?:\.\d+)?)\s*(Y|YEARS?)?", (text or "").strip().upper())
    return int(float(match.group(1))) if match else None


def normalize_sex(text: str | None) -> str | None:
    """'M' / 'Male' / 'F' / 'Female' (any case) -> 'M' / 'F'; anything else -> None."""
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get((text or "").strip().upper())


def normalize_split(raw: str, where: str) -> str:
    """Official split names -> 'train' | 'val' | 'test' ('validate', 'valid', 'validation' -> 'val')."""
    text = raw.strip().lower()
    text = {"validate": "val", "valid": "val", "validation": "val", "dev": "val"}.get(text, text)
    if text not in SPLITS:
        raise ValueError(f"{where}: unknown split {raw!r}; expected one of train, val/validate, test")
    return text


# Which official split a patient keeps when their images carry several: evaluation splits win, so a
# test image never moves into training.
SPLIT_PRIORITY = ("test", "val", "train")


def resolve_patient_splits(
    official: Mapping[str, str | None],
    patient_of: Mapping[str, str],
    subsplit_train: dict[str, float] | None = None,
) -> tuple[dict[str, str], int]:
    """One split per patient, so that no patient is ever in two splits.

    official: image key -> official split ('train' | 'val' | 'test') or None (the image is in no
    official list). patient_of: image key -> patient id. A patient takes the first of SPLIT_PRIORITY
    that any of their images has; a patient with no official split at all gets
    `split_for_patient(patient)`. With `subsplit_train` (e.g. {"train": 0.9, "val": 0.1}), patients
    whose official split is 'train' are divided again by the same patient hash (NIH's single
    train_val list). Returns (image key -> split, number of patients whose official splits disagreed).
    """
    splits_of_patient: dict[str, set[str]] = {}
    for key, patient in patient_of.items():
        split = official.get(key)
        splits_of_patient.setdefault(patient, set())
        if split is not None:
            assert split in SPLITS, split
            splits_of_patient[patient].add(split)
    chosen: dict[str, str] = {}
    num_conflicts = 0
    for patient, splits in splits_of_patient.items():
        num_conflicts += len(splits) > 1
        split = next((s for s in SPLIT_PRIORITY if s in splits), None)
        if split is None:
            split = split_for_patient(patient)
        elif split == "train" and subsplit_train:
            split = split_for_patient(patient, subsplit_train)
        chosen[patient] = split
    return {key: chosen[patient] for key, patient in patient_of.items()}, num_conflicts


def not_listed(path: Path, root: Path, dataset: str, listing: str) -> Skip:
    """The Skip for an image file on disk that the dataset's label file does not mention."""
    return Skip(relative_id(path, root), f"not listed in {listing}", dataset, path)


def warn_missing_images(logger: logging.Logger, listing: str, missing: list[str]) -> None:
    """Report label rows whose image is not on disk (they are not inputs, so they are no Skip)."""
    if missing:
        examples = ", ".join(missing[:3])
        logger.warning("%d entries of %s have no image on disk (e.g. %s)", len(missing), listing, examples)


# The duplicate reason of adapters that match files to label rows by file name alone.
SAME_FILE_NAME = "same file name as {first}, which holds this CSV row"


def iter_listed_files(
    input_dir: Path,
    suffixes: Iterable[str],
    listed: Collection[str],
    key_of: Callable[[Path], str | None],
    to_record: Callable[[Path, str], Record | Skip],
    *,
    dataset: str,
    listing: str,
    logger: logging.Logger,
    duplicate: str = "{key} is already read from {first}",
    expected: Iterable[str] | None = None,
) -> Iterator[Record | Skip]:
    """One Record or Skip per file of `suffixes` under input_dir, matched to label entries by key.

    `key_of(path)` names the entry of `listed` (the label file's keys, e.g. file names or stems) that
    a file stands for. A file whose key is not listed is a Skip (`not_listed`); a later file with the
    key of an earlier one is a Skip whose reason is `duplicate` formatted with `key` and `first` (the
    earlier file's source_id); any other file becomes `to_record(path, key)`, which may itself return
    a Skip. Last, the entries of `expected` (default: all of `listed`) that no file matched are
    reported in one warning on `logger`.
    """
    used: dict[str, str] = {}  # key -> source_id of the file that took it
    for path in walk_files(input_dir, suffixes):
        key, source_id = key_of(path), relative_id(path, input_dir)
        if key not in listed:
            yield not_listed(path, input_dir, dataset, listing)
        elif key in used:
            yield Skip(source_id, duplicate.format(key=key, first=used[key]), dataset, path)
        else:
            used[key] = source_id
            yield to_record(path, key)
    expected = listed if expected is None else expected
    warn_missing_images(logger, listing, [key for key in expected if key not in used])


def warn_split_conflicts(logger: logging.Logger, dataset: str, num_conflicts: int) -> None:
    if num_conflicts:
        logger.warning(
            "%s: %d patients have images in several official splits; each was put in its highest of %s",
            dataset,
            num_conflicts,
            " > ".join(SPLIT_PRIORITY),
        )
