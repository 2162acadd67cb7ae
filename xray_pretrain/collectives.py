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


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (`[obj]` without a process group)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_samples(columns: dict[str, list], weights: list[float], order_by: str) -> dict[str, list]:
    """Per-sample rows from every rank, padded rows dropped, in one order whatever the world size.

    `columns`: name -> one value per row of this rank (e.g. "key", "position", "probabilities");
    `weights`: 1.0 for a real row, 0.0 for a padding row (validation pads ranks to equal batch counts).
    Rows of all ranks are concatenated, the weight-0 ones removed, and sorted by `columns[order_by]`
    (e.g. the sample's position in the sorted split), so metrics over the result (an AUROC over the
    whole split, not a mean of per-rank AUROCs) do not depend on how many ranks computed them.
    """
    lengths = {name: len(values) for name, values in columns.items()}
    assert set(lengths.values()) <= {len(weights)}, f"columns of unequal length: {lengths}, {len(weights)}"
    kept = [i for i, w in enumerate(weights) if w != 0]
    local = {name: [values[i] for i in kept] for name, values in columns.items()}
    merged: dict[str, list] = {name: [] for name in columns}
    for part in all_gather_objects(local):
        for name in merged:
            merged[name].extend(part[name])
    order = sorted(range(len(merged[order_by])), key=merged[order_by].__getitem__)
    return {name: [values[i] for i in order] for name, values in merged.items()}


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on every rank (one MIN all-reduce). Report generation
    calls it after each decoder step so that all ranks run the same number of steps (ZeRO-3 gathers
    parameters at every step: a rank that stopped early would leave the others waiting)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())
