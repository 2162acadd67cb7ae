"""Report generator: causal and cross attention against a naive reference, cached step-by-step
decoding equal to teacher forcing, one or two views, pooled features, loss, and a tiny model that
learns to tell two images' reports apart."""

from __future__ import annotations

import math

import pytest
import torch

from xray_pretrain.models.attention import Attention, CrossAttention, KVCache, attend_qkv
from xray_pretrain.models.report import GenerationOptions, ReportDecoderConfig, ReportGenerator
from xray_pretrain.models.vit import ViTEncoder

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
PAD, BOS, EOS = 0, 1, 2


def naive(q_BNHE, k_BMHE, v_BMHE, causal=False):
    q, k, v = (t.double().transpose(1, 2) for t in (q_BNHE, k_BMHE, v_BMHE))
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        N = q.shape[2]
        logits = logits.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(logits, -1) @ v
    return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_causal_and_cross_attention_match_naive(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 2, 8, generator=gen) for n in (5, 5, 5))
    tol = dict(atol=1e-5, rtol=1e-5)  # fp32 kernels against the fp64 reference
    torch.testing.assert_close(
        attend_qkv(q, k, v, backend, causal=True).double(), naive(q, k, v, True), **tol
    )
    mk, mv = torch.randn(2, 7, 2, 8, generator=gen), torch.randn(2, 7, 2, 8, generator=gen)
    torch.testing.assert_close(attend_qkv(q, mk, mv, backend).double(), naive(q, mk, mv), **tol)
    with pytest.raises(ValueError, match="causal attention needs as many keys as queries"):
        attend_qkv(q, mk, mv, backend, causal=True)


def test_cached_self_attention_equals_causal_attention():
    torch.manual_seed(0)
    attn = Attention(16, 2, causal=True)
    x = torch.randn(3, 6, 16)
    full = attn(x)
    cache = KVCache()
    steps = [attn(x[:, t : t + 1], cache) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    cross = CrossAttention(16, 2, memory_dim=12)
    memory = torch.randn(3, 4, 12)
    assert cross(x, cross.memory_kv(memory)).shape == (3, 6, 16)


def tiny_generator(num_views=1, feature_grid=None, vocab_size=12, **overrides) -> ReportGenerator:
    torch.manual_seed(0)
    encoder = ViTEncoder(image_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2)
    cfg = ReportDecoderConfig(
        vocab_size=vocab_size, max_length=10, dim=32, depth=2, num_heads=2,
        num_views=num_views, feature_grid=feature_grid, **overrides,
    )  # fmt: skip
    return ReportGenerator(encoder, cfg)


def test_teacher_forcing_logits_equal_cached_decoding():
    model = tiny_generator(num_views=2, feature_grid=(2, 3)).eval()
    images = torch.randn(2, 2, 1, 32, 48)
    ids = torch.tensor([[BOS, 5, 6, 7, EOS, PAD], [BOS, 8, 9, EOS, PAD, PAD]])
    out = model(images, ids)
    memory_kv = model.memory_kv(images)
    assert memory_kv[0][0].shape == (2, 2 * 2 * 3, 2, 16)  # 2 views x pooled 2x3 grid, 2 heads x 16
    caches = [KVCache() for _ in model.blocks]
    steps = [model.decode(ids[:, t : t + 1], memory_kv, caches, start=t) for t in range(ids.shape[1] - 1)]
    torch.testing.assert_close(torch.cat(steps, 1), out.logits_BTV, atol=1e-5, rtol=1e-5)


def test_loss_ignores_padding_and_smooths_labels():
    model = tiny_generator()
    images = torch.randn(2, 1, 32, 48)
    ids = torch.tensor([[BOS, 5, EOS, PAD], [BOS, 8, 9, EOS]])
    out = model(images, ids)
    targets = ids[:, 1:].flatten()
    keep = targets != PAD
    expected = torch.nn.functional.cross_entropy(out.logits_BTV.flatten(0, 1)[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)
    smoothed = tiny_generator(label_smoothing=0.1)(images, ids).loss
    assert smoothed.item() != pytest.approx(out.loss.item())
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # encoder, memory projection, decoder, head all get a gradient


def test_bad_inputs_are_clear_errors():
    model = tiny_generator(num_views=2)
    with pytest.raises(ValueError, match="takes 2 view"):
        model(torch.randn(2, 1, 32, 48), torch.tensor([[BOS, EOS]] * 2))
    with pytest.raises(ValueError, match="exceed max_length=10"):
        model(torch.randn(1, 2, 1, 32, 48), torch.ones(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="pass token ids"):
        model(torch.randn(1, 2, 1, 32, 48))
    with pytest.raises(ValueError, match="build the tokenizer first"):
        ReportGenerator(
            ViTEncoder(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), ReportDecoderConfig()
        )


def test_learns_two_reports_and_generates_them():
    # Two studies (two views each) with different reports: after a few hundred steps, greedy and
    # beam search must read each study's report off its images.
    model = tiny_generator(num_views=2, feature_grid=(2, 2))
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 2, 1, 32, 48, generator=gen)
    reports = torch.tensor([[BOS, 5, 6, 7, 6, EOS, PAD], [BOS, 8, 9, 10, 11, 5, EOS]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        model(images, reports).loss.backward()
        optimizer.step()
    model.eval()
    expected = reports[:, 1:]
    greedy = model(images, generation=GenerationOptions(beam_size=1))
    beam = model(images, generation=GenerationOptions(beam_size=3))
    for out in (greedy, beam):
        assert out[0, :5].tolist() == expected[0, :5].tolist() and out[0, 5:].eq(PAD).all()
        assert out[1, :6].tolist() == expected[1].tolist()


def test_encoder_names_and_freezing():
    model = tiny_generator()
    names = [n for n, _ in model.named_parameters()]
    assert "encoder.blocks.0.attn.qkv.weight" in names and "encoder.cls_token" in names  # as the MAE's
    model.freeze_encoder(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("encoder.") and not n.startswith("encoder.norm") for n in trainable)
    assert "encoder.norm.weight" in trainable and "head.weight" in trainable
    model.freeze_encoder(-1)
    assert not any(n.startswith("encoder.") for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="freeze_blocks=2"):
        model.freeze_encoder(2)
