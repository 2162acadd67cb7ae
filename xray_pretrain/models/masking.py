"""Which tokens the encoder sees: random (MAE), context-aware (each image's chest region) or the
seed paper's fixed rectangle. Every sample keeps exactly ``K = round(L * (1 - ratio))`` visible tokens,
so the encoder batch is a dense (B, 1 + K, D) tensor.

Everything here is batched tensor code (no loop over the batch, no host sync), so it runs inside
``torch.compile`` graphs and costs a few argsorts over (B, L).

Context / rectangle split: with ``n_in`` tokens inside the region and ``n_out = L - n_in`` outside,
the number ``x`` of visible inside tokens minimises
``(x / n_in - (1 - ratio_inside))^2 + ((K - x) / n_out - (1 - ratio_outside))^2``
(the squared misses of the two achieved masking ratios) over the integers with
``max(0, K - n_out) <= x <= min(n_in, K)``. When ``K`` matches the two ratios both are met; otherwise
the miss is shared, and a region too small or too large to take its share passes the rest to the
other side (the bounds). Within each side the visible tokens are the ones with the smallest noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

STRATEGIES = ("random", "context", "rectangle")
# The seed code's fixed "chest region": rows 6-15 and columns 3-15 (inclusive) of its 20x20 grid of
# 64-px patches at 1280 px, kept as fractions of the image so it scales to any grid.
SEED_GRID = 20
SEED_RECT_ROWS = (6, 16)  # [start, stop) in 1/20 of the image height
SEED_RECT_COLS = (3, 16)


@dataclass
class MaskConfig:
    """The ``mask`` section of the run config."""

    strategy: str = "random"  # random | context | rectangle
    ratio: float = 0.75  # fraction of tokens masked; K = round(L * (1 - ratio)) visible in every sample
    ratio_inside: float = 0.95  # context/rectangle: target masking ratio inside the region
    ratio_outside: float = 0.85  # ... and outside it

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"mask.strategy={self.strategy!r} is unknown: use one of {STRATEGIES}")
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(
                f"mask.ratio={self.ratio} must be in (0, 1): it is the fraction of tokens masked"
            )
        for name in ("ratio_inside", "ratio_outside"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"mask.{name}={value} must be in [0, 1]")


def num_visible_tokens(num_tokens: int, ratio: float) -> int:
    """K = round(L * (1 - ratio)); ``ValueError`` unless 1 <= K < L (something seen, something masked)."""
    num_keep = round(num_tokens * (1.0 - ratio))
    if not 1 <= num_keep < num_tokens:
        raise ValueError(
            f"mask.ratio={ratio} leaves {num_keep} of {num_tokens} tokens visible; the encoder needs at least "
            "one visible and the loss at least one masked token: choose a ratio closer to 0.75 or more tokens"
        )
    return num_keep


def rectangle_region(grid_size: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) bool: the seed rectangle on a ``(rows, cols)`` grid (a cell is inside if its centre is)."""
    num_rows, num_cols = grid_size
    row_centres = (torch.arange(num_rows, device=device) + 0.5) * SEED_GRID / num_rows
    col_centres = (torch.arange(num_cols, device=device) + 0.5) * SEED_GRID / num_cols
    rows_in = (row_centres >= SEED_RECT_ROWS[0]) & (row_centres < SEED_RECT_ROWS[1])
    cols_in = (col_centres >= SEED_RECT_COLS[0]) & (col_centres < SEED_RECT_COLS[1])
    return (rows_in[:, None] & cols_in[None, :]).reshape(-1)


def pool_region(roi: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Chest-region mask at any resolution -> (B, L) bool on the token grid.

    ``roi`` is (B, 1, h, w) or (B, h, w), bool / integer (0/1; 0/255 also works) / float in [0, 1],
    with the image's aspect ratio (one pixel of rounding allowed). A token is inside when at least half
    of its area is (area pooling; a coarser roi is spread over the finer grid).
    """
    if roi.dim() == 3:
        roi = roi.unsqueeze(1)
    if roi.dim() != 4 or roi.shape[1] != 1:
        raise ValueError(f"roi must be (B, 1, h, w) or (B, h, w), got shape {tuple(roi.shape)}")
    h, w = roi.shape[-2:]
    num_rows, num_cols = grid_size
    if abs(h - w * num_rows / num_cols) > 1 and abs(w - h * num_cols / num_rows) > 1:
        raise ValueError(
            f"roi is {h}x{w} but the images' token grid is {num_rows}x{num_cols}: the roi must have the "
            "image's aspect ratio (crop/resize it together with the image)"
        )
    if roi.dtype.is_floating_point:
        area = roi.float()
    else:
        area = roi.float().clamp(max=1.0)  # bool, 0/1 or 0/255 masks
    pooled = F.adaptive_avg_pool2d(area, grid_size)  # (B, 1, rows, cols)
    return (pooled >= 0.5).flatten(1)


def split_visible(
    num_inside_B: torch.Tensor, num_tokens: int, num_keep: int, ratio_inside: float, ratio_outside: float
) -> torch.Tensor:
    """(B,) visible tokens to take inside the region (the integer optimum in the module docstring)."""
    n_in = num_inside_B.to(torch.float64)
    n_out = num_tokens - n_in
    seen_in, seen_out = 1.0 - ratio_inside, 1.0 - ratio_outside
    # Stationary point of the convex objective, multiplied through by n_in^2 * n_out^2 (no 0-division).
    best = (seen_in * n_in * n_out**2 + (num_keep - seen_out * n_out) * n_in**2) / (n_in**2 + n_out**2)
    low = (num_keep - n_out).clamp(min=0.0)
    high = n_in.clamp(max=float(num_keep))
    below = best.floor().clamp(low, high)
    above = (best.floor() + 1.0).clamp(low, high)

    def miss(x: torch.Tensor) -> torch.Tensor:
        miss_in = torch.where(n_in > 0, x / n_in.clamp(min=1.0) - seen_in, 0.0)
        miss_out = torch.where(n_out > 0, (num_keep - x) / n_out.clamp(min=1.0) - seen_out, 0.0)
        return miss_in**2 + miss_out**2

    return torch.where(miss(above) < miss(below), above, below).long()


def select_visible(
    noise_BL: torch.Tensor,
    num_keep: int,
    inside_BL: torch.Tensor | None = None,
    keep_inside_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible token ids (B, K) in ascending order, and the mask (B, L) float, 1 = masked.

    Without a region this is MAE's rule (the K smallest noise values). With ``inside_BL`` and
    ``keep_inside_B`` it keeps the ``keep_inside`` smallest-noise inside tokens and the
    ``K - keep_inside`` smallest-noise outside tokens.
    """
    B, L = noise_BL.shape
    if inside_BL is None:
        ids_keep_BK = torch.argsort(noise_BL, dim=1)[:, :num_keep]
    else:
        # One sort orders each sample as [inside tokens by noise | outside tokens by noise]
        # (noise is in [0, 1), so +2 moves the outside block after the inside one); the kept ones sit
        # at sorted positions [0, keep_inside) and [num_inside, num_inside + K - keep_inside).
        order_BL = torch.argsort(noise_BL + 2.0 * (~inside_BL), dim=1)
        num_inside_B1 = inside_BL.sum(1, keepdim=True)
        keep_inside_B1 = keep_inside_B.unsqueeze(1)
        slot_BK = torch.arange(num_keep, device=noise_BL.device).expand(B, num_keep)
        position_BK = torch.where(slot_BK < keep_inside_B1, slot_BK, slot_BK - keep_inside_B1 + num_inside_B1)
        ids_keep_BK = order_BL.gather(1, position_BK)
    # Ascending token order: the encoder's gathers then read memory front to back.
    ids_keep_BK = ids_keep_BK.sort(dim=1).values
    mask_BL = torch.ones(B, L, device=noise_BL.device).scatter(1, ids_keep_BK, 0.0)
    return ids_keep_BK, mask_BL


def region_stats(mask_BL: torch.Tensor, inside_BL: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Achieved masking ratios as detached 0-dim tensors (batch means; NaN if no sample has that side)."""
    stats = {"mask_ratio": mask_BL.mean().detach()}
    if inside_BL is None:
        return stats
    inside = inside_BL.float()
    num_inside_B = inside.sum(1)
    num_outside_B = inside.shape[1] - num_inside_B
    masked_inside_B = (mask_BL * inside).sum(1)
    masked_outside_B = mask_BL.sum(1) - masked_inside_B
    nan = torch.full_like(num_inside_B, float("nan"))
    stats["mask_ratio_inside"] = torch.where(
        num_inside_B > 0, masked_inside_B / num_inside_B.clamp(min=1), nan
    ).nanmean()
    stats["mask_ratio_outside"] = torch.where(
        num_outside_B > 0, masked_outside_B / num_outside_B.clamp(min=1), nan
    ).nanmean()
    stats["region_fraction"] = inside.mean()
    return {name: value.detach() for name, value in stats.items()}


def make_mask(
    strategy: str,
    noise_BL: torch.Tensor,
    num_keep: int,
    inside_BL: torch.Tensor | None,
    ratio_inside: float,
    ratio_outside: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_keep (B, K), mask (B, L)) for ``strategy``; ``inside_BL`` is the region the strategy uses
    (the image's roi for context, the rectangle for rectangle, ignored for random)."""
    if strategy == "random":
        return select_visible(noise_BL, num_keep)
    if inside_BL is None:
        raise ValueError(f"mask.strategy={strategy} needs a region (roi) for every sample")
    keep_inside_B = split_visible(inside_BL.sum(1), noise_BL.shape[1], num_keep, ratio_inside, ratio_outside)
    return select_visible(noise_BL, num_keep, inside_BL, keep_inside_B)
