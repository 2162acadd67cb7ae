"""Pre-trained vs random init on labelled shards, every classifier trained in this one process.

The demo's classification stage (`summary["classify"]`) and `benchmarks/masking_compare.py` use it.
From one pre-training run it trains classifiers on the same few labelled images from

- the run's final weights (`pre-trained`),
- the run's step-0 weights (`random init`: same architecture, same init seed; `step0_source`),

with the same recipe and the same LR grid, each LR and step chosen on the validation split, and
adds two references: the frozen pre-trained encoder under MAE's linear probe (`linear probe`: head on
the mean final-norm patch token) and a logistic regression on 32×32 downsampled pixels (`pixels`).
The default recipe (`DEFAULT_RECIPE` = `BLOCKS_VIEWS_RECIPE`) is itself a probe of the frozen encoder:
the engine's BatchNorm + linear head on every block's mean patch token (`classify.pool=blocks`),
trained on crops of the labelled images drawn by `finetune`'s own augmentation; chosen over partial
fine-tuning and the other probes on validation mean AUROC and cost (benchmarks/RESULTS.md, "the
demo's classification recipe, chosen"). Every row is scored on the whole test set (a second `synth`
seed in the demo), for several seeds (label subset, head init, batch order), with a paired
bootstrap interval for the pre-trained minus random-init gap.

Why not one `xray-pretrain finetune` launch per classifier: each costs ~30 s CPU of start-up
(DeepSpeed, loaders), and the comparison needs ~20 classifiers (benchmarks/RESULTS.md). What is
shared with `finetune`: `ClassifyTask` (model, head init, freezing, parameter groups with layer
decay, loss, metrics with validation-chosen thresholds), the label fraction drawn by patient
(`label_fraction_subset`), the engine's weights-only init (every key accounted for) and its AdamW
with warm-up + cosine, and with `Recipe.views` its training dataset and augmentation
(`augmented_views`). What differs, for speed: the frozen part of the model runs once per image
(`ClassificationModel.frozen_tokens`): on `Recipe.views` fixed crops of each labelled image where
`finetune` draws a new crop every step, or (`views=0`) on the whole image, as validation sees it,
with a random subset of its tokens per sample and step as the augmentation (`Recipe.token_drop`,
MAE-style token masking); batches are drawn with replacement; validation every `Recipe.val_every`
steps keeps the best weights, as `checkpoints/best` does. `Recipe.head=logistic` (scikit-learn) has
no `finetune` counterpart: it is kept to compare with benchmarks/claim_levers.py's `multiprobe`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from xray_pretrain.engine.init_weights import (
    InitSource,
    load_into,
    open_source,
    step0_source,
)
from xray_pretrain.engine.optim import build_optimizer, lr_at, set_lr
from xray_pretrain.models.heads import pool_tokens
from xray_pretrain.models.masking import select_visible
from xray_pretrain.tasks.classify import ClassifyTask, label_fraction_subset
from xray_pretrain.tasks.classify_config import ClassifyConfig
from xray_pretrain.tasks.metrics import bootstrap_interval, fast_mean_auroc

PIXELS_SIDE = 32  # the pixel baseline's downsampled size (area averaging)
PIXELS_C_GRID = (0.01, 0.1, 1.0)  # its logistic-regression inverse regularization, chosen on val
EVAL_BATCH = 128


@dataclass(frozen=True)
class Recipe:
    """How every classifier of one row trains (the same for both inits).

    Field defaults: partial fine-tuning with the first 3 of 4 blocks frozen, mean-pooled tokens, 10%
    of the training patients, LR in {3e-3, 1e-2} chosen on validation (`PARTIAL_RECIPE`, the demo's
    recipe before `BLOCKS_VIEWS_RECIPE`). `head`: `adamw` trains the head (and the unfrozen blocks)
    as `xray-pretrain finetune` does; `logistic` (mode linear only) fits one scikit-learn logistic
    regression per label on the standardized pooled frozen features instead, C in `cs` chosen on
    validation (no steps, LR or token drop).
    `pretrain_overrides` are the run-config overrides the pre-training run of this recipe uses (the
    demo passes them to `pretrain`)."""

    mode: str = "partial"  # classify.mode: linear | partial (finetune has no frozen part to reuse)
    freeze_blocks: int = 3
    pool: str = "mean"  # classify.pool: cls | mean | blocks (linear only)
    head: str = "adamw"  # adamw | logistic (see above)
    cs: tuple[float, ...] = (0.01, 0.1, 1.0)  # logistic: inverse regularization grid
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    lrs: tuple[float, ...] = (3e-3, 1e-2)
    steps: int = 300
    batch: int = 16
    warmup_steps: int = 30
    token_drop: float = 0.25  # share of patch tokens left out per sample and step (augmentation)
    # > 0: instead, each labelled image is seen as this many views drawn by `finetune`'s training
    # augmentation (`augmented_views`), the frozen part run once per view
    views: int = 0
    clip_grad: float = 1.0  # as optim.clip_grad
    betas: tuple[float, float] = (0.9, 0.999)
    val_every: int = 50
    label_fraction: float = 0.1
    pretrain_overrides: tuple[str, ...] = ("model.norm_pix_loss=true",)

    def classify_config(self, seed: int) -> ClassifyConfig:
        cfg = ClassifyConfig(
            mode=self.mode, freeze_blocks=self.freeze_blocks if self.mode == "partial" else 0, pool=self.pool,
            layer_decay=self.layer_decay, label_fraction=self.label_fraction, fraction_seed=seed,
        )  # fmt: skip
        cfg.validate()
        if cfg.mode == "finetune":
            raise ValueError(
                "Recipe.mode=finetune: use linear or partial (the frozen part runs once per image)"
            )
        if self.head not in HEADS:
            raise ValueError(f"Recipe.head={self.head!r}: use one of {HEADS}")
        if self.head == "logistic" and cfg.mode != "linear":
            raise ValueError("Recipe.head=logistic needs mode=linear (it fits on frozen features)")
        if self.views and (self.head != "adamw" or self.token_drop):
            raise ValueError(
                "Recipe.views: for head=adamw with token_drop=0 (the views are the augmentation)"
            )
        return cfg


HEADS = ("adamw", "logistic")
PARTIAL_RECIPE = Recipe()
# The linear probe row: frozen encoder, parameter-free BatchNorm + linear head (MAE's probe).
PROBE_RECIPE = replace(PARTIAL_RECIPE, mode="linear", lrs=(1e-2, 1e-1), layer_decay=1.0, weight_decay=0.0)
# Frozen encoder, head on every block's mean patch token (`classify.pool=blocks`), trained as the
# engine trains it (`finetune classify.mode=linear classify.pool=blocks`) ...
BLOCKS_RECIPE = replace(PROBE_RECIPE, pool="blocks")
# ... or as benchmarks/claim_levers.py's `multiprobe`: logistic regression per finding, C on validation.
BLOCKS_LOGISTIC_RECIPE = replace(BLOCKS_RECIPE, head="logistic")
# ... or with finetune's crop and exposure jitter instead of token drop (32 views of each labelled image).
BLOCKS_VIEWS_RECIPE = replace(BLOCKS_RECIPE, views=32, token_drop=0.0)
RECIPES = {
    "partial": PARTIAL_RECIPE,
    "probe": PROBE_RECIPE,
    "blocks": BLOCKS_RECIPE,
    "blocks_logistic": BLOCKS_LOGISTIC_RECIPE,
    "blocks_views": BLOCKS_VIEWS_RECIPE,
}
AUGMENT_CONFIG = "classify_phantom"  # the packaged config whose `data` augmentation `views` draws with
# The demo's: of the recipes measured on the demo's data, the best validation mean AUROC over both
# inits by far, at under 1 minute of one core, and what `finetune classify.mode=linear
# classify.pool=blocks` trains (benchmarks/RESULTS.md, "the demo's classification recipe, chosen").
DEFAULT_RECIPE = BLOCKS_VIEWS_RECIPE


@dataclass
class Split:
    """One split in memory: images as validation sees them, and their labels."""

    images_NCHW: torch.Tensor
    labels_NL: torch.Tensor  # as the loader gives them, in `label_names` order
    label_names: list[str]
    keys: list[str]
    targets_NC: torch.Tensor | None = None  # 1 / 0 / NaN in the comparison's order (`set_targets`)

    def set_targets(self, task: ClassifyTask) -> None:
        """Targets by label name, under the task's policy for uncertain labels."""
        task.bind_labels(task.label_names, self.label_names)
        self.targets_NC = task.targets(self.labels_NL)
        task.bind_labels(task.label_names, task.label_names)


@dataclass
class Row:
    """One row of the comparison: test probabilities per seed and what chose them."""

    probs_SNC: np.ndarray
    test_mean_auroc: list[float]  # per seed
    test_auroc: list[dict[str, float | None]]  # per seed, per label
    chosen: list[dict] = field(default_factory=list)  # per seed: lr (or C), step, val mean AUROC


# ---- data ------------------------------------------------------------------------------------------
def load_split(shards: list[Path], splits: list[str], image_size) -> Split:
    """Every sample of `splits` of `shards`, decoded and normalized as the validation loader does."""
    from xray_pretrain.data.config import DataConfig
    from xray_pretrain.data.loader import build_val_loader

    data = DataConfig(shards=[str(s) for s in shards], backend="wds", num_workers=0)
    images, labels, keys, names = [], [], [], None
    for split in splits:
        loader = build_val_loader(
            data, image_size=tuple(image_size), micro_batch=EVAL_BATCH, rank=0, world_size=1,
            whole_split=True, split=split,
        )  # fmt: skip
        names = list(loader.label_names)  # the folders' union: the same for every split
        for batch in loader:
            keep = batch["weight"] > 0
            images.append(batch["image"][keep])
            labels.append(batch["labels"][keep])
            keys.extend(k for k, kept in zip(batch["key"], keep.tolist()) if kept)
    if not keys:
        raise ValueError(f"no samples of splits {splits} in {[str(s) for s in shards]}")
    return Split(torch.cat(images), torch.cat(labels), names, keys)


def labelled_table(shards: list[Path], label_names: list[str], fraction: float, seed: int):
    """The training SplitTable restricted to a `fraction` of its patients, as `finetune` draws it."""
    from xray_pretrain.data.shards import SplitTable, open_folders

    table = SplitTable(open_folders([str(s) for s in shards]), "train", label_names)
    return label_fraction_subset(table, fraction, seed) if fraction < 1 else table


def train_rows(
    shards: list[Path], label_names: list[str], fraction: float, seed: int, keys: list[str]
) -> np.ndarray:
    """Row indices (into `keys`, the loaded train split) of a `fraction` of the training patients."""
    table = labelled_table(shards, label_names, fraction, seed)
    chosen = {table.key(f, i) for f, size in enumerate(table.folder_sizes) for i in range(size)}
    return np.array([i for i, k in enumerate(keys) if k in chosen], dtype=np.int64)


def augmented_views(
    shards: list[Path], label_names: list[str], fraction: float, seed: int, num_views: int, image_size
) -> tuple[torch.Tensor, list[str]]:
    """(num_views * N, 1, H, W) views of the N labelled training images (view k of image n at row
    k * N + n), each drawn by the training loader's own dataset and augmentation (`AUGMENT_CONFIG`'s
    `data` section: what `finetune` trains with), under `seed`; and the N keys."""
    from xray_pretrain.config import load_config
    from xray_pretrain.data.loader import item_table, train_augment
    from xray_pretrain.data.wds import TrainDataset

    table = labelled_table(shards, label_names, fraction, seed)
    pairs = [(f, i) for f, size in enumerate(table.folder_sizes) for i in range(size)]
    augment = train_augment(load_config(AUGMENT_CONFIG, ["data.shards=[unused]"]).data)
    dataset = TrainDataset(item_table(table, None), augment, seed, tuple(image_size))
    images = [
        dataset[(k * len(pairs) + n, f, i)]["image"]
        for k in range(num_views)
        for n, (f, i) in enumerate(pairs)
    ]
    return torch.stack(images), [table.key(f, i) for f, i in pairs]


# ---- one classifier --------------------------------------------------------------------------------
def classify_task(run_cfg, recipe: Recipe, seed: int, label_names: list[str]) -> ClassifyTask:
    """The `classify` task of a fine-tune that starts from this pre-training run's encoder."""
    cfg = copy.deepcopy(run_cfg)
    cfg.task, cfg.classify = "classify", recipe.classify_config(seed)
    cfg.model.drop_path = 0.0  # frozen tokens are computed once: nothing random inside the model
    task = ClassifyTask(cfg)
    task.bind_labels(label_names, label_names)
    return task


def initialized_model(task: ClassifyTask, source: InitSource, seed: int):
    """The task's classifier (head drawn under `seed`) with the source's encoder loaded, every key
    accounted for as `init.weights` does."""
    torch.manual_seed(seed)
    model = task.build_model()
    load_into(model, source, tuple(task.init_new_prefixes), tuple(task.init_unused_prefixes))
    return model


@torch.no_grad()
def frozen_tokens(model, images_NCHW: torch.Tensor) -> torch.Tensor:
    """(N, 1 + L, D) output of the model's frozen part for every image (eval mode)."""
    model.eval()
    return torch.cat([model.frozen_tokens(x) for x in images_NCHW.split(EVAL_BATCH)])


@torch.no_grad()
def probabilities(model, tokens_NTD: torch.Tensor) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model.forward_frozen(t).float()) for t in tokens_NTD.split(EVAL_BATCH)]
    return torch.cat(out).numpy().astype(np.float64)


def drop_tokens(tokens_BTD: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """Keep the cls token and a random (1 - share) of the patch tokens of each sample (in order)."""
    num_patches = tokens_BTD.shape[1] - 1
    num_keep = num_patches - int(round(share * num_patches))
    if num_keep == num_patches:
        return tokens_BTD
    noise_BL = torch.rand(tokens_BTD.shape[0], num_patches, generator=generator)
    ids_BK = select_visible(noise_BL, num_keep)[0] + 1
    kept = tokens_BTD.gather(1, ids_BK.unsqueeze(-1).expand(-1, -1, tokens_BTD.shape[2]))
    return torch.cat([tokens_BTD[:, :1], kept], dim=1)


def fit(task, model, tokens: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], rows: np.ndarray,
        lr: float, recipe: Recipe, seed: int) -> tuple[float, int, dict]:  # fmt: skip
    """Train `model` on `rows` of the train tokens; validate every `recipe.val_every` steps and keep
    the best. Returns (best validation mean AUROC, its step, its weights)."""
    generator = torch.Generator().manual_seed(seed)
    groups = task.param_groups(model, recipe.weight_decay)
    optimizer = build_optimizer(groups, lr, recipe.betas)
    params = [p for g in groups for p in g["params"]]
    rows_t = torch.from_numpy(rows)
    best = (-math.inf, 0, None)
    model.train()
    for step in range(recipe.steps):
        set_lr(optimizer, lr_at(step, peak_lr=lr, warmup_steps=recipe.warmup_steps, total_steps=recipe.steps,
                                min_lr=0.0))  # fmt: skip
        batch = rows_t[torch.randint(len(rows_t), (recipe.batch,), generator=generator)]
        x_BTD = drop_tokens(tokens["train"][batch], recipe.token_drop, generator)
        loss = task.loss(model.forward_frozen(x_BTD), targets["train"][batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad)
        optimizer.step()
        if (step + 1) % recipe.val_every == 0 or step + 1 == recipe.steps:
            score = validation_auroc(model, tokens["val"], targets["val"])
            if score > best[0]:
                best = (score, step + 1, copy.deepcopy(model.state_dict()))
            model.train()  # validation left it in eval mode
    return best


def validation_auroc(model, tokens_NTD: torch.Tensor, targets_NC: torch.Tensor) -> float:
    """Validation mean AUROC (what `checkpoints/best` is chosen on); -inf when nothing is scorable."""
    value = fast_mean_auroc(probabilities(model, tokens_NTD), targets_NC.numpy().astype(np.float64))
    return -math.inf if value is None else value


def _rows(probs_NC: np.ndarray, targets_NC: torch.Tensor) -> dict[str, list]:
    return {"probabilities": probs_NC.tolist(), "targets": targets_NC.tolist()}


def pixel_baseline(
    data: dict[str, Split], rows: np.ndarray, label_names: list[str]
) -> tuple[np.ndarray, dict, dict]:
    """Logistic regression per label on 32×32 area-downsampled pixels (`logistic_per_label`).
    Returns (test probabilities (N, C), test metrics, what was chosen)."""
    import torch.nn.functional as F

    pixels = {
        n: F.adaptive_avg_pool2d(s.images_NCHW, PIXELS_SIDE).flatten(1).numpy() for n, s in data.items()
    }
    return logistic_per_label(pixels, data, rows, label_names, PIXELS_C_GRID)


def logistic_per_label(
    features: dict[str, np.ndarray], data: dict[str, Split], rows: np.ndarray, label_names: list[str],
    c_grid: tuple[float, ...],
) -> tuple[np.ndarray, dict, dict]:  # fmt: skip
    """Per label, a logistic regression on `features[split]` (N, F) standardized on the labelled
    `rows` of train, fit on those rows; C in `c_grid` chosen on validation mean AUROC, thresholds on
    validation. Returns (test probabilities (N, C), test metrics, what was chosen)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from xray_pretrain.tasks.metrics import choose_thresholds, classification_metrics

    targets = {n: s.targets_NC.numpy().astype(np.float64) for n, s in data.items()}
    scaler = StandardScaler().fit(features["train"][rows])
    features = {n: scaler.transform(x) for n, x in features.items()}

    def predict(c: float) -> dict[str, np.ndarray]:
        probs = {n: np.full((len(x), len(label_names)), 0.5) for n, x in features.items()}
        for j in range(len(label_names)):
            y = targets["train"][rows, j]
            known = ~np.isnan(y)
            if len(set(y[known])) < 2:
                continue  # one kind of label in the subset: no model, p = 0.5 (unscorable anyway)
            model = LogisticRegression(C=c, max_iter=2000).fit(features["train"][rows][known], y[known])
            for n, x in features.items():
                probs[n][:, j] = model.predict_proba(x)[:, 1]
        return probs

    best = None
    for c in c_grid:
        probs = predict(c)
        thresholds = choose_thresholds(probs["val"], targets["val"])
        val = classification_metrics(probs["val"], targets["val"], label_names, thresholds)["mean_auroc"]
        if best is None or (val or -1) > best[0]:
            best = (val or -1, c, probs, thresholds)
    val, c, probs, thresholds = best
    test = classification_metrics(probs["test"], targets["test"], label_names, thresholds)
    return probs["test"], {f"val_{k}": v for k, v in test.items()}, {"C": c, "val_mean_auroc": val}


# ---- the comparison ---------------------------------------------------------------------------------
class Comparison:
    """Labelled images loaded once (train and val of `shards`, every split of `test_shards`, at the
    image size of the pre-training run in `run_dir`), then rows: one per (encoder source, recipe),
    each over the same seeds and label subsets."""

    def __init__(self, run_dir: Path, shards: Path, test_shards: Path, test_splits=("train", "val", "test")):
        import yaml

        from xray_pretrain.config import config_from_dict

        self.shards = Path(shards)
        self.run_cfg = config_from_dict(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
        size = self.run_cfg.model.image_hw()
        self.data = {
            "train": load_split([shards], ["train"], size),
            "val": load_split([shards], ["val"], size),
            "test": load_split([test_shards], list(test_splits), size),
        }
        self.label_names = self.data["train"].label_names
        for split in self.data.values():
            split.set_targets(classify_task(self.run_cfg, DEFAULT_RECIPE, 0, self.label_names))
        self.tokens_cache: dict = {}
        self.subsets: dict = {}

    @property
    def num_test(self) -> int:
        return len(self.data["test"].keys)

    def train_subset(self, fraction: float, seed: int) -> np.ndarray:
        if (fraction, seed) not in self.subsets:
            keys = self.data["train"].keys
            self.subsets[fraction, seed] = train_rows([self.shards], self.label_names, fraction, seed, keys)
        return self.subsets[fraction, seed]

    def row(self, source: InitSource, recipe: Recipe, seeds: tuple[int, ...]) -> Row:
        """Classifiers of `recipe` from `source`'s encoder, one per seed (each the best of the LR grid)."""
        row = self._empty(len(seeds))
        for s, seed in enumerate(seeds):
            subset = self.train_subset(recipe.label_fraction, seed)
            self._record(row, s, self._best_of_grid(source, recipe, seed, subset))
        return row

    def pixel_row(self, fraction: float, seeds: tuple[int, ...]) -> Row:
        row = self._empty(len(seeds))
        for s, seed in enumerate(seeds):
            self._record(
                row, s, pixel_baseline(self.data, self.train_subset(fraction, seed), self.label_names)
            )
        return row

    def _frozen(self, source: InitSource, recipe: Recipe, model) -> dict[str, torch.Tensor]:
        """`model`'s frozen tokens of every split: the same for every seed and LR, so computed once."""
        key = (str(source.path), source.kind, recipe.mode, recipe.freeze_blocks, recipe.pool == "blocks")
        if key not in self.tokens_cache:
            self.tokens_cache[key] = {
                n: frozen_tokens(model, split.images_NCHW) for n, split in self.data.items()
            }
        return self.tokens_cache[key]

    def _with_views(self, model, recipe: Recipe, seed: int, tokens: dict, targets: dict):
        """`tokens` and `targets` with the train split replaced by `recipe.views` augmented views of
        each labelled image, and the rows to train on (all of them)."""
        images, keys = augmented_views(
            [self.shards], self.label_names, recipe.label_fraction, seed, recipe.views, self.run_cfg.model.image_hw()
        )  # fmt: skip
        row_of = {key: i for i, key in enumerate(self.data["train"].keys)}
        targets_NC = targets["train"][torch.tensor([row_of[key] for key in keys])]
        view_tokens = frozen_tokens(model, images)
        train_targets = targets_NC.repeat(recipe.views, 1)  # view k of image n at row k * N + n
        return (
            {**tokens, "train": view_tokens},
            {**targets, "train": train_targets},
            np.arange(len(keys) * recipe.views),
        )

    def _best_of_grid(self, source: InitSource, recipe: Recipe, seed: int, rows: np.ndarray):
        """One classifier per LR (or C) of the recipe's grid; the one best on validation (LR and step)
        scores the test split once. Returns (test probabilities (N, C), test metrics, the choice)."""
        task = classify_task(self.run_cfg, recipe, seed, self.label_names)
        if recipe.head == "logistic":
            tokens = self._frozen(source, recipe, initialized_model(task, source, seed))
            features = {name: pool_tokens(t, recipe.pool).numpy() for name, t in tokens.items()}
            return logistic_per_label(features, self.data, rows, self.label_names, recipe.cs)
        targets = {name: split.targets_NC for name, split in self.data.items()}
        best, tokens = None, None
        for lr in recipe.lrs:
            model = initialized_model(task, source, seed)
            if tokens is None:
                tokens = self._frozen(source, recipe, model)
                if recipe.views:
                    tokens, targets, rows = self._with_views(model, recipe, seed, tokens, targets)
            score, step, state = fit(task, model, tokens, targets, rows, lr, recipe, seed)
            if best is None or score > best[0]:
                best = (score, lr, step, state, model)
        score, lr, step, state, model = best
        model.load_state_dict(state)
        val = task.metrics(_rows(probabilities(model, tokens["val"]), targets["val"]), None)
        probs = probabilities(model, tokens["test"])
        test = task.metrics(_rows(probs, targets["test"]), {"thresholds": task.fitted_state()["thresholds"]})
        return probs, test, {"lr": lr, "step": step, "val_mean_auroc": val["val_mean_auroc"]}

    def _empty(self, num_seeds: int) -> Row:
        return Row(np.zeros((num_seeds, self.num_test, len(self.label_names))), [], [])

    def _record(self, row: Row, s: int, outcome: tuple[np.ndarray, dict, dict]) -> None:
        probs, test, chosen = outcome
        row.probs_SNC[s] = probs
        row.test_mean_auroc.append(test["val_mean_auroc"])
        row.test_auroc.append({n: test[f"val_auroc/{n}"] for n in self.label_names})
        row.chosen.append(chosen)

    def targets(self) -> np.ndarray:
        """(N, C) test targets, 1 / 0 / NaN."""
        return self.data["test"].targets_NC.numpy().astype(np.float64)


def compare(
    run_dir: Path,
    shards: Path,
    test_shards: Path,
    recipe: Recipe = DEFAULT_RECIPE,
    probe: Recipe | None = PROBE_RECIPE,
    seeds: tuple[int, ...] = (0, 1, 2),
    num_resamples: int = 2000,
    progress: bool = True,
) -> dict:
    """Pre-trained vs random init (and the probe and pixel rows) from the pre-training run in
    `run_dir`, trained on `shards` (train split, `recipe.label_fraction` of its patients; val split
    for every choice) and scored on every sample of `test_shards`. Returns `{"classify": the demo's
    summary entry, "details": per-seed values and choices, "seconds": float}`."""
    start = time.perf_counter()
    # Thousands of tiny ops: one thread is faster than two waiting on each other (tests/conftest.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compare(run_dir, shards, test_shards, recipe, probe, seeds, num_resamples, progress, start)
    finally:
        torch.set_num_threads(threads)


def _compare(run_dir, shards, test_shards, recipe, probe, seeds, num_resamples, progress, start) -> dict:
    from tqdm import tqdm

    bench = Comparison(run_dir, shards, test_shards)
    sources = {"pretrained": open_source(run_dir), "random_init": step0_source(run_dir)}
    arms = {"pretrained": (sources["pretrained"], recipe), "random_init": (sources["random_init"], recipe)}
    if probe is not None:
        arms["linear_probe"] = (sources["pretrained"], replace(probe, label_fraction=recipe.label_fraction))
    rows = {}
    for arm, (source, arm_recipe) in tqdm(arms.items(), desc="classify", unit="row", disable=not progress):
        rows[arm] = bench.row(source, arm_recipe, seeds)
    rows["pixels"] = bench.pixel_row(recipe.label_fraction, seeds)
    low, high = bootstrap_interval(
        rows["pretrained"].probs_SNC,
        bench.targets(),
        rows["random_init"].probs_SNC,
        num_resamples=num_resamples,
    )
    summary = {
        "mean_auroc": _mean(rows["pretrained"].test_mean_auroc),
        "random_init_mean_auroc": _mean(rows["random_init"].test_mean_auroc),
        "pixels_mean_auroc": _mean(rows["pixels"].test_mean_auroc),
        "linear_probe_mean_auroc": _mean(rows["linear_probe"].test_mean_auroc) if probe is not None else None,
        "auroc": {n: _mean([a[n] for a in rows["pretrained"].test_auroc]) for n in bench.label_names},
        "gap_ci95": [round(low, 4), round(high, 4)],
        "num_test": bench.num_test,
        "label_fraction": recipe.label_fraction,
    }
    details = {
        "seeds": list(seeds),
        "num_train": len(bench.data["train"].keys),
        "num_val": len(bench.data["val"].keys),
        "recipe": asdict(recipe),
        "probe_recipe": asdict(probe) if probe is not None else None,
        "rows": {
            arm: {"test_mean_auroc": r.test_mean_auroc, "test_auroc": r.test_auroc, "chosen": r.chosen}
            for arm, r in rows.items()
        },
    }
    return {"classify": summary, "details": details, "seconds": time.perf_counter() - start}


def _mean(values: list[float | None]) -> float | None:
    """Mean over seeds, rounded; None when a seed could not score (a class or split of one kind)."""
    return None if any(v is None for v in values) else round(float(np.mean(values)), 4)
