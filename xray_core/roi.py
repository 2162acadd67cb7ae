"""Chest-region estimate from the image itself: a lung-box atlas fitted to each image (numpy, scipy).

    estimate_chest_region(image_hw) -> (mask_hw uint8 0/255, box [y0, x0, y1, x1] as fractions)
    estimate_chest_region_detail(image_hw, view=None) -> ChestRegion (mask, box, method, confidence)

The region is the box around both lung fields (apices to costophrenic angles, lateral rib margins).
Thresholding the dark lungs fails on real radiographs exactly where it matters (white-out, effusion,
consolidated bases, tubes, arms, black collimation), so the box is found from the whole chest's
appearance instead: `xray_core.roi_atlas.ATLAS` is the mean standardized radiograph sampled on a grid
laid over the lung box with a margin around it (shoulders, mediastinum, hemidiaphragms, abdomen, chest
wall), learned from hand-drawn lung boxes on real radiographs (`python -m data_tools.roi_fit`).
A box is scored by the masked Pearson correlation between the atlas and the image sampled on that
box's grid (pixels outside the image ignored), minus `LUNG_WEIGHT` x the share of the visible
(dark) lung fields the box leaves out: where the lungs can be seen they must be inside, where they
are opacified the atlas decides. A coarse grid search over centre, width, top and aspect, then a
local refinement, picks the best box, on a copy of long side 64.

Confidence = that correlation (1 = looks exactly like the mean chest). Below `MIN_CONFIDENCE`
(reason "unsure"; below `NOT_CHEST_CONFIDENCE`, "not_chest": measured, non-chest, inverted and
corrupt images score lower than every chest radiograph of the tuning half) or for a lateral view
(reason "lateral", from the record's view), the region is the seed paper's fixed rectangle
(`SEED_RECTANGLE`, method "rectangle"): context-aware masking then masks that image as the paper
does instead of masking a wrong box harder. The choice is made here, at conversion time, and
stored as the sample's roi.png / roi_box, so every loader (wds, DALI) and the masking code stay
unaware of it; `xray-shard refresh-roi` re-decides it for old shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROI_LONG_SIDE = 128
SEARCH_LONG_SIDE = 64  # the atlas is matched on a copy this size: enough for a box, ~10 ms
# The seed paper's fixed "chest region" as fractions of the image, [y0, x0, y1, x1]: rows 6-15 and
# columns 3-15 (inclusive) of its 20x20 grid of 64-px patches at 1280 px. The same rectangle as
# xray_pretrain.models.masking's SEED_RECT_ROWS / SEED_RECT_COLS (models import nothing outside
# themselves, so it is written twice; tests/test_roi_real.py keeps the two equal).
SEED_RECTANGLE = (6 / 20, 3 / 20, 16 / 20, 16 / 20)
LATERAL_VIEWS = frozenset({"LATERAL", "LL", "RL", "LAT", "LLD", "RLD"})
MIN_CONFIDENCE = 0.6  # lowest chest radiograph of the tuning half: 0.67
NOT_CHEST_CONFIDENCE = 0.4  # below: unlike any chest (measured: canine 0.29, tibia 0.16, inverted 0.37)
MIN_COVERAGE = 0.5  # a candidate box's grid must lie at least half inside the image
# Search ranges (fractions of the image; aspect = box height / width in pixels), from the spread of
# the hand-drawn boxes (widths 0.62-0.93, aspect 0.70-1.10, tops 0.00-0.23) with room on each side.
WIDTHS = (0.45, 1.05)
ASPECTS = (0.6, 1.25)
CENTRES_X = (0.35, 0.65)
TOPS = (-0.08, 0.4)
NUM_COARSE = (5, 4, 6, 7)  # grid points for width, aspect, centre x, top
NUM_REFINE = 4  # local refinements, each halving the step
NUM_STARTS = 3  # coarse boxes refined
# Visible lung fields (the dark-component estimate) constrain the box: the score of a box is its atlas
# correlation minus LUNG_WEIGHT x the share of the visible lung pixels it leaves out.
LUNG_WEIGHT = 1.0
SMOOTH_SIGMA = 0.7  # px at 128: removes noise, keeps the thin chest wall between lung and air
MIN_LUNG_FRACTION = 0.01  # a lung field covers at least 1% of the image
MAX_BORDER_CONTACT = 0.05  # a lung may touch the half-image's edges along at most 5% of them
MAX_EROSIONS = 6  # at 128 px: dark bridges up to ~12 px wide are cut


@dataclass
class ChestRegion:
    mask_hw: np.ndarray  # uint8 0/255, long side = min(128, image long side)
    box: list[float]  # [y0, x0, y1, x1] fractions of the image, y1/x1 exclusive
    method: str  # "fitted" (the atlas box) | "rectangle" (the seed paper's fixed rectangle)
    confidence: float  # atlas correlation of the best box, 0..1 (0 when nothing could be fitted)
    reason: str | None = None  # why the rectangle: "lateral" | "not_chest" | "unsure"; None when fitted


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


def visible_lungs(small_hw: np.ndarray) -> np.ndarray | None:
    """The dark lung fields that can be seen (bool, small_hw's shape), or None: Otsu's threshold on a
    lightly smoothed copy, then per half (split at the mediastinum) the largest dark component that
    does not reach the image's edges. Misses opacified lung, so it only constrains the box."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(small_hw, sigma=SMOOTH_SIGMA)
    if min(smooth.shape) < 8 or smooth.max() <= smooth.min():
        return None
    lungs = _lung_fields(smooth, smooth < otsu_threshold(smooth))
    return lungs if lungs is not None and lungs.mean() >= MIN_LUNG_FRACTION else None


def _outside_fraction(lungs_hw: np.ndarray | None, boxes_N4: np.ndarray) -> np.ndarray:
    """(N,) share of the visible lung pixels outside each box (0 without visible lungs)."""
    if lungs_hw is None:
        return np.zeros(len(boxes_N4), dtype=np.float32)
    h, w = lungs_hw.shape
    table = np.zeros((h + 1, w + 1), dtype=np.float64)  # summed-area table
    table[1:, 1:] = lungs_hw.cumsum(axis=0).cumsum(axis=1)
    rows = np.clip(np.rint(boxes_N4[:, [0, 2]] * h), 0, h).astype(np.int64)
    cols = np.clip(np.rint(boxes_N4[:, [1, 3]] * w), 0, w).astype(np.int64)
    (r0, r1), (c0, c1) = rows.T, cols.T
    inside = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return (1.0 - inside / table[-1, -1]).astype(np.float32)


def sample_frames(small_hw: np.ndarray, boxes_N4: np.ndarray, grid: int, margin: float):
    """Nearest-pixel samples of `small_hw` on each box's atlas grid: values (N, grid*grid) float32 and
    validity (N, grid*grid) float32 (1 inside the image)."""
    h, w = small_hw.shape
    steps = -margin + (np.arange(grid) + 0.5) / grid * (1 + 2 * margin)
    ys = boxes_N4[:, :1] + steps[None] * (boxes_N4[:, 2:3] - boxes_N4[:, :1])  # (N, grid) fractions
    xs = boxes_N4[:, 1:2] + steps[None] * (boxes_N4[:, 3:4] - boxes_N4[:, 1:2])
    rows, cols = np.floor(ys * h).astype(np.int64), np.floor(xs * w).astype(np.int64)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    values = small_hw[np.clip(rows, 0, h - 1)[:, :, None], np.clip(cols, 0, w - 1)[:, None, :]]
    num = boxes_N4.shape[0]
    return values.reshape(num, -1), valid.reshape(num, -1).astype(np.float32)


def _correlations(small_hw: np.ndarray, boxes_N4: np.ndarray, atlas: np.ndarray, margin: float) -> np.ndarray:
    """Masked Pearson correlation of the atlas with each box's samples; -1 where coverage is too low."""
    grid = atlas.shape[0]
    values, valid = sample_frames(small_hw, boxes_N4, grid, margin)
    t = atlas.reshape(-1).astype(np.float32)
    n = valid.sum(axis=1)
    vp = valid * values
    s_p, s_pp = vp.sum(axis=1), (vp * values).sum(axis=1)
    s_t, s_tt, s_pt = valid @ t, valid @ (t * t), vp @ t
    n_safe = np.maximum(n, 1.0)
    cov = s_pt - s_p * s_t / n_safe
    var = np.maximum(s_pp - s_p**2 / n_safe, 0.0) * np.maximum(s_tt - s_t**2 / n_safe, 0.0)
    corr = cov / np.sqrt(np.maximum(var, 1e-12))
    return np.where((n >= MIN_COVERAGE * grid * grid) & (var > 1e-12), corr, -1.0)


def _boxes(widths, aspects, centres, tops, image_aspect: float) -> np.ndarray:
    """All combinations as [y0, x0, y1, x1] fractions; image_aspect = image width / height."""
    w, a, c, t = (g.reshape(-1) for g in np.meshgrid(widths, aspects, centres, tops, indexing="ij"))
    height = w * a * image_aspect  # aspect is in pixels: height_px = a * width_px
    return np.stack([t, c - w / 2, t + height, c + w / 2], axis=1)


def _scores(search_hw, boxes_N4, atlas, margin, lungs_hw) -> tuple[np.ndarray, np.ndarray]:
    """(score, atlas correlation) of each box: score = correlation - LUNG_WEIGHT x lungs left out."""
    correlation = _correlations(search_hw, boxes_N4, atlas, margin)
    return correlation - LUNG_WEIGHT * _outside_fraction(lungs_hw, boxes_N4), correlation


def _refine(search_hw, start, step, atlas, margin, lungs_hw) -> tuple[np.ndarray, float, float]:
    """Local search around `start` (width, aspect, centre x, top), halving `step` each round:
    (best parameters, their score, their atlas correlation)."""
    h, w = search_hw.shape
    best, score, correlation = start, -np.inf, -1.0
    for _ in range(NUM_REFINE):
        step = step / 2
        local = [best[i] + step[i] * np.array([-1.0, 0.0, 1.0]) for i in range(4)]
        params = np.stack(np.meshgrid(*local, indexing="ij"), axis=-1).reshape(-1, 4)
        scores, correlations = _scores(search_hw, _boxes(*local, w / h), atlas, margin, lungs_hw)
        i = int(np.argmax(scores))
        best, score, correlation = params[i], float(scores[i]), float(correlations[i])
    return best, score, correlation


def fit_box(
    search_hw: np.ndarray, atlas: np.ndarray, margin: float, lungs_hw: np.ndarray | None = None
) -> tuple[list[float], float]:
    """Best box [y0, x0, y1, x1] (fractions, not clipped) and its correlation with the atlas.

    lungs_hw: the visible lung fields (any resolution, same aspect) the box should contain, or None.
    A coarse grid search matches a half-resolution atlas (2x2 cell means: a quarter of the cost); the
    best `NUM_STARTS` coarse boxes are then refined with the full atlas (one start alone can stop in
    a local optimum: a box one rib space too high scores nearly as well at the coarse level)."""
    h, w = search_hw.shape
    ranges = (WIDTHS, ASPECTS, CENTRES_X, TOPS)
    axes = [np.linspace(lo, hi, num) for (lo, hi), num in zip(ranges, NUM_COARSE)]
    params = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 4)
    grid = atlas.shape[0]
    coarse = atlas.reshape(grid // 2, 2, grid // 2, 2).mean(axis=(1, 3))
    scores, _ = _scores(search_hw, _boxes(*axes, w / h), coarse, margin, lungs_hw)
    step = np.array([(hi - lo) / (num - 1) for (lo, hi), num in zip(ranges, NUM_COARSE)])
    starts = np.argsort(-scores)[:NUM_STARTS]
    fits = [_refine(search_hw, params[i], step, atlas, margin, lungs_hw) for i in starts]
    best, _, correlation = max(fits, key=lambda fit: fit[1])
    box = _boxes(*([v] for v in best), w / h)[0]
    return [float(v) for v in box], correlation


def box_mask(box, size_hw: tuple[int, int]) -> np.ndarray:
    """uint8 0/255 mask of `size_hw` with the box [y0, x0, y1, x1] (fractions) set (at least 1 px)."""
    h, w = size_hw
    y0, x0 = int(round(box[0] * h)), int(round(box[1] * w))
    y1, x1 = max(y0 + 1, int(round(box[2] * h))), max(x0 + 1, int(round(box[3] * w)))
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


def _clipped(box) -> list[float]:
    y0, x0 = max(0.0, box[0]), max(0.0, box[1])
    y1, x1 = min(1.0, box[2]), min(1.0, box[3])
    return [round(y0, 4), round(x0, 4), round(max(y1, y0 + 1e-3), 4), round(max(x1, x0 + 1e-3), 4)]


def estimate_chest_region_detail(
    image_hw: np.ndarray, small_hw: np.ndarray | None = None, view: str | None = None
) -> ChestRegion:
    """Chest region of a grayscale image (any dtype, air dark); see the module docstring.

    small_hw: `small_copy(image_hw)` if the caller already made it. view: the record's view position
    (DICOM ViewPosition or the dataset's column); a lateral view gets the fixed rectangle.
    """
    from xray_core.roi_atlas import ATLAS, MARGIN

    small = small_copy(image_hw) if small_hw is None else small_hw
    size = small.shape
    rectangle = ChestRegion(box_mask(SEED_RECTANGLE, size), _clipped(SEED_RECTANGLE), "rectangle", 0.0)
    if view is not None and view.strip().upper() in LATERAL_VIEWS:
        rectangle.reason = "lateral"
        return rectangle
    search = small_copy(small, SEARCH_LONG_SIDE) if max(size) > SEARCH_LONG_SIDE else small
    confidence = 0.0
    if min(search.shape) >= 8 and search.max() > search.min():
        lungs = visible_lungs(small) if LUNG_WEIGHT > 0 else None
        box, confidence = fit_box(search, np.asarray(ATLAS, dtype=np.float32), MARGIN, lungs)
        confidence = round(max(0.0, confidence), 4)
        if confidence >= MIN_CONFIDENCE:
            box = _clipped(box)
            return ChestRegion(box_mask(box, size), box, "fitted", confidence)
    rectangle.confidence = confidence
    rectangle.reason = "not_chest" if confidence < NOT_CHEST_CONFIDENCE else "unsure"
    return rectangle


def estimate_chest_region(image_hw: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """(mask_hw uint8 0/255 at long side <= 128, box [y0, x0, y1, x1] fractions); air dark."""
    region = estimate_chest_region_detail(image_hw)
    return region.mask_hw, region.box


def box_iou(box_a, box_b) -> float:
    """Intersection over union of two [y0, x0, y1, x1] boxes (any consistent unit)."""
    y0, x0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    y1, x1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    inter = max(0.0, y1 - y0) * max(0.0, x1 - x0)
    area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0
