"""Collectives that tasks and the engine share (torch.distributed only, no DeepSpeed).

A one-process run without a process group gets the identity, so tasks call these unconditionally.
"""

from __future__ import annotations

import torch


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Average a few floats over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t.tolist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()
