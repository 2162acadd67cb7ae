"""Any input file -> one grayscale float image in [0, 1] with air dark, plus what was done to get it.

The pieces every decoder shares live here: recognizing a file by its content (`sniff_kind`), the
intensity policies (`affine_for_range`, `percentile_range`, `apply_affine`), the Pillow path for
PNG/JPEG/TIFF/BMP/GIF/JPEG 2000 files (`load_pillow_image`), the area-averaging resize and the
polarity check. DICOM decoding is in `xray_core.dicom`; `xray_core.load.load_image` picks one by
content.

Intensity policies (`--intensity`), applied to every input, DICOM or not:

- ``percentile`` (default): clip to the 0.5th..99.5th percentile of the image's own pixels (padding
  excluded) and stretch that to the full 16-bit range. Why the default: a million images from many
  vendors and datasets do not agree on bit depth, window or LUT (PNG/JPEG datasets have none), and
  the loaders normalize every image with one mean/std; a per-image robust stretch puts every image
  on the same footing, keeps the whole 16-bit range for the anatomy, and stops a few extreme pixels
  (burned-in text, markers, collimator edges, dead pixels) from squeezing the contrast.
- ``window``: the header's VOI LUT Sequence, else its first Window Center/Width (LINEAR,
  LINEAR_EXACT or SIGMOID), as a viewer would show it. Images without either fall back to
  ``percentile`` and get the flag ``no_window_in_header``. PNG/JPEG files are already windowed for
  display, so for them ``window`` keeps their values (``raw``).
- ``raw``: the stored values (after the modality LUT), scaled linearly from the nominal range given
  by BitsStored (PNG/JPEG: 8 or 16 bit) to the full output range; nothing is clipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INTENSITY_POLICIES = ("percentile", "window", "raw")
FRAME_POLICIES = ("first", "skip")
PERCENTILE_LOW, PERCENTILE_HIGH = 0.5, 99.5
# Percentiles are taken on a strided subsample of about this many pixels: the same numbers to a
# fraction of a grey level, at a small fraction of the cost of sorting a 3000x3000 image.
PERCENTILE_SAMPLE_PIXELS = 1 << 20

# Magic numbers of the image formats Pillow decodes here (DICOM is recognized separately).
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),
    (b"\xff\x4f\xff\x51", "j2k"),
)


class SkipInput(Exception):
    """This input becomes a skipped.jsonl line with this message as its reason (never a crash)."""


# Largest image (rows x columns of one frame) decoded: a 4300 x 4300 detector is 18.5 M pixels. A
# header claiming more is refused before any decoding, so a bogus size cannot exhaust a worker's memory
# (the float pass alone takes 4 bytes a pixel).
DEFAULT_MAX_PIXELS = 50_000_000


def check_pixel_count(rows: int, columns: int, max_pixels: int) -> None:
    """SkipInput for an empty image or one larger than `max_pixels` (``--max-pixels``)."""
    if rows < 1 or columns < 1:
        raise SkipInput(f"image of {rows} x {columns} pixels: no pixels")
    if rows * columns > max_pixels:
        raise SkipInput(
            f"image of {rows} x {columns} = {rows * columns:,} pixels exceeds --max-pixels {max_pixels:,}"
        )


@dataclass(frozen=True)
class DecodeOptions:
    """What the decoders accept and how they map intensities (see the module docstring).

    `modalities` / `body_parts` / `views`: upper-case sets, or None for "any". `body_parts` may hold
    "ABSENT" to accept files without BodyPartExamined.
    """

    intensity: str = "percentile"
    modalities: frozenset[str] | None = frozenset({"CR", "DX"})
    body_parts: frozenset[str] | None = frozenset({"CHEST", "THORAX", "ABSENT"})
    views: frozenset[str] | None = None
    allow_for_processing: bool = False
    frames: str = "first"
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class LoadedImage:
    """One decoded input at full resolution.

    unit_hw: (H, W) float32 in [0, 1], air dark (0 = darkest). pixel_spacing: (row, col) mm of the
    original pixels or None. photometric: what was applied ("MONOCHROME1->inverted", "RGB->gray").
    """

    unit_hw: np.ndarray
    photometric: str
    intensity_policy: str
    flags: list[str] = field(default_factory=list)
    pixel_spacing: tuple[float, float] | None = None
    view: str | None = None
    original_size: tuple[int, int] = field(init=False)  # (H, W), kept when unit_hw is released

    def __post_init__(self) -> None:
        self.original_size = int(self.unit_hw.shape[0]), int(self.unit_hw.shape[1])


def view_filter_reason(view: str | None, views: frozenset[str] | None) -> str | None:
    """Why an image of `view` (None: unknown) is filtered out by `--views`, or None to keep it.

    An unknown view is the name UNKNOWN, so `--views PA,UNKNOWN` keeps images that do not say.
    """
    if views is None or (view or "UNKNOWN") in views:
        return None
    return f"filtered: view {view or 'unknown'} not in --views {','.join(sorted(views))}"


def sniff_kind(head: bytes) -> str:
    """'dicom' (preamble + DICM), an image format name from its magic number, or 'unknown'.

    `head` is the first 132 bytes or more. 'unknown' files may still be DICOM without a preamble;
    `xray_core.dicom.read_dataset` decides that by parsing.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for magic, kind in _IMAGE_MAGIC:
        if head.startswith(magic):
            return kind
    return "unknown"


def percentile_range(values_hw: np.ndarray, valid_hw: np.ndarray | None = None) -> tuple[float, float]:
    """(low, high) percentiles of the pixels where `valid_hw` is True, on a strided subsample.

    Falls back to min/max when the percentiles coincide (a nearly constant image). Raises SkipInput
    when there is no valid pixel at all.
    """
    step = max(1, int(np.sqrt(values_hw.size / PERCENTILE_SAMPLE_PIXELS)))
    sample = values_hw[::step, ::step]
    if valid_hw is not None:
        sample = sample[valid_hw[::step, ::step]]
    if sample.size == 0:
        raise SkipInput("every pixel is padding (PixelPaddingValue)")
    low, high = np.percentile(sample, [PERCENTILE_LOW, PERCENTILE_HIGH])
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    return float(low), float(high)


def affine_for_range(
    low: float, high: float, slope: float = 1.0, intercept: float = 0.0
) -> tuple[float, float]:
    """(scale, offset) mapping stored values v with m = slope * v + intercept to (m - low) / (high - low).

    `low`/`high` are in output (modality) units. A degenerate range maps everything to 0.
    """
    if not high > low:
        return 0.0, 0.0
    return slope / (high - low), (intercept - low) / (high - low)


def apply_affine(values_hw: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """clip(values * scale + offset, 0, 1) as a new float32 array, in place after one conversion."""
    unit = values_hw.astype(np.float32)
    unit *= np.float32(scale)
    unit += np.float32(offset)
    np.clip(unit, 0.0, 1.0, out=unit)
    return unit


def luma(rgb_hwc: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) float32 ITU-R BT.601 luma (the weights Pillow's convert('L') uses)."""
    out = rgb_hwc[..., 0].astype(np.float32) * np.float32(0.299)
    out += rgb_hwc[..., 1].astype(np.float32) * np.float32(0.587)
    out += rgb_hwc[..., 2].astype(np.float32) * np.float32(0.114)
    return out


def unit_from_values(
    values_hw: np.ndarray, nominal: tuple[float, float], policy: str, valid_hw: np.ndarray | None = None
) -> tuple[np.ndarray, str, list[str]]:
    """Stored values (no header window) -> ((H, W) float32 in [0, 1], policy applied, flags).

    nominal: the (low, high) the format can hold, used by `raw`. `window` on data without a header
    window is `raw` (PNG/JPEG are already display-windowed).
    """
    flags: list[str] = []
    if policy == "percentile":
        low, high = percentile_range(values_hw, valid_hw)
    else:
        low, high = nominal
        policy = "raw"
    if not high > low:
        flags.append("constant_image")
    scale, offset = affine_for_range(low, high)
    return apply_affine(values_hw, scale, offset), policy, flags


def _pillow_values(image) -> tuple[np.ndarray, tuple[float, float], str]:
    """A loaded Pillow image -> ((H, W) values, nominal (low, high), photometric description)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image).astype(np.uint16, copy=False), (0.0, 65535.0), mode
    if mode in ("L", "1", "LA", "La"):
        values = np.asarray(image.convert("L") if mode != "L" else image)
        return values, (0.0, 255.0), "L" if mode == "L" else f"{mode}->L"
    if mode in ("I", "F"):
        values = np.asarray(image)
        low, high = float(values.min()), float(values.max())
        if mode == "I" and low >= 0 and high <= 65535:
            return values, (0.0, 65535.0), "I (16-bit)"  # 16-bit files some Pillow versions open as 'I'
        return values, (low, high), mode
    rgb = np.asarray(image.convert("RGB"))
    return luma(rgb), (0.0, 255.0), f"{mode}->gray"


def load_pillow_image(path: Path, options: DecodeOptions) -> LoadedImage:
    """PNG (8/16-bit), JPEG, TIFF, BMP, GIF, JPEG 2000 via Pillow; colour -> BT.601 luma."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            check_pixel_count(image.height, image.width, options.max_pixels)
            num_frames = getattr(image, "n_frames", 1)
            if num_frames > 1 and options.frames == "skip":
                raise SkipInput(f"multi-frame image ({num_frames} frames) and --frames skip")
            image.load()
            image = ImageOps.exif_transpose(image)
            values, nominal, photometric = _pillow_values(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise SkipInput(f"undecodable image file: {type(error).__name__}: {error}") from error
    if values.ndim != 2 or min(values.shape) < 1:
        raise SkipInput(f"image has shape {values.shape}, expected 2-D")
    policy = "raw" if options.intensity == "window" else options.intensity
    unit, applied, flags = unit_from_values(values, nominal, policy)
    if num_frames > 1:
        flags.append(f"multi_frame_first_of_{num_frames}")
    return LoadedImage(unit, photometric, applied, flags)


def output_size(size_hw: tuple[int, int], long_side: int, upsample: bool) -> tuple[int, int]:
    """(h, w) with the long side = `long_side` and the aspect kept; unchanged if smaller, unless upsample."""
    height, width = size_hw
    scale = long_side / max(height, width)
    if scale >= 1.0 and not upsample:
        return height, width
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_unit(unit_hw: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a float32 image: area averaging (Pillow BOX, in float) down, bilinear up."""
    from PIL import Image

    if tuple(unit_hw.shape) == tuple(size_hw):
        return unit_hw
    height, width = size_hw
    downscale = height <= unit_hw.shape[0] and width <= unit_hw.shape[1]
    resample = Image.Resampling.BOX if downscale else Image.Resampling.BILINEAR
    resized = Image.fromarray(np.ascontiguousarray(unit_hw, dtype=np.float32), mode="F").resize(
        (width, height), resample
    )
    return np.asarray(resized, dtype=np.float32)


FULL_SCALE = {"png16": 65535, "jpg": 255, "jp2": 65535}  # stored value of 1.0, per image format


def stored_pixels(unit_hw: np.ndarray, image_format: str, long_side: int, upsample: bool) -> np.ndarray:
    """What a shard stores for a decoded image: resized to `long_side` (aspect kept) and quantized to
    the format's integer range. `xray-shard convert` and inference on raw files (`xray-pretrain
    predict`) both call this, so a model sees the same pixels either way."""
    if image_format not in FULL_SCALE:
        raise ValueError(f"unknown image format {image_format!r}; one of {tuple(FULL_SCALE)}")
    size_hw = output_size(unit_hw.shape[:2], long_side, upsample)
    return quantize(resize_unit(unit_hw, size_hw), FULL_SCALE[image_format])


def quantize(unit_hw: np.ndarray, full_scale: int) -> np.ndarray:
    """[0, 1] float -> rounded integers 0..full_scale (255 -> uint8, 65535 -> uint16)."""
    dtype = np.uint8 if full_scale == 255 else np.uint16
    scaled = unit_hw * np.float32(full_scale)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, full_scale, out=scaled)
    return scaled.astype(dtype)


def polarity_suspect(small_hw: np.ndarray) -> bool:
    """True if a chest image looks inverted after the photometric rule (body darker than air).

    On a small normalized copy: a correct chest radiograph has its mediastinum strip brighter than
    the lung fields beside it, and its centre brighter than its border (air, or bright collimation).
    An inverted one fails both; requiring both keeps collimated or lateral views from being flagged.
    """
    h, w = small_hw.shape
    if min(h, w) < 16:
        return False

    def mean(y0, y1, x0, x1):
        return float(small_hw[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)].mean())

    mediastinum = mean(0.3, 0.7, 0.44, 0.56)
    lungs = 0.5 * (mean(0.3, 0.6, 0.18, 0.34) + mean(0.3, 0.6, 0.66, 0.82))
    centre = mean(0.25, 0.75, 0.25, 0.75)
    frame = np.ones((h, w), dtype=bool)
    bh, bw = max(1, int(0.06 * h)), max(1, int(0.06 * w))
    frame[bh:-bh, bw:-bw] = False
    border = float(small_hw[frame].mean())
    return mediastinum < lungs and border > centre
