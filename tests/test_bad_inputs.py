"""Bad configuration and bad arguments: one clear error line, a non-zero exit, nothing started or written.

Every case runs the real CLI entry point in this process: an uncaught exception (a traceback) fails
the test, and the engine's process-group setup must never have been entered (the error came before
DeepSpeed started): a process group left by an earlier in-process run of the same pytest session
cannot hide a call, since the setup function itself is watched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.cli import main as shard_main
from xray_pretrain.cli import main as pretrain_main

TINY_RUN = ["model.image_size=[64,64]", "model.patch_size=8", "log.progress=false"]


@pytest.fixture(scope="module")
def places(tmp_path_factory, phantom_shards) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a folder")
    (root / "not_yaml.yaml").write_text("model: [unclosed\n")
    return {"root": root, "shards": phantom_shards}


def _cases(p: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(CLI, argv, a fragment the one error line must contain)."""
    shards, root = p["shards"], p["root"]
    run = [
        "pretrain",
        "--config",
        "tiny_cpu",
        f"data.shards=[{shards}]",
        f"log.out_dir={root}/run",
        *TINY_RUN,
    ]
    return [
        ("pretrain", [*run, "model.nope=1"], "unknown key 'model.nope'"),
        ("pretrain", [*run, "model.patch_size=7"], "patch"),
        ("pretrain", [*run, "train.global_batch=40", "train.micro_batch=16"], "not a multiple"),
        ("pretrain", [*run, "train.global_batch=48", "train.micro_batch=32"], "not a multiple"),
        ("pretrain", [*run, f"data.shards=[{root}/missing]"], "does not exist"),
        ("pretrain", [*run, f"data.shards=[{root}/empty]"], "no manifest.json"),
        ("pretrain", [*run, "data.val_split=holdout"], "no samples in split 'holdout'"),
        ("pretrain", [*run, f"log.out_dir={root}/a_file/run"], "is a file, not a folder"),
        ("pretrain", [*run, f"checkpoint.resume={root}/missing"], "no such checkpoint folder"),
        ("pretrain", [*run, "data.shards=[/x"], "not valid YAML"),
        ("pretrain", [*run, "optim.base_lr=.nan"], "must be finite"),
        ("pretrain", ["pretrain", "--config", str(root / "not_yaml.yaml")], "not valid YAML"),
        ("pretrain", ["pretrain", "--config", str(root / "missing.yaml")], "neither a file nor a packaged"),
        (
            "pretrain",
            ["check-config", "--config", "tiny_cpu", f"data.shards=[{root}/missing]"],
            "does not exist",
        ),
        ("pretrain", ["export", "--checkpoint", str(root / "missing"), "--out", str(root / "x")], "missing"),
        ("pretrain", ["bench", "loader", "--shards", str(root / "missing"), "--num-batches", "1"], "missing"),
        ("shard", ["convert", "--input", str(root / "missing"), "--out", str(root / "o")], "not a folder"),
        ("shard", ["verify", str(root / "missing")], "missing"),
        ("shard", ["stats", str(root / "missing")], "no manifest.json"),
        ("shard", ["preview", str(root / "missing"), "--out", str(root / "p.png")], "missing"),
        ("shard", ["index", str(root / "missing")], "missing"),
        ("shard", ["refresh-roi", str(root / "missing")], "no manifest.json"),
        ("shard", ["refresh-roi", str(shards), "--workers", "0"], "--workers must be >= 1"),
        ("shard", ["synth", "--out", str(root / "a_file"), "--num", "4"], "a_file"),
    ]


def test_each_bad_input_is_one_error_line_before_any_work(places, capsys, monkeypatch):
    import torch.distributed as dist

    from xray_pretrain.engine import trainer

    setups = []
    real_init = trainer.init_distributed
    monkeypatch.setattr(trainer, "init_distributed", lambda *a, **k: setups.append(a) or real_init(*a, **k))
    group_before = dist.is_initialized()
    before = sorted(p.name for p in places["root"].iterdir())
    failures = []
    for cli, argv, fragment in _cases(places):
        rc = (pretrain_main if cli == "pretrain" else shard_main)(list(argv))
        err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        prog = "xray-pretrain" if cli == "pretrain" else "xray-shard"
        ok = (
            rc == 2
            and len(err_lines) == 1
            and err_lines[0].startswith(f"{prog} {argv[0]}")
            and fragment in err_lines[0]
        )
        if not ok:
            failures.append(f"{prog} {' '.join(argv[:2])} ... -> rc {rc}, stderr {err_lines}")
    assert not failures, "\n".join(failures)
    assert not setups  # no case reached process-group setup
    assert dist.is_initialized() == group_before
    assert sorted(p.name for p in places["root"].iterdir()) == before  # nothing written
