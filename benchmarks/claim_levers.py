"""The claim in miniature, lever by lever (issue 8 item 5): does MAE pre-training on the demo's phantoms
put a classifier ahead of the same classifier from random init, with few labels?

Everything runs in one process with the project's own pieces (the `PretrainTask` loss and validation,
`MaskedAutoencoder`, the loaders' decode and augmentation, `ClassificationModel`, layer-decay groups,
`label_fraction_subset`, `tasks.metrics`), so a variant costs what the demo's pre-training would on one
core. Random init is always the variant's own step-0 encoder (built after `torch.manual_seed(train.seed)`
exactly as the engine does), so the two inits differ only by pre-training.

Data (`prepare`, outside the repository under --work): the demo's phantoms (`synth --num 480 --size 256
--seed 0`, png16 at long side 128): pre-training on its train split, labels from its train split, the
hyperparameter grid chosen on its val split; test: every image of a second synth seed (`--num 520
--seed 1`). Scores: mean AUROC over the 5 findings on the test set, averaged over label-subset seeds
0, 1, 2; gap = pre-trained - random init with a paired bootstrap 95% interval over test images.

    export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
    nice -n 10 python benchmarks/claim_levers.py prepare --work runs/claim
    nice -n 10 python benchmarks/claim_levers.py pretrain --work runs/claim --name np_m90 --set model.norm_pix_loss=true mask.ratio=0.9
    nice -n 10 python benchmarks/claim_levers.py downstream --work runs/claim --name np_m90 --recipe multiprobe --lf 0.1
    python benchmarks/claim_levers.py table --work runs/claim

Recipes (`--recipe`): logistic probes on frozen features (`probe`, `multiprobe` = every block's mean
token, `gridprobe`, and `multimax` / `multigem3` / `multitop8` / `multimeanmax` / `multimaxmin`: every
block's tokens under a pooling that does not dilute a finding a few tokens wide; `NAME_views` fits NAME
on augmented crops of the labelled images), attentive probes (`attn_*`: a learned query cross-attends
the frozen tokens, AdamW) and gradient fine-tuning (`full*`, `partial*`). `pretrain --visible-weight W`
adds W x the loss on the visible patches; `prepare --long-side 256` converts the phantoms at synth's
own resolution (pre-train those with `model.image_size=[256,256] model.patch_size=32`: the same 64
tokens).

`--set` overrides `tiny_cpu` as packaged now (norm_pix_loss true, mask ratio 0.9 since this benchmark);
the variants in benchmarks/RESULTS.md name both keys explicitly, so they reproduce either way.
Each `downstream` appends one JSON line per (variant, recipe, label fraction) to WORK/results.jsonl,
with CPU seconds (`time.process_time`) and wall seconds of every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xray_pretrain.config import load_config
from xray_pretrain.data.augment import FULL_VIEW, TrainAugment, transform_sample
from xray_pretrain.data.decode import decode_image, decode_roi, estimate_roi
from xray_pretrain.data.loader import train_augment
from xray_pretrain.data.shards import ShardFolder, ShardReader, SplitTable
from xray_pretrain.demo_classify import augmented_views, drop_tokens
from xray_pretrain.engine.optim import build_optimizer, lr_at, set_lr
from xray_pretrain.models import ClassificationModel, block_pooled_features, build_encoder
from xray_pretrain.models.heads import block_tokens, pool_tokens
from xray_pretrain.models.mae import masked_patch_loss
from xray_pretrain.models.param_groups import encoder_layer_decay_groups, is_no_decay
from xray_pretrain.tasks.classify import HEAD_INIT_STD, label_fraction_subset
from xray_pretrain.tasks.metrics import bootstrap_interval, classification_metrics
from xray_pretrain.tasks.pretrain import PretrainTask

DEMO_SALT = "xray-pretrain-demo-phantoms"
SEEDS = (0, 1, 2)
PROBE_C = (0.01, 0.1, 1.0)  # logistic-regression inverse regularization grid (standardized features)


# ---- data ------------------------------------------------------------------------------------------
@dataclass
class Raw:
    """Decoded samples of one split, before any resize: what `transform_sample` takes."""

    images: list[np.ndarray]  # (H, W) float32 in [0, 1]
    rois: list[np.ndarray]  # (h, w) uint8
    labels_NC: np.ndarray  # float32, NaN unknown
    keys: list[str]
    mean: float
    std: float

    def view(self, rows, params: list, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) normalized images and (B, 1, H, W) rois of `rows` under per-row augment params."""
        pairs = [
            transform_sample(self.images[r], self.rois[r], p, image_hw, self.mean, self.std)
            for r, p in zip(rows, params)
        ]
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

    def full(self, image_hw: tuple[int, int]) -> torch.Tensor:
        rows = range(len(self.keys))
        return self.view(rows, [FULL_VIEW] * len(self.keys), image_hw)[0]


def read_split(table: SplitTable) -> Raw:
    reader = ShardReader()
    images, rois, labels, keys = [], [], [], []
    for folder, size in enumerate(table.folder_sizes):
        for index in range(size):
            sample = table.read(reader, folder, index)
            image = decode_image(sample.image)
            images.append(image)
            rois.append(decode_roi(sample.roi) if sample.roi is not None else estimate_roi(image))
            labels.append(sample.labels)
            keys.append(sample.key)
    reader.close()
    folder = table.folders[0]
    return Raw(images, rois, np.stack(labels), keys, folder.intensity_mean, folder.intensity_std)


def concat(raws: list[Raw]) -> Raw:
    first = raws[0]
    return Raw(
        [i for r in raws for i in r.images],
        [i for r in raws for i in r.rois],
        np.concatenate([r.labels_NC for r in raws]),
        [k for r in raws for k in r.keys],
        first.mean,
        first.std,
    )


class Data:
    """The demo's train/val splits and the second-seed test set, decoded once."""

    def __init__(self, work: Path):
        demo = ShardFolder(work / "shards0")
        self.label_names = list(demo.label_names)
        self.train_table = SplitTable([demo], "train")
        self.train = read_split(self.train_table)
        self.val = read_split(SplitTable([demo], "val"))
        test = ShardFolder(work / "shards1")
        self.test = concat(
            [read_split(SplitTable([test], s, self.label_names)) for s in ("train", "val", "test")]
        )

    def label_rows(self, fraction: float, seed: int) -> list[int]:
        """Train rows of a `fraction` of the patients (the classify task's own sampling)."""
        if fraction >= 1:
            return list(range(len(self.train.keys)))
        subset = label_fraction_subset(self.train_table, fraction, seed)
        chosen = {subset.key(0, i) for i in range(subset.folder_sizes[0])}
        return [i for i, k in enumerate(self.train.keys) if k in chosen]


def prepare(work: Path, long_side: int = 128) -> None:
    """The demo's phantoms converted at `long_side` (the demo's 128; 256 = synth's own resolution)."""
    from data_tools.convert import convert
    from data_tools.synth import synthesize

    for seed, num in ((0, 480), (1, 520)):
        if (work / f"shards{seed}").exists():
            continue
        t = time.perf_counter()
        synthesize(work / f"phantoms{seed}", num_images=num, size=256, seed=seed)
        convert(
            work / f"phantoms{seed}", work / f"shards{seed}", source="csv", dataset="phantom",
            image_format="png16", long_side=long_side, salt=DEMO_SALT,
        )  # fmt: skip
        print(f"seed {seed}: {num} phantoms in {time.perf_counter() - t:.0f} s", flush=True)


# ---- pre-training ----------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def read(self) -> dict:
        return {
            "cpu_s": round(time.process_time() - self.cpu, 1),
            "wall_s": round(time.perf_counter() - self.wall, 1),
        }


class VisibleLoss(nn.Module):
    """The MAE with its loss plus `weight` x the same per-patch loss on the visible patches (which the
    decoder predicts anyway): each visible token must keep its own patch, a nodule or a pleural rim
    included, which the masked-patch loss alone never asks for. `module` is the MAE (what
    `PretrainTask` unwraps, as for DeepSpeed)."""

    def __init__(self, mae, weight: float):
        super().__init__()
        self.module, self.weight = mae, weight

    def forward(self, images, roi, noise):
        out = self.module(images, roi, noise)
        visible = masked_patch_loss(out.pred_BLP, out.target_BLP, 1.0 - out.mask_BL)
        return replace(out, loss=out.loss + self.weight * visible)


def pretrain(work: Path, name: str, overrides: list[str], data: Data, visible_weight: float = 0.0) -> None:
    """Pre-train `tiny_cpu` + overrides in-process (one rank, global batch at once); saves the step-0
    and final encoders and the validation loss ratio the demo's CI gate checks (masked patches only).
    `visible_weight` > 0 adds the loss on visible patches (`VisibleLoss`)."""
    cfg = load_config("tiny_cpu", ["data.shards=[unused]", *overrides])
    out = work / "variants" / name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)  # as the engine: the step-0 weights are a function of the seed
    task = PretrainTask(cfg)
    model = task.build_model()
    torch.save(model.encoder.state_dict(), out / "init.pt")
    trained = VisibleLoss(model, visible_weight) if visible_weight > 0 else model
    params = [p for p in model.parameters() if p.requires_grad]
    peak_lr = cfg.optim.lr(cfg.train.global_batch)
    optimizer = build_optimizer(
        task.param_groups(model, cfg.optim.weight_decay), peak_lr, tuple(cfg.optim.betas)
    )
    augment, image_hw = train_augment(cfg.data), tuple(cfg.model.image_size)
    num_train, batch = len(data.train.keys), cfg.train.global_batch
    order = np.concatenate(
        [
            np.random.default_rng([cfg.train.seed, e]).permutation(num_train)
            for e in range(cfg.train.steps * batch // num_train + 1)
        ]
    )
    clock, losses = Clock(), []
    for step in range(cfg.train.steps):
        set_lr(optimizer, lr_at(step, peak_lr=peak_lr, warmup_steps=cfg.optim.warmup_steps,
                                total_steps=cfg.train.steps, min_lr=cfg.optim.min_lr))  # fmt: skip
        positions = np.arange(step * batch, (step + 1) * batch)
        images, rois = data.train.view(
            order[positions], [augment.sample(cfg.train.seed, p) for p in positions], image_hw
        )
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 4099)
        loss, _ = task.training_loss(
            trained,
            {"image": images, "roi": rois, "position": torch.from_numpy(positions)},
            "cpu",
            torch.float32,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == cfg.train.steps - 1:
            print(f"{name} step {step} loss {loss:.4f} {clock.read()}", flush=True)
    cost = clock.read()
    val_images, val_rois = data.val.view(
        range(len(data.val.keys)), [FULL_VIEW] * len(data.val.keys), image_hw
    )
    val_batch = {"image": val_images, "roi": val_rois, "position": torch.arange(len(val_images)),
                 "weight": torch.ones(len(val_images))}  # fmt: skip
    val = task.evaluate(model, [val_batch], "cpu", torch.float32)
    torch.save(model.encoder.state_dict(), out / "final.pt")
    record = {
        "name": name, "overrides": overrides, "visible_weight": visible_weight, "steps": cfg.train.steps, **cost,
        "val_ratio": val["val_loss"] / val["val_loss_baseline"],
        "loss_at": {s: round(losses[s], 4) for s in (0, 100, 300, len(losses) - 1) if s < len(losses)},
    }  # fmt: skip
    (out / "pretrain.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)


# ---- downstream ------------------------------------------------------------------------------------
def load_encoder(work: Path, name: str, which: str, drop_path: float = 0.0):
    record = json.loads((work / "variants" / name / "pretrain.json").read_text())
    cfg = load_config(
        "tiny_cpu", ["data.shards=[unused]", *record["overrides"], f"model.drop_path={drop_path}"]
    )
    encoder = build_encoder(cfg.model)
    encoder.load_state_dict(torch.load(work / "variants" / name / f"{which}.pt"))
    return encoder, tuple(cfg.model.image_size)


@torch.no_grad()
def encoder_features(encoder, images: torch.Tensor, blocks: str) -> np.ndarray:
    """(N, D) mean-pooled final-norm patch tokens (`blocks=last`), (N, 4 D) their means over the grid's
    quadrants (`grid`), or (N, D * depth) the mean-pooled tokens after every block, each layer-normed
    (`blocks=all`: a head over several blocks)."""
    encoder.eval()
    if blocks == "last":
        return torch.cat([pool_tokens(encoder(chunk), "mean") for chunk in images.split(64)]).numpy()
    if blocks == "grid":  # final tokens averaged over the 4 quadrants of the token grid: (N, 4 D)
        rows, cols = encoder.grid_size
        grids = [
            encoder(chunk)[:, 1:].transpose(1, 2).reshape(len(chunk), -1, rows, cols)
            for chunk in images.split(64)
        ]
        return torch.cat([F.adaptive_avg_pool2d(g, 2).flatten(1) for g in grids]).numpy()
    if blocks.startswith("all_"):  # every block's layer-normed patch tokens under another pooling
        pool = TOKEN_POOLS[blocks[len("all_") :]]
        return torch.cat([pool(block_tokens(encoder, chunk)[:, 1:]) for chunk in images.split(64)]).numpy()
    return torch.cat([block_pooled_features(encoder, chunk) for chunk in images.split(64)]).numpy()


def signed_gem(tokens_BLD: torch.Tensor, p: int = 3) -> torch.Tensor:
    """(B, L, D) -> (B, D) generalized mean of odd power `p` with the sign kept (GeM for tokens that
    are layer-normed, so of either sign): sign(m) |m|^(1/p), m = mean over L of x^p; between the mean
    (p = 1) and the signed extreme (p -> inf)."""
    moment = tokens_BLD.double().pow(p).mean(dim=1)
    return (moment.sign() * moment.abs().pow(1.0 / p)).float()


# Poolings over the 64 patch tokens that do not dilute a finding a few tokens wide as the mean does
# (`multiprobe` is `all` = mean): each applied to every block's tokens, concatenated (D * depth).
TOKEN_POOLS = {
    "max": lambda t: t.amax(dim=1),
    "gem3": signed_gem,
    "top8": lambda t: t.topk(8, dim=1).values.mean(dim=1),  # mean of the 8 largest per feature (1/8)
    "meanmax": lambda t: torch.cat([t.mean(dim=1), t.amax(dim=1)], dim=1),  # (B, 2 D)
    "maxmin": lambda t: torch.cat([t.amax(dim=1), t.amin(dim=1)], dim=1),  # both signed extremes (B, 2 D)
}


def labelled_views(work: Path, data: Data, image_hw, fraction: float, seed: int):
    """(NUM_VIEWS * N, 1, H, W) augmented crops of each of the N labelled images (the label subset of
    `fraction`, `seed`; view k of image n at row k * N + n) and their (NUM_VIEWS * N, C) labels."""
    images, keys = augmented_views([work / "shards0"], data.label_names, fraction, seed, NUM_VIEWS, image_hw)
    row_of = {key: i for i, key in enumerate(data.train.keys)}
    labels_NC = data.train.labels_NC[[row_of[key] for key in keys]]
    return images, np.tile(labels_NC, (NUM_VIEWS, 1))


def view_features(work: Path, data: Data, encoder, image_hw, blocks: str, fraction: float, seed: int):
    """(NUM_VIEWS * N, F) features of `labelled_views` and their (NUM_VIEWS * N, C) labels."""
    images, labels_NC = labelled_views(work, data, image_hw, fraction, seed)
    return encoder_features(encoder, images, blocks), labels_NC


def fit_logistic_models(x_train, y_train, x_val, y_val):
    """Per class, standardized features -> logistic regression, C chosen on validation mean AUROC.
    Returns (the fitted StandardScaler, the C per-class models, {"C", "val_mean_auroc"})."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    best = None
    for c_value in PROBE_C:
        models = [
            LogisticRegression(C=c_value, max_iter=2000).fit(x_train, y_train[:, c])
            for c in range(y_train.shape[1])
        ]
        val_probs = np.stack([m.predict_proba(x_val)[:, 1] for m in models], axis=1)
        score = mean_auroc(val_probs, y_val)
        if best is None or score > best[0]:
            best = (score, c_value, models)
    return scaler, best[2], {"C": best[1], "val_mean_auroc": best[0]}


def fit_logistic(x_train, y_train, x_val, y_val, x_test) -> tuple[np.ndarray, dict]:
    """`fit_logistic_models`, then (N_test, C) test probabilities and what validation chose."""
    scaler, models, pick = fit_logistic_models(x_train, y_train, x_val, y_val)
    x_test = scaler.transform(x_test)
    return np.stack([m.predict_proba(x_test)[:, 1] for m in models], axis=1), pick


def mean_auroc(probs_NC, labels_NC) -> float:
    names = [str(c) for c in range(labels_NC.shape[1])]
    return classification_metrics(probs_NC, labels_NC, names, [None] * len(names))["mean_auroc"]


def per_class_auroc(probs_SNC, labels_NC) -> list[float]:
    """AUROC per class, averaged over the seeds."""
    from sklearn.metrics import roc_auc_score

    return [
        round(float(np.mean([roc_auc_score(labels_NC[:, c], p[:, c]) for p in probs_SNC])), 4)
        for c in range(labels_NC.shape[1])
    ]


@dataclass
class FinetuneRecipe:
    """Gradient fine-tuning: `frozen` first blocks frozen (0 = full; the stem with them), the rest at
    `lr` x layer_decay^(depth + 1 - layer), head on mean-pooled tokens; `epochs` over the labelled
    images at `batch`, warm-up 10%, cosine; the classify_phantom augmentation."""

    frozen: int
    lrs: tuple[float, ...]
    epochs: int = 40
    batch: int = 16
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    drop_path: float = 0.1
    probe_norm: bool = False  # head = parameter-free BatchNorm + linear (std 0.01), as the linear probe
    # LP-FT (Kumar et al. 2022): start from the linear probe fitted on the frozen encoder (`set_probe_head`)
    # instead of a random head, whose first gradients would distort the pre-trained features. Needs
    # probe_norm; the norm then keeps the probe's standardization (eval mode) throughout.
    probe_init: bool = False


@torch.no_grad()
def set_probe_head(model: ClassificationModel, data: Data, rows: list[int], image_hw) -> dict:
    """LP-FT's first stage: the logistic probe (`fit_logistic_models`, C chosen on validation) on the
    model's own features (mean-pooled final-norm tokens of the whole images, the encoder frozen), put
    into its head exactly: BatchNorm running mean / variance = the probe's standardization, linear layer
    = the probe's coefficients. In eval mode the model then outputs the probe's logits."""
    model.eval()
    images = {
        "train": data.train.view(rows, [FULL_VIEW] * len(rows), image_hw)[0],
        "val": data.val.full(image_hw),
    }
    feats = {
        s: torch.cat([model.features(chunk) for chunk in x.split(64)]).numpy() for s, x in images.items()
    }
    scaler, models, pick = fit_logistic_models(
        feats["train"], data.train.labels_NC[rows], feats["val"], data.val.labels_NC
    )
    norm, linear = model.head
    norm.running_mean.copy_(torch.from_numpy(scaler.mean_))
    norm.running_var.copy_(torch.from_numpy(scaler.var_))  # StandardScaler's population variance, as BN's
    linear.weight.copy_(torch.from_numpy(np.concatenate([m.coef_ for m in models])))
    linear.bias.copy_(torch.from_numpy(np.concatenate([m.intercept_ for m in models])))
    return {"probe_C": pick["C"], "probe_val_mean_auroc": pick["val_mean_auroc"]}


def finetune(recipe: FinetuneRecipe, lr: float, encoder, image_hw, data: Data, rows: list[int], seed: int):
    """Train one classifier; returns (val probs, test probs)."""
    torch.manual_seed(seed)
    model = ClassificationModel(encoder, len(data.label_names), pool="mean", num_frozen_blocks=recipe.frozen,
                                probe_norm=recipe.probe_norm,
                                head_init_std=HEAD_INIT_STD["linear" if recipe.probe_norm else "finetune"])  # fmt: skip
    if recipe.probe_init:
        set_probe_head(model, data, rows, image_hw)
    groups = encoder_layer_decay_groups(model, recipe.weight_decay, recipe.layer_decay)
    optimizer = build_optimizer(groups, lr, (0.9, 0.999))
    augment = TrainAugment(crop_scale=(0.7, 1.0), crop_ratio=(0.9, 1.1), brightness=0.1, contrast=0.1)
    steps_per_epoch = math.ceil(len(rows) / recipe.batch)
    total = recipe.epochs * steps_per_epoch
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(data.train.labels_NC)
    model.train()
    if recipe.probe_init:  # keep the probe's standardization: batch statistics of 16 crops would move it
        model.head[0].eval()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = rng.permutation(rows)
        pick = order[(step % steps_per_epoch) * recipe.batch :][: recipe.batch]
        set_lr(
            optimizer,
            lr_at(step, peak_lr=lr, warmup_steps=max(1, total // 10), total_steps=total, min_lr=0.0),
        )
        images, _ = data.train.view(
            pick, [augment.sample(seed, step * recipe.batch + i) for i in range(len(pick))], image_hw
        )
        loss = F.binary_cross_entropy_with_logits(model(images), labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return tuple(torch.sigmoid(model(split.full(image_hw))).numpy() for split in (data.val, data.test))


FINETUNE_RECIPES = {
    "partial3": FinetuneRecipe(frozen=3, lrs=(3e-3, 1e-2), epochs=100),
    "partial2": FinetuneRecipe(frozen=2, lrs=(1e-3, 3e-3), epochs=60),
    "full": FinetuneRecipe(frozen=0, lrs=(1e-3, 3e-3), epochs=40),
    "full_low": FinetuneRecipe(frozen=0, lrs=(3e-4, 1e-3), epochs=40, layer_decay=0.5),
    "full_hi": FinetuneRecipe(frozen=0, lrs=(1e-2, 3e-2), epochs=60),
    "full_bn": FinetuneRecipe(frozen=0, lrs=(1e-3, 3e-3), epochs=60, probe_norm=True),
    "lpft20": FinetuneRecipe(frozen=0, lrs=(1e-4, 3e-4), epochs=20, probe_norm=True, probe_init=True),
    "lpft40": FinetuneRecipe(frozen=0, lrs=(1e-4, 3e-4), epochs=40, probe_norm=True, probe_init=True),
}
PROBE_RECIPES = {"probe": "last", "multiprobe": "all", "gridprobe": "grid"} | {
    f"multi{name}": f"all_{name}" for name in TOKEN_POOLS
}
# `NAME_views`: the probe NAME fitted on NUM_VIEWS crops of each labelled image drawn by `finetune`'s
# own augmentation (`demo_classify.augmented_views`, as the demo's `blocks_views`) instead of the image.
NUM_VIEWS = 16
PROBE_RECIPES |= {f"{name}_views": blocks for name, blocks in PROBE_RECIPES.items()}


# ---- attentive probe -------------------------------------------------------------------------------
class AttentiveProbe(nn.Module):
    """Attentive probing (AIM, V-JEPA): learned queries cross-attend the frozen patch tokens, then a
    linear head. (B, L, D) tokens -> (B, C) logits. One query shared by the classes, or one query per
    class (`per_class`: query c's output feeds logit c only, so each finding can look elsewhere).
    Layer norm on the tokens and on the pooled vector; V-JEPA's MLP after the attention is left out
    (~40 labelled images)."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, per_class: bool):
        super().__init__()
        self.num_classes, self.per_class = num_classes, per_class
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(1, num_classes if per_class else 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens_BLD: torch.Tensor) -> torch.Tensor:
        x_BLD = self.norm(tokens_BLD)
        pooled_BQD, _ = self.attn(self.query.expand(len(x_BLD), -1, -1), x_BLD, x_BLD, need_weights=False)
        logits_BQC = self.head(self.out_norm(pooled_BQD))
        return logits_BQC.diagonal(dim1=1, dim2=2) if self.per_class else logits_BQC[:, 0]


@dataclass
class AttentiveRecipe:
    """An attentive probe on frozen tokens: `tokens` = `last` (final-norm tokens, D) or `blocks` (every
    block's layer-normed tokens, D * depth); AdamW, warm-up 10% + cosine, batch 16 drawn with
    replacement, `token_drop` of the patch tokens left out per sample and step (as the demo's probes);
    LR in `lrs` and the step (every 50) chosen on validation mean AUROC."""

    tokens: str
    per_class: bool
    num_heads: int
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    steps: int = 300
    batch: int = 16
    weight_decay: float = 0.05
    token_drop: float = 0.25
    val_every: int = 50


ATTENTIVE_RECIPES = {
    "attn_last": AttentiveRecipe(tokens="last", per_class=False, num_heads=3),
    "attn_blocks": AttentiveRecipe(tokens="blocks", per_class=False, num_heads=4),
    "attn_blocks_pc": AttentiveRecipe(tokens="blocks", per_class=True, num_heads=4),
}


@torch.no_grad()
def frozen_split_tokens(encoder, images: torch.Tensor, which: str) -> torch.Tensor:
    """(N, 1 + L, D) final-norm tokens (`last`) or (N, 1 + L, D * depth) `block_tokens` (`blocks`)."""
    encoder.eval()
    run = encoder if which == "last" else (lambda x: block_tokens(encoder, x))
    return torch.cat([run(chunk) for chunk in images.split(64)])


def fit_attentive(recipe: AttentiveRecipe, lr: float, tokens: dict, data: Data, rows: list[int], seed: int):
    """Train one attentive probe; returns (best val mean AUROC, its step, val probs, test probs)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    probe = AttentiveProbe(
        tokens["train"].shape[2], len(data.label_names), recipe.num_heads, recipe.per_class
    )
    # The project's rule (no decay on norms and biases) and none on the query, a learned token like cls.
    named = list(probe.named_parameters())
    rest = [p for n, p in named if is_no_decay(n, p) or n == "query"]
    decay = [p for n, p in named if not (is_no_decay(n, p) or n == "query")]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = build_optimizer(groups, lr, (0.9, 0.999))
    labels = torch.from_numpy(data.train.labels_NC)
    rows_t = torch.tensor(rows)

    @torch.no_grad()
    def predict(split: str) -> np.ndarray:
        probe.eval()
        out = torch.cat([torch.sigmoid(probe(t[:, 1:])) for t in tokens[split].split(128)]).numpy()
        probe.train()
        return out

    best = (-math.inf, 0, None, None)
    for step in range(recipe.steps):
        set_lr(optimizer, lr_at(step, peak_lr=lr, warmup_steps=recipe.steps // 10, total_steps=recipe.steps,
                                min_lr=0.0))  # fmt: skip
        batch = rows_t[torch.randint(len(rows_t), (recipe.batch,), generator=generator)]
        x_BTD = drop_tokens(tokens["train"][batch], recipe.token_drop, generator)
        loss = F.binary_cross_entropy_with_logits(probe(x_BTD[:, 1:]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % recipe.val_every == 0:
            val_probs = predict("val")
            score = mean_auroc(val_probs, data.val.labels_NC)
            if score > best[0]:
                best = (score, step + 1, val_probs, predict("test"))
    return best


# ---- multiple-instance heads -----------------------------------------------------------------------
@dataclass
class MilRecipe:
    """Multiple-instance learning on the frozen tokens (a finding is local: one token may carry it):
    every block's layer-normed patch tokens (`block_tokens`, L x D * depth), standardized per feature
    over the labelled images' tokens; a linear score per token and finding; the image logit pools the
    L token scores: `max`, `mean` (= a linear model on mean-pooled tokens) or `lse`, the log-mean-exp
    at temperature r, (log sum exp(r s) - log L) / r, between the mean (r -> 0) and the max. Fitted
    full-batch by L-BFGS on BCE + ||W||^2 / (2 C N) (per finding, sklearn's logistic regression loss
    up to a factor), C in `cs` chosen on validation mean AUROC."""

    pool: str
    temperature: float = 1.0
    # 10x the logistic probes' grid: per-token standardization leaves pooled features a smaller scale
    # (mil_mean needs C >= 1 to match `multiprobe`'s 0.713 at seed 0)
    cs: tuple[float, ...] = (0.1, 1.0, 10.0)
    max_iter: int = 200


MIL_RECIPES = {
    "mil_max": MilRecipe("max"),
    "mil_lse1": MilRecipe("lse", 1.0),
    "mil_lse5": MilRecipe("lse", 5.0),
    "mil_mean": MilRecipe("mean"),
}
MIL_RECIPES |= {f"{name}_views": spec for name, spec in MIL_RECIPES.items()}  # fitted on NUM_VIEWS crops


def mil_logits(recipe: MilRecipe, scores_BLC: torch.Tensor) -> torch.Tensor:
    """(B, L, C) token scores -> (B, C) image logits under the recipe's pooling."""
    if recipe.pool == "max":
        return scores_BLC.amax(dim=1)
    if recipe.pool == "mean":
        return scores_BLC.mean(dim=1)
    r = recipe.temperature
    return (torch.logsumexp(r * scores_BLC, dim=1) - math.log(scores_BLC.shape[1])) / r


def fit_mil_linear(recipe: MilRecipe, x_NLF: torch.Tensor, targets_NC: torch.Tensor, c_value: float):
    """L-BFGS on BCE of the pooled token scores + ||W||^2 / (2 C N); (F, C) W and (C,) b. W starts
    small and random (seeded): at W = 0 every token ties and max pooling has no descent direction."""
    generator = torch.Generator().manual_seed(0)
    weight_FC = (
        1e-3 * torch.randn(x_NLF.shape[2], targets_NC.shape[1], generator=generator)
    ).requires_grad_()
    bias_C = torch.zeros(targets_NC.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight_FC, bias_C], max_iter=recipe.max_iter, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        logits = mil_logits(recipe, x_NLF @ weight_FC + bias_C)
        bce = F.binary_cross_entropy_with_logits(logits, targets_NC, reduction="sum") / len(targets_NC)
        loss = bce + weight_FC.pow(2).sum() / (2 * c_value * len(targets_NC))
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight_FC.detach(), bias_C.detach()


def fit_mil(recipe: MilRecipe, x_train, y_train, x_val, y_val, x_test) -> tuple[np.ndarray, dict]:
    """(N, L, F) patch tokens of the labelled images, (N, C) labels, val / test tokens -> (N_test, C)
    test probabilities and what validation chose."""
    mean_F = x_train.mean(dim=(0, 1))
    std_F = x_train.std(dim=(0, 1)) + 1e-6
    x_train, x_val, x_test = ((x - mean_F) / std_F for x in (x_train, x_val, x_test))
    targets = torch.from_numpy(y_train).float()
    best = None
    for c_value in recipe.cs:
        weight_FC, bias_C = fit_mil_linear(recipe, x_train, targets, c_value)
        val_probs, test_probs = (
            torch.sigmoid(mil_logits(recipe, x @ weight_FC + bias_C)).numpy() for x in (x_val, x_test)
        )
        score = mean_auroc(val_probs, y_val)
        if best is None or score > best[0]:
            best = (score, c_value, test_probs)
    return best[2], {"C": best[1], "val_mean_auroc": best[0]}


def downstream(work: Path, name: str, recipe: str, fraction: float, data: Data) -> dict:
    """Pre-trained and random init (and pixels) under one recipe; test probs saved, gap + interval."""
    clock = Clock()
    y_val, y_test = data.val.labels_NC, data.test.labels_NC
    probs = {"pretrained": [], "random": []}
    chosen = {"pretrained": [], "random": []}
    for init, which in (("pretrained", "final"), ("random", "init")):
        if recipe in PROBE_RECIPES:
            encoder, image_hw = load_encoder(work, name, which)
            feats = {
                s: encoder_features(encoder, getattr(data, s).full(image_hw), PROBE_RECIPES[recipe])
                for s in ("train", "val", "test")
            }
        elif recipe in ATTENTIVE_RECIPES or recipe in MIL_RECIPES:
            spec = ATTENTIVE_RECIPES.get(recipe) or MIL_RECIPES[recipe]
            encoder, image_hw = load_encoder(work, name, which)
            tokens = {
                s: frozen_split_tokens(
                    encoder, getattr(data, s).full(image_hw), getattr(spec, "tokens", "blocks")
                )
                for s in ("train", "val", "test")
            }
        for seed in SEEDS:
            rows = data.label_rows(fraction, seed)
            if recipe in PROBE_RECIPES:
                x_train, y_train = feats["train"][rows], data.train.labels_NC[rows]
                if recipe.endswith("_views"):
                    x_train, y_train = view_features(work, data, encoder, image_hw, PROBE_RECIPES[recipe],
                                                     fraction, seed)  # fmt: skip
                test_probs, pick = fit_logistic(x_train, y_train, feats["val"], y_val, feats["test"])
            elif recipe in MIL_RECIPES:
                x_train, y_train = tokens["train"][rows, 1:], data.train.labels_NC[rows]
                if recipe.endswith("_views"):
                    images, y_train = labelled_views(work, data, image_hw, fraction, seed)
                    x_train = frozen_split_tokens(encoder, images, "blocks")[:, 1:]
                test_probs, pick = fit_mil(
                    spec, x_train, y_train, tokens["val"][:, 1:], y_val, tokens["test"][:, 1:]
                )
            elif recipe in ATTENTIVE_RECIPES:
                best = max(
                    ((fit_attentive(spec, lr, tokens, data, rows, seed), lr) for lr in spec.lrs),
                    key=lambda pair: pair[0][0],
                )
                (score, step, _, test_probs), lr = best
                pick = {"lr": lr, "step": step, "val_mean_auroc": score}
            else:
                spec = FINETUNE_RECIPES[recipe]
                best = None
                for lr in spec.lrs:
                    encoder, image_hw = load_encoder(work, name, which, spec.drop_path)
                    val_probs, test_probs_lr = finetune(spec, lr, encoder, image_hw, data, rows, seed)
                    score = mean_auroc(val_probs, y_val)
                    if best is None or score > best[0]:
                        best = (score, lr, test_probs_lr)
                test_probs, pick = best[2], {"lr": best[1], "val_mean_auroc": best[0]}
            probs[init].append(test_probs)
            chosen[init].append(pick)
    a, b = np.stack(probs["pretrained"]), np.stack(probs["random"])
    np.savez(work / "variants" / name / f"{recipe}_lf{fraction}.npz", pretrained=a, random=b)
    low, high = bootstrap_interval(a, y_test, b, num_resamples=1000)
    gap = {"gap": float(np.mean([mean_auroc(p, y_test) for p in a]) - np.mean([mean_auroc(p, y_test) for p in b])),
           "lo": low, "hi": high}  # fmt: skip
    record = {
        "name": name, "recipe": recipe, "lf": fraction, "num_labelled": [len(data.label_rows(fraction, s)) for s in SEEDS],
        "num_test": len(y_test),
        "pretrained": [round(mean_auroc(p, y_test), 4) for p in a],
        "random": [round(mean_auroc(p, y_test), 4) for p in b],
        "per_class": {init: per_class_auroc(p, y_test) for init, p in (("pretrained", a), ("random", b))},
        "gap_ci95": [round(gap["lo"], 4), round(gap["hi"], 4)], "gap": round(gap["gap"], 4),
        "chosen": chosen, **clock.read(),
    }  # fmt: skip
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def pixels(work: Path, fraction: float, data: Data) -> None:
    """Logistic regression on 32x32 area-downsampled pixels, the same C grid and seeds."""

    def small(split):
        return F.adaptive_avg_pool2d(split.full((128, 128)), 32).flatten(1).numpy()

    x = {s: small(getattr(data, s)) for s in ("train", "val", "test")}
    scores = []
    for seed in SEEDS:
        rows = data.label_rows(fraction, seed)
        test_probs, _ = fit_logistic(
            x["train"][rows], data.train.labels_NC[rows], x["val"], data.val.labels_NC, x["test"]
        )
        scores.append(round(mean_auroc(test_probs, data.test.labels_NC), 4))
    record = {"name": "pixels32", "recipe": "pixels", "lf": fraction, "pretrained": scores}
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def table(work: Path) -> None:
    """One markdown row per results line; `val` = the chosen classifiers' validation mean AUROC, mean
    over seeds and both inits (what a recipe is chosen on: it favours neither init)."""
    print("| variant | recipe | lf | val | pre-trained | random init | gap [95% CI] | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for line in (work / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        pre = f"{np.mean(r['pretrained']):.3f} {r['pretrained']}"
        if "random" not in r:
            print(f"| {r['name']} | {r['recipe']} | {r['lf']} | | {pre} | | | |")
            continue
        val = np.mean([c["val_mean_auroc"] for init in ("pretrained", "random") for c in r["chosen"][init]])
        rnd = f"{np.mean(r['random']):.3f} {r['random']}"
        gap = f"{r['gap']:+.3f} [{r['gap_ci95'][0]:+.3f}, {r['gap_ci95'][1]:+.3f}]"
        print(
            f"| {r['name']} | {r['recipe']} | {r['lf']} | {val:.3f} | {pre} | {rnd} | {gap} | {r['cpu_s']} |"
        )


def pooled(work: Path, names: list[str], recipe: str, fraction: float, data: Data) -> None:
    """The gap over several pre-training runs (e.g. train.seed 0, 1, 2), each against its own step-0
    encoder: the 3 label seeds of every run stacked (S = 3 x runs), one paired interval over test
    images (the runs' saved test probabilities of `recipe`)."""
    saved = [np.load(work / "variants" / n / f"{recipe}_lf{fraction}.npz") for n in names]
    a = np.concatenate([z["pretrained"] for z in saved])
    b = np.concatenate([z["random"] for z in saved])
    y_test = data.test.labels_NC
    pre, rnd = (np.mean([mean_auroc(p, y_test) for p in probs]) for probs in (a, b))
    low, high = bootstrap_interval(a, y_test, b, num_resamples=1000)
    record = {"names": names, "recipe": recipe, "lf": fraction, "pretrained": round(pre, 4),
              "random": round(rnd, 4), "gap": round(float(pre - rnd), 4),
              "gap_ci95": [round(low, 4), round(high, 4)],
              "per_class": {"pretrained": per_class_auroc(a, y_test), "random": per_class_auroc(b, y_test)}}  # fmt: skip
    print(json.dumps(record), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("prepare", "pretrain", "downstream", "pixels", "table", "pooled"))
    p.add_argument("--work", type=Path, default=Path("runs/claim"))
    p.add_argument("--name", nargs="+", help="variant name (pretrain, downstream; pooled: several)")
    p.add_argument(
        "--recipe",
        nargs="+",
        default=["probe"],
        choices=[*PROBE_RECIPES, *ATTENTIVE_RECIPES, *MIL_RECIPES, *FINETUNE_RECIPES],
    )
    p.add_argument("--lf", type=float, nargs="+", default=[0.1])
    p.add_argument(
        "--set", nargs="*", default=[], metavar="section.key=value", help="tiny_cpu overrides (pretrain)"
    )
    p.add_argument("--long-side", type=int, default=128, help="prepare: conversion size (pixels)")
    p.add_argument(
        "--visible-weight", type=float, default=0.0, help="pretrain: weight of the loss on visible patches"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.command == "prepare":
        return prepare(args.work, args.long_side)
    if args.command == "table":
        return table(args.work)
    data = Data(args.work)
    if args.command == "pretrain":
        pretrain(args.work, args.name[0], args.set, data, args.visible_weight)
    elif args.command == "pooled":
        for fraction in args.lf:
            for recipe in args.recipe:
                pooled(args.work, args.name, recipe, fraction, data)
    elif args.command == "pixels":
        for fraction in args.lf:
            pixels(args.work, fraction, data)
    else:
        for fraction in args.lf:
            for recipe in args.recipe:
                downstream(args.work, args.name[0], recipe, fraction, data)


if __name__ == "__main__":
    main()
