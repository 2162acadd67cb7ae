"""Checkpoint bookkeeping: `latest` only ever names a complete checkpoint; pruning keeps the newest."""

import json

import pytest

from xray_pretrain.engine import checkpoint


def _make(root, step, complete=True):
    tag_dir = root / checkpoint.tag_for_step(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag_dir / checkpoint.COMPLETE_NAME).write_text(json.dumps({"step": step}))
    return tag_dir


def test_latest_falls_back_when_it_names_an_incomplete_checkpoint(tmp_path):
    _make(tmp_path, 100)
    _make(tmp_path, 200, complete=False)  # a node died while writing step 200
    (tmp_path / "latest").write_text("step00000200")
    assert checkpoint.resolve_checkpoint(tmp_path) == (tmp_path, "step00000100")


def test_a_tag_folder_resolves_to_itself_and_incomplete_is_refused(tmp_path):
    done = _make(tmp_path, 100)
    broken = _make(tmp_path, 200, complete=False)
    assert checkpoint.resolve_checkpoint(done) == (tmp_path, "step00000100")
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        checkpoint.resolve_checkpoint(broken)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoint.resolve_checkpoint(tmp_path / "elsewhere")


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    for step in (100, 200, 300, 400):
        _make(tmp_path, step)  # markers without a run id: a run resumed from them continues as ""
    checkpoint.prune(tmp_path, keep_last=2, run_id="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000300", "step00000400"]
    assert checkpoint.complete_tags(tmp_path) == ["step00000300", "step00000400"]


def test_rng_state_saved_in_a_checkpoint_is_restored():
    import random

    import numpy as np
    import torch

    from xray_pretrain.engine.checkpoint import restore_rng_state, rng_state

    saved = rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(), torch.rand(())  # the state moves on
    restore_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_pruning_never_removes_best(tmp_path):
    for step in (2, 4, 6):
        tag_dir = tmp_path / checkpoint.tag_for_step(step)
        tag_dir.mkdir()
        (tag_dir / checkpoint.COMPLETE_NAME).write_text("{}")
    (tmp_path / checkpoint.BEST_TAG).mkdir()
    (tmp_path / checkpoint.BEST_TAG / checkpoint.COMPLETE_NAME).write_text("{}")
    checkpoint.prune(tmp_path, keep_last=1, run_id="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step00000006"]
