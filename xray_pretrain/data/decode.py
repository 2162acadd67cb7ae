"""Host-side decoding of one sample's components (the wds backend; DALI decodes images itself).

Units: images come out as float32 fractions of full scale, the unit of the manifest's intensity
statistics: png16 and jp2 values / 65535, jpg (8-bit) values / 255.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from xray_core.shardio import LABELS_EXTENSION

# Full scale of each Pillow mode a stored image may decode to.
_FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "L": 255.0}


def decode_image(data: bytes) -> np.ndarray:
    """Encoded png16 / jpg / jp2 bytes -> (H, W) float32 in [0, 1] (fraction of full scale)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        mode = image.mode
        if mode not in _FULL_SCALE:
            raise ValueError(
                f"stored image has Pillow mode {mode!r}; shards hold 16-bit or 8-bit grayscale only "
                f"({', '.join(_FULL_SCALE)}): re-convert with `xray-shard convert`"
            )
        array = np.asarray(image)
    return array.astype(np.float32) / np.float32(_FULL_SCALE[mode])


def verify_image(data: bytes) -> None:
    """Raise when a stored image's bytes are damaged where a decoder may not notice: PNG checksums
    every chunk, but Pillow's decode skips the image-data checksums that libpng (DALI) enforces, so
    both backends check them here (about 5% of a png16 decode's time). Other formats: no-op."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        with Image.open(io.BytesIO(data)) as image:
            image.verify()


def image_size(data: bytes) -> tuple[int, int]:
    """(H, W) of an encoded image from its header only (no pixel decode)."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return height, width


def decode_roi(data: bytes) -> np.ndarray:
    """roi.png bytes (0/255) -> (h, w) uint8 mask of 0/1."""
    with Image.open(io.BytesIO(data)) as image:
        mask = np.asarray(image.convert("L"))
    return (mask >= 128).astype(np.uint8)


def estimate_roi(image_HW: np.ndarray) -> np.ndarray:
    """Chest-region mask (h, w) uint8 0/1 for a sample stored without roi.png (slow: full-image work).

    `xray_core.roi.estimate_chest_region` takes any dtype (it normalizes by percentiles) and returns
    the mask at the stored roi size (long side <= 128), which the transform then treats as roi.png.
    """
    from xray_core.roi import estimate_chest_region  # lazy: only tars without roi.png need it

    mask, _box = estimate_chest_region(image_HW)
    return (np.asarray(mask) >= 128).astype(np.uint8)


def encode_roi_png(mask_hw: np.ndarray) -> bytes:
    """(h, w) 0/1 mask -> 0/255 PNG bytes, the stored roi.png form (DALI decodes masks from bytes)."""
    buffer = io.BytesIO()
    Image.fromarray((mask_hw > 0).astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_labels(components: dict[str, bytes], num_labels: int, where: str) -> np.ndarray:
    """labels.npy -> (num_labels,) float32 in the folder's label order; all NaN when absent."""
    data = components.get(LABELS_EXTENSION)
    if data is None:
        return np.full(num_labels, np.nan, dtype=np.float32)
    labels = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32).reshape(-1)
    if labels.shape[0] != num_labels:
        raise ValueError(
            f"{where}: labels.npy has {labels.shape[0]} values, the manifest names {num_labels} labels"
        )
    return labels
