"""Tasks: a model built from config, a batch turned into (loss, logs), a loader evaluated into metrics.

The engine (`xray_pretrain.engine`) knows nothing task-specific; it only calls the methods of the
`Task` protocol below.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn


class Task(Protocol):
    def build_model(self) -> nn.Module: ...

    def training_loss(
        self, model, batch: dict, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, dict]: ...

    def evaluate(self, model, loader, device: torch.device, dtype: torch.dtype) -> dict[str, float]: ...

    def preview_image(self, model, loader, device: torch.device, dtype: torch.dtype) -> np.ndarray | None: ...

    def flops_per_sample(self) -> float | None: ...


def build_task(cfg) -> Task:
    if cfg.task == "pretrain":
        from xray_pretrain.tasks.pretrain import PretrainTask

        return PretrainTask(cfg)
    raise ValueError(f"unknown task {cfg.task!r}")
