"""Disease classification on the encoder: multi-label (binary = one label), linear probe, partial or
full fine-tuning, with model selection on validation (see `ClassifyConfig` for the options).

Labels: the shards' vocabulary (or `classify.labels`), aligned by name. Per label, 1 / 0 train as
such; -1 (uncertain) follows `classify.uncertain`; NaN (unknown) never counts in the loss or metrics.
Loss: binary cross-entropy averaged over the known (sample, label) entries of the micro-batch.

Augmentation (the `data` section, applied by the loaders with the same per-position randomness as
pre-training; the packaged classify configs set it): a random resized crop of 70-100% of the area
at +-10% aspect (positioning and magnification vary between radiographs), small brightness and
contrast jitter (exposure varies), nothing else. Not used: horizontal flips (they move the heart to
the other side: dextrocardia is a finding), rotations beyond what the crop gives, colour or blur
(the stored intensities are calibrated), mixup/cutmix (they blur the multi-label targets on small
findings). Validation and test see the whole image, resized.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from xray_pretrain.collectives import gather_samples
from xray_pretrain.data.shards import ShardReader, SplitTable
from xray_pretrain.models import ClassificationModel, build_encoder
from xray_pretrain.models.param_groups import encoder_layer_decay_groups
from xray_pretrain.tasks.metrics import choose_thresholds, classification_metrics

HEAD_INIT_STD = {"linear": 0.01, "finetune": 2e-5, "partial": 2e-5}  # MAE's probe / fine-tune inits


def select_patients(patients: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded `fraction` of the distinct patients (at least one), the same on every rank."""
    distinct = sorted(set(patients))
    num_keep = max(1, math.ceil(fraction * len(distinct)))
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 7]))).permutation(len(distinct))
    return {distinct[i] for i in order[:num_keep]}


def label_fraction_subset(table: SplitTable, fraction: float, seed: int) -> SplitTable:
    """The training table restricted to the images of a `fraction` of its patients (a patient's
    images stay together, so no patient is half in). Reads every sample's json once."""
    reader = ShardReader()
    try:
        patients = [
            [str(table.metadata(reader, f, i).get("patient") or table.key(f, i)) for i in range(size)]
            for f, size in enumerate(table.folder_sizes)
        ]
    finally:
        reader.close()
    chosen = select_patients([p for folder in patients for p in folder], fraction, seed)
    keep = [[i for i, p in enumerate(folder) if p in chosen] for folder in patients]
    return table.subset(keep)


class ClassifyTask:
    preview_name = None
    selection = ("val_mean_auroc", "max")
    val_whole_split = True  # AUROC over every validation image, gathered from all ranks
    init_new_prefixes = ("head.",)  # the classifier head is new
    init_unused_prefixes = ("decoder_", "mask_fill.")  # the MAE's decoder and mask token

    def __init__(self, cfg):
        self.cfg = cfg
        self.ccfg = cfg.classify
        if self.ccfg.mode == "linear" and cfg.model.drop_path:
            raise ValueError(
                "model.drop_path has no effect with classify.mode=linear (frozen encoder): set it to 0"
            )
        self.label_names: list[str] = []
        self._fitted: dict = {}

    # ---- data ------------------------------------------------------------------------------------
    def restore_inference_state(self, info: dict) -> None:
        """The checkpoint's label names (inference; a resumed run binds the shards' again in bind_data,
        its thresholds come back with the selection state)."""
        self.bind_labels(info["label_names"], info["label_names"])

    def select_train_samples(self, table: SplitTable) -> SplitTable:
        if self.ccfg.label_fraction >= 1:
            return table
        subset = label_fraction_subset(table, self.ccfg.label_fraction, self.ccfg.fraction_seed)
        print(
            f"classify.label_fraction={self.ccfg.label_fraction}: {sum(subset.folder_sizes)} of "
            f"{sum(table.folder_sizes)} training images", flush=True,
        )  # fmt: skip
        return subset

    def bind_data(self, info) -> None:
        """Learn `classify.labels` (or every label of the shards); each must exist in the shards."""
        available = list(info.label_names)
        wanted = list(self.ccfg.labels) if self.ccfg.labels is not None else available
        unknown = [n for n in wanted if n not in available]
        if unknown or not wanted:
            raise ValueError(f"classify.labels: {unknown or 'none'} not in the shards' labels {available}")
        self.bind_labels(wanted, available)

    def bind_labels(self, label_names: list[str], loader_names: list[str]) -> None:
        """Learn/score `label_names`, read by name from batches in `loader_names` order; a name the
        loader lacks (an external test set without that label) reads as unknown."""
        self.label_names = list(label_names)
        self.columns = torch.tensor([loader_names.index(n) if n in loader_names else -1 for n in label_names])
        policy = [self.ccfg.uncertain_policy(n) for n in label_names]
        # value an uncertain (-1) label becomes, per class: NaN ignore, 1 ones, 0 zeros
        self.uncertain_value = torch.tensor(
            [{"ignore": math.nan, "ones": 1.0, "zeros": 0.0}[p] for p in policy]
        )

    def targets(self, labels_BL: torch.Tensor) -> torch.Tensor:
        """Loader labels (B, L) in the loader's order -> (B, C) targets 1 / 0 / NaN (not counted)."""
        y_BC = labels_BL[:, self.columns.clamp_min(0)].float()
        y_BC = torch.where(self.columns >= 0, y_BC, torch.full_like(y_BC, math.nan))
        return torch.where(y_BC == -1, self.uncertain_value.expand_as(y_BC), y_BC)

    # ---- model -----------------------------------------------------------------------------------
    def build_model(self) -> ClassificationModel:
        mode = self.ccfg.mode
        frozen = {"linear": -1, "finetune": 0, "partial": self.ccfg.freeze_blocks}[mode]
        return ClassificationModel(
            build_encoder(self.cfg.model),
            num_classes=len(self.label_names),
            pool=self.ccfg.pool,
            probe_norm=mode == "linear",
            num_frozen_blocks=frozen,
            head_init_std=HEAD_INIT_STD[mode],
        )

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        return encoder_layer_decay_groups(model, weight_decay, self.ccfg.layer_decay)

    # ---- training and evaluation -----------------------------------------------------------------
    def begin_step(self, step: int, total_steps: int) -> None:
        pass  # one loss throughout

    def training_loss(self, model, batch, device, dtype):
        logits_BC = model(batch["image"].to(device, non_blocking=True).to(dtype))
        return self.loss(logits_BC, batch["labels"]), {}

    def loss(self, logits_BC: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy over the known (sample, class) entries of (B, C) logits, given the
        loader's (B, L) labels; 0 (with a gradient path) when no entry is known: no signal."""
        logits_BC = logits_BC.float()
        y_BC = self.targets(labels_BL).to(logits_BC.device)
        known_BC = ~torch.isnan(y_BC)
        if not bool(known_BC.any()):
            return logits_BC.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits_BC[known_BC], y_BC[known_BC])

    @torch.no_grad()
    def predict(self, model, loader, device, dtype) -> dict[str, list]:
        """Every sample of `loader` over all ranks (padding dropped, in split order): `key`,
        `position`, `probabilities` (C floats), `targets` (C floats, NaN unknown)."""
        module = getattr(model, "module", model)
        was_training = module.training
        module.eval()
        columns: dict[str, list] = {"key": [], "position": [], "probabilities": [], "targets": []}
        weights: list[float] = []
        for batch in loader:
            probs_BC = torch.sigmoid(model(batch["image"].to(device).to(dtype)).float()).cpu()
            columns["key"].extend(batch["key"])
            columns["position"].extend(batch["position"].tolist())
            columns["probabilities"].extend(probs_BC.tolist())
            columns["targets"].extend(self.targets(batch["labels"]).tolist())
            weights.extend(batch["weight"].tolist())
        module.train(was_training)
        return gather_samples(columns, weights, order_by="position")

    def evaluate(self, model, loader, device, dtype, fitted: dict | None = None) -> dict:
        """Metrics over the whole split. `fitted` None: validation, thresholds chosen here (kept as
        `fitted_state`); else the thresholds validation chose, applied unchanged (test)."""
        rows = self.predict(model, loader, device, dtype)
        return self.metrics(rows, fitted)

    def metrics(self, rows: dict[str, list], fitted: dict | None) -> dict:
        C = len(self.label_names)
        probs_NC = np.asarray(rows["probabilities"], dtype=np.float64).reshape(-1, C)
        y_NC = np.asarray(rows["targets"], dtype=np.float64).reshape(-1, C)
        if probs_NC.shape[0] == 0:
            raise ValueError("the evaluated split is empty: convert shards with that split")
        if fitted is None:
            self._fitted = {"thresholds": choose_thresholds(probs_NC, y_NC)}
        thresholds = (fitted or self._fitted)["thresholds"]
        metrics = classification_metrics(probs_NC, y_NC, self.label_names, thresholds)
        return {f"val_{k}": v for k, v in metrics.items()}

    def fitted_state(self) -> dict:
        return dict(self._fitted)

    def inference_state(self, fitted: dict) -> dict:
        return {
            "label_names": self.label_names,
            "thresholds": fitted.get("thresholds"),
            "mode": self.ccfg.mode,
            "pool": self.ccfg.pool,
            "uncertain": self.ccfg.uncertain,
        }

    def preview_image(self, model, loader, device, dtype, num_images: int = 4):
        return None

    def flops_per_sample(self) -> float | None:
        return None  # MFU is reported for pre-training; the classifier's cost is the encoder's forward
