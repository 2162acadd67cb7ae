"""`xray-pretrain`: train, export, demo and benchmark.

    xray-pretrain pretrain --config tiny_cpu train.steps=100 data.shards=[DIR]
    deepspeed --num_gpus 8 $(which xray-pretrain) pretrain --config vitl_1280 ...
    sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 slurm/pretrain.sbatch --config vitl_1280 ...
    xray-pretrain export --checkpoint RUN/checkpoints --out RUN/export
    xray-pretrain finetune --config classify_phantom init.weights=RUN data.shards=[DIR]
    xray-pretrain evaluate --checkpoint FT_RUN --split test --out FT_RUN/eval/test.json
    xray-pretrain predict --checkpoint FT_RUN image1.dcm image2.png
    xray-pretrain embed --checkpoint FT_RUN --shards DIR --out features.npz
    xray-pretrain demo --out runs/demo
    xray-pretrain bench step --config vitl_1280 model.size=large train.precision=bf16 --device cuda
    xray-pretrain bench loader --shards DIR --backend dali

Supported launchers: one plain process, `deepspeed` (one or many nodes), or `srun` (slurm/). Each subcommand is a
module (`xray_pretrain.commands`, `xray_pretrain.demo`, `xray_pretrain.bench`) run through
`xray_core.cli`, the convention shared with `xray-shard`.
"""

from __future__ import annotations

import sys

from xray_core.cli import Command
from xray_core.cli import main as cli_main

COMMANDS = {
    "pretrain": Command(
        "xray_pretrain.commands.pretrain", "MAE pre-training (one process, the deepspeed launcher, or srun)"
    ),
    "finetune": Command(
        "xray_pretrain.commands.finetune", "train a downstream task (classify) on the same engine"
    ),
    "evaluate": Command(
        "xray_pretrain.commands.evaluate", "a classifier's metrics on a whole split (+ per-sample CSV)"
    ),
    "predict": Command("xray_pretrain.commands.predict", "classify DICOM/PNG/JPEG files: one JSON line each"),
    "embed": Command("xray_pretrain.commands.embed", "one encoder feature vector per shard sample (.npz)"),
    "check-config": Command(
        "xray_pretrain.commands.check_config", "resolve and validate a config, print it, spawn nothing"
    ),
    "export": Command(
        "xray_pretrain.commands.export", "consolidate a checkpoint's encoder into safetensors + config.json"
    ),
    "demo": Command("xray_pretrain.demo", "phantoms -> shards -> 2-rank ZeRO-2 MAE -> export, on the CPU"),
    "bench": Command("xray_pretrain.bench", "benchmarks: `bench step` (model) and `bench loader` (data)"),
}


def strip_launcher_args(argv: list[str]) -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main("xray-pretrain", __doc__.splitlines()[0], COMMANDS, argv, prepare=strip_launcher_args)


if __name__ == "__main__":
    sys.exit(main())
