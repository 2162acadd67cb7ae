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


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on every rank (one MIN all-reduce). Report generation
    calls it after each decoder step so that all ranks run the same number of steps (ZeRO-3 gathers
    parameters at every step: a rank that stopped early would leave the others waiting)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())
