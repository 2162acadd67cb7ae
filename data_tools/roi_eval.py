"""Score the chest-region estimate (`xray_core.roi`) against ground-truth lung boxes on real radiographs.

Ground truth comes from two places, both as boxes around the union of the two lung fields:
- `covid-lung-boxes/lung_boxes.csv` in the corpus (imageannotation.ai, pixels x0,y0,x1,y1): half "tune";
- a CSV of boxes drawn for this project (`tests/data/lung_boxes_drawn.csv`: corpus path, fractions
  x0,y0,x1,y1, half "tune" | "heldout"); comment lines start with '#'.

Each image is decoded and resized exactly as `xray-shard convert` does (long side 1280, 16-bit), then
estimated. Used by `benchmarks/roi_accuracy.py` and by the regression test in tests/test_roi_real.py.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_core.images import DecodeOptions, output_size, quantize, resize_unit
from xray_core.load import load_image
from xray_core.roi import ChestRegion, box_iou, estimate_chest_region_detail, small_copy

LONG_SIDE = 1280  # convert's default
LUNG_BOXES = "covid-lung-boxes/lung_boxes.csv"
ANY_IMAGE = DecodeOptions(modalities=None, body_parts=None)


@dataclass(frozen=True)
class GroundTruth:
    path: str  # relative to the corpus folder
    box: tuple[float, float, float, float]  # [y0, x0, y1, x1] fractions, y1/x1 exclusive
    half: str  # "tune" | "heldout"
    origin: str  # who drew it


@dataclass
class Scored:
    truth: GroundTruth
    region: ChestRegion
    iou: float
    milliseconds: float  # the estimate alone (small copy + estimate), on the 1280-px image
    image_hw: np.ndarray  # the stored image (for contact sheets)


def load_ground_truth(corpus: Path, drawn_csv: Path | None) -> list[GroundTruth]:
    """Every ground-truth box: the corpus's covid lung boxes, then the drawn ones (if given)."""
    corpus = Path(corpus)
    truths = []
    with open(corpus / LUNG_BOXES, newline="") as f:
        for row in csv.DictReader(f):
            width, height = float(row["width"]), float(row["height"])
            box = (
                float(row["y0"]) / height,
                float(row["x0"]) / width,
                float(row["y1"]) / height,
                float(row["x1"]) / width,
            )
            path = str(Path(LUNG_BOXES).parent / row["image"])
            truths.append(GroundTruth(path, box, "tune", "imageannotation.ai"))
    if drawn_csv is not None:
        with open(drawn_csv, newline="") as f:
            lines = [line for line in f if not line.startswith("#")]
        for row in csv.DictReader(lines):
            box = (float(row["y0"]), float(row["x0"]), float(row["y1"]), float(row["x1"]))
            truths.append(GroundTruth(row["path"], box, row["half"], "drawn for xray_pretrain"))
    return truths


def stored_image(path: Path, long_side: int = LONG_SIDE) -> np.ndarray:
    """The 16-bit image `xray-shard convert` would store for `path` (decode, resize, quantize)."""
    loaded = load_image(Path(path), ANY_IMAGE)
    size_hw = output_size(loaded.original_size, long_side, upsample=False)
    return quantize(resize_unit(loaded.unit_hw, size_hw), 65535)


def score(corpus: Path, truths: list[GroundTruth]) -> list[Scored]:
    """Estimate each ground-truth image's chest region and its IoU with the box."""
    scored = []
    for truth in truths:
        image = stored_image(Path(corpus) / truth.path)
        start = time.perf_counter()
        region = estimate_chest_region_detail(image, small_copy(image))
        milliseconds = 1000 * (time.perf_counter() - start)
        scored.append(Scored(truth, region, box_iou(region.box, truth.box), milliseconds, image))
    return scored


def summary(scored: list[Scored], threshold: float = 0.7) -> dict:
    """N, median / min IoU, share with IoU >= threshold, the misses (path, IoU, method)."""
    ious = np.array([s.iou for s in scored])
    if not len(ious):
        return {"num": 0}
    misses = [(s.truth.path, round(s.iou, 3), s.region.method) for s in scored if s.iou < threshold]
    return {
        "num": len(ious),
        "median_iou": float(np.median(ious)),
        "min_iou": float(ious.min()),
        "share_at_threshold": float((ious >= threshold).mean()),
        "misses": misses,
    }


TRUTH_COLOUR = (40, 220, 40)
ESTIMATE_COLOUR = (255, 40, 40)
TEXT_COLOUR = (255, 230, 0)


def _tile(scored: Scored, tile: int):
    from PIL import Image, ImageDraw

    image = scored.image_hw.astype(np.float32) / max(1.0, float(scored.image_hw.max()))
    h, w = image.shape
    scale = tile / max(h, w)
    gray = Image.fromarray((image * 255 + 0.5).astype(np.uint8)).resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX
    )
    canvas = Image.new("RGB", (tile, tile))
    left, top = (tile - gray.width) // 2, (tile - gray.height) // 2
    canvas.paste(gray.convert("RGB"), (left, top))
    draw = ImageDraw.Draw(canvas)
    for box, colour in ((scored.truth.box, TRUTH_COLOUR), (scored.region.box, ESTIMATE_COLOUR)):
        y0, x0, y1, x1 = box
        corners = [left + x0 * gray.width, top + y0 * gray.height, left + x1 * gray.width - 1]
        draw.rectangle([*corners[:2], corners[2], top + y1 * gray.height - 1], outline=colour, width=2)
    name = Path(scored.truth.path).name[:34]
    text = f"IoU {scored.iou:.2f} {scored.region.method} c={scored.region.confidence:.2f}\n{name}"
    draw.multiline_text((4, 4), text, fill=TEXT_COLOUR)
    return canvas


def contact_sheet(scored: list[Scored], out: Path, columns: int = 4, tile: int = 256) -> Path:
    """PNG of the given results: ground truth green, estimate red, IoU / method / confidence on top."""
    from PIL import Image

    rows = -(-len(scored) // columns)
    sheet = Image.new("RGB", (columns * tile, max(1, rows) * tile))
    for i, item in enumerate(scored):
        sheet.paste(_tile(item, tile), ((i % columns) * tile, (i // columns) * tile))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
