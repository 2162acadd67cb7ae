"""Use a trained classifier: load a checkpoint, evaluate it on shards, predict raw files, embed samples.

A checkpoint folder carries what inference needs without the training shards (`inference.json`:
label names, the thresholds chosen on validation, intensity mean/std, image size, the conversion
options), and its weights are consolidated from any ZeRO stage. One process (no launcher): the
commands `evaluate`, `predict` and `embed` run here.

Raw files (`predict`) go through the same steps as a shard sample and its loader: decode with
`xray_core` (DICOM modality/VOI LUT, MONOCHROME1, the conversion's intensity policy), resize and
quantize to what the shard would store (`xray_core.images.stored_pixels`), then the loader's
validation transform (whole image resized to the model size, normalized with the training folder's
mean/std). Not reproduced: the lossy JPEG round trip of `jpg` shards (png16/jp2 are lossless).
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xray_pretrain.engine import checkpoint

CSV_SUFFIX = ".csv"


@dataclass
class Classifier:
    model: torch.nn.Module  # ClassificationModel in eval mode, on `device`
    task: object  # the ClassifyTask, labels bound
    cfg: object  # the run's RunConfig
    info: dict  # inference.json
    path: Path  # the checkpoint folder loaded
    device: torch.device


def resolve_inference_checkpoint(path: Path) -> tuple[Path, str]:
    """(checkpoints root, tag): a run folder means its `best` (its latest for a run that selects
    nothing, i.e. pre-training), a checkpoints folder its latest, a step folder (or `best`) itself."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        best = path / "checkpoints" / checkpoint.BEST_TAG
        return (
            (best.parent, best.name)
            if checkpoint.is_complete(best)
            else checkpoint.resolve_checkpoint(best.parent)
        )
    if not path.is_dir():
        raise ValueError(f"--checkpoint {path} is not a folder (a run, its checkpoints or one step folder)")
    return checkpoint.resolve_checkpoint(path)


def load_classifier(path: Path, device: str | None = None) -> Classifier:
    from xray_pretrain.config import config_from_dict
    from xray_pretrain.engine.export import consolidated_state_dict
    from xray_pretrain.tasks import build_task

    root, tag = resolve_inference_checkpoint(path)
    folder = root / tag
    cfg = config_from_dict(json.loads((folder / checkpoint.CONFIG_NAME).read_text()))
    info_path = folder / checkpoint.INFERENCE_NAME
    if cfg.task != "classify" or not info_path.is_file():
        raise ValueError(f"{folder} is not a classifier checkpoint (task={cfg.task}); use `finetune` first")
    info = json.loads(info_path.read_text())
    task = build_task(cfg)
    task.bind_labels(info["label_names"], info["label_names"])
    model = task.build_model()
    # DeepSpeed's consolidation prints progress: keep stdout for results (predict's JSON lines).
    with contextlib.redirect_stdout(sys.stderr):
        state = consolidated_state_dict(root, tag)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{folder} does not match the model its config builds: {err}") from err
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Classifier(model.to(target).eval(), task, cfg, info, folder, target)


# ---- export ----------------------------------------------------------------------------------------
TIMM_POOLS = {"cls": "token", "mean": "avg"}  # timm's avg pools the patch tokens only, as ours


def export_checkpoint(path: Path, out_dir: Path, dtype: str = "fp32") -> dict:
    """`xray-pretrain export`: a classifier checkpoint exports encoder + head, any other its encoder.
    `path` as :func:`resolve_inference_checkpoint` (a run folder means its `best`)."""
    from xray_pretrain.engine.export import check_dtype, export_encoder

    check_dtype(dtype)
    root, tag = resolve_inference_checkpoint(path)
    saved = json.loads((root / tag / checkpoint.CONFIG_NAME).read_text())
    if saved.get("task") == "classify":
        return export_classifier(root / tag, out_dir, dtype)
    return export_encoder(root / tag, out_dir, dtype)


def export_classifier(path: Path, out_dir: Path, dtype: str = "fp32") -> dict:
    """A fine-tuned classifier as one timm model (encoder + linear head, the probe's BatchNorm folded
    in) with its label names, normalization, thresholds and the run's downstream metrics; returns
    :func:`engine.export.write_export`'s summary."""
    from xray_pretrain.engine.export import ClassifierHead, write_export
    from xray_pretrain.engine.model_card import pretraining_data, run_metrics

    root, tag = resolve_inference_checkpoint(path)
    saved = json.loads((root / tag / checkpoint.CONFIG_NAME).read_text())
    data = pretraining_data(saved["data"]["shards"])  # a missing manifest fails before consolidation
    classifier = load_classifier(root / tag, device="cpu")
    model, info = classifier.model, classifier.info
    # The normalization the classifier's inputs get in `predict` (the training folder's), which the
    # export's pretrained_cfg must reproduce.
    data["normalization"] = dict(data["normalization"], **info["intensity"])
    weight_CD, bias_C = model.folded_head()
    head = ClassifierHead(weight_CD, bias_C, list(info["label_names"]), TIMM_POOLS[model.pool])
    provenance = {
        "checkpoint": str(path),
        "checkpoint_tag": tag,
        "run_config": classifier.cfg.to_dict(),
        "classifier": {k: info.get(k) for k in ("mode", "pool", "thresholds", "uncertain", "image_size")},
    }
    return write_export(model.encoder, out_dir, data, dtype, head, provenance, run_metrics(root.parent))


# ---- evaluate --------------------------------------------------------------------------------------
def evaluate(
    classifier: Classifier, split: str, shards: list[str] | None, out: Path, overrides: list[str] = ()
) -> dict:
    """Metrics of the whole `split` (of the run's validation folders, or of `shards`) into `out`
    (JSON) and one row per sample into `out` with .csv (key, label, probability per class).
    Thresholds: the ones validation chose for this checkpoint."""
    import yaml

    from xray_pretrain.config import set_value
    from xray_pretrain.data.loader import build_val_loader

    cfg = classifier.cfg
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        set_value(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else None, where="command line")
    if shards:
        cfg.data.shards, cfg.data.val_shards = list(shards), None
    cfg.data.validate()
    loader = build_val_loader(
        cfg.data, image_size=tuple(classifier.info["image_size"]), micro_batch=cfg.train.micro_batch,
        rank=0, world_size=1, device=classifier.device.type, whole_split=True, split=split,
    )  # fmt: skip
    if loader.num_samples == 0:
        raise ValueError(f"no {split!r} samples in {cfg.data.resolved_val_shards}")
    task = classifier.task
    task.bind_labels(classifier.info["label_names"], loader.label_names)
    rows = task.predict(classifier.model, loader, classifier.device, torch.float32)
    metrics = task.metrics(rows, {"thresholds": classifier.info["thresholds"]})
    result = {
        "checkpoint": str(classifier.path),
        "split": split,
        "shards": cfg.data.resolved_val_shards,
        "thresholds": dict(zip(task.label_names, classifier.info["thresholds"] or [])),
        "metrics": {k.removeprefix("val_"): v for k, v in metrics.items()},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    write_predictions_csv(out.with_suffix(CSV_SUFFIX), task.label_names, rows)
    return result


def write_predictions_csv(path: Path, label_names: list[str], rows: dict[str, list]) -> None:
    """key, then per class `label:NAME` (1 / 0 / empty unknown) and `p:NAME` (probability)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", *(f"label:{n}" for n in label_names), *(f"p:{n}" for n in label_names)])
        for key, targets, probs in zip(rows["key"], rows["targets"], rows["probabilities"]):
            labels = ["" if np.isnan(t) else int(t) for t in targets]
            writer.writerow([key, *labels, *(f"{p:.6f}" for p in probs)])


# ---- predict ---------------------------------------------------------------------------------------
def decode_options(conversion: dict):
    """The DecodeOptions `xray-shard convert` used (as its manifest records them)."""
    from xray_core.images import DecodeOptions

    def names(value):
        return None if value in (None, "any") else frozenset(str(value).upper().split(","))

    return DecodeOptions(
        intensity=conversion.get("intensity", "percentile"),
        modalities=names(conversion.get("modalities", "CR,DX")),
        body_parts=names(conversion.get("body_parts", "CHEST,THORAX,ABSENT")),
        views=names(conversion.get("views")),
        allow_for_processing=bool(conversion.get("allow_for_processing", False)),
        frames=conversion.get("frames", "first"),
    )


def preprocess_file(path: Path, info: dict) -> torch.Tensor:
    """A raw DICOM / PNG / JPEG -> the (1, H, W) normalized tensor its shard sample would give the
    model. Raises SkipInput / OSError / ValueError for an unreadable or refused file."""
    from xray_core.images import FULL_SCALE, stored_pixels
    from xray_core.load import load_image
    from xray_pretrain.data.augment import FULL_VIEW, transform_image

    conversion = info.get("conversion") or {}
    image_format = info["image_format"]
    loaded = load_image(Path(path), decode_options(conversion))
    stored = stored_pixels(
        loaded.unit_hw, image_format, int(conversion["long_side"]), bool(conversion.get("upsample"))
    )
    unit = stored.astype(np.float32) / np.float32(FULL_SCALE[image_format])  # as the loader decodes it
    box = (0, 0, unit.shape[0], unit.shape[1])
    mean, std = info["intensity"]["mean"], info["intensity"]["std"]
    return transform_image(unit, box, tuple(info["image_size"]), FULL_VIEW, mean, std)


@torch.no_grad()
def predict_file(classifier: Classifier, path: Path) -> dict:
    """One JSON-able line: probabilities per label and the labels at or above their thresholds
    (0.5 for a label validation could not score), or the reason the file could not be read."""
    from xray_core.images import SkipInput

    try:
        image_1HW = preprocess_file(path, classifier.info)
    except (SkipInput, OSError, ValueError) as error:
        return {"file": str(path), "error": str(error) or type(error).__name__}
    logits = classifier.model(image_1HW[None].to(classifier.device))
    probs = torch.sigmoid(logits.float())[0].tolist()
    names = classifier.info["label_names"]
    thresholds = classifier.info.get("thresholds") or [None] * len(names)
    return {
        "file": str(path),
        "task": "classify",
        "probabilities": {n: round(p, 6) for n, p in zip(names, probs)},
        "positive": [n for n, p, t in zip(names, probs, thresholds) if p >= (0.5 if t is None else t)],
    }


# ---- embed -----------------------------------------------------------------------------------------
@dataclass
class FeatureModel:
    """What `embed` runs: images (B, 1, H, W) -> pooled features (B, D)."""

    features: object  # callable
    image_size: tuple[int, int]
    data: object  # the run's DataConfig (backend, workers, micro-batch come from it)
    micro_batch: int
    device: torch.device


def load_feature_model(path: Path, device: str | None = None) -> FeatureModel:
    """A classifier checkpoint (its pooling), or a pre-training checkpoint (its encoder's cls token)."""
    from xray_pretrain.models.heads import pool_tokens

    root, tag = resolve_inference_checkpoint(path)
    saved = json.loads((root / tag / checkpoint.CONFIG_NAME).read_text())
    if saved.get("task") == "classify":
        c = load_classifier(root / tag, device)
        return FeatureModel(
            c.model.features, tuple(c.info["image_size"]), c.cfg.data, c.cfg.train.micro_batch, c.device
        )
    from xray_pretrain.engine.export import load_mae_from_checkpoint

    with contextlib.redirect_stdout(sys.stderr):
        mae, cfg, _tag = load_mae_from_checkpoint(root / tag)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = mae.encoder.to(target).eval()
    return FeatureModel(
        lambda images: pool_tokens(encoder(images), "cls"), cfg.model.image_hw(), cfg.data,
        cfg.train.micro_batch, target,
    )  # fmt: skip


@torch.no_grad()
def embed(model: FeatureModel, shards: list[str], splits: list[str], out: Path) -> dict:
    """One pooled encoder feature vector per sample of `splits` of `shards` into `out` (.npz:
    `key` (N,) str, `split` (N,) str, `features` (N, D) float32)."""
    from xray_pretrain.data.config import DataConfig
    from xray_pretrain.data.loader import build_val_loader

    data = DataConfig(shards=list(shards), backend=model.data.backend, num_workers=model.data.num_workers)
    keys, names, features = [], [], []
    for split in splits:
        loader = build_val_loader(
            data, image_size=model.image_size, micro_batch=model.micro_batch, rank=0, world_size=1,
            device=model.device.type, whole_split=True, split=split,
        )  # fmt: skip
        for batch in loader:
            feats = model.features(batch["image"].to(model.device)).float().cpu().numpy()
            keep = batch["weight"].numpy() > 0
            keys.extend(k for k, kept in zip(batch["key"], keep) if kept)
            names.extend([split] * int(keep.sum()))
            features.append(feats[keep])
    if not keys:
        raise ValueError(f"no samples of splits {splits} in {shards}")
    array = np.concatenate(features).astype(np.float32)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # np.savez would append .npz to another suffix
        np.savez(f, key=np.array(keys), split=np.array(names), features=array)
    return {"num_samples": len(keys), "dim": int(array.shape[1]), "out": str(out)}
