"""One input record -> one shard sample: decode, resize, chest region, encode, metadata.

Image encoders (`--format`), chosen for what the loaders decode fastest:

- ``png16``: 16-bit grayscale PNG, zlib level 1 with the Huffman-only strategy (`PNG_LEVEL`,
  `PNG_STRATEGY`). Measured on 1280-px chest images (phantoms and real CXRs; benchmarks/RESULTS.md):
  Pillow's default (level 6) ~205 ms and 2.46-2.60 MB per image, level 1 ~117-151 ms for the same
  size, level 1 Huffman-only ~80 ms for 2.48-2.60 MB (within 1%). The low bits of a 16-bit
  radiograph are noise, so LZ77 string matching finds almost nothing; PNG's row filters plus
  Huffman coding do all the compressing, and skipping the match search halves the time. Any PNG
  decoder reads the result (it is an ordinary zlib stream).
- ``jpg``: 8-bit baseline JPEG (Pillow/libjpeg-turbo, `--quality`, default 95), what nvJPEG
  decodes on the GPU.
- ``jp2``: 16-bit lossless JPEG 2000 (reversible 5/3 wavelet, JP2 container; Pillow's OpenJPEG
  encoder with irreversible=False), decodable by nvJPEG2000 and by Pillow.

Flags a sample's json may carry (problems found, never silently fixed):
  polarity_suspect          body darker than air after the photometric rule (a mislabelled header)
  values_exceed_bits_stored pixel values above BitsStored (masked off)
  low_byte_only             BitsStored >= 10 but every value in 0..255 (the high byte was lost)
  no_window_in_header       --intensity window, but no VOI LUT/window: percentile used
  invalid_window            --intensity window, unusable window width/function: percentile used
  constant_image            all pixels equal (stored as 0)
  multi_frame_first_of_N    only the first of N frames was converted
  roi_lateral / roi_not_chest / roi_unsure   chest region = the seed paper's fixed rectangle
                            (lateral view; unlike a chest; atlas fit not confident): see xray_core.roi
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from data_tools.manifest import salted_id
from data_tools.records import Record
from xray_core.images import (
    DecodeOptions,
    LoadedImage,
    SkipInput,
    polarity_suspect,
    stored_pixels,
    view_filter_reason,
)
from xray_core.load import load_image
from xray_core.roi import ChestRegion, estimate_chest_region_detail, small_copy
from xray_core.shardio import CHECKSUM_FIELD, member_checksums

IMAGE_FORMATS = ("png16", "jpg", "jp2")
FORMAT_EXTENSION = {"png16": "png", "jpg": "jpg", "jp2": "jp2"}
PNG_LEVEL = 1
PNG_STRATEGY = zlib.Z_HUFFMAN_ONLY
ROI_REASON_FLAGS = ("roi_lateral", "roi_not_chest", "roi_unsure")
ROI_PNG_LEVEL = 6  # 128-px masks: compression costs nothing here
DEFAULT_QUALITY = 95


def encode_png(array_hw: np.ndarray, level: int = PNG_LEVEL, strategy: int = PNG_STRATEGY) -> bytes:
    """uint8 -> 8-bit gray PNG, uint16 -> 16-bit gray PNG (zlib `level` and `strategy`)."""
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(array_hw))
    image.save(buffer, format="PNG", compress_level=level, compress_type=strategy)
    return buffer.getvalue()


def encode_jpeg(array_hw: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """uint8 -> baseline 8-bit gray JPEG."""
    from PIL import Image

    assert array_hw.dtype == np.uint8, array_hw.dtype
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array_hw)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_jp2(array_hw: np.ndarray) -> bytes:
    """uint16 -> lossless 16-bit JPEG 2000 in a JP2 container."""
    from PIL import Image

    assert array_hw.dtype == np.uint16, array_hw.dtype
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array_hw)).save(buffer, format="JPEG2000", irreversible=False)
    return buffer.getvalue()


def encode_image(array_hw: np.ndarray, image_format: str, quality: int = DEFAULT_QUALITY) -> bytes:
    if image_format == "png16":
        return encode_png(array_hw)
    if image_format == "jpg":
        return encode_jpeg(array_hw, quality)
    if image_format == "jp2":
        return encode_jp2(array_hw)
    raise ValueError(f"unknown image format {image_format!r}; choose one of {IMAGE_FORMATS}")


def decode_stored(data: bytes) -> np.ndarray:
    """Encoded png/jpg/jp2 bytes -> the stored integer array (uint16 or uint8), as a loader sees it."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def encode_labels(values: list[float | None]) -> bytes:
    """Label values -> labels.npy bytes: float32, NaN for unknown."""
    vector = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
    buffer = io.BytesIO()
    np.save(buffer, vector, allow_pickle=False)
    return buffer.getvalue()


def encode_json(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class SampleOptions:
    """Everything that decides a sample's bytes (the worker processes get one copy)."""

    decode: DecodeOptions = field(default_factory=DecodeOptions)
    image_format: str = "png16"
    long_side: int = 1280
    upsample: bool = False
    quality: int = DEFAULT_QUALITY
    salt: str = ""
    keep_paths: bool = False
    dedup: bool = False
    label_names: tuple[str, ...] = ()


@dataclass
class Sample:
    """One encoded sample plus what the shard writer aggregates (exact integer pixel sums)."""

    key: str
    split: str
    components: dict[str, bytes]
    pixel_sum: int
    pixel_sumsq: int
    num_pixels: int
    labels: dict[str, float | None]
    id_row: tuple[str, str, str, str, str]  # key, patient hash, study hash, source_id, source path
    pixel_hash: str | None = None
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    roi_path: str = ""  # which chest region the sample carries (see `roi_path`), counted per shard

    @property
    def num_bytes(self) -> int:
        return sum(len(v) for v in self.components.values())


def _check_view(view: str | None, views: frozenset[str] | None) -> None:
    reason = view_filter_reason(view, views)
    if reason:
        raise SkipInput(reason)


def _load(record: Record, decode: DecodeOptions) -> LoadedImage:
    """Decode with the view filter applied to the source's view if it has one, else the header's.

    A DICOM's header view is filtered before its pixels are decoded (`dicom.filter_reason`); the
    check after loading is what filters other images, which carry no view.
    """
    if record.view:
        _check_view(record.view, decode.views)
        return load_image(record.source_path, replace(decode, views=None))
    loaded = load_image(record.source_path, decode)
    _check_view(loaded.view, decode.views)
    return loaded


def pixel_sums(stored_hw: np.ndarray) -> tuple[int, int]:
    """(sum, sum of squares) of integer pixels, exact (int64 per pixel, Python int totals)."""
    flat = stored_hw.reshape(-1).astype(np.int64)
    return int(flat.sum()), int(np.dot(flat, flat))


def _meta(
    record: Record, key: str, split: str, loaded: LoadedImage, size_hw, labels: dict, options: SampleOptions
) -> dict:
    """The sample's json (the contract in BRIEF/shardio); ids salted, no paths unless keep_paths.

    labels: {name: 1.0/0.0/-1.0/None} in the order of options.label_names."""
    spacing = None
    if loaded.pixel_spacing:
        (height, width), (h, w) = loaded.original_size, size_hw
        spacing = [
            round(loaded.pixel_spacing[0] * height / h, 6),
            round(loaded.pixel_spacing[1] * width / w, 6),
        ]
    report = None
    if record.report:
        report = {
            "findings": record.report.get("findings") or "",
            "impression": record.report.get("impression") or "",
        }
    meta = {
        "key": key,
        "dataset": record.dataset,
        "patient": salted_id(options.salt, "patient", record.patient_id),
        "study": salted_id(options.salt, "study", record.study_id),
        "view": record.view or loaded.view,
        "labels": {k: None if v is None else int(v) for k, v in labels.items()},
        "report": report,
        "split": split,
        "original_size": list(loaded.original_size),
        "size": list(size_hw),
        "pixel_spacing": spacing,
        "photometric": loaded.photometric,
        "intensity_policy": loaded.intensity_policy,
        "flags": list(loaded.flags),
        "roi_box": None,
    }
    if record.view_order is not None:
        meta["view_order"] = record.view_order
    if options.keep_paths:
        meta.update(source_id=record.source_id, source_path=str(record.source_path))
        meta.update(patient_id=record.patient_id, study_id=record.study_id)
    return meta


def region_meta(region: ChestRegion) -> dict:
    """The json keys of a chest region: box, method ("fitted" | "rectangle"), confidence (0..1)."""
    return {"roi_box": region.box, "roi_method": region.method, "roi_confidence": region.confidence}


def region_flags(region: ChestRegion) -> list[str]:
    """["roi_lateral" | "roi_not_chest" | "roi_unsure"] when the region is the fixed rectangle, else []."""
    return [f"roi_{region.reason}"] if region.reason else []


def roi_path(meta: dict) -> str:
    """Which chest region a sample's json says it carries: "fitted", "rectangle (lateral|not_chest|
    unsure)", or "old estimate" for shards converted before `roi_method` existed."""
    method = meta.get("roi_method")
    if method is None:
        return "old estimate"
    reasons = [flag[len("roi_") :] for flag in meta["flags"] if flag in ROI_REASON_FLAGS]
    return f"{method} ({', '.join(reasons)})" if reasons else method


def build_sample(record: Record, key: str, split: str, options: SampleOptions) -> Sample:
    """Decode, resize, estimate the chest region and encode one record. Raises SkipInput."""
    clock = time.process_time
    t0 = clock()
    loaded = _load(record, options.decode)
    t1 = clock()
    stored = stored_pixels(loaded.unit_hw, options.image_format, options.long_side, options.upsample)
    size_hw = stored.shape
    loaded.unit_hw = None  # release the full-size float image, the largest object of the worker
    t2 = clock()
    small = small_copy(stored)
    labels = {name: record.labels.get(name) for name in options.label_names}
    meta = _meta(record, key, split, loaded, size_hw, labels, options)
    region = estimate_chest_region_detail(stored, small, view=meta["view"])
    meta.update(region_meta(region))
    meta["flags"] += region_flags(region)
    if polarity_suspect(small):
        meta["flags"].append("polarity_suspect")
    t3 = clock()
    image_bytes = encode_image(stored, options.image_format, options.quality)
    components = {
        FORMAT_EXTENSION[options.image_format]: image_bytes,
        "roi.png": encode_png(region.mask_hw, ROI_PNG_LEVEL, zlib.Z_DEFAULT_STRATEGY),
        "labels.npy": encode_labels(list(labels.values())),
    }
    meta[CHECKSUM_FIELD] = member_checksums(components)
    components["json"] = encode_json(meta)
    # Statistics over the pixels a loader will see: a lossy JPEG is decoded again to get them.
    seen = decode_stored(image_bytes) if options.image_format == "jpg" else stored
    pixel_sum, pixel_sumsq = pixel_sums(seen)
    t4 = clock()
    pixel_hash = None
    if options.dedup:
        pixel_hash = hashlib.sha256(f"{stored.shape}{stored.dtype}".encode() + stored.tobytes()).hexdigest()
    id_row = (key, meta["patient"] or "", meta["study"] or "", record.source_id, str(record.source_path))
    seconds = {"decode": t1 - t0, "resize": t2 - t1, "roi": t3 - t2, "encode": t4 - t3}
    return Sample(
        key, split, components, pixel_sum, pixel_sumsq, int(seen.size), labels, id_row, pixel_hash, seconds,
        roi_path(meta),
    )  # fmt: skip
