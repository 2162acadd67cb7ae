"""The `data` section of the run config (override on the CLI as `data.key=value`)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field

BACKENDS = ("auto", "dali", "wds")


def dali_available() -> bool:
    """True when nvidia.dali can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


@dataclass
class DataConfig:
    """Where the shards are, how they mix, and how training images are augmented.

    shards: shard folders written by `xray-shard convert` (each holds its train and val splits).
    weights: mixing weight per folder; None = proportional to each folder's size (see
        `xray_pretrain.data.order.epoch_counts` for the exact per-epoch counts).
    val_shards: folders for validation; None = the same as `shards`.
    val_num_samples: validation uses the first N samples of the val split in sorted-key order.
    backend: auto (DALI when it imports and training runs on a GPU, else wds) | dali | wds.
    num_workers: wds: DataLoader worker processes, 0 = load in the training process; dali: DALI's CPU
        threads (at least 1; the host feed itself runs in the training process).
    crop_scale / crop_ratio: random resized crop, area fraction and aspect relative to the image's.
    max_bad_fraction: corrupt training samples (skipped and replaced by position, see
        `data.badsamples`) allowed, as a fraction of the samples read (at least one epoch); above it
        the run stops naming the last one. Corrupt evaluation samples are left out of the metrics,
        which count and name them (`num_skipped`, `skipped`); above this fraction of the scored split
        the evaluation stops (`badsamples.check_eval_skips`).
    hflip: random horizontal flip (off by default: it moves the heart to the other side).
    brightness / contrast: jitter amounts (factors drawn from 1 +- amount); 0 = off.
    """

    shards: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    train_split: str = "train"
    val_split: str = "val"
    val_shards: list[str] | None = None
    val_num_samples: int = 64
    backend: str = "auto"
    num_workers: int = 2
    max_bad_fraction: float = 0.001
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    hflip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0

    def validate(self) -> None:
        """Raise ValueError saying what to fix. Folder contents are checked when loaders are built."""
        if not self.shards:
            raise ValueError(
                "no training data: set data.shards=[DIR,...] (folders written by `xray-shard convert`)"
            )
        if self.weights is not None:
            if len(self.weights) != len(self.shards):
                raise ValueError(
                    f"data.weights has {len(self.weights)} values for {len(self.shards)} data.shards folders; "
                    "give one weight per folder, or data.weights=null for proportional to size"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"data.weights must be finite, >= 0 and not all 0, got {self.weights}")
        if self.val_shards is not None and not self.val_shards:
            raise ValueError("data.val_shards is an empty list: give folders, or null to use data.shards")
        if not self.train_split or not self.val_split:
            raise ValueError("data.train_split and data.val_split must be split names such as train / val")
        if self.val_num_samples < 0:
            raise ValueError(f"data.val_num_samples must be >= 0, got {self.val_num_samples}")
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend={self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.backend == "dali" and not dali_available():
            raise ValueError(
                "data.backend=dali but nvidia.dali is not importable: install nvidia-dali-cuda130 "
                "or set data.backend=wds (or auto)"
            )
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        self._validate_augment()

    def _validate_augment(self) -> None:
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(
                f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}"
            )
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"data.crop_ratio must be [lo, hi] with 0 < lo <= hi, got {self.crop_ratio}")
        for name in ("brightness", "contrast"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"data.{name} must be in [0, 1) (factors 1 +- {name}), got {value}")

    @property
    def resolved_val_shards(self) -> list[str]:
        return list(self.val_shards) if self.val_shards is not None else list(self.shards)
