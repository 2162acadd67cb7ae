"""What a source adapter yields: one `Record` per input image, or one `Skip` per input it rejects.

Every file a source sees must come out as exactly one Record or one Skip, so the converter can prove
`num_samples + num_skipped == num_inputs`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
# Patient-hash split used when a dataset has no official split (fractions of patients).
DEFAULT_SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass
class Record:
    """One input image and everything known about it before decoding.

    `patient_id` / `study_id` are the source's clear identifiers; the writer hashes them with the
    user's salt and never stores them in clear. `labels` maps a label name (see `data_tools.labels`)
    to 1.0 (present), 0.0 (absent), -1.0 (uncertain) or None (unknown).
    """

    source_path: Path
    source_id: str  # path relative to the input root: stable across machines, hashed into the key
    dataset: str
    patient_id: str | None = None
    study_id: str | None = None
    view: str | None = None  # normalized upper-case: PA, AP, LATERAL, LL, ...
    # Position of this image in its study as the source lists it, for sources that order a study's
    # images but name no view (R2Gen's IU X-ray `image_path`: its two-view model reads [0] then [1]).
    view_order: int | None = None
    labels: dict[str, float | None] = field(default_factory=dict)
    report: dict[str, str] | None = None  # {"findings": ..., "impression": ...}
    split: str | None = None  # official split if the dataset has one, else assigned by patient hash
    extra: dict = field(default_factory=dict)  # small dataset-specific metadata (age, sex, ...)


@dataclass
class Skip:
    """An input that will not become a sample, with a precise, human-readable reason."""

    source_id: str
    reason: str
    dataset: str = ""
    source_path: Path | None = None


def split_for_patient(patient_id: str, fractions: dict[str, float] | None = None) -> str:
    """Deterministic patient-level split from a hash of the patient id (never per image)."""
    fractions = fractions or DEFAULT_SPLIT_FRACTIONS
    digest = hashlib.sha256(f"split\0{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split, fraction in fractions.items():
        edge += fraction
        if u < edge:
            return split
    return list(fractions)[-1]
