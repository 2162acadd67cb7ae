"""Masked autoencoder: patchify -> mask -> encode visible tokens -> decode all tokens -> loss.

Same decomposition and weights layout as facebookresearch/mae's ``MaskedAutoencoderViT`` (decoder
parameter names ``decoder_embed``, ``mask_fill.mask_token``, ``decoder_blocks``, ``decoder_norm``,
``decoder_pred``; encoder under ``encoder.``), but: any channel count and non-square sizes, fused
attention, gather-before-embed, one scatter to un-shuffle the decoder input, context-aware masking,
activation checkpointing, and no host sync in ``forward`` (``torch.compile(fullgraph=True)`` works).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import ATTN_BACKENDS, check_attention_backend, describe_attention_backend
from .masking import MaskConfig, make_mask, num_visible_tokens, pool_region, rectangle_region, region_stats
from .pos_embed import sincos_buffer
from .stem import STEMS, token_patch_size, unpatchify
from .vit import (
    ENCODER_SIZES,
    LAYER_NORM_EPS,
    Block,
    ViTEncoder,
    as_hw,
    grid_for,
    init_mae_weights,
    run_blocks,
)


@dataclass
class MAEConfig:
    """The ``model`` section of the run config (``model.key=value`` overrides)."""

    size: str = "tiny"  # tiny | small | base | large | huge (encoder width/depth/heads preset)
    image_size: list[int] = field(default_factory=lambda: [224, 224])  # [H, W]; an int means square
    patch_size: int = 16
    stem: str = "patch"  # patch | hierarchical (conv p/p -> conv 4/4: tokens of 4*patch_size pixels)
    in_chans: int = 1
    embed_dim: int | None = None  # None: from the size preset
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    attn: str = "auto"  # auto | flash | cudnn | efficient | math | flash_attn
    grad_ckpt: bool = False  # activation checkpointing (encoder and decoder blocks)
    grad_ckpt_every: int = 1  # checkpoint every k-th block (1 = all)
    drop_path: float = 0.0  # encoder stochastic depth, rising linearly to this over the blocks
    inside_loss_weight: float = 1.0  # loss weight of masked patches inside the region (outside: 1)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int):
            self.image_size = [self.image_size, self.image_size]

    def image_hw(self) -> tuple[int, int]:
        return as_hw(self.image_size)

    def encoder_dims(self) -> tuple[int, int, int]:
        """(embed_dim, depth, num_heads): the preset for ``size`` with any explicit overrides."""
        if self.size not in ENCODER_SIZES:
            raise ValueError(f"model.size={self.size!r} is unknown: use one of {tuple(ENCODER_SIZES)}")
        preset = ENCODER_SIZES[self.size]
        return (
            self.embed_dim if self.embed_dim is not None else preset["embed_dim"],
            self.depth if self.depth is not None else preset["depth"],
            self.num_heads if self.num_heads is not None else preset["num_heads"],
        )

    def token_patch(self) -> int:
        return token_patch_size(self.patch_size, self.stem)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the fix for any bad setting or combination."""
        embed_dim, depth, num_heads = self.encoder_dims()
        if self.stem not in STEMS:
            raise ValueError(f"model.stem={self.stem!r} is unknown: use one of {STEMS}")
        if self.attn not in ATTN_BACKENDS:
            raise ValueError(f"model.attn={self.attn!r} is unknown: use one of {ATTN_BACKENDS}")
        for name, value in (
            ("patch_size", self.patch_size),
            ("in_chans", self.in_chans),
            ("depth", depth),
            ("decoder_depth", self.decoder_depth),
            ("grad_ckpt_every", self.grad_ckpt_every),
        ):
            if value < 1:
                raise ValueError(f"model.{name}={value} must be >= 1")
        grid_for(self.image_hw(), self.token_patch())
        _check_width("model.embed_dim", embed_dim, "model.num_heads", num_heads)
        _check_width("model.decoder_dim", self.decoder_dim, "model.decoder_heads", self.decoder_heads)
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"model.drop_path={self.drop_path} must be in [0, 1)")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio} must be > 0")
        if self.norm_pix_loss and self.token_patch() ** 2 * self.in_chans < 2:
            raise ValueError("model.norm_pix_loss needs at least 2 pixels per patch: raise patch_size")
        if self.inside_loss_weight <= 0:
            raise ValueError(
                f"model.inside_loss_weight={self.inside_loss_weight} must be > 0 (1 = no extra weight)"
            )
        if not self.grad_ckpt and self.grad_ckpt_every != 1:
            raise ValueError(
                f"model.grad_ckpt_every={self.grad_ckpt_every} has no effect without model.grad_ckpt=true"
            )


def _check_width(dim_name: str, dim: int, heads_name: str, num_heads: int) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"{heads_name}={num_heads} must divide {dim_name}={dim}")
    if dim % 4:
        raise ValueError(f"{dim_name}={dim} must be divisible by 4 (2-D sin-cos position embedding)")


@dataclass
class MAEOutput:
    """What :meth:`MaskedAutoencoder.forward` returns. ``stats`` is computed on first access (one host
    sync), so a training step that does not log pays nothing for it."""

    loss: torch.Tensor  # () float32
    pred_BLP: torch.Tensor  # (B, L, P) decoder prediction in target space
    target_BLP: torch.Tensor  # (B, L, P) float32 target (per-patch normalised if norm_pix_loss)
    mask_BL: torch.Tensor  # (B, L) float, 1 = masked (loss taken there), 0 = visible
    stat_tensors: dict[str, torch.Tensor]  # 0-dim detached tensors, still on the device
    attn_backend: str  # the requested backend; ``stats`` resolves what ran
    attn_head_dim: int  # encoder head dim, to resolve ``auto``

    @property
    def stats(self) -> dict[str, float | str]:
        """``mask_ratio`` and, with a region, ``mask_ratio_inside`` / ``mask_ratio_outside`` /
        ``region_fraction`` (batch means) as floats, plus ``attn_backend`` (a string, e.g.
        ``sdpa:auto->flash``: skip it when logging scalars)."""
        names = list(self.stat_tensors)
        values = torch.stack([self.stat_tensors[n].float() for n in names]).tolist()
        stats: dict[str, float | str] = dict(zip(names, values))
        stats["attn_backend"] = describe_attention_backend(
            self.attn_backend, self.pred_BLP.device, self.pred_BLP.dtype, self.attn_head_dim
        )
        return stats


def masked_patch_loss(
    pred_BLP: torch.Tensor,
    target_BLP: torch.Tensor,
    mask_BL: torch.Tensor,
    inside_BL: torch.Tensor | None = None,
    inside_weight: float = 1.0,
) -> torch.Tensor:
    """Mean squared error per patch, averaged over masked patches (weighted mean: masked patches inside
    the region count ``inside_weight``, the others 1). Computed in float32."""
    error_BL = (pred_BLP.float() - target_BLP.float()).pow(2).mean(dim=-1)
    weight_BL = mask_BL.float()
    if inside_BL is not None and inside_weight != 1.0:
        weight_BL = weight_BL * (1.0 + (inside_weight - 1.0) * inside_BL.float())
    return (error_BL * weight_BL).sum() / weight_BL.sum()


class MaskTokenFill(nn.Module):
    """The decoder's background: the learned mask token plus every position's embedding, (1, 1 + L, Dd).

    A module of its own rather than a bare parameter of :class:`MaskedAutoencoder`: DeepSpeed ZeRO-3
    gathers a parameter around the forward and backward of the module that owns it, and it can only
    hook the backward of a module whose output is a tensor (the root returns an :class:`MAEOutput`).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, pos_embed_1ND: torch.Tensor) -> torch.Tensor:
        return self.mask_token + pos_embed_1ND.to(self.mask_token.dtype)


class MaskedAutoencoder(nn.Module):
    """MAE over a :class:`ViTEncoder`; see :class:`MAEConfig` and :class:`MaskConfig` for the options."""

    def __init__(self, cfg: MAEConfig, mask_cfg: MaskConfig) -> None:
        super().__init__()
        embed_dim, depth, num_heads = cfg.encoder_dims()
        check_attention_backend(cfg.attn, (embed_dim // num_heads, cfg.decoder_dim // cfg.decoder_heads))
        self.in_chans = cfg.in_chans
        self.token_patch = cfg.token_patch()
        self.norm_pix_loss = cfg.norm_pix_loss
        self.inside_loss_weight = cfg.inside_loss_weight
        self.attn_backend = cfg.attn
        self.mask_cfg = mask_cfg
        self.encoder = build_encoder(cfg)
        patch_pixels = self.token_patch**2 * cfg.in_chans
        self.decoder_dim = cfg.decoder_dim
        self.decoder_embed = nn.Linear(embed_dim, cfg.decoder_dim)
        self.mask_fill = MaskTokenFill(cfg.decoder_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio, cfg.attn)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, patch_pixels)
        self._set_decoder_grid()
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_mae_weights)
        nn.init.normal_(self.mask_fill.mask_token, std=0.02)

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Checkpoint every ``every``-th encoder and decoder block (off with ``enable=False``)."""
        self.encoder.set_grad_checkpointing(enable, every)

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """New input size: both sin-cos tables are recomputed for the new grid (nothing is learned in
        them, so this is exact, not an approximation)."""
        self.encoder.set_image_size(image_size)
        self._set_decoder_grid()

    def _set_decoder_grid(self) -> None:
        table = sincos_buffer(
            self.decoder_dim,
            self.grid_size,
            self.mask_fill.mask_token.device,
            getattr(self, "decoder_pos_embed", None),
        )
        self.register_buffer("decoder_pos_embed", table, persistent=False)  # (1, 1 + L, Dd)
        # K visible tokens per sample; ValueError now if the ratio leaves none (or nothing masked).
        self.num_visible = num_visible_tokens(self.num_patches, self.mask_cfg.ratio)

    def patchify(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, P), P = token_patch^2 * C, pixel order (row, col, channel)."""
        return self.encoder.patchify(images_BCHW)

    def unpatchify(self, x_BLP: torch.Tensor) -> torch.Tensor:
        """(B, L, P) -> (B, C, H, W) for the current image size."""
        return unpatchify(x_BLP, self.token_patch, self.grid_size, self.in_chans)

    # ---- loss -----------------------------------------------------------------------------------
    def _target_from_patches(self, patches_BLP: torch.Tensor) -> torch.Tensor:
        target_BLP = patches_BLP.float()
        if self.norm_pix_loss:
            # As MAE: per-patch mean and unbiased variance, eps 1e-6.
            mean_BL1 = target_BLP.mean(dim=-1, keepdim=True)
            var_BL1 = target_BLP.var(dim=-1, keepdim=True)
            target_BLP = (target_BLP - mean_BL1) / (var_BL1 + 1e-6).sqrt()
        return target_BLP

    def target(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, P) float32 target (per-patch normalised if norm_pix_loss)."""
        return self._target_from_patches(self.patchify(images_BCHW))

    def loss_fn(
        self,
        pred_BLP: torch.Tensor,
        images_BCHW: torch.Tensor,
        mask_BL: torch.Tensor,
        roi_inside_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss ``forward`` uses, for any predictor: ``roi_inside_BL`` is the (B, L) token region
        (needed when inside_loss_weight != 1)."""
        self._check_region_for_weight(roi_inside_BL)
        return masked_patch_loss(
            pred_BLP, self.target(images_BCHW), mask_BL, roi_inside_BL, self.inside_loss_weight
        )

    def _check_region_for_weight(self, inside_BL: torch.Tensor | None) -> None:
        if inside_BL is None and self.inside_loss_weight != 1.0:
            raise ValueError(
                f"model.inside_loss_weight={self.inside_loss_weight} needs the chest region: pass roi_B1HW "
                "(or use mask.strategy=rectangle), or set model.inside_loss_weight=1"
            )

    # ---- forward --------------------------------------------------------------------------------
    def region(
        self, roi_B1HW: torch.Tensor | None, batch_size: int, device: torch.device
    ) -> torch.Tensor | None:
        """(B, L) bool region the masking and the inside weight use: the fixed rectangle for
        strategy=rectangle, else the pooled ``roi`` (None without one)."""
        if self.mask_cfg.strategy == "rectangle":
            return rectangle_region(self.grid_size, device).expand(batch_size, -1)
        if roi_B1HW is None:
            if self.mask_cfg.strategy == "context":
                raise ValueError(
                    "mask.strategy=context needs each image's chest region: pass roi_B1HW (the batch's "
                    "'roi'), or use mask.strategy=random|rectangle"
                )
            return None
        if roi_B1HW.shape[0] != batch_size:
            raise ValueError(f"roi has batch size {roi_B1HW.shape[0]}, the images {batch_size}")
        return pool_region(roi_B1HW.to(device), self.grid_size)

    def _check_images(self, images_BCHW: torch.Tensor) -> None:
        expected = (self.in_chans, *self.encoder.image_size)
        if images_BCHW.dim() != 4 or tuple(images_BCHW.shape[1:]) != expected:
            raise ValueError(
                f"images must be (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(images_BCHW.shape)}: "
                "call model.set_image_size((H, W)) for another size"
            )

    def forward_decoder(self, latent_B1KD: torch.Tensor, ids_keep_BK: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, 1 + K, D) -> prediction (B, L, P) for every patch."""
        B, L, Dd = latent_B1KD.shape[0], self.num_patches, self.decoder_dim
        x_B1KD = self.decoder_embed(latent_B1KD)
        # Slot 0 is the cls token, slot 1 + i patch i: add each kept token's position embedding and
        # scatter it into a [mask token + position] background, one write at full width.
        slots_B1K = nn.functional.pad(ids_keep_BK + 1, (1, 0))
        # Positional tables are fp32 buffers; engines that cast parameters only (DeepSpeed bf16)
        # must not promote the activations back to fp32.
        x_B1KD = x_B1KD + self.decoder_pos_embed[0][slots_B1K].to(x_B1KD.dtype)
        background_1ND = self.mask_fill(self.decoder_pos_embed).to(x_B1KD.dtype)
        x_BND = torch.scatter(
            background_1ND.expand(B, L + 1, Dd), 1, slots_B1K.unsqueeze(-1).expand(-1, -1, Dd), x_B1KD
        )
        x_BND = run_blocks(self.decoder_blocks, x_BND, self.encoder.grad_ckpt_every if self.training else 0)
        return self.decoder_pred(self.decoder_norm(x_BND[:, 1:]))

    def forward(
        self,
        images_B1HW: torch.Tensor,
        roi_B1HW: torch.Tensor | None = None,
        noise_BL: torch.Tensor | None = None,
    ) -> MAEOutput:
        """Images (B, C, H, W) (+ chest region at any resolution, + noise fixing the mask) -> MAEOutput."""
        self._check_images(images_B1HW)
        B, device = images_B1HW.shape[0], images_B1HW.device
        if noise_BL is None:
            noise_BL = torch.rand(B, self.num_patches, device=device)
        elif tuple(noise_BL.shape) != (B, self.num_patches):
            raise ValueError(f"noise must be (B, L) = ({B}, {self.num_patches}), got {tuple(noise_BL.shape)}")
        inside_BL = self.region(roi_B1HW, B, device)
        self._check_region_for_weight(inside_BL)
        ids_keep_BK, mask_BL = make_mask(
            self.mask_cfg.strategy, noise_BL.to(device), self.num_visible, inside_BL,
            self.mask_cfg.ratio_inside, self.mask_cfg.ratio_outside,
        )  # fmt: skip
        patches_BLP = self.patchify(images_B1HW)
        latent_B1KD = self.encoder(patches_BLP, ids_keep_BK)
        pred_BLP = self.forward_decoder(latent_B1KD, ids_keep_BK)
        target_BLP = self._target_from_patches(patches_BLP)
        loss = masked_patch_loss(pred_BLP, target_BLP, mask_BL, inside_BL, self.inside_loss_weight)
        return MAEOutput(
            loss=loss,
            pred_BLP=pred_BLP,
            target_BLP=target_BLP,
            mask_BL=mask_BL,
            stat_tensors=region_stats(mask_BL, inside_BL),
            attn_backend=self.attn_backend,
            attn_head_dim=self.encoder.embed_dim // self.encoder.num_heads,
        )


def build_mae(cfg: MAEConfig, mask_cfg: MaskConfig) -> MaskedAutoencoder:
    """Validate both configs (``ValueError`` with the fix), check the attention backend runs on this
    machine, then build."""
    cfg.validate()
    mask_cfg.validate()
    return MaskedAutoencoder(cfg, mask_cfg)


def build_encoder(cfg: MAEConfig) -> ViTEncoder:
    """The encoder of ``cfg`` alone (what downstream tasks start from). The MAE builds its encoder
    with this same call first, so under the same torch seed both give the same initial encoder."""
    embed_dim, depth, num_heads = cfg.encoder_dims()
    return ViTEncoder(
        image_size=cfg.image_hw(), patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=cfg.mlp_ratio, stem=cfg.stem, attn=cfg.attn,
        grad_ckpt_every=cfg.grad_ckpt_every if cfg.grad_ckpt else 0, drop_path=cfg.drop_path,
    )  # fmt: skip
