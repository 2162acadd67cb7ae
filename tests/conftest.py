"""Shared, expensive fixtures: phantom shards and trained DeepSpeed runs, built once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT.parent / "shared" / "cxr-corpus"
TINY_CONFIG = "tiny_cpu"  # packaged config


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny models run thousands of small ops: on a shared 2-core runner, two OpenMP threads waiting
    on each other at every op made a 0.4 s test take 10-20 s. One thread is faster and stable."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def corpus_or_skip() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"real chest X-ray corpus not found at {CORPUS} (it lives beside the repo in ../shared)")
    return CORPUS


@pytest.fixture(scope="session")
def phantom_shards(tmp_path_factory) -> Path:
    """~160 phantom DICOMs converted to png16 shards (train/val/test by patient), long side 64."""
    from data_tools.convert import convert
    from data_tools.synth import synthesize

    root = tmp_path_factory.mktemp("phantoms")
    synthesize(root / "dicom", num_images=160, size=96, seed=7, progress=False)
    convert(
        root / "dicom",
        root / "shards",
        source="csv",
        image_format="png16",
        long_side=64,
        num_workers=2,
        progress=False,
    )
    return root / "shards"


def base_overrides(out_dir: Path, shards: Path) -> list[str]:
    """The tiny test run's overrides of the packaged tiny config (every launcher's tests share them)."""
    return [
        "model.image_size=[64,64]",  # the test shards' size; 64 tokens as in the demo
        "model.patch_size=8",
        f"data.shards=[{shards}]",
        f"log.out_dir={out_dir}",
        "log.progress=false",
        "data.num_workers=1",
        "data.val_num_samples=16",
    ]


def run_training(out_dir: Path, shards: Path, ranks: int, overrides: list[str]) -> dict:
    """Launch `xray-pretrain pretrain` under the deepspeed launcher (N CPU ranks); returns its summary."""
    from xray_pretrain.engine.launch import launch_training

    out_dir.mkdir(parents=True, exist_ok=True)
    launch_training(TINY_CONFIG, base_overrides(out_dir, shards) + overrides, ranks, out_dir / "train.log")
    return json.loads((out_dir / "train_summary.json").read_text())


# Run A: the reference 2-rank ZeRO-2 run, 16 steps, checkpoints at 8 and 16.
ZERO2_STEPS = [
    "train.steps=16",
    "checkpoint.every=8",
    "checkpoint.keep_last=3",
    "log.every=1",
    "log.val_every=8",
    "log.image_every=8",
]


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory, phantom_shards) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zero2")
    summary = run_training(out, phantom_shards, 2, ["train.zero_stage=2", *ZERO2_STEPS])
    return out, summary


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, phantom_shards) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zero3")
    summary = run_training(
        out, phantom_shards, 2, ["train.zero_stage=3", "train.steps=16", "checkpoint.every=16", "log.every=1"]
    )
    return out, summary


def logged_steps(run: Path) -> list[int]:
    """The optimizer steps a run folder's metrics.jsonl logged a training loss for, in order."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [row["step"] for row in map(json.loads, path.read_text().splitlines()) if "train/loss" in row]


def copy_checkpoint(src_run: Path, tag: str, dst_run: Path) -> None:
    """Seed a new run folder with one checkpoint of another run (as a requeued job would find it)."""
    dst = dst_run / "checkpoints"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src_run / "checkpoints" / tag, dst / tag)
    (dst / "latest").write_text(tag)


def predict_shard_sources(checkpoint: Path, shards: Path, keys: list[str], capsys) -> list[dict]:
    """`xray-pretrain predict` on the source files the shard samples `keys` were converted from (the
    folder's id_map.csv): its JSON lines, checked to come one per file, in input order, exit 0."""
    import csv

    from xray_pretrain.cli import main as cli_main

    source_of = {r["key"]: r["source_path"] for r in csv.DictReader(open(shards / "id_map.csv"))}
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", str(checkpoint), *(source_of[k] for k in keys)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == [source_of[k] for k in keys]
    return lines


def assert_same_parameters(reference: Path, run: Path, tag: str, after: str) -> None:
    """The consolidated parameters of two runs' checkpoints `tag` agree (CPU runs are deterministic)."""
    import torch

    from xray_pretrain.engine.export import consolidated_state_dict

    a = consolidated_state_dict(reference / "checkpoints", tag)
    b = consolidated_state_dict(run / "checkpoints", tag)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            b[name], a[name], rtol=1e-5, atol=1e-6, msg=f"parameter {name} differs {after}"
        )
