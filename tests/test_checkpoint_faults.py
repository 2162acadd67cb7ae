"""Checkpoint faults injected for real (issue 11): a process SIGKILLed at each stage of a checkpoint
write, a damaged newest checkpoint, a rerun into another run's folder, a resume into another model,
a full disk during a save. Each asserts what was reported and that nothing was lost: the resumed run
ends with the parameters of an uninterrupted one (one CPU rank is deterministic).

One rank, in-process (the same DeepSpeed save and load as a launched job, without the ~20 s launch);
a killed run is a forked child that SIGKILLs itself half-way through the write of one stage.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import assert_same_parameters
from data_fixtures import write_shard_folder
from test_convert_faults import small_disk

from xray_core.cli import describe_error
from xray_pretrain.config import load_config
from xray_pretrain.engine import checkpoint, init_weights
from xray_pretrain.engine.dist import LAUNCHER_VARIABLES
from xray_pretrain.engine.export import consolidated_state_dict
from xray_pretrain.engine.preflight import check_run
from xray_pretrain.engine.trainer import train

pytestmark = pytest.mark.slow

STEP2, STEP4 = checkpoint.tag_for_step(2), checkpoint.tag_for_step(4)
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL_FILE = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_fault_shards")
    write_shard_folder(root, splits={"train": 48, "val": 8}, size_hw=(64, 64), samples_per_shard=16)
    return root


def _config(shards: Path, out_dir: Path, *overrides: str):
    """4 steps, checkpoints at 2 and 4 (keep 3: both stay for the tests to damage)."""
    return load_config("tiny_cpu", [
        "model.image_size=[64,64]", "model.patch_size=8", f"data.shards=[{shards}]",
        f"log.out_dir={out_dir}", "log.progress=false", "data.num_workers=0", "data.val_num_samples=8",
        "train.steps=4", "train.global_batch=8", "train.micro_batch=8", "checkpoint.every=2",
        "checkpoint.keep_last=3", "log.every=1", "log.val_every=100", "log.image_every=100", *overrides,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory, one_cpu_thread):
    """The uninterrupted run every fault is compared with."""
    out = tmp_path_factory.mktemp("ckpt_reference")
    train(_config(shards, out))
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 2. killed during a checkpoint write ------------------------------------------------------------
STAGES = ("model_states", "optim_states", "marker", "latest")


def _die_half_way(path: Path, data: bytes) -> None:
    """Write the first half of `data` to `path`, on disk, then SIGKILL this process: a real crash."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def _train_and_die(cfg, stage: str) -> None:
    """In the child: train, and die half-way through `stage` of step 4's checkpoint."""
    # A one-rank group of its own (the parent's rendezvous variables name the parent's store).
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    torch.set_num_threads(1)
    if stage in ("model_states", "optim_states"):
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            name = str(getattr(f, "name", f))
            if STEP4 in name and name.endswith(f"{stage}.pt"):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                _die_half_way(Path(name), buffer.getvalue())
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    else:
        real_write = checkpoint.write_atomic
        target = checkpoint.COMPLETE_NAME if stage == "marker" else checkpoint.LATEST_NAME

        def write_atomic(path: Path, text: str) -> None:
            if path.name == target and STEP4 in str(path) + text:
                _die_half_way(path.with_name(path.name + ".tmp"), text.encode())
            real_write(path, text)

        checkpoint.write_atomic = write_atomic
    train(cfg)
    os._exit(0)  # not reached when the kill happened


def _run_killed(cfg, stage: str) -> int:
    """Train in a child that dies during `stage`; returns its exit code. Children fork from a
    forkserver that imported DeepSpeed once: a fork of pytest's process would inherit its process
    group (whose gloo threads do not survive a fork) and DeepSpeed's state bound to it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["xray_pretrain.engine.trainer", "deepspeed"])
    child = context.Process(target=_train_and_die, args=(cfg, stage))
    child.start()
    child.join(timeout=300)
    return child.exitcode


@pytest.mark.parametrize("stage", STAGES)
def test_killed_during_a_checkpoint_write_resumes_to_the_same_parameters(
    shards, reference, tmp_path, stage, capsys
):
    out = tmp_path / "run"
    assert _run_killed(_config(shards, out), stage) == -signal.SIGKILL
    ckpts = out / "checkpoints"
    # What the crash left: `latest` on the complete step 2, step 4 partial (or, killed while moving
    # `latest`, complete but not named).
    assert (ckpts / "latest").read_text() == STEP2
    checkpoint.check_intact(ckpts, STEP2)
    partial = {
        "model_states": ckpts / STEP4 / MODEL_FILE,
        "optim_states": ckpts / STEP4 / OPTIM_FILE,
        "marker": ckpts / STEP4 / "complete.json.tmp",
        "latest": ckpts / "latest.tmp",
    }[stage]
    assert partial.is_file()
    assert checkpoint.is_complete(ckpts / STEP4) == (stage == "latest")
    assert checkpoint.read_resume_point(ckpts).tag == STEP2

    capsys.readouterr()
    summary = train(_config(shards, out, "checkpoint.resume=auto"))
    printed = capsys.readouterr().out
    assert summary["steps"] == 4
    assert_same_parameters(reference, out, STEP4, f"after a kill during {stage}")
    # The partial one was cleaned up by the next save, and said so; nothing partial is left.
    assert f"removing checkpoint {ckpts / STEP4}" in printed
    assert checkpoint.complete_tags(ckpts) == [STEP2, STEP4]
    assert sorted(p.name for p in ckpts.rglob("*.tmp")) == []
    assert (ckpts / "latest").read_text() == STEP4
    checkpoint.check_intact(ckpts, STEP4)


# ---- a damaged newest checkpoint ---------------------------------------------------------------------
def test_resume_skips_a_damaged_newest_checkpoint_and_says_why(shards, reference, tmp_path, capsys):
    out = _copy_run(reference, tmp_path / "run")
    optim = out / "checkpoints" / STEP4 / OPTIM_FILE
    written = optim.stat().st_size
    os.truncate(optim, written // 2)

    capsys.readouterr()
    summary = train(_config(shards, out, "checkpoint.resume=auto"))
    printed = capsys.readouterr().out
    assert (
        f"resuming from {STEP2}: skipped damaged {STEP4} ({OPTIM_FILE} has {written // 2:,} bytes, "
        f"{written:,} were written)" in printed
    )
    assert summary["steps"] == 4
    assert_same_parameters(reference, out, STEP4, "after skipping a damaged checkpoint")


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_same_size_damage_is_found_by_the_checksum_of_the_newest_only(reference, tmp_path):
    ckpts = _copy_run(reference, tmp_path / "run") / "checkpoints"
    _flip_byte(ckpts / STEP4 / MODEL_FILE, 1000)
    point = checkpoint.read_resume_point(ckpts)
    assert point.tag == STEP2
    # Sizes are all a resume checks of the others: same-size damage to an older one is left to its turn.
    _flip_byte(ckpts / STEP2 / OPTIM_FILE, 1000)
    with pytest.raises(ValueError, match=f"no checkpoint under {ckpts} verifies: {STEP4} .*sha256.*{STEP2}"):
        checkpoint.read_resume_point(ckpts)


@pytest.mark.parametrize("damage", ["missing", "empty", "flipped"])
def test_export_and_init_weights_of_a_damaged_checkpoint_are_one_clear_line(reference, tmp_path, damage):
    ckpts = _copy_run(reference, tmp_path / "run") / "checkpoints"
    optim = ckpts / STEP4 / OPTIM_FILE
    if damage == "missing":
        optim.unlink()
        why = f"{OPTIM_FILE} is missing"
    elif damage == "empty":
        os.truncate(optim, 0)
        why = f"{OPTIM_FILE} has 0 bytes"
    else:
        _flip_byte(optim, optim.stat().st_size // 2)
        why = f"{OPTIM_FILE} differs from what was written \\(sha256\\)"
    expected = f"checkpoint {ckpts / STEP4} is damaged: {why}.*; use an earlier one: {ckpts / STEP2}$"
    from xray_pretrain.inference import export_checkpoint

    with pytest.raises(ValueError, match=expected):
        export_checkpoint(ckpts, tmp_path / "export")
    with pytest.raises(ValueError, match=expected):
        init_weights.open_source(ckpts)
    assert not (tmp_path / "export").exists()


def test_a_checkpoint_without_manifest_that_cannot_be_read_is_one_clear_line(reference, tmp_path):
    """Checkpoints written before manifests existed: their read errors still become one line."""
    ckpts = _copy_run(reference, tmp_path / "run") / "checkpoints"
    (ckpts / STEP4 / "manifest.json").unlink()
    os.truncate(ckpts / STEP4 / OPTIM_FILE, 0)
    with pytest.raises(ValueError, match=f"checkpoint {ckpts / STEP4} cannot be read .*missing or damaged"):
        consolidated_state_dict(ckpts, STEP4)


# ---- a rerun into an existing run folder; a resume into another model -------------------------------
def test_a_rerun_into_a_folder_with_checkpoints_is_refused_before_any_work(shards, reference, tmp_path):
    out = _copy_run(reference, tmp_path / "run")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    script = shutil.which("xray-pretrain") or str(Path(sys.executable).with_name("xray-pretrain"))
    overrides = [
        f"data.shards=[{shards}]", f"log.out_dir={out}", "model.image_size=[64,64]", "model.patch_size=8",
    ]  # fmt: skip
    proc = subprocess.run(
        [script, "pretrain", "--config", "tiny_cpu", *overrides], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"xray-pretrain pretrain: error: log.out_dir={out} holds checkpoints of a run ({STEP2}, {STEP4}): "
        "resume it with checkpoint.resume=auto, or choose another log.out_dir"
    )
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_pruning_and_clean_up_touch_only_this_runs_checkpoints(tmp_path):
    def make(step, run_id, complete=True):
        tag_dir = tmp_path / checkpoint.tag_for_step(step)
        tag_dir.mkdir()
        if complete:
            (tag_dir / checkpoint.COMPLETE_NAME).write_text(json.dumps({"step": step, "run_id": run_id}))

    make(35, "old"), make(40, "old")  # another run's, in the same folder
    for step in (5, 10, 15):
        make(step, "new")
    make(20, "new", complete=False)  # a save of this run that did not finish
    checkpoint.prune(tmp_path, keep_last=2, run_id="new")
    checkpoint._remove_stale(tmp_path, checkpoint.tag_for_step(25), "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        checkpoint.tag_for_step(s) for s in (10, 15, 35, 40)
    ]
    with pytest.raises(ValueError, match="holds another run's checkpoint: choose another log.out_dir"):
        checkpoint._remove_stale(tmp_path, checkpoint.tag_for_step(35), "new")


def test_resume_into_another_model_names_the_keys_that_differ(shards, reference, tmp_path):
    out = _copy_run(reference, tmp_path / "run")
    cfg = _config(shards, out, "checkpoint.resume=auto", "model.image_size=[128,128]", "model.embed_dim=384")
    with pytest.raises(ValueError) as raised:
        check_run(cfg, world_size=1)
    assert describe_error(raised.value) == (
        f"cannot resume {out / 'checkpoints' / STEP4}: it holds another model: "
        "model.image_size=[128, 128] (checkpoint: [64, 64]), model.embed_dim=384 (checkpoint: 96); "
        "resume with the checkpoint's settings, or start a new run in another log.out_dir "
        "(init.weights=DIR loads its weights into another image size)"
    )
    check_run(_config(shards, out, "checkpoint.resume=auto", "model.attn=math"), world_size=1)  # same model


# ---- 8. disk full during a checkpoint save ------------------------------------------------------------
@contextmanager
def _limited_disk(ckpts: Path, disk_bytes: int, file_bytes: int, prepare):
    """ENOSPC past `disk_bytes` in `ckpts` (a tmpfs; as root), else EFBIG for any file over
    `file_bytes` (RLIMIT_FSIZE); `prepare()` runs before the limit holds. Yields (kind, make_room)."""
    with small_disk(ckpts, disk_bytes) as disk:
        prepare()
        if disk is not None:
            yield "tmpfs", lambda: subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
            return
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, limits[1]))
        try:
            yield "rlimit", lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, previous)


def test_disk_full_during_a_save_is_one_clear_error_and_a_rerun_completes(shards, reference, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    step2 = reference / "checkpoints" / STEP2
    size = sum(p.stat().st_size for p in step2.iterdir())

    def at_step2():  # a run at step 2 whose next save finds the disk full
        shutil.copytree(step2, ckpts / STEP2)
        (ckpts / "latest").write_text(STEP2)

    # Room for step 2 and half of another: step 4's optimizer file (the largest) does not fit.
    limits = (size * 3 // 2, (step2 / OPTIM_FILE).stat().st_size - 1)
    with _limited_disk(ckpts, *limits, prepare=at_step2) as (kind, make_room):
        with pytest.raises(OSError) as raised:
            train(_config(shards, out, "checkpoint.resume=auto"))
        cause = "No space left on device" if kind == "tmpfs" else "File too large"
        assert describe_error(raised.value) == (
            f"checkpoint {ckpts / STEP4} was not written ({ckpts / STEP4 / OPTIM_FILE}: {cause}); "
            f"`latest` still names {STEP2}; free space (or raise the limit), then rerun with "
            "checkpoint.resume=auto"
        )
        assert (ckpts / "latest").read_text() == STEP2
        assert not (ckpts / STEP4).exists()  # the partial one is gone, its space freed
        checkpoint.check_intact(ckpts, STEP2)

        make_room()
        summary = train(_config(shards, out, "checkpoint.resume=auto"))
        assert summary["steps"] == 4
        assert_same_parameters(reference, out, STEP4, f"after a full disk ({kind}) and a rerun")


def test_a_two_rank_manifest_lists_every_ranks_files_and_verifies(zero2_run):
    """The shared 2-rank ZeRO-2 run: each rank hashed what it wrote; rank 0's manifest has them all."""
    ckpts = zero2_run[0] / "checkpoints"
    tag = (ckpts / "latest").read_text()
    files = json.loads((ckpts / tag / "manifest.json").read_text())["files"]
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} | {MODEL_FILE} <= set(files)
    assert set(files) == {p.name for p in (ckpts / tag).iterdir()} - {"manifest.json", "complete.json"}
    checkpoint.check_intact(ckpts, tag)
