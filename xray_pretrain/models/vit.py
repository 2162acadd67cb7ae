"""1-channel (any channel count) ViT encoder for any image size, with timm-compatible names.

Parameter names equal timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so
:meth:`ViTEncoder.timm_state_dict` loads into ``VisionTransformer(**encoder.timm_kwargs())`` strictly.
The positional embedding is the fixed 2-D sin-cos table (a non-persistent buffer, recomputed by
:meth:`ViTEncoder.set_image_size`); the timm export writes it as timm's learnable ``pos_embed``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, check_attention_backend
from .pos_embed import sincos_2d, sincos_buffer
from .stem import build_stem, patchify, token_patch_size

# MAE's encoder dims for base/large/huge; tiny/small as DeiT. MAE's huge uses patch 14: patch size is
# a separate setting here, so every size runs at any patch size.
ENCODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}
LAYER_NORM_EPS = 1e-6  # MAE and timm ViTs


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BND)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of samples (rate
    ``p``) and scale the kept ones by ``1 / (1 - p)`` (timm's ``DropPath``); the identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x_BND
        keep = 1.0 - self.p
        keep_B11 = x_BND.new_empty((x_BND.shape[0],) + (1,) * (x_BND.dim() - 1)).bernoulli_(keep)
        return x_BND * keep_B11 / keep


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` without dropout or layer scale), with drop-path."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn: str = "auto", drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, backend=attn)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x_BND = x_BND + self.drop_path(self.attn(self.norm1(x_BND)))
        return x_BND + self.drop_path(self.mlp(self.norm2(x_BND)))


def run_blocks(blocks: nn.ModuleList, x_BND: torch.Tensor, ckpt_every: int) -> torch.Tensor:
    """Apply ``blocks``; with ``ckpt_every = k > 0`` every k-th block (0, k, 2k, ...) is recomputed in
    backward instead of storing its activations (only its input is kept)."""
    checkpointing = ckpt_every > 0 and torch.is_grad_enabled()
    for index, block in enumerate(blocks):
        if checkpointing and index % ckpt_every == 0:
            # A block with drop-path draws random numbers: the recomputation in backward must draw the
            # same ones (else the gradient belongs to another network), so the RNG state is saved and
            # restored around it. Without drop-path nothing is random and that cost is skipped.
            random = block.training and block.drop_path.p > 0
            x_BND = checkpoint(block, x_BND, use_reentrant=False, preserve_rng_state=random)
        else:
            x_BND = block(x_BND)
    return x_BND


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates rising linearly from 0 to ``drop_path`` (timm, MAE, BEiT)."""
    if depth == 1:
        return [drop_path]
    return [drop_path * i / (depth - 1) for i in range(depth)]


def init_mae_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears with zero bias, unit LayerNorms (apply with ``Module.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def as_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``1280`` or ``[1024, 1280]`` -> ``(H, W)``."""
    if isinstance(image_size, int):
        return image_size, image_size
    size = tuple(int(v) for v in image_size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or [H, W], got {image_size!r}")
    return size[0], size[1]


def grid_for(image_size: tuple[int, int], patch: int) -> tuple[int, int]:
    """Patch grid (rows, cols) for ``image_size``; ``ValueError`` unless ``patch`` divides both sides."""
    H, W = image_size
    if H <= 0 or W <= 0 or H % patch or W % patch:
        raise ValueError(
            f"image_size {H}x{W} is not a multiple of the token patch {patch}: use sides divisible by "
            f"{patch}, e.g. {max(patch, round(H / patch) * patch)}x{max(patch, round(W / patch) * patch)}"
        )
    return H // patch, W // patch


class ViTEncoder(nn.Module):
    """ViT encoder: patch pixels -> (optionally only the visible) tokens -> transformer -> norm.

    ``forward(images, ids_keep)`` returns ``(B, 1 + K, D)`` (cls token first; ``K = L`` without
    ``ids_keep``). The MAE calls :meth:`forward_patches` to share its patchified images.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        stem: str = "patch",
        attn: str = "auto",
        grad_ckpt_every: int = 0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        check_attention_backend(attn, (embed_dim // num_heads,))  # ValueError now, not at step 1
        self.patch_size = patch_size
        self.stem = stem
        self.token_patch = token_patch_size(patch_size, stem)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.grad_ckpt_every = grad_ckpt_every  # 0 = off
        self.patch_embed = build_stem(stem, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, attn, rate) for rate in drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.set_image_size(image_size)
        self.apply(init_mae_weights)
        self.patch_embed.init_like_linear()
        nn.init.normal_(self.cls_token, std=0.02)

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Switch to a new input size: the fixed sin-cos table is recomputed for the new grid (for a
        fixed sin-cos embedding that *is* the interpolation: each token gets its grid position's code).
        Also the way to refill the table after ``to_empty()`` (meta-device initialisation)."""
        self.image_size = as_hw(image_size)
        self.grid_size = grid_for(self.image_size, self.token_patch)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        table = sincos_buffer(
            self.embed_dim, self.grid_size, self.cls_token.device, getattr(self, "pos_embed", None)
        )
        self.register_buffer("pos_embed", table, persistent=False)  # (1, 1 + L, D)

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        self.grad_ckpt_every = every if enable else 0

    def patchify(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, P) with P = token_patch^2 * C."""
        return patchify(images_BCHW, self.token_patch)

    def forward(
        self, images_or_patches: torch.Tensor, ids_keep_BK: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) images (the size set at construction), or their (B, L, P) patches as `patchify`
        makes them, -> (B, 1 + K, D) tokens, cls first.

        Callers go through ``forward`` (not ``forward_patches``) so that module hooks fire: DeepSpeed
        ZeRO-3 gathers this module's parameters (cls token, stem, blocks) around it.
        """
        if images_or_patches.dim() == 4:
            images_or_patches = self.patchify(images_or_patches)
        return self.forward_patches(images_or_patches, ids_keep_BK)

    def forward_patches(
        self, patches_BLP: torch.Tensor, ids_keep_BK: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, P) patch pixels (+ optional (B, K) visible token ids) -> (B, 1 + K, D)."""
        x_BND = run_blocks(
            self.blocks,
            self.embed_tokens(patches_BLP, ids_keep_BK),
            self.grad_ckpt_every if self.training else 0,
        )
        return self.norm(x_BND)

    def embed_tokens(
        self, patches_BLP: torch.Tensor, ids_keep_BK: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The blocks' input: (B, L, P) patch pixels (+ optional (B, K) visible token ids) -> stem
        tokens plus positions, the cls token first, (B, 1 + K, D)."""
        pos_LD = self.pos_embed[0, 1:]
        if ids_keep_BK is not None:
            # Gather before embedding: width P (256 at patch 16, 1 channel) instead of D, and the
            # stem runs on the K visible patches only.
            P = patches_BLP.shape[-1]
            patches_BLP = patches_BLP.gather(1, ids_keep_BK.unsqueeze(-1).expand(-1, -1, P))
            pos_BKD = pos_LD[ids_keep_BK]
        else:
            pos_BKD = pos_LD.unsqueeze(0)
        x_BKD = self.patch_embed(patches_BLP)
        x_BKD = x_BKD + pos_BKD.to(x_BKD.dtype)  # fp32 table; DeepSpeed bf16 casts parameters only
        cls_B1D = (self.cls_token + self.pos_embed[:, :1]).to(x_BKD.dtype).expand(x_BKD.shape[0], -1, -1)
        return torch.cat([cls_B1D, x_BKD], dim=1)

    def init_kwargs(self) -> dict:
        """The constructor arguments that rebuild this architecture (``ViTEncoder(**init_kwargs())``);
        run-time choices (attention backend, activation checkpointing) are left at their defaults."""
        return {
            "image_size": list(self.image_size),
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "embed_dim": self.embed_dim,
            "depth": len(self.blocks),
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "stem": self.stem,
        }

    def timm_kwargs(self) -> dict | None:
        """kwargs for ``timm.models.vision_transformer.VisionTransformer`` giving this architecture
        (features only: ``num_classes=0``), or ``None`` for the hierarchical stem (no timm equivalent)."""
        if self.stem != "patch":
            return None
        return {
            "img_size": self.image_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "num_classes": 0,
            "embed_dim": self.embed_dim,
            "depth": len(self.blocks),
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": True,
            "class_token": True,
            "global_pool": "token",
        }

    def load_timm_state_dict(
        self, state: dict[str, torch.Tensor], strict: bool = True, grid_size: tuple[int, int] | None = None
    ) -> None:
        """Inverse of :meth:`timm_state_dict`: load an export (or any timm ViT state of this shape).

        ``pos_embed`` is not loaded (ours is the fixed table); it must *be* the sin-cos table of the
        grid it was saved at, else the weights were trained with a different (e.g. learned) embedding
        and would silently mean something else. The saved grid may differ from this encoder's (another
        image size): ``grid_size`` names it (default: this encoder's grid when the lengths agree, else
        the square grid of that length); this encoder keeps its own table, the exact sin-cos
        "interpolation" to its grid.
        """
        state = dict(state)
        pos = state.pop("pos_embed", None)
        if pos is not None:
            expected = self._saved_table(tuple(pos.shape), grid_size)
            # 1e-2 admits a bf16 export of the table (bf16 spacing near 1 is 2^-7).
            if not torch.allclose(pos.float().cpu(), expected, atol=1e-2):
                raise ValueError("pos_embed is not the fixed 2-D sin-cos table this encoder uses")
        self.load_state_dict(state, strict=strict)

    def _saved_table(self, shape: tuple[int, ...], grid_size: tuple[int, int] | None) -> torch.Tensor:
        """The (1, 1 + L, D) sin-cos table a saved ``pos_embed`` of ``shape`` must equal."""
        num_tokens = shape[1] - 1 if len(shape) == 3 else -1
        if grid_size is None:
            side = round(max(num_tokens, 0) ** 0.5)
            grid_size = self.grid_size if num_tokens == self.num_patches else (side, side)
        if len(shape) != 3 or shape[2] != self.embed_dim or grid_size[0] * grid_size[1] != num_tokens:
            raise ValueError(
                f"pos_embed {shape} is not a (1, 1 + rows*cols, {self.embed_dim}) table of grid {grid_size}: "
                "pass the grid it was saved at (grid_size=...) or set_image_size(...) to the exported size"
            )
        return sincos_2d(self.embed_dim, tuple(grid_size)).unsqueeze(0)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict that ``VisionTransformer(**timm_kwargs())`` loads with ``strict=True``; adds the
        sin-cos table as ``pos_embed`` (1, 1 + L, D) with the zero cls slot, as MAE exports do."""
        if self.stem != "patch":
            raise ValueError(
                "stem=hierarchical has no timm VisionTransformer equivalent; export the raw state dict"
            )
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        state["pos_embed"] = self.pos_embed.detach().clone().to(self.cls_token.dtype)
        return state
