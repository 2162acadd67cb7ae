"""DICOM decoding: photometric, modality/VOI LUTs, padding, BitsStored, transfer syntaxes, filters.

Hand-made DICOMs are written with pydicom (`write_dicom`, `chest_brightness`; other test modules
import them); codec coverage uses pydicom's bundled test files.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from xray_core.images import DecodeOptions, SkipInput, polarity_suspect
from xray_core.load import load_image
from xray_core.roi import small_copy

ANY = DecodeOptions(modalities=None, body_parts=None)


def chest_brightness(height: int = 96, width: int = 80, seed: int = 0) -> np.ndarray:
    """A crude PA chest in [0, 1], air dark: body ellipse, two darker lungs, bright mediastinum."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    yn, xn = (y + 0.5) / height, (x + 0.5) / width
    image = np.full((height, width), 0.05)
    image[((xn - 0.5) / 0.45) ** 2 + ((yn - 0.55) / 0.5) ** 2 < 1] = 0.75
    for cx in (0.3, 0.7):
        image[((xn - cx) / 0.14) ** 2 + ((yn - 0.45) / 0.28) ** 2 < 1] = 0.3
    return np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1)


def write_dicom(path: Path, stored: np.ndarray, **attrs) -> Path:
    """Write `stored` (2-D uint16/int16/uint8) as an uncompressed Explicit VR LE DICOM.

    attrs override the defaults (Modality CR, BodyPartExamined CHEST, MONOCHROME2, BitsStored 12) or
    add elements by keyword; a value None removes the element.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid(entropy_srcs=[str(path)])
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, uid
    ds.PatientID, ds.StudyInstanceUID = "PAT-CLEAR-ID", generate_uid(entropy_srcs=["study", str(path)])
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_chest(
    photometric: str = "MONOCHROME2", bits: int = 12, seed: int = 0, shape=(96, 80)
) -> np.ndarray:
    top = (1 << bits) - 1
    values = np.rint(chest_brightness(*shape, seed=seed) * 0.8 * top + 0.1 * top)
    return (top - values if photometric == "MONOCHROME1" else values).astype(np.uint16)


def regions(unit: np.ndarray) -> dict[str, float]:
    """Mean of lungs, mediastinum and the border of a `chest_brightness`-shaped image."""
    h, w = unit.shape
    return {
        "lungs": float(unit[int(0.35 * h) : int(0.55 * h), int(0.25 * w) : int(0.35 * w)].mean()),
        "mediastinum": float(unit[int(0.35 * h) : int(0.55 * h), int(0.47 * w) : int(0.53 * w)].mean()),
        "border": float(unit[: int(0.04 * h)].mean()),
    }


def test_monochrome1_is_inverted_so_air_is_dark(tmp_path):
    path = write_dicom(
        tmp_path / "m1.dcm", stored_chest("MONOCHROME1"), PhotometricInterpretation="MONOCHROME1"
    )
    image = load_image(path, ANY)
    r = regions(image.unit_hw)
    assert image.photometric == "MONOCHROME1->inverted"
    assert r["border"] < r["lungs"] < r["mediastinum"]
    assert not polarity_suspect(small_copy(image.unit_hw))


def test_presentation_lut_inverse_with_monochrome1_inverts_once(tmp_path):
    stored = stored_chest("MONOCHROME1")
    plain = load_image(write_dicom(tmp_path / "a.dcm", stored, PhotometricInterpretation="MONOCHROME1"), ANY)
    both = load_image(
        write_dicom(
            tmp_path / "b.dcm",
            stored,
            PhotometricInterpretation="MONOCHROME1",
            PresentationLUTShape="INVERSE",
        ),
        ANY,
    )
    assert both.photometric == "MONOCHROME1+INVERSE->inverted"
    np.testing.assert_array_equal(plain.unit_hw, both.unit_hw)
    mono2_inverse = load_image(write_dicom(tmp_path / "c.dcm", stored, PresentationLUTShape="INVERSE"), ANY)
    assert mono2_inverse.photometric == "MONOCHROME2+INVERSE->inverted"
    np.testing.assert_array_equal(plain.unit_hw, mono2_inverse.unit_hw)


def test_relabelled_monochrome1_is_flagged_polarity_suspect(tmp_path):
    # MONOCHROME2 pixels under a MONOCHROME1 label: after inversion the body is darker than air.
    path = write_dicom(
        tmp_path / "fake.dcm", stored_chest("MONOCHROME2"), PhotometricInterpretation="MONOCHROME1"
    )
    image = load_image(path, ANY)
    assert polarity_suspect(small_copy(image.unit_hw))


def _pydicom_window_unit(ds, arr):
    """Reference: pydicom's apply_windowing, normalized by the output range it documents."""
    from pydicom.pixels.processing import apply_windowing

    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    ends = sorted((0 * slope + intercept, ((1 << ds.BitsStored) - 1) * slope + intercept))
    out = apply_windowing(arr.astype(np.float64) * slope + intercept, ds)
    return (out - ends[0]) / (ends[1] - ends[0])


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_policy_matches_pydicom(tmp_path, function):
    import pydicom

    ramp = np.tile(np.arange(4096, dtype=np.uint16), (2, 1))
    path = write_dicom(
        tmp_path / "w.dcm",
        ramp,
        WindowCenter=["1500", "900"],  # multi-valued: the first is used
        WindowWidth=["1000", "300"],
        VOILUTFunction=function,
        RescaleSlope="2",
        RescaleIntercept="-1000",
    )
    image = load_image(path, replace(ANY, intensity="window"))
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 1500.0, 1000.0
    assert image.intensity_policy == "window"
    np.testing.assert_allclose(image.unit_hw, _pydicom_window_unit(ds, ramp), atol=2e-5)


def test_voi_lut_sequence_applied_and_normalized_by_its_range(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_voi

    lut = np.sqrt(np.linspace(0, 1, 4096)) * 3000 + 500  # uses 500..3500 of a 16-bit output
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", [int(v) for v in lut])
    ramp = np.tile(np.arange(0, 4096, 8, dtype=np.uint16), (3, 1))
    path = write_dicom(
        tmp_path / "voi.dcm", ramp, VOILUTSequence=[item], WindowCenter="100", WindowWidth="50"
    )
    image = load_image(path, replace(ANY, intensity="window"))
    import pydicom

    expected = (apply_voi(ramp, pydicom.dcmread(path)).astype(np.float64) - 500) / 3000
    assert image.intensity_policy == "window (VOI LUT)"
    np.testing.assert_allclose(image.unit_hw, expected, atol=1e-3)


def test_window_policy_without_window_falls_back_to_percentile(tmp_path):
    image = load_image(write_dicom(tmp_path / "n.dcm", stored_chest()), replace(ANY, intensity="window"))
    assert image.intensity_policy == "percentile" and "no_window_in_header" in image.flags


def test_raw_policy_maps_bits_stored_range_through_rescale(tmp_path):
    values = np.array([[0, 1024, 4095, 2048]], dtype=np.uint16)
    path = write_dicom(tmp_path / "r.dcm", values, RescaleSlope="3", RescaleIntercept="-50")
    image = load_image(path, replace(ANY, intensity="raw"))
    np.testing.assert_allclose(image.unit_hw, values / 4095.0, atol=1e-6)


def test_percentile_policy_clips_outliers_and_ignores_padding(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.integers(1000, 2001, size=(100, 100)).astype(np.uint16)
    values[:, :40] = 0  # padding
    values[50, 50] = 4095  # one hot pixel
    path = write_dicom(tmp_path / "p.dcm", values, PixelPaddingValue=0)
    image = load_image(path, ANY)
    assert (image.unit_hw[:, :40] == 0).all()
    body = image.unit_hw[:, 40:]
    assert body.max() == 1.0 and np.isclose(np.percentile(body, 50), 0.5, atol=0.03)
    assert (body == 1.0).mean() < 0.01  # the hot pixel is clipped, not stretching the range


def test_bits_stored_masks_high_bits_and_flags(tmp_path):
    values = stored_chest(bits=12)
    dirty = values | np.uint16(0x8000) * (np.arange(values.size).reshape(values.shape) % 7 == 0)
    clean = load_image(write_dicom(tmp_path / "clean.dcm", values), replace(ANY, intensity="raw"))
    image = load_image(
        write_dicom(tmp_path / "dirty.dcm", dirty.astype(np.uint16)), replace(ANY, intensity="raw")
    )
    assert "values_exceed_bits_stored" in image.flags and "values_exceed_bits_stored" not in clean.flags
    np.testing.assert_array_equal(image.unit_hw, clean.unit_hw)


def test_low_byte_only_flag(tmp_path):
    values = (stored_chest(bits=8)).astype(np.uint16)
    image = load_image(write_dicom(tmp_path / "lb.dcm", values, BitsStored=12), ANY)
    assert "low_byte_only" in image.flags
    assert "low_byte_only" not in load_image(write_dicom(tmp_path / "ok.dcm", stored_chest()), ANY).flags


def test_file_without_preamble_or_meta_gets_its_transfer_syntax_inferred(tmp_path):
    import pydicom

    path = write_dicom(tmp_path / "with_meta.dcm", stored_chest())
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare"
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM" and bare.read_bytes()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(load_image(bare, ANY).unit_hw, load_image(path, ANY).unit_hw)


def test_signed_data_and_pixel_spacing(tmp_path):
    values = (stored_chest().astype(np.int32) - 2048).astype(np.int16)
    image = load_image(write_dicom(tmp_path / "s.dcm", values, ImagerPixelSpacing=["0.2", "0.25"]), ANY)
    assert image.pixel_spacing == (0.2, 0.25) and image.view == "PA"
    r = regions(image.unit_hw)
    assert r["border"] < r["lungs"] < r["mediastinum"]


@pytest.mark.parametrize(
    "attrs, reason",
    [
        ({"Modality": "MR"}, "filtered: Modality MR not in --modalities CR,DX"),
        ({"BodyPartExamined": "HAND"}, "filtered: BodyPartExamined HAND not in --body-parts"),
        ({"PresentationIntentType": "FOR PROCESSING", "Modality": "DX"}, "FOR PROCESSING"),
    ],
)
def test_default_filters_skip_with_precise_reason(tmp_path, attrs, reason):
    path = write_dicom(tmp_path / "f.dcm", stored_chest(), **attrs)
    with pytest.raises(SkipInput, match=reason):
        load_image(path, DecodeOptions())
    assert load_image(
        path, DecodeOptions(modalities=None, body_parts=None, allow_for_processing=True)
    ).unit_hw.size


def test_absent_body_part_accepted_by_default(tmp_path):
    path = write_dicom(tmp_path / "nobp.dcm", stored_chest(), BodyPartExamined=None)
    assert load_image(path, DecodeOptions()).unit_hw.shape == (96, 80)
    with pytest.raises(SkipInput, match="BodyPartExamined ABSENT"):
        load_image(path, DecodeOptions(body_parts=frozenset({"CHEST"})))


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",  # RLE Lossless
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "MR_small_implicit.dcm",  # Implicit VR Little Endian
        "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    ],
)
def test_lossless_transfer_syntaxes_decode_identically(name):
    reference = load_image(_testdata("MR_small.dcm"), ANY).unit_hw
    np.testing.assert_array_equal(load_image(_testdata(name), ANY).unit_hw, reference)


@pytest.mark.parametrize(
    "name, photometric",
    [
        ("JPGExtended.dcm", "MONOCHROME2"),  # JPEG Extended 12-bit
        ("JPEGLSNearLossless_16.dcm", "MONOCHROME2"),  # JPEG-LS near-lossless
        ("693_J2KI.dcm", "MONOCHROME2"),  # JPEG 2000 (lossy), signed
        ("image_dfl.dcm", "MONOCHROME2"),  # Deflated Explicit VR LE
        ("SC_rgb_jpeg_gdcm.dcm", "RGB->gray"),  # JPEG Lossless SV1, RGB
        ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "YBR_FULL->RGB->gray"),  # JPEG baseline, YBR
        ("examples_palette.dcm", "PALETTE COLOR->gray"),
        ("GDCMJ2K_TextGBR.dcm", "YBR_RCT->RGB->gray"),  # JPEG 2000, reversible colour transform
    ],
)
def test_other_transfer_syntaxes_and_colour_decode(name, photometric):
    image = load_image(_testdata(name), ANY)
    assert image.photometric == photometric
    assert image.unit_hw.ndim == 2 and 0.0 <= image.unit_hw.min() < image.unit_hw.max() <= 1.0


def test_rgb_and_ybr_jpeg_give_the_same_gray():
    rgb = load_image(_testdata("SC_rgb_dcmtk_+eb+cr.dcm"), replace(ANY, intensity="raw")).unit_hw
    ybr = load_image(_testdata("SC_rgb_dcmtk_+eb+cy+n1.dcm"), replace(ANY, intensity="raw")).unit_hw
    assert np.abs(rgb - ybr).mean() < 0.02  # both lossy JPEGs of one picture


def test_multi_frame_first_or_skip():
    image = load_image(_testdata("examples_ybr_color.dcm"), ANY)
    assert image.original_size == (240, 320) and "multi_frame_first_of_30" in image.flags
    with pytest.raises(SkipInput, match="multi-frame"):
        load_image(_testdata("examples_ybr_color.dcm"), replace(ANY, frames="skip"))


@pytest.mark.parametrize(
    "name, reason",
    [
        ("dicomdirtests/DICOMDIR", "DICOMDIR"),
        ("test-SR.dcm", "DICOM without pixel data \\(Modality SR"),
        ("rtplan.dcm", "DICOM without pixel data \\(Modality RTPLAN"),
        ("MR_truncated.dcm", "undecodable or truncated pixel data .*ValueError"),
        ("JPEG2000-embedded-sequence-delimiter.dcm", "undecodable or truncated pixel data \\(JPEG 2000"),
        ("README.txt", "not a DICOM or image file"),
        ("crayons.icc", "not a DICOM or image file"),
    ],
)
def test_inputs_that_are_not_images_give_precise_reasons(name, reason):
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("MR_small.dcm")).parent / name
    with pytest.raises(SkipInput, match=reason):
        load_image(path, ANY)


@pytest.mark.parametrize(
    "mode, suffix, expected",
    [
        ("I;16", ".png", "I;16"),
        ("I;16", ".tif", "I;16"),
        ("L", ".jpg", "L"),
        ("RGB", ".jpg", "RGB->gray"),
        ("P", ".png", "P->gray"),
        ("LA", ".png", "LA->L"),
    ],
)
def test_other_image_files_decode_to_gray(tmp_path, mode, suffix, expected):
    from PIL import Image

    brightness = chest_brightness()
    if mode == "I;16":
        image = Image.fromarray(np.rint(brightness * 60000).astype(np.uint16))
    else:
        image = Image.fromarray(np.rint(brightness * 255).astype(np.uint8)).convert(mode)
    path = tmp_path / f"image{suffix}"
    image.save(path)
    loaded = load_image(path, ANY)
    assert loaded.photometric == expected and loaded.original_size == (96, 80)
    r = regions(loaded.unit_hw)
    assert r["border"] < r["lungs"] < r["mediastinum"]


def test_view_filter_reads_the_header(tmp_path):
    path = write_dicom(tmp_path / "lat.dcm", stored_chest(), ViewPosition="LL")
    with pytest.raises(SkipInput, match="filtered: view LL not in --views AP,PA"):
        load_image(path, replace(ANY, views=frozenset({"PA", "AP"})))


def test_view_filter_treats_a_missing_view_as_unknown(tmp_path):
    """DICOM header and other images share one rule: no view is UNKNOWN, which --views may list."""
    from PIL import Image

    from data_tools.encode import SampleOptions, build_sample
    from data_tools.records import Record

    dicom_path = write_dicom(tmp_path / "noview.dcm", stored_chest(), ViewPosition=None)
    png_path = tmp_path / "noview.png"
    Image.fromarray(np.rint(chest_brightness() * 255).astype(np.uint8)).save(png_path)
    for path in (dicom_path, png_path):
        record = Record(path, path.name, "t")
        keep = SampleOptions(decode=replace(ANY, views=frozenset({"PA", "UNKNOWN"})), long_side=64)
        assert build_sample(record, "k", "train", keep).key == "k"
        drop = SampleOptions(decode=replace(ANY, views=frozenset({"PA"})), long_side=64)
        with pytest.raises(SkipInput, match="^filtered: view unknown not in --views PA$"):
            build_sample(record, "k", "train", drop)
