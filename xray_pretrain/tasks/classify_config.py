"""The `classify` section of the run config (override on the CLI as `classify.key=value`)."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("linear", "finetune", "partial")
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
# As models.heads.POOLS (kept here so that the config imports no torch model code).
POOLS = ("cls", "mean", "blocks")


@dataclass
class ClassifyConfig:
    """Multi-label disease classification on the encoder (binary is the one-label case).

    labels: label names to learn, in this order; None = every label of the shards (their union).
    uncertain: what an uncertain label (-1) becomes: `ignore` (left out of loss and metrics, like an
        unknown one), `ones` or `zeros` (CheXpert's U-Ones / U-Zeros); one policy for all labels, or
        a mapping label -> policy (labels it does not name: ignore).
    mode: `linear` (frozen encoder; parameter-free BatchNorm + linear head, the MAE linear probe),
        `finetune` (everything trains, layer-wise LR decay), `partial` (the stem and the first
        `freeze_blocks` blocks frozen, the rest trains with layer decay).
    pool: head input: the `cls` token or the `mean` of the patch tokens (after the final norm), or
        `blocks` (mode=linear only): every block's output, layer-normed without affine parameters,
        averaged over the patch tokens, concatenated (`models.block_pooled_features`, D * depth
        features). With trained blocks the earlier blocks' features would shift under the head while
        it learns, and MAE fine-tunes on the final norm: no such mode is offered.
    layer_decay: LR of layer i is layer_decay ** (depth + 1 - i) of the head's (MAE/BEiT; 1 = off).
    label_fraction: train on this fraction of the training patients (all their images), drawn with
        `fraction_seed`; validation and test always use their whole splits.
    """

    labels: list[str] | None = None
    uncertain: str | dict[str, str] = "ignore"
    mode: str = "finetune"
    freeze_blocks: int = 0
    pool: str = "cls"
    layer_decay: float = 0.75
    label_fraction: float = 1.0
    fraction_seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"classify.mode={self.mode!r}: use one of {MODES}")
        if self.mode == "partial" and self.freeze_blocks < 1:
            raise ValueError("classify.mode=partial needs classify.freeze_blocks >= 1 (blocks kept frozen)")
        if self.mode != "partial" and self.freeze_blocks:
            raise ValueError(
                f"classify.freeze_blocks={self.freeze_blocks} has no effect with classify.mode={self.mode}: "
                "use classify.mode=partial"
            )
        if self.pool not in POOLS:
            raise ValueError(f"classify.pool={self.pool!r}: use one of {POOLS}")
        if self.pool == "blocks" and self.mode != "linear":
            raise ValueError(
                f"classify.pool=blocks needs classify.mode=linear (a frozen encoder), not {self.mode}: "
                "use pool=mean or cls to train the encoder"
            )
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"classify.layer_decay={self.layer_decay} must be in (0, 1] (1 = no decay)")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"classify.label_fraction={self.label_fraction} must be in (0, 1]")
        if self.labels is not None and (not self.labels or len(set(self.labels)) != len(self.labels)):
            raise ValueError(
                f"classify.labels must be distinct label names (or null for all), got {self.labels}"
            )
        policies = self.uncertain.values() if isinstance(self.uncertain, dict) else [self.uncertain]
        bad = [p for p in policies if p not in UNCERTAIN_POLICIES]
        if bad:
            raise ValueError(
                f"classify.uncertain: {bad} unknown; use one of {UNCERTAIN_POLICIES}, or a mapping "
                "label -> policy, e.g. {Atelectasis: ones, Cardiomegaly: zeros}"
            )

    def uncertain_policy(self, label: str) -> str:
        if isinstance(self.uncertain, dict):
            return self.uncertain.get(label, "ignore")
        return self.uncertain
