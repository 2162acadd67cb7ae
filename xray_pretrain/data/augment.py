"""Augmentation parameters per global position, and the host-side (torch) transform that applies them.

Randomness comes only from (seed, global position), never from the worker, rank or world size, so
a sample is augmented the same way on any number of GPUs, after a resume, and on both backends: the
DALI backend receives the same `AugmentParams` (computed on the host with `TrainAugment.sample`) and
the same integer crop box (`crop_box_pixels`).

Transform, in this order (both backends):
1. crop the box (integer pixels of the stored image) from the image;
2. resize it to `out_hw` with antialiased bilinear filtering on float values (no aspect
   preservation: the crop is stretched to `out_hw`, and validation resizes the whole image);
3. contrast then brightness on fractions of full scale: x <- b * (0.5 + c * (x - 0.5));
4. normalize (x - mean) / std with the sample's folder statistics;
5. optional horizontal flip.
The chest-region mask follows the same geometry by nearest-neighbour sampling: output pixel (i, j)
takes the mask value under the centre of the image pixel that the output pixel's centre falls on
(the roi is first stretched to the image's resolution), so the mask stays aligned with the image
to within one output pixel at any crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from xray_pretrain.data.order import TAG_AUGMENT, seeded_rng

NUM_CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class AugmentParams:
    """One sample's augmentation. Crop box in fractions of the image: top, left, height, width."""

    crop_top: float = 0.0
    crop_left: float = 0.0
    crop_height: float = 1.0
    crop_width: float = 1.0
    flip: bool = False
    brightness: float = 1.0  # multiplicative factor
    contrast: float = 1.0  # factor around mid-grey (0.5 of full scale)


FULL_VIEW = AugmentParams()  # validation: the whole image, no jitter


@dataclass(frozen=True)
class TrainAugment:
    """Training augmentation settings (the `data` config's crop_scale, crop_ratio, hflip, ...).

    crop_scale: range of the crop's area as a fraction of the image's area.
    crop_ratio: range of the crop's aspect relative to the image's own aspect (1 = same shape as the
    image), sampled log-uniformly. brightness / contrast: factors drawn from 1 +- that amount.
    """

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0

    def sample(self, seed: int, position: int, view: int = 0) -> AugmentParams:
        """The augmentation of global position `position`: a pure function of (seed, position).
        `view` > 0: the further images of a multi-view item (a study's lateral), drawn independently
        (R2Gen transforms each view on its own); view 0 is the single-image stream."""
        values = (int(position),) if view == 0 else (int(position), int(view))
        rng = seeded_rng(seed, TAG_AUGMENT, *values)
        top, left, height, width = 0.0, 0.0, 1.0, 1.0  # the fallback, as torchvision's: the whole image
        log_ratio = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(NUM_CROP_ATTEMPTS):
            area = rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
            if w <= 1.0 and h <= 1.0:
                top, left, height, width = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w
                break
        flip = bool(self.hflip and rng.random() < 0.5)
        brightness = 1.0 + rng.uniform(-self.brightness, self.brightness) if self.brightness else 1.0
        contrast = 1.0 + rng.uniform(-self.contrast, self.contrast) if self.contrast else 1.0
        return AugmentParams(top, left, height, width, flip, brightness, contrast)


def crop_box_pixels(params: AugmentParams, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) in whole pixels of an image of (height, width); at least 1x1."""
    top = min(math.floor(params.crop_top * height + 0.5), height - 1)
    left = min(math.floor(params.crop_left * width + 0.5), width - 1)
    bottom = min(math.floor((params.crop_top + params.crop_height) * height + 0.5), height)
    right = min(math.floor((params.crop_left + params.crop_width) * width + 0.5), width)
    return top, left, max(bottom - top, 1), max(right - left, 1)


def nearest_indices(num_out: int, num_in: int) -> np.ndarray:
    """Source index of each output index for nearest resizing, pixel centres aligned (as DALI's NN)."""
    return np.minimum(((np.arange(num_out) + 0.5) * (num_in / num_out)).astype(np.int64), num_in - 1)


def transform_roi(
    roi_hw: np.ndarray, image_hw: tuple[int, int], box: tuple[int, int, int, int], out_hw: tuple[int, int]
) -> np.ndarray:
    """(h, w) uint8 mask -> (out_h, out_w) uint8: stretched to the image, cropped by `box`, resized NN."""
    top, left, crop_h, crop_w = box
    rows_in_image = top + nearest_indices(out_hw[0], crop_h)
    cols_in_image = left + nearest_indices(out_hw[1], crop_w)
    rows = nearest_indices(image_hw[0], roi_hw.shape[0])[rows_in_image]
    cols = nearest_indices(image_hw[1], roi_hw.shape[1])[cols_in_image]
    return roi_hw[np.ix_(rows, cols)]


def transform_image(
    image_HW: np.ndarray,
    box: tuple[int, int, int, int],
    out_hw: tuple[int, int],
    params: AugmentParams,
    mean: float,
    std: float,
) -> torch.Tensor:
    """(H, W) float32 in [0, 1] -> (1, out_h, out_w) float32 normalized (steps 1-4 of the module doc)."""
    top, left, crop_h, crop_w = box
    crop = torch.from_numpy(np.ascontiguousarray(image_HW[top : top + crop_h, left : left + crop_w]))
    resized = F.interpolate(
        crop[None, None], size=tuple(out_hw), mode="bilinear", antialias=True, align_corners=False
    )
    x_1HW = resized[0]
    if params.contrast != 1.0 or params.brightness != 1.0:
        x_1HW = params.brightness * (0.5 + params.contrast * (x_1HW - 0.5))
    return (x_1HW - mean) / std


def transform_sample(
    image_HW: np.ndarray,
    roi_hw: np.ndarray,
    params: AugmentParams,
    out_hw: tuple[int, int],
    mean: float,
    std: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (1, out_h, out_w) float32 normalized and roi (1, out_h, out_w) uint8 0/1, same geometry."""
    box = crop_box_pixels(params, *image_HW.shape)
    image_1HW = transform_image(image_HW, box, out_hw, params, mean, std)
    roi_1HW = torch.from_numpy(np.ascontiguousarray(transform_roi(roi_hw, image_HW.shape, box, out_hw)))[None]
    if params.flip:
        image_1HW, roi_1HW = image_1HW.flip(-1), roi_1HW.flip(-1)
    return image_1HW.contiguous(), roi_1HW.contiguous()
