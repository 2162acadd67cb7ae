"""One module per `xray-pretrain` subcommand: `add_arguments(parser)` and `run(args) -> int`.

`xray_pretrain.cli` holds the table; `xray_core.cli` parses, dispatches and turns user errors into
one line. Heavy imports (DeepSpeed, DALI, pydicom) happen inside `run`.
"""

from __future__ import annotations

import argparse
import sys

# The run stopped on its own (non-finite steps, too many corrupt samples): summary "stopped" says why.
EXIT_STOPPED = 1


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE_OR_NAME` plus `section.key=value` overrides: every command that builds a run."""
    parser.add_argument(
        "--config", required=True, help="YAML file holding differences from the defaults, or a packaged name"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="e.g. train.steps=100 data.shards=[DIR]"
    )


def is_rank0() -> bool:
    """True in a plain process and on global rank 0 under a launcher (after the engine ran)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def install_preemption_handler() -> None:
    """Before the heavy imports of a training command: an early USR1/TERM must not kill the process."""
    from xray_pretrain.engine import preempt

    preempt.install()


def train_and_report(cfg) -> int:
    """Run the engine on `cfg`; rank 0 writes train_summary.json into the run folder and prints it.
    A preempted run returns preempt.PREEMPTED_EXIT_CODE (its checkpoint written, for the requeue)."""
    import json
    from pathlib import Path

    from xray_pretrain.engine.preflight import check_run

    check_run(cfg)  # bad inputs fail here, before DeepSpeed, a process group or the run folder

    from xray_pretrain.engine import preempt
    from xray_pretrain.engine.health import json_safe, non_finite_fields
    from xray_pretrain.engine.trainer import train

    summary = train(cfg)
    if summary["preempted"]:
        print(f"preempted: checkpoint at step {summary['steps']}; rerun to continue", flush=True)
        return preempt.PREEMPTED_EXIT_CODE
    # JSON has no NaN: a diverged loss is written as null and named in "non_finite".
    summary = {**json_safe(summary), "non_finite": non_finite_fields(summary)}
    if is_rank0():
        text = json.dumps(summary, indent=2, allow_nan=False)
        (Path(cfg.log.out_dir) / "train_summary.json").write_text(text)
        print(json.dumps(summary, allow_nan=False))
        if summary.get("stopped"):
            print(
                f"training stopped at step {summary['steps']}: {summary['stopped']}",
                file=sys.stderr,
                flush=True,
            )
    return EXIT_STOPPED if summary.get("stopped") else 0
