"""Every attention backend this machine has agrees with a naive softmax(QK^T/sqrt(d))V; the others are
a clear ValueError when the model is built."""

from __future__ import annotations

import math

import pytest
import torch

from xray_pretrain.models import (
    ATTN_BACKENDS,
    MAEConfig,
    MaskConfig,
    ViTEncoder,
    available_attention_backends,
    build_mae,
    check_attention_backend,
    describe_attention_backend,
)
from xray_pretrain.models.attention import Attention, attend

HEAD_DIMS = (16, 32)
AVAILABLE = available_attention_backends(HEAD_DIMS)
# Measured on this project's CPU runner (torch 2.14, N(0,1) inputs, N up to 1601, head dim 32/64):
# max |bf16 - fp64 reference| = 7.1e-3 and fp16 7.4e-4, dominated by rounding the inputs themselves.
BF16_ATOL, FP16_ATOL = 1.5e-2, 2e-3


# Tiny models: one CPU thread is faster and stable on a shared runner (see conftest.one_cpu_thread).
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def naive_attention(qkv_BN3HE: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(E)) V in float64 -> (B, N, H*E)."""
    B, N, _, H, E = qkv_BN3HE.shape
    q, k, v = qkv_BN3HE.double().permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(B, N, H * E)


def tiny_cfg(**overrides) -> MAEConfig:
    base = dict(
        size="tiny", image_size=[32, 48], patch_size=8, embed_dim=32, depth=1, num_heads=2,
        decoder_dim=32, decoder_depth=1, decoder_heads=1,
    )  # fmt: skip
    return MAEConfig(**{**base, **overrides})


def test_cpu_has_at_least_auto_flash_math():
    # PyTorch ships CPU kernels for SDPA's flash and math paths; the others are CUDA-only.
    assert {"auto", "math"} <= set(AVAILABLE)


@pytest.mark.parametrize("backend", [b for b in ATTN_BACKENDS if b in AVAILABLE])
@pytest.mark.parametrize("num_tokens, head_dim", [(17, 16), (65, 32)])
def test_backend_matches_naive_reference_fp32(backend, num_tokens, head_dim):
    gen = torch.Generator().manual_seed(num_tokens)
    qkv = torch.randn(2, num_tokens, 3, 3, head_dim, generator=gen, requires_grad=True)
    out = attend(qkv, backend)
    ref = naive_attention(qkv)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(out.shape, generator=gen)
    (grad,) = torch.autograd.grad(out, qkv, upstream)
    (grad_ref,) = torch.autograd.grad(ref, qkv, upstream.double())
    torch.testing.assert_close(grad.double(), grad_ref.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in ATTN_BACKENDS if b in AVAILABLE])
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, BF16_ATOL), (torch.float16, FP16_ATOL)])
def test_backend_half_precision_within_measured_tolerance(backend, dtype, atol):
    qkv = torch.randn(2, 197, 3, 4, 64, generator=torch.Generator().manual_seed(1))
    out = attend(qkv.to(dtype), backend)
    assert out.dtype == dtype
    err = (out.double() - naive_attention(qkv)).abs().max().item()
    assert err < atol, f"{backend} {dtype}: max abs error {err:.2e}"


@pytest.mark.parametrize("backend", [b for b in ATTN_BACKENDS if b not in AVAILABLE])
def test_unavailable_backend_fails_at_build_with_the_fix(backend):
    with pytest.raises(ValueError, match=f"attn={backend}") as err:
        build_mae(tiny_cfg(attn=backend), MaskConfig())
    message = str(err.value)
    if backend == "flash_attn":
        assert "flash-attn" in message or "CUDA" in message
    else:
        assert "Backends that work here: auto" in message


@pytest.mark.parametrize("backend", [b for b in ATTN_BACKENDS if b not in AVAILABLE])
def test_unavailable_backend_fails_when_a_standalone_encoder_is_built(backend):
    with pytest.raises(ValueError, match=f"attn={backend}"):
        ViTEncoder(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, attn=backend)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown"):
        check_attention_backend("xformers", (32,))
    with pytest.raises(ValueError, match="model.attn"):
        tiny_cfg(attn="xformers").validate()


@pytest.mark.parametrize("backend", [b for b in ATTN_BACKENDS if b in AVAILABLE])
def test_model_loss_identical_across_available_backends(backend):
    images = torch.randn(2, 1, 32, 48, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(2, 24, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    reference = build_mae(tiny_cfg(attn="math"), MaskConfig())
    torch.manual_seed(0)
    model = build_mae(tiny_cfg(attn=backend), MaskConfig())
    out = model(images, noise_BL=noise)
    torch.testing.assert_close(out.loss, reference(images, noise_BL=noise).loss, atol=1e-5, rtol=1e-5)
    expected = "sdpa:auto->" if backend == "auto" else f"sdpa:{backend}"
    assert out.stats["attn_backend"].startswith(expected)


def test_describe_reports_the_kernel_that_runs():
    assert describe_attention_backend("math", "cpu") == "sdpa:math"
    auto = describe_attention_backend("auto", "cpu", torch.float32, 32)
    assert auto.split("->")[1] in {"flash", "math", "efficient", "cudnn"}


def test_attention_module_keeps_timm_names_and_shapes():
    module = Attention(48, 3, backend="math")
    assert sorted(name for name, _ in module.named_parameters()) == [
        "proj.bias",
        "proj.weight",
        "qkv.bias",
        "qkv.weight",
    ]
    assert module(torch.randn(2, 5, 48)).shape == (2, 5, 48)
    with pytest.raises(ValueError, match="divide"):
        Attention(48, 5)
