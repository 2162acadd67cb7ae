"""Turn any checkpoint (ZeRO-1/2/3) into a consolidated encoder: `encoder.safetensors` + `config.json`.

The encoder's tensors are named as timm's `VisionTransformer` names them, so where the shapes allow
(patch stem, class token) `timm.create_model(...)`-style loading works with `in_chans=1`; the
config.json carries the exact timm kwargs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from xray_pretrain.config import PRECISION_DTYPES
from xray_pretrain.engine import checkpoint

EXPORT_PRECISIONS = ("fp32", "bf16")  # fp16 would need loss-scale-safe ranges: not offered


def consolidated_state_dict(ckpt_root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage (rank-count independent)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)


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


def export_encoder(checkpoint_path: Path, out_dir: Path, dtype: str = "fp32") -> dict:
    """Write `encoder.safetensors` and `config.json` into `out_dir`; returns the config written."""
    from safetensors.torch import save_file

    if dtype not in EXPORT_PRECISIONS:
        raise ValueError(f"--dtype must be one of {list(EXPORT_PRECISIONS)}, got {dtype!r}")
    model, cfg, tag = load_mae_from_checkpoint(Path(checkpoint_path))
    encoder = model.encoder
    # timm names where timm has the architecture; the hierarchical stem has none: our own names.
    timm_kwargs = encoder.timm_kwargs()
    state = encoder.timm_state_dict() if timm_kwargs is not None else encoder.state_dict()
    tensors = {k: v.detach().to(PRECISION_DTYPES[dtype]).contiguous() for k, v in state.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(out_dir / "encoder.safetensors"),
        metadata={"format": "pt", "source": str(checkpoint_path)},
    )
    config = {
        "architecture": "vit_mae_encoder",
        "model": cfg.to_dict()["model"],
        "timm_kwargs": timm_kwargs,
        "dtype": dtype,
        "checkpoint_tag": tag,
        "num_params": sum(v.numel() for v in tensors.values()),
        "data": {"shards": cfg.data.shards},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return config


def load_exported_encoder(export_dir: Path):
    """Rebuild our ViTEncoder from an export folder (the inverse of `export_encoder`): (encoder, config)."""
    from safetensors.torch import load_file

    from xray_pretrain.config import RunConfig, set_value
    from xray_pretrain.models import build_mae

    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    cfg = RunConfig()
    for key, value in config["model"].items():
        set_value(cfg, f"model.{key}", value, where=str(export_dir / "config.json"))
    encoder = build_mae(cfg.model, cfg.mask).encoder
    tensors = load_file(str(export_dir / "encoder.safetensors"))
    # The sin-cos table is a fixed buffer of ours (recomputed from the grid), a tensor for timm.
    pos_embed = tensors.pop("pos_embed", None)
    missing, unexpected = encoder.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{export_dir} does not match its config: missing {missing}, unexpected {unexpected}"
        )
    if pos_embed is not None and not torch.allclose(
        pos_embed.float(), encoder.timm_state_dict()["pos_embed"].float()
    ):
        raise ValueError(f"{export_dir}: pos_embed differs from the fixed sin-cos table of this image size")
    return encoder, config
