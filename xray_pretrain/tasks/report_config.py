"""The `report` section of the run config (override on the CLI as `report.key=value`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xray_pretrain.report.metrics import METRIC_NAMES
from xray_pretrain.report.studies import SECTIONS
from xray_pretrain.report.tokenizer import VARIANTS


@dataclass
class ReportConfig:
    """Radiology report generation on the encoder (docs/report_generation.md).

    section: which part of each sample's report is the target: findings | impression | both.
    views: 1 (every image with a report; MIMIC-CXR, scored per image) or 2 (a study's frontal +
        lateral pair, R2Gen's IU X-ray setting, scored per study).
    cleaning: R2Gen's report cleaner `iu_xray` or `mimic_cxr`; min_count / max_length default to
        R2Gen's for it (3 / 60 and 10 / 100).
    feature_grid: average-pool the encoder's patch grid to [rows, cols] before the decoder reads it
        (1280 px at patch 16 is 80x80 = 6400 tokens per view); null keeps every token.
    freeze_blocks: -1 freezes the whole encoder, k > 0 its stem and first k blocks, 0 nothing.
    layer_decay: the encoder's block i of depth trains at layer_decay ** (depth - i) of the LR, its stem
        and tokens at layer_decay ** (depth + 1); the decoder at the full LR (MAE/BEiT; 1 = off).
    decoder_*: the Transformer decoder's width, depth and heads.
    beam_size: 1 = greedy; trigram blocking and the length penalty apply to both.
    scst_fraction: the last fraction of train.steps optimizes CIDEr-D by self-critical sequence
        training (scst_samples reports sampled per item; the mean reward of an item's other samples
        is its baseline) instead of cross-entropy; 0 = cross-entropy throughout.
    select_metric: the validation metric that picks checkpoints/best (higher is better).
    r2gen_truncated_refs: also score against R2Gen's truncated, <unk>-mapped references; reported
        as `*_r2gen_truncated`, never instead of the full references.
    meteor: compute METEOR (needs Java; null with the reason logged without it).
    chexbert / chexbert_vocab: local CheXbert checkpoint (chexbert.pth) and bert-base-uncased
        vocab.txt for clinical efficacy (needs `pip install 'xray_pretrain[clinical]'`); both null:
        clinical efficacy is skipped (logged). Nothing is downloaded.
    """

    section: str = "findings"
    views: int = 1
    cleaning: str = "iu_xray"
    min_count: int | None = None
    max_length: int | None = None
    feature_grid: list[int] | None = None
    freeze_blocks: int = 0
    layer_decay: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 3
    decoder_heads: int = 8
    label_smoothing: float = 0.0
    beam_size: int = 3
    length_penalty: float = 0.0
    block_trigrams: bool = True
    scst_fraction: float = 0.0
    scst_samples: int = 5
    select_metric: str = "bleu_4"
    r2gen_truncated_refs: bool = False
    meteor: bool = True
    meteor_timeout_s: float = 600.0
    chexbert: str | None = None
    chexbert_vocab: str | None = None

    def validate(self) -> None:
        if self.section not in SECTIONS:
            raise ValueError(f"report.section={self.section!r}: use one of {SECTIONS}")
        if self.views not in (1, 2):
            raise ValueError(f"report.views={self.views}: use 1 (one image) or 2 (frontal + lateral)")
        if self.cleaning not in VARIANTS:
            raise ValueError(f"report.cleaning={self.cleaning!r}: use one of {VARIANTS}")
        if self.beam_size < 1:
            raise ValueError(f"report.beam_size={self.beam_size} must be >= 1 (1 = greedy)")
        if not 0.0 <= self.scst_fraction <= 1.0:
            raise ValueError(f"report.scst_fraction={self.scst_fraction} must be in [0, 1] (0 = off)")
        if self.scst_samples < 2:
            raise ValueError(
                f"report.scst_samples={self.scst_samples} must be >= 2 (an item's other samples are its baseline)"
            )
        if self.select_metric not in METRIC_NAMES:
            raise ValueError(f"report.select_metric={self.select_metric!r}: use one of {METRIC_NAMES}")
        if self.select_metric == "meteor" and not self.meteor:
            raise ValueError("report.select_metric=meteor needs report.meteor=true")
        if self.feature_grid is not None and (len(self.feature_grid) != 2 or min(self.feature_grid) < 1):
            raise ValueError(f"report.feature_grid={self.feature_grid}: use [rows, cols] >= 1, or null")
        if self.freeze_blocks < -1:
            raise ValueError(f"report.freeze_blocks={self.freeze_blocks}: use -1 (all), 0 (none) or k > 0")
        if (self.chexbert is None) != (self.chexbert_vocab is None):
            raise ValueError(
                "report.chexbert and report.chexbert_vocab go together: set both paths or neither"
            )
        for key in ("chexbert", "chexbert_vocab"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"report.{key}={path} is not a file")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"report.layer_decay={self.layer_decay} must be in (0, 1] (1 = no decay)")
        if self.meteor_timeout_s <= 0:
            raise ValueError(f"report.meteor_timeout_s={self.meteor_timeout_s} must be > 0")
