"""What can be known about a run before any process group, model or file exists.

`check_run` is called by the commands (`pretrain`, `check-config`, ...) right after the config is
loaded: a missing shard folder, a split with no samples, batch sizes this world size cannot hold,
an output folder that cannot be written, a resume path that is not there, an output folder holding
another run's checkpoints (without a resume) or a resume into another model shape each become one
`ValueError` naming the fix, instead of a traceback after DeepSpeed has started and the run folder
exists. Reading a manifest is cheap (no idx file is opened here).
"""

from __future__ import annotations

import os
from pathlib import Path


def check_run(cfg, world_size: int | None = None) -> None:
    """Raise ValueError for the first input problem of this run; `world_size` defaults to the launcher's."""
    _check_shards(cfg.data)
    cfg.train.accum_steps(world_size or int(os.environ.get("WORLD_SIZE", "1")))
    check_writable_folder(Path(cfg.log.out_dir), "log.out_dir")
    resume = cfg.checkpoint.resume
    if resume not in ("none", "auto") and not Path(resume).exists():
        raise ValueError(f"checkpoint.resume={resume}: no such checkpoint folder (or use auto / none)")
    _check_checkpoints(cfg)


def _check_shards(data) -> None:
    from xray_pretrain.data.shards import open_folders

    for name in dict.fromkeys(data.shards + (data.val_shards or [])):
        if not Path(name).is_dir():
            raise ValueError(f"shard folder {name} does not exist (data.shards / data.val_shards)")
    checks = (
        (data.shards, data.train_split, "data.shards"),
        (data.val_shards or data.shards, data.val_split, None),
    )
    for folders, split, key in checks:
        opened = open_folders(folders)
        num = sum(int(folder.manifest.get("splits", {}).get(split, 0)) for folder in opened)
        if num == 0:
            where = ", ".join(str(f.path) for f in opened)
            raise ValueError(
                f"no samples in split {split!r} of {where}; "
                + ("check data.train_split" if key else "set data.val_shards or data.val_split")
            )
        for folder in opened:
            if not folder.intensity_std > 0:
                raise ValueError(
                    f"{folder.path}: intensity std is {folder.intensity_std} (an empty or constant "
                    "conversion); re-run `xray-shard convert` on the images"
                )


def _check_checkpoints(cfg) -> None:
    """A run folder that holds checkpoints is another run's unless this one resumes from it (a run
    must never mix with another); a resumed checkpoint must be of this run's model."""
    from xray_pretrain.engine import checkpoint

    ckpt_dir = Path(cfg.log.out_dir) / "checkpoints"
    held = checkpoint.complete_tags(ckpt_dir) + (
        [checkpoint.BEST_TAG] if checkpoint.is_complete(ckpt_dir / checkpoint.BEST_TAG) else []
    )
    resume = cfg.checkpoint.resume
    source = ckpt_dir if resume == "auto" else None if resume == "none" else Path(resume)
    if held and (source is None or not source.resolve().is_relative_to(ckpt_dir.resolve())):
        raise ValueError(
            f"log.out_dir={cfg.log.out_dir} holds checkpoints of a run ({', '.join(held[-3:])}): resume "
            "it with checkpoint.resume=auto, or choose another log.out_dir"
        )
    if source is None or (resume == "auto" and not held):
        return
    root, tag = checkpoint.resolve_checkpoint(source)
    checkpoint.check_resume_model(cfg, root / tag, init_pending=cfg.init.weights != "none")


def check_writable_folder(path: Path, key: str) -> None:
    """The folder exists and is writable, or can be created: its nearest existing parent is writable."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{key}={path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={path}: {existing} is not writable; choose a folder you can write to")
