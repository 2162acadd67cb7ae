"""Preemption: a signal becomes an agreed, checkpointed stop.

Slurm warns a job before it ends it (`#SBATCH --signal=B:USR1@120`, or SIGTERM on preemption and
`scancel`). The signal reaches the ranks at different moments, and a rank that stopped alone would
leave the others waiting in a collective forever. So a handler only records that a signal came; at
each optimizer-step boundary every rank contributes its flag to one all-reduce, and all of them stop
at the same step, save one checkpoint together and exit with `PREEMPTED_EXIT_CODE`. The sbatch helper
(slurm/common.sh) then requeues the job, which resumes from that checkpoint.

A signal before the handlers are installed would kill the process (USR1's default action), so `install`
runs first thing in the CLI; a second signal changes nothing.
"""

from __future__ import annotations

import signal

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run it again to continue

_received: list[int] = []  # signal numbers; 0 for a stop asked for by `request_stop`


def _record(signum, _frame) -> None:
    _received.append(signum)  # first: a second signal may interrupt the print below
    if len(_received) == 1:
        print(f"received {signal.Signals(signum).name}: stopping at the next step boundary", flush=True)


def install() -> None:
    """Record USR1/TERM instead of dying on them (idempotent; main thread only, as Python requires)."""
    for signum in PREEMPT_SIGNALS:
        signal.signal(signum, _record)


def request_stop(reason: str) -> None:
    """The same agreed, checkpointed stop as a signal, asked for from inside the process (e.g. the
    launcher that would restart or collect this run is gone: engine/peers.py)."""
    _received.append(0)
    if len(_received) == 1:
        print(f"{reason}: stopping at the next step boundary", flush=True)


def requested_here() -> bool:
    """Whether this process received a preemption signal (no collective)."""
    return bool(_received)


def agreed_to_stop(device) -> bool:
    """Whether any rank received a preemption signal: one all-reduce, the same answer on every rank.
    Call it at the same point of the loop on every rank (an optimizer-step boundary)."""
    from xray_pretrain.collectives import all_reduce_sum

    return all_reduce_sum([float(requested_here())], device)[0] > 0
