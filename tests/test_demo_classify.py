"""The demo's classification stage: the bootstrap interval, the random-init baseline's identity with
a pre-training run's step-0 weights, the frozen-part split of a classifier, and one small comparison."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from xray_pretrain.config import config_from_dict, load_config
from xray_pretrain.tasks import DataInfo
from xray_pretrain.tasks.classify import ClassifyTask
from xray_pretrain.tasks.metrics import bootstrap_interval, weighted_auroc


# ---- the bootstrap -----------------------------------------------------------------------------------
def test_weighted_auroc_matches_a_hand_count_and_sklearn():
    probs = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0.0, 0.0, 1.0, 1.0])
    # Unweighted: of the 4 (positive, negative) pairs only (0.35, 0.4) is out of order -> 3/4.
    # The 0.4 negative drawn twice: pairs weigh 1*1 (0.35>0.1), 1*2 (0.35<0.4), 1 and 2 (0.8 wins) -> 4/6.
    # Only positives drawn: no pair -> NaN.
    got = weighted_auroc(probs, labels, np.array([[1, 1, 1, 1], [1, 2, 1, 1], [0, 0, 2, 1]]))
    np.testing.assert_allclose(got[:2], [0.75, 4 / 6])
    assert np.isnan(got[2])
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 5, 40) / 4  # ties everywhere
    labels = (rng.random(40) < 0.4).astype(float)
    labels[3] = np.nan  # unknown: left out
    weights = rng.integers(0, 3, (3, 40))
    known = ~np.isnan(labels)
    expected = [roc_auc_score(labels[known], probs[known], sample_weight=w[known]) for w in weights]
    np.testing.assert_allclose(weighted_auroc(probs, labels, weights), expected)


def test_bootstrap_interval_of_hand_computed_gaps():
    labels_NC = np.array([[0, 1], [0, 1], [1, 0], [1, 0], [1, 1], [0, 0]], dtype=float)
    perfect = labels_NC[None] * 0.8 + 0.1  # AUROC 1 on every draw that has both kinds
    inverted = 1 - perfect  # AUROC 0 on every such draw
    # a minus b is 1 on every resample (a class of one kind in a draw is left out of both means).
    assert bootstrap_interval(perfect, labels_NC, inverted, num_resamples=300) == (1.0, 1.0)
    assert bootstrap_interval(perfect, labels_NC, perfect, num_resamples=300) == (0.0, 0.0)
    assert bootstrap_interval(perfect, labels_NC, num_resamples=300) == (1.0, 1.0)  # a's own mean AUROC
    # Two seeds: b is inverted on seed 0 and perfect on seed 1 -> the gap is (1 + 0) / 2 everywhere.
    two_seeds = np.concatenate([inverted, perfect])
    assert bootstrap_interval(np.concatenate([perfect, perfect]), labels_NC, two_seeds, 300) == (0.5, 0.5)


# ---- the random-init baseline -------------------------------------------------------------------------
def test_step0_source_is_the_weights_the_pretraining_run_starts_from(zero2_run, tmp_path, one_cpu_thread):
    """Rebuilt from a 2-rank run's folder, the step-0 weights equal what the engine holds before its
    first step, on the same config (same architecture and train.seed)."""
    from xray_pretrain.engine.dist import init_distributed, release_distributed
    from xray_pretrain.engine.init_weights import open_source, step0_source
    from xray_pretrain.engine.trainer import Trainer

    run_dir, _ = zero2_run
    source = step0_source(run_dir)
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.log.out_dir, cfg.checkpoint.resume, cfg.data.num_workers = str(tmp_path), "none", 0
    ctx = init_distributed(cfg.train.dist_timeout_s)
    try:
        trainer = Trainer(cfg, ctx)
        engine_state = trainer.engine.module.state_dict()
        trainer.monitor.close()
    finally:
        release_distributed(ctx)
    assert source.kind == "step0" and set(source.state) == set(engine_state)
    assert all(torch.equal(source.state[k], engine_state[k].cpu()) for k in engine_state)
    final = open_source(run_dir).state  # ... and they are not the trained weights
    assert not torch.equal(
        final["encoder.blocks.0.attn.qkv.weight"], source.state["encoder.blocks.0.attn.qkv.weight"]
    )


# ---- the frozen part -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, extra",
    [
        ("partial", ["classify.freeze_blocks=2"]),
        ("linear", ["model.drop_path=0"]),
        ("linear", ["model.drop_path=0", "classify.pool=blocks"]),
    ],
)
def test_forward_from_frozen_tokens_equals_the_whole_forward(mode, extra):
    cfg = load_config(
        "classify_phantom",
        [
            "model.image_size=[32,32]",
            "model.patch_size=8",
            "data.shards=[x]",
            f"classify.mode={mode}",
            *extra,
        ],
    )
    task = ClassifyTask(cfg)
    task.bind_data(DataInfo(["a", "b"], (32, 32), [], {}))
    torch.manual_seed(0)
    model = task.build_model().eval()
    images = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.forward_frozen(model.frozen_tokens(images)), model(images))


# ---- one small comparison -----------------------------------------------------------------------------
def test_compare_gives_the_demo_summary(zero2_run, phantom_shards, one_cpu_thread):
    from xray_pretrain.demo_classify import DEFAULT_RECIPE, PROBE_RECIPE, compare

    small = dict(steps=6, val_every=3, warmup_steps=2, label_fraction=0.5)
    recipe = replace(DEFAULT_RECIPE, views=min(DEFAULT_RECIPE.views, 2), **small)  # 2 crops per image
    result = compare(
        zero2_run[0], phantom_shards, phantom_shards, recipe, replace(PROBE_RECIPE, **small), seeds=(0, 1),
        num_resamples=50, progress=False,
    )  # fmt: skip
    summary = result["classify"]
    assert list(summary) == ["mean_auroc", "random_init_mean_auroc", "pixels_mean_auroc", "linear_probe_mean_auroc",
                             "auroc", "gap_ci95", "num_test", "label_fraction"]  # fmt: skip
    assert summary["num_test"] == 160 and summary["label_fraction"] == 0.5  # every phantom of the folder
    assert sorted(summary["auroc"]) == sorted(["cardiomegaly", "pleural_effusion", "nodule", "pneumothorax",
                                               "consolidation"])  # fmt: skip
    for key in ("mean_auroc", "random_init_mean_auroc", "pixels_mean_auroc", "linear_probe_mean_auroc"):
        assert 0 <= summary[key] <= 1, key
    low, high = summary["gap_ci95"]
    assert -1 <= low <= high <= 1
    rows = result["details"]["rows"]
    assert all(c["lr"] in DEFAULT_RECIPE.lrs and c["step"] in (3, 6) for c in rows["pretrained"]["chosen"])
    assert summary["mean_auroc"] == pytest.approx(np.mean(rows["pretrained"]["test_mean_auroc"]), abs=1e-4)


def test_logistic_head_fits_block_pooled_features_and_chooses_c_on_validation(
    zero2_run, phantom_shards, one_cpu_thread
):
    from xray_pretrain.demo_classify import (
        BLOCKS_LOGISTIC_RECIPE,
        Comparison,
        classify_task,
        initialized_model,
    )
    from xray_pretrain.engine.init_weights import open_source
    from xray_pretrain.models import block_pooled_features
    from xray_pretrain.models.heads import pool_tokens

    run_dir = zero2_run[0]
    bench = Comparison(run_dir, phantom_shards, phantom_shards, test_splits=("test",))
    recipe, source = replace(BLOCKS_LOGISTIC_RECIPE, label_fraction=0.5), open_source(run_dir)
    row = bench.row(source, recipe, seeds=(0,))
    assert row.chosen[0]["C"] in recipe.cs and row.probs_SNC.shape == (1, 17, 5)
    (tokens,) = bench.tokens_cache.values()  # what the regression was fit on, pooled
    encoder = initialized_model(classify_task(bench.run_cfg, recipe, 0, bench.label_names), source, 0).encoder
    expected = block_pooled_features(encoder.eval(), bench.data["val"].images_NCHW)
    torch.testing.assert_close(pool_tokens(tokens["val"], recipe.pool), expected)


def test_augmented_views_are_the_labelled_images_under_finetunes_augmentation(phantom_shards):
    from xray_pretrain.demo_classify import augmented_views, load_split, train_rows

    names = ["cardiomegaly", "pleural_effusion", "nodule", "pneumothorax", "consolidation"]
    images, keys = augmented_views([phantom_shards], names, 0.5, 0, 2, (64, 64))
    num_images = len(keys)
    assert images.shape == (2 * num_images, 1, 64, 64) and torch.isfinite(images).all()
    assert not torch.equal(images[:num_images], images[num_images:])  # two draws of each image differ
    split = load_split([phantom_shards], ["train"], (64, 64))
    assert sorted(keys) == sorted(
        split.keys[i] for i in train_rows([phantom_shards], names, 0.5, 0, split.keys)
    )
