"""The classify task's parts without a launcher: metrics against hand-computed values, layer-wise LR
decay, label fractions by patient, uncertain labels, stochastic depth under activation checkpointing,
per-sample gathering."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from xray_pretrain.collectives import gather_samples
from xray_pretrain.config import load_config
from xray_pretrain.data.shards import ShardFolder, ShardReader, SplitTable
from xray_pretrain.engine.optim import build_optimizer, set_lr
from xray_pretrain.models import block_pooled_features, build_encoder
from xray_pretrain.tasks import DataInfo
from xray_pretrain.tasks.classify import ClassifyTask, label_fraction_subset
from xray_pretrain.tasks.metrics import bootstrap_interval, choose_thresholds, classification_metrics

LABELS = ["a", "b", "c"]


def _task(overrides=(), labels=LABELS) -> ClassifyTask:
    cfg = load_config(
        "classify_phantom",
        ["model.image_size=[32,32]", "model.patch_size=8", "data.shards=[unused]", *overrides],
    )
    task = ClassifyTask(cfg)
    task.bind_data(DataInfo(label_names=list(labels), image_size=(32, 32), intensity=[], conversion={}))
    return task


# ---- metrics ----------------------------------------------------------------------------------------
def test_metrics_match_hand_computed_values_and_an_unscorable_class_is_null():
    # Class a: positives score 0.9 and 0.35, negatives 0.4 and 0.1 -> 3 of 4 pairs ordered: AUROC 0.75.
    # AP: ranks 0.9 (+, precision 1, recall .5), 0.4 (-), 0.35 (+, precision 2/3, recall 1) -> 5/6.
    # F1 at 0.3: TP 2, FP 1, FN 0 -> 0.8. The 5th row's label is unknown (NaN) and must not count.
    # Class b: only negatives known -> null everywhere, out of the means, with a warning.
    probs = np.array([[0.9, 0.2], [0.4, 0.3], [0.35, 0.1], [0.1, 0.6], [0.95, 0.5]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, np.nan], [np.nan, 0]], dtype=float)
    with pytest.warns(UserWarning, match="b: one kind"):
        m = classification_metrics(probs, labels, ["a", "b"], [0.3, None])
    assert m["auroc/a"] == pytest.approx(0.75)
    assert m["ap/a"] == pytest.approx(5 / 6)
    assert m["f1/a"] == pytest.approx(0.8)
    assert m["auroc/b"] is None and m["ap/b"] is None and m["f1/b"] is None
    assert m["mean_auroc"] == pytest.approx(0.75) and m["mean_f1"] == pytest.approx(0.8)
    # Thresholds maximize F1 on the split they are chosen on: 0.35 keeps both positives (F1 0.8).
    assert choose_thresholds(probs, labels) == [pytest.approx(0.35), None]


def test_mean_is_null_when_no_class_can_be_scored():
    with pytest.warns(UserWarning):
        m = classification_metrics(np.array([[0.2], [0.7]]), np.array([[1.0], [1.0]]), ["a"], [None])
    assert m["mean_auroc"] is None and m["auroc/a"] is None


# ---- labels -----------------------------------------------------------------------------------------
def test_paired_bootstrap_interval_surrounds_the_seed_averaged_auroc_difference():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(300, 2)).astype(float)
    strong = labels[None] + rng.normal(0, 0.8, size=(3, 300, 2))  # (S, N, C): 3 seeds
    weak = labels[None] + rng.normal(0, 2.0, size=(3, 300, 2))
    expected = np.mean(
        [roc_auc_score(labels[:, c], strong[s, :, c]) - roc_auc_score(labels[:, c], weak[s, :, c])
         for s in range(3) for c in range(2)]
    )  # fmt: skip
    low, high = bootstrap_interval(strong, labels, weak, num_resamples=400)
    assert 0 < low < expected < high < 2 * expected
    assert bootstrap_interval(strong, labels, strong, num_resamples=50) == (0.0, 0.0)  # paired: exactly 0


def test_uncertain_labels_follow_the_policy_per_label_and_unknown_stays_unknown():
    task = _task(["classify.uncertain={a: ones, b: zeros}"])
    y = task.targets(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 0.0, float("nan")]]))
    assert y[0, :2].tolist() == [1.0, 0.0] and math.isnan(y[0, 2])  # c: ignore (the default)
    assert y[1, :2].tolist() == [1.0, 0.0] and math.isnan(y[1, 2])


def test_chosen_labels_are_read_by_name_and_unknown_names_are_refused():
    task = _task(["classify.labels=[c, a]"])
    assert task.label_names == ["c", "a"]
    assert task.targets(torch.tensor([[1.0, 0.0, 0.0]])).tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="not in the shards"):
        _task(["classify.labels=[a, zz]"])


def test_classify_keys_are_refused_for_pretraining():
    with pytest.raises(ValueError, match="classify"):
        load_config("tiny_cpu", ["data.shards=[x]", "classify.mode=linear"])


# ---- layer decay ------------------------------------------------------------------------------------
def test_layer_decay_gives_each_block_its_lr_and_no_decay_to_norms_biases_and_tokens():
    task = _task(["classify.layer_decay=0.5"])
    model = task.build_model()
    depth = len(model.encoder.blocks)
    optimizer = build_optimizer(task.param_groups(model, 0.05), lr=1.0, betas=(0.9, 0.999))
    set_lr(optimizer, 2.0)
    lr_of, decay_of = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)], decay_of[id(p)] = group["lr"], group["weight_decay"]
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.1.weight"])] == pytest.approx(2.0)
    assert lr_of[id(named["encoder.norm.weight"])] == pytest.approx(2.0)
    for i in range(depth):  # block i is layer i + 1 of depth + 1
        assert lr_of[id(named[f"encoder.blocks.{i}.mlp.fc1.weight"])] == pytest.approx(
            2.0 * 0.5 ** (depth - i)
        )
    assert lr_of[id(named["encoder.cls_token"])] == pytest.approx(2.0 * 0.5 ** (depth + 1))
    assert lr_of[id(named["encoder.patch_embed.proj.weight"])] == pytest.approx(2.0 * 0.5 ** (depth + 1))
    assert decay_of[id(named["head.1.weight"])] == 0.05
    for name in ("head.1.bias", "encoder.norm.weight", "encoder.blocks.0.norm1.bias", "encoder.cls_token"):
        assert decay_of[id(named[name])] == 0.0, name
    assert len(lr_of) == sum(1 for _ in model.parameters())


@pytest.mark.parametrize(
    "mode, frozen",
    [("linear", "encoder."), ("partial", ("encoder.patch_embed", "encoder.cls_token", "encoder.blocks.0."))],
)
def test_frozen_parameters_are_not_optimized(mode, frozen):
    extra = ["classify.freeze_blocks=1"] if mode == "partial" else ["model.drop_path=0"]
    task = _task([f"classify.mode={mode}", *extra])
    model = task.build_model()
    optimized = {id(p) for g in task.param_groups(model, 0.05) for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in optimized) == (not name.startswith(frozen)), name
    if mode == "linear":
        assert isinstance(model.head[0], torch.nn.BatchNorm1d) and not model.head[0].affine


# ---- stochastic depth -------------------------------------------------------------------------------
def test_drop_path_gradients_are_the_same_with_activation_checkpointing(one_cpu_thread):
    cfg = load_config(
        "classify_phantom",
        ["model.image_size=[32,32]", "model.patch_size=8", "model.drop_path=0.5", "data.shards=[x]"],
    )
    images = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(4, 17, 96, generator=torch.Generator().manual_seed(4))  # (B, 1 + L, D)

    def gradients(grad_ckpt: bool, seed: int) -> dict:
        torch.manual_seed(0)
        encoder = build_encoder(cfg.model)
        encoder.set_grad_checkpointing(grad_ckpt)
        torch.manual_seed(seed)
        (encoder(images) * weights).sum().backward()  # not invariant to the final LayerNorm's scale
        return {n: p.grad.clone() for n, p in encoder.named_parameters()}

    plain, recomputed = gradients(False, 1), gradients(True, 1)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    # ... and drop-path is really active: another draw gives other gradients.
    other = gradients(False, 2)
    assert max(float((other[n] - plain[n]).abs().max()) for n in plain) > 1e-3


# ---- gathering --------------------------------------------------------------------------------------
def test_gather_drops_padding_rows_and_orders_by_position():
    rows = gather_samples(
        {"key": ["c", "a", "pad"], "position": [2, 0, 0], "p": [[0.3], [0.1], [9.0]]},
        [1.0, 1.0, 0.0],
        "position",
    )
    assert rows == {"key": ["a", "c"], "position": [0, 2], "p": [[0.1], [0.3]]}


# ---- label fractions --------------------------------------------------------------------------------
def test_label_fraction_keeps_whole_patients_and_depends_on_the_seed(phantom_shards):
    table = SplitTable([ShardFolder(phantom_shards)], "train")
    reader = ShardReader()
    patient_of = [table.metadata(reader, 0, i)["patient"] for i in range(table.folder_sizes[0])]
    images_of = defaultdict(set)
    for i, p in enumerate(patient_of):
        images_of[p].add(table.key(0, i))
    subsets = {}
    for seed in (0, 1):
        subset = label_fraction_subset(table, 0.3, seed)
        keys = {subset.key(0, i) for i in range(subset.folder_sizes[0])}
        chosen = {p for p, images in images_of.items() if images & keys}
        assert set().union(*(images_of[p] for p in chosen)) == keys  # a chosen patient comes whole
        assert len(chosen) == math.ceil(0.3 * len(images_of))
        subsets[seed] = keys
    assert subsets[0] != subsets[1]
    assert label_fraction_subset(table, 0.3, 0).folder_sizes == [len(subsets[0])]  # same seed, same draw


def test_random_init_is_the_pretraining_runs_step_zero_encoder():
    """The random-init baseline of a comparison starts where pre-training started (same seed)."""
    from xray_pretrain.models import build_mae

    cfg = load_config("tiny_cpu", ["data.shards=[x]"])
    torch.manual_seed(0)
    mae_encoder = build_mae(cfg.model, cfg.mask).encoder.state_dict()
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model).state_dict()
    assert all(torch.equal(encoder[k], mae_encoder[k]) for k in mae_encoder)


def test_block_pooled_features_concatenate_every_blocks_mean_token_and_end_with_the_encoders_own():
    from xray_pretrain.models.heads import pool_tokens

    cfg = load_config("tiny_cpu", ["data.shards=[x]", "model.image_size=[32,32]", "model.patch_size=8"])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model).eval()
    images = torch.randn(3, 1, 32, 32)
    features = block_pooled_features(encoder, images)
    width = encoder.embed_dim
    assert features.shape == (3, width * len(encoder.blocks))
    with torch.no_grad():  # the definition, block by block
        x_BND, expected = encoder.embed_tokens(encoder.patchify(images)), []
        for block in encoder.blocks:
            x_BND = block(x_BND)
            expected.append(torch.nn.functional.layer_norm(x_BND, (width,), eps=1e-6)[:, 1:].mean(dim=1))
    torch.testing.assert_close(features, torch.cat(expected, dim=1))
    # The final norm is at its init, so the last block's column block is the encoder's pooled output.
    assert torch.allclose(features[:, -width:], pool_tokens(encoder(images), "mean"), atol=1e-5)
    assert not torch.allclose(features[:, :width], features[:, -width:])
    assert all(not block._forward_hooks for block in encoder.blocks)  # hooks removed


def test_blocks_pool_heads_a_frozen_encoder_on_block_pooled_features():
    task = _task(["classify.mode=linear", "classify.pool=blocks", "model.drop_path=0"])
    torch.manual_seed(0)
    model = task.build_model().eval()
    images = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    features = model.features(images)
    assert features.shape == (3, 96 * 4) == (3, model.num_features)
    assert torch.equal(features, block_pooled_features(model.encoder, images))
    weight_CF, bias_C = model.folded_head()  # the probe's BatchNorm over all 384 features, folded
    assert weight_CF.shape == (len(LABELS), 96 * 4)
    torch.testing.assert_close(model(images), features @ weight_CF.T + bias_C)
    assert all(not p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize("mode", ["finetune", "partial"])
def test_blocks_pool_is_refused_with_a_trained_encoder(mode):
    extra = ["classify.freeze_blocks=1"] if mode == "partial" else []
    with pytest.raises(ValueError, match=f"classify.pool=blocks needs classify.mode=linear .*not {mode}"):
        _task([f"classify.mode={mode}", "classify.pool=blocks", *extra])
