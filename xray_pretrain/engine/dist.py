"""Process-group setup shared by one plain process, the `deepspeed` launcher (one or many nodes) and
`srun` (one process per GPU, ranks from Slurm's variables).

Every launcher resolves to the same variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
before torch.distributed starts. A launcher that set RANK wins; otherwise an srun task maps Slurm's
variables; a lone process makes itself a one-rank group. Several tasks that cannot tell their rank
refuse to start: each would otherwise train its own copy into the same run folder.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    env_added: tuple[str, ...] = ()  # launcher variables init_distributed set (release_distributed unsets)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# What a launcher (or a one-process run, in its own environment) sets for torch.distributed. A child
# process that must find its own rank (a new launcher, an srun task) starts without them.
LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE",
)  # fmt: skip


SHM_DIR = Path("/dev/shm")


def without_launcher_variables(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less the rank variables of the process it came from."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARIABLES}


def free_port() -> int:
    """A TCP port free on this host now (the one-process group's rendezvous, the demo's launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: 'gpu[03-05,9]-ib,cpu1' -> 'gpu03-ib'."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]+)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return prefix + first + suffix


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Slurm's SLURM_STEP_TASKS_PER_NODE ('2', '8(x4)', '8(x2),4') -> the count on node `node_id`."""
    counts = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[node_id]


def slurm_port(job_id: str) -> int:
    """A rendezvous port every task of a job derives alike (the sbatch helper exports the same one)."""
    return 15000 + int(job_id) % 20000


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables to set for this process, from the environment it started in.

    Returns {} when a launcher already set RANK. Raises ValueError for several Slurm tasks that cannot
    know their rank, or a partial launcher environment (WORLD_SIZE > 1 without RANK).
    """
    if "RANK" in env:
        return {}
    num_step_tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 0)
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if in_step and num_step_tasks > 1:
        missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if not env.get(k, "").isdigit()]
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if missing or not (env.get("MASTER_ADDR") or nodelist):
            raise ValueError(
                f"{num_step_tasks} srun tasks started without a way to know their rank "
                f"({', '.join(missing) or 'SLURM_STEP_NODELIST'} missing); refusing to train "
                f"{num_step_tasks} separate copies. Start with slurm/*.sbatch, or export RANK, "
                "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every task"
            )
        node_id = int(env.get("SLURM_NODEID") or 0)
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": str(num_step_tasks),
            "LOCAL_RANK": env["SLURM_LOCALID"],
            # What the deepspeed launcher also sets: DeepSpeed's CPU accelerator counts devices and picks
            # its shared-memory all-reduce from LOCAL_SIZE, so srun ranks compute as launcher ranks do.
            "LOCAL_SIZE": str(_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or "1", node_id)),
            "CROSS_RANK": str(node_id),
            "CROSS_SIZE": env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1",
            "MASTER_ADDR": env.get("MASTER_ADDR") or _first_host(nodelist),
            "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(env.get("SLURM_JOB_ID", "0"))),
        }
    if int(env.get("WORLD_SIZE") or 1) > 1:
        raise ValueError(
            f"WORLD_SIZE={env['WORLD_SIZE']} but no RANK: this process cannot know its rank; "
            "set RANK (and LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or use a launcher"
        )
    if not in_step and int(env.get("SLURM_NTASKS") or 1) > 1:
        warnings.warn(
            f"this Slurm job has {env['SLURM_NTASKS']} tasks but the trainer was started once, without "
            "srun: training on one rank. Start it with srun (slurm/pretrain.sbatch does)",
            stacklevel=2,
        )
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}  # fmt: skip


STARTUP_GRACE_S = 300.0


def init_distributed(timeout_s: float) -> DistContext:
    """Initialize torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPUs) and pick the device.

    A single process without launcher variables gets a one-rank group on a free local port, so the
    same DeepSpeed code path runs on a laptop; srun tasks get theirs from Slurm (`launch_env`).
    `timeout_s` bounds every collective (gloo and nccl honour the process group's timeout). The
    variables set here are removed again by `release_distributed`.
    """
    added = launch_env(os.environ)
    os.environ.update(added)
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # A scheduler that binds each task to its own GPU (srun --gpus-per-task=1) leaves one visible.
        index = 0 if torch.cuda.device_count() == 1 else local_rank
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not torch.distributed.is_initialized():
        # The rendezvous waits for ranks that start seconds apart (imports on a loaded node): at least
        # STARTUP_GRACE_S; afterwards every collective is bounded by timeout_s.
        startup = timedelta(seconds=max(timeout_s, STARTUP_GRACE_S))
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=startup)
        torch.distributed.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))
    ctx = DistContext(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
        env_added=tuple(added),
    )
    # DeepSpeed's CPU all-reduce maps one /dev/shm file per rank and never removes them (67 MB each,
    # RAM); it makes them whenever LOCAL_SIZE equals the world size, one rank included (`deepspeed
    # --num_gpus 1`). Once every rank is past init, each has mapped all of them: unlinking now keeps
    # the mappings and leaves nothing behind, however the run ends.
    if ctx.world_size > 1:
        torch.distributed.barrier()
    remove_shm_buffers([ctx.rank])
    return ctx


def shm_buffer_paths(ranks: list[int]) -> list[Path]:
    """This run's DeepSpeed shared-memory all-reduce files of `ranks` (they exist where every rank
    runs on this host: LOCAL_SIZE == world size). The name holds the user id and this run's
    rendezvous address and port, so no other run's files match (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    prefix = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        + os.environ.get("MASTER_PORT", "")
    )
    return [SHM_DIR / f"{prefix}_{rank}" for rank in ranks]


def remove_shm_buffers(ranks: list[int]) -> None:
    """Unlink this run's all-reduce files of `ranks` that still exist (mappings stay valid)."""
    for path in shm_buffer_paths(ranks):
        path.unlink(missing_ok=True)


def release_distributed(ctx: DistContext) -> None:
    """Undo what `init_distributed` put into os.environ, for what runs next in this process (an
    in-process test, a child that must find its own rank). The process group itself stays: DeepSpeed
    caches its groups per process (deepspeed.utils.groups), and a second run in the same process
    reuses the group rather than one those caches would not know."""
    for key in ctx.env_added:
        os.environ.pop(key, None)
