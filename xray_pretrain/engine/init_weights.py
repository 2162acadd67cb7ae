"""`init.weights=DIR`: start a run from trained weights (weights only; resume is `checkpoint.resume`).

DIR is an `export` folder, a checkpoints folder (its latest), one step folder (or `best`), or a run
folder (its checkpoints), written at any ZeRO stage (ZeRO-3 partitions are consolidated the way
`export` does it). Rules:

- Architecture: the encoder's shape (size, patch, stem, channels, width, depth, heads, MLP ratio)
  comes from the source. A `model.*` key the run config sets to another value than the source's is
  an error; keys left at their defaults take the source's value. `image_size`, `drop_path`, `attn`
  and `grad_ckpt` may differ: a new image size gets the fixed sin-cos table of its own grid (exact
  for a fixed table: each token gets its grid position's code).
- Every key is accounted for: the load fails, listing them, unless the only keys the model has and the
  source lacks are ones the task creates (`Task.init_new_prefixes`, e.g. the classifier's `head.`) and
  the only source keys left unused are ones the task drops (`Task.init_unused_prefixes`, e.g. the
  MAE decoder and mask token). Shapes must agree.
- The run folder records the source (path, kind, tag, a sha256 over the loaded tensors) in
  `init_weights.json`, and the trainer copies it into `run_info.json`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xray_pretrain.engine import checkpoint
from xray_pretrain.models import MAEConfig

# Encoder-shape keys that must agree with the source (resolved dims stand in for `size`).
ARCHITECTURE_KEYS = ("patch_size", "stem", "in_chans", "mlp_ratio")
DIM_KEYS = ("embed_dim", "depth", "num_heads")
RECORD_NAME = "init_weights.json"


@dataclass
class InitSource:
    path: Path
    kind: str  # "export" | "checkpoint" | "step0" (a run's initial weights, see `step0_source`)
    tag: str | None  # the checkpoint tag loaded (None for an export)
    architecture: dict  # ARCHITECTURE_KEYS + DIM_KEYS -> the source's values
    state: dict[str, torch.Tensor]  # model-level names (an export's encoder keys get "encoder.")

    def record(self) -> dict:
        return {
            "path": str(self.path.resolve()),
            "kind": self.kind,
            "tag": self.tag,
            "sha256": state_sha256(self.state),
            "num_tensors": len(self.state),
        }


def open_source(path: str | Path) -> InitSource:
    """Read the weights and architecture of an export, run, checkpoints or step folder."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"init.weights={path} is not a folder (an export, a run, checkpoints or step folder)"
        )
    if (path / "config.json").is_file():
        from xray_pretrain.engine.export import read_export

        exported = read_export(path)
        encoder = exported.encoder
        architecture = {
            "patch_size": encoder.patch_size,
            "stem": encoder.stem,
            "in_chans": encoder.in_chans,
            "mlp_ratio": encoder.mlp_ratio,
            "embed_dim": encoder.embed_dim,
            "depth": len(encoder.blocks),
            "num_heads": encoder.num_heads,
        }
        state = {f"encoder.{k}": v for k, v in exported.state_dict.items()}
        if exported.head is not None:  # a classifier export: its head, in ClassificationModel's names
            state.update({"head.1.weight": exported.head.weight_CD, "head.1.bias": exported.head.bias_C})
        return InitSource(path, "export", None, architecture, state)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    root, tag = checkpoint.resolve_checkpoint(path)
    from xray_pretrain.config import config_from_dict
    from xray_pretrain.engine.export import consolidated_state_dict

    source_cfg = config_from_dict(json.loads((root / tag / checkpoint.CONFIG_NAME).read_text()))
    state = consolidated_state_dict(root, tag)
    return InitSource(path, "checkpoint", tag, architecture_of(source_cfg.model), state)


def initial_model(task, seed: int) -> nn.Module:
    """The task's model as every rank builds it before step 1: its random init under `seed`."""
    torch.manual_seed(seed)
    return task.build_model()


def step0_source(run_dir: str | Path) -> InitSource:
    """The weights a run started from (its step 0, never saved): its task's model rebuilt from the
    run's resolved config.yaml under its train.seed, exactly as the trainer built it. The random-init
    baseline of a pre-trained vs random comparison (same architecture, same init seed)."""
    import yaml

    from xray_pretrain.config import config_from_dict
    from xray_pretrain.tasks import build_task

    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ValueError(
            f"{run_dir} is not a run folder (no config.yaml): pass the pre-training run's folder"
        )
    cfg = config_from_dict(yaml.safe_load(saved.read_text()))
    model = initial_model(build_task(cfg), cfg.train.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return InitSource(run_dir, "step0", None, architecture_of(cfg.model), state)


def architecture_of(model: MAEConfig) -> dict:
    embed_dim, depth, num_heads = model.encoder_dims()
    return {
        **{k: getattr(model, k) for k in ARCHITECTURE_KEYS},
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
    }


def adopt_architecture(model: MAEConfig, source: dict, where: str) -> None:
    """Give `model` the source's encoder shape; ValueError for a key set to something else.

    A key counts as set when it differs from `MAEConfig()`'s default (the dims: when `size` or an
    explicit dim is set); setting a key to the default while the source differs cannot be told apart
    from not setting it, and takes the source's value."""
    default = MAEConfig()
    ours = architecture_of(model)
    dims_set = model.size != default.size or any(getattr(model, k) is not None for k in DIM_KEYS)
    conflicts = []
    for key, value in source.items():
        is_set = dims_set if key in DIM_KEYS else getattr(model, key) != getattr(default, key)
        if is_set and ours[key] != value:
            conflicts.append(f"model.{key}={ours[key]} (source: {value})")
    if conflicts:
        raise ValueError(
            f"init.weights={where} has another encoder architecture: {', '.join(conflicts)}; drop these "
            "model.* settings (the architecture comes from the source; only image_size, drop_path, attn "
            "and grad_ckpt may differ)"
        )
    for key in ARCHITECTURE_KEYS:
        setattr(model, key, source[key])
    for key in DIM_KEYS:
        setattr(model, key, source[key])


def load_into(model: nn.Module, source: InitSource, new_prefixes: tuple, unused_prefixes: tuple) -> None:
    """Copy the source's tensors into `model` (before DeepSpeed wraps it), every key accounted for."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in source.state and not k.startswith(new_prefixes))
    unused = sorted(k for k in source.state if k not in own and not k.startswith(unused_prefixes))
    mismatched = sorted(
        f"{k} {tuple(source.state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in source.state and source.state[k].shape != own[k].shape
    )
    if missing or unused or mismatched:
        raise ValueError(
            f"init.weights={source.path} does not fit this model: "
            f"missing {_few(missing)}; unused {_few(unused)}; shape differs {_few(mismatched)} "
            f"(allowed: missing only {list(new_prefixes)}*, unused only {list(unused_prefixes)}*)"
        )
    result = model.load_state_dict({k: v for k, v in source.state.items() if k in own}, strict=False)
    assert not result.unexpected_keys and all(k.startswith(new_prefixes) for k in result.missing_keys), result


def initialize(model: nn.Module, source: InitSource, task, out_dir: Path | None) -> dict:
    """Load the source into `model` under the task's rules; write the record into `out_dir` (rank 0
    passes it, the others None). Returns the record."""
    load_into(model, source, tuple(task.init_new_prefixes), tuple(task.init_unused_prefixes))
    record = source.record()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RECORD_NAME).write_text(json.dumps(record, indent=2))
    return record


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors (names, dtypes, shapes, values): the same for one checkpoint whatever
    ZeRO stage or number of ranks wrote it."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _few(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]"
