"""Turn any checkpoint (ZeRO-1/2/3) into a folder the ecosystem loads: a timm model folder + a model card.

Patch-stem encoders (every size, one channel, any image size) export as a timm model folder, written
by timm's own ``save_for_hf``: ``config.json`` (``architecture`` = the nearest registered timm ViT,
``model_args`` with the exact dimensions, ``pretrained_cfg`` with the input size, the shards' intensity
mean/std and, for a classifier, the label names) and ``model.safetensors``, so that

    timm.create_model("local-dir:EXPORT", pretrained=True)

returns the encoder (and a classifier's head) with no project code. The hierarchical stem (tokens of
4 x patch pixels) has no timm class: it keeps the project's own format (``encoder.safetensors`` +
``config.json`` with ``"architecture": "vit_mae_encoder"``) and its model card says so. Both formats
get a model card ``README.md``; :func:`read_export` reads either back (what ``init.weights`` uses).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xray_pretrain.config import PRECISION_DTYPES
from xray_pretrain.engine import checkpoint
from xray_pretrain.engine.model_card import model_card, pretraining_data, run_metrics

EXPORT_PRECISIONS = ("fp32", "bf16")  # fp16 would need loss-scale-safe ranges: not offered
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
TIMM_WEIGHTS = "model.safetensors"  # the name timm's local-dir / hf-hub loader looks for first
NATIVE_WEIGHTS = "encoder.safetensors"
NATIVE_ARCHITECTURE = "vit_mae_encoder"
GLOBAL_POOLS = ("token", "avg")
# Registered timm ViTs with our block layout (patch stem, class token, pre-norm, qkv bias), by
# (embed_dim, patch): the export names the nearest, and its model_args override every dimension.
TIMM_VITS = {
    (192, 16): "vit_tiny_patch16_224",
    (384, 16): "vit_small_patch16_224",
    (384, 8): "vit_small_patch8_224",
    (768, 16): "vit_base_patch16_224",
    (768, 8): "vit_base_patch8_224",
    (768, 32): "vit_base_patch32_224",
    (1024, 16): "vit_large_patch16_224",
    (1024, 32): "vit_large_patch32_224",
    (1280, 14): "vit_huge_patch14_224",
}


@dataclass(frozen=True)
class ClassifierHead:
    """A linear classifier on the encoder's pooled features, as timm's ``VisionTransformer.head``.

    ``global_pool``: ``token`` classifies the cls token, ``avg`` the mean of the patch tokens; both
    after the encoder's final norm (timm ``fc_norm=False``).
    """

    weight_CD: torch.Tensor
    bias_C: torch.Tensor
    label_names: list[str]
    global_pool: str = "token"

    def __post_init__(self) -> None:
        num_classes = self.weight_CD.shape[0]
        if self.weight_CD.dim() != 2 or tuple(self.bias_C.shape) != (num_classes,):
            raise ValueError(
                f"head weight must be (C, D) and bias (C,), got {tuple(self.weight_CD.shape)} and "
                f"{tuple(self.bias_C.shape)}"
            )
        if len(self.label_names) != num_classes or len(set(self.label_names)) != num_classes:
            raise ValueError(f"head has {num_classes} outputs: give as many distinct label names")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"head global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")

    @property
    def num_classes(self) -> int:
        return self.weight_CD.shape[0]


def head_summary(head: ClassifierHead) -> dict:
    return {
        "num_classes": head.num_classes,
        "global_pool": head.global_pool,
        "label_names": list(head.label_names),
    }


@dataclass
class ExportedEncoder:
    """An export read back: the project's encoder with the exported weights, the head if any."""

    encoder: torch.nn.Module  # models.ViTEncoder
    head: ClassifierHead | None
    config: dict  # config.json as written
    format: str  # "timm" | "native"
    files: list[str] = field(default_factory=list)

    @property
    def encoder_kwargs(self) -> dict:
        """``ViTEncoder(**encoder_kwargs)`` rebuilds the architecture (image size, patch, dims, stem)."""
        return self.encoder.init_kwargs()

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights in ``ViTEncoder`` names (loads strictly; the sin-cos position table
        is a fixed buffer, recomputed for any image size, so it is not part of it)."""
        return self.encoder.state_dict()


MODEL_STATES_NAME = "mp_rank_00_model_states.pt"  # DeepSpeed's module file below ZeRO-3


def consolidated_state_dict(ckpt_root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage (rank-count independent).

    The files are checked against the checkpoint's manifest first (sizes and sha256: one extra read);
    a missing, empty or damaged file is one ValueError naming it, not a deserialization traceback."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint.check_intact(Path(ckpt_root), tag)
    tag_dir = Path(ckpt_root) / tag
    try:
        stage = json.loads((tag_dir / checkpoint.CONFIG_NAME).read_text())["train"]["zero_stage"]
        # ZeRO-0 has no partitions, and ZeRO-1 keeps none of frozen parameters (a frozen encoder): both
        # need the module's own tensors (frozen ones are never updated). ZeRO-2 and 3 save frozen
        # parameters with their partitions, so their module file is not read a second time.
        module = {}
        if stage <= 1:
            module = torch.load(tag_dir / MODEL_STATES_NAME, map_location="cpu", weights_only=False)["module"]
        if stage == 0:
            return {name: tensor.float() for name, tensor in module.items()}
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    except Exception as err:  # a checkpoint older than manifests: read errors still become one line
        checkpoint.raise_if_unreadable(err, tag_dir)
        raise
    return {**state, **{name: t.float() for name, t in module.items() if name not in state}}


def load_mae_from_checkpoint(path: Path):
    """(MaskedAutoencoder with trained weights, RunConfig, tag) from a checkpoint root or tag folder."""
    from xray_pretrain.config import config_from_dict
    from xray_pretrain.models import build_mae

    root, tag = checkpoint.resolve_checkpoint(path)
    cfg = config_from_dict(json.loads((root / tag / checkpoint.CONFIG_NAME).read_text()))
    model = build_mae(cfg.model, cfg.mask)
    try:
        model.load_state_dict(consolidated_state_dict(root, tag), strict=True)
    except RuntimeError as err:  # names differ: a checkpoint of another code version or model
        raise ValueError(
            f"checkpoint {root / tag} does not match the model its config builds: {err}"
        ) from err
    return model, cfg, tag


def export_encoder(
    checkpoint_path: Path, out_dir: Path, dtype: str = "fp32", head: ClassifierHead | None = None
) -> dict:
    """Export a checkpoint's encoder (and ``head``, for a classifier) with a model card into
    ``out_dir``; returns :func:`write_export`'s summary. The normalization and the card's data section
    come from the run's shard manifests, its metrics from the run folder (the checkpoints' parent)."""
    check_dtype(dtype)
    root, tag = checkpoint.resolve_checkpoint(Path(checkpoint_path))
    saved = json.loads((root / tag / checkpoint.CONFIG_NAME).read_text())
    data = pretraining_data(saved["data"]["shards"])  # a missing manifest fails before consolidation
    model, cfg, tag = load_mae_from_checkpoint(root / tag)
    provenance = {"checkpoint": str(checkpoint_path), "checkpoint_tag": tag, "run_config": cfg.to_dict()}
    metrics = run_metrics(root.parent)
    return write_export(model.encoder, out_dir, data, dtype, head, provenance, metrics)


def check_dtype(dtype: str) -> None:
    if dtype not in EXPORT_PRECISIONS:
        raise ValueError(f"--dtype must be one of {list(EXPORT_PRECISIONS)}, got {dtype!r}")


def write_export(
    encoder,
    out_dir: Path,
    data: dict,
    dtype: str = "fp32",
    head: ClassifierHead | None = None,
    provenance: dict | None = None,
    metrics: dict | None = None,
) -> dict:
    """Write ``encoder`` (a ``models.ViTEncoder``) and ``head`` into ``out_dir`` in timm's folder
    format (patch stem) or the native one (hierarchical stem), plus the model card.

    ``data`` is :func:`model_card.pretraining_data`'s summary (it gives the normalization);
    ``provenance`` (checkpoint, tag, run config) goes into config.json under ``xray_pretrain``;
    ``metrics`` (the run's numbers) into the card. Returns a summary: format, architecture, files,
    num_params, checkpoint_tag.
    """
    check_dtype(dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: give a folder for the export")
    out_dir.mkdir(parents=True, exist_ok=True)
    if head is not None and head.weight_CD.shape[1] != encoder.embed_dim:
        raise ValueError(
            f"head takes {head.weight_CD.shape[1]} features, the encoder gives {encoder.embed_dim}"
        )
    provenance = dict(provenance or {}, dtype=dtype, encoder=encoder.init_kwargs())
    if encoder.timm_kwargs() is None:
        summary = _write_native(encoder, out_dir, data, dtype, head, provenance)
    else:
        summary = _write_timm(encoder, out_dir, data, dtype, head, provenance)
    summary["checkpoint_tag"] = provenance.get("checkpoint_tag")
    (out_dir / CARD_FILE).write_text(model_card(summary, data, metrics or {}, provenance, out_dir))
    summary["files"].append(CARD_FILE)
    return summary


def nearest_timm_vit(embed_dim: int, patch_size: int) -> str:
    """The registered timm ViT nearest in width, then in patch size (log scale)."""
    return min(
        TIMM_VITS.items(),
        key=lambda item: (abs(math.log(item[0][0] / embed_dim)), abs(math.log(item[0][1] / patch_size))),
    )[1]


def _write_timm(encoder, out_dir: Path, data: dict, dtype: str, head, provenance: dict) -> dict:
    import timm
    from timm.models import save_for_hf

    H, W = encoder.image_size
    architecture = nearest_timm_vit(encoder.embed_dim, encoder.patch_size)
    # fc_norm=False: the final norm runs on every token before pooling, as in our encoder.
    model_args = dict(encoder.timm_kwargs(), img_size=[H, W], fc_norm=False)
    if head is not None:
        model_args.update(num_classes=head.num_classes, global_pool=head.global_pool)
    mean, std = (data["normalization"]["mean"],), (data["normalization"]["std"],)
    # Our own pretrained_cfg, not the architecture's ImageNet one (its tag, licence and 3-channel
    # mean/std describe other weights). Resizing as the converter does: area average when shrinking.
    pretrained_cfg = {
        "architecture": architecture,
        "input_size": (encoder.in_chans, H, W),
        "fixed_input_size": True,
        "interpolation": "box",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "num_classes": model_args["num_classes"],
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    vit = timm.create_model(architecture, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    state = encoder.timm_state_dict()
    if head is not None:
        state["head.weight"], state["head.bias"] = head.weight_CD.detach(), head.bias_C.detach()
    vit.load_state_dict(state, strict=True)
    vit.to(PRECISION_DTYPES[dtype])
    model_config = {"xray_pretrain": provenance}
    if head is not None:
        model_config["label_names"] = list(head.label_names)
    (out_dir / NATIVE_WEIGHTS).unlink(missing_ok=True)  # a native export written here before
    save_for_hf(
        vit,
        out_dir,
        model_config=model_config,
        safe_serialization=True,
        data_config={"mean": mean, "std": std, "crop_pct": 1.0, "interpolation": "box"},
    )
    return {
        "format": "timm",
        "architecture": architecture,
        "model_args": model_args,
        "num_params": sum(v.numel() for v in vit.state_dict().values()),
        "files": [CONFIG_FILE, TIMM_WEIGHTS],
        "head": None if head is None else head_summary(head),
    }


def _write_native(encoder, out_dir: Path, data: dict, dtype: str, head, provenance: dict) -> dict:
    from safetensors.torch import save_file

    state = dict(encoder.state_dict())
    if head is not None:
        state["head.weight"], state["head.bias"] = head.weight_CD, head.bias_C
    tensors = {k: v.detach().to(PRECISION_DTYPES[dtype]).contiguous() for k, v in state.items()}
    (out_dir / TIMM_WEIGHTS).unlink(missing_ok=True)  # a timm export written here before
    save_file(tensors, str(out_dir / NATIVE_WEIGHTS), metadata={"format": "pt"})
    config = {
        "architecture": NATIVE_ARCHITECTURE,
        "timm": f"not expressible: stem={encoder.stem} has no timm class; load with "
        "xray_pretrain.engine.export.load_exported_encoder",
        "model": encoder.init_kwargs(),  # MAEConfig keys
        "normalization": data["normalization"],
        "num_params": sum(v.numel() for v in tensors.values()),
        "xray_pretrain": provenance,
    }
    if head is not None:
        config.update(label_names=list(head.label_names), global_pool=head.global_pool)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return {
        "format": "native",
        "architecture": NATIVE_ARCHITECTURE,
        "model_args": config["model"],
        "num_params": config["num_params"],
        "files": [CONFIG_FILE, NATIVE_WEIGHTS],
        "head": None if head is None else head_summary(head),
    }


def read_export(export_dir: Path) -> ExportedEncoder:
    """Read an export folder of either format back into the project's encoder (+ head).

    A timm folder is loaded with ``timm.create_model("local-dir:...", pretrained=True)`` itself, so
    any timm ViT of this layout loads, not only ours; its position embedding must be the fixed sin-cos
    table (a learned one would silently mean something else). ValueError names what does not fit.
    """
    export_dir = Path(export_dir)
    config_path = export_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{export_dir}: no {CONFIG_FILE}; not an export folder (write one with `xray-pretrain export`)"
        )
    config = json.loads(config_path.read_text())
    if config.get("architecture") == NATIVE_ARCHITECTURE:
        return _read_native(export_dir, config)
    return _read_timm(export_dir, config)


def _read_timm(export_dir: Path, config: dict) -> ExportedEncoder:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from xray_pretrain.models import ViTEncoder

    vit = timm.create_model(f"local-dir:{export_dir}", pretrained=True)
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None or vit.num_prefix_tokens != 1:
        raise ValueError(f"{export_dir}: {config.get('architecture')} is not a class-token timm ViT")
    state = vit.state_dict()
    head = None
    if vit.num_classes:
        names = config.get("label_names") or [f"class_{i}" for i in range(vit.num_classes)]
        head = ClassifierHead(state.pop("head.weight"), state.pop("head.bias"), list(names), vit.global_pool)
    encoder = ViTEncoder(
        image_size=tuple(vit.patch_embed.img_size),
        patch_size=vit.patch_embed.patch_size[0],
        in_chans=vit.patch_embed.proj.in_channels,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=vit.blocks[0].attn.num_heads,
        mlp_ratio=vit.blocks[0].mlp.fc1.out_features / vit.embed_dim,
    )
    _load_into(encoder, state, export_dir)
    return ExportedEncoder(encoder, head, config, "timm", [CONFIG_FILE, TIMM_WEIGHTS])


def _read_native(export_dir: Path, config: dict) -> ExportedEncoder:
    from safetensors.torch import load_file

    from xray_pretrain.models import MAEConfig, ViTEncoder

    model = MAEConfig(**config["model"])  # exports before this format held the whole model section
    embed_dim, depth, num_heads = model.encoder_dims()
    encoder = ViTEncoder(
        image_size=model.image_hw(),
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=model.mlp_ratio,
        stem=model.stem,
    )
    state = load_file(str(export_dir / NATIVE_WEIGHTS))
    head = None
    if "head.weight" in state:
        head = ClassifierHead(
            state.pop("head.weight"), state.pop("head.bias"), config["label_names"], config["global_pool"]
        )
    _load_into(encoder, state, export_dir)
    return ExportedEncoder(encoder, head, config, "native", [CONFIG_FILE, NATIVE_WEIGHTS])


def _load_into(encoder, state: dict[str, torch.Tensor], export_dir: Path) -> None:
    try:
        encoder.load_timm_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{export_dir} is not this project's ViT layout: {err}") from err


def load_exported_encoder(export_dir: Path):
    """(ViTEncoder with the exported weights, config.json) from an export folder of either format."""
    exported = read_export(export_dir)
    return exported.encoder, exported.config
