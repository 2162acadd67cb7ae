"""Chest-region estimate from the image itself (numpy + scipy.ndimage, on a copy of long side <= 128).

    estimate_chest_region(image_hw) -> (mask_hw uint8 0/255, box [y0, x0, y1, x1] as fractions)

Air is dark. Method, on a small copy normalized to its 1st..99th percentile and lightly smoothed:
Otsu's threshold splits it into dark (outside air + lungs) and bright (soft tissue, bone). The image
is split at the mediastinum (the brightest central column band); in each half the largest dark
component that (nearly) does not touch the top, bottom or outer edge is that side's lung field,
eroding step by step to cut thin bridges to the outside air. A side that finds none takes the
mirror image of the other. The region is the lungs filled row by row between their outer edges
(which takes in the mediastinum and heart), closed and slightly dilated. If no lung field is found,
the region is the body (bright part, holes filled); if that fails too, the central 80% box.
`estimate_chest_region_detail` also says which of the three was used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROI_LONG_SIDE = 128
MIN_LUNG_FRACTION = 0.01  # a lung field covers at least 1% of the image
MIN_REGION_FRACTION = 0.05
SMOOTH_SIGMA = 0.7  # px at 128: removes noise, keeps the thin chest wall between lung and air
MAX_BORDER_CONTACT = 0.05  # a lung may touch the half-image's edges along at most 5% of them
MAX_EROSIONS = 6  # at 128 px: dark bridges up to ~12 px wide are cut
FALLBACK_BOX = (0.1, 0.1, 0.9, 0.9)


@dataclass
class ChestRegion:
    mask_hw: np.ndarray  # uint8 0/255, long side = min(128, image long side)
    box: list[float]  # [y0, x0, y1, x1] fractions of the image, y1/x1 exclusive
    method: str  # "lungs" | "body" | "fallback"


def roi_size(size_hw: tuple[int, int], long_side: int = ROI_LONG_SIDE) -> tuple[int, int]:
    """(h, w) of the mask for an image of `size_hw`: same aspect, long side = min(long_side, image's)."""
    height, width = size_hw
    scale = min(1.0, long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def small_copy(image_hw: np.ndarray, long_side: int = ROI_LONG_SIDE) -> np.ndarray:
    """Area-averaged float32 copy with long side <= `long_side`, normalized to [0, 1] (1st..99th pct)."""
    from PIL import Image

    size = roi_size(image_hw.shape[:2], long_side)
    small = np.asarray(image_hw, dtype=np.float32)
    if small.shape != size:
        resized = Image.fromarray(np.ascontiguousarray(small), mode="F").resize(
            (size[1], size[0]), Image.Resampling.BOX
        )
        small = np.asarray(resized, dtype=np.float32)
    low, high = np.percentile(small, [1, 99])
    if high <= low:
        return np.zeros(size, dtype=np.float32)
    return np.clip((small - low) / (high - low), 0.0, 1.0)


def otsu_threshold(values: np.ndarray, num_bins: int = 128) -> float:
    """Otsu's threshold of values in [0, 1]: maximizes the between-class variance."""
    hist, edges = np.histogram(values, bins=num_bins, range=(0.0, 1.0))
    centers = 0.5 * (edges[:-1] + edges[1:])
    weight0 = np.cumsum(hist).astype(np.float64)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centers)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[1:][int(np.argmax(between))])


def _largest_inner_component(dark_hw: np.ndarray, outer_side: int) -> np.ndarray | None:
    """The largest dark component of one half-image that does not touch its top, bottom or outer
    side (`outer_side` 0 = left column, -1 = right column), or None.

    A lung often meets the outside air through a thin dark bridge (axilla, neck, a cropped edge) at
    this resolution, so the mask is eroded more and more until such bridges break; the component
    found is then dilated as much as it was eroded (an opening: a smooth shape without the bridge).
    """
    from scipy import ndimage

    for num_erosions in range(1, MAX_EROSIONS + 1):
        core = ndimage.binary_erosion(dark_hw, iterations=num_erosions, border_value=1)
        labels, num = ndimage.label(core)
        if num == 0:
            return None
        edge = np.concatenate([labels[0], labels[-1], labels[:, outer_side]])
        contact = np.bincount(edge, minlength=num + 1)[1:]
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, num + 1))
        sizes[contact > MAX_BORDER_CONTACT * edge.size] = 0
        best = int(np.argmax(sizes))
        if sizes[best] >= MIN_LUNG_FRACTION * 2 * core.size:
            return ndimage.binary_dilation(labels == best + 1, iterations=num_erosions)
    return None


def _midline(small_hw: np.ndarray) -> int:
    """Column of the mediastinum: the brightest column band in the central 30..70% of the width."""
    h, w = small_hw.shape
    profile = small_hw[int(0.2 * h) : int(0.8 * h)].mean(axis=0)
    lo, hi = int(0.3 * w), max(int(0.3 * w) + 1, int(0.7 * w))
    return lo + int(np.argmax(profile[lo:hi]))


def _lung_fields(small_hw: np.ndarray, dark_hw: np.ndarray) -> np.ndarray | None:
    """Left and right lung fields, each searched in its own half (split at the mediastinum), or None.

    Searching the halves apart keeps one lung that merges with the outside air from hiding the other.
    """
    mid = _midline(small_hw)
    w = dark_hw.shape[1]
    left = _largest_inner_component(dark_hw[:, :mid], outer_side=0)
    right = _largest_inner_component(dark_hw[:, mid:], outer_side=-1)
    if left is None and right is None:
        return None
    lungs = np.zeros_like(dark_hw)
    if left is not None:
        lungs[:, :mid] = left
    if right is not None:
        lungs[:, mid:] = right
    if left is None or right is None:
        # One side merged with the outside air: assume the other lung's mirror image (chests are
        # roughly symmetric about the mediastinum), clipped to the image.
        cols = np.arange(w)
        mirrored = 2 * mid - cols
        inside = (mirrored >= 0) & (mirrored < w)
        lungs[:, cols[inside]] |= lungs[:, mirrored[inside]]
    return lungs


def _fill_rows(mask_hw: np.ndarray) -> np.ndarray:
    """Fill each row between its first and last set pixel (joins the lungs across the mediastinum)."""
    filled = np.zeros_like(mask_hw)
    rows = np.flatnonzero(mask_hw.any(axis=1))
    for y in rows:
        xs = np.flatnonzero(mask_hw[y])
        filled[y, xs[0] : xs[-1] + 1] = True
    return filled


def _body(bright_hw: np.ndarray) -> np.ndarray | None:
    from scipy import ndimage

    labels, num = ndimage.label(bright_hw)
    if num == 0:
        return None
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, num + 1))
    body = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    return body if body.mean() >= MIN_REGION_FRACTION else None


def _box(mask_hw: np.ndarray) -> list[float]:
    h, w = mask_hw.shape
    ys, xs = np.flatnonzero(mask_hw.any(axis=1)), np.flatnonzero(mask_hw.any(axis=0))
    return [round(ys[0] / h, 4), round(xs[0] / w, 4), round((ys[-1] + 1) / h, 4), round((xs[-1] + 1) / w, 4)]


def estimate_chest_region_detail(image_hw: np.ndarray, small_hw: np.ndarray | None = None) -> ChestRegion:
    """Chest region of a grayscale image (any dtype, air dark); see the module docstring.

    small_hw: `small_copy(image_hw)` if the caller already made it.
    """
    from scipy import ndimage

    small = ndimage.gaussian_filter(
        small_copy(image_hw) if small_hw is None else small_hw, sigma=SMOOTH_SIGMA
    )
    h, w = small.shape
    if min(h, w) >= 8 and small.max() > small.min():
        threshold = otsu_threshold(small)
        lungs = _lung_fields(small, small < threshold)
        if lungs is not None:
            region = ndimage.binary_closing(_fill_rows(lungs), iterations=2)
            region = ndimage.binary_dilation(ndimage.binary_fill_holes(region), iterations=1)
            if region.mean() >= MIN_REGION_FRACTION:
                return ChestRegion(region.astype(np.uint8) * 255, _box(region), "lungs")
        body = _body(small >= threshold)
        if body is not None:
            return ChestRegion(body.astype(np.uint8) * 255, _box(body), "body")
    y0, x0, y1, x1 = FALLBACK_BOX
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[int(y0 * h) : max(int(y0 * h) + 1, int(y1 * h)), int(x0 * w) : max(int(x0 * w) + 1, int(x1 * w))] = (
        255
    )
    return ChestRegion(mask, _box(mask > 0), "fallback")


def estimate_chest_region(image_hw: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """(mask_hw uint8 0/255 at long side <= 128, box [y0, x0, y1, x1] fractions); air dark."""
    region = estimate_chest_region_detail(image_hw)
    return region.mask_hw, region.box
