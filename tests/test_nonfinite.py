"""Non-finite loss or gradients (issue 11, item 4): the step is skipped on every rank with the weights
unchanged; `train.max_bad_steps` in a row stop the run non-zero with `latest` kept and the batch's keys
named; the summary stays valid JSON; the config refuses NaN and inf."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, copy_checkpoint, run_training

from xray_pretrain.config import load_config
from xray_pretrain.engine.health import GuardedAdamW, json_safe, non_finite_fields

# Both runs continue the session's 2-rank ZeRO-2 reference run (tests/conftest.py) from its step 8.
RESUME = [
    "train.zero_stage=2",
    "checkpoint.resume=auto",
    "log.every=1",
    "log.val_every=100",
    "log.image_every=100",
]


def _no_nan(name: str):
    raise ValueError(f"{name} in JSON")


def read_summary(run: Path) -> dict:
    return json.loads((run / "train_summary.json").read_text(), parse_constant=_no_nan)


def test_guarded_adamw_leaves_weights_and_moments_alone_on_a_non_finite_step():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = GuardedAdamW([weight], lr=0.1, weight_decay=0.05)
    weight.grad = torch.ones(4, 3)
    optimizer.step()  # a good step: moments exist from here on
    before = weight.detach().clone()
    moments = {k: v.clone() for k, v in optimizer.state[weight].items()}
    weight.grad = torch.ones(4, 3)
    weight.grad[1, 2] = float("nan")
    optimizer.step()
    assert optimizer.skipped and torch.equal(weight.detach(), before)
    assert all(torch.equal(optimizer.state[weight][k], v) for k, v in moments.items())
    optimizer.skipped = False
    optimizer.loss_bad_t = torch.tensor(True)  # finite gradients, but some micro-batch's loss was not
    weight.grad = torch.ones(4, 3)
    optimizer.step()
    assert optimizer.skipped and torch.equal(weight.detach(), before)
    optimizer.skipped, optimizer.loss_bad_t = False, None
    optimizer.step()
    assert not optimizer.skipped and not torch.equal(weight.detach(), before)


def test_summary_json_has_null_for_non_finite_and_names_them():
    summary = {
        "last_loss": float("nan"),
        "val_loss": float("inf"),
        "steps": 3,
        "test": {"auroc": float("-inf")},
    }
    safe = json_safe(summary)
    assert json.loads(json.dumps(safe, allow_nan=False)) == {
        "last_loss": None, "val_loss": None, "steps": 3, "test": {"auroc": None},
    }  # fmt: skip
    assert non_finite_fields(summary) == ["last_loss", "val_loss", "test.auroc"]


@pytest.mark.parametrize(
    "override",
    ["optim.base_lr=.nan", "optim.base_lr=.inf", "train.epochs=.inf", "log.peak_flops=.nan",
     "data.weights=[.nan]", "model.drop_path=-.inf", "optim.min_lr=nan"],
)  # fmt: skip
def test_check_config_refuses_non_finite_numbers(override):
    with pytest.raises(ValueError, match="must be finite"):
        load_config(TINY_CONFIG, ["data.shards=[/x]", override])


def poisoned_copy(phantom_shards: Path, out: Path) -> Path:
    """The phantom shards with an intensity std that float32 rounds to 0: every normalized image is
    inf or NaN, so every loss is, from the first forward on."""
    shutil.copytree(phantom_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["intensity"]["std"] = 1e-300
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.slow
def test_nan_steps_on_two_ranks_are_skipped_with_the_weights_unchanged(zero2_run, phantom_shards, tmp_path):
    from xray_pretrain.engine.export import consolidated_state_dict

    reference, _ = zero2_run
    run = tmp_path / "nan"
    copy_checkpoint(reference, "step00000008", run)
    shards = poisoned_copy(phantom_shards, tmp_path / "poisoned")
    run_training(run, shards, 2, [*RESUME, "train.steps=11", "checkpoint.every=100", "train.max_bad_steps=5"])
    summary = read_summary(run)
    assert summary["num_bad_steps"] == 3 and summary["stopped"] is None and summary["steps"] == 11
    assert summary["last_loss"] is None and "last_loss" in summary["non_finite"]
    log = (run / "train.log").read_text()
    for step in (9, 10, 11):  # each rank printed it: both agreed
        assert log.count(f"step {step}: non-finite loss or gradients, step skipped") == 2, log[-3000:]
    before = consolidated_state_dict(reference / "checkpoints", "step00000008")
    after = consolidated_state_dict(run / "checkpoints", "step00000011")
    for name in before:
        assert torch.equal(after[name], before[name]), name


@pytest.mark.slow
def test_divergence_stops_non_zero_keeps_latest_and_names_the_keys(zero2_run, phantom_shards, tmp_path):
    """The found-when-tried case: optim.base_lr=1e6 (DeepSpeed alone skipped and saved, exit 0)."""
    reference, _ = zero2_run
    run = tmp_path / "diverge"
    copy_checkpoint(reference, "step00000008", run)
    overrides = [
        *RESUME,
        "optim.base_lr=1e6",
        "train.steps=16",
        "checkpoint.every=2",
        "train.max_bad_steps=3",
    ]
    with pytest.raises(RuntimeError, match="training failed"):
        run_training(run, phantom_shards, 2, overrides)
    summary = read_summary(run)
    assert summary["num_bad_steps"] >= 3 and "steps in a row" in summary["stopped"]
    log = (run / "train.log").read_text()
    stop_line = next(line for line in log.splitlines() if line.startswith("training stopped at step"))
    keys = re.search(r"sample keys: ([0-9a-f, ]+)\.", stop_line).group(1).split(", ")
    assert len(keys) == 32 and all(re.fullmatch(r"[0-9a-f]{16}", k) for k in keys)  # the global batch
    assert "Last good checkpoint: step00000008 (kept)" in stop_line
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000008"
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000008"]
