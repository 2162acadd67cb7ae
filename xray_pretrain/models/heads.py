"""Task heads over a :class:`ViTEncoder`.

``ClassificationModel``: encoder -> one feature per image (the cls token, the mean of the patch
tokens, or, for a frozen encoder, the mean patch token of every block: ``blocks``) -> logits. Two head
forms, as MAE fine-tunes and probes:
- fine-tuning: one linear layer, truncated-normal weights of std 2e-5 (MAE's fine-tuning init: the
  head starts near 0, so the first steps do not wreck the pre-trained encoder);
- linear probe: a parameter-free BatchNorm (no affine, eps 1e-6) then the linear layer (std 0.01),
  so features of any scale train well with one LR (MAE's linear probe: ``BatchNorm1d(affine=False)``
  before the head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vit import LAYER_NORM_EPS, ViTEncoder, run_blocks

# `blocks`: a head over every block's mean patch token (a frozen encoder only: its features are
# `block_pooled_features`, D * depth wide). MAE's linear probe reads the last block alone; on the demo's
# phantoms the earlier blocks keep findings the last one drops (benchmarks/RESULTS.md).
POOLS = ("cls", "mean", "blocks")


def pool_tokens(tokens_BND: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1 + L, D) tokens (cls first) -> (B, D): the cls token (`cls`), else the patch tokens' mean
    (`mean`; `blocks` on the tokens of :func:`block_tokens`)."""
    return tokens_BND[:, 0] if pool == "cls" else tokens_BND[:, 1:].mean(dim=1)


@torch.no_grad()
def block_tokens(encoder: ViTEncoder, images_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1 + L, D * depth): every block's output tokens, each layer-normed without
    affine parameters, concatenated along the features in block order (cls first). Goes through
    ``encoder.forward`` (its hooks fire); the caller picks eval mode."""
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in encoder.blocks]
    try:
        encoder(images_BCHW)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([F.layer_norm(x_BND, x_BND.shape[-1:], eps=LAYER_NORM_EPS) for x_BND in outputs], dim=2)


@torch.no_grad()
def block_pooled_features(encoder: ViTEncoder, images_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, D * depth) frozen features for a head on pooled tokens of several blocks
    (``pool="blocks"``): each block's output, layer-normed without affine parameters, averaged over
    the patch tokens, concatenated in block order. With the final norm at its init (weight 1, bias 0)
    the last D columns equal the mean-pooled encoder output."""
    return pool_tokens(block_tokens(encoder, images_BCHW), "blocks")


class ClassificationModel(nn.Module):
    """``forward(images (B, C, H, W)) -> logits (B, num_classes)``.

    ``num_frozen_blocks``: the stem, cls token and this many first blocks get ``requires_grad=False``
    (``-1`` freezes the whole encoder, the linear probe). A fully frozen encoder runs in eval mode
    under ``no_grad``: no drop-path, no stored activations. ``pool="blocks"`` needs it frozen (its
    features pass through the blocks' outputs without their trained final norm); the head then
    takes D * depth features.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        num_classes: int,
        pool: str = "cls",
        probe_norm: bool = False,
        num_frozen_blocks: int = 0,
        head_init_std: float = 2e-5,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: use one of {POOLS}")
        self.encoder = encoder
        self.pool = pool
        self.encoder_frozen = num_frozen_blocks < 0 or num_frozen_blocks >= len(encoder.blocks) + 1
        if pool == "blocks" and not self.encoder_frozen:
            raise ValueError("pool='blocks' needs a frozen encoder (num_frozen_blocks=-1, the linear probe)")
        self.num_features = encoder.embed_dim * (len(encoder.blocks) if pool == "blocks" else 1)
        linear = nn.Linear(self.num_features, num_classes)
        nn.init.trunc_normal_(linear.weight, std=head_init_std)
        nn.init.zeros_(linear.bias)
        norm = nn.BatchNorm1d(self.num_features, affine=False, eps=1e-6) if probe_norm else nn.Identity()
        self.head = nn.Sequential(norm, linear)
        self.num_frozen_blocks = len(encoder.blocks) if self.encoder_frozen else num_frozen_blocks
        self._freeze(num_frozen_blocks)

    def _freeze(self, num_frozen_blocks: int) -> None:
        if num_frozen_blocks == 0:
            return
        if self.encoder_frozen:
            frozen = [self.encoder]
        else:
            frozen = [self.encoder.patch_embed, *self.encoder.blocks[:num_frozen_blocks]]
            self.encoder.cls_token.requires_grad_(False)
        for module in frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()  # frozen features: no drop-path noise
        return self

    def features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_features) pooled encoder features: after the encoder's final norm
        (cls, mean), or :func:`block_pooled_features` (blocks)."""
        if self.pool == "blocks":
            return block_pooled_features(self.encoder, images_BCHW)
        if self.encoder_frozen:
            with torch.no_grad():
                tokens_BND = self.encoder(images_BCHW)
        else:
            tokens_BND = self.encoder(images_BCHW)
        return pool_tokens(tokens_BND, self.pool)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images_BCHW))

    @torch.no_grad()
    def frozen_tokens(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + L, D), cls first: what the frozen part of the model outputs, which
        no training step changes (the whole encoder, final norm included, when it is frozen, or its
        :func:`block_tokens`, D * depth wide, for ``pool="blocks"``; else the stem and the first
        ``num_frozen_blocks`` blocks). :meth:`forward_frozen` finishes the pass: in eval mode
        ``forward(x) == forward_frozen(frozen_tokens(x))``, so many heads trained on the same images
        need this computed once."""
        if self.pool == "blocks":
            return block_tokens(self.encoder, images_BCHW)
        if self.encoder_frozen:
            return self.encoder(images_BCHW)
        if self.num_frozen_blocks < 1:
            raise ValueError("frozen_tokens needs a frozen stem and block (partial or linear mode)")
        x_BND = self.encoder.embed_tokens(self.encoder.patchify(images_BCHW))
        return run_blocks(self.encoder.blocks[: self.num_frozen_blocks], x_BND, 0)

    def forward_frozen(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, D) tokens of :meth:`frozen_tokens` (cls first; any K of the L patch tokens, e.g. a
        random subset as augmentation) -> logits (B, num_classes), through the trainable rest."""
        if not self.encoder_frozen:
            blocks = self.encoder.blocks[self.num_frozen_blocks :]
            ckpt_every = self.encoder.grad_ckpt_every if self.training else 0
            tokens_BND = self.encoder.norm(run_blocks(blocks, tokens_BND, ckpt_every))
        return self.head(pool_tokens(tokens_BND, self.pool))

    @torch.no_grad()
    def folded_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, num_features) weight and (C,) bias of the one linear map the head is in eval mode: the linear
        probe's parameter-free BatchNorm, with its running statistics, folded into the linear layer
        (y = W (x - mu) / s + b = (W / s) x + (b - W mu / s), s = sqrt(var + eps), computed in fp64)."""
        norm, linear = self.head
        weight_CD, bias_C = linear.weight.double(), linear.bias.double()
        if isinstance(norm, nn.BatchNorm1d):
            scale_D = (norm.running_var.double() + norm.eps).rsqrt()
            bias_C = bias_C - weight_CD @ (norm.running_mean.double() * scale_D)
            weight_CD = weight_CD * scale_D
        return weight_CD.to(linear.weight.dtype), bias_C.to(linear.bias.dtype)
