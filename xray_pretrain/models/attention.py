"""Fused multi-head self-attention with an explicit, checked backend choice.

Backends (``attn`` in the model config):

- ``auto``: PyTorch SDPA picks its kernel (flash / cuDNN / mem-efficient / math).
- ``flash`` | ``cudnn`` | ``efficient`` | ``math``: SDPA restricted to that kernel with
  ``torch.nn.attention.sdpa_kernel``. On a CPU PyTorch has ``flash`` (its CPU flash kernel) and
  ``math``; ``cudnn`` and ``efficient`` exist only on CUDA.
- ``flash_attn``: the ``flash-attn`` package, FlashAttention-3 (``flash_attn_interface``) when
  installed, else v2 (``flash_attn.flash_attn_qkvpacked_func``). CUDA, fp16/bf16 only.

:func:`check_attention_backend` runs a tiny forward+backward with the chosen kernel when the model is
built, so a backend the machine lacks is a ``ValueError`` then, not at the first training step.
No backend materialises the (N, N) attention matrix except ``math``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTN_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "flash_attn")
_SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def default_device() -> torch.device:
    """The device a model built here will most likely run on: the current CUDA device, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _probe_dtype(device: torch.device) -> torch.dtype:
    # Training runs in bf16 on GPUs (flash kernels there need half precision); CPUs run fp32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@functools.lru_cache(maxsize=64)
def _probe_sdpa(backend: str, device_str: str, head_dim: int, dtype: torch.dtype) -> str:
    """'' when SDPA kernel ``backend`` runs forward+backward here, else the reason it does not."""
    # Explicit device: the probe must run for real even when the model is built under a meta-device
    # or no_grad context.
    with torch.inference_mode(False), torch.enable_grad():
        return _run_probe(backend, device_str, head_dim, dtype)


def _run_probe(backend: str, device_str: str, head_dim: int, dtype: torch.dtype) -> str:
    q_BHNE = torch.randn(1, 2, 8, head_dim, device=device_str, dtype=dtype, requires_grad=True)
    try:
        with sdpa_kernel([_SDPA_KERNELS[backend]]):
            F.scaled_dot_product_attention(q_BHNE, q_BHNE, q_BHNE).sum().backward()
    except RuntimeError as err:
        return str(err).strip().splitlines()[0].rstrip(".")
    return ""


def flash_attn_version() -> str | None:
    """'3' if ``flash_attn_interface`` (FlashAttention-3) is importable, '2.x.y' for ``flash_attn``."""
    if importlib.util.find_spec("flash_attn_interface") is not None:
        return "3"
    if importlib.util.find_spec("flash_attn") is not None:
        return getattr(importlib.import_module("flash_attn"), "__version__", "2")
    return None


def check_attention_backend(
    backend: str, head_dims: tuple[int, ...], device: torch.device | str | None = None
) -> None:
    """Raise ``ValueError`` (with the fix) unless ``backend`` runs here for every head dimension."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend attn={backend!r}: use one of {ATTN_BACKENDS}")
    device = torch.device(device) if device is not None else default_device()
    if backend == "auto":
        return
    if backend == "flash_attn":
        if device.type != "cuda":
            raise ValueError(
                f"attn=flash_attn needs a CUDA GPU and this run is on {device.type}; "
                "use attn=auto (or flash/math on CPU)"
            )
        if flash_attn_version() is None:
            raise ValueError(
                "attn=flash_attn needs the flash-attn package, which is not installed: "
                "`pip install flash-attn` (v2) or install FlashAttention-3 (flash_attn_interface), "
                "or use attn=auto / attn=flash (PyTorch's own flash kernel)"
            )
        return
    dtype = _probe_dtype(device)
    for head_dim in sorted(set(head_dims)):
        reason = _probe_sdpa(backend, str(device), head_dim, dtype)
        if reason:
            usable = available_attention_backends(head_dims, device)
            raise ValueError(
                f"attn={backend} is not available on {device} (torch {torch.__version__}, head_dim "
                f"{head_dim}, {dtype}): {reason}. Backends that work here: {', '.join(usable)}"
            )


def available_attention_backends(
    head_dims: tuple[int, ...] = (64,), device: torch.device | str | None = None
) -> list[str]:
    """The backends :func:`check_attention_backend` accepts on ``device`` for these head dims."""
    device = torch.device(device) if device is not None else default_device()
    usable = ["auto"]
    dtype = _probe_dtype(device)
    for name in _SDPA_KERNELS:
        if all(not _probe_sdpa(name, str(device), d, dtype) for d in set(head_dims)):
            usable.append(name)
    if device.type == "cuda" and flash_attn_version() is not None:
        usable.append("flash_attn")
    return usable


@functools.lru_cache(maxsize=64)
def describe_attention_backend(
    backend: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    head_dim: int = 64,
) -> str:
    """What actually runs for ``backend``, e.g. ``sdpa:flash``, ``sdpa:auto->efficient``, ``flash_attn:3``.

    For ``auto`` it asks SDPA's own dispatcher which kernel it would choose for a training call with
    this device, dtype and head dim (``torch._fused_sdp_choice``; reported as ``sdpa:auto`` if this
    PyTorch lacks it).
    """
    if backend == "flash_attn":
        return f"flash_attn:{flash_attn_version()}"
    if backend != "auto":
        return f"sdpa:{backend}"
    device = torch.device(device) if device is not None else default_device()
    q_BHNE = torch.zeros(1, 2, 8, head_dim, device=device, dtype=dtype, requires_grad=True)
    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        return "sdpa:auto"
    names = {int(kernel): name for name, kernel in _SDPA_KERNELS.items()}
    return f"sdpa:auto->{names.get(int(choice(q_BHNE, q_BHNE, q_BHNE)), 'other')}"


def _flash_attn_packed(qkv_BN3HE: torch.Tensor) -> torch.Tensor:
    """flash-attn package on packed qkv -> (B, N, H, E). Imported here: an optional CUDA-only package."""
    if qkv_BN3HE.dtype not in _HALF_DTYPES:
        raise ValueError(
            f"attn=flash_attn needs fp16/bf16 activations, got {qkv_BN3HE.dtype}: train with "
            "precision bf16 (autocast) or use attn=auto"
        )
    if flash_attn_version() == "3":
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(*qkv_BN3HE.unbind(2))
        return out[0] if isinstance(out, tuple) else out
    from flash_attn import flash_attn_qkvpacked_func

    return flash_attn_qkvpacked_func(qkv_BN3HE)


def attend(qkv_BN3HE: torch.Tensor, backend: str) -> torch.Tensor:
    """softmax(Q K^T / sqrt(E)) V for packed (B, N, 3, H, E) qkv -> (B, N, H*E)."""
    B, N, _, H, E = qkv_BN3HE.shape
    if backend == "flash_attn":
        return _flash_attn_packed(qkv_BN3HE).reshape(B, N, H * E)
    if backend in ("flash", "cudnn") and qkv_BN3HE.is_cuda and qkv_BN3HE.dtype not in _HALF_DTYPES:
        raise ValueError(
            f"attn={backend} on CUDA needs fp16/bf16 activations, got {qkv_BN3HE.dtype}: use precision "
            "bf16 (autocast) or attn=efficient/auto for fp32"
        )
    q_BHNE, k_BHNE, v_BHNE = qkv_BN3HE.permute(2, 0, 3, 1, 4).unbind(0)
    if backend == "auto":
        out_BHNE = F.scaled_dot_product_attention(q_BHNE, k_BHNE, v_BHNE)
    else:
        with sdpa_kernel([_SDPA_KERNELS[backend]]):
            out_BHNE = F.scaled_dot_product_attention(q_BHNE, k_BHNE, v_BHNE)
    return out_BHNE.transpose(1, 2).reshape(B, N, H * E)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``) and a fused qkv."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the width {dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, _ = x_BND.shape
        qkv_BN3HE = self.qkv(x_BND).view(B, N, 3, self.num_heads, self.head_dim)
        return self.proj(attend(qkv_BN3HE, self.backend))
