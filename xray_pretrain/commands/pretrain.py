"""`xray-pretrain pretrain --config FILE_OR_NAME [section.key=value ...]`: MAE pre-training.

One plain process, or one process per rank under the `deepspeed` launcher.
"""

from __future__ import annotations

import json
from pathlib import Path

from xray_pretrain.commands import add_config_arguments, is_rank0

add_arguments = add_config_arguments


def run(args) -> int:
    from xray_pretrain.config import load_config
    from xray_pretrain.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    if is_rank0():
        (Path(cfg.log.out_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
    return 0
