"""`xray-pretrain check-config --config FILE_OR_NAME [section.key=value ...]`: resolve, validate, print.

Validates what a run would check before it starts: the config itself, the shard folders and their
splits, the batch arithmetic at this world size (WORLD_SIZE, default 1) and the output folder.
"""

from __future__ import annotations

from xray_pretrain.commands import add_config_arguments

add_arguments = add_config_arguments


def run(args) -> int:
    import yaml

    from xray_pretrain.config import load_config
    from xray_pretrain.engine.preflight import check_run

    cfg = load_config(args.config, args.overrides)
    check_run(cfg)  # the shard folders, splits, batch arithmetic and output folder too
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0
