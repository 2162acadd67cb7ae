"""Model contract tests over every registered size (timm style), MAE-reference parity, timm export,
geometry, precision, checkpointing, compile, costs, and the `bench step` command."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from xray_pretrain.bench import step as bench_step
from xray_pretrain.models import (
    ENCODER_SIZES,
    MAEConfig,
    MaskConfig,
    MaskedAutoencoder,
    build_mae,
    count_params,
    device_peak_flops,
    estimate_step_flops,
    estimate_train_memory_bytes,
    measure_matmul_tflops,
    mfu,
    suggest_batch_size,
)
from xray_pretrain.models.pos_embed import sincos_2d

REPO = Path(__file__).resolve().parents[1]
# timm VisionTransformer(num_classes=0, in_chans=3, 224 px) parameter counts incl. pos_embed: the
# published ViT-B/16, ViT-L/16, ViT-H/14 encoders (MAE's 86M / 304M / 632M without rounding).
PUBLISHED_ENCODER_PARAMS = {"base": (16, 85_798_656), "large": (16, 303_301_632), "huge": (14, 630_764_800)}


# Tiny models: one CPU thread is faster and stable on a shared runner (see conftest.one_cpu_thread).
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_cfg(**overrides) -> MAEConfig:
    base = dict(
        size="tiny", image_size=[64, 64], patch_size=8, embed_dim=64, depth=2, num_heads=2,
        decoder_dim=64, decoder_depth=1, decoder_heads=2,
    )  # fmt: skip
    return MAEConfig(**{**base, **overrides})


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency images (learnable, unlike white noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 1, height // 16, width // 16, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)


def load_reference():
    spec = importlib.util.spec_from_file_location("mae_reference", REPO / "benchmarks" / "mae_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- contract over every registered size ------------------------------------------------------------
def test_registered_sizes():
    assert {k: tuple(v.values()) for k, v in ENCODER_SIZES.items()} == {
        "tiny": (192, 12, 3),
        "small": (384, 12, 6),
        "base": (768, 12, 12),
        "large": (1024, 24, 16),
        "huge": (1280, 32, 16),
    }


def test_tiny_preset_trains_for_real():
    """The registered tiny encoder (192/12/3) with a small decoder: loss falls, no NaN, every parameter
    gets a non-zero gradient."""
    torch.manual_seed(0)
    model = build_mae(tiny_cfg(embed_dim=None, depth=None, num_heads=None, image_size=[32, 48]), MaskConfig())
    images = smooth_images(4, 32, 48)
    noise = torch.rand(4, model.num_patches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        out = model(images, noise_BL=noise)
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            for name, param in model.named_parameters():
                assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("size", list(ENCODER_SIZES))
def test_every_size_builds_on_meta_with_timm_parameter_counts(size):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    patch = PUBLISHED_ENCODER_PARAMS.get(size, (16, None))[0]
    cfg = MAEConfig(size=size, image_size=224, patch_size=patch, in_chans=3)
    with torch.device("meta"):
        model = build_mae(cfg, MaskConfig())
        dims = ENCODER_SIZES[size]
        reference = timm_vit.VisionTransformer(
            img_size=224, patch_size=patch, in_chans=3, num_classes=0, **dims
        )
    encoder_params = sum(p.numel() for p in model.encoder.parameters()) + model.encoder.pos_embed.numel()
    assert encoder_params == sum(p.numel() for p in reference.parameters())
    if size in PUBLISHED_ENCODER_PARAMS:
        assert encoder_params == PUBLISHED_ENCODER_PARAMS[size][1]
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)["total"]
    assert model.encoder.pos_embed.shape == (1, 1 + (224 // patch) ** 2, dims["embed_dim"])


@pytest.mark.parametrize("in_chans, stem", [(1, "patch"), (3, "patch"), (1, "hierarchical")])
def test_mae_params_equal_the_reference_mae(in_chans, stem):
    """Whole MAE (ViT-B, MAE decoder 512/8/16) vs the MAE stand-in on the meta device."""
    reference = load_reference()
    cfg = MAEConfig(size="base", image_size=256, patch_size=16, in_chans=in_chans, stem=stem)
    with torch.device("meta"):
        ours = build_mae(cfg, MaskConfig())
        ref = reference.MaskedAutoencoderViTRef(
            img_size=256, patch_size=16, in_chans=in_chans, embed_dim=768, depth=12, num_heads=12
        )
    frozen = ref.pos_embed.numel() + ref.decoder_pos_embed.numel()
    ref_params = sum(p.numel() for p in ref.parameters()) - frozen
    ours_params = sum(p.numel() for p in ours.parameters())
    if stem == "patch":
        assert ours_params == ref_params
    else:  # a 4x4 conv on top of a 16/16 conv: the stem and the 64-px prediction head differ
        assert ours.num_patches == 16 and ours.decoder_pred.out_features == 64 * 64
        assert ours_params == count_params(cfg)["total"]


# ---- parity with MAE --------------------------------------------------------------------------------
def test_same_weights_same_mask_same_loss_as_mae_reference():
    reference = load_reference()
    torch.manual_seed(0)
    ref = reference.MaskedAutoencoderViTRef(
        img_size=64, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=2,
        decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2,
    )  # fmt: skip
    ours = build_mae(tiny_cfg(), MaskConfig())
    ours.load_state_dict(reference.to_ours_state_dict(ref.state_dict()), strict=True)
    assert torch.equal(ours.encoder.pos_embed, ref.pos_embed.data)  # MAE's sin-cos convention
    assert torch.equal(ours.decoder_pos_embed, ref.decoder_pos_embed.data)
    images, noise = smooth_images(3, 64, 64), torch.rand(3, 64)
    out = ours(images, noise_BL=noise)
    ref_loss, ref_pred, ref_mask = ref(images, noise)
    assert torch.equal(out.mask_BL, ref_mask)
    torch.testing.assert_close(out.pred_BLP, ref_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-6)


# ---- timm export --------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [[64, 64], [64, 96]])
def test_timm_state_dict_loads_strict_and_gives_same_features(image_size):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    encoder = build_mae(tiny_cfg(image_size=image_size), MaskConfig()).encoder.eval()
    vit = timm_vit.VisionTransformer(**encoder.timm_kwargs()).eval()
    vit.load_state_dict(encoder.timm_state_dict(), strict=True)
    images = smooth_images(2, *image_size)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), vit.forward_features(images), atol=1e-5, rtol=1e-5)
    # And back: a fresh encoder loads the export (the pos_embed is checked, not loaded).
    fresh = build_mae(tiny_cfg(image_size=image_size), MaskConfig()).encoder.eval()
    fresh.load_timm_state_dict(vit.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), encoder(images), atol=0, rtol=0)
    learned = dict(vit.state_dict(), pos_embed=torch.randn_like(vit.pos_embed))
    with pytest.raises(ValueError, match="sin-cos"):
        fresh.load_timm_state_dict(learned)


def test_hierarchical_stem_has_no_timm_export():
    model = build_mae(tiny_cfg(image_size=[128, 192], stem="hierarchical", patch_size=16), MaskConfig())
    assert model.grid_size == (2, 3) and model.encoder.timm_kwargs() is None
    with pytest.raises(ValueError, match="hierarchical"):
        model.encoder.timm_state_dict()
    out = model(smooth_images(2, 128, 192))
    assert out.pred_BLP.shape == (2, 6, 64 * 64)
    out.loss.backward()


# ---- geometry -----------------------------------------------------------------------------------------
def test_non_square_images_and_size_change_rederive_pos_embeds():
    model = build_mae(tiny_cfg(image_size=[64, 96]), MaskConfig())
    assert model.grid_size == (8, 12) and model.num_patches == 96
    images = smooth_images(2, 64, 96)
    out = model(images)
    assert out.pred_BLP.shape == (2, 96, 64) and out.mask_BL.sum(1).tolist() == [72, 72]
    assert torch.equal(model.unpatchify(model.patchify(images)), images)

    model.set_image_size((96, 64))
    assert model.grid_size == (12, 8)
    assert torch.equal(model.encoder.pos_embed[0], sincos_2d(64, (12, 8)))
    assert torch.equal(model.decoder_pos_embed[0], sincos_2d(64, (12, 8)))
    assert not torch.equal(sincos_2d(64, (12, 8)), sincos_2d(64, (8, 12)))
    assert model(smooth_images(2, 96, 64)).pred_BLP.shape == (2, 96, 64)
    with pytest.raises(ValueError, match="set_image_size"):
        model(images)


def test_noise_fixes_the_mask_and_the_loss():
    model = build_mae(tiny_cfg(), MaskConfig())
    images = smooth_images(2, 64, 64)
    noise = torch.rand(2, 64)
    first, second = model(images, noise_BL=noise), model(images, noise_BL=noise)
    assert torch.equal(first.mask_BL, second.mask_BL) and first.loss.item() == second.loss.item()
    other = model(images, noise_BL=torch.rand(2, 64))
    assert not torch.equal(first.mask_BL, other.mask_BL)
    with pytest.raises(ValueError, match="noise"):
        model(images, noise_BL=torch.rand(2, 63))


def test_loss_fn_scores_any_predictor_like_forward():
    model = build_mae(tiny_cfg(inside_loss_weight=3.0), MaskConfig(strategy="context"))
    images = smooth_images(2, 64, 64)
    roi = torch.zeros(2, 1, 64, 64)
    roi[:, :, 16:48, 8:56] = 1
    out = model(images, roi)
    inside = model.region(roi, 2, images.device)
    assert torch.allclose(model.loss_fn(out.pred_BLP, images, out.mask_BL, inside), out.loss)
    # By hand: weighted mean of per-patch MSE over masked patches, inside ones weighted 3.
    err = (out.pred_BLP - model.target(images)).pow(2).mean(-1)
    weight = out.mask_BL * (1 + 2 * inside.float())
    assert torch.allclose(out.loss, (err * weight).sum() / weight.sum())
    with pytest.raises(ValueError, match="inside_loss_weight"):
        model.loss_fn(out.pred_BLP, images, out.mask_BL)


def test_norm_pix_target_matches_mae_definition():
    model = build_mae(tiny_cfg(), MaskConfig())
    images = smooth_images(1, 64, 64)
    target = model.target(images)
    patch = images[0, 0, 8:16, 16:24].reshape(-1)  # token 1 * 8 + 2
    expected = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
    torch.testing.assert_close(target[0, 10], expected)


# ---- precision, checkpointing, compile ------------------------------------------------------------------
@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_same_loss_and_grads(every):
    torch.manual_seed(0)
    model = build_mae(tiny_cfg(depth=3, decoder_depth=2), MaskConfig())
    images, noise = smooth_images(2, 64, 64), torch.rand(2, 64)

    def loss_and_grads(m):
        m.zero_grad()
        loss = m(images, noise_BL=noise).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    plain_loss, plain_grads = loss_and_grads(model)
    model.set_grad_checkpointing(True, every)
    ckpt_loss, ckpt_grads = loss_and_grads(model)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_and_stays_close_to_fp32(dtype):
    model = build_mae(tiny_cfg(), MaskConfig())
    images, noise = smooth_images(2, 64, 64), torch.rand(2, 64)
    reference = model(images, noise_BL=noise).loss
    with torch.autocast("cpu", dtype=dtype):
        out = model(images, noise_BL=noise)
    assert out.pred_BLP.dtype == dtype and out.loss.dtype == torch.float32
    out.loss.backward()
    assert abs(out.loss.item() - reference.item()) < 0.05 * reference.item()


def test_model_cast_to_bf16_runs_end_to_end():
    # DeepSpeed's bf16 mode casts every parameter and buffer; fp32 images must still work.
    model = copy.deepcopy(build_mae(tiny_cfg(), MaskConfig())).to(torch.bfloat16)
    out = model(smooth_images(2, 64, 64))
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and model.encoder.pos_embed.dtype == torch.bfloat16


def test_compiles_without_graph_breaks():
    model = build_mae(tiny_cfg(image_size=[32, 48], depth=1), MaskConfig(strategy="context"))
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: any break raises
    roi = torch.zeros(2, 1, 32, 48)
    roi[:, :, 8:24] = 1
    noise = torch.rand(2, model.num_patches)
    out = compiled(smooth_images(2, 32, 48), roi, noise)
    torch.testing.assert_close(out.loss, model(smooth_images(2, 32, 48), roi, noise).loss)


# ---- config validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": [64, 60]}, "not a multiple of the token patch 8"),
        ({"size": "giant"}, "model.size"),
        ({"stem": "convnext"}, "model.stem"),
        ({"num_heads": 3}, "must divide model.embed_dim"),
        ({"decoder_heads": 5}, "must divide model.decoder_dim"),
        ({"embed_dim": 66, "num_heads": 2}, "divisible by 4"),
        ({"grad_ckpt_every": 2}, "no effect without model.grad_ckpt"),
        ({"inside_loss_weight": 0.0}, "inside_loss_weight"),
        ({"stem": "hierarchical", "image_size": [64, 80]}, "token patch 32"),
    ],
)
def test_config_errors_name_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_mae(tiny_cfg(**overrides), MaskConfig())


def test_inside_weight_without_region_is_refused():
    model = build_mae(tiny_cfg(inside_loss_weight=2.0), MaskConfig())
    with pytest.raises(ValueError, match="needs the chest region"):
        model(smooth_images(1, 64, 64))


def test_int_image_size_means_square():
    assert MAEConfig(image_size=1280).image_hw() == (1280, 1280)
    assert isinstance(build_mae(tiny_cfg(image_size=64), MaskConfig()), MaskedAutoencoder)


# ---- costs ----------------------------------------------------------------------------------------------
def test_step_flops_formula_and_design_number():
    cfg = MAEConfig(size="large", image_size=1280, patch_size=16)
    flops = estimate_step_flops(cfg, MaskConfig(ratio=0.75), batch_size=4)
    assert flops["total"] == pytest.approx(3 * flops["forward"])
    assert flops["encoder"] + flops["decoder"] == pytest.approx(flops["total"])
    assert flops["per_image"] == pytest.approx(flops["total"] / 4)
    # By hand: 24 blocks over 1601 tokens at 1024 + 8 blocks over 6401 at 512 (24 N D^2 + 4 N^2 D each),
    # the patch stem on 1600 patches, decoder embed and prediction.
    enc = 24 * (24 * 1601 * 1024**2 + 4 * 1601**2 * 1024) + 2 * 1600 * 256 * 1024
    dec = 8 * (24 * 6401 * 512**2 + 4 * 6401**2 * 512) + 2 * 1601 * 1024 * 512 + 2 * 6400 * 512 * 256
    assert flops["forward"] / 4 == pytest.approx(enc + dec, rel=1e-12)
    assert 2.15e12 < (enc + dec) < 2.25e12  # DESIGN.md: about 2.2 TFLOP forward per image
    attention = 24 * 4 * 1601**2 * 1024 + 8 * 4 * 6401**2 * 512
    assert flops["attention"] == pytest.approx(3 * 4 * attention)


def test_memory_model_orders_and_batch_suggestion_is_tight():
    cfg = MAEConfig(size="large", image_size=1280, patch_size=16)
    ckpt = MAEConfig(size="large", image_size=1280, patch_size=16, grad_ckpt=True)
    mask = MaskConfig()
    plain, with_ckpt = (estimate_train_memory_bytes(c, mask, 8)["activations"] for c in (cfg, ckpt))
    assert with_ckpt < 0.25 * plain
    assert estimate_train_memory_bytes(cfg, mask, 8, "fp32")["activations"] > plain
    math_attn = MAEConfig(size="large", image_size=1280, patch_size=16, attn="math")
    assert estimate_train_memory_bytes(math_attn, mask, 8)["activations"] > 5 * plain
    budget = 139 * 2**30
    batch = suggest_batch_size(cfg, mask, budget)
    assert batch >= 1
    assert estimate_train_memory_bytes(cfg, mask, batch)["total"] <= 0.8 * budget
    assert estimate_train_memory_bytes(cfg, mask, batch + 1)["total"] > 0.8 * budget
    assert suggest_batch_size(cfg, mask, budget, max_batch_size=4) == 4
    assert suggest_batch_size(cfg, mask, 1e9) == 0


def test_mfu_and_peaks(monkeypatch):
    assert mfu(989e12, 1.0, 989e12) == pytest.approx(1.0)
    assert mfu(3e12, 2.0, 1e12) == pytest.approx(1.5)
    assert math.isnan(mfu(1e12, 1.0, float("nan")))
    with pytest.raises(ValueError):
        mfu(1e12, 0.0, 1e12)
    monkeypatch.delenv("XRAY_PEAK_FLOPS", raising=False)
    assert math.isnan(device_peak_flops("cpu", "bf16"))
    assert device_peak_flops("cpu", "bf16", fallback=2e12) == 2e12
    monkeypatch.setenv("XRAY_PEAK_FLOPS", "5e11")
    assert device_peak_flops("cpu", "fp32") == 5e11


def test_measured_matmul_ceiling_is_positive():
    assert 0 < measure_matmul_tflops("cpu", torch.float32, size=256, iters=2) < 100


# ---- bench step -----------------------------------------------------------------------------------------
def test_bench_step_prints_one_json_line(capsys):
    parser = argparse.ArgumentParser()
    bench_step.add_arguments(parser)
    options = {
        "--model": "tiny", "--image-size": "32x48", "--patch": "8", "--batch-size": "2", "--steps": "2",
        "--warmup": "1", "--precision": "fp32", "--device": "cpu", "--embed-dim": "32", "--depth": "1",
        "--num-heads": "2", "--decoder-dim": "32", "--decoder-depth": "1", "--decoder-heads": "2",
        "--mask": "context", "--peak-tflops": "1",
    }  # fmt: skip
    args = parser.parse_args([part for option in options.items() for part in option] + ["--grad-ckpt"])
    assert bench_step.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("s_per_step", "images_per_s", "tflops", "mfu", "peak_mem_mib", "batch_size", "attn_backend"):
        assert key in result
    assert result["s_per_step"] > 0 and result["images_per_s"] == pytest.approx(
        2 / result["s_per_step"], rel=1e-2
    )
    flops = estimate_step_flops(*bench_step.configs_from_args(args), batch_size=2)["total"]
    assert result["tflops"] == pytest.approx(flops / result["s_per_step"] / 1e12, rel=1e-2)
    assert result["mfu"] == pytest.approx(result["tflops"], rel=1e-2)  # peak 1 TFLOP/s
    # CPU peak memory is RSS growth: in a test process that already holds freed heap pages it can be 0.
    assert result["peak_mem_mib"] >= 0 and result["peak_mem_source"] == "rss_hwm_delta"
    assert result["grad_ckpt"] is True and result["image_size"] == [32, 48] and result["mask"] == "context"


def test_bench_step_rejects_bad_arguments():
    parser = argparse.ArgumentParser()
    bench_step.add_arguments(parser)
    with pytest.raises(ValueError, match="image-size"):
        bench_step.run(parser.parse_args(["--image-size", "12x34x56", "--device", "cpu"]))
    with pytest.raises(ValueError, match="not a multiple"):
        bench_step.run(parser.parse_args(["--image-size", "1000", "--device", "cpu"]))
