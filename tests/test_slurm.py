"""The project's slurm/*.sbatch scripts against a real one-node Slurm (daemons started by the test):
requeue from outside and by the USR1 path, each resuming to the parameters of an uninterrupted run;
sharding on two tasks; the refusal of srun tasks that cannot know their rank; `sbatch --test-only`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO_ROOT,
    TINY_CONFIG,
    ZERO2_STEPS,
    assert_same_parameters,
    base_overrides,
    logged_steps,
)
from slurm_cluster import TERMINAL_STATES, SlurmCluster, missing_binaries

pytestmark = pytest.mark.slow

SLURM_DIR = REPO_ROOT / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))
CHECKPOINT_EVERY = 4  # finer than the reference run's 8: the requeue must land mid-run


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing; `make test` installs it)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmctld/slurmd as root (SlurmUser=root)")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        # Jobs find this environment's console scripts. Appended, not prepended: a venv's own `ninja`
        # first on PATH would make DeepSpeed's JIT-built CPU op rebuild (minutes) for every other test.
        cluster.env["PATH"] = f"{cluster.env['PATH']}:{Path(sys.executable).parent}"
        yield cluster


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} not seen after {timeout_s} s")


def _submit_training(slurm: SlurmCluster, run: Path, shards: Path) -> tuple[int, Path]:
    run.mkdir(parents=True)
    log = run / "job.out"
    overrides = [*base_overrides(run, shards), "train.zero_stage=2", *ZERO2_STEPS]
    job = slurm.submit(
        "--ntasks=2", f"--output={log}", str(SLURM_DIR / "pretrain.sbatch"), "--config", TINY_CONFIG,
        *overrides, f"checkpoint.every={CHECKPOINT_EVERY}",
    )  # fmt: skip
    return job, log


def _finish_after_requeue(slurm: SlurmCluster, job: int, log: Path) -> str:
    _wait_for(lambda: slurm.job_field(job, "Restarts") not in ("", "0"), 120, f"a restart of job {job}")
    state = slurm.wait_state(job, TERMINAL_STATES, timeout_s=240)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text[-3000:]}"
    return text


def _assert_one_history_and_straight_run_parameters(run: Path, reference: Path) -> dict:
    """The resumed run ends where an uninterrupted one does, and its records show every step once."""
    assert logged_steps(run) == list(range(1, 17))
    info = json.loads((run / "run_info.json").read_text())
    assert [s["slurm_restart_count"] for s in info["starts"]] == [0, 1]
    assert info["world_size"] == 2 and info["started"] == info["starts"][-1]["started"]
    assert_same_parameters(reference, run, "step00000016", "after the requeue")
    return info


def test_sbatch_test_only_accepts_every_script(slurm):
    assert {p.name for p in SCRIPTS} >= {"pretrain.sbatch", "shard.sbatch", "finetune.sbatch"}
    for script in SCRIPTS:
        result = slurm.run("sbatch", "--test-only", "--ntasks=2", str(script), "--config", TINY_CONFIG)
        assert "to start at" in result.stderr, f"{script.name}: {result.stderr}"


def test_requeue_from_outside_resumes_to_the_uninterrupted_parameters(
    slurm, tmp_path, phantom_shards, zero2_run
):
    run = tmp_path / "run"
    job, log = _submit_training(slurm, run, phantom_shards)
    _wait_for(lambda: (run / "checkpoints" / "latest").is_file(), 180, "the first checkpoint")
    reached = max(logged_steps(run), default=0)
    slurm.run("scontrol", "requeue", str(job))
    text = _finish_after_requeue(slurm, job, log)
    assert "DUE TO JOB REQUEUE" in text and "start 2 on" in text
    info = _assert_one_history_and_straight_run_parameters(run, zero2_run[0])
    assert info["starts"][1]["start_step"] >= reached - CHECKPOINT_EVERY  # lost at most one interval


def test_usr1_stops_at_a_step_checkpoints_and_requeues_itself(slurm, tmp_path, phantom_shards, zero2_run):
    run = tmp_path / "run"
    job, log = _submit_training(slurm, run, phantom_shards)
    _wait_for(lambda: logged_steps(run), 180, "the first training step")
    # What `#SBATCH --signal=B:USR1@120` does before the time limit, now; twice changes nothing.
    for _ in range(2):
        slurm.run("scancel", "--batch", "--signal=USR1", str(job))
    text = _finish_after_requeue(slurm, job, log)
    assert "requeueing job" in text
    stopped_at = int(text.split("preempted: checkpoint at step ")[1].split(";")[0])
    info = _assert_one_history_and_straight_run_parameters(run, zero2_run[0])
    assert (
        info["starts"][1]["start_step"] == stopped_at
    )  # resumed from the preemption checkpoint: nothing lost


def test_srun_tasks_that_cannot_know_their_rank_refuse(slurm, tmp_path, phantom_shards):
    # A wrapper that drops SLURM_PROCID (e.g. a container started with a clean environment).
    result = slurm.run(
        "srun", "--ntasks=2", "env", "-u", "SLURM_PROCID", "xray-pretrain", "pretrain", "--config", TINY_CONFIG,
        *base_overrides(tmp_path / "run", phantom_shards), check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("2 srun tasks started without a way to know their rank") == 2, output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shard_script_converts_a_folder_on_two_tasks(slurm, tmp_path):
    from data_tools.synth import synthesize

    synthesize(tmp_path / "dicom", num_images=24, size=64, seed=3, progress=False)
    out, log = tmp_path / "shards", tmp_path / "job.out"
    job = slurm.submit(
        "--ntasks=2", f"--output={log}", str(SLURM_DIR / "shard.sbatch"), "--input", str(tmp_path / "dicom"),
        "--out", str(out), "--source", "csv", "--long-side", "48", "--shard-size", "3", "--workers", "1",
        "--no-progress",
    )  # fmt: skip
    state = slurm.wait_state(job, TERMINAL_STATES, timeout_s=180)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "part 0/2:" in text and "part 1/2:" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] + manifest["num_skipped"] == 24 and len(manifest["shards"]) >= 4
    verify = subprocess.run(
        [Path(sys.executable).with_name("xray-shard"), "verify", str(out)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
