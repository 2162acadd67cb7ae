"""`xray-shard synth`: synthetic chest radiographs written as real DICOM files, plus labels.csv.

A stand-in archive with the awkward parts of real ones: CR and DX, 12/14/16-bit, MONOCHROME1 and 2,
JPEG 2000 Lossless / RLE Lossless / uncompressed, patients with several studies, non-square images,
five findings with templated reports. The phantom itself lives in `phantom_anatomy`.

Layout written under OUT:
    images/<patient_id>/<study>/<n>.dcm
    labels.csv   path,patient_id,study_id,view,split,<5 findings>,report

Everything derives from the seed (UIDs, dates, pixels), so the same arguments give byte-identical
files. Every image draws its own random generator from (seed, image index), which is what makes
`num_workers > 1` give the same bytes as one worker.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools import phantom_anatomy as anatomy_lib
from data_tools.records import SPLITS

FINDINGS = anatomy_lib.FINDINGS
LABELS_HEADER = ["path", "patient_id", "study_id", "view", "split", *FINDINGS, "report"]
FINDING_PROBABILITY = 0.35
MM_PER_ANATOMY_UNIT = 0.143 * 1024  # nominal: the short side (2 units) is 2048 px at 0.143 mm
UID_ROOT = "xray_pretrain.synth"

# Per-image attributes cycle through these blocks in a seeded order: every value of every attribute
# occurs within the first len(block) images, so even an 8-image set exercises each code path.
MODALITY_BLOCK = ("CR", "DX")
PHOTOMETRIC_BLOCK = ("MONOCHROME2", "MONOCHROME2", "MONOCHROME1")
BITS_BLOCK = (12, 14, 16)
SYNTAX_BLOCK = ("explicit", "explicit", "jpeg2000", "rle")
VIEW_BLOCK = ("PA", "PA", "PA", "PA", "PA", "AP")
SHAPE_BLOCK = (False,) * 7 + (True,)  # True: narrower than square (Columns < Rows)
SPLIT_BLOCK = ("train",) * 8 + ("val", "test")  # per 10 patients


@dataclass(frozen=True)
class ImageJob:
    """Everything needed to write one image, independent of every other image."""

    index: int
    seed: int
    size: int
    out_dir: Path
    patient_index: int
    patient_id: str
    patient_sex: str
    patient_age: int
    study_index: int
    study_id: str
    study_date: str
    instance: int  # image number within its study
    split: str
    view: str
    modality: str
    photometric: str
    bits_stored: int
    syntax: str
    narrow: bool

    @property
    def rel_path(self) -> str:
        return f"images/{self.patient_id}/s{self.study_index:02d}/{self.instance}.dcm"


@dataclass
class SynthSummary:
    """What `synthesize` wrote: counts are numbers of images unless the name says otherwise."""

    out_dir: Path
    labels_csv: Path
    num_images: int
    num_patients: int
    num_studies: int
    findings: dict[str, int]
    splits: dict[str, int]
    split_patients: dict[str, int]
    modalities: dict[str, int]
    photometrics: dict[str, int]
    transfer_syntaxes: dict[str, int]
    bits_stored: dict[int, int]
    seconds: float = field(default=0.0, compare=False)

    def one_line(self) -> str:
        findings = " ".join(f"{name}={count}" for name, count in self.findings.items())
        splits = " ".join(f"{name}={count}" for name, count in self.splits.items())
        return (
            f"synth: {self.num_images} images, {self.num_patients} patients, {self.num_studies} studies "
            f"in {self.seconds:.1f}s | findings {findings} | splits {splits} | {self.labels_csv}"
        )


def _cycle(rng: np.random.Generator, block: tuple, num: int) -> list:
    """`num` values: shuffled copies of `block` back to back (balanced, every value early)."""
    values: list = []
    while len(values) < num:
        values.extend(block[i] for i in rng.permutation(len(block)))
    return values[:num]


def _split_per_patient(rng: np.random.Generator, num_patients: int) -> list[str]:
    """~80/10/10 by patient. The first three patients take train, val and test in a seeded order, so
    even a tiny set has every split; later patients follow shuffled blocks of ten."""
    first = [str(name) for name in rng.permutation(["train", "val", "test"])] + ["train"] * 7
    return (first + _cycle(rng, SPLIT_BLOCK, max(0, num_patients - 10)))[:num_patients]


def plan_jobs(out_dir: Path, num_images: int, size: int, seed: int) -> list[ImageJob]:
    """Patients -> studies -> images, with every per-image attribute fixed up front (cheap)."""
    rng = np.random.default_rng([seed, 0])
    studies: list[tuple[int, int, int, datetime.date]] = []  # patient, study, num images, date
    patients: list[tuple[str, int, datetime.date]] = []  # sex, age at the first study, its date
    num_planned = 0
    while num_planned < num_images:
        patient_index = len(patients)
        date = datetime.date(2012, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3650)))
        patients.append((str(rng.choice(["F", "M"])), int(rng.integers(25, 86)), date))
        for study_index in range(int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))):
            num_in_study = 2 if rng.uniform() < 0.08 else 1  # a repeat exposure in the same study
            studies.append((patient_index, study_index, num_in_study, date))
            num_planned += num_in_study
            date += datetime.timedelta(days=int(rng.integers(14, 400)))
    splits = _split_per_patient(rng, len(patients))
    cycles = {
        name: _cycle(rng, block, num_images)
        for name, block in [
            ("modality", MODALITY_BLOCK),
            ("photometric", PHOTOMETRIC_BLOCK),
            ("bits_stored", BITS_BLOCK),
            ("syntax", SYNTAX_BLOCK),
            ("view", VIEW_BLOCK),
            ("narrow", SHAPE_BLOCK),
        ]
    }
    jobs = []
    for patient_index, study_index, num_in_study, date in studies:
        sex, first_age, first_date = patients[patient_index]
        patient_id = f"SYN{seed}-{patient_index:05d}"
        for instance in range(num_in_study):
            index = len(jobs)
            if index == num_images:
                break
            jobs.append(
                ImageJob(
                    index=index,
                    seed=seed,
                    size=size,
                    out_dir=out_dir,
                    patient_index=patient_index,
                    patient_id=patient_id,
                    patient_sex=sex,
                    patient_age=first_age + (date - first_date).days // 365,
                    study_index=study_index,
                    study_id=f"{patient_id}-s{study_index:02d}",
                    study_date=date.strftime("%Y%m%d"),
                    instance=instance,
                    split=splits[patient_index],
                    **{name: values[index] for name, values in cycles.items()},
                )
            )
    return jobs


def _side_name(sides: tuple[str, ...]) -> str:
    return "bilateral" if len(sides) == 2 else sides[0]


def study_report(findings: anatomy_lib.Findings, anatomy: anatomy_lib.Anatomy) -> str:
    """Templated radiology report ("FINDINGS: ... IMPRESSION: ...") naming every present finding."""
    text, impression = [], []
    if findings.ctr > 0.5:
        text.append(f"The heart is enlarged, cardiothoracic ratio {findings.ctr:.2f}.")
        impression.append("Cardiomegaly.")
    else:
        text.append("Heart size is normal.")
    text.append("The mediastinal contours are unremarkable.")
    if findings.consolidation_side:
        side = findings.consolidation_side
        zone = anatomy_lib.lung_zone(anatomy.lungs[side], findings.consolidation_centre[1])
        text.append(f"Patchy airspace consolidation in the {side} {zone} zone.")
        impression.append(f"{side.capitalize()} {zone} zone consolidation.")
    if findings.nodules:
        largest = max(findings.nodules, key=lambda n: n.radius)
        zone = anatomy_lib.lung_zone(anatomy.lungs[largest.side], largest.v)
        size_mm = round(2 * largest.radius * MM_PER_ANATOMY_UNIT)
        if len(findings.nodules) == 1:
            text.append(f"A {size_mm} mm pulmonary nodule in the {largest.side} {zone} zone.")
            impression.append("Pulmonary nodule.")
        else:
            text.append(
                f"{len(findings.nodules)} pulmonary nodules, the largest {size_mm} mm in the "
                f"{largest.side} {zone} zone."
            )
            impression.append("Multiple pulmonary nodules.")
    if not (findings.consolidation_side or findings.nodules):
        text.append("The lungs are clear.")
    if findings.effusion_sides:
        depth = findings.effusion_depth
        amount = "Small" if depth < 0.18 else ("Moderate" if depth < 0.24 else "Large")
        side = _side_name(findings.effusion_sides)
        plural = (
            "s blunting the costophrenic angles"
            if side == "bilateral"
            else " blunting the costophrenic angle"
        )
        text.append(f"{amount} {side} pleural effusion{plural}.")
        impression.append(f"{side.capitalize()} pleural effusion{'s' if side == 'bilateral' else ''}.")
    else:
        text.append("No pleural effusion.")
    if findings.pneumothorax_side:
        side = findings.pneumothorax_side
        amount = "Large" if findings.pneumothorax_gap > 0.22 else "Moderate"
        text.append(
            f"{amount} {side} pneumothorax with a visible pleural line and no lung markings beyond it."
        )
        impression.append(f"{side.capitalize()} pneumothorax.")
    else:
        text.append("No pneumothorax.")
    impression = impression or ["No acute cardiopulmonary abnormality."]
    return f"FINDINGS: {' '.join(text)} IMPRESSION: {' '.join(impression)}"


def _narrow_columns(size: int) -> int:
    """Columns of a narrower-than-square image: ~0.8 of `size`, a multiple of 16 (square below 64 px)."""
    return size if size < 64 else max(16, round(0.8 * size / 16) * 16)


def to_stored(brightness: np.ndarray, bits_stored: int, photometric: str, rng: np.random.Generator):
    """Brightness in [0, 1] (air dark) -> uint16 stored values in [0, 2**bits_stored - 1].

    Each image uses a different part of its range, as detectors do; MONOCHROME1 stores the inverse,
    so air is bright in stored values and dark once displayed."""
    max_value = 2**bits_stored - 1
    low = rng.uniform(0.01, 0.06) * max_value
    high = rng.uniform(0.8, 0.98) * max_value
    stored = np.rint(low + (high - low) * brightness).astype(np.uint16)
    return max_value - stored if photometric == "MONOCHROME1" else stored


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[UID_ROOT, *(str(p) for p in parts)])


def build_dataset(job: ImageJob, pixels: np.ndarray):
    """The DICOM dataset for one image (uncompressed pixel data; `_encode` compresses it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
    )

    sop_class = (
        ComputedRadiographyImageStorage if job.modality == "CR" else DigitalXRayImageStorageForPresentation
    )
    sop_instance = _uid(job.seed, job.size, job.index, "sop")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.StudyInstanceUID = _uid(job.seed, job.patient_index, job.study_index, "study")
    ds.SeriesInstanceUID = _uid(job.seed, job.size, job.index, "series")
    ds.PatientName = f"SYNTHETIC^{job.patient_id}"
    ds.PatientID, ds.PatientSex, ds.PatientAge = job.patient_id, job.patient_sex, f"{job.patient_age:03d}Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = job.study_date
    hour, minute = (
        8 + (job.patient_index + job.study_index) % 10,
        (7 * job.patient_index + 13 * job.study_index) % 60,
    )
    ds.StudyTime = f"{hour:02d}{minute:02d}00"
    ds.SeriesTime = ds.ContentTime = f"{hour:02d}{minute:02d}{10 * (job.instance + 1):02d}"
    ds.StudyID, ds.AccessionNumber = f"s{job.study_index:02d}", f"A{job.seed}{job.index:07d}"
    ds.SeriesNumber, ds.InstanceNumber = 1, job.instance + 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = job.modality, "CHEST", job.view
    ds.StudyDescription = f"XR CHEST {job.view}"
    ds.Manufacturer, ds.ManufacturerModelName = "xray_pretrain", "synthetic phantom"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if job.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    spacing = f"{0.143 * 2048 / job.size:.6f}"
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    monochrome1 = job.photometric == "MONOCHROME1"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1  # sign of (value vs. beam intensity)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, job.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, job.bits_stored, job.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    low, high = np.percentile(pixels, [1, 99])
    ds.WindowCenter, ds.WindowWidth = str(round((low + high) / 2)), str(max(1, round(high - low)))
    ds.VOILUTFunction = "LINEAR"
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    ds.PixelData = pixels.tobytes()
    return ds


def _encode(ds, pixels: np.ndarray, syntax: str) -> None:
    """Compress in place; the SOP Instance UID stays (lossless, and determinism needs it)."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    if syntax == "explicit":
        return
    uid = {"jpeg2000": JPEG2000Lossless, "rle": RLELossless}[syntax]
    ds.compress(uid, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)


def make_image(job: ImageJob) -> dict[str, str]:
    """Render, encode and write one image; returns its labels.csv row (plus format columns)."""
    anatomy = anatomy_lib.sample_anatomy(np.random.default_rng([job.seed, 1, job.patient_index]))
    study_rng = np.random.default_rng([job.seed, 2, job.patient_index, job.study_index])
    findings = anatomy_lib.sample_findings(study_rng, anatomy, FINDING_PROBABILITY)
    rng = np.random.default_rng([job.seed, 3, job.index])
    pose, exposure = anatomy_lib.sample_pose(rng), anatomy_lib.sample_exposure(rng)
    cols = _narrow_columns(job.size) if job.narrow else job.size
    brightness = anatomy_lib.render(anatomy, findings, pose, exposure, job.size, cols, job.view, rng)
    pixels = to_stored(brightness, job.bits_stored, job.photometric, rng)
    ds = build_dataset(job, pixels)
    _encode(ds, pixels, job.syntax)
    path = job.out_dir / job.rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    row = {"path": job.rel_path, "patient_id": job.patient_id, "study_id": job.study_id}
    row.update(view=job.view, split=job.split, **{k: str(v) for k, v in findings.labels().items()})
    row["report"] = study_report(findings, anatomy)
    return row


def _check_arguments(out_dir: Path, num_images: int, size: int, seed: int, num_workers: int) -> None:
    """Raise ValueError naming what to fix, before anything is written."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 32 <= size <= 8192:
        raise ValueError(f"size must be between 32 and 8192 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"output folder {out_dir} is not empty; pass a new or empty folder")


def _summarize(
    out_dir: Path, jobs: list[ImageJob], rows: list[dict[str, str]], seconds: float
) -> SynthSummary:
    split_patients = {name: len({j.patient_id for j in jobs if j.split == name}) for name in SPLITS}
    return SynthSummary(
        out_dir=out_dir,
        labels_csv=out_dir / "labels.csv",
        num_images=len(jobs),
        num_patients=len({j.patient_id for j in jobs}),
        num_studies=len({j.study_id for j in jobs}),
        findings={name: sum(int(r[name]) for r in rows) for name in FINDINGS},
        splits={name: sum(j.split == name for j in jobs) for name in SPLITS},
        split_patients=split_patients,
        modalities=dict(Counter(j.modality for j in jobs)),
        photometrics=dict(Counter(j.photometric for j in jobs)),
        transfer_syntaxes=dict(Counter(j.syntax for j in jobs)),
        bits_stored=dict(Counter(j.bits_stored for j in jobs)),
        seconds=seconds,
    )


def synthesize(
    out_dir: Path, num_images: int, size: int, seed: int, progress: bool = True, num_workers: int = 1
) -> SynthSummary:
    """Write `num_images` synthetic chest DICOMs (short side `size` px) and labels.csv into `out_dir`.

    `out_dir` must be new or empty. Same arguments -> byte-identical files, whatever `num_workers`.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    _check_arguments(out_dir, num_images, size, seed, num_workers)
    start = time.perf_counter()
    jobs = plan_jobs(out_dir, num_images, size, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with contextlib.ExitStack() as stack:
        results = map(make_image, jobs)
        if num_workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=num_workers))
            results = pool.map(make_image, jobs, chunksize=4)  # ordered, so rows stay in job order
        for row in tqdm(results, total=len(jobs), unit="img", desc="synth", disable=not progress):
            rows.append(row)
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABELS_HEADER, quoting=csv.QUOTE_MINIMAL)
        writer.writeheader()
        writer.writerows(rows)
    return _summarize(out_dir, jobs, rows, time.perf_counter() - start)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="new or empty output folder")
    parser.add_argument("--num", type=_at_least(1), required=True, help="number of images")
    parser.add_argument("--size", type=_at_least(32), default=512, help="short side in pixels (default 512)")
    parser.add_argument("--seed", type=_at_least(0), default=0, help="random seed (default 0)")
    parser.add_argument(
        "--num-workers",
        "--workers",
        dest="num_workers",
        type=_at_least(1),
        default=1,
        help="processes (same bytes for any value)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar (--no-progress hides it)",
    )


def run(args: argparse.Namespace) -> int:
    summary = synthesize(
        args.out, args.num, args.size, args.seed, progress=args.progress, num_workers=args.num_workers
    )
    print(summary.one_line())
    return 0
