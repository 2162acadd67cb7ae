"""The install that cluster users make: a built wheel in a fresh environment, no source tree on the path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from xray_pretrain.engine.dist import without_launcher_variables

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a clean copy of the tree: a checkout's build/ and *.egg-info can hold stale files."""
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "tree"
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__")
    shutil.copytree(REPO_ROOT, source, ignore=skip)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        ".",
    ]
    built = subprocess.run(command, cwd=source, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("xray_pretrain-*.whl")
    return path


def test_wheel_holds_every_package_and_the_packaged_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "xray_pretrain/engine/__init__.py",
        "xray_pretrain/engine/trainer.py",
        "xray_pretrain/commands/pretrain.py",
        "xray_pretrain/configs/tiny_cpu.yaml",
        "xray_pretrain/configs/vitl_1280.yaml",
        "xray_pretrain/configs/report_phantom.yaml",
        "xray_pretrain/configs/deepspeed/zero1.json",
        "xray_pretrain/configs/deepspeed/zero2.json",
        "xray_pretrain/configs/deepspeed/zero3.json",
        "xray_core/shardio.py",
        "xray_core/cli.py",
        "data_tools/sources/nih_cxr14.py",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if "Requires-Dist" in line
    ]
    assert any("scikit-learn" in line and "extra" not in line for line in requires)


def test_installed_wheel_shards_and_trains_from_any_folder(wheel, tmp_path):
    """A fresh venv with the wheel; its dependencies come from the test environment through a .pth
    line (a path line, so the checkout's editable-install hook there is not run)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    work = tmp_path / "elsewhere"  # no source tree here or on the path
    work.mkdir()
    # no source tree on the path, and no rank variables an in-process test left in this process
    env = {k: v for k, v in without_launcher_variables(os.environ).items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", OMP_NUM_THREADS="1")

    def run(*args: str) -> str:
        done = subprocess.run([python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = json.loads(run("-c", "import json, xray_core, xray_pretrain, data_tools; "
                           "print(json.dumps([m.__file__ for m in (xray_core, xray_pretrain, data_tools)]))"))  # fmt: skip
    assert all(path.startswith(site) for path in where), where
    run("-m", "data_tools.cli", "synth", "--out", "phantoms", "--num", "24", "--size", "64", "--no-progress")
    run("-m", "data_tools.cli", "convert", "--input", "phantoms", "--out", "shards", "--long-side", "32",
        "--salt", "t", "--num-workers", "1", "--no-progress")  # fmt: skip
    run(
        "-m", "xray_pretrain.cli", "pretrain", "--config", "tiny_cpu", "data.shards=[shards]",
        "model.image_size=[32,32]", "model.patch_size=8", "train.steps=2", "train.global_batch=4",
        "train.micro_batch=4", "train.zero_stage=0", "log.out_dir=run", "log.progress=false",
        "data.num_workers=0", "data.val_num_samples=4", "checkpoint.every=2",
    )  # fmt: skip
    summary = json.loads((work / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and (work / "run" / "checkpoints" / "latest").is_file()
    # A report generator (random init: init.weights is tested elsewhere) and a report for a phantom
    # DICOM, all from the wheel. ZeRO-1 with report_phantom's frozen stem and first 2 blocks: the case
    # DeepSpeed's zero_to_fp32 alone cannot consolidate (it keeps frozen parameters only from ZeRO-2).
    run(
        "-m", "xray_pretrain.cli", "finetune", "--config", "report_phantom", "data.shards=[shards]",
        "model.image_size=[32,32]", "model.patch_size=8", "train.epochs=null", "train.steps=1",
        "train.global_batch=4", "train.micro_batch=4", "train.zero_stage=1", "log.out_dir=report",
        "log.progress=false", "data.num_workers=0", "report.meteor=false", "report.decoder_dim=16",
        "report.decoder_heads=2", "report.decoder_depth=1",
    )  # fmt: skip
    assert json.loads((work / "report" / "metrics.json").read_text())["test"]["test_num_reports"] > 0
    dicom = next((work / "phantoms").rglob("*.dcm"))
    line = json.loads(
        run("-m", "xray_pretrain.cli", "predict", "--checkpoint", "report", str(dicom)).splitlines()[-1]
    )
    assert line["task"] == "report" and line["file"] == str(dicom)
