"""`xray-shard synth`: real DICOM files, polarity, labels.csv, determinism, learnable findings, CLI."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from data_tools import cli, synth

FINDINGS = ("cardiomegaly", "pleural_effusion", "nodule", "pneumothorax", "consolidation")
HEADER = "path,patient_id,study_id,view,split," + ",".join(FINDINGS) + ",report"
# Words the IMPRESSION uses for each finding (checked both ways: present <=> mentioned).
IMPRESSION_WORDS = {
    "cardiomegaly": "cardiomegaly",
    "pleural_effusion": "pleural effusion",
    "nodule": "nodule",
    "pneumothorax": "pneumothorax",
    "consolidation": "consolidation",
}
NUM_TRAIN, NUM_TEST, SIZE = 800, 400, 64  # learnability: ~10 s to write, ~2 s to read on 2 cores


def read_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def display_pixels(ds) -> np.ndarray:
    """Stored values -> float with air dark (MONOCHROME1 inverted against 2**BitsStored - 1)."""
    pixels = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = (2**ds.BitsStored - 1) - pixels
    return pixels


def features_32(pixels: np.ndarray) -> np.ndarray:
    """Centre square crop, per-image min-max, 32x32 box average -> (1024,)."""
    from PIL import Image

    rows, cols = pixels.shape
    side = min(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2
    square = pixels[top : top + side, left : left + side]
    square = (square - square.min()) / (square.max() - square.min())
    return np.asarray(Image.fromarray(square.astype(np.float32), "F").resize((32, 32), Image.BOX)).ravel()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[Path, synth.SynthSummary, list[dict], list]]:
    """Two phantom sets from different seeds: rows of labels.csv and every file read back."""
    out = {}
    for name, num, seed in (("train", NUM_TRAIN, 11), ("test", NUM_TEST, 12)):
        root = tmp_path_factory.mktemp(f"synth_{name}")
        summary = synth.synthesize(root, num, SIZE, seed, progress=False)
        rows = read_rows(root)
        out[name] = (root, summary, rows, [pydicom.dcmread(root / row["path"]) for row in rows])
    return out


def test_files_are_real_dicom_with_the_promised_variety(datasets):
    root, _, rows, datasets_read = datasets["train"]
    seen = defaultdict(set)
    for row, ds in zip(rows, datasets_read):
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and pixels.shape == (ds.Rows, ds.Columns)
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0 and ds.HighBit == ds.BitsStored - 1
        assert pixels.max() <= 2**ds.BitsStored - 1  # fits BitsStored
        assert np.ptp(pixels) > 0.5 * 2**ds.BitsStored  # uses the range: an image, not a constant
        assert ds.PatientID == row["patient_id"] and ds.ViewPosition == row["view"]
        assert ds.BodyPartExamined == "CHEST" and ds.RescaleSlope == 1 and ds.RescaleIntercept == 0
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PixelSpacing",
                        "WindowCenter", "WindowWidth", "PatientSex", "StudyDate"):  # fmt: skip
            assert keyword in ds, keyword
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        expected_class = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}[ds.Modality]
        assert ds.SOPClassUID == expected_class
        if ds.Modality == "DX":
            assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert float(ds.PixelSpacing[0]) == pytest.approx(0.143 * 2048 / SIZE, rel=1e-4)
        seen["modality"].add(ds.Modality)
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["bits"].add(int(ds.BitsStored))
        seen["syntax"].add(ds.file_meta.TransferSyntaxUID.name)
        seen["shape"].add((ds.Rows, ds.Columns))
        seen["view"].add(ds.ViewPosition)
    assert seen["modality"] == {"CR", "DX"}
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["bits"] == {12, 14, 16}
    assert seen["syntax"] == {
        "Explicit VR Little Endian",
        "JPEG 2000 Image Compression (Lossless Only)",
        "RLE Lossless",
    }
    assert seen["shape"] == {(SIZE, SIZE), (SIZE, 48)}
    assert seen["view"] == {"PA", "AP"}
    assert len({ds.SOPInstanceUID for ds in datasets_read}) == len(rows)


def test_air_is_dark_after_the_photometric_rule(datasets):
    for _, _, _, datasets_read in datasets.values():
        for ds in datasets_read:
            pixels = display_pixels(ds)
            rows, cols = pixels.shape
            border = np.concatenate([pixels[:, : cols // 16].ravel(), pixels[:, -(cols // 16) :].ravel()])
            centre = pixels[rows // 3 : 2 * rows // 3, cols // 2 - cols // 8 : cols // 2 + cols // 8]
            assert border.mean() < 0.5 * centre.mean(), ds.PhotometricInterpretation


def test_labels_csv_rows_paths_splits_and_reports(datasets):
    root, summary, rows, _ = datasets["train"]
    assert (root / "labels.csv").read_text(encoding="utf-8").splitlines()[0] == HEADER
    assert len(rows) == NUM_TRAIN == summary.num_images == len(list(root.glob("images/*/*/*.dcm")))
    assert all(None not in row and (root / row["path"]).is_file() for row in rows)  # commas round-trip
    assert any("," in row["report"] for row in rows)

    split_of = defaultdict(set)
    for row in rows:
        split_of[row["patient_id"]].add(row["split"])
    assert all(len(splits) == 1 for splits in split_of.values()), "a patient in two splits"
    patients_per_split = {
        name: sum(s == {name} for s in split_of.values()) for name in ("train", "val", "test")
    }
    assert patients_per_split == summary.split_patients
    assert 0.75 <= patients_per_split["train"] / len(split_of) <= 0.85
    assert min(patients_per_split["val"], patients_per_split["test"]) >= 0.08 * len(split_of)

    studies_per_patient = defaultdict(set)
    by_study = defaultdict(list)
    for row in rows:
        studies_per_patient[row["patient_id"]].add(row["study_id"])
        by_study[row["study_id"]].append(row)
    assert max(len(s) for s in studies_per_patient.values()) >= 3
    assert max(len(r) for r in by_study.values()) == 2  # repeat exposures share labels and report
    for study_rows in by_study.values():
        assert len({tuple(r[f] for f in (*FINDINGS, "report")) for r in study_rows}) == 1

    for row in rows:
        report = row["report"]
        assert report.startswith("FINDINGS: ") and " IMPRESSION: " in report
        impression = report.split(" IMPRESSION: ")[1].lower()
        for name in FINDINGS:
            assert row[name] in ("0", "1")
            assert (IMPRESSION_WORDS[name] in impression) == (row[name] == "1"), (name, report)
        if not any(row[name] == "1" for name in FINDINGS):
            assert impression == "no acute cardiopulmonary abnormality."
    assert summary.findings == {name: sum(row[name] == "1" for row in rows) for name in FINDINGS}
    for name in FINDINGS:  # each finding independently present ~35% of the time
        assert 0.25 <= summary.findings[name] / NUM_TRAIN <= 0.45, name


def test_every_finding_is_learnable_by_logistic_regression(datasets):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = {name: np.stack([features_32(display_pixels(ds)) for ds in d[3]]) for name, d in datasets.items()}
    y = {name: {f: np.array([int(r[f]) for r in d[2]]) for f in FINDINGS} for name, d in datasets.items()}
    aurocs = {}
    for finding in FINDINGS:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
        model.fit(x["train"], y["train"][finding])
        aurocs[finding] = roc_auc_score(y["test"][finding], model.predict_proba(x["test"])[:, 1])
    print("held-out AUROC (train seed 11, test seed 12):", {k: round(v, 3) for k, v in aurocs.items()})
    assert all(value >= 0.8 for value in aurocs.values()), aurocs


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(tmp_path):
    runs = {
        "a": (7, 1),
        "b": (7, 1),
        "workers": (7, 2),
        "other_seed": (8, 1),
    }
    digests = {}
    for name, (seed, num_workers) in runs.items():
        synth.synthesize(tmp_path / name, 12, SIZE, seed, progress=False, num_workers=num_workers)
        digests[name] = _digests(tmp_path / name)
    assert len(digests["a"]) == 13  # 12 images + labels.csv
    assert digests["a"] == digests["b"] == digests["workers"]
    assert not set(digests["a"].values()) & set(digests["other_seed"].values())


def test_small_sets_still_cover_every_split_and_format(tmp_path):
    summary = synth.synthesize(tmp_path / "tiny", 8, 64, 3, progress=False)
    assert set(summary.splits) == {"train", "val", "test"} and min(summary.split_patients.values()) >= 1
    assert set(summary.transfer_syntaxes) == {"explicit", "jpeg2000", "rle"}
    assert set(summary.photometrics) == {"MONOCHROME1", "MONOCHROME2"}
    assert set(summary.modalities) == {"CR", "DX"} and set(summary.bits_stored) == {12, 14, 16}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0}, "num_images must be >= 1"),
        ({"size": 16}, "size must be between 32 and 8192"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"num_workers": 0}, "num_workers must be >= 1"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, kwargs, message):
    arguments = {"out_dir": tmp_path / "out", "num_images": 4, "size": 64, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        synth.synthesize(progress=False, **arguments)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(ValueError, match="is not empty"):
        synth.synthesize(tmp_path, 4, 64, 0, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_writes_labels_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["synth", "--out", str(out), "--num", "8", "--size", "64", "--seed", "0"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(read_rows(out)) == 8
    assert printed.startswith("synth: 8 images") and str(out / "labels.csv") in printed
    assert "cardiomegaly=" in printed and "train=" in printed

    assert cli.main(["synth", "--out", str(out), "--num", "8", "--size", "64"]) == 2  # not empty now
    assert "is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["synth", "--out", str(tmp_path / "x"), "--num", "0"])
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
