"""Use a fine-tuned model (classifier or report generator): load a checkpoint, evaluate it on shards,
predict raw files, embed samples, export it.

A checkpoint folder carries what inference needs without the training shards (`inference.json`:
label names and the thresholds chosen on validation, or the report tokenizer; intensity mean/std,
image size, the conversion options), and its weights are consolidated from any ZeRO stage. One process (no launcher): the
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
class TrainedModel:
    model: torch.nn.Module  # the task's model (ClassificationModel, ReportGenerator) in eval mode
    task: object  # the task, with what inference.json restored (label names, tokenizer)
    cfg: object  # the run's RunConfig
    info: dict  # inference.json
    path: Path  # the checkpoint folder loaded
    device: torch.device


INFERENCE_TASKS = ("classify", "report")  # the fine-tuned tasks evaluate and predict serve


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


def load_trained(
    path: Path, device: str | None = None, tasks: tuple[str, ...] = INFERENCE_TASKS
) -> TrainedModel:
    """A fine-tuned checkpoint of one of `tasks`: its model with consolidated weights (any ZeRO stage)
    and its task with what inference.json holds (a classifier's labels, a report model's tokenizer)."""
    from xray_pretrain.config import config_from_dict
    from xray_pretrain.engine.export import consolidated_state_dict
    from xray_pretrain.tasks import build_task

    root, tag = resolve_inference_checkpoint(path)
    folder = root / tag
    cfg = config_from_dict(json.loads((folder / checkpoint.CONFIG_NAME).read_text()))
    info_path = folder / checkpoint.INFERENCE_NAME
    if cfg.task not in tasks or not info_path.is_file():
        wanted = " or ".join({"classify": "classifier", "report": "report generator"}[t] for t in tasks)
        raise ValueError(f"{folder} is not a {wanted} checkpoint (task={cfg.task}); use `finetune` first")
    info = json.loads(info_path.read_text())
    task = build_task(cfg)
    task.restore_inference_state(info)
    model = task.build_model()
    # DeepSpeed's consolidation prints progress: keep stdout for results (predict's JSON lines).
    with contextlib.redirect_stdout(sys.stderr):
        state = consolidated_state_dict(root, tag)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{folder} does not match the model its config builds: {err}") from err
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return TrainedModel(model.to(target).eval(), task, cfg, info, folder, target)


def load_classifier(path: Path, device: str | None = None) -> TrainedModel:
    """A classifier checkpoint (export, embed): `load_trained` refusing any other task."""
    return load_trained(path, device, tasks=("classify",))


# ---- export ----------------------------------------------------------------------------------------
TIMM_POOLS = {"cls": "token", "mean": "avg"}  # timm's avg pools the patch tokens only, as ours


def export_checkpoint(path: Path, out_dir: Path, dtype: str = "fp32") -> dict:
    """`xray-pretrain export`: a classifier checkpoint exports encoder + head, a report generator its
    encoder + decoder + tokenizer, any other its encoder.
    `path` as :func:`resolve_inference_checkpoint` (a run folder means its `best`)."""
    from xray_pretrain.engine.export import check_dtype, export_encoder

    check_dtype(dtype)
    root, tag = resolve_inference_checkpoint(path)
    saved = json.loads((root / tag / checkpoint.CONFIG_NAME).read_text())
    if saved.get("task") == "classify":
        return export_classifier(root / tag, out_dir, dtype)
    if saved.get("task") == "report":
        return export_report(root / tag, out_dir, dtype)
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
    provenance = {
        "checkpoint": str(path),
        "checkpoint_tag": tag,
        "run_config": classifier.cfg.to_dict(),
        "classifier": {k: info.get(k) for k in ("mode", "pool", "thresholds", "uncertain", "image_size")},
    }
    if model.pool == "blocks":
        return export_block_classifier(
            model.encoder, weight_CD, bias_C, list(info["label_names"]), out_dir, data, dtype, provenance,
            run_metrics(root.parent),
        )  # fmt: skip
    head = ClassifierHead(weight_CD, bias_C, list(info["label_names"]), TIMM_POOLS[model.pool])
    return write_export(model.encoder, out_dir, data, dtype, head, provenance, run_metrics(root.parent))


BLOCK_HEAD_WEIGHTS = "block_head.safetensors"


def export_block_classifier(encoder, weight_CF, bias_C, label_names: list[str], out_dir: Path, data: dict,
                            dtype: str, provenance: dict, metrics: dict) -> dict:  # fmt: skip
    """A `classify.pool=blocks` classifier: timm has no head over every block's pooled tokens, so the
    encoder exports as :func:`engine.export.write_export` writes it (timm loads it alone) and the
    head, BatchNorm folded in, goes beside it (`block_head.safetensors`: `weight` (C, D * depth),
    `bias` (C,), the label names in its metadata), described in the model card:
    logits = block_pooled_features(encoder, images) @ weight.T + bias."""
    from safetensors.torch import save_file

    from xray_pretrain.config import PRECISION_DTYPES
    from xray_pretrain.engine.export import CARD_FILE, write_export

    provenance["classifier"] = dict(provenance["classifier"], label_names=label_names)
    summary = write_export(encoder, out_dir, data, dtype, None, provenance, metrics)
    tensors = {"weight": weight_CF, "bias": bias_C}
    tensors = {k: v.detach().to(PRECISION_DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    save_file(tensors, Path(out_dir) / BLOCK_HEAD_WEIGHTS, metadata={"label_names": json.dumps(label_names)})
    with open(Path(out_dir) / CARD_FILE, "a") as card:
        card.write(
            "\n## Classifier head over every block\n\n"
            f"`{BLOCK_HEAD_WEIGHTS}` holds a linear classifier ({len(label_names)} labels: "
            f"{', '.join(label_names)}) on {weight_CF.shape[1]} features: each of the encoder's "
            f"{len(encoder.blocks)} blocks' output tokens, layer-normed without affine parameters, averaged "
            "over the patch tokens, concatenated in block order (`xray_pretrain.models.block_pooled_features`; "
            "the encoder's final norm is not used). The probe's BatchNorm is folded in: "
            "`probabilities = sigmoid(block_pooled_features(encoder, images) @ weight.T + bias)`; the label "
            "names are in the file's metadata (`label_names`). timm loads the encoder alone.\n"
        )
    summary["files"].append(BLOCK_HEAD_WEIGHTS)
    summary["num_params"] += sum(v.numel() for v in tensors.values())
    summary["head"] = {"num_classes": len(label_names), "global_pool": "blocks", "label_names": label_names,
                       "num_features": int(weight_CF.shape[1])}  # fmt: skip
    return summary


REPORT_DECODER_WEIGHTS = "report_decoder.safetensors"


def export_report(path: Path, out_dir: Path, dtype: str = "fp32") -> dict:
    """A fine-tuned report generator: its encoder as :func:`engine.export.write_export` writes it (timm
    loads that part alone), plus the report tokenizer (`tokenizer.json`) and the decoder's weights
    (`report_decoder.safetensors`, ReportGenerator names without `encoder.`), both described in the
    model card; the decoder's sizes and the decoding options go into config.json."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from xray_pretrain.config import PRECISION_DTYPES
    from xray_pretrain.engine.export import CARD_FILE, write_export
    from xray_pretrain.engine.model_card import pretraining_data, run_metrics

    root, tag = resolve_inference_checkpoint(path)
    saved = json.loads((root / tag / checkpoint.CONFIG_NAME).read_text())
    data = pretraining_data(saved["data"]["shards"])  # a missing manifest fails before consolidation
    trained = load_trained(root / tag, device="cpu", tasks=("report",))
    model, info, tokenizer = trained.model, trained.info, trained.task.tokenizer
    data["normalization"] = dict(data["normalization"], **info["intensity"])  # what predict feeds it
    report = {k: info.get(k) for k in ("views", "section", "beam_size", "length_penalty", "block_trigrams")}
    report["decoder"] = asdict(model.cfg)
    provenance = {
        "checkpoint": str(path),
        "checkpoint_tag": tag,
        "run_config": trained.cfg.to_dict(),
        "report": report,
    }
    summary = write_export(model.encoder, out_dir, data, dtype, None, provenance, run_metrics(root.parent))
    tokenizer_file = tokenizer.save(out_dir).name
    decoder = {
        name: tensor.detach().to(PRECISION_DTYPES[dtype]).contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith("encoder.")
    }
    save_file(decoder, Path(out_dir) / REPORT_DECODER_WEIGHTS, metadata={"tag": tag})
    with open(Path(out_dir) / CARD_FILE, "a") as card:
        card.write(
            report_card_section(tokenizer, report, tokenizer_file, sum(v.numel() for v in decoder.values()))
        )
    summary["files"] += [tokenizer_file, REPORT_DECODER_WEIGHTS]
    summary["report"] = dict(report, tokenizer_words=len(tokenizer.words))
    return summary


def report_card_section(tokenizer, report: dict, tokenizer_file: str, num_decoder_params: int) -> str:
    """The model card's account of the report generator's extra files."""
    decoder = report["decoder"]
    views = "a study's frontal and lateral images" if report["views"] == 2 else "one image"
    return (
        "\n## Report generation\n\n"
        f"This encoder is the image half of a radiology report generator that reads {views} and writes "
        f"the `{report['section']}` section. The other half is in this folder too (timm loads only the encoder):\n\n"
        f"- `{tokenizer_file}`: the report tokenizer, built from the training split's reports: R2Gen's "
        f"`{tokenizer.variant}` cleaning, {len(tokenizer.words)} words seen at least {tokenizer.min_count} times "
        f"(others map to `<unk>`), at most {tokenizer.max_length} ids with `<bos>`/`<eos>`; load it with "
        "`xray_pretrain.report.tokenizer.ReportTokenizer.load(FOLDER)`.\n"
        f"- `{REPORT_DECODER_WEIGHTS}`: the Transformer decoder ({num_decoder_params:,} parameters; width "
        f"{decoder['dim']}, {decoder['depth']} blocks, {decoder['num_heads']} heads, cross-attention over the "
        f"encoder's patch tokens pooled to {decoder['feature_grid'] or 'the full grid'}), in "
        "`xray_pretrain.models.report.ReportGenerator` names without `encoder.`; sizes under "
        "`xray_pretrain.report.decoder` in config.json.\n"
        f"- Decoding: beam {report['beam_size']}, length penalty {report['length_penalty']}, trigram blocking "
        f"{'on' if report['block_trigrams'] else 'off'}. The fine-tuning run's checkpoint writes reports with "
        "`xray-pretrain predict --checkpoint RUN FILE`.\n"
    )


# ---- evaluate --------------------------------------------------------------------------------------
def evaluate(
    trained: TrainedModel, split: str, shards: list[str] | None, out: Path, overrides: list[str] = ()
) -> dict:
    """Metrics of the whole `split` (of the run's validation folders, or of `shards`) into `out`
    (JSON) and one row per sample (a report model: per report item) into `out` with .csv: a
    classifier's key, label and probability per class (thresholds for F1: the ones validation chose
    for this checkpoint); a report model's key, reference (cleaned, as scored) and generated report.
    A corrupt sample has no CSV row; the JSON names it (`num_skipped`, `skipped`). More of them than
    `data.max_bad_fraction` of the split (an override like the others) write nothing and raise
    `badsamples.TooManySkipped`."""
    import yaml

    from xray_pretrain.config import set_value
    from xray_pretrain.data.badsamples import check_eval_skips, skipped_metrics
    from xray_pretrain.data.loader import build_val_loader

    cfg = trained.cfg
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        set_value(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else None, where="command line")
    if shards:
        cfg.data.shards, cfg.data.val_shards = list(shards), None
    cfg.data.validate()
    loader = build_val_loader(
        cfg.data, image_size=tuple(trained.info["image_size"]), micro_batch=cfg.train.micro_batch,
        rank=0, world_size=1, device=trained.device.type, whole_split=True, split=split,
        reports=cfg.loader_reports(),
    )  # fmt: skip
    if loader.num_samples == 0:
        raise ValueError(f"no {split!r} samples in {cfg.data.resolved_val_shards}")
    result = {"checkpoint": str(trained.path), "split": split, "shards": cfg.data.resolved_val_shards}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    task = trained.task
    if cfg.task == "report":
        rows = task.predict_rows(trained.model, loader, trained.device, torch.float32)
    else:
        task.bind_labels(trained.info["label_names"], loader.label_names)
        rows = task.predict(trained.model, loader, trained.device, torch.float32)
    skipped = skipped_metrics(loader.skipped)  # corrupt samples: not in the CSV, named in the JSON
    check_eval_skips(skipped, loader.num_samples, cfg.data.max_bad_fraction, split)  # before any file
    if cfg.task == "report":
        metrics = task.metrics(rows["reference"], rows["generated"])
        write_reports_csv(out.with_suffix(CSV_SUFFIX), task, rows)
    else:
        metrics = task.metrics(rows, {"thresholds": trained.info["thresholds"]})
        result["thresholds"] = dict(zip(task.label_names, trained.info["thresholds"] or []))
        write_predictions_csv(out.with_suffix(CSV_SUFFIX), task.label_names, rows)
    result["metrics"] = {k.removeprefix("val_"): v for k, v in metrics.items()} | skipped
    out.write_text(json.dumps(result, indent=2))
    return result


def write_predictions_csv(path: Path, label_names: list[str], rows: dict[str, list]) -> None:
    """key, then per class `label:NAME` (1 / 0 / empty unknown) and `p:NAME` (probability)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", *(f"label:{n}" for n in label_names), *(f"p:{n}" for n in label_names)])
        for key, targets, probs in zip(rows["key"], rows["targets"], rows["probabilities"]):
            labels = ["" if np.isnan(t) else int(t) for t in targets]
            writer.writerow([key, *labels, *(f"{p:.6f}" for p in probs)])


def write_reports_csv(path: Path, task, rows: dict[str, list]) -> None:
    """key (a study's frontal image for two views), reference (cleaned: the text the scores compare
    against), generated."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "reference", "generated"])
        for key, reference, generated in zip(rows["key"], rows["reference"], rows["generated"]):
            writer.writerow([key, task.tokenizer.clean(reference), generated])


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


def predict_inputs(trained: TrainedModel, arguments: list[str]) -> list[list[Path]]:
    """Each command-line argument's image files: one, or `FRONTAL,LATERAL` for a model trained on a
    study's two views (report.views=2). A mismatch is a usage error, raised before any file is read."""
    num_views = int(trained.info.get("views", 1))
    inputs = []
    for argument in map(str, arguments):
        is_one_file = num_views == 1 and ("," not in argument or Path(argument).exists())
        parts = [argument] if is_one_file else argument.split(",")
        if len(parts) != num_views or not all(parts):
            raise ValueError(
                f"{argument}: this {trained.cfg.task} model reads one image per argument; a FRONTAL,LATERAL "
                "pair needs a report model trained with report.views=2"
                if num_views == 1
                else f"{argument}: this report model reads a study's two views: give FRONTAL,LATERAL in one argument"
            )
        inputs.append([Path(p) for p in parts])
    return inputs


@torch.no_grad()
def predict_file(trained: TrainedModel, paths: list[Path]) -> dict:
    """One JSON-able line for one input (`paths`: its image, or its frontal and lateral images): a
    classifier's probabilities per label and the labels at or above their thresholds (0.5 for a label
    validation could not score), a report model's generated report, or why a file could not be read."""
    from xray_core.images import SkipInput

    name = ",".join(map(str, paths))
    images = []
    for path in paths:
        try:
            images.append(preprocess_file(path, trained.info))
        except (SkipInput, OSError, ValueError) as error:
            reason = str(error) or type(error).__name__
            return {"file": name, "error": reason if len(paths) == 1 else f"{path}: {reason}"}
    # (1, 1, H, W), or (1, V, 1, H, W) for a study's views
    batch = (images[0] if len(images) == 1 else torch.stack(images))[None].to(trained.device)
    if trained.cfg.task == "report":
        return {"file": name, "task": "report", "report": trained.task.generate(trained.model, batch)[0]}
    probs = torch.sigmoid(trained.model(batch).float())[0].tolist()
    names = trained.info["label_names"]
    thresholds = trained.info.get("thresholds") or [None] * len(names)
    return {
        "file": name,
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
    """A classifier checkpoint (its pooling: D features, D * depth for `blocks`), or a pre-training
    checkpoint (its encoder's cls token)."""
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
    `key` (N,) str, `split` (N,) str, `features` (N, D) float32). Returns a summary: the count, the
    feature size, and the corrupt samples left out (`num_skipped`, `skipped`)."""
    from xray_pretrain.data.badsamples import skipped_metrics
    from xray_pretrain.data.config import DataConfig
    from xray_pretrain.data.loader import build_val_loader

    data = DataConfig(shards=list(shards), backend=model.data.backend, num_workers=model.data.num_workers)
    keys, names, features, skipped = [], [], [], []
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
        skipped += loader.skipped
    if not keys:
        raise ValueError(f"no samples of splits {splits} in {shards}")
    array = np.concatenate(features).astype(np.float32)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # np.savez would append .npz to another suffix
        np.savez(f, key=np.array(keys), split=np.array(names), features=array)
    return {"num_samples": len(keys), "dim": int(array.shape[1]), "out": str(out), **skipped_metrics(skipped)}
