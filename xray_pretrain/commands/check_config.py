"""`xray-pretrain check-config --config FILE_OR_NAME [section.key=value ...]`: resolve, validate, print."""

from __future__ import annotations

from xray_pretrain.commands import add_config_arguments

add_arguments = add_config_arguments


def run(args) -> int:
    import yaml

    from xray_pretrain.config import load_config

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False))
    return 0
