"""Processes of a 2-rank run, killed and stopped for real (issue 11, engine: processes).

Ranks started by hand (what one process per task under srun is too) have no launcher to end the
survivor: it must stop with a message naming the lost rank within `train.dist_timeout_s`, and
`checkpoint.resume=auto` must end on the parameters of an uninterrupted run. Under the deepspeed
launcher a killed rank ends the run, a killed launcher stops its ranks with a checkpoint, and no
run leaves DeepSpeed's /dev/shm files behind. Each run resumes from step 8 of the reference run
(`zero2_run`) and checkpoints every 2 steps, so a kill lands between checkpoints; one of them
resumes after the kill and ends on the reference's parameters.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    TINY_CONFIG,
    ZERO2_STEPS,
    assert_same_parameters,
    base_overrides,
    copy_checkpoint,
    logged_steps,
)

from xray_pretrain.engine import checkpoint
from xray_pretrain.engine.dist import SHM_DIR, free_port, without_launcher_variables
from xray_pretrain.engine.peers import PEER_LOST_EXIT_CODE
from xray_pretrain.engine.preempt import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

TIMEOUT_S = 10  # train.dist_timeout_s of these runs
ORPHAN_STEPS = 200  # the killed-launcher run's train.steps: it must stop long before
SCRIPT = Path(sys.executable).with_name("xray-pretrain")


def _train_args(run: Path, shards: Path) -> list[str]:
    return [
        "pretrain", "--config", TINY_CONFIG, *base_overrides(run, shards), "train.zero_stage=2", *ZERO2_STEPS,
        "checkpoint.every=2", "checkpoint.resume=auto", f"train.dist_timeout_s={TIMEOUT_S}",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = without_launcher_variables(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _start_by_hand(run: Path, shards: Path, tag: str) -> list[subprocess.Popen]:
    """Two ranks started as srun or a user would, without a launcher: one process each."""
    run.mkdir(parents=True, exist_ok=True)
    port, procs = free_port(), []
    for rank in range(2):
        env = _env() | dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port))  # fmt: skip
        with open(run / f"{tag}-rank{rank}.log", "w") as log:
            cmd = [str(SCRIPT), *_train_args(run, shards)]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def _start_launcher(
    run: Path, shards: Path, tag: str, port: int | None = None, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(port or free_port()), str(SCRIPT), *_train_args(run, shards), *extra]  # fmt: skip
    with open(run / f"{tag}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())


def _launched_ranks(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """{rank: process} of the ranks below a deepspeed runner, once both exist."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ranks = {}
        for proc in psutil.Process(launcher.pid).children(recursive=True):
            with_rank = [a for a in _cmdline(proc) if a.startswith("--local_rank=")]
            if with_rank:
                ranks[int(with_rank[0].split("=")[1])] = proc
        if len(ranks) == 2:
            return ranks
        assert launcher.poll() is None, "the launcher ended before starting its ranks"
        time.sleep(0.2)
    raise TimeoutError("the launcher did not start 2 ranks")


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _wait_for_step(run: Path, step: int, procs: list) -> None:
    deadline = time.monotonic() + 240
    while max(logged_steps(run), default=0) < step:
        assert all(p.poll() is None for p in procs), f"a process ended before step {step}"
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.1)


def _tree(proc) -> list[psutil.Process]:
    """A process and everything below it (DataLoader workers), as psutil handles."""
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def _assert_all_gone(processes: list[psutil.Process], within_s: float) -> None:
    """Nothing of the run is left: DataLoader workers notice their parent's end within 5 s."""
    _, alive = psutil.wait_procs(processes, timeout=within_s)
    for proc in alive:
        proc.kill()
    assert not alive, f"left behind: {[(p.pid, _cmdline(p)[-3:]) for p in alive]}"


def _shm_files(port: int) -> list[str]:
    """DeepSpeed's shared-memory files of the run whose rendezvous port is `port` (other runs on
    this machine have their own)."""
    return [p.name for p in SHM_DIR.glob(f"deepspeed_*_{port}_*")]


def _reported_step(log: str, why: str) -> int:
    """The step a survivor's error line says every rank had finished when the peer was lost."""
    match = re.search(r"was lost after all ranks finished step (\d+): " + re.escape(why), log)
    assert match, log[-3000:]
    return int(match.group(1))


def _start_step(run: Path) -> int:
    return json.loads((run / "run_info.json").read_text())["starts"][-1]["start_step"]


def _last_complete_step(run: Path) -> int:
    return max(int(tag.removeprefix("step")) for tag in checkpoint.complete_tags(run / "checkpoints"))


def test_rank_killed_without_launcher_stops_the_survivor_and_resumes_equal(
    tmp_path, phantom_shards, zero2_run
):
    reference, run = zero2_run[0], tmp_path / "run"
    copy_checkpoint(reference, "step00000008", run)
    ranks = _start_by_hand(run, phantom_shards, "killed")
    kill_at = random.randint(9, 13)
    _wait_for_step(run, kill_at, ranks)
    trees = [_tree(p) for p in ranks]
    # Rank 0 hosts the rendezvous store: the survivor loses its collectives and the store at once.
    os.kill(ranks[0].pid, signal.SIGKILL)
    ranks[0].wait()
    returncode = ranks[1].wait(timeout=TIMEOUT_S + 60)  # bounded: never the hang of before
    log = (run / "killed-rank1.log").read_text()
    assert returncode == PEER_LOST_EXIT_CODE, log[-3000:]
    assert f"[rank 1] error: rank 0 (pid {ranks[0].pid} on " in log, log[-3000:]
    assert kill_at <= _reported_step(log, "its process is gone") <= 16
    assert "checkpoint.resume=auto" in log
    assert "Traceback" not in log
    _assert_all_gone(trees[0] + trees[1], within_s=20)

    resume_from = _last_complete_step(run)
    assert 8 <= resume_from <= 16
    ranks = _start_by_hand(run, phantom_shards, "resumed")
    for rank, proc in enumerate(ranks):
        assert proc.wait(timeout=300) == 0, (run / f"resumed-rank{rank}.log").read_text()[-3000:]
    assert _start_step(run) == resume_from
    assert_same_parameters(reference, run, "step00000016", f"after rank 0 was killed near step {kill_at}")


def test_stopped_rank_ends_the_survivor_within_the_timeout(tmp_path, phantom_shards, zero2_run):
    run = tmp_path / "run"
    copy_checkpoint(zero2_run[0], "step00000008", run)
    ranks = _start_by_hand(run, phantom_shards, "stopped")
    _wait_for_step(run, 9, ranks)
    trees = [_tree(p) for p in ranks]
    os.kill(ranks[1].pid, signal.SIGSTOP)
    try:
        returncode = ranks[0].wait(timeout=TIMEOUT_S + 60)
    finally:
        os.kill(ranks[1].pid, signal.SIGKILL)
    log = (run / "stopped-rank0.log").read_text()
    assert returncode == PEER_LOST_EXIT_CODE, log[-3000:]
    assert f"[rank 0] error: rank 1 (pid {ranks[1].pid} on " in log
    assert 9 <= _reported_step(log, "no heartbeat for") <= 16
    assert "(stopped or unreachable)" in log and f"train.dist_timeout_s={TIMEOUT_S}" in log
    _assert_all_gone(trees[0] + trees[1], within_s=20)
    assert _last_complete_step(run) >= 8


def test_rank_killed_under_the_launcher_ends_the_run_and_leaves_nothing(tmp_path, phantom_shards, zero2_run):
    """What held before this issue, kept: the launcher ends the other rank. Resuming after a kill
    is the by-hand test's (the same checkpoints, the same resume)."""
    run, port = tmp_path / "run", free_port()
    copy_checkpoint(zero2_run[0], "step00000008", run)
    launcher = _start_launcher(run, phantom_shards, "killed", port)
    ranks = _launched_ranks(launcher)
    everything = _tree(launcher)
    kill_at = random.randint(9, 13)
    _wait_for_step(run, kill_at, [launcher])
    ranks[1].send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=TIMEOUT_S + 60) != 0
    _assert_all_gone(everything, within_s=20)
    log = (run / "killed.log").read_text()
    assert f"[rank 0] error: rank 1 (pid {ranks[1].pid} on " in log, log[-3000:]
    assert kill_at <= _reported_step(log, "its process is gone") <= 16
    assert not _shm_files(port), "a killed run left DeepSpeed shared-memory files"
    assert 8 <= _last_complete_step(run) <= max(logged_steps(run))


def test_killed_launcher_stops_its_ranks_with_a_checkpoint(tmp_path, phantom_shards, zero2_run):
    run, port = tmp_path / "run", free_port()
    copy_checkpoint(zero2_run[0], "step00000008", run)
    # Many more steps than the stop needs: on a quiet machine the tiny steps would otherwise all be done
    # before the ranks look at their launcher again.
    launcher = _start_launcher(run, phantom_shards, "orphaned", port, extra=(f"train.steps={ORPHAN_STEPS}",))
    ranks = _launched_ranks(launcher)
    everything = _tree(launcher)
    _wait_for_step(run, 9, [launcher])
    launcher.send_signal(signal.SIGKILL)  # the top `deepspeed` process only
    launcher.wait()
    _, alive = psutil.wait_procs(list(ranks.values()), timeout=TIMEOUT_S + 60)
    assert not alive, "the ranks went on as orphans"
    _assert_all_gone(everything, within_s=40)  # the per-node launch process follows its ranks
    log = (run / "orphaned.log").read_text()
    assert f"the deepspeed launcher (pid {launcher.pid}) is gone: stopping at the next step boundary" in log
    stopped_at = int(log.split("preempted: checkpoint at step ")[1].split(";")[0])
    assert 9 <= stopped_at < ORPHAN_STEPS, "the ranks trained to the end"
    assert _last_complete_step(run) == stopped_at
    assert (run / "checkpoints" / "latest").read_text().strip() == checkpoint.tag_for_step(stopped_at)
    assert f"exits with return code = {PREEMPTED_EXIT_CODE}" in log  # the launch process saw the stop
    assert not _shm_files(port), "a stopped run left DeepSpeed shared-memory files"


RANK_FAILS = """
import os, sys, torch
from xray_pretrain.engine.dist import DistContext
from xray_pretrain.engine.peers import PeerWatch
rank = int(os.environ["RANK"])
torch.distributed.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
ctx = DistContext(rank, 2, rank, torch.device("cpu"))
steps = [0]
with PeerWatch(ctx, timeout_s=60) as watch:
    watch.follow(lambda: steps[0])
    for step in range(1, 1000):
        if rank == 1 and step == 3:
            raise ValueError("rank 1's own error")
        torch.distributed.all_reduce(torch.ones(1))
        steps[0] = step
"""


def test_a_rank_ending_on_its_own_error_is_named_by_the_other(tmp_path):
    """No DeepSpeed: two processes in a gloo group around PeerWatch. Rank 1 raises; rank 0, in an
    all-reduce, names it at once instead of waiting out the 60 s timeout."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_FAILS)
    port, procs = free_port(), []
    for rank in range(2):
        env = _env() | dict(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(
            subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True)
        )
    try:
        errors = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # only if a hang failed the test
    assert procs[1].returncode == 1 and "ValueError: rank 1's own error" in errors[1]
    assert procs[0].returncode == PEER_LOST_EXIT_CODE, errors[0]
    assert f"[rank 0] error: rank 1 (pid {procs[1].pid} on " in errors[0]
    assert "was lost after all ranks finished step 2: it ended before this rank" in errors[0]


UNCAUGHT_ERROR_WITH_WORKERS = """
import numpy as np, torch
from xray_pretrain.data.wds import make_dataloader

class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return {"image": torch.zeros(1), "roi": torch.zeros(1), "labels": np.zeros(1), "key": str(i),
                "position": i, "weight": 1.0}

batches = iter(make_dataloader(Rows(), [[0, 1], [2, 3], [4, 5], [6, 7]], num_workers=1, pin_memory=False))
next(batches)
print(*[w.pid for w in batches._workers], flush=True)
raise RuntimeError("a bug while training")
"""


def test_an_uncaught_error_with_loader_workers_ends_the_process(tmp_path):
    """The workers ignore SIGTERM (data/wds.py), so Python's exit, which SIGTERMs and waits for them,
    hung for good after any uncaught error while a loader was alive (before: still there after 40 s)."""
    script = tmp_path / "uncaught.py"
    script.write_text(UNCAUGHT_ERROR_WITH_WORKERS)
    proc = subprocess.Popen([sys.executable, str(script)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # only if a hang failed the test
    assert proc.returncode == 1 and "RuntimeError: a bug while training" in err
    assert "is killed by signal" not in err  # the workers' intended end is not reported as a failure
    workers = [int(pid) for pid in out.split()]
    assert len(workers) == 1 and not psutil.pid_exists(workers[0])
