"""A lost rank or a lost launcher ends a run with one line naming it, never a hang or orphans.

Ranks without a supervising launcher (one process per task under `srun`, or started by hand) have
no one to end the survivors when a rank dies or stops. gloo fails at once on a dead peer's closed
socket and after the process group's timeout (`train.dist_timeout_s`, engine/dist.py) on a stopped
one, but its error names an address, not a rank. So every rank publishes a heartbeat (a counter, its
last finished step, pid and host) into the rendezvous store from a daemon thread, and reads
everyone's. A peer is lost when its process on this host is gone, or when its counter has not moved
for `train.dist_timeout_s` (a stopped or unreachable process); rank 0, which hosts the store, is
lost when the store does not answer for that long. The rank that finds a loss (its watch thread,
or its main thread once a collective fails) prints which rank and the step all ranks reached, and
ends at once with `PEER_LOST_EXIT_CODE` (os._exit, without Python's exit handlers) after unlinking
this run's shared-memory files. `checkpoint.resume=auto` then continues from the last complete
checkpoint.

A `deepspeed` launcher killed alone (its top process, or the per-node `launch` process) leaves its
ranks training to the end as orphans. A rank whose parent is that launcher remembers the launcher
processes and, once one of them is gone, asks for the agreed, checkpointed stop of a preemption
(engine/preempt.py). Under srun or by hand the parent is something else, and nothing is watched.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from xray_pretrain.engine import preempt
from xray_pretrain.engine.dist import DistContext, remove_shm_buffers

PEER_LOST_EXIT_CODE = 69  # EX_UNAVAILABLE: a rank this one needs is gone; resume to continue
KEY_PREFIX = "xray_pretrain/heartbeat/"
MAX_INTERVAL_S = 5.0
# The launcher check is two /proc reads: cheap enough to run often, so that ranks stop within a step
# or two of losing their launcher even when steps take a fraction of a second.
LAUNCHER_POLL_S = 0.5


@dataclass
class _Peer:
    count: int = -1  # the last heartbeat counter seen
    seen_at: float = 0.0  # time.monotonic() when the counter last moved
    step: int | None = None
    pid: int = 0
    host: str = ""


class PeerWatch:
    """Heartbeats between the ranks of one run, and the launcher above this rank (see the module
    docstring). Use as a context manager around the run; `follow` gives it the step counter."""

    def __init__(self, ctx: DistContext, timeout_s: float):
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.interval_s = min(MAX_INTERVAL_S, timeout_s / 4)
        self.host = socket.gethostname()
        self._step: Callable[[], int | None] = lambda: None
        self._peers = {r: _Peer() for r in range(ctx.world_size) if r != ctx.rank}
        self._store_seen_at = time.monotonic()
        self._count = 0
        self._store = None
        self._launchers = _launcher_processes()
        self._launcher_gone = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peer-watch", daemon=True)

    def follow(self, step: Callable[[], int | None]) -> None:
        """`step()` returns the last optimizer step this rank finished (read by the watch thread)."""
        self._step = step

    # ---- lifetime ---------------------------------------------------------------------------------
    def __enter__(self) -> PeerWatch:
        if self.ctx.world_size > 1:
            self._store = torch.distributed.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                # Generous per request (a loaded host answers late); silence is measured across requests.
                timeout=timedelta(seconds=max(self.interval_s, self.timeout_s / 2)), wait_for_workers=False,
            )  # fmt: skip
            self._publish(done=False)
            torch.distributed.barrier()  # every rank's key exists: reading them never waits
        if self.ctx.world_size > 1 or self._launchers:
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.ctx.world_size > 1 and _is_collective_failure(exc):
            self._abort_after_failure(exc)  # does not return
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._store is not None:
            # A finished rank is not a lost one, whoever ends last; if rank 0 (the store) already
            # ended, nobody is left to tell.
            with contextlib.suppress(RuntimeError):
                self._publish(done=True)

    # ---- the watch thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        poll_s = min(self.interval_s, LAUNCHER_POLL_S) if self._launchers else self.interval_s
        next_peer_check = time.monotonic() + self.interval_s
        while not self._done.wait(poll_s):
            if self._launchers and not self._launcher_gone and not all(p.alive() for p in self._launchers):
                self._launcher_gone = True
                gone = next(p for p in self._launchers if not p.alive())
                preempt.request_stop(
                    f"[rank {self.ctx.rank}] the deepspeed launcher (pid {gone.pid}) is gone"
                )
            if self._store is not None and time.monotonic() >= next_peer_check:
                next_peer_check = time.monotonic() + self.interval_s
                lost = self._check_peers()
                if lost:
                    self._abort(lost)

    def _publish(self, done: bool) -> None:
        self._count += 1
        beat = {
            "count": self._count,
            "step": self._step(),
            "pid": os.getpid(),
            "host": self.host,
            "done": done,
        }
        self._store.set(f"{KEY_PREFIX}{self.ctx.rank}", json.dumps(beat))

    def _check_peers(self, after_failure: bool = False) -> str | None:
        """One heartbeat out and everyone's in; a description of a lost rank, or None. A rank that
        said it ended is not lost, unless a collective just failed and its process is gone (it
        ended on an error of its own)."""
        now = time.monotonic()
        try:
            self._publish(done=False)
            values = self._store.multi_get([f"{KEY_PREFIX}{r}" for r in self._peers])
            self._store_seen_at = now
        except RuntimeError:  # the store (rank 0's process) refused or did not answer in time
            return self._store_silent(now)
        for rank, value in zip(self._peers, values):
            beat, peer = json.loads(value), self._peers[rank]
            if beat["count"] != peer.count:
                peer.count, peer.seen_at = beat["count"], now
            peer.step, peer.pid, peer.host = beat["step"], beat["pid"], beat["host"]
            gone = peer.host == self.host and not _pid_alive(peer.pid)
            if beat["done"]:
                if after_failure and gone:
                    return self._describe(
                        rank, "it ended before this rank (on an error of its own? see its output)"
                    )
                continue
            if gone:
                return self._describe(rank, "its process is gone")
            if now - peer.seen_at > self.timeout_s:
                return self._describe(
                    rank, f"no heartbeat for {now - peer.seen_at:.0f} s (stopped or unreachable)"
                )
        return None

    def _store_silent(self, now: float) -> str | None:
        """Rank 0 hosts the store: lost at once if its process on this host is gone, else after
        `timeout_s` without an answer."""
        peer = self._peers.get(0)
        if peer is None:
            return None
        if peer.host == self.host and peer.pid and not _pid_alive(peer.pid):
            return self._describe(0, "its process is gone (it hosted the rendezvous store)")
        silent_s = now - self._store_seen_at
        if silent_s > self.timeout_s:
            return self._describe(0, f"the rendezvous store it hosts did not answer for {silent_s:.0f} s")
        return None

    def _describe(self, rank: int, why: str) -> str:
        """The one line naming the lost rank. Data-parallel steps need every rank, so the last step
        this rank finished is one every rank reached; the peer's heartbeat may lag behind it."""
        peer = self._peers[rank]
        where = f" (pid {peer.pid} on {peer.host})" if peer.pid else ""
        step = self._step()
        reached = "before the first step" if step is None else f"after all ranks finished step {step}"
        heard = "" if peer.step is None else f"; its last heartbeat came after step {peer.step}"
        return (
            f"rank {rank}{where} was lost {reached}: {why}{heard} (train.dist_timeout_s="
            f"{self.timeout_s:g}). Continue with checkpoint.resume=auto: it resumes from the last "
            "complete checkpoint"
        )

    # ---- ending this rank -------------------------------------------------------------------------
    def _abort_after_failure(self, exc: BaseException) -> None:
        """A collective failed: name the lost rank as soon as the heartbeats tell (at most
        `timeout_s` more), else say that none was found; then end this rank."""
        deadline = time.monotonic() + self.timeout_s + 2 * self.interval_s
        self._done.set()  # the thread would race this one to report
        if self._thread.is_alive():
            self._thread.join()
        lost = None
        while lost is None and time.monotonic() < deadline:
            lost = self._check_peers(after_failure=True)
            if lost is None:
                time.sleep(self.interval_s)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._abort(lost or f"a collective failed and no lost rank was found: {first_line}")

    def _abort(self, message: str) -> None:
        print(f"[rank {self.ctx.rank}] error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        remove_shm_buffers(list(range(self.ctx.world_size)))  # a killed rank could not unlink its own
        os._exit(PEER_LOST_EXIT_CODE)


def _is_collective_failure(exc: BaseException) -> bool:
    """A torch.distributed error, or gloo's (a plain RuntimeError naming its source file)."""
    return isinstance(exc, torch.distributed.DistError) or (
        isinstance(exc, RuntimeError) and "gloo" in str(exc).lower()
    )


@dataclass(frozen=True)
class _Process:
    pid: int
    start: str  # /proc/PID/stat start time: a reused pid is another process

    def alive(self) -> bool:
        return _proc_start(self.pid) == self.start


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _proc_start(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return None if fields is None or fields[0] in "ZX" else fields[19]


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` on this host runs (a zombie does not); without /proc, os.kill(pid, 0)."""
    if Path("/proc/self/stat").exists():
        return _proc_start(pid) is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _launcher_processes() -> list[_Process]:
    """The deepspeed launcher processes above this rank: its `launch` parent and the `deepspeed`
    runner above that (absent with --no_ssh on other nodes, or a pdsh/ssh hop). [] when the parent
    is no deepspeed launcher (srun, by hand, a test) or there is no /proc."""
    parent = os.getppid()
    if "deepspeed.launcher.launch" not in _cmdline(parent) or _proc_start(parent) is None:
        return []
    found = [_Process(parent, _proc_start(parent))]
    stat = _proc_stat(parent)
    grandparent = int(stat[1]) if stat else 0
    args = _cmdline(grandparent)
    if "deepspeed.launcher.runner" in args or any(Path(a).name == "deepspeed" for a in args[:2]):
        start = _proc_start(grandparent)
        if start is not None:
            found.append(_Process(grandparent, start))
    return found
