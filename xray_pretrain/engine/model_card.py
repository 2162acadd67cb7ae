"""The export's model card (``README.md``, the file a model hub shows) and the facts it is made of.

The data section comes from the shard manifests only: datasets, counts, splits and intensity
statistics. Manifests hold no patient data (ids in the shards are salted hashes; source paths stay in
the converter's ``id_map.csv``, which is never read here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from xray_core.shardio import MANIFEST_NAME

TRAIN_SUMMARY = "train_summary.json"  # written by the trainer into the run folder
DOWNSTREAM_METRICS = "metrics.json"  # a downstream run's test-split evaluation


def pretraining_data(shard_folders) -> dict:
    """Per-folder facts from each shard folder's manifest, and the pooled intensity normalization.

    Returns ``{"folders": [...], "normalization": {"mean", "std", "unit"}}``. Every folder is
    normalized with its own mean/std in training; the export's single mean/std is the pooled one
    (sample-weighted mixture of the folders' statistics; exact for one folder), in fractions of full
    scale. ValueError when a manifest is missing: the normalization cannot be known without it.
    """
    folders = []
    for folder in shard_folders:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(
                f"{path} not found: the export takes the intensity mean/std the model was trained with "
                "from the shard manifests; restore the shard folder (the manifest alone is enough)"
            )
        m = json.loads(path.read_text())
        intensity = m["intensity"]
        folders.append(
            {
                "folder": Path(folder).name,
                "dataset": m.get("dataset", Path(folder).name),
                "source": m.get("source"),
                "image_format": m.get("image_format"),
                "num_inputs": m.get("num_inputs"),
                "num_samples": m["num_samples"],
                "num_skipped": m.get("num_skipped"),
                "splits": m["splits"],
                "num_labels": len(m.get("label_names", [])),
                "intensity": {
                    "mean": intensity["mean"],
                    "std": intensity["std"],
                    "split": intensity.get("split"),
                },
            }
        )
    if not folders:
        raise ValueError("the run names no shard folders: nothing to take the intensity normalization from")
    return {"folders": folders, "normalization": pooled_normalization(folders)}


def pooled_normalization(folders: list[dict]) -> dict:
    """Mean and std of the mixture of the folders' pixel distributions, weighted by the samples of the
    split each folder's statistics were measured on."""
    weights = [max(1, f["splits"].get(f["intensity"]["split"], 0) or f["num_samples"]) for f in folders]
    total = sum(weights)
    mean = sum(w * f["intensity"]["mean"] for w, f in zip(weights, folders)) / total
    second = sum(
        w * (f["intensity"]["std"] ** 2 + f["intensity"]["mean"] ** 2) for w, f in zip(weights, folders)
    )
    std = math.sqrt(max(second / total - mean**2, 0.0))
    return {"mean": mean, "std": std, "unit": "fraction of full scale (16-bit / 65535, 8-bit / 255)"}


def run_metrics(run_dir: Path) -> dict:
    """The numbers a run folder has: pre-training (train_summary.json) and downstream (metrics.json)."""
    found = {}
    for name, section in ((TRAIN_SUMMARY, "pretraining"), (DOWNSTREAM_METRICS, "downstream")):
        path = Path(run_dir) / name
        if path.is_file():
            try:
                found[section] = _numbers(json.loads(path.read_text()))
            except json.JSONDecodeError:
                continue  # a damaged summary leaves its section out rather than failing the export
    return found


def _numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """Flatten a JSON tree to its finite numeric leaves: ``{"test/auroc/Effusion": 0.81, ...}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = value
    return flat


def model_card(summary: dict, data: dict, metrics: dict, provenance: dict, out_dir: Path) -> str:
    """README.md text for an export folder (timm's card layout: front matter, details, usage)."""
    from timm.models._hub import generate_readme

    is_timm = summary["format"] == "timm"
    is_fine_tuned = bool(summary["head"]) or provenance.get("run_config", {}).get("task") in (
        "classify",
        "report",
    )
    encoder = provenance["encoder"]
    H, W = encoder["image_size"]
    token = encoder["patch_size"] * (4 if encoder["stem"] == "hierarchical" else 1)
    task = "image-classification" if summary["head"] else "image-feature-extraction"
    card = {
        "tags": [task, "timm", "medical-imaging", "chest-x-ray", "masked-autoencoder"],
        "license": "other",
        "library_name": "timm" if is_timm else "xray_pretrain",
        "description": _description(summary, encoder, is_timm),
        "details": {
            "Model Type": "classifier" if summary["head"] else "image feature backbone (ViT encoder)",
            "Model Stats": {
                "Params (M)": round(summary["num_params"] / 1e6, 3),
                "Image size": f"{H} x {W}, {encoder['in_chans']} channel",
                "Tokens": f"{(H // token) * (W // token)} of {token} x {token} px (+ class token)",
                "Width / depth / heads": f"{encoder['embed_dim']} / {encoder['depth']} / {encoder['num_heads']}",
            },
            **({"Labels": summary["head"]["label_names"]} if summary["head"] else {}),
            ("Train Dataset" if summary["head"] else "Pretrain Dataset"): sorted(
                {f["dataset"] for f in data["folders"]}
            ),
            "Papers": ["Masked Autoencoders Are Scalable Vision Learners: https://arxiv.org/abs/2111.06377"],
        },
        "usage": _usage(summary, out_dir, is_timm),
    }
    sections = [
        generate_readme(card, f"xray_pretrain {summary['architecture']} ({H}x{W})", task_name=task),
        _data_section(data, "Fine-tuning data" if is_fine_tuned else "Pre-training data"),
        _config_section(summary, provenance),
        _metrics_section(metrics),
        LIMITS,
    ]
    return "\n".join(sections)


def _description(summary: dict, encoder: dict, is_timm: bool) -> str:
    what = (
        f"A {encoder['embed_dim']}-wide, {encoder['depth']}-block Vision Transformer encoder pre-trained as a "
        "masked autoencoder (MAE) on chest radiographs by xray_pretrain"
    )
    if summary["head"]:
        what += f", with a {summary['head']['num_classes']}-label classification head fine-tuned on top"
    if is_timm:
        return (
            what
            + f". The folder is a timm model folder (architecture `{summary['architecture']}` with exact `model_args`)."
        )
    return what + (
        ". Its hierarchical stem (tokens of 4 x patch pixels) has no timm class, so this folder keeps "
        "xray_pretrain's own format (`encoder.safetensors` + `config.json`): timm cannot load it."
    )


def _usage(summary: dict, out_dir: Path, is_timm: bool) -> str:
    where = Path(out_dir).resolve()
    if not is_timm:
        return (
            "```python\n"
            "from xray_pretrain.engine.export import load_exported_encoder\n\n"
            f'encoder, config = load_exported_encoder("{where}")\n'
            "tokens = encoder(x)  # x: (B, 1, H, W) normalized as below -> (B, 1 + L, D), class token first\n"
            "```\n"
        )
    output = "logits = model(x)  # (B, num_classes)" if summary["head"] else "embedding = model(x)  # (B, D)"
    return (
        "```python\n"
        "import timm\n\n"
        f'model = timm.create_model("local-dir:{where}", pretrained=True).eval()\n'
        "cfg = model.pretrained_cfg  # input_size (1, H, W), mean, std\n"
        "# x: (B, 1, H, W) float tensor, pixels as fractions of full scale (16-bit / 65535)\n"
        'x = (x - cfg["mean"][0]) / cfg["std"][0]\n'
        "tokens = model.forward_features(x)  # (B, 1 + L, D), class token first\n"
        f"{output}\n"
        "```\n"
        "The same folder pushed to a model hub loads with `hf-hub:ORG/NAME` in place of `local-dir:...`.\n"
    )


def _data_section(data: dict, title: str) -> str:
    norm = data["normalization"]
    rows = [
        f"## {title}\n",
        "From the shard manifests (no patient data: ids inside the shards are salted hashes).\n",
        "| dataset | source | format | inputs | samples | skipped | train / val / test | labels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in data["folders"]:
        splits = " / ".join(str(f["splits"].get(s, 0)) for s in ("train", "val", "test"))
        rows.append(
            f"| {f['dataset']} | {f['source']} | {f['image_format']} | {f['num_inputs']} | {f['num_samples']} "
            f"| {f['num_skipped']} | {splits} | {f['num_labels']} |"
        )
    rows.append(
        f"\nNormalization (pixels as {norm['unit']}): mean {norm['mean']:.6f}, std {norm['std']:.6f}"
        + (
            " (pooled over the folders; each was normalized with its own in training)."
            if len(data["folders"]) > 1
            else "."
        )
    )
    return "\n".join(rows) + "\n"


def _config_section(summary: dict, provenance: dict) -> str:
    run = provenance.get("run_config", {})
    lines = ["## Configuration\n", f"- export dtype: {provenance['dtype']}, format: {summary['format']}"]
    if provenance.get("checkpoint_tag"):
        lines.append(f"- checkpoint: {provenance['checkpoint_tag']}")
    task_sections = (run["task"],) if run.get("task") in ("classify", "report") else ("mask",)
    for section in ("model", *task_sections, "optim", "train"):
        if section in run:
            values = ", ".join(f"{k}={v}" for k, v in run[section].items())
            lines.append(f"- {section}: {values}")
    return "\n".join(lines) + "\n"


def _metrics_section(metrics: dict) -> str:
    if not metrics:
        return "## Metrics\n\nThe run folder held no metrics at export time.\n"
    lines = ["## Metrics\n"]
    titles = {"pretraining": "Pre-training run", "downstream": "Downstream (test split, evaluated once)"}
    for section, values in metrics.items():
        lines += [f"### {titles[section]}\n", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


LIMITS = """## Intended use and limits

- For research: a feature extractor or initialization for chest X-ray models, fine-tuned and
  validated on the user's own data before any conclusion is drawn from it.
- **Not a medical device.** Not cleared or approved for diagnosis, triage or any clinical decision; its
  outputs must not be used for patient care.
- Trained on the datasets listed above only: other populations, scanners, views or pre-processing
  (inputs must be 1-channel, air dark, resized as the shards were) can degrade it without warning.
  Public chest X-ray labels are mined from reports and noisy.
- The weights inherit the terms of the pre-training datasets: check each dataset's licence before
  redistributing them.
"""
