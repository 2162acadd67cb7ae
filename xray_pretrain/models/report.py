"""Report generator: the project's ViT encoder -> patch features (optionally pooled to a grid) ->
a Transformer decoder with causal self-attention and cross-attention over the features.

One view ``(B, 1, H, W)`` or a study's views ``(B, V, 1, H, W)`` (R2Gen's IU X-ray setting: frontal
and lateral through the same encoder, their tokens concatenated, each view's tokens tagged with a
learned view embedding). All attention goes through :mod:`.attention`'s fused kernels.

``forward(images, ids)`` is teacher forcing: the loss of predicting ``ids[:, 1:]`` from
``ids[:, :-1]``, padding ignored, optional label smoothing. ``forward(images, generation=...)``
decodes with :mod:`.decoding` (greedy or beam search) over a key/value cache; generation is a mode
of ``forward`` so that under DeepSpeed it runs inside the engine's forward, where ZeRO-3 gathers
every parameter the step-by-step decoding reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, CrossAttention, KVCache, check_attention_backend
from .decoding import beam_search, greedy_search, sample_search
from .vit import LAYER_NORM_EPS, Mlp, ViTEncoder, init_mae_weights


@dataclass
class ReportDecoderConfig:
    """Decoder sizes and the token ids it shares with the tokenizer (its specials' ids by default)."""

    vocab_size: int = 0  # set from the tokenizer
    max_length: int = 60  # ids per report including <bos>/<eos> (the tokenizer's max_length)
    dim: int = 512
    depth: int = 3
    num_heads: int = 8
    mlp_ratio: float = 4.0
    num_views: int = 1  # 2: a study's frontal + lateral, R2Gen style
    feature_grid: tuple[int, int] | None = None  # average-pool the encoder's patch grid to (rows, cols)
    label_smoothing: float = 0.0
    attn: str = "auto"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def validate(self) -> None:
        if self.vocab_size <= max(self.pad_id, self.bos_id, self.eos_id):
            raise ValueError(f"report decoder vocab_size={self.vocab_size}: build the tokenizer first")
        if self.max_length < 3:
            raise ValueError(f"report max_length={self.max_length} must be >= 3")
        if self.num_views not in (1, 2):
            raise ValueError(f"report views={self.num_views}: use 1 (one image) or 2 (frontal + lateral)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.feature_grid is not None and (len(self.feature_grid) != 2 or min(self.feature_grid) < 1):
            raise ValueError(f"feature_grid={self.feature_grid} must be [rows, cols] >= 1, or null")
        if self.num_heads < 1 or self.dim % self.num_heads:
            raise ValueError(f"report decoder num_heads={self.num_heads} must divide dim={self.dim}")


@dataclass
class GenerationOptions:
    """Decoding settings (:mod:`.decoding`). ``beam_size=1`` is greedy; ``max_length`` None: the
    model's. ``all_finished(local_done) -> global_done`` decides when to stop: under DeepSpeed pass an
    all-ranks reduction (``collectives.all_ranks_true``) so that every rank runs the same steps.
    ``num_samples > 0`` samples that many reports per image instead (rows ``image * num_samples +
    sample``; self-critical training), at ``temperature``; beam size and trigram blocking are then
    unused."""

    beam_size: int = 3
    max_length: int | None = None
    length_penalty: float = 0.0
    block_trigrams: bool = True
    all_finished: Callable[[bool], bool] | None = None
    num_samples: int = 0
    temperature: float = 1.0


@dataclass
class ReportOutput:
    loss: torch.Tensor  # scalar, mean over non-padding target tokens
    logits_BTV: torch.Tensor


class DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention, cross-attention over the image tokens, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.self_attn = Attention(dim, num_heads, backend=attn, causal=True)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.cross_attn = CrossAttention(dim, num_heads, backend=attn)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x_BTD: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.norm1(x_BTD), cache)
        x_BTD = x_BTD + self.cross_attn(self.norm2(x_BTD), memory_kv)
        return x_BTD + self.mlp(self.norm3(x_BTD))


class ImageMemory(nn.Module):
    """Encoder patch tokens of each view -> (optionally pooled) decoder-width memory, views concatenated."""

    def __init__(self, encoder_dim: int, grid_size: tuple[int, int], cfg: ReportDecoderConfig) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.feature_grid = tuple(cfg.feature_grid) if cfg.feature_grid is not None else None
        self.num_views = cfg.num_views
        self.proj = nn.Linear(encoder_dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.view_embed = nn.Embedding(cfg.num_views, cfg.dim)

    def forward(self, tokens_NLE: torch.Tensor) -> torch.Tensor:
        """(B * V, L, E) patch tokens (a sample's views adjacent) -> (B, V * tokens_per_view, D)."""
        if self.feature_grid is not None:
            grid_NEhw = tokens_NLE.transpose(1, 2).reshape(tokens_NLE.shape[0], -1, *self.grid_size)
            tokens_NLE = F.adaptive_avg_pool2d(grid_NEhw, self.feature_grid).flatten(2).transpose(1, 2)
        memory_NLD = self.norm(self.proj(tokens_NLE))
        views_V = torch.arange(self.num_views, device=tokens_NLE.device)
        memory_BVLD = memory_NLD.view(-1, self.num_views, *memory_NLD.shape[1:])
        return (memory_BVLD + self.view_embed(views_V)[None, :, None]).flatten(1, 2)

    def num_tokens(self) -> int:
        rows, cols = self.feature_grid or self.grid_size
        return self.num_views * rows * cols


class TokenEmbedding(nn.Module):
    """Token + learned position embeddings for positions ``start .. start + T - 1``."""

    def __init__(self, vocab_size: int, max_length: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_length, dim)

    def forward(self, ids_BT: torch.Tensor, start: int = 0) -> torch.Tensor:
        positions_T = torch.arange(start, start + ids_BT.shape[1], device=ids_BT.device)
        return self.tokens(ids_BT) + self.positions(positions_T)


class ReportGenerator(nn.Module):
    """Parameter names: ``encoder.*`` exactly as the MAE's and the classifier's encoder (weights load
    by the same names), ``memory.*`` / ``embed.*`` / ``blocks.*`` / ``norm.*`` / ``head.*`` new."""

    def __init__(self, encoder: ViTEncoder, cfg: ReportDecoderConfig) -> None:
        super().__init__()
        cfg.validate()
        check_attention_backend(cfg.attn, (cfg.dim // cfg.num_heads,))
        self.cfg = cfg
        self.encoder = encoder
        self.memory = ImageMemory(encoder.embed_dim, encoder.grid_size, cfg)
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.max_length, cfg.dim)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.attn) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        for module in (self.memory, self.blocks, self.norm, self.head):
            module.apply(init_mae_weights)  # the encoder keeps its own (pre-trained) weights
        for embedding in (self.memory.view_embed, self.embed.tokens, self.embed.positions):
            nn.init.normal_(embedding.weight, std=0.02)

    def freeze_encoder(self, num_blocks: int) -> None:
        """``-1``: the whole encoder frozen; ``k > 0``: its stem, cls token and first k blocks; 0: none."""
        if num_blocks < -1 or num_blocks > len(self.encoder.blocks):
            raise ValueError(
                f"freeze_blocks={num_blocks}: use -1 (all), 0 (none) or 1..{len(self.encoder.blocks)}"
            )
        frozen = [self.encoder] if num_blocks == -1 else []
        if num_blocks > 0:
            frozen = [self.encoder.patch_embed, *self.encoder.blocks[:num_blocks]]
            self.encoder.cls_token.requires_grad_(False)
        for module in frozen:
            module.requires_grad_(False)

    def memory_kv(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, C, H, W) or (B, V, C, H, W) images, encoded once -> each block's cross-attention keys
        and values over them."""
        if images.dim() == 4:
            images = images.unsqueeze(1)
        if images.shape[1] != self.cfg.num_views:
            raise ValueError(
                f"the report model takes {self.cfg.num_views} view(s) per sample, got {images.shape[1]}"
            )
        tokens_NLE = self.encoder(images.flatten(0, 1))[:, 1:]  # (B*V, L, E): patch tokens, cls dropped
        memory_BMD = self.memory(tokens_NLE)
        return [block.cross_attn.memory_kv(memory_BMD) for block in self.blocks]

    def decode(
        self,
        ids_BT: torch.Tensor,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        caches: list[KVCache] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Token ids at positions ``start..`` -> (B, T, vocab) logits (with ``caches``: appended to)."""
        x_BTD = self.embed(ids_BT, start)
        for i, block in enumerate(self.blocks):
            x_BTD = block(x_BTD, memory_kv[i], None if caches is None else caches[i])
        return self.head(self.norm(x_BTD))

    def forward(
        self,
        images: torch.Tensor,
        ids_BT: torch.Tensor | None = None,
        generation: GenerationOptions | None = None,
    ) -> ReportOutput | torch.Tensor:
        """``model(images, ids_BT)``: teacher forcing on ``[<bos>, words..., <eos>, <pad>...]``
        (T <= max_length) -> :class:`ReportOutput`. ``model(images, generation=GenerationOptions())``:
        decoding -> (B, T) generated ids (:meth:`generate`).

        Generation is a mode of ``forward`` so that it runs inside DeepSpeed's forward: ZeRO-3 gathers
        parameters read outside their own module's forward (the patch stem's conv weight) only there.
        """
        if generation is not None:
            return self.generate(images, generation)
        if ids_BT is None:
            raise ValueError("pass token ids (teacher forcing) or generation options")
        if ids_BT.shape[1] > self.cfg.max_length:
            raise ValueError(f"reports of {ids_BT.shape[1]} ids exceed max_length={self.cfg.max_length}")
        logits_BTV = self.decode(ids_BT[:, :-1], self.memory_kv(images))
        loss = F.cross_entropy(
            logits_BTV.float().flatten(0, 1),
            ids_BT[:, 1:].flatten(),
            ignore_index=self.cfg.pad_id,
            label_smoothing=self.cfg.label_smoothing,
        )
        return ReportOutput(loss, logits_BTV)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
        """(B, V, 1, H, W) or (B, 1, H, W) -> (B, T) generated ids after ``<bos>``: words, ``<eos>``,
        then ``<pad>`` ((B * num_samples, T) when sampling). Under DeepSpeed call
        ``engine(images, generation=...)`` instead (see forward)."""
        max_length = min(options.max_length or self.cfg.max_length, self.cfg.max_length)
        beam_size = 1 if options.num_samples else options.beam_size
        rows_per_image = options.num_samples or beam_size
        memory_kv = self.memory_kv(images)
        batch_size = memory_kv[0][0].shape[0] * (options.num_samples or 1)
        if rows_per_image > 1:
            memory_kv = [
                (k.repeat_interleave(rows_per_image, 0), v.repeat_interleave(rows_per_image, 0))
                for k, v in memory_kv
            ]
        caches = [KVCache() for _ in self.blocks]

        def step(last_N: torch.Tensor, position: int) -> torch.Tensor:
            logits_N1V = self.decode(last_N[:, None], memory_kv, caches, start=position)
            return torch.log_softmax(logits_N1V[:, 0].float(), dim=-1)

        def reorder(index_N: torch.Tensor) -> None:
            for cache in caches:
                cache.reorder(index_N)

        common = dict(
            batch_size=batch_size,
            max_length=max_length,
            bos_id=self.cfg.bos_id,
            eos_id=self.cfg.eos_id,
            pad_id=self.cfg.pad_id,
            all_finished=options.all_finished,
            device=images.device,
        )
        if options.num_samples:
            return sample_search(step, temperature=options.temperature, **common)
        common["block_trigrams"] = options.block_trigrams
        if beam_size == 1:
            return greedy_search(step, **common)
        return beam_search(
            step, reorder, beam_size=beam_size, length_penalty=options.length_penalty, **common
        ).ids_BT
