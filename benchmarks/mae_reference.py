"""A stand-in for facebookresearch/mae's ``MaskedAutoencoderViT``, written here for comparisons.

Behaviour as in the MAE repository (``models_mae.py``): timm ``PatchEmbed`` and ``Block``; learnable-
shaped but frozen sin-cos ``pos_embed`` parameters including the cls slot; the encoder embeds *all*
patches and then gathers the kept ones at full width with a (B, K, D) index; the decoder appends mask
tokens, un-shuffles with a (B, L, Dd) gather and concatenates the cls token back; the loss is the
norm-pix MSE on masked patches. Two deliberate changes: the channel count is a parameter (MAE
hard-codes 3 in patchify) and ``random_masking`` takes optional noise so tests can fix the mask.

``naive_attention=True`` reproduces the attention MAE actually ran (its README pins timm 0.3.2,
whose ``Attention`` computes ``softmax(q @ k^T * scale) @ v`` explicitly); ``False`` uses today's
timm default (``F.scaled_dot_product_attention``).

Not part of the package: benchmarks and tests import it by path. Needs timm.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn


def sincos_table(embed_dim: int, grid: int) -> torch.Tensor:
    """MAE's square-grid table, (1 + grid^2, D) with a zero cls row: columns code the first half."""
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    col = coords.repeat(grid)[:, None] * omega  # token t = row * grid + col
    row = coords.repeat_interleave(grid)[:, None] * omega
    table = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1)
    return torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table]).float()


class MaskedAutoencoderViTRef(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
        naive_attention: bool = True,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.in_chans, self.patch_size, self.mask_ratio = in_chans, patch_size, mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        for block in [*self.blocks, *self.decoder_blocks]:
            block.attn.fused_attn = not naive_attention
        self._init_weights()

    def _init_weights(self) -> None:
        grid = int(self.patch_embed.num_patches**0.5)
        self.pos_embed.data.copy_(sincos_table(self.pos_embed.shape[-1], grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_table(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, self.in_chans
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * c)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        N, L, D = x.shape
        len_keep = int(L * (1 - self.mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def to_ours_state_dict(ref_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference parameter names -> ``MaskedAutoencoder`` names (encoder under ``encoder.``); the
    frozen sin-cos tables are dropped (ours are buffers computed from the grid)."""
    out = {}
    for name, value in ref_state.items():
        if name in ("pos_embed", "decoder_pos_embed"):
            continue
        if name == "mask_token":
            out["mask_fill.mask_token"] = value
        else:
            out[name if name.startswith("decoder_") else f"encoder.{name}"] = value
    return out
