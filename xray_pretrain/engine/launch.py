"""Run an `xray-pretrain` training command under the deepspeed launcher, as a user runs it (the demo's
stages and the tests' shared runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from xray_pretrain.engine.dist import free_port, without_launcher_variables


def launch_training(
    config: str | Path, overrides: list[str], num_ranks: int, log_path: Path, command: str = "pretrain"
) -> None:
    """Run `xray-pretrain COMMAND` (pretrain, finetune) under the deepspeed launcher (N CPU ranks when
    there is no GPU)."""
    script = shutil.which("xray-pretrain") or str(Path(sys.executable).with_name("xray-pretrain"))
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(num_ranks), "--master_port", str(free_port()),
        script, command, "--config", str(config), *overrides,
    ]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    # Rank variables of an enclosing process (e.g. a test that trained in-process) must not leak in.
    env = without_launcher_variables(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        for line in proc.stdout:
            log.write(line)
            if "[WARNING]" not in line and "[INFO]" not in line:
                sys.stdout.write(line)
        if proc.wait() != 0:
            raise RuntimeError(f"training failed (exit {proc.returncode}); full log: {log_path}")
