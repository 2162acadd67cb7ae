"""The deepspeed launcher across nodes, on one machine: a hostfile naming two "nodes" and one launcher
per node rank (`--no_ssh --node_rank N`, as a cluster without ssh between nodes runs it). The run must
end with the parameters of the same run on one node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, ZERO2_STEPS, assert_same_parameters, base_overrides

from xray_pretrain.engine.dist import free_port, without_launcher_variables

pytestmark = pytest.mark.slow


def test_two_launcher_nodes_train_like_one_node(tmp_path, phantom_shards, zero2_run):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run = tmp_path / "run"
    run.mkdir()
    script = Path(sys.executable).with_name("xray-pretrain")
    common = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--num_nodes", "2",
        "--num_gpus", "1", "--no_ssh", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]  # fmt: skip
    train = [str(script), "pretrain", "--config", TINY_CONFIG, *base_overrides(run, phantom_shards)]
    train += ["train.zero_stage=2", *ZERO2_STEPS]
    env = without_launcher_variables(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    launchers = []
    for node_rank in range(2):
        log = open(run / f"node{node_rank}.log", "w")
        cmd = [*common, "--node_rank", str(node_rank), *train]
        launchers.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for proc, log in launchers:
        proc.wait(timeout=600)
        log.close()
    for node_rank, (proc, _) in enumerate(launchers):
        assert proc.returncode == 0, (run / f"node{node_rank}.log").read_text()[-3000:]
    node0 = (run / "node0.log").read_text()
    assert '"world_size": 2' in node0 and "world size 2" in node0
    assert_same_parameters(zero2_run[0], run, "step00000016", "on two launcher nodes")
