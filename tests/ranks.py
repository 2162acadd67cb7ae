"""Run a function on N CPU ranks (forked processes in one gloo process group) and collect results."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from xray_pretrain.engine.dist import free_port


def run_ranks(
    target: Callable[[int], object], num_ranks: int = 2, start_method: str = "fork"
) -> dict[int, object]:
    """``target(rank)`` on every rank -> {rank: its (picklable) result}.

    ``fork`` (default): the ranks inherit the imported modules and ``target`` may be a closure.
    ``spawn``: clean processes (``target`` a module-level function) for DeepSpeed, whose global state
    an earlier in-process DeepSpeed run in pytest's process would otherwise hand down stale.
    One thread per rank: the runner has 2 cores.
    """
    if torch.distributed.is_initialized():
        # A one-rank group an earlier in-process test left in pytest's process: tear it down here,
        # where its store threads live; a forked copy of it cannot be torn down (it hangs).
        torch.distributed.destroy_process_group()
        # DeepSpeed keeps a clone of the world group it saw (deepspeed.utils.groups._WORLD_GROUP) and
        # would hand the destroyed one to the next in-process run ("Group ... is not registered").
        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None:
            groups._WORLD_GROUP = None
    results = mp.Manager().dict()
    port = free_port()
    mp.start_processes(
        _rank_main,
        args=(target, port, num_ranks, results),
        nprocs=num_ranks,
        join=True,
        start_method=start_method,
    )
    return dict(results)


def _rank_main(rank: int, target, port: int, num_ranks: int, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(num_ranks),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=num_ranks)
    try:
        results[rank] = target(rank)
    finally:
        torch.distributed.destroy_process_group()
