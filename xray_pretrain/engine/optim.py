"""AdamW over a task's parameter groups, and a per-step warmup + cosine learning rate.

A task supplies its groups (`Task.param_groups`, built with `models.param_groups`); each may carry
an `lr_scale` (layer-wise decay) that `set_lr` multiplies into the schedule's value.
"""

from __future__ import annotations

import math

import torch

from xray_pretrain.engine.health import GuardedAdamW


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float]):
    """AdamW that skips non-finite steps (`health.GuardedAdamW`)."""
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
    return GuardedAdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Linear warmup to `peak_lr` over `warmup_steps`, then half-cosine down to `min_lr` at `total_steps`.

    `step` counts optimizer steps from 0; the value is what step `step` uses.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Each group trains at `lr` times its `lr_scale` (1 when the group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
