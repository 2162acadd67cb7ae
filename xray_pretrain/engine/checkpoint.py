"""DeepSpeed checkpoints that a crash can never leave half-referenced.

Layout under `<out_dir>/checkpoints/`:

    step00000100/            one DeepSpeed checkpoint (any ZeRO stage), written by every rank
        complete.json        written by rank 0 only after ALL ranks finished writing (barrier)
        run_config.json      the resolved run config, for `export` and for resuming
    latest                   the tag of the newest complete checkpoint, replaced atomically
    best/                    the checkpoint that scored best on validation (tasks that select one);
                             never pruned, replaced by a rename once the new one is complete
    universal/stepNNNNNNNN/  made on demand when a run resumes at another world size (DeepSpeed's
                             universal format: ZeRO partitions merged, loadable by any number of ranks)

`latest` is written with DeepSpeed's own `save_latest=False` and then replaced by an atomic rename
after the barrier, so a node dying mid-write leaves `latest` on the previous complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE_NAME = "complete.json"
CONFIG_NAME = "run_config.json"
LATEST_NAME = "latest"
UNIVERSAL_DIR = "universal"
BEST_TAG = "best"
INFERENCE_NAME = "inference.json"  # what inference needs without the shards (labels, thresholds, ...)


@dataclass(frozen=True)
class ResumePoint:
    root: Path  # the folder DeepSpeed loads from (the checkpoints folder, or its universal/ copy)
    tag: str
    world_size: int | None  # ranks that wrote it (None: not recorded)
    samples_seen: int = 0  # its data position: the train loader starts there


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE_NAME).is_file()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and is_complete(p)]
    return sorted(tags)


def resolve_checkpoint(path: Path) -> tuple[Path, str]:
    """(checkpoint root, tag) for a root folder (uses `latest`) or a tag folder.

    Falls back to the newest complete tag when `latest` is missing or names an incomplete one.
    """
    path = Path(path)
    if (TAG_RE.match(path.name) or path.name == BEST_TAG) and path.is_dir():
        if not is_complete(path):
            raise ValueError(f"{path} is an incomplete checkpoint (no {COMPLETE_NAME}); use an earlier one")
        return path.parent, path.name
    latest = path / LATEST_NAME
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(path / tag):
            return path, tag
    tags = complete_tags(path)
    if not tags:
        raise ValueError(f"no complete checkpoint under {path}")
    return path, tags[-1]


def read_resume_point(path: Path) -> ResumePoint:
    """Where a resume would load from, and how many ranks wrote that checkpoint."""
    root, tag = resolve_checkpoint(path)
    info = json.loads((root / tag / COMPLETE_NAME).read_text())
    return ResumePoint(root, tag, info.get("world_size"), int(info.get("samples_seen", 0)))


def read_inference_info(root: Path, tag: str) -> dict:
    """A checkpoint's inference.json ({} for one written before it existed)."""
    path = Path(root) / tag / INFERENCE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def ensure_universal(point: ResumePoint, rank: int) -> ResumePoint:
    """The same checkpoint in DeepSpeed's universal format (converted once, by rank 0), so that a run
    can resume with a different number of ranks: ZeRO optimizer partitions are tied to the world size
    that wrote them, the universal format is not. Load it with ds config `checkpoint.load_universal`."""
    import torch.distributed as dist

    universal_root = point.root / UNIVERSAL_DIR
    target = universal_root / point.tag
    if rank == 0 and not is_complete(target):
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        partial = universal_root / f"{point.tag}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        ds_to_universal(argparse.Namespace(
            input_folder=str(point.root / point.tag), output_folder=str(partial), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        ))  # fmt: skip
        for name in (COMPLETE_NAME, CONFIG_NAME):
            shutil.copy2(point.root / point.tag / name, partial / name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    if dist.is_initialized():
        dist.barrier()
    return ResumePoint(universal_root, point.tag, None, point.samples_seen)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `rng_state` (the CUDA part only where this process has as many GPUs)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    client_state: dict,
    run_config: dict,
    rank: int,
    keep_last: int,
    inference: dict | None = None,
) -> str:
    """Write a checkpoint for `step` on every rank; rank 0 then marks it complete and moves `latest`.

    `inference`: what inference needs besides the weights (label names, thresholds, intensity ...),
    written as inference.json beside the weights."""
    import torch.distributed as dist

    tag = tag_for_step(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tag_dir = ckpt_dir / tag
        _write_sidecars(tag_dir, step, client_state, run_config, inference)
        _write_atomic(ckpt_dir / LATEST_NAME, tag)
        prune(ckpt_dir, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return tag


def save_best(
    engine, ckpt_dir: Path, step: int, client_state: dict, run_config: dict, rank: int, inference: dict
) -> None:
    """Write `best/` (every rank), replacing the previous one only once the new one is complete:
    written as `best.partial`, then renamed; a crash leaves the old `best` or the new one."""
    import torch.distributed as dist

    partial = f"{BEST_TAG}.partial"
    if rank == 0:
        shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _write_sidecars(ckpt_dir / partial, step, client_state, run_config, inference)
        old = ckpt_dir / f"{BEST_TAG}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (ckpt_dir / BEST_TAG).exists():
            os.replace(ckpt_dir / BEST_TAG, old)
        os.replace(ckpt_dir / partial, ckpt_dir / BEST_TAG)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def _write_sidecars(tag_dir: Path, step: int, client: dict, run_config: dict, inference: dict | None) -> None:
    (tag_dir / CONFIG_NAME).write_text(json.dumps(run_config, indent=2))
    if inference is not None:
        (tag_dir / INFERENCE_NAME).write_text(json.dumps(inference, indent=2))
    # Last: its presence says the folder is whole.
    _write_atomic(tag_dir / COMPLETE_NAME, json.dumps({"step": step, **_jsonable(client)}))


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete ones older than them."""
    tags = complete_tags(ckpt_dir)
    keep = set(tags[-keep_last:])
    oldest_kept = min(keep) if keep else None
    for path in ckpt_dir.iterdir():
        if (
            TAG_RE.match(path.name)
            and path.name not in keep
            and (oldest_kept is None or path.name < oldest_kept)
        ):
            shutil.rmtree(path, ignore_errors=True)


def load(engine, ckpt_root: Path, tag: str, module_only: bool = False) -> dict:
    """Load model, optimizer and client state (`module_only`: the weights alone); returns the client
    state."""
    load_path, client_state = engine.load_checkpoint(
        str(ckpt_root),
        tag=tag,
        load_module_only=module_only,
        load_optimizer_states=not module_only,
        load_lr_scheduler_states=not module_only,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    return client_state or {}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(state: dict) -> dict:
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))}
