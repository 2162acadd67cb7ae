"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd started as plain processes
(no systemd) with every state, spool, socket and log file in a temporary folder, stopped by their pid
files afterwards. The settings are the ones that work on a small VM (see issue 10 and the README):
without `cred_expire=5` and a short `sched_interval` a requeued job waits about 150 s to run again.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from xray_pretrain.engine.dist import without_launcher_variables

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def missing_binaries() -> list[str]:
    """Slurm/munge programs not found on PATH or in /usr/sbin (`make test` installs them)."""
    return [name for name in BINARIES if not _which(name)]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_memory_mib() -> int:
    """RealMemory a little below what slurmd itself reports (slurmd drains a node that claims more)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    return int(int(re.search(r"RealMemory=(\d+)", out).group(1)) * 0.9)


class SlurmCluster:
    """`with SlurmCluster(folder) as cluster:` starts the daemons; `cluster.env` is the environment
    (SLURM_CONF) every client command must run with."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        # munged runs as the munge user: its folder must not sit under a root-only one (pytest's tmp is).
        self.munge_dir = Path(tempfile.mkdtemp(prefix="xray-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        # Jobs must find their ranks from Slurm, not from variables an in-process test left here.
        self.env = {**without_launcher_variables(os.environ), "SLURM_CONF": str(self.conf)}
        for name in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[name]  # a test run inside a Slurm job must not leak its job into ours

    # ---- start / stop ----------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._check_hostname()
            self._start_munge()
            self._write_conf()
            self._daemon("slurmctld")
            self._daemon("slurmd")
            self._wait_idle(timeout_s=60)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _check_hostname(self) -> None:
        try:
            socket.gethostbyname(self.host)
        except OSError as err:
            raise RuntimeError(
                f"hostname {self.host!r} does not resolve; add '127.0.0.1 {self.host}' to /etc/hosts"
            ) from err

    def _start_munge(self) -> None:
        folder = self.munge_dir
        key = folder / "munge.key"
        subprocess.run([_which("mungekey"), "-c", "-f", "-k", str(key)], check=True, capture_output=True)
        shutil.chown(folder, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        os.chmod(folder, 0o755)  # munged wants its socket folder searchable by all clients
        os.chmod(key, 0o600)
        # munged refuses group/world-writable ancestors unless they are sticky (as /tmp is).
        result = subprocess.run(
            ["runuser", "-u", "munge", "--", _which("munged"), f"--socket={self.munge_socket}",
             f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
             f"--seed-file={folder / 'munged.seed'}"],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"munged did not start: {result.stderr.strip()}")

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "logs"):
            (self.root / sub).mkdir(exist_ok=True)
        r = self.root
        self.conf.write_text(
            f"""ClusterName=xraytest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/logs/slurmctld.log
SlurmdLogFile={r}/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=1
NodeName={self.host} CPUs={os.cpu_count()} RealMemory={_node_memory_mib()} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _daemon(self, name: str) -> None:
        result = subprocess.run(
            [_which(name), "-f", str(self.conf)], env=self.env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{name} did not start: {result.stderr.strip()} (log in {self.root / 'logs'})")

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"node not idle after {timeout_s} s (sinfo: {state!r}); logs in {self.root / 'logs'}"
        )

    def stop(self) -> None:
        """Cancel what still runs, then stop slurmd, slurmctld and munged by their pid files."""
        if (self.root / "slurmctld.pid").is_file() and self.conf.is_file():
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for pid_file in (
            self.root / "slurmd.pid",
            self.root / "slurmctld.pid",
            self.munge_dir / "munged.pid",
        ):
            _stop_pid_file(pid_file)
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    # ---- client commands -------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [_which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True, **kwargs
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def submit(self, *args: str, cwd: Path | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job_field(self, job_id: int, field: str) -> str:
        """One field of `scontrol show job` (e.g. JobState, Restarts); '' once the job is forgotten."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
        match = re.search(rf"\b{field}=(\S*)", out)
        return match.group(1) if match else ""

    def wait_state(self, job_id: int, states: set[str], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s} s (last state {state!r})")


def _stop_pid_file(pid_file: Path, timeout_s: float = 15) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
