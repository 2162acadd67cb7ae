"""Masking invariants: exact K per sample, the optimal inside/outside split, regions per sample,
roi pooling at any resolution, the seed rectangle, determinism."""

from __future__ import annotations

import time

import pytest
import torch

from xray_pretrain.models import MAEConfig, MaskConfig, build_mae
from xray_pretrain.models.masking import (
    make_mask,
    num_visible_tokens,
    pool_region,
    rectangle_region,
    select_visible,
    split_visible,
)

# Tiny models: one CPU thread is faster and stable on a shared runner (see conftest.one_cpu_thread).
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_mae(strategy: str, image_size=(64, 96), ratio: float = 0.75, **mask_kwargs):
    cfg = MAEConfig(
        size="tiny", image_size=list(image_size), patch_size=8, embed_dim=32, depth=1, num_heads=2,
        decoder_dim=32, decoder_depth=1, decoder_heads=2,
    )  # fmt: skip
    return build_mae(cfg, MaskConfig(strategy=strategy, ratio=ratio, **mask_kwargs))


def miss(x: float, n_in: int, n_out: int, num_keep: int, r_in: float, r_out: float) -> float:
    """The objective the split minimises (masking.py docstring), in plain Python."""
    total = 0.0
    if n_in:
        total += (x / n_in - (1 - r_in)) ** 2
    if n_out:
        total += ((num_keep - x) / n_out - (1 - r_out)) ** 2
    return total


def best_split_brute_force(n_in: int, num_tokens: int, num_keep: int, r_in: float, r_out: float) -> float:
    n_out = num_tokens - n_in
    feasible = range(max(0, num_keep - n_out), min(n_in, num_keep) + 1)
    return min(miss(x, n_in, n_out, num_keep, r_in, r_out) for x in feasible)


def test_split_is_the_integer_optimum():
    gen = torch.Generator().manual_seed(0)
    cases = []
    for num_tokens in (16, 96, 400, 6400):
        for ratio in (0.5, 0.75, 0.9):
            num_keep = num_visible_tokens(num_tokens, ratio)
            for r_in, r_out in ((0.95, 0.85), (0.6, 0.9), (0.75, 0.75), (1.0, 0.0)):
                n_in = torch.randint(0, num_tokens + 1, (12,), generator=gen)
                n_in[:3] = torch.tensor([0, num_tokens, 1])  # empty, full, tiny regions
                cases.append((n_in, num_tokens, num_keep, r_in, r_out))
    for n_in, num_tokens, num_keep, r_in, r_out in cases:
        keep_inside = split_visible(n_in, num_tokens, num_keep, r_in, r_out)
        for n, x in zip(n_in.tolist(), keep_inside.tolist()):
            n_out = num_tokens - n
            assert max(0, num_keep - n_out) <= x <= min(n, num_keep), "split outside the feasible range"
            achieved = miss(x, n, n_out, num_keep, r_in, r_out)
            assert achieved == pytest.approx(
                best_split_brute_force(n, num_tokens, num_keep, r_in, r_out), abs=1e-12
            )


def test_split_meets_both_ratios_when_k_matches():
    # 400 tokens, 160 inside: 95% inside + 85% outside masked = 8 + 36 = 44 visible.
    keep_inside = split_visible(torch.tensor([160]), 400, 44, 0.95, 0.85)
    assert keep_inside.tolist() == [8]


@pytest.mark.parametrize("strategy", ["random", "context", "rectangle"])
def test_every_sample_keeps_exactly_k(strategy):
    model = tiny_mae(strategy, ratio=0.7)
    L, K = model.num_patches, model.num_visible
    assert round(L * 0.3) == K
    images = torch.randn(6, 1, 64, 96)
    roi = torch.zeros(6, 1, 64, 96)
    roi[1] = 1  # all inside
    roi[2, :, :8, :8] = 1  # one token inside
    roi[3, :, 8:56, 16:80] = 1
    roi[4, :, :, :48] = 1
    roi[5, :, 40:, :] = 1  # roi[0] stays empty
    out = model(images, roi)
    assert out.mask_BL.shape == (6, L)
    assert out.mask_BL.sum(1).tolist() == [L - K] * 6
    assert set(out.mask_BL.unique().tolist()) == {0.0, 1.0}


def test_context_achieves_the_optimum_per_sample():
    model = tiny_mae("context", ratio=0.75, ratio_inside=0.95, ratio_outside=0.6)
    L, K = model.num_patches, model.num_visible
    roi = torch.zeros(3, 1, 64, 96)
    roi[0, :, 8:56, 16:80] = 1
    roi[1, :, :16, :] = 1
    roi[2, :, :, :] = 1
    noise = torch.rand(3, L, generator=torch.Generator().manual_seed(3))
    out = model(torch.randn(3, 1, 64, 96), roi, noise)
    inside = pool_region(roi, model.grid_size)
    for b in range(3):
        n_in = int(inside[b].sum())
        kept_inside = int(((1 - out.mask_BL[b]) * inside[b]).sum())
        achieved = miss(kept_inside, n_in, L - n_in, K, 0.95, 0.6)
        assert achieved == pytest.approx(best_split_brute_force(n_in, L, K, 0.95, 0.6), abs=1e-12)
    # The reported stats are the batch means of the per-sample achieved ratios.
    ratios_in = [1 - float(((1 - out.mask_BL[b]) * inside[b]).sum() / inside[b].sum()) for b in range(3)]
    assert out.stats["mask_ratio_inside"] == pytest.approx(sum(ratios_in) / 3, abs=1e-6)


def test_visible_tokens_are_the_smallest_noise_on_each_side():
    noise = torch.rand(4, 50, generator=torch.Generator().manual_seed(1))
    inside = torch.rand(4, 50, generator=torch.Generator().manual_seed(2)) < 0.4
    keep_inside = split_visible(inside.sum(1), 50, 12, 0.9, 0.7)
    ids_keep, mask = select_visible(noise, 12, inside, keep_inside)
    for b in range(4):
        ids_in = torch.nonzero(inside[b]).flatten()
        ids_out = torch.nonzero(~inside[b]).flatten()
        k_in = int(keep_inside[b])
        want = set(ids_in[noise[b, ids_in].argsort()[:k_in]].tolist())
        want |= set(ids_out[noise[b, ids_out].argsort()[: 12 - k_in]].tolist())
        assert set(ids_keep[b].tolist()) == want
        assert ids_keep[b].tolist() == sorted(want)  # ascending token order
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == want


def test_random_strategy_keeps_mae_set():
    noise = torch.rand(3, 96, generator=torch.Generator().manual_seed(5))
    ids_keep, mask = make_mask("random", noise, 24, None, 0.95, 0.85)
    for b in range(3):
        assert set(ids_keep[b].tolist()) == set(torch.argsort(noise[b])[:24].tolist())


def test_masks_come_from_each_samples_own_region():
    model = tiny_mae("context", ratio=0.75, ratio_inside=1.0, ratio_outside=0.0)
    roi = torch.zeros(2, 1, 64, 96)
    roi[0, :, :32, :] = 1  # top half
    roi[1, :, 32:, :] = 1  # bottom half
    out = model(torch.randn(2, 1, 64, 96), roi)
    rows = model.grid_size[0]
    visible_rows = (1 - out.mask_BL).view(2, rows, -1).sum(2)
    # Region fully masked (ratio_inside 1): sample 0 sees only the bottom half, sample 1 only the top.
    assert visible_rows[0, : rows // 2].sum() == 0 and visible_rows[0, rows // 2 :].sum() == model.num_visible
    assert visible_rows[1, rows // 2 :].sum() == 0 and visible_rows[1, : rows // 2].sum() == model.num_visible


def test_roi_pooled_from_any_resolution():
    grid = (8, 12)
    fine = torch.zeros(1, 1, 64, 96, dtype=torch.uint8)
    fine[0, 0, 8:40, 24:72] = 1  # rows 1-4, cols 3-8 of the grid exactly
    fine[0, 0, 56:60, 0:8] = 1  # half of one token: area 0.5 counts as inside
    fine[0, 0, 44:47, 88:96] = 1  # 3/8 of a token: outside
    want = torch.zeros(8, 12, dtype=torch.bool)
    want[1:5, 3:9] = True
    want[7, 0] = True
    assert torch.equal(pool_region(fine, grid).view(8, 12), want)
    # Same region as 0/255 uint8, as bool, as float, without a channel dim, and at a 4x coarser scale.
    assert torch.equal(pool_region(fine * 255, grid), pool_region(fine, grid))
    assert torch.equal(pool_region(fine.bool()[:, 0], grid), pool_region(fine, grid))
    coarse = torch.zeros(1, 1, 4, 6)
    coarse[0, 0, 1:3, 2:4] = 1.0
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[2:6, 4:8] = True
    assert torch.equal(pool_region(coarse, grid).view(8, 12), expected)
    with pytest.raises(ValueError, match="aspect ratio"):
        pool_region(torch.ones(1, 1, 64, 64), grid)


def test_rectangle_matches_the_seed_grid_and_scales():
    seed = rectangle_region((20, 20)).view(20, 20)
    want = torch.zeros(20, 20, dtype=torch.bool)
    want[6:16, 3:16] = True  # rows 6-15, columns 3-15 inclusive
    assert torch.equal(seed, want)
    fine = rectangle_region((80, 80)).view(80, 80)  # 1280 px at patch 16
    want_fine = torch.zeros(80, 80, dtype=torch.bool)
    want_fine[24:64, 12:64] = True
    assert torch.equal(fine, want_fine)


def test_rectangle_strategy_uses_the_rectangle():
    model = tiny_mae("rectangle", image_size=(160, 160), ratio=0.8, ratio_inside=1.0, ratio_outside=0.0)
    out = model(torch.randn(2, 1, 160, 160))  # 20x20 grid, no roi needed
    inside = rectangle_region((20, 20))
    assert float((1 - out.mask_BL)[:, inside].sum()) == 0.0  # the rectangle is fully masked
    assert out.stats["mask_ratio_inside"] == 1.0


def test_mask_deterministic_by_seed_and_noise():
    model = tiny_mae("context")
    images, roi = torch.randn(2, 1, 64, 96), torch.ones(2, 1, 16, 24)
    roi[:, :, :4] = 0
    torch.manual_seed(7)
    first = model(images, roi)
    torch.manual_seed(7)
    second = model(images, roi)
    assert torch.equal(first.mask_BL, second.mask_BL) and first.loss == second.loss
    third = model(images, roi)  # generator advanced
    assert not torch.equal(first.mask_BL, third.mask_BL)


def test_context_without_roi_is_a_clear_error():
    model = tiny_mae("context")
    with pytest.raises(ValueError, match="pass roi_B1HW"):
        model(torch.randn(1, 1, 64, 96))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "blocks"}, "strategy"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio_inside": 1.5}, "ratio_inside"),
    ],
)
def test_mask_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskConfig(**kwargs).validate()


def test_ratio_leaving_no_visible_token_fails_at_build():
    with pytest.raises(ValueError, match="visible"):
        tiny_mae("random", image_size=(16, 16), ratio=0.99)


def test_masking_is_vectorised_at_1280_scale():
    # 80x80 grid (1280 px, patch 16), batch 64: a few batched sorts, no per-sample Python loop.
    noise = torch.rand(64, 6400)
    inside = torch.rand(64, 6400) < 0.45
    make_mask("context", noise, 1600, inside, 0.95, 0.85)  # warm-up
    start = time.perf_counter()
    ids_keep, mask = make_mask("context", noise, 1600, inside, 0.95, 0.85)
    elapsed = time.perf_counter() - start
    assert ids_keep.shape == (64, 1600) and mask.sum(1).eq(4800).all()
    assert elapsed < 1.0, f"context masking took {elapsed:.2f} s for 64 x 6400 tokens"
