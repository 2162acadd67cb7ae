"""Real files: pydicom's bundled test files (every decodable image becomes a sample, every other file a
precise skip) and the real chest X-ray corpus in ../shared/cxr-corpus (skipped when absent)."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.convert import convert
from data_tools.verify import verify
from xray_core.shardio import read_idx, read_sample

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "cxr-corpus"
MONOCHROME1_CHESTS = [
    "pydicom-data/chest/RG1_J2KI.dcm",  # 15-bit, JPEG 2000
    "pylibjpeg-data/chest/RG1_JLSN.dcm",  # 15-bit, JPEG-LS near-lossless
    "fo-dicom/chest/CR-MONO1-10-chest.dcm",  # 10-bit, no preamble, no file meta
]
CORRUPT_LOW_BYTE = sorted(
    f"pseudo-phi-jsl/corrupt_pixeldata_negative/{name}"
    for name in (
        "CR_fuji_292821506.dcm",
        "DX_ge_339833062_img3_derived_secondary.dcm",
        "DX_philips_7361647728_AP.dcm",
    )
)


def _outputs(folder: Path) -> dict[str, tuple[dict, np.ndarray]]:
    """source_id -> (json, stored image as float fractions of full scale)."""
    source_of = {row["key"]: row["source_id"] for row in csv.DictReader(open(folder / "id_map.csv"))}
    found = {}
    for tar in sorted(folder.glob("*.tar")):
        with open(tar, "rb") as f:
            for sample in read_idx(tar.with_suffix(".idx")):
                comps = read_sample(f, sample)
                image = np.asarray(Image.open(io.BytesIO(comps["png"]))).astype(np.float64) / 65535
                found[source_of[sample.key]] = (json.loads(comps["json"]), image)
    return found


def _skips(folder: Path) -> dict[str, str]:
    lines = (folder / "skipped.jsonl").read_text().splitlines()
    return {json.loads(line)["source_id"]: json.loads(line)["reason"] for line in lines}


def _pydicom_decodes_an_image(path: Path) -> bool:
    """Independent of data_tools: pydicom (force=True, transfer syntax set when the file has none,
    as pydicom's docs advise) gives a 2-D image, an (H, W, 3) colour image, or frames of either."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
                implicit, little = ds.original_encoding
                ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
                ds.file_meta.TransferSyntaxUID = (
                    ImplicitVRLittleEndian
                    if implicit
                    else ExplicitVRLittleEndian
                    if little
                    else ExplicitVRBigEndian
                )
            arr = ds.pixel_array
    except Exception:
        return False
    frames = int(ds.get("NumberOfFrames") or 1)
    first = arr[0] if frames > 1 else arr
    return first.ndim == 2 or (first.ndim == 3 and first.shape[-1] == 3)


def test_pydicom_test_files_every_decodable_image_is_a_sample(tmp_path):
    import pydicom.data

    root = Path(pydicom.data.__file__).parent / "test_files"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    manifest = convert(
        root,
        tmp_path / "out",
        source="folder",
        modalities="any",
        body_parts="any",
        long_side=64,
        num_workers=2,
        progress=False,
    )
    assert manifest["num_inputs"] == len(files)
    assert manifest["num_samples"] + manifest["num_skipped"] == len(files)
    samples = {row["source_id"] for row in csv.DictReader(open(tmp_path / "out/id_map.csv"))}
    expected = {p.relative_to(root).as_posix() for p in files if _pydicom_decodes_an_image(p)}
    assert samples == expected
    skips = _skips(tmp_path / "out")
    assert set(skips) == {p.relative_to(root).as_posix() for p in files} - samples
    assert skips["dicomdirtests/DICOMDIR"] == "DICOMDIR (media directory, no pixel data)"
    assert skips["test-SR.dcm"].startswith("DICOM without pixel data (Modality SR")
    assert skips["MR_truncated.dcm"].startswith("undecodable or truncated pixel data")
    assert skips["zipMR.gz"] == "not a DICOM or image file (unrecognized content)"
    assert verify(tmp_path / "out") == []
    print(f"pydicom test_files: {len(files)} files -> {len(samples)} samples + {len(skips)} skipped")


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory) -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"real chest X-ray corpus not found at {CORPUS} (it lives beside the repo in ../shared)")
    out = tmp_path_factory.mktemp("corpus") / "shards"
    convert(CORPUS, out, source="folder", long_side=256, num_workers=2, progress=False, salt="corpus-test")
    return out


@pytest.mark.corpus
def test_corpus_every_chest_image_decodes_and_filters_apply(corpus_shards):
    assert verify(corpus_shards) == []
    outputs, skips = _outputs(corpus_shards), _skips(corpus_shards)
    chest_dicoms = sorted(
        p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*.dcm") if "non_chest_negative" not in p.parts
    )
    assert len(chest_dicoms) == 11 and set(chest_dicoms) <= set(outputs)
    images = [p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*") if p.suffix in (".png", ".jpg")]
    assert set(images) <= set(outputs)
    assert skips["pseudo-phi-jsl/non_chest_negative/CT_localizer_toshiba_6774825273.dcm"].startswith(
        "filtered: Modality CT"
    )
    assert skips["pydicom-data/non_chest_negative/RG3_J2KI.dcm"].startswith(
        "filtered: BodyPartExamined EXTREMITY"
    )
    others = set(skips) - {p for p in skips if "non_chest_negative" in p}
    assert all(skips[p] == "not a DICOM or image file (unrecognized content)" for p in others)


def _lungs_and_mediastinum(image: np.ndarray) -> tuple[float, float]:
    h, w = image.shape
    rows = slice(int(0.3 * h), int(0.6 * h))
    lungs = 0.5 * (
        image[rows, int(0.2 * w) : int(0.35 * w)].mean() + image[rows, int(0.65 * w) : int(0.8 * w)].mean()
    )
    return float(lungs), float(image[int(0.3 * h) : int(0.7 * h), int(0.45 * w) : int(0.55 * w)].mean())


@pytest.mark.corpus
def test_corpus_monochrome1_chests_have_dark_lungs(corpus_shards):
    outputs = _outputs(corpus_shards)
    for source_id in MONOCHROME1_CHESTS:
        meta, image = outputs[source_id]
        lungs, mediastinum = _lungs_and_mediastinum(image)
        assert meta["photometric"] == "MONOCHROME1->inverted"
        assert lungs + 0.15 < mediastinum, (source_id, lungs, mediastinum)
        assert "polarity_suspect" not in meta["flags"]
    assert outputs[MONOCHROME1_CHESTS[0]][0]["original_size"] == [1955, 1841]
    # The same exposure in two lossy encodings gives (nearly) the same stored image.
    j2k, jls = outputs[MONOCHROME1_CHESTS[0]][1], outputs[MONOCHROME1_CHESTS[1]][1]
    assert np.abs(j2k - jls).mean() < 0.01


@pytest.mark.corpus
def test_corpus_header_contradictions_are_flagged(corpus_shards):
    outputs = _outputs(corpus_shards)
    flagged = sorted(p for p, (meta, _) in outputs.items() if "polarity_suspect" in meta["flags"])
    assert flagged == ["torchxrayvision/tests/Fake_MONOHR1.dcm"]
    low_byte = sorted(p for p, (meta, _) in outputs.items() if "low_byte_only" in meta["flags"])
    assert low_byte == CORRUPT_LOW_BYTE


@pytest.mark.corpus
def test_corpus_privacy(corpus_shards):
    from pydicom import dcmread

    ds = dcmread(CORPUS / "pydicom-data/chest/RG1_J2KI.dcm")
    data = b"".join(p.read_bytes() for p in corpus_shards.glob("*.tar"))
    for needle in (str(ds.PatientID), str(ds.StudyInstanceUID), "RG1_J2KI", "corpus-test", str(CORPUS)):
        assert needle.encode() not in data, needle


@pytest.mark.corpus
def test_corpus_chest_region_paths_are_recorded_and_counted(corpus_shards):
    from data_tools.stats import folder_stats, format_stats

    outputs = _outputs(corpus_shards)
    for source_id in MONOCHROME1_CHESTS:
        meta = outputs[source_id][0]
        assert meta["roi_method"] == "fitted" and meta["roi_confidence"] >= 0.6, (source_id, meta)
    inverted = outputs["torchxrayvision/tests/Fake_MONOHR1.dcm"][0]  # shown inverted: unlike a chest
    assert inverted["roi_method"] == "rectangle" and inverted["roi_box"] == [0.3, 0.15, 0.8, 0.8]
    assert {"roi_not_chest", "roi_unsure"} & set(inverted["flags"])
    stats = folder_stats(corpus_shards)
    assert sum(stats["roi_paths"].values()) == len(outputs)
    assert stats["roi_paths"]["fitted"] >= len(MONOCHROME1_CHESTS)
    assert "chest region: fitted " in format_stats(stats)
