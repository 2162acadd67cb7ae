"""DeepSpeed checkpoints that a crash can never leave half-referenced.

Layout under `<out_dir>/checkpoints/`:

    step00000100/            one DeepSpeed checkpoint (any ZeRO stage), written by every rank
        manifest.json        every file's size and sha256, hashed while written (engine/manifest.py)
        complete.json        written by rank 0 only after ALL ranks finished writing (barrier) and the
                             manifest is down; it holds the run id of the run that wrote it
        run_config.json      the resolved run config, for `export` and for resuming
    latest                   the tag of the newest complete checkpoint, replaced atomically
    best/                    the checkpoint that scored best on validation (tasks that select one);
                             never pruned, replaced by a rename once the new one is complete
    universal/stepNNNNNNNN/  made on demand when a run resumes at another world size (DeepSpeed's
                             universal format: ZeRO partitions merged, loadable by any number of ranks)

`latest` is the authority on where a run stands: DeepSpeed's own `latest` writing is off
(`save_latest=False`; DeepSpeed only reads that file when given no tag, and every load here names its
tag), and ours is replaced by an atomic rename after the marker, so a process dying at any point of a
save leaves `latest` on the previous complete checkpoint. A resume loads `latest`'s checkpoint when it
verifies, else the newest older one that does (saying which it skipped and why); checkpoints newer than
`latest` belong to a save that did not finish, or to a history this run abandoned by resuming an
earlier step, and the next save removes them, as it removes incomplete folders.

A save that fails on any rank (a full disk, a file-size limit) fails on every rank together, leaves
`latest` as it was, and removes what it wrote. Pruning removes only checkpoints whose marker carries
this run's id (a resumed run keeps its id), never another run's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xray_pretrain.collectives import all_gather_objects
from xray_pretrain.engine.manifest import (
    recording_engine,
    verify_checksums,
    verify_sizes,
    write_atomic,
    write_file,
    write_manifest,
)

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


def read_resume_point(path: Path, rank: int = 0, world_size: int = 1) -> ResumePoint:
    """Where a resume loads from: a tag folder, verified; or under a checkpoints root, `latest`'s
    checkpoint when it verifies, else the newest older one that does (skipped ones are printed with
    the reason). Every rank calls this: the checksums are split over the ranks and agreed on.
    ValueError when nothing verifies."""
    path = Path(path)
    if (TAG_RE.match(path.name) or path.name == BEST_TAG) and path.is_dir():
        root, tag = resolve_checkpoint(path)
        reason = _damage(path, rank, world_size)
        if reason is not None:
            raise ValueError(f"checkpoint {path} is damaged: {reason}; resume from an earlier checkpoint")
    else:
        root, tag = path, None
        skipped = []
        for candidate in _candidates(path):
            reason = _damage(path / candidate, rank, world_size)
            if reason is None:
                tag = candidate
                break
            skipped.append(f"{candidate} ({reason})")
        if tag is None:
            raise ValueError(
                f"no checkpoint under {path} verifies: {'; '.join(skipped) or 'none is complete'}"
            )
        if skipped and rank == 0:
            print(f"resuming from {tag}: skipped damaged {', '.join(skipped)}", flush=True)
    info = json.loads((root / tag / COMPLETE_NAME).read_text())
    return ResumePoint(root, tag, info.get("world_size"), int(info.get("samples_seen", 0)))


def read_inference_info(root: Path, tag: str) -> dict:
    """A checkpoint's inference.json ({} for one written before it existed)."""
    path = Path(root) / tag / INFERENCE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def check_intact(root: Path, tag: str) -> None:
    """Every file of checkpoint `tag` against its manifest (sizes and checksums), for the one-process
    readers (export, init.weights, predict). ValueError naming the damage and the newest checkpoint
    whose sizes verify. No collective: any one process may call it, with or without a group."""
    reason = verify_sizes(root / tag) or verify_checksums(root / tag)
    if reason is not None:
        intact = [t for t in _candidates(root) if t != tag and verify_sizes(root / t) is None]
        instead = f"use an earlier one: {root / intact[0]}" if intact else "no other checkpoint is intact"
        raise ValueError(f"checkpoint {root / tag} is damaged: {reason}; {instead}")


def _candidates(root: Path) -> list[str]:
    """Complete tags a resume may load, newest first: those up to `latest` (newer ones are a save
    that did not finish its `latest`, or a history abandoned by resuming an earlier step)."""
    tags = complete_tags(root)
    latest = root / LATEST_NAME
    named = latest.read_text().strip() if latest.is_file() else None
    if named in tags:
        tags = [t for t in tags if t <= named]
    return tags[::-1]


def _damage(tag_dir: Path, rank: int, world_size: int) -> str | None:
    """Why `tag_dir` cannot be loaded (None: it can): sizes, then this rank's share of the checksums;
    agreed over the ranks (one collective)."""
    reason = verify_sizes(tag_dir) or verify_checksums(tag_dir, rank, world_size)
    return next((r for r in all_gather_objects(reason) if r is not None), None)


ARCHITECTURE_KEYS = (
    "image_size", "patch_size", "stem", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
    "decoder_dim", "decoder_depth", "decoder_heads",
)  # fmt: skip
INIT_ADOPTED_KEYS = ("patch_size", "stem", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")


def check_resume_model(cfg, tag_dir: Path, init_pending: bool = False) -> None:
    """ValueError naming every `model.*` key (and the task) where this run differs from the checkpoint
    it resumes: their weights would not load, or load into another model. `init_pending`: the encoder
    shape is still to be adopted from `init.weights`, so those keys are left to the trainer's check."""
    from xray_pretrain.config import config_from_dict

    theirs = config_from_dict(json.loads((tag_dir / CONFIG_NAME).read_text()))
    ours_arch, their_arch = _architecture(cfg.model), _architecture(theirs.model)
    skip = INIT_ADOPTED_KEYS if init_pending else ()
    diffs = [f"task={cfg.task} (checkpoint: {theirs.task})"] if cfg.task != theirs.task else []
    diffs += [
        f"model.{key}={ours_arch[key]} (checkpoint: {their_arch[key]})"
        for key in ARCHITECTURE_KEYS
        if key not in skip and ours_arch[key] != their_arch[key]
    ]
    if diffs:
        raise ValueError(
            f"cannot resume {tag_dir}: it holds another model: {', '.join(diffs)}; resume with the "
            "checkpoint's settings, or start a new run in another log.out_dir (init.weights=DIR loads "
            "its weights into another image size)"
        )


def _architecture(model) -> dict:
    embed_dim, depth, num_heads = model.encoder_dims()
    values = {key: getattr(model, key) for key in ARCHITECTURE_KEYS if hasattr(model, key)}
    return {**values, "image_size": list(model.image_hw()), "embed_dim": embed_dim, "depth": depth,
            "num_heads": num_heads}  # fmt: skip


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


def new_run_id() -> str:
    """An id for a new run's whole history (a resumed run keeps it), the same on every rank."""
    return all_gather_objects(uuid.uuid4().hex)[0]


def run_id_of(tag_dir: Path) -> str:
    """The id of the run that wrote a complete checkpoint ("" for one written before ids existed: a
    run resumed from it continues with "")."""
    return str(json.loads((tag_dir / COMPLETE_NAME).read_text()).get("run_id", ""))


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

    `client_state["run_id"]` names this run (pruning and clean-up touch only its checkpoints).
    `inference`: what inference needs besides the weights (label names, thresholds, intensity ...),
    written as inference.json beside the weights. A failed write raises `CheckpointWriteError` on
    every rank, `latest` unchanged."""
    tag = tag_for_step(step)
    run_id = client_state["run_id"]
    error = None
    if rank == 0:
        try:
            _remove_stale(ckpt_dir, tag, run_id)
        except ValueError as err:
            error = err
    _raise_if_any_failed(error, ckpt_dir, tag)  # also the barrier: nothing is written before the removal
    records = _write_engine_files(engine, ckpt_dir, tag, client_state, rank)
    error = None
    if rank == 0:
        try:
            _write_sidecars(ckpt_dir / tag, step, client_state, run_config, inference, records)
            write_atomic(ckpt_dir / LATEST_NAME, tag)
        except OSError as err:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            error = err
        else:
            prune(ckpt_dir, keep_last, run_id)
    _raise_if_any_failed(error, ckpt_dir, tag)
    return tag


def save_best(
    engine, ckpt_dir: Path, step: int, client_state: dict, run_config: dict, rank: int, inference: dict
) -> None:
    """Write `best/` (every rank), replacing the previous one only once the new one is complete:
    written as `best.partial`, then renamed; a crash leaves the old `best` or the new one."""
    partial = f"{BEST_TAG}.partial"
    if rank == 0:
        shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
    _raise_if_any_failed(None, ckpt_dir, partial)  # the barrier: nothing is written before the removal
    records = _write_engine_files(engine, ckpt_dir, partial, client_state, rank)
    error = None
    if rank == 0:
        try:
            _write_sidecars(ckpt_dir / partial, step, client_state, run_config, inference, records)
        except OSError as err:
            shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
            error = err
        else:
            old = ckpt_dir / f"{BEST_TAG}.old"
            shutil.rmtree(old, ignore_errors=True)
            if (ckpt_dir / BEST_TAG).exists():
                os.replace(ckpt_dir / BEST_TAG, old)
            os.replace(ckpt_dir / partial, ckpt_dir / BEST_TAG)
            shutil.rmtree(old, ignore_errors=True)
    _raise_if_any_failed(error, ckpt_dir, partial)


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (one line: what failed, what is kept, what to do)."""


def _write_engine_files(engine, ckpt_dir: Path, tag: str, client_state: dict, rank: int) -> dict:
    """DeepSpeed's files of `tag` on every rank; returns {name: {bytes, sha256}} over all ranks.
    Any rank's failure fails all of them together (rank 0 removes the partial folder)."""
    recorder = recording_engine(engine)
    recorder.start()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    parts = all_gather_objects((recorder.files, recorder.error))
    error = next((err for _, err in parts if err is not None), None)
    if error is not None and rank == 0:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    _raise_if_any_failed(error, ckpt_dir, tag, agreed=True)
    return {name: record for files, _ in parts for name, record in files.items()}


def _raise_if_any_failed(error: Exception | None, ckpt_dir: Path, tag: str, agreed: bool = False) -> None:
    """Raise on every rank if any rank's `error` is set (`agreed`: it already is the same on every
    rank): an OSError as CheckpointWriteError, anything else as it is."""
    if not agreed:
        error = next((e for e in all_gather_objects(error) if e is not None), None)
    if error is None:
        return
    if not isinstance(error, OSError):
        raise error
    cause = f"{error.filename}: {os.strerror(error.errno)}" if error.errno and error.filename else str(error)
    latest = ckpt_dir / LATEST_NAME
    kept = f"`latest` still names {latest.read_text().strip()}" if latest.is_file() else "no checkpoint kept"
    raise CheckpointWriteError(
        f"checkpoint {ckpt_dir / tag} was not written ({cause}); {kept}; free space (or raise the "
        "limit), then rerun with checkpoint.resume=auto"
    ) from error


def _remove_stale(ckpt_dir: Path, tag: str, run_id: str) -> None:
    """Before writing `tag`: remove incomplete checkpoints (saves that did not finish) and this run's
    checkpoints from `tag` on (a save that did not reach `latest`, or a history abandoned by
    resuming an earlier step). Another run's complete checkpoint in the way is an error."""
    if not ckpt_dir.is_dir():
        return
    for path in sorted(ckpt_dir.iterdir()):
        if not TAG_RE.match(path.name) or (path.name < tag and is_complete(path)):
            continue
        if not is_complete(path):
            why = "incomplete: a save that did not finish"
        elif run_id_of(path) == run_id:
            why = "at or after this save's step in this run: a save that did not reach `latest`"
        elif path.name == tag:
            raise ValueError(f"{path} holds another run's checkpoint: choose another log.out_dir")
        else:
            continue
        print(f"removing checkpoint {path} ({why})", flush=True)
        shutil.rmtree(path, ignore_errors=True)


def _write_sidecars(
    tag_dir: Path, step: int, client: dict, run_config: dict, inference: dict | None, records: dict
) -> None:
    """Rank 0's files of a checkpoint, after every rank's: configs, then the manifest of all files,
    then (last: its presence says the folder is whole) the completion marker."""
    sidecars = {CONFIG_NAME: run_config} | ({INFERENCE_NAME: inference} if inference is not None else {})
    for name, content in sidecars.items():
        text = json.dumps(content, indent=2).encode()
        records[name] = write_file(tag_dir / name, lambda f, text=text: f.write(text))
    write_manifest(tag_dir, records)
    write_atomic(tag_dir / COMPLETE_NAME, json.dumps({"step": step, **_jsonable(client)}))


def prune(ckpt_dir: Path, keep_last: int, run_id: str) -> None:
    """Delete all but the newest `keep_last` complete checkpoints of run `run_id`; other runs' are
    never touched (nor `best`)."""
    ours = [tag for tag in complete_tags(ckpt_dir) if run_id_of(ckpt_dir / tag) == run_id]
    for tag in ours[:-keep_last]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load(engine, ckpt_root: Path, tag: str, module_only: bool = False) -> dict:
    """Load model, optimizer and client state (`module_only`: the weights alone); returns the client
    state. A file that cannot be read (a checkpoint older than manifests, damaged) is a ValueError."""
    try:
        load_path, client_state = engine.load_checkpoint(
            str(ckpt_root),
            tag=tag,
            load_module_only=module_only,
            load_optimizer_states=not module_only,
            load_lr_scheduler_states=not module_only,
        )
    except Exception as err:
        raise_if_unreadable(err, ckpt_root / tag)
        raise
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}: is it a checkpoint?")
    return client_state or {}


def raise_if_unreadable(err: Exception, tag_dir: Path) -> None:
    """Turn an error raised while deserializing a checkpoint file (missing, empty, cut, damaged) into
    one ValueError naming the folder; other errors are bugs and keep their traceback."""
    import pickle
    import traceback

    in_torch_load = any(
        frame.f_code.co_filename.endswith(os.path.join("torch", "serialization.py"))
        for frame, _ in traceback.walk_tb(err.__traceback__)
    )
    if isinstance(err, (EOFError, pickle.UnpicklingError, FileNotFoundError)) or in_torch_load:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"checkpoint {tag_dir} cannot be read ({type(err).__name__}: {text}): a file is missing or "
            "damaged; use an earlier checkpoint"
        ) from err


def _jsonable(state: dict) -> dict:
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))}
