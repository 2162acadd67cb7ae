"""DICOM file -> `LoadedImage`: recognized by content, every transfer syntax pydicom's plugins decode.

Order of operations on the first frame (PS3.3 C.11 and C.7.6.3):
  decode (pydicom.pixels.pixel_array, only the first frame of a multi-frame file)
  -> BitsStored: high bits masked (signed data sign-extended), flag `values_exceed_bits_stored`
  -> colour (RGB / YBR_* / PALETTE COLOR) to BT.601 luma
  -> Modality LUT (Modality LUT Sequence, or Rescale Slope/Intercept folded into one affine map)
  -> intensity policy (`xray_core.images`: percentile | window (VOI LUT / window) | raw) -> [0, 1]
  -> photometric: MONOCHROME1, or Presentation LUT Shape INVERSE, is inverted once, so air is dark
  -> PixelPaddingValue pixels (excluded from statistics) set to 0.

Rescaling is folded into the float32 pass that maps to [0, 1], so no float64 copy of a full-size
image is made. Files without preamble or file meta are read with force=True and their transfer
syntax inferred from the encoding pydicom detected.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from xray_core.images import (
    DecodeOptions,
    LoadedImage,
    SkipInput,
    affine_for_range,
    apply_affine,
    check_pixel_count,
    luma,
    percentile_range,
    sniff_kind,
    unit_from_values,
    view_filter_reason,
)

FOR_PROCESSING_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
}
MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A force-parse of a non-DICOM file yields one or two garbage elements; a real dataset has many.
MIN_KNOWN_TAGS = 3
# Below this many bits a 0..255 image is plausible; above, it means the high byte was lost.
LOW_BYTE_MIN_BITS_STORED = 10
UNDEFINED_LENGTH = 0xFFFFFFFF


def read_dataset(path: Path, has_preamble: bool, stop_before_pixels: bool = False):
    """Parse a DICOM file (force=True) and make sure it has a transfer syntax.

    Raises SkipInput if the content is not DICOM (no preamble and too few known tags parse).
    """
    import pydicom
    from pydicom.datadict import dictionary_has_tag

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # force-parsing garbage warns for every element
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as error:
        if not has_preamble:
            raise SkipInput("not a DICOM or image file (unrecognized content)") from error
        raise SkipInput(f"unreadable DICOM: {type(error).__name__}: {error}") from error
    if not has_preamble:
        tags = ds.keys()  # tags only: iterating the dataset would convert every raw element
        num_known = sum(1 for tag in tags if dictionary_has_tag(tag))
        if num_known < MIN_KNOWN_TAGS and not any(k in ds for k in PIXEL_KEYWORDS):
            raise SkipInput("not a DICOM or image file (unrecognized content)")
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds) -> None:
    """Files without file meta (ACR-NEMA style): infer the syntax from how pydicom parsed them."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    is_implicit, is_little = ds.original_encoding
    if is_implicit is None:
        is_implicit, is_little = True, True
    for name in PIXEL_KEYWORDS:
        if name in ds and ds[name].is_undefined_length:
            raise SkipInput("encapsulated (compressed) pixel data without a Transfer Syntax UID")
    if is_implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if is_little else ExplicitVRBigEndian


def read_identity(path: Path) -> tuple[str | None, str | None] | None:
    """(PatientID, StudyInstanceUID) from a DICOM header, or None if the file is not DICOM.

    Used before conversion to split by patient when the source gives no patient ids.
    """
    with open(path, "rb") as f:
        kind = sniff_kind(f.read(132))
    if kind not in ("dicom", "unknown"):
        return None
    try:
        ds = read_dataset(path, kind == "dicom", stop_before_pixels=True)
    except SkipInput:
        return None
    patient, study = str(ds.get("PatientID") or "").strip(), str(ds.get("StudyInstanceUID") or "").strip()
    return (patient or None, study or None)


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip().upper()


def filter_reason(ds, options: DecodeOptions) -> str | None:
    """Why this dataset is not converted (no pixels, filtered out), or None to convert it."""
    from pydicom.uid import UID

    media_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    sop_class = str(ds.get("SOPClassUID") or media_class)
    if "DirectoryRecordSequence" in ds or media_class == MEDIA_DIRECTORY_SOP_CLASS:
        return "DICOMDIR (media directory, no pixel data)"
    modality = _text(ds, "Modality")
    if not any(k in ds for k in PIXEL_KEYWORDS):
        name = UID(sop_class).name if sop_class else "unknown SOP class"
        return f"DICOM without pixel data (Modality {modality or 'absent'}, {name})"
    if options.modalities is not None and modality not in options.modalities:
        return f"filtered: Modality {modality or 'absent'} not in --modalities {','.join(sorted(options.modalities))}"
    body_part = _text(ds, "BodyPartExamined") or "ABSENT"
    if options.body_parts is not None and body_part not in options.body_parts:
        allowed = ",".join(sorted(options.body_parts))
        return f"filtered: BodyPartExamined {body_part} not in --body-parts {allowed}"
    for_processing = (
        sop_class in FOR_PROCESSING_SOP_CLASSES or _text(ds, "PresentationIntentType") == "FOR PROCESSING"
    )
    if for_processing and not options.allow_for_processing:
        return f"filtered: {modality} FOR PROCESSING (raw detector data); pass --allow-for-processing to keep"
    view_reason = view_filter_reason(header_view(ds), options.views)
    if view_reason:
        return view_reason
    num_frames = number_of_frames(ds)
    if num_frames > 1 and options.frames == "skip":
        return f"filtered: multi-frame ({num_frames} frames) and --frames skip"
    return None


def _header_int(ds, keyword: str) -> int:
    """An integer header field (US / IS); SkipInput when absent or not a number."""
    value = ds.get(keyword)
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise SkipInput(f"invalid or missing {keyword} {value!r}") from error


def _looks_truncated(ds, path: Path) -> bool:
    """A dataset without a pixel element that was cut short: it has the image pixel module's Rows and
    Columns, or the parse stopped before the end of the file (pydicom silently drops the element a
    file ends inside), or the file holds the PixelData tag all the same. Objects that never had
    pixels (reports, DICOMDIRs) end with a whole element and have none of these."""
    if "Rows" in ds and "Columns" in ds:
        return True
    last = next(reversed(ds._dict.values()), None)  # raw elements in file order, not yet converted
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    defined = tell is not None and length is not None and length != UNDEFINED_LENGTH
    if defined and tell + length < Path(path).stat().st_size:
        return True
    data = Path(path).read_bytes()
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def number_of_frames(ds) -> int:
    value = ds.get("NumberOfFrames")
    try:
        return max(1, int(value)) if value not in (None, "") else 1
    except (TypeError, ValueError) as error:
        raise SkipInput(f"invalid NumberOfFrames {value!r}") from error


def header_view(ds) -> str | None:
    return _text(ds, "ViewPosition") or None


def pixel_spacing(ds) -> tuple[float, float] | None:
    """(row, col) mm from PixelSpacing, else ImagerPixelSpacing; None when absent or zero."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if row > 0 and col > 0:
            return row, col
    return None


def decode_first_frame(ds) -> tuple[np.ndarray, int]:
    """(pixels of the first frame in native byte order, number of frames); SkipInput if undecodable."""
    from pydicom.pixels import pixel_array

    num_frames = number_of_frames(ds)
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        # correct_unused_bits=False: we mask BitsStored ourselves, to flag values that exceed it.
        arr = pixel_array(ds, index=0 if num_frames > 1 else None, correct_unused_bits=False)
    except Exception as error:
        raise SkipInput(
            f"undecodable or truncated pixel data ({syntax.name}): {type(error).__name__}: {error}"
        ) from error
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.writeable:
        arr = arr.copy()
    return arr, num_frames


def mask_bits_stored(arr: np.ndarray, bits_stored: int) -> tuple[np.ndarray, bool]:
    """Drop bits above BitsStored (sign-extending signed data). Returns (array, values_exceeded)."""
    num_bits = arr.dtype.itemsize * 8
    if arr.dtype.kind not in "iu" or not 0 < bits_stored < num_bits:
        return arr, False
    if arr.dtype.kind == "u":
        exceeded = int(arr.max()) > (1 << bits_stored) - 1
    else:
        exceeded = int(arr.min()) < -(1 << (bits_stored - 1)) or int(arr.max()) > (1 << (bits_stored - 1)) - 1
    if exceeded:
        shift = num_bits - bits_stored
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr, exceeded


def _first(value) -> float:
    """First value of a possibly multi-valued DS element."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _padding_valid_mask(ds, arr: np.ndarray) -> np.ndarray | None:
    """True where a pixel is not padding (PixelPaddingValue [.. PixelPaddingRangeLimit]); None if no padding."""
    value = ds.get("PixelPaddingValue")
    if value is None or isinstance(value, bytes):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    low, high = (
        (int(value), int(value))
        if limit is None or isinstance(limit, bytes)
        else sorted((int(value), int(limit)))
    )
    valid = (arr < low) | (arr > high)
    return None if valid.all() else valid


def _stored_range(arr: np.ndarray, bits_stored: int) -> tuple[float, float]:
    """The nominal (min, max) stored value: from BitsStored for integers, the data for floats."""
    if arr.dtype.kind == "f":
        return float(arr.min()), float(arr.max())
    if arr.dtype.kind == "i":
        return float(-(1 << (bits_stored - 1))), float((1 << (bits_stored - 1)) - 1)
    return 0.0, float((1 << bits_stored) - 1)


def _modality(ds, arr: np.ndarray, bits_stored: int) -> tuple[np.ndarray, float, float, tuple[float, float]]:
    """(values, slope, intercept, nominal modality range). A Modality LUT Sequence is applied here
    (integer lookup); Rescale Slope/Intercept are returned to be folded into the later affine map."""
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence") and arr.dtype.kind in "iu":
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return apply_modality_lut(arr, ds), 1.0, 0.0, (0.0, float((1 << depth) - 1))
    slope = float(ds.get("RescaleSlope") or 1.0) or 1.0
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    low, high = _stored_range(arr, bits_stored)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return arr, slope, intercept, (ends[0], ends[1])


def _voi_lut_unit(ds, values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Apply the first VOI LUT Sequence item; the LUT's own min..max becomes 0..1."""
    from pydicom.pixels import apply_voi

    if slope != 1.0 or intercept != round(intercept) or values.dtype.kind not in "iu":
        modality_values = np.rint(values.astype(np.float32) * slope + intercept).astype(np.int32)
    else:
        modality_values = values.astype(np.int32) + int(intercept)
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    num_entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
    table = apply_voi(np.arange(first, first + num_entries, dtype=np.int32), ds)
    scale, offset = affine_for_range(float(table.min()), float(table.max()))
    return apply_affine(apply_voi(modality_values, ds), scale, offset)


def _window_unit(ds, values: np.ndarray, slope: float, intercept: float) -> np.ndarray | None:
    """First Window Center/Width with its VOI LUT Function (PS3.3 C.11.2.1.2); None if invalid."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = _text(ds, "VOILUTFunction") or "LINEAR"
    if function == "LINEAR" and width > 1:
        scale, offset = slope / (width - 1), (intercept - center + 0.5) / (width - 1) + 0.5
        return apply_affine(values, scale, offset)
    if function == "LINEAR_EXACT" and width > 0:
        return apply_affine(values, slope / width, (intercept - center) / width + 0.5)
    if function == "SIGMOID" and width > 0:
        unit = values.astype(np.float32)
        unit *= np.float32(-4.0 * slope / width)
        unit += np.float32(-4.0 * (intercept - center) / width)
        with np.errstate(over="ignore"):
            np.exp(unit, out=unit)
        unit += 1.0
        return np.reciprocal(unit, out=unit)
    return None


def monochrome_unit(
    ds, arr: np.ndarray, bits_stored: int, policy: str, valid
) -> tuple[np.ndarray, str, list[str]]:
    """Monochrome stored values -> ([0, 1] float32 before inversion, policy applied, flags)."""
    values, slope, intercept, nominal = _modality(ds, arr, bits_stored)
    flags: list[str] = []
    if policy == "window":
        unit = None
        if ds.get("VOILUTSequence") and values.dtype.kind in "iu":
            unit, applied = _voi_lut_unit(ds, values, slope, intercept), "window (VOI LUT)"
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            unit, applied = _window_unit(ds, values, slope, intercept), "window"
            if unit is None:
                flags.append("invalid_window")
        else:
            flags.append("no_window_in_header")
        if unit is not None:
            return unit, applied, flags
        policy = "percentile"
    if policy == "percentile":
        q_low, q_high = percentile_range(values, valid)
        ends = sorted((q_low * slope + intercept, q_high * slope + intercept))
    else:
        ends = list(nominal)
    if not ends[1] > ends[0]:
        flags.append("constant_image")
    scale, offset = affine_for_range(ends[0], ends[1], slope, intercept)
    return apply_affine(values, scale, offset), policy, flags


def _color_values(ds, arr: np.ndarray, bits_stored: int) -> tuple[np.ndarray, tuple[float, float], str]:
    """RGB / YBR (pydicom already gives RGB) / PALETTE COLOR -> (luma, nominal range, description)."""
    from pydicom.pixels import apply_color_lut

    photometric = _text(ds, "PhotometricInterpretation")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        full = 255.0 if rgb.dtype == np.uint8 else 65535.0
        return luma(rgb), (0.0, full), "PALETTE COLOR->gray"
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise SkipInput(f"pixel array of shape {arr.shape} for {photometric or 'unknown'} photometric")
    via = "->RGB" if photometric.startswith("YBR") else ""
    return luma(arr), (0.0, float((1 << bits_stored) - 1)), f"{photometric}{via}->gray"


def load_dicom(path: Path, options: DecodeOptions, has_preamble: bool) -> LoadedImage:
    """Read, filter and decode one DICOM file into a LoadedImage. Raises SkipInput with the reason."""
    ds = read_dataset(path, has_preamble)
    if not any(k in ds for k in PIXEL_KEYWORDS) and _looks_truncated(ds, path):
        raise SkipInput("truncated file: the file ends before its pixel data is complete")
    reason = filter_reason(ds, options)
    if reason:
        raise SkipInput(reason)
    check_pixel_count(_header_int(ds, "Rows"), _header_int(ds, "Columns"), options.max_pixels)
    arr, num_frames = decode_first_frame(ds)
    bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or arr.dtype.itemsize * 8)
    arr, exceeded = mask_bits_stored(arr, bits_stored)
    flags = ["values_exceed_bits_stored"] if exceeded else []
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric in ("MONOCHROME1", "MONOCHROME2", "") and arr.ndim == 2:
        if (
            arr.dtype.kind in "iu"
            and bits_stored >= LOW_BYTE_MIN_BITS_STORED
            and arr.min() >= 0
            and arr.max() <= 255
        ):
            flags.append("low_byte_only")
        valid = _padding_valid_mask(ds, arr)
        unit, applied, policy_flags = monochrome_unit(ds, arr, bits_stored, options.intensity, valid)
        shape = _text(ds, "PresentationLUTShape")
        invert = photometric == "MONOCHROME1" or shape == "INVERSE"
        described = (photometric or "MONOCHROME2") + ("+INVERSE" if shape == "INVERSE" else "")
        if invert:
            np.subtract(np.float32(1.0), unit, out=unit)
            described += "->inverted"
        if valid is not None:
            unit[~valid] = 0.0
    else:
        gray, nominal, described = _color_values(ds, arr, bits_stored)
        policy = "raw" if options.intensity == "window" else options.intensity
        unit, applied, policy_flags = unit_from_values(gray, nominal, policy)
        # A colour radiograph is a screenshot or secondary capture: often burnt-in text or overlays.
        flags.append("color_to_gray")
    flags += policy_flags
    if num_frames > 1:
        flags.append(f"multi_frame_first_of_{num_frames}")
    return LoadedImage(unit, described, applied, flags, pixel_spacing(ds), header_view(ds))
