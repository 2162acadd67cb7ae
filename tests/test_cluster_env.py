"""What a process makes of its launcher's environment, and a restarted run's single history (fast;
one short process). The same behaviour under a real Slurm is in test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from xray_pretrain.engine import preempt
from xray_pretrain.engine.dist import _first_host, _tasks_on_node, launch_env, slurm_port
from xray_pretrain.engine.monitor import RunMonitor, truncate_history
from xray_pretrain.engine.runinfo import with_start_history

# What srun gives task 3 of a 4-task step on two nodes (copied from a real step's environment).
SRUN_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def test_srun_task_maps_slurm_variables_to_its_rank():
    assert launch_env(SRUN_TASK) == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(slurm_port("4242")),
    }
    # Every task of the job derives the same rendezvous; an exported MASTER_* wins.
    assert (
        launch_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})["MASTER_ADDR"]
        == "10.0.0.1"
    )


def test_a_launcher_that_set_rank_wins_and_a_lone_process_is_rank_zero_of_one():
    assert launch_env({**SRUN_TASK, "RANK": "5", "WORLD_SIZE": "8"}) == {}
    alone = launch_env({})
    assert (alone["RANK"], alone["WORLD_SIZE"], alone["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def test_several_srun_tasks_without_their_rank_refuse_to_start():
    no_rank = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_PROCID"}
    with pytest.raises(ValueError, match="4 srun tasks started without a way to know their rank"):
        launch_env(no_rank)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but no RANK"):
        launch_env({"WORLD_SIZE": "2"})


def test_batch_shell_of_a_multi_task_job_warns_that_it_runs_alone():
    with pytest.warns(UserWarning, match="has 2 tasks but the trainer was started once"):
        assert launch_env({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})["WORLD_SIZE"] == "1"


def test_tasks_on_a_node_from_slurms_compressed_counts():
    assert [_tasks_on_node("8(x2),4", node) for node in range(3)] == [8, 8, 4]
    assert _tasks_on_node("2", 0) == 2


@pytest.mark.parametrize(
    "nodelist, first",
    [("vm", "vm"), ("gpu[03-05,9]", "gpu03"), ("n[1-2]-ib,cpu1", "n1-ib"), ("a,b", "a"), ("x[007]", "x007")],
)
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert _first_host(nodelist) == first


def test_preemption_signal_is_recorded_not_fatal_and_twice_is_once():
    previous = {s: signal.getsignal(s) for s in preempt.PREEMPT_SIGNALS}
    try:
        preempt.install()
        assert not preempt.agreed_to_stop("cpu")
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal changes nothing
        assert preempt.requested_here() and preempt.agreed_to_stop("cpu")
    finally:
        preempt._received.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _rows(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_restart_drops_the_history_past_the_resumed_step(tmp_path):
    first = RunMonitor(tmp_path, True, 10, 0, progress=False)
    for step in range(1, 8):  # the first start logged up to 7, its last checkpoint was at 4
        first.scalars(step, {"train/loss": 1.0 / step})
    first.close()
    second = RunMonitor(tmp_path, True, 10, 4, progress=False)
    for step in range(5, 11):
        second.scalars(step, {"train/loss": 2.0 / step})
    second.close()
    assert _rows(tmp_path / "metrics.jsonl") == list(range(1, 11))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload().Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, 11))
    assert events[5].value == pytest.approx(2.0 / 6)  # step 6 from the second start
    assert truncate_history(tmp_path / "metrics.jsonl", 10) == 0


def test_run_info_keeps_one_entry_per_start(tmp_path, monkeypatch):
    first = {"started": "t0", "host": "a", "world_size": 2, "git": {"commit": "c"}, "attention": "x"}
    (tmp_path / "run_info.json").write_text(json.dumps(first))  # written before `starts` existed
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second = with_start_history({**first, "started": "t1", "world_size": 4}, tmp_path, 8)
    assert second["started"] == "t1" and second["attention"] == "x"  # today's keys: the latest start
    assert [(s["started"], s["start_step"], s["world_size"]) for s in second["starts"]] == [
        ("t0", None, 2),
        ("t1", 8, 4),
    ]
    assert second["starts"][1]["slurm_restart_count"] == 1
    (tmp_path / "run_info.json").write_text(json.dumps(second))
    third = with_start_history({**first, "started": "t2"}, tmp_path, 12)
    assert [s["started"] for s in third["starts"]] == ["t0", "t1", "t2"]


def test_a_lone_rank_leaves_no_shared_memory_file(tmp_path):
    """DeepSpeed maps its CPU all-reduce file for one rank too when LOCAL_SIZE is 1 (`deepspeed
    --num_gpus 1`); init removes it (a fresh process: DeepSpeed's shm op initializes once per process)."""
    script = (
        "from xray_pretrain.engine.dist import init_distributed, shm_buffer_paths\n"
        "ctx = init_distributed(60)\n"
        "print('LEFT', [str(p) for p in shm_buffer_paths([0]) if p.exists()])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["LOCAL_SIZE"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LEFT []" in done.stdout, done.stdout
