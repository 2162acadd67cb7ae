"""What a run reports while it trains: TensorBoard, a metrics.jsonl copy, and a tqdm bar (rank 0 only).

A restarted run keeps one history: what an earlier start logged past the step this start continues
from (work lost to a crash or a requeue) is dropped from metrics.jsonl, and TensorBoard is told to
purge it (`purge_step`), so neither shows a step twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from xray_pretrain.engine.health import json_safe


class RunMonitor:
    """Rank 0 writes; other ranks get a monitor whose methods do nothing (so callers never branch)."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool):
        self.enabled = enabled
        self.tb_dir = out_dir / "tb"
        self.images_dir = out_dir / "images"
        self._writer = None
        self._jsonl = None
        self._bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.tb_dir), purge_step=start_step + 1)
        metrics_path = out_dir / "metrics.jsonl"
        truncate_history(metrics_path, start_step)
        self._jsonl = open(metrics_path, "a")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        row = json_safe({"step": step, "time": time.time(), **values})  # NaN / inf as null: valid JSON
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()

    def image(self, step: int, name: str, image_HW_u8: np.ndarray) -> Path | None:
        """Log a grayscale uint8 image to TensorBoard and save it as PNG; returns the PNG path."""
        if not self.enabled:
            return None
        from PIL import Image

        self._writer.add_image(name, image_HW_u8, step, dataformats="HW")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.images_dir / f"{name.replace('/', '_')}_step{step:08d}.png"
        Image.fromarray(image_HW_u8).save(path)
        return path

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def text(self, name: str, text: str) -> None:
        if self.enabled:
            self._writer.add_text(name, text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._writer.flush()
        self._writer.close()
        self._jsonl.close()


def truncate_history(metrics_path: Path, last_step: int) -> int:
    """Drop the rows of `metrics_path` logged after `last_step` (rewritten atomically); returns how many."""
    if not metrics_path.is_file():
        return 0
    lines = metrics_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    if len(kept) == len(lines):
        return 0
    tmp = metrics_path.with_name(metrics_path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, metrics_path)
    return len(lines) - len(kept)
