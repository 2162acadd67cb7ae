"""End-to-end training under the deepspeed launcher on CPU ranks (gloo): ZeRO-2 and ZeRO-3, resume,
export. Each launch costs ~20 s, so runs are session fixtures shared by the assertions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ZERO2_STEPS, copy_checkpoint, run_training

from xray_pretrain.engine.export import (
    consolidated_state_dict,
    export_encoder,
    load_exported_encoder,
    load_mae_from_checkpoint,
)

pytestmark = pytest.mark.slow


def test_zero2_two_ranks_trains_and_leaves_a_complete_run_folder(zero2_run):
    out, summary = zero2_run
    assert summary["world_size"] == 2 and summary["steps"] == 16
    assert summary["last_loss"] < summary["first_loss"]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000016"
    assert (ckpts / "step00000008" / "complete.json").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert summary["reconstruction_image"] and (out / "images").is_dir()
    info = json.loads((out / "run_info.json").read_text())
    assert len(info["git"]["commit"]) == 40 or info["git"]["commit"] == "unknown"
    assert info["ds_config"]["zero_optimization"]["stage"] == 2
    assert "train:" in (out / "config.yaml").read_text()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in row and "val/loss_baseline" in row for row in logged)
    assert {"train/grad_norm", "train/lr", "perf/images_per_s", "perf/data_wait_s"} <= set(logged[0])


def test_zero3_two_ranks_trains_and_exports(zero3_run, tmp_path):
    out, summary = zero3_run
    assert summary["last_loss"] < summary["first_loss"]
    summary = export_encoder(out / "checkpoints", tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").stat().st_size > 0
    assert summary["checkpoint_tag"] == "step00000016" and summary["format"] == "timm"


def test_resume_gives_the_same_parameters_as_a_straight_run(zero2_run, tmp_path, phantom_shards):
    straight, _ = zero2_run
    copy_checkpoint(straight, "step00000008", tmp_path)
    resumed = run_training(
        tmp_path, phantom_shards, 2, ["train.zero_stage=2", *ZERO2_STEPS, "checkpoint.resume=auto"]
    )
    assert resumed["steps"] == 16
    a = consolidated_state_dict(straight / "checkpoints", "step00000016")
    b = consolidated_state_dict(tmp_path / "checkpoints", "step00000016")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"parameter {name} differs after resume"
        )
    # And training really moved the parameters between steps 8 and 16.
    c = consolidated_state_dict(straight / "checkpoints", "step00000008")
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_export_of_a_run_loads_in_timm_with_the_run_encoders_features(zero2_run, tmp_path, phantom_shards):
    import timm

    out, train_summary = zero2_run
    summary = export_encoder(out / "checkpoints", tmp_path)
    model, _, _ = load_mae_from_checkpoint(out / "checkpoints")
    encoder = model.encoder.eval()
    vit = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    images = torch.rand(2, 1, *encoder.image_size)
    reloaded, config = load_exported_encoder(tmp_path)
    with torch.no_grad():
        ours = encoder(images)
        assert float((vit.forward_features(images) - ours).abs().max()) <= 1e-5
        assert torch.equal(reloaded.eval()(images), ours)
    assert summary["num_params"] == sum(p.numel() for p in vit.parameters())
    assert config["xray_pretrain"]["checkpoint_tag"] == "step00000016"
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    assert list(vit.pretrained_cfg["mean"]) == [manifest["intensity"]["mean"]]
    card = (tmp_path / "README.md").read_text()
    assert f"| val_loss | {train_summary['val_loss']:.6g} |" in card and "- model: size=tiny" in card


def test_resume_on_fewer_ranks_continues_the_same_run(zero2_run, tmp_path, phantom_shards):
    """A node is lost: the 2-rank checkpoint resumes on 1 rank (universal form, accumulation 2 keeps
    the global batch), reads the same samples per step, and ends where the 2-rank run ended."""
    straight, _ = zero2_run
    copy_checkpoint(straight, "step00000008", tmp_path)
    resumed = run_training(
        tmp_path, phantom_shards, 1, ["train.zero_stage=2", *ZERO2_STEPS, "checkpoint.resume=auto"]
    )
    assert resumed["world_size"] == 1 and resumed["accum_steps"] == 2 and resumed["steps"] == 16
    assert (tmp_path / "checkpoints" / "universal" / "step00000008" / "complete.json").is_file()
    a = consolidated_state_dict(straight / "checkpoints", "step00000016")
    b = consolidated_state_dict(tmp_path / "checkpoints", "step00000016")
    c = consolidated_state_dict(straight / "checkpoints", "step00000008")
    for name in a:
        # Same math, different summation order (2 ranks vs 2 accumulated micro-batches).
        torch.testing.assert_close(
            b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{name} drifted after resuming on 1 rank"
        )
    moved = sum(float((a[n] - c[n]).abs().max()) for n in a)
    assert moved > 1e-3  # the 8 resumed steps really trained
