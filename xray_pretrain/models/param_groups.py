"""Optimizer parameter groups: which tensors get weight decay, and layer-wise LR scales.

Tasks build their groups here (the engine only runs the optimizer and multiplies each group's
`lr_scale` into the schedule's LR). Pure torch.
"""

from __future__ import annotations

import torch
from torch import nn

# Parameters whose name ends with one of these never get weight decay (besides every 1-D tensor:
# norms and biases).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weight matrices, and undecayed norms/biases/positional/cls/mask tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_no_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay", "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "lr_scale": 1.0},
    ]


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases (every 1-D tensor) and position/cls/mask tokens get no weight decay."""
    return param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES


def layer_decay_groups(
    named_params: list[tuple[str, torch.Tensor]], layer_of, num_layers: int, weight_decay: float, decay: float
) -> list[dict]:
    """MAE/BEiT layer-wise LR decay: a parameter of layer i (0 = stem and tokens, 1..depth = blocks,
    `num_layers` = final norm and head) trains at `decay ** (num_layers - i)` of the LR; weight decay
    as `is_no_decay`. One group per (layer, decayed or not), empty ones left out. `layer_of(name)`
    gives a parameter's layer; frozen parameters (requires_grad False) are left out."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        layer, no_decay = layer_of(name), is_no_decay(name, param)
        group = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": decay ** (num_layers - layer),
                "name": f"layer{layer}_{'no_decay' if no_decay else 'decay'}",
            },
        )
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def encoder_layer_of(name: str, depth: int) -> int:
    """MAE/BEiT layer id of a parameter of a model holding the ViT as `encoder`: 0 for the stem and
    tokens, i + 1 for block i, depth + 1 for the encoder's final norm and everything on top of it (a
    classifier head, a report decoder)."""
    if name.startswith(("encoder.patch_embed", "encoder.cls_token")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def encoder_layer_decay_groups(model: nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """`layer_decay_groups` for a model with a ViT `encoder` (`encoder_layer_of`): what sits on top
    of the encoder trains at the full LR, block i of `depth` at `decay ** (depth - i)` of it."""
    depth = len(model.encoder.blocks)
    return layer_decay_groups(
        list(model.named_parameters()),
        lambda name: encoder_layer_of(name, depth),
        num_layers=depth + 1,
        weight_decay=weight_decay,
        decay=decay,
    )
