"""`xray-pretrain finetune --config FILE_OR_NAME [section.key=value ...]`: train a downstream task
(`task: classify` or `task: report`) on the same engine as pre-training, usually from `init.weights=RUN`.

One plain process, or one process per rank under the `deepspeed` launcher. The run selects its
checkpoint on validation (`checkpoints/best`: mean AUROC, or `report.select_metric`, BLEU-4 by default)
and writes the test metrics into `metrics.json`.
"""

from __future__ import annotations

from xray_pretrain.commands import add_config_arguments, install_preemption_handler, train_and_report

add_arguments = add_config_arguments


def run(args) -> int:
    install_preemption_handler()
    from xray_pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.task == "pretrain":
        raise ValueError(
            "finetune trains a downstream task: set task=classify or task=report (or run `pretrain`)"
        )
    return train_and_report(cfg)
