"""The engine with each masking strategy, attention backend and precision this machine has.

One process, one rank (the same DeepSpeed code path as a launched job, without the ~20 s launch),
a few optimizer steps each on tiny shards written by the test.
"""

from __future__ import annotations

import json

import pytest
import torch
from data_fixtures import needs_dali, write_shard_folder

from xray_pretrain.config import load_config
from xray_pretrain.engine.trainer import train
from xray_pretrain.models import available_attention_backends

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_shards")
    write_shard_folder(root, splits={"train": 48, "val": 8}, size_hw=(64, 64), samples_per_shard=16)
    return root


def _train(shards, out_dir, overrides):
    cfg = load_config(
        "tiny_cpu",
        [
            "model.image_size=[64,64]",
            "model.patch_size=8",
            f"data.shards=[{shards}]",
            f"log.out_dir={out_dir}",
            "log.progress=false",
            "data.num_workers=0",
            "data.val_num_samples=8",
            "train.steps=3",
            "train.global_batch=16",
            "train.micro_batch=8",
            "checkpoint.every=3",
            "log.every=1",
            *overrides,
        ],
    )
    return train(cfg)


@pytest.mark.parametrize("strategy", ["random", "context", "rectangle"])
def test_each_masking_strategy_trains(shards, tmp_path, strategy):
    # ratio 0.9 on 64 tokens: K = 6 visible in every sample, close to what 0.95 inside / 0.85 outside ask.
    summary = _train(shards, tmp_path, [f"mask.strategy={strategy}", "mask.ratio=0.9"])
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["last_loss"]))
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/mask_ratio"] == pytest.approx(1 - 6 / 64)
    if strategy != "random":
        # The chest region is masked harder than the rest (achieved ratios are logged).
        assert first["train/mask_ratio_inside"] > 0.9 > first["train/mask_ratio_outside"]


@pytest.mark.parametrize("backend", [b for b in available_attention_backends((32,), "cpu") if b != "auto"])
def test_each_available_attention_backend_trains(shards, tmp_path, backend):
    summary = _train(shards, tmp_path, [f"model.attn={backend}"])
    assert torch.isfinite(torch.tensor(summary["last_loss"]))
    assert backend in (tmp_path / "run_info.json").read_text()


def test_bf16_trains(shards, tmp_path):
    summary = _train(shards, tmp_path, ["train.precision=bf16"])
    assert torch.isfinite(torch.tensor([summary["last_loss"], summary["val_loss"]])).all()


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="DeepSpeed runs fp16 (dynamic loss scaling) on GPUs only"
)
def test_fp16_with_dynamic_loss_scaling_trains(shards, tmp_path):
    summary = _train(shards, tmp_path, ["train.precision=fp16"])
    assert torch.isfinite(torch.tensor([summary["last_loss"], summary["val_loss"]])).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_on_cpu_is_a_clear_error(shards, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        _train(shards, tmp_path, ["train.precision=fp16"])


def test_unavailable_attention_backend_is_refused_before_training(shards, tmp_path):
    with pytest.raises(ValueError, match="attn=flash_attn needs"):
        _train(shards, tmp_path, ["model.attn=flash_attn"])


@needs_dali
def test_dali_and_wds_backends_train_on_the_same_batches(shards, tmp_path):
    """Same seed, same global order, same crops: the two backends give the same first losses."""
    runs = {}
    for backend in ("wds", "dali"):
        out = tmp_path / backend
        summary = _train(
            shards, out, [f"data.backend={backend}", "mask.strategy=context", "data.crop_scale=[0.5,1.0]"]
        )
        assert summary["backend"] == backend
        runs[backend] = [
            json.loads(line)["train/loss"]
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line
        ]
    # Decoders differ only at image borders (< 2 grey levels): the losses agree closely.
    assert runs["wds"] == pytest.approx(runs["dali"], rel=2e-3)


def test_extra_loss_weight_inside_the_chest_region_trains_and_validates(shards, tmp_path):
    summary = _train(shards, tmp_path, ["mask.strategy=context", "model.inside_loss_weight=2.0"])
    assert torch.isfinite(
        torch.tensor([summary["last_loss"], summary["val_loss"], summary["val_loss_baseline"]])
    ).all()


def test_compiled_model_trains_to_the_same_losses(shards, tmp_path):
    """train.compile=true (DeepSpeed's engine.compile, inductor): slow to compile on a CPU (~1 min), same numbers."""
    eager = _train(shards, tmp_path / "eager", ["train.steps=2"])
    compiled = _train(shards, tmp_path / "compiled", ["train.steps=2", "train.compile=true"])
    assert compiled["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-4)
    assert compiled["last_loss"] == pytest.approx(eager["last_loss"], rel=1e-3)
