"""Fused multi-head attention (self, causal, cross) with an explicit, checked backend choice.

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


def _flash_attn(
    q_BNHE: torch.Tensor, k_BMHE: torch.Tensor, v_BMHE: torch.Tensor, causal: bool
) -> torch.Tensor:
    """flash-attn package -> (B, N, H, E). Imported here: an optional CUDA-only package."""
    if q_BNHE.dtype not in _HALF_DTYPES:
        raise ValueError(
            f"attn=flash_attn needs fp16/bf16 activations, got {q_BNHE.dtype}: train with "
            "precision bf16 (autocast) or use attn=auto"
        )
    if flash_attn_version() == "3":
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(q_BNHE, k_BMHE, v_BMHE, causal=causal)
        return out[0] if isinstance(out, tuple) else out
    from flash_attn import flash_attn_func

    return flash_attn_func(q_BNHE, k_BMHE, v_BMHE, causal=causal)


def _sdpa(
    q_BHNE: torch.Tensor, k_BHME: torch.Tensor, v_BHME: torch.Tensor, backend: str, causal: bool
) -> torch.Tensor:
    if backend in ("flash", "cudnn") and q_BHNE.is_cuda and q_BHNE.dtype not in _HALF_DTYPES:
        raise ValueError(
            f"attn={backend} on CUDA needs fp16/bf16 activations, got {q_BHNE.dtype}: use precision "
            "bf16 (autocast) or attn=efficient/auto for fp32"
        )
    if backend == "auto":
        return F.scaled_dot_product_attention(q_BHNE, k_BHME, v_BHME, is_causal=causal)
    with sdpa_kernel([_SDPA_KERNELS[backend]]):
        return F.scaled_dot_product_attention(q_BHNE, k_BHME, v_BHME, is_causal=causal)


def _flash_attn_packed(qkv_BN3HE: torch.Tensor, causal: bool) -> torch.Tensor:
    """flash-attn v2's packed-qkv kernel (no q/k/v split in backward) -> (B, N, H, E); v3 has none."""
    if flash_attn_version() == "3" or qkv_BN3HE.dtype not in _HALF_DTYPES:
        return _flash_attn(*qkv_BN3HE.unbind(2), causal)  # v3, or the dtype error
    from flash_attn import flash_attn_qkvpacked_func

    return flash_attn_qkvpacked_func(qkv_BN3HE, causal=causal)


def attend(qkv_BN3HE: torch.Tensor, backend: str, causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(E)) V for packed (B, N, 3, H, E) qkv -> (B, N, H*E); ``causal``: token i
    attends to tokens 0..i only."""
    if backend == "flash_attn":
        B, N, _, H, E = qkv_BN3HE.shape
        return _flash_attn_packed(qkv_BN3HE, causal).reshape(B, N, H * E)
    return attend_qkv(*qkv_BN3HE.unbind(2), backend, causal=causal)


def attend_qkv(
    q_BNHE: torch.Tensor, k_BMHE: torch.Tensor, v_BMHE: torch.Tensor, backend: str, causal: bool = False
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(E)) V with N queries over M keys (cross-attention, or self-attention over
    a key cache) -> (B, N, H*E). ``causal`` needs N == M: SDPA aligns its mask top-left and flash-attn
    bottom-right, which agree only then (a one-token step over a cache needs no mask)."""
    B, N, H, E = q_BNHE.shape
    if causal and k_BMHE.shape[1] != N:
        raise ValueError(f"causal attention needs as many keys as queries, got {k_BMHE.shape[1]} and {N}")
    if backend == "flash_attn":
        return _flash_attn(q_BNHE, k_BMHE, v_BMHE, causal).reshape(B, N, H * E)
    q_BHNE, k_BHME, v_BHME = (t.transpose(1, 2) for t in (q_BNHE, k_BMHE, v_BMHE))
    return _sdpa(q_BHNE, k_BHME, v_BHME, backend, causal).transpose(1, 2).reshape(B, N, H * E)


def _check_heads(dim: int, num_heads: int) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the width {dim}")


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``) and a fused qkv.

    ``causal=True`` (a text decoder) lets token i see tokens 0..i. For step-by-step generation,
    ``forward(x, cache)`` with a :class:`KVCache` attends over the cached keys plus the new ones and
    appends the new ones to the cache.
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "auto", causal: bool = False) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x_BND: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, N, _ = x_BND.shape
        qkv_BN3HE = self.qkv(x_BND).view(B, N, 3, self.num_heads, self.head_dim)
        if cache is None:
            return self.proj(attend(qkv_BN3HE, self.backend, causal=self.causal))
        q_BNHE, k_BNHE, v_BNHE = qkv_BN3HE.unbind(2)
        if cache.length and N != 1:
            raise ValueError("a filled key cache takes one new token per step")
        k_BMHE, v_BMHE = cache.append(k_BNHE, v_BNHE)
        # One token over a cache of earlier tokens needs no mask; a first multi-token fill does.
        causal = self.causal and k_BMHE.shape[1] == N
        return self.proj(attend_qkv(q_BNHE, k_BMHE, v_BMHE, self.backend, causal=causal))


class KVCache:
    """Keys and values of the tokens generated so far, for one self-attention layer."""

    def __init__(self) -> None:
        self.k_BMHE: torch.Tensor | None = None
        self.v_BMHE: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k_BMHE is None else self.k_BMHE.shape[1]

    def append(self, k_BNHE: torch.Tensor, v_BNHE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_BMHE is None:
            self.k_BMHE, self.v_BMHE = k_BNHE, v_BNHE
        else:
            self.k_BMHE = torch.cat([self.k_BMHE, k_BNHE], dim=1)
            self.v_BMHE = torch.cat([self.v_BMHE, v_BNHE], dim=1)
        return self.k_BMHE, self.v_BMHE

    def reorder(self, index_B: torch.Tensor) -> None:
        """Keep row ``index_B[b]`` as row b (beam search moves hypotheses between beams)."""
        if self.k_BMHE is not None:
            self.k_BMHE = self.k_BMHE.index_select(0, index_B)
            self.v_BMHE = self.v_BMHE.index_select(0, index_B)


class CrossAttention(nn.Module):
    """Multi-head attention of ``dim``-wide queries over ``memory_dim``-wide memory tokens (a text
    decoder over image features). The memory's keys and values can be computed once with
    :meth:`memory_kv` and reused at every generation step."""

    def __init__(
        self, dim: int, num_heads: int, memory_dim: int | None = None, backend: str = "auto"
    ) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(memory_dim or dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def memory_kv(self, memory_BMD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, memory_dim) -> keys and values, each (B, M, H, E)."""
        B, M, _ = memory_BMD.shape
        return self.kv(memory_BMD).view(B, M, 2, self.num_heads, self.head_dim).unbind(2)

    def forward(self, x_BND: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, N, _ = x_BND.shape
        q_BNHE = self.q(x_BND).view(B, N, self.num_heads, self.head_dim)
        return self.proj(attend_qkv(q_BNHE, *memory_kv, self.backend))
