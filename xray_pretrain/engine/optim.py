"""AdamW with MAE's parameter groups and a per-step warmup + cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters whose name ends with one of these never get weight decay (besides every 1-D tensor:
# norms and biases).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weight matrices, and undecayed norms/biases/positional/cls/mask tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]):
    fused = torch.cuda.is_available() and all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None)


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
    for group in optimizer.param_groups:
        group["lr"] = lr
