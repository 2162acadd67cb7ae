"""Patch layout and the two token stems (plain patch embedding, hierarchical conv stem).

Both stems consume *patch pixels* ``(B, K, P)`` rather than whole images, so the MAE can gather the
K visible patches first and embed only those (the embedding work and the gather both shrink by the
masking ratio, and the gather runs at width P instead of the model width D).

Pixel order inside a patch is ``(row, col, channel)`` (MAE's ``patchify`` order), which for one
channel is plain raster order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEMS = ("patch", "hierarchical")
# The hierarchical stem: a 16/16 conv then a 4/4 conv, so one token covers (4 * patch_size)^2 pixels.
HIERARCHICAL_FACTOR = 4


def token_patch_size(patch_size: int, stem: str) -> int:
    """Pixels per token side: ``patch_size`` for ``patch``, ``4 * patch_size`` for ``hierarchical``."""
    return patch_size * HIERARCHICAL_FACTOR if stem == "hierarchical" else patch_size


def patchify(images_BCHW: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C), tokens row-major; H and W must be multiples of patch."""
    B, C, H, W = images_BCHW.shape
    num_rows, num_cols = H // patch, W // patch
    x = images_BCHW.reshape(B, C, num_rows, patch, num_cols, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, ph, pw, C)
    return x.reshape(B, num_rows * num_cols, patch * patch * C)


def unpatchify(x_BLP: torch.Tensor, patch: int, grid_size: tuple[int, int], in_chans: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, patch*patch*C) -> (B, C, rows*patch, cols*patch)."""
    B = x_BLP.shape[0]
    num_rows, num_cols = grid_size
    x = x_BLP.reshape(B, num_rows, num_cols, patch, patch, in_chans)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, rows, ph, cols, pw)
    return x.reshape(B, in_chans, num_rows * patch, num_cols * patch)


class PatchStem(nn.Module):
    """Linear patch embedding stored as timm's ``patch_embed.proj`` Conv2d (so exports load in timm).

    The conv weight (D, C, p, p) is applied as a matrix on patch pixels in (row, col, channel)
    order: for one channel the permute is a free view.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, patches_BKP: torch.Tensor) -> torch.Tensor:
        """(B, K, P) patch pixels -> (B, K, D) tokens."""
        weight = self.proj.weight
        weight_DP = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
        return F.linear(patches_BKP.to(weight.dtype), weight_DP, self.proj.bias)

    def init_like_linear(self) -> None:
        # MAE: initialise the patch projection as a linear layer (xavier on the flattened weight).
        weight = self.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


class HierarchicalStem(nn.Module):
    """The seed code's conv stem: conv ``p/p`` -> GELU -> conv ``4/4``; one token per ``4p`` pixels.

    The hidden width is ``embed_dim // 4``: the second conv then costs ``4 * D^2`` multiply-adds per
    token, a third of one transformer block (12 D^2 at mlp_ratio 4), so the stem stays cheap.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        hidden_dim = max(embed_dim // 4, 1)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(
            hidden_dim, embed_dim, kernel_size=HIERARCHICAL_FACTOR, stride=HIERARCHICAL_FACTOR
        )

    def forward(self, patches_BKP: torch.Tensor) -> torch.Tensor:
        """(B, K, (4p)^2 * C) patch pixels -> (B, K, D) tokens."""
        B, K, _ = patches_BKP.shape
        side = self.patch_size * HIERARCHICAL_FACTOR
        x = patches_BKP.to(self.conv1.weight.dtype).reshape(B * K, side, side, self.in_chans)
        x = x.permute(0, 3, 1, 2)  # (B*K, C, side, side)
        x = self.conv2(self.act(self.conv1(x)))  # (B*K, D, 1, 1)
        return x.reshape(B, K, -1)

    def init_like_linear(self) -> None:
        for conv in (self.conv1, self.conv2):
            nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))


def build_stem(stem: str, patch_size: int, in_chans: int, embed_dim: int) -> nn.Module:
    if stem == "patch":
        return PatchStem(patch_size, in_chans, embed_dim)
    if stem == "hierarchical":
        return HierarchicalStem(patch_size, in_chans, embed_dim)
    raise ValueError(f"unknown stem {stem!r}: use one of {STEMS}")
