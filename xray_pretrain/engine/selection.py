"""Model selection on validation: which validation was best, and what it fitted (e.g. thresholds).

The trainer saves `checkpoints/best` whenever `improves` says so, and at the end evaluates the test
split once, on `best`, with what validation fitted. The state travels in the checkpoint's client
state so a resumed run keeps comparing against the same best.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class Selection:
    metric: str  # a key of the task's validation metrics, e.g. "val_mean_auroc"
    mode: str  # "max" | "min"
    best_score: float | None = None
    best_step: int | None = None
    best_metrics: dict = field(default_factory=dict)
    best_fitted: dict = field(default_factory=dict)  # what validation fitted (thresholds ...)

    def improves(self, metrics: dict) -> bool:
        """True when `metrics[metric]` beats the best so far; a missing or NaN score never does."""
        score = metrics.get(self.metric)
        if score is None or not math.isfinite(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def update(self, step: int, metrics: dict, fitted: dict) -> None:
        self.best_score, self.best_step = float(metrics[self.metric]), step
        self.best_metrics, self.best_fitted = dict(metrics), dict(fitted)

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Selection:
        return cls(**state)
