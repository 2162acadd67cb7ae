"""Analytic cost of an MAE training step: FLOPs, parameters, memory; MFU and device peaks.

FLOP convention (as in the PaLM / Megatron MFU papers): a matmul of (m x k) by (k x n) costs
``2 m k n``; element-wise work (norms, GELU, softmax, adds) is not counted; backward costs twice the
forward, so a training step is ``3 x forward``. Recomputation from activation checkpointing is *not*
counted: MFU measures useful model work, so checkpointing shows up as lower MFU, as it should.

Per transformer block over N tokens of width D with MLP width Hm = mlp_ratio * D (forward):
  qkv 6 N D^2 + proj 2 N D^2 + MLP 4 N D Hm  (dense)   and   Q K^T + A V: 4 N^2 D  (attention).
Encoder: stem on the K visible patches + ``depth`` blocks over N = 1 + K tokens.
Decoder: embed 2 (1+K) D Dd + ``decoder_depth`` blocks over N = 1 + L + prediction 2 L Dd P.
"""

from __future__ import annotations

import math
import os
import time

import torch

from .mae import MAEConfig
from .masking import MaskConfig, num_visible_tokens
from .stem import HIERARCHICAL_FACTOR
from .vit import grid_for

# Datasheet dense peaks (no sparsity), FLOP/s per GPU. "fp32" is plain FP32 (no TF32). The first
# entry whose key occurs in torch.cuda.get_device_name() wins, so the PCIe H100 precedes "H100".
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}
PEAK_FLOPS_ENV = "XRAY_PEAK_FLOPS"  # FLOP/s to use where the table has no entry (e.g. CPUs)


# ---- FLOPs ----------------------------------------------------------------------------------------
def block_flops(num_tokens: int, dim: int, mlp_ratio: float) -> tuple[float, float]:
    """Forward FLOPs of one transformer block over ``num_tokens``: (dense matmuls, attention matmuls)."""
    hidden = int(dim * mlp_ratio)
    dense = 8.0 * num_tokens * dim * dim + 4.0 * num_tokens * dim * hidden
    attention = 4.0 * num_tokens * num_tokens * dim
    return dense, attention


def stem_flops(num_tokens: int, patch_size: int, in_chans: int, embed_dim: int, stem: str) -> float:
    """Forward FLOPs of the token stem over ``num_tokens`` patches."""
    if stem == "patch":
        return 2.0 * num_tokens * patch_size**2 * in_chans * embed_dim
    hidden = max(embed_dim // 4, 1)
    sub_patches = HIERARCHICAL_FACTOR**2
    conv1 = 2.0 * sub_patches * patch_size**2 * in_chans * hidden
    conv2 = 2.0 * sub_patches * hidden * embed_dim
    return num_tokens * (conv1 + conv2)


def estimate_step_flops(cfg: MAEConfig, mask_cfg: MaskConfig, batch_size: int) -> dict[str, float]:
    """Analytic FLOPs of one training step (forward + backward) for ``batch_size`` images.

    Keys (FLOPs per step): ``total`` (= 3 x ``forward``), ``forward``, ``encoder``, ``decoder``
    (fwd+bwd, their sum is ``total``), ``attention`` (the Q K^T and A V part of encoder + decoder,
    fwd+bwd), ``per_image`` (``total / batch_size``). Recomputation is not counted (module docstring).
    """
    embed_dim, depth, _ = cfg.encoder_dims()
    rows, cols = grid_for(cfg.image_hw(), cfg.token_patch())
    num_tokens = rows * cols
    num_keep = num_visible_tokens(num_tokens, mask_cfg.ratio)
    patch_pixels = cfg.token_patch() ** 2 * cfg.in_chans

    enc_dense, enc_attn = block_flops(1 + num_keep, embed_dim, cfg.mlp_ratio)
    encoder = stem_flops(num_keep, cfg.patch_size, cfg.in_chans, embed_dim, cfg.stem)
    encoder += depth * (enc_dense + enc_attn)
    dec_dense, dec_attn = block_flops(1 + num_tokens, cfg.decoder_dim, cfg.mlp_ratio)
    decoder = 2.0 * (1 + num_keep) * embed_dim * cfg.decoder_dim
    decoder += cfg.decoder_depth * (dec_dense + dec_attn) + 2.0 * num_tokens * cfg.decoder_dim * patch_pixels
    attention = depth * enc_attn + cfg.decoder_depth * dec_attn

    train = 3.0 * batch_size  # forward + backward (2 x forward) for the whole batch
    return {
        "total": train * (encoder + decoder),
        "forward": batch_size * (encoder + decoder),
        "encoder": train * encoder,
        "decoder": train * decoder,
        "attention": train * attention,
        "per_image": 3.0 * (encoder + decoder),
    }


# ---- parameters and memory ------------------------------------------------------------------------
def count_params(cfg: MAEConfig) -> dict[str, int]:
    """Trainable parameters of the MAE (``encoder``, ``decoder``, ``total``); the fixed sin-cos tables
    are buffers and not counted."""
    embed_dim, depth, _ = cfg.encoder_dims()
    C, p = cfg.in_chans, cfg.patch_size

    def block(dim: int) -> int:
        hidden = int(dim * cfg.mlp_ratio)
        return 4 * dim * dim + 4 * dim + 2 * dim * hidden + hidden + dim + 4 * dim

    if cfg.stem == "patch":
        stem = p * p * C * embed_dim + embed_dim
    else:
        hidden = max(embed_dim // 4, 1)
        stem = p * p * C * hidden + hidden + HIERARCHICAL_FACTOR**2 * hidden * embed_dim + embed_dim
    encoder = stem + embed_dim + depth * block(embed_dim) + 2 * embed_dim
    Dd, P = cfg.decoder_dim, cfg.token_patch() ** 2 * C
    decoder = embed_dim * Dd + Dd + Dd + cfg.decoder_depth * block(Dd) + 2 * Dd + Dd * P + P
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}


def _block_activation_bytes(num_tokens: int, dim: int, mlp_ratio: float, act_bytes: int) -> float:
    """Bytes one block keeps for backward per sample: the fp32 residual stream at both norm inputs, and
    in the compute dtype the two norm outputs, q/k/v, the attention output, fc1 output, GELU output."""
    hidden = int(dim * mlp_ratio)
    return num_tokens * (2 * dim * 4 + act_bytes * (6 * dim + 2 * hidden))


def estimate_train_memory_bytes(
    cfg: MAEConfig, mask_cfg: MaskConfig, batch_size: int, precision: str = "bf16"
) -> dict[str, float]:
    """Peak training memory of one plain AdamW step (fp32 weights, grads, two moments), in bytes.

    Activations follow :func:`_block_activation_bytes`; with checkpointing a checkpointed block keeps
    only its fp32 input and one block's activations exist at a time during recomputation. The ``math``
    attention backend adds the (heads x N x N) scores and probabilities. Not modelled: allocator
    fragmentation and kernel workspaces; leave head-room (see :func:`suggest_batch_size`).
    """
    act_bytes = 4 if precision == "fp32" else 2
    embed_dim, depth, num_heads = cfg.encoder_dims()
    rows, cols = grid_for(cfg.image_hw(), cfg.token_patch())
    num_tokens = rows * cols
    layers = [
        (1 + num_visible_tokens(num_tokens, mask_cfg.ratio), embed_dim, num_heads, depth),
        (1 + num_tokens, cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_depth),
    ]
    every = cfg.grad_ckpt_every if cfg.grad_ckpt else 0
    per_sample, recompute_peak = 0.0, 0.0
    for n, dim, heads, count in layers:
        full = _block_activation_bytes(n, dim, cfg.mlp_ratio, act_bytes)
        if cfg.attn == "math":
            full += 2 * heads * n * n * act_bytes
        num_ckpt = math.ceil(count / every) if every else 0
        per_sample += num_ckpt * n * dim * 4 + (count - num_ckpt) * full
        recompute_peak = max(recompute_peak, full if num_ckpt else 0.0)
    patch_pixels = cfg.token_patch() ** 2 * cfg.in_chans
    per_sample += recompute_peak + 6 * num_tokens * patch_pixels * 4  # patches, target, pred, loss terms
    num_params = count_params(cfg)["total"]
    out = {
        "params": 4.0 * num_params,
        "grads": 4.0 * num_params,
        "optimizer": 8.0 * num_params,
        "activations": batch_size * per_sample,
    }
    out["total"] = sum(out.values())
    return out


def suggest_batch_size(
    cfg: MAEConfig,
    mask_cfg: MaskConfig,
    memory_bytes: float,
    precision: str = "bf16",
    fraction: float = 0.8,
    max_batch_size: int | None = None,
) -> int:
    """Largest batch whose :func:`estimate_train_memory_bytes` fits ``fraction`` of ``memory_bytes``
    (0 if not even one image fits). Closed form: the estimate is affine in the batch size."""
    fixed = estimate_train_memory_bytes(cfg, mask_cfg, 0, precision)["total"]
    per_image = estimate_train_memory_bytes(cfg, mask_cfg, 1, precision)["total"] - fixed
    batch = max(int((fraction * memory_bytes - fixed) // per_image), 0)
    return min(batch, max_batch_size) if max_batch_size else batch


# ---- MFU ------------------------------------------------------------------------------------------
def device_peak_flops(
    device: torch.device | str | None = None, precision: str = "bf16", fallback: float | None = None
) -> float:
    """Datasheet dense peak FLOP/s of ``device`` at ``precision`` (bf16 | fp16 | fp32).

    Unknown devices (and CPUs) give ``fallback``, else the ``XRAY_PEAK_FLOPS`` environment variable,
    else NaN (so MFU reads NaN rather than a made-up number).
    """
    if fallback is None and os.environ.get(PEAK_FLOPS_ENV):
        fallback = float(os.environ[PEAK_FLOPS_ENV])
    default = float("nan") if fallback is None else float(fallback)
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type != "cuda":
        return default
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks.get(precision, default)
    return default


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over ``peak_flops`` (NaN if the peak is unknown)."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step must be > 0, got {seconds_per_step}")
    if not peak_flops or math.isnan(peak_flops):
        return float("nan")
    return flops_per_step / seconds_per_step / peak_flops


def measure_matmul_tflops(
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    size: int | None = None,
    iters: int | None = None,
) -> float:
    """Measured matmul ceiling in TFLOP/s: ``iters`` (size x size) @ (size x size) products after a
    warm-up (defaults: 8192 and 20 on CUDA, 1024 and 5 on CPU)."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    size = size or (8192 if on_cuda else 1024)
    iters = iters or (20 if on_cuda else 5)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, clocks

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    sync()
    seconds = time.perf_counter() - start
    return 2.0 * size**3 * iters / seconds / 1e12
