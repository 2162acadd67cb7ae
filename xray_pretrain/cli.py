"""`xray-pretrain`: train, export, demo and benchmark.

    xray-pretrain pretrain --config configs/tiny_cpu.yaml train.steps=100 data.shards=[DIR]
    deepspeed --num_gpus 8 $(which xray-pretrain) pretrain --config configs/vitl_1280.yaml ...
    sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 slurm/pretrain.sbatch --config vitl_1280 ...
    xray-pretrain export --checkpoint RUN/checkpoints --out RUN/export
    xray-pretrain demo --out runs/demo
    xray-pretrain bench step --model large --image-size 1280 --patch 16 --batch-size 8 --device cuda
    xray-pretrain bench loader --shards DIR --backend dali

Heavy imports (DeepSpeed, DALI, pydicom) happen inside the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

BENCHES = {"step": "xray_pretrain.bench.step", "loader": "xray_pretrain.bench.loader"}


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends --local_rank=N; the rank comes from LOCAL_RANK instead."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file holding differences from the defaults")
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="e.g. train.steps=100 data.shards=[DIR]"
    )


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xray-pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_args(
        sub.add_parser("pretrain", help="MAE pre-training (one process, the deepspeed launcher, or srun)")
    )
    check = sub.add_parser("check-config", help="resolve and validate a config, print it, spawn nothing")
    _add_train_args(check)
    exp = sub.add_parser("export", help="consolidate a checkpoint's encoder into safetensors + config.json")
    exp.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoints folder (uses latest) or one step folder"
    )
    exp.add_argument("--out", required=True, type=Path)
    exp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    demo = sub.add_parser("demo", help="phantoms -> shards -> 2-rank ZeRO-2 MAE -> export, on the CPU")
    from xray_pretrain import demo as demo_module

    demo_module.add_arguments(demo)
    bench = sub.add_parser("bench", help="benchmarks: `bench step` (model) and `bench loader` (data)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module in BENCHES.items():
        bench_parser = bench_sub.add_parser(name, help=f"benchmark: {name}")
        if argv[:2] == ["bench", name]:  # import only the chosen benchmark's module
            importlib.import_module(module).add_arguments(bench_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(argv).parse_args(argv)
    try:
        return _run(args)
    except ValueError as err:  # user errors: one clear line, no traceback
        print(f"xray-pretrain: error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command in ("pretrain", "check-config"):
        from xray_pretrain.engine import preempt

        if args.command == "pretrain":
            preempt.install()  # before the heavy imports: an early USR1 must not kill the process
        from xray_pretrain.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "check-config":
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from xray_pretrain.engine.trainer import train

        summary = train(cfg)
        if summary["preempted"]:
            print(f"preempted: checkpoint at step {summary['steps']}; rerun to continue", flush=True)
            return preempt.PREEMPTED_EXIT_CODE
        if _is_rank0():
            out = Path(cfg.log.out_dir) / "train_summary.json"
            out.write_text(json.dumps(summary, indent=2))
            print(json.dumps(summary))
        return 0
    if args.command == "export":
        from xray_pretrain.engine.export import export_encoder

        config = export_encoder(args.checkpoint, args.out, args.dtype)
        print(
            f"exported {config['num_params']:,} encoder parameters ({config['checkpoint_tag']}) to {args.out}"
        )
        return 0
    if args.command == "demo":
        from xray_pretrain import demo

        return demo.run(args)
    if args.command == "bench":
        return int(importlib.import_module(BENCHES[args.bench]).run(args) or 0)
    raise AssertionError(args.command)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


if __name__ == "__main__":
    sys.exit(main())
