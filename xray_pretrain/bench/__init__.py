"""Benchmarks run from the CLI: `xray-pretrain bench step` (MAE training steps, torch only) and
`xray-pretrain bench loader` (training-loader throughput on real shards)."""

from __future__ import annotations

import importlib

BENCHES = {"step": "xray_pretrain.bench.step", "loader": "xray_pretrain.bench.loader"}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module in BENCHES.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=f"benchmark: {name}"))


def run(args) -> int:
    return int(importlib.import_module(BENCHES[args.bench]).run(args) or 0)
