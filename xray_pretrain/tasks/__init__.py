"""Tasks: a model built from config, a batch turned into (loss, logs), a loader evaluated into metrics.

The engine (`xray_pretrain.engine`) knows nothing task-specific; it only uses the `Task` protocol
below. Order of calls: `restore_inference_state` (a resumed run only: its checkpoint's inference.json),
`select_train_samples` (while the train loader is built), `bind_data` (label names known),
`build_model`, `param_groups`, then the loop (`begin_step`, `training_loss`, `evaluate`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DataInfo:
    """What the loaders know that a task needs before it builds its model, and what inference needs
    later without the shards (saved with each checkpoint)."""

    label_names: list[str]  # the loaders' label order (union over the folders)
    image_size: tuple[int, int]
    intensity: list[dict]  # per training folder: folder, mean, std, image_format
    conversion: dict  # the first training folder's `xray-shard convert` options (long_side, intensity ...)


class Task(Protocol):
    # (metric, "max" | "min") that picks checkpoints/best on validation; None: no selection and no
    # final test evaluation (pre-training).
    selection: tuple[str, str] | None
    preview_name: str | None  # image grid tag (val/NAME) that preview_image makes; None: no grid
    val_whole_split: bool  # validate on the whole val split (downstream metrics) or data.val_num_samples
    init_new_prefixes: tuple[str, ...]  # model keys `init.weights` may lack (created by the task)
    init_unused_prefixes: tuple[str, ...]  # source keys `init.weights` may leave unused

    def restore_inference_state(self, info: dict) -> None: ...

    def select_train_samples(self, table): ...

    def bind_data(self, info: DataInfo) -> None: ...

    def build_model(self) -> nn.Module: ...

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]: ...

    def begin_step(self, step: int, total_steps: int) -> None:
        """Before each optimizer step's micro-batches (a task whose loss changes over training)."""

    def training_loss(
        self, model, batch: dict, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, dict]: ...

    def evaluate(
        self, model, loader, device: torch.device, dtype: torch.dtype, fitted: dict | None = None
    ) -> dict[str, float | None]: ...

    def fitted_state(self) -> dict: ...

    def inference_state(self, fitted: dict) -> dict: ...

    def preview_image(self, model, loader, device: torch.device, dtype: torch.dtype) -> np.ndarray | None: ...

    def flops_per_sample(self) -> float | None: ...


def build_task(cfg) -> Task:
    if cfg.task == "pretrain":
        from xray_pretrain.tasks.pretrain import PretrainTask

        return PretrainTask(cfg)
    if cfg.task == "classify":
        from xray_pretrain.tasks.classify import ClassifyTask

        return ClassifyTask(cfg)
    if cfg.task == "report":
        from xray_pretrain.tasks.report import ReportTask

        return ReportTask(cfg)
    raise ValueError(f"unknown task {cfg.task!r}")
