"""The DeepSpeed JSON, generated from the run config so the two can never disagree.

`xray_pretrain/configs/deepspeed/zero{1,2,3}.json` (packaged, read through importlib.resources) hold what is specific to DeepSpeed (ZeRO buckets, overlap, stage-3
prefetching). Batch sizes, accumulation, clipping and precision belong to the run config alone: a
JSON that sets them is refused, so a change to the run config can never be silently overridden.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

from xray_pretrain.config import RunConfig

# Keys the run config owns; a ds_config that sets any of them is an error.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


def default_ds_config_text(zero_stage: int) -> str:
    """The packaged ZeRO settings for this stage."""
    folder = importlib.resources.files("xray_pretrain") / "configs" / "deepspeed"
    return (folder / f"zero{zero_stage}.json").read_text()


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """The complete DeepSpeed config for this run at this world size."""
    train = cfg.train
    if train.zero_stage == 0:
        base = {"zero_optimization": {"stage": 0}}
    else:
        if train.ds_config is None:
            base = json.loads(default_ds_config_text(train.zero_stage))
        elif Path(train.ds_config).is_file():
            base = json.loads(Path(train.ds_config).read_text())
        else:
            raise ValueError(f"train.ds_config={train.ds_config} does not exist")
    clashing = [k for k in OWNED_KEYS if k in base]
    if clashing:
        raise ValueError(
            f"{train.ds_config or 'ds config'} sets {clashing}: these come from the run config "
            "(train.global_batch, train.micro_batch, optim.clip_grad, train.precision); remove them from the JSON"
        )
    stage_in_json = base.get("zero_optimization", {}).get("stage", train.zero_stage)
    if stage_in_json != train.zero_stage:
        raise ValueError(
            f"train.zero_stage={train.zero_stage} but {train.ds_config} has stage {stage_in_json}"
        )
    config = {k: v for k, v in base.items() if not k.startswith("_")}
    config.update(
        train_batch_size=train.global_batch,
        train_micro_batch_size_per_gpu=train.micro_batch,
        gradient_accumulation_steps=train.accum_steps(world_size),
        gradient_clipping=cfg.optim.clip_grad,
        bf16={"enabled": train.precision == "bf16"},
        fp16={
            "enabled": train.precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
    )
    config.setdefault("zero_allow_untested_optimizer", True)
    return config
