"""`xray-shard preview DIR --out grid.png`: a contact sheet of samples with key, view, positive labels
and the chest-region box drawn on each tile (red: fitted to the image; blue: the seed rectangle that
stands in where the estimate is unsure), with the region's method and confidence. Samples are taken in manifest order (first N of
the chosen split), so the same folder always gives the same sheet.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from data_tools.encode import FORMAT_EXTENSION, decode_stored
from data_tools.manifest import read_manifest
from data_tools.records import SPLITS
from xray_core.images import FULL_SCALE
from xray_core.shardio import idx_path_for, read_idx, read_sample

BOX_COLOUR = (255, 40, 40)
RECTANGLE_COLOUR = (40, 160, 255)  # the seed rectangle stands in for an unsure chest region
TEXT_COLOUR = (255, 230, 0)


def _samples(folder: Path, manifest: dict, split: str | None, num: int):
    taken = 0
    for entry in manifest["shards"]:
        if split and entry["split"] != split:
            continue
        tar = folder / entry["name"]
        with open(tar, "rb") as f:
            for sample in read_idx(idx_path_for(tar)):
                if taken == num:
                    return
                taken += 1
                yield read_sample(f, sample)


def _tile(components: dict[str, bytes], image_format: str, tile: int):
    from PIL import Image, ImageDraw

    meta = json.loads(components["json"])
    pixels = decode_stored(components[FORMAT_EXTENSION[image_format]]).astype(np.float32)
    full_scale = FULL_SCALE[image_format]
    gray = Image.fromarray(np.clip(pixels / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    h, w = pixels.shape
    scale = tile / max(h, w)
    gray = gray.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    canvas = Image.new("RGB", (tile, tile))
    x0, y0 = (tile - gray.width) // 2, (tile - gray.height) // 2
    canvas.paste(gray.convert("RGB"), (x0, y0))
    draw = ImageDraw.Draw(canvas)
    by0, bx0, by1, bx1 = meta["roi_box"]
    draw.rectangle(
        [
            x0 + bx0 * gray.width,
            y0 + by0 * gray.height,
            x0 + bx1 * gray.width - 1,
            y0 + by1 * gray.height - 1,
        ],
        outline=RECTANGLE_COLOUR if meta.get("roi_method") == "rectangle" else BOX_COLOUR,
        width=2,
    )
    positive = [name for name, value in meta["labels"].items() if value == 1]
    text = f"{meta['key']} {meta['split']} {meta['view'] or ''}\n" + (
        ", ".join(positive) or "no positive label"
    )
    if "roi_method" in meta:
        text += f"\nroi {meta['roi_method']} {meta['roi_confidence']:.2f}"
    draw.multiline_text((4, 4), text, fill=TEXT_COLOUR)
    return canvas


def preview(
    folder: Path, out: Path, num: int = 16, columns: int = 4, tile: int = 256, split: str | None = None
) -> Path:
    """Write a contact sheet of the first `num` samples (of `split`, if given) to `out` (PNG)."""
    from PIL import Image

    if num < 1 or columns < 1 or tile < 32:
        raise ValueError("--num and --columns must be >= 1, --tile >= 32")
    folder = Path(folder)
    manifest = read_manifest(folder)
    tiles = [_tile(c, manifest["image_format"], tile) for c in _samples(folder, manifest, split, num)]
    if not tiles:
        raise ValueError(f"{folder}: no samples{f' in split {split}' if split else ''} to preview")
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile))
    for i, image in enumerate(tiles):
        sheet.paste(image, ((i % columns) * tile, (i // columns) * tile))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a folder written by `xray-shard convert`")
    parser.add_argument("--out", type=Path, required=True, help="output PNG")
    parser.add_argument("--num", type=int, default=16, help="samples to show (default 16)")
    parser.add_argument("--columns", type=int, default=4, help="tiles per row (default 4)")
    parser.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    parser.add_argument("--split", choices=SPLITS, help="only this split")


def run(args: argparse.Namespace) -> int:
    out = preview(args.folder, args.out, args.num, args.columns, args.tile, args.split)
    print(f"xray-shard preview: wrote {out}")
    return 0
