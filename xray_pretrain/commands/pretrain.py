"""`xray-pretrain pretrain --config FILE_OR_NAME [section.key=value ...]`: MAE pre-training.

One plain process, or one process per rank under the `deepspeed` launcher.
"""

from __future__ import annotations

from xray_pretrain.commands import add_config_arguments, install_preemption_handler, train_and_report

add_arguments = add_config_arguments


def run(args) -> int:
    install_preemption_handler()
    from xray_pretrain.config import load_config

    return train_and_report(load_config(args.config, args.overrides))
