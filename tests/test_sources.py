"""Dataset source adapters: every image file accounted for, labels mapped, splits by patient, views and
reports parsed. Fixtures are written in each dataset's own CSV/JSON layout inside tmp_path; the
`corpus` tests run the adapters on real headers, rows and images from ../shared/cxr-corpus."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools import labels as label_table
from data_tools.labels import LABEL_NAMES
from data_tools.records import Record, Skip, split_for_patient
from data_tools.sources import get_source
from data_tools.sources._common import normalize_view, resolve_patient_splits
from data_tools.sources.mimic_cxr_jpg import parse_report

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "cxr-corpus"
ADAPTERS = (
    "nih-cxr14",
    "chexpert",
    "mimic-cxr-jpg",
    "mimic-cxr",
    "padchest",
    "vindr-cxr",
    "rsna-pneumonia",
    "iu-xray",
    "covid-cxr",
)
IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


# ---------------------------------------------------------------- fixture writers and checks


def write_png(path: Path, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(size * size, dtype=np.uint8).reshape(size, size)).save(path)
    return path


def write_jpg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 100, dtype=np.uint8)).save(path, quality=90)
    return path


def write_dicom(path: Path, **attributes) -> Path:
    """A tiny valid 8x8 MONOCHROME2 DICOM with the given header attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", 8, 8, 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    """One line each, newline-terminated; gzip-compressed when the name ends in .gz (as MIMIC ships)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run(source: str, input_dir: Path, **options) -> tuple[dict[str, Record], dict[str, Skip]]:
    """Iterate an adapter with only its own options and `check_contract` the result; returns (records,
    skips) keyed by source_id."""
    module = get_source(source)
    records: dict[str, Record] = {}
    skips: dict[str, Skip] = {}
    for item in module.iter_records(input_dir, argparse.Namespace(**options)):
        assert item.source_id not in records and item.source_id not in skips, item.source_id
        (records if isinstance(item, Record) else skips)[item.source_id] = item
    assert module.label_names(input_dir, argparse.Namespace(**options)) == list(LABEL_NAMES)
    check_contract(records, skips, input_dir, source)
    return records, skips


def image_files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_FILE_SUFFIXES
    }


def check_contract(records: dict[str, Record], skips: dict[str, Skip], root: Path, dataset: str) -> None:
    """Every image file on disk is exactly one record or skip; records are complete and patient-split."""
    assert set(records) | set(skips) == image_files(root)
    assert len(records) + len(skips) == len(image_files(root))
    split_of_patient: dict[str, str] = {}
    for source_id, record in records.items():
        assert record.dataset == dataset and record.source_path == root / source_id
        assert list(record.labels) == list(LABEL_NAMES)
        assert all(v in (None, 0.0, 1.0, -1.0) for v in record.labels.values())
        assert record.split in ("train", "val", "test") and record.patient_id
        assert split_of_patient.setdefault(record.patient_id, record.split) == record.split, record.patient_id
    for skip in skips.values():
        assert skip.dataset == dataset and skip.reason


def targets_of(mapping: dict) -> set[str]:
    return {target for targets in mapping.values() for target in targets}


def nonnull(labels: dict) -> dict:
    return {name: value for name, value in labels.items() if value is not None}


# ---------------------------------------------------------------- vocabulary, docs, shared helpers


def test_vocabulary_holds_every_dataset_label_and_the_phantom_names():
    assert len(set(LABEL_NAMES)) == len(LABEL_NAMES)
    assert all(name == name.lower() and " " not in name for name in LABEL_NAMES)
    for name in ("cardiomegaly", "pleural_effusion", "nodule", "pneumothorax", "consolidation"):
        assert name in LABEL_NAMES
    assert len(label_table.CHEXPERT) == 14 and len(label_table.NIH_CXR14) == 15  # + No Finding
    vindr = set(label_table.VINDR_CXR) - {"Other disease"}
    assert len(vindr) == 22 + 6
    assert set(label_table.VINDR_KAGGLE_CLASSES) <= vindr
    for mapping in label_table.DATASET_LABEL_MAPS.values():
        assert all(t in LABEL_NAMES for targets in mapping.values() for t in targets)
    with pytest.raises(ValueError, match="not in LABEL_NAMES"):
        label_table.check_label_map({"Foo": ("no_such_label",)})


def test_docs_labels_md_is_generated_from_the_dicts():
    text = (REPO / "docs" / "labels.md").read_text()
    assert text == label_table.render_markdown(), "regenerate: python -m data_tools.labels > docs/labels.md"
    assert "| `Effusion` | `pleural_effusion` |" in text


def test_label_combination_rules():
    values = label_table.map_values(
        label_table.CHEXPERT, {"Cardiomegaly": -1.0, "Edema": None, "Fracture": 0.0}
    )
    assert nonnull(values) == {"cardiomegaly": -1.0, "fracture": 0.0}
    # Two source labels feeding one name: present beats absent, uncertain beats absent.
    both, unmapped = label_table.map_findings(label_table.NIH_CXR14, ["Nodule", "Bogus"])
    assert both["nodule_mass"] == 1.0 and both["mass"] == 0.0 and unmapped == ["Bogus"]
    with pytest.raises(ValueError, match="expected 1, 0, -1"):
        label_table.map_values(label_table.CHEXPERT, {"Edema": 2.0})


def test_normalize_view():
    cases = {"PA": "PA", "postero-anterior": "PA", "AP Supine": "AP", "AP_horizontal": "AP", "L": "LATERAL"}
    cases |= {"Lateral": "LATERAL", "LL": "LL", "AP AXIAL": "AP_AXIAL", "": None, "UNK": None, None: None}
    assert {raw: normalize_view(raw) for raw in cases} == cases


def test_resolve_patient_splits_puts_each_patient_in_one_split():
    official = {"a1": "train", "a2": "test", "b1": "train", "c1": None, "c2": "val", "d1": None}
    patient_of = {"a1": "A", "a2": "A", "b1": "B", "c1": "C", "c2": "C", "d1": "D"}
    splits, num_conflicts = resolve_patient_splits(official, patient_of)
    assert num_conflicts == 1
    assert splits["a1"] == splits["a2"] == "test" and splits["b1"] == "train"
    assert splits["c1"] == splits["c2"] == "val"  # an unlisted image follows its patient
    assert splits["d1"] == split_for_patient("D")
    carved, _ = resolve_patient_splits(
        {f"i{i}": "train" for i in range(200)},
        {f"i{i}": f"p{i}" for i in range(200)},
        {"train": 0.9, "val": 0.1},
    )
    assert set(carved.values()) == {"train", "val"} and 5 <= list(carved.values()).count("val") <= 40


def test_all_adapter_options_fit_on_one_parser():
    parser = argparse.ArgumentParser()
    for name in ADAPTERS:
        module = get_source(name)
        assert name == module.DATASET
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args(["--mimic-reports", "r", "--nih-csv", "x.csv", "--iu-annotation", "a.json"])
    assert (args.mimic_reports, args.nih_csv, args.mimic_labels, args.padchest_csv) == (
        "r",
        "x.csv",
        "chexpert",
        None,
    )


# ---------------------------------------------------------------- NIH ChestX-ray14

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def make_nih(root: Path, lists: bool = True) -> None:
    rows = [
        "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
        "00000001_001.png,Effusion|Mass,1,1,58,M,AP,2894,2729,0.143,0.143",
        "00000002_000.png,No Finding,0,2,080Y,F,PA,2500,2048,0.171,0.171",
        "00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143",
        "00000003_001.png,Hernia,1,3,81,F,PA,2582,2991,0.143,0.143",
        "00000004_000.png,Nodule,0,4,50,M,PA,2500,2048,0.168,0.168",
        "00000009_000.png,No Finding,0,9,30,M,PA,2500,2048,0.168,0.168",  # not on disk
    ]
    write_lines(root / "Data_Entry_2017_v2020.csv", [NIH_HEADER, *rows])
    for name in ("00000001_000", "00000001_001", "00000002_000", "00000004_000"):
        write_png(root / "images_001" / "images" / f"{name}.png")
    write_png(root / "images_002" / "images" / "00000003_000.png")
    write_png(root / "images_002" / "images" / "00000003_001.png")
    write_png(root / "images_002" / "images" / "00000099_000.png")  # not in the CSV
    write_png(root / "extra" / "00000002_000.png")  # same name as a listed file
    if lists:
        # Patient 3 sits in both lists (a conflict); 00000004_000 is in neither.
        write_text(
            root / "train_val_list.txt",
            "00000001_000.png\n00000001_001.png\n00000002_000.png\n00000003_000.png\n",
        )
        write_text(root / "test_list.txt", "00000003_001.png\n")


def test_nih_records_labels_and_official_splits(tmp_path, caplog):
    make_nih(tmp_path)
    with caplog.at_level(logging.WARNING):
        records, skips = run("nih-cxr14", tmp_path)
    assert len(records) == 6 and len(skips) == 2
    assert skips["images_002/images/00000099_000.png"].reason == "not listed in Data_Entry_2017_v2020.csv"
    # Files are read in sorted order, so extra/ holds the row and the images_001 copy is the duplicate.
    duplicate = skips["images_001/images/00000002_000.png"].reason
    assert duplicate == "same file name as extra/00000002_000.png, which holds this CSV row"
    record = records["images_001/images/00000001_001.png"]
    assert nonnull(record.labels) == {
        **dict.fromkeys(targets_of(label_table.NIH_CXR14), 0.0),
        "pleural_effusion": 1.0,
        "mass": 1.0,
        "nodule_mass": 1.0,
    }
    assert record.view == "AP" and record.patient_id == "1" and record.study_id == "00000001_001"
    assert record.extra == {
        "age": 58,
        "sex": "M",
        "follow_up": 1,
        "original_size": [2729, 2894],
        "original_pixel_spacing": [0.143, 0.143],
    }
    by_name = {Path(k).name: r for k, r in records.items()}
    assert by_name["00000002_000.png"].extra["age"] == 80
    assert by_name["00000003_000.png"].split == by_name["00000003_001.png"].split == "test"
    assert by_name["00000001_000.png"].split in ("train", "val")
    assert "1 entries of Data_Entry_2017_v2020.csv have no image" in caplog.text
    assert "1 patients have images in several official splits" in caplog.text


def test_nih_without_lists_and_with_one_list(tmp_path):
    make_nih(tmp_path, lists=False)
    records, skips = run("nih-cxr14", tmp_path)
    write_text(tmp_path / "test_list.txt", "00000003_001.png\n")
    with pytest.raises(ValueError, match="no train_val_list.txt"):
        run("nih-cxr14", tmp_path)
    write_text(tmp_path / "Data_Entry_2017.csv", NIH_HEADER + "\n")
    with pytest.raises(ValueError, match="--nih-csv"):
        run("nih-cxr14", tmp_path)


# ---------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
# Rows copied from the real CheXpert-v1.0-small train.csv (cxr-corpus snippet).
CHEXPERT_TRAIN_ROWS = """\
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,
CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg,Female,20,Frontal,PA,1.0,0.0,,,,,0.0,,,,0.0,,,
CheXpert-v1.0-small/train/patient00005/study1/view1_frontal.jpg,Male,33,Frontal,PA,1.0,,0.0,,,,0.0,,,,0.0,,,1.0
"""


def make_chexpert(root: Path) -> Path:
    folder = (
        root / "chexpert-renamed"
    )  # the CSV Paths say CheXpert-v1.0-small: the folder name must not matter
    valid_rows = [
        "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,"
        "0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0",
        # patient00005 also in valid.csv: a conflict, so all of patient00005 goes to val
        "CheXpert-v1.0-small/valid/patient00005/study9/view1_frontal.jpg,Male,35,Frontal,PA,1.0,0.0,0.0,0.0,0.0,"
        "0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
    ]
    write_text(folder / "train.csv", CHEXPERT_HEADER + "\n" + CHEXPERT_TRAIN_ROWS)
    write_lines(folder / "valid.csv", [CHEXPERT_HEADER, *valid_rows])
    for line in [*CHEXPERT_TRAIN_ROWS.splitlines()[:-1], *valid_rows]:  # the last train row has no image
        write_jpg(folder / line.split(",")[0].split("/", 1)[1])
    write_jpg(folder / "test" / "patient64741" / "study1" / "view1_frontal.jpg")  # in neither CSV
    return folder


def test_chexpert_labels_keep_uncertain_and_unknown(tmp_path, caplog):
    folder = make_chexpert(tmp_path)
    with caplog.at_level(logging.WARNING):
        records, skips = run("chexpert", tmp_path)
    assert len(records) == 6 and list(skips) == [
        "chexpert-renamed/test/patient64741/study1/view1_frontal.jpg"
    ]
    assert skips[next(iter(skips))].reason == "not listed in train.csv / valid.csv"
    uncertain = records["chexpert-renamed/train/patient00002/study2/view1_frontal.jpg"]
    assert nonnull(uncertain.labels) == {
        "cardiomegaly": -1.0,
        "lung_opacity": 1.0,
        "edema": -1.0,
        "consolidation": -1.0,
        "atelectasis": -1.0,
        "pleural_effusion": -1.0,
        "fracture": 1.0,
    }
    assert uncertain.labels["no_finding"] is None and uncertain.labels["pneumothorax"] is None
    assert uncertain.patient_id == "patient00002" and uncertain.study_id == "patient00002/study2"
    assert uncertain.view == "AP" and uncertain.extra == {"age": 87, "sex": "F"}
    normal = records["chexpert-renamed/train/patient00001/study1/view1_frontal.jpg"]
    assert nonnull(normal.labels) == {"no_finding": 1.0, "pneumothorax": 0.0, "support_devices": 1.0}
    assert records["chexpert-renamed/train/patient00002/study1/view2_lateral.jpg"].view == "LATERAL"
    splits = {r.patient_id: r.split for r in records.values()}
    assert splits == {
        "patient00001": "train",
        "patient00002": "train",
        "patient00004": "train",
        "patient00005": "val",
        "patient64541": "val",
    }
    assert "1 entries of train.csv / valid.csv have no image" in caplog.text
    (folder / "train.csv").write_text(
        CHEXPERT_HEADER + "\n" + CHEXPERT_TRAIN_ROWS.replace("-1.0,1.0,", "-1.0,2.0,")
    )
    with pytest.raises(ValueError, match=r"train.csv:3 Lung Opacity: label value '2.0'"):
        run("chexpert", tmp_path)


# ---------------------------------------------------------------- MIMIC-CXR (JPG and DICOM)

MIMIC_METADATA_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
    "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
MIMIC_LABEL_HEADER = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
    "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices"
)
MIMIC_REPORT = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
# (dicom_id, subject, study, view, on disk)
MIMIC_IMAGES = [
    ("d1-pa", "10000032", "50414267", "PA", True),
    ("d2-lat", "10000032", "50414267", "LATERAL", True),
    ("d3-ap", "10000032", "53189527", "AP", True),
    ("d4-ap", "10000764", "57375967", "AP", True),
    ("d5-missing", "10000898", "50771383", "PA", False),
]


def make_mimic_csvs(folder: Path) -> None:
    meta_rows = [
        f"{d},{subj},{study},CHEST (PA AND LAT),{view},3056,2544,21800506,213014.531,,,"
        for d, subj, study, view, _ in MIMIC_IMAGES
    ]
    write_lines(folder / "mimic-cxr-2.0.0-metadata.csv.gz", [MIMIC_METADATA_HEADER, *meta_rows])
    chexpert = [
        "10000032,50414267,,,,,,,,,1.0,,,,,",  # No Finding
        "10000032,53189527,1.0,-1.0,,0.0,,,,1.0,,1.0,,,0.0,1.0",
    ]  # study 57375967 has no label row: all unknown
    write_lines(folder / "mimic-cxr-2.0.0-chexpert.csv", [MIMIC_LABEL_HEADER, *chexpert])
    write_text(
        folder / "mimic-cxr-2.0.0-negbio.csv", MIMIC_LABEL_HEADER + "\n10000032,50414267,1.0,,,,,,,,,,,,,\n"
    )
    split = [
        "dicom_id,study_id,subject_id,split",
        "d1-pa,50414267,10000032,train",
        "d2-lat,50414267,10000032,train",
    ]
    split += ["d3-ap,53189527,10000032,test", "d4-ap,57375967,10000764,validate"]
    write_lines(folder / "mimic-cxr-2.0.0-split.csv", split)


def mimic_image_path(root: Path, dicom_id: str, subject: str, study: str, suffix: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}{suffix}"


def test_parse_mimic_report_sections():
    report = parse_report(MIMIC_REPORT)
    assert report == {
        "findings": "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular "
        "opacities that most likely represent nipple shadows.",
        "impression": "No acute cardiopulmonary process.",
    }
    assert parse_report("FINDINGS AND IMPRESSION: Clear lungs.\n") == {
        "findings": "Clear lungs.",
        "impression": "",
    }
    no_sections = "   FINAL REPORT\n\n PA and lateral views.\n\n Heart size is normal.\n  Lungs clear.\n"
    assert parse_report(no_sections) == {"findings": "Heart size is normal. Lungs clear.", "impression": ""}
    assert parse_report("  \n") is None


def test_mimic_cxr_jpg_labels_splits_reports(tmp_path, caplog):
    make_mimic_csvs(tmp_path)
    for dicom_id, subject, study, _, on_disk in MIMIC_IMAGES:
        if on_disk:
            write_jpg(mimic_image_path(tmp_path, dicom_id, subject, study, ".jpg"))
    write_jpg(mimic_image_path(tmp_path, "d9-unlisted", "10000032", "50414267", ".jpg"))
    reports = tmp_path / "reports"
    write_text(reports / "files" / "p10" / "p10000032" / "s50414267.txt", MIMIC_REPORT)
    with caplog.at_level(logging.WARNING):
        records, skips = run("mimic-cxr-jpg", tmp_path, mimic_reports=str(reports))
    by_id = {Path(k).stem: r for k, r in records.items()}
    assert sorted(by_id) == ["d1-pa", "d2-lat", "d3-ap", "d4-ap"]
    assert [s.reason for s in skips.values()] == ["not listed in mimic-cxr-2.0.0-metadata.csv.gz"]
    assert nonnull(by_id["d1-pa"].labels) == {"no_finding": 1.0}
    assert nonnull(by_id["d3-ap"].labels) == {
        "atelectasis": 1.0,
        "cardiomegaly": -1.0,
        "edema": 0.0,
        "lung_opacity": 1.0,
        "pleural_effusion": 1.0,
        "pneumothorax": 0.0,
        "support_devices": 1.0,
    }
    assert nonnull(by_id["d4-ap"].labels) == {}
    assert (by_id["d1-pa"].view, by_id["d2-lat"].view, by_id["d3-ap"].view) == ("PA", "LATERAL", "AP")
    # Subject 10000032 has a test study: all of their images go to test. validate -> val.
    assert [by_id[d].split for d in ("d1-pa", "d2-lat", "d3-ap", "d4-ap")] == ["test", "test", "test", "val"]
    assert by_id["d1-pa"].report == parse_report(MIMIC_REPORT) and by_id["d3-ap"].report is None
    assert (by_id["d1-pa"].patient_id, by_id["d1-pa"].study_id) == ("10000032", "50414267")
    assert "1 entries of mimic-cxr-2.0.0-metadata.csv.gz have no image" in caplog.text
    assert "2 studies have no report" in caplog.text
    negbio, _ = run("mimic-cxr-jpg", tmp_path, mimic_labels="negbio")
    assert nonnull(negbio["files/p10/p10000032/s50414267/d1-pa.jpg"].labels) == {"atelectasis": 1.0}
    with pytest.raises(ValueError, match="--mimic-reports .*: no such folder"):
        run("mimic-cxr-jpg", tmp_path, mimic_reports=str(tmp_path / "nope"))


def test_mimic_cxr_dicom_with_and_without_jpg_csvs(tmp_path):
    data = tmp_path / "mimic-cxr"
    for dicom_id, subject, study, view, on_disk in MIMIC_IMAGES:
        if on_disk:
            write_dicom(mimic_image_path(data, dicom_id, subject, study, ".dcm"), ViewPosition=view)
    write_text(
        data / "files" / "p10" / "p10000032" / "s50414267.txt", MIMIC_REPORT
    )  # reports beside the studies
    write_dicom(data / "stray" / "x.dcm", ViewPosition="PA")
    records, skips = run("mimic-cxr", data)
    assert [s.reason for s in skips.values()] == ["path is not files/pNN/pSUBJECT/sSTUDY/*.dcm"]
    by_id = {Path(k).stem: r for k, r in records.items()}
    assert {d: r.view for d, r in by_id.items()} == {
        "d1-pa": "PA",
        "d2-lat": "LATERAL",
        "d3-ap": "AP",
        "d4-ap": "AP",
    }
    assert by_id["d2-lat"].report["impression"] == "No acute cardiopulmonary process."
    assert all(nonnull(r.labels) == {} for r in records.values())
    make_mimic_csvs(tmp_path / "jpg-csvs")
    records, skips = run("mimic-cxr", data, mimic_csv_dir=str(tmp_path / "jpg-csvs"))
    assert [s.reason for s in skips.values()] == ["not listed in mimic-cxr-2.0.0-metadata.csv.gz"]
    assert records["files/p10/p10000764/s57375967/d4-ap.dcm"].split == "val"
    assert records["files/p10/p10000032/s53189527/d3-ap.dcm"].labels["support_devices"] == 1.0
    with pytest.raises(ValueError, match="--mimic-labels negbio needs --mimic-csv-dir"):
        run("mimic-cxr", data, mimic_labels="negbio")


# ---------------------------------------------------------------- PadChest

# Column names from the BIMCV README (the real CSV's order is unverified), with its unnamed index column.
PADCHEST_HEADER = (
    ",ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,"
    "Projection,MethodProjection,Pediatric,Modality_DICOM,Report,MethodLabel,Labels,Localizations"
)


def test_padchest_labels_views_and_patient_splits(tmp_path):
    rows = [
        "0,a_01.png,0,20140915,S1,P1,1948.0,M,POSTEROANTERIOR,PA,Manual,No,CR,cardiomegalia derram,Physician,"
        "\"['pleural effusion', ' cardiomegaly']\",\"['loc right']\"",
        "1,a_02.png,0,20140915,S1,P1,1948.0,M,LATERAL,L,Manual,No,CR,,Physician,\"['normal']\",[]",
        "2,b_01.png,1,20150101,S2,P2,1960,F,,AP_horizontal,Manual,No,CR,,RNN_model,\"['nsg tube', 'exclude']\",[]",
        "3,c_01.png,1,20150101,S3,P3,1970,F,ANTEROPOSTERIOR,UNK,Manual,No,CR,,RNN_model,,[]",
        "4,d_01.png,1,20150101,S4,P4,1970,F,,PA,Manual,No,CR,,RNN_model,\"['normal']\",[]",  # not on disk
    ]
    write_lines(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", [PADCHEST_HEADER, *rows])
    for folder, name in [
        ("0", "a_01.png"),
        ("0", "a_02.png"),
        ("1", "b_01.png"),
        ("1", "c_01.png"),
        ("2", "z.png"),
    ]:
        write_png(tmp_path / folder / name)
    records, skips = run("padchest", tmp_path)
    assert list(skips) == ["2/z.png"]
    covered = dict.fromkeys(targets_of(label_table.PADCHEST), 0.0)
    assert nonnull(records["0/a_01.png"].labels) == {**covered, "pleural_effusion": 1.0, "cardiomegaly": 1.0}
    assert records["0/a_02.png"].labels["no_finding"] == 1.0 and records["0/a_02.png"].view == "LATERAL"
    assert nonnull(records["1/b_01.png"].labels) == {**covered, "support_devices": 1.0}
    assert nonnull(records["1/c_01.png"].labels) == {}  # blank Labels: unknown, not absent
    assert records["0/a_01.png"].split == records["0/a_02.png"].split
    assert records["0/a_01.png"].extra == {"sex": "M", "age": 66, "label_method": "Physician"}
    assert records["1/b_01.png"].view == "AP" and records["1/b_01.png"].extra["supine"] is True
    assert records["1/c_01.png"].view == "AP"  # Projection UNK: falls back to ViewPosition_DICOM
    assert (records["0/a_01.png"].patient_id, records["0/a_01.png"].study_id) == ("P1", "S1")


# ---------------------------------------------------------------- VinDr-CXR

VINDR_COLUMNS = [
    *list(label_table.VINDR_CXR)[:22],
    "COPD",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
    "Other diseases",
    "No finding",
]


def vindr_row(image_id: str, rad: str, positives: set[str], columns: list[str]) -> str:
    return ",".join([image_id, rad, *("1" if c in positives else "0" for c in columns)])


def test_vindr_physionet_majority_vote_and_official_split(tmp_path):
    train_rows = [
        vindr_row("img1", "R1", {"Cardiomegaly", "Aortic enlargement"}, VINDR_COLUMNS),
        vindr_row("img1", "R2", {"Cardiomegaly"}, VINDR_COLUMNS),
        vindr_row("img1", "R3", set(), VINDR_COLUMNS),
        vindr_row("img2", "R1", {"No finding"}, VINDR_COLUMNS),
        vindr_row("img2", "R2", {"No finding"}, VINDR_COLUMNS),
        vindr_row("img2", "R3", {"No finding"}, VINDR_COLUMNS),
        vindr_row("img9", "R1", {"No finding"}, VINDR_COLUMNS),  # no image on disk
    ]
    test_columns = [*VINDR_COLUMNS[:26], "Other disease", "No finding"]  # the test file's spelling
    test_rows = [vindr_row("img3", "R11", {"Other disease", "Lung tumor"}, test_columns)]
    annotations = tmp_path / "annotations"
    write_lines(
        annotations / "image_labels_train.csv",
        [",".join(["image_id", "rad_id", *VINDR_COLUMNS]), *train_rows],
    )
    write_lines(
        annotations / "image_labels_test.csv", [",".join(["image_id", "rad_id", *test_columns]), *test_rows]
    )
    write_dicom(tmp_path / "train" / "img1.dicom", ViewPosition="PA")
    write_dicom(tmp_path / "train" / "img2.dicom")
    write_dicom(tmp_path / "test" / "img3.dicom", ViewPosition="AP")
    write_dicom(tmp_path / "test" / "img4.dicom")  # in no label file
    write_png(tmp_path / "train" / "img2.png")  # a second copy of img2, read after the .dicom
    records, skips = run("vindr-cxr", tmp_path)
    assert skips["test/img4.dicom"].reason == "not listed in image_labels_train.csv / image_labels_test.csv"
    assert skips["train/img2.png"].reason == "image_id img2 is already read from train/img2.dicom"
    img1 = records["train/img1.dicom"]
    assert img1.labels["cardiomegaly"] == 1.0 and img1.labels["aortic_enlargement"] == -1.0
    assert img1.labels["pleural_effusion"] == 0.0 and img1.labels["no_finding"] == 0.0
    assert img1.labels["covid_19"] is None and img1.labels["support_devices"] is None
    assert records["train/img2.dicom"].labels["no_finding"] == 1.0
    img3 = records["test/img3.dicom"]
    assert img3.labels["other_diseases"] == 1.0 and img3.labels["lung_tumor"] == 1.0 and img3.split == "test"
    assert (img1.split, img1.view, img3.view, records["train/img2.dicom"].view) == ("train", "PA", "AP", None)
    assert img1.patient_id == "img1"


def test_vindr_kaggle_layout(tmp_path):
    rows = [
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max",
        "k1,Cardiomegaly,3,R10,691.0,1375.0,1653.0,1831.0",
        "k1,Nodule/Mass,8,R10,557.0,2352.0,675.0,2484.0",
        "k1,Cardiomegaly,3,R8,680.0,1370.0,1650.0,1830.0",
        "k1,No finding,14,R9,,,,",
    ]
    write_lines(tmp_path / "train.csv", rows)
    write_dicom(tmp_path / "train" / "k1.dicom")
    write_dicom(tmp_path / "test" / "t1.dicom")  # Kaggle test images have no labels
    records, skips = run("vindr-cxr", tmp_path)
    assert list(records) == ["train/k1.dicom"] and skips["test/t1.dicom"].reason == "not listed in train.csv"
    k1 = records["train/k1.dicom"].labels
    assert (k1["cardiomegaly"], k1["nodule_mass"], k1["no_finding"], k1["pneumothorax"]) == (
        1.0,
        -1.0,
        -1.0,
        0.0,
    )
    assert k1["clavicle_fracture"] is None and k1["copd"] is None  # not annotated in the Kaggle layout
    write_text(tmp_path / "train.csv", rows[0] + "\nk1,Bogus,99,R1,,,,\n")
    with pytest.raises(ValueError, match="unknown class_name 'Bogus'"):
        run("vindr-cxr", tmp_path)


# ---------------------------------------------------------------- RSNA Pneumonia

RSNA_HEADER = "patientId,x,y,width,height,Target"


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # real RSNA files say "43", not "043Y"
def test_rsna_labels_boxes_and_header_fields(tmp_path, caplog):
    rows = [
        "aaa,,,,,0",
        "bbb,264.0,152.0,213.0,379.0,1",
        "bbb,562.0,152.0,256.0,453.0,1",
        "ccc,,,,,0",
        "zzz,,,,,0",  # no image
    ]
    write_lines(tmp_path / "stage_2_train_labels.csv", [RSNA_HEADER, *rows])
    write_dicom(
        tmp_path / "stage_2_train_images" / "aaa.dcm", ViewPosition="PA", PatientSex="F", PatientAge="43"
    )
    write_dicom(
        tmp_path / "stage_2_train_images" / "bbb.dcm", ViewPosition="AP", PatientSex="M", PatientAge="48"
    )
    write_dicom(tmp_path / "stage_2_train_images" / "ccc.dcm", ViewPosition="PA")
    write_dicom(tmp_path / "stage_2_test_images" / "ttt.dcm", ViewPosition="PA")
    with caplog.at_level(logging.WARNING):
        records, skips = run("rsna-pneumonia", tmp_path)
    assert skips["stage_2_test_images/ttt.dcm"].reason == "not listed in stage_2_train_labels.csv"
    bbb = records["stage_2_train_images/bbb.dcm"]
    assert nonnull(bbb.labels) == {"lung_opacity": 1.0, "pneumonia": 1.0}
    assert bbb.extra == {
        "age": 48,
        "sex": "M",
        "boxes": [[264.0, 152.0, 213.0, 379.0], [562.0, 152.0, 256.0, 453.0]],
    }
    assert bbb.view == "AP" and bbb.patient_id == "bbb"
    assert nonnull(records["stage_2_train_images/aaa.dcm"].labels) == {"lung_opacity": 0.0, "pneumonia": 0.0}
    assert "1 entries of stage_2_train_labels.csv have no image" in caplog.text
    write_text(
        tmp_path / "stage_2_detailed_class_info.csv",
        "patientId,class\naaa,Normal\nbbb,Lung Opacity\nccc,No Lung Opacity / Not Normal\n",
    )
    records, _ = run("rsna-pneumonia", tmp_path)
    assert nonnull(records["stage_2_train_images/aaa.dcm"].labels) == {
        "no_finding": 1.0,
        "lung_opacity": 0.0,
        "pneumonia": 0.0,
    }
    assert records["stage_2_train_images/ccc.dcm"].labels["no_finding"] == 0.0
    assert records["stage_2_train_images/bbb.dcm"].labels["no_finding"] == 0.0
    write_text(tmp_path / "stage_2_detailed_class_info.csv", "patientId,class\naaa,Lung Opacity\n")
    with pytest.raises(ValueError, match="contradicts Target"):
        run("rsna-pneumonia", tmp_path)


# ---------------------------------------------------------------- IU X-ray (R2Gen)


def iu_entry(study: str, split: str, report: str) -> dict:
    return {"id": study, "report": report, "image_path": [f"{study}/0.png", f"{study}/1.png"], "split": split}


def test_iu_xray_blank_test_key_reports_and_splits(tmp_path):
    annotation = {
        "train": [
            iu_entry("CXR1_IM-0001", "train", "Heart size normal.  Lungs clear."),
            iu_entry("CXR2_IM-0002", "train", "x"),
        ],
        "val": [iu_entry("CXR3_IM-0003", "val", "y")],
        "    ": [
            iu_entry("CXR4_IM-0004", "test", "z"),
            {**iu_entry("CXR2_IM-0002", "test", "x"), "image_path": ["CXR2_IM-0002/2.png"]},
        ],
    }
    write_text(tmp_path / "annotation.json", json.dumps(annotation))
    for study in ("CXR1_IM-0001", "CXR2_IM-0002", "CXR3_IM-0003", "CXR4_IM-0004"):
        write_png(tmp_path / "images" / study / "0.png")
        write_png(tmp_path / "images" / study / "1.png")
    write_png(tmp_path / "images" / "CXR9_IM-0009" / "0.png")  # not in the annotation
    write_png(tmp_path / "CXR1_IM-0001" / "0.png")  # outside images/
    records, skips = run("iu-xray", tmp_path)
    assert len(records) == 8 and sorted(skips) == ["CXR1_IM-0001/0.png", "images/CXR9_IM-0009/0.png"]
    first = records["images/CXR1_IM-0001/0.png"]
    assert first.report == {"findings": "Heart size normal. Lungs clear.", "impression": ""}
    assert (first.patient_id, first.study_id, first.split, first.view) == (
        "CXR1_IM-0001",
        "CXR1_IM-0001",
        "train",
        None,
    )
    assert records["images/CXR4_IM-0004/1.png"].split == "test"  # from the entry's own split field
    assert records["images/CXR2_IM-0002/0.png"].split == "test"  # the study is also listed under test
    assert nonnull(first.labels) == {}
    annotation["    "].append({"id": "CXR5", "report": "", "image_path": ["CXR5/0.png"]})
    write_text(tmp_path / "annotation.json", json.dumps(annotation))
    with pytest.raises(ValueError, match="blank split key and no 'split' field"):
        run("iu-xray", tmp_path)


# ---------------------------------------------------------------- covid-chestxray-dataset

COVID_HEADER = (
    "patientid,offset,sex,age,finding,survival,intubated,intubation_present,went_icu,in_icu,"
    "needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,"
    "lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,other_notes,"
)


def covid_row(
    patient: str, offset: str, finding: str, view: str, modality: str, folder: str, filename: str
) -> str:
    return (
        f'{patient},{offset},M,65,"{finding}",,,,,,,,,,,,,{view},{modality},2020,,{folder},{filename},,,,,,'
    )


def test_covid_cxr_findings_modality_and_views(tmp_path, caplog):
    rows = [
        covid_row("1", "0", "COVID-19", "PA", "X-ray", "images", "a.jpg"),
        covid_row("1", "3", "COVID-19, ARDS", "AP Supine", "X-ray", "images", "b.jpg"),
        covid_row("2", "", "Pneumonia/Bacterial/Streptococcus", "L", "X-ray", "images", "c.png"),
        covid_row("3", "", "todo", "PA", "X-ray", "images", "d.jpg"),
        covid_row("4", "", "COVID-19", "Axial", "CT", "images", "e.jpg"),
        covid_row("5", "", "COVID-19", "PA", "X-ray", "images", "missing.jpg"),
    ]
    write_lines(tmp_path / "metadata.csv", [COVID_HEADER, *rows])
    for name in ("a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg", "unlisted.jpg"):
        (write_png if name.endswith(".png") else write_jpg)(tmp_path / "images" / name)
    with caplog.at_level(logging.WARNING):
        records, skips = run("covid-cxr", tmp_path)
    assert skips["images/e.jpg"].reason == "modality 'CT' in metadata.csv, not X-ray"
    assert skips["images/unlisted.jpg"].reason == "not listed in metadata.csv"
    covered = dict.fromkeys(targets_of(label_table.COVID_CXR), 0.0)
    assert nonnull(records["images/a.jpg"].labels) == {
        **covered,
        "covid_19": 1.0,
        "viral_pneumonia": 1.0,
        "pneumonia": 1.0,
    }
    assert records["images/b.jpg"].labels["ards"] == 1.0 and records["images/b.jpg"].labels["covid_19"] == 1.0
    strep = records["images/c.png"].labels
    assert (strep["bacterial_pneumonia"], strep["pneumonia"], strep["covid_19"]) == (1.0, 1.0, 0.0)
    assert nonnull(records["images/d.jpg"].labels) == {}  # "todo": unknown, not absent
    assert (records["images/b.jpg"].view, records["images/b.jpg"].extra["supine"]) == ("AP", True)
    assert records["images/c.png"].view == "LATERAL"
    assert records["images/a.jpg"].split == records["images/b.jpg"].split
    assert (records["images/b.jpg"].study_id, records["images/c.png"].study_id) == ("1@3", None)
    assert "1 entries of metadata.csv have no image" in caplog.text and "['todo']" in caplog.text


# ---------------------------------------------------------------- real files from ../shared/cxr-corpus

needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"real-data corpus not found at {CORPUS}")
NIH_PNGS = {
    "00000001_000.png": "nih-chestx-kushasareen",
    "00000002_000.png": "nih-chestx-kushasareen",
    "00000013_003.png": "nih-chestx-kushasareen",
    "00000003_000.png": "nih-chestx-taheeraahmed",
    "00000013_004.png": "nih-chestx-taheeraahmed",
    "00000013_019.png": "nih-chestx-taheeraahmed",
    "00000032_015.png": "nih-chestx-taheeraahmed",
    "00027426_000.png": "torchxrayvision/tests",
}


@pytest.mark.corpus
@needs_corpus
def test_corpus_nih_data_entry_and_pngs(tmp_path, caplog):
    shutil.copy(
        CORPUS / "torchxrayvision" / "csv_snippets" / "Data_Entry_2017_v2020.snippet.csv",
        tmp_path / "Data_Entry_2017_v2020.csv",
    )
    for name, folder in NIH_PNGS.items():
        link = tmp_path / "images_001" / "images" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(CORPUS / folder / name)
    # SOURCES.md: the taheeraahmed PNGs come from the NIH test split; 00000013_003 is left unlisted.
    write_text(
        tmp_path / "test_list.txt", "00000003_000.png\n00000013_004.png\n00000013_019.png\n00000032_015.png\n"
    )
    write_text(tmp_path / "train_val_list.txt", "00000001_000.png\n00000002_000.png\n00027426_000.png\n")
    with caplog.at_level(logging.WARNING):
        records, skips = run("nih-cxr14", tmp_path)
    assert len(records) == 8 and not skips
    by_name = {Path(k).name: r for k, r in records.items()}
    four = by_name["00000013_004.png"]
    assert {k for k, v in four.labels.items() if v == 1.0} == {
        "pleural_effusion",
        "emphysema",
        "infiltration",
        "pneumothorax",
    }
    assert four.labels["cardiomegaly"] == 0.0 and four.labels["no_finding"] == 0.0 and four.view == "AP"
    assert four.extra == {
        "age": 60,
        "sex": "M",
        "follow_up": 29,
        "original_size": [2544, 3056],
        "original_pixel_spacing": [0.139, 0.139],
    }
    assert by_name["00000001_000.png"].labels["cardiomegaly"] == 1.0
    assert by_name["00000002_000.png"].labels["no_finding"] == 1.0
    assert by_name["00000013_003.png"].split == "test"  # unlisted, follows patient 13
    assert {by_name[n].split for n in ("00000001_000.png", "00000002_000.png", "00027426_000.png")} <= {
        "train",
        "val",
    }
    assert "9 entries of Data_Entry_2017_v2020.csv have no image" in caplog.text


@pytest.mark.corpus
@needs_corpus
def test_corpus_iu_xray_annotation_with_upstream_blank_test_key(tmp_path):
    annotation = json.loads((CORPUS / "iu_xray_r2gen_annotation" / "annotation.subset.json").read_text())
    num_entries = {split: len(entries) for split, entries in annotation.items()}
    annotation["    "] = annotation.pop("test")  # the real file's corrupted key (SOURCES.md)
    write_text(tmp_path / "annotation.json", json.dumps(annotation))
    listed = [p for entries in annotation.values() for e in entries for p in e["image_path"]]
    for image_path in listed:
        write_png(tmp_path / "images" / image_path)
    records, skips = run("iu-xray", tmp_path)
    assert len(records) == len(set(listed)) and not skips
    splits = {}
    for record in records.values():
        splits.setdefault(record.split, set()).add(record.study_id)
    assert {split: len(ids) for split, ids in splits.items()} == num_entries
    first = annotation["train"][0]
    record = records[f"images/{first['image_path'][0]}"]
    assert record.report == {"findings": " ".join(first["report"].split()), "impression": ""}
    assert record.report["findings"].startswith("The heart size and pulmonary vascularity")


@pytest.mark.corpus
@needs_corpus
def test_corpus_covid_metadata_and_images():
    folder = CORPUS / "covid-chestxray-dataset"
    records, skips = run("covid-cxr", folder, covid_metadata=str(folder / "metadata.selected.csv"))
    assert len(records) == 14 and not skips
    assert {r.labels["covid_19"] for r in records.values()} == {0.0, 1.0}
    assert sum(r.labels["no_finding"] == 1.0 for r in records.values()) == 4
    pcp = records["images/X-ray_of_cyst_in_pneumocystis_pneumonia_1.jpg"].labels
    assert (pcp["fungal_pneumonia"], pcp["covid_19"]) == (1.0, 0.0)
    supine = records["images/53c9be49.jpg"]
    assert (supine.view, supine.extra["supine"], supine.patient_id) == ("AP", True, "219")
    assert records["images/cae2c0a9.jpg"].split == records["images/5f619d7e.jpg"].split  # both patient 223


@pytest.mark.corpus
@needs_corpus
def test_corpus_rsna_labels_snippet(tmp_path):
    snippet = CORPUS / "torchxrayvision" / "csv_snippets" / "rsna_stage_2_train_labels.head20.csv"
    shutil.copy(snippet, tmp_path / "stage_2_train_labels.csv")
    image_ids = sorted({line.split(",")[0] for line in snippet.read_text().splitlines()[1:]})
    for image_id in image_ids:
        write_dicom(tmp_path / "stage_2_train_images" / f"{image_id}.dcm", ViewPosition="PA")
    records, skips = run("rsna-pneumonia", tmp_path)
    assert len(records) == len(image_ids) == 16 and not skips
    positive = records["stage_2_train_images/00436515-870c-4b36-a041-de91049b9ab4.dcm"]
    assert positive.labels["pneumonia"] == 1.0 and len(positive.extra["boxes"]) == 2
    negative = records["stage_2_train_images/0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm"]
    assert negative.labels["pneumonia"] == 0.0 and negative.extra["boxes"] == []
    assert sum(r.labels["pneumonia"] == 1.0 for r in records.values()) == 5


@pytest.mark.corpus
@needs_corpus
def test_corpus_chexpert_train_rows(tmp_path):
    snippet = CORPUS / "torchxrayvision" / "csv_snippets" / "chexpert_train.head20.csv"
    shutil.copy(snippet, tmp_path / "train.csv")
    paths = [line.split(",")[0] for line in snippet.read_text().splitlines()[1:]]
    for path in paths:
        write_jpg(tmp_path / path.split("/", 1)[1])
    records, skips = run("chexpert", tmp_path)
    assert len(records) == 20 and not skips and {r.split for r in records.values()} == {"train"}
    assert sum(r.view == "LATERAL" for r in records.values()) == 5
    assert records["train/patient00002/study2/view1_frontal.jpg"].labels["cardiomegaly"] == -1.0
    assert records["train/patient00007/study1/view1_frontal.jpg"].labels["pleural_effusion"] == 0.0
    assert records["train/patient00007/study1/view1_frontal.jpg"].labels["pneumonia"] is None


@pytest.mark.corpus
@needs_corpus
def test_corpus_vindr_kaggle_rows(tmp_path):
    snippet = CORPUS / "torchxrayvision" / "csv_snippets" / "vinbigdata-train.head30.csv"
    shutil.copy(snippet, tmp_path / "train.csv")
    image_ids = sorted({line.split(",")[0] for line in snippet.read_text().splitlines()[1:]})
    for image_id in image_ids:
        write_dicom(tmp_path / "train" / f"{image_id}.dicom")
    records, skips = run("vindr-cxr", tmp_path)
    assert len(records) == len(image_ids) and not skips
    cardiomegaly = records["train/9a5094b2563a1ef3ff50dc5c7ff71345.dicom"].labels
    assert (cardiomegaly["cardiomegaly"], cardiomegaly["no_finding"], cardiomegaly["nodule_mass"]) == (
        1.0,
        0.0,
        0.0,
    )
    normal = records["train/50a418190bc3fb1ef1633bf9678929b3.dicom"].labels
    assert (normal["no_finding"], normal["cardiomegaly"], normal["rib_fracture"]) == (1.0, 0.0, None)
    assert records["train/0c7a38f293d5f5e4846aa4ca6db4daf1.dicom"].labels["ild"] == 1.0
