"""Any supported file -> `LoadedImage`, the decoder picked by content (not extension).

Kept apart from `images` (the shared pieces) and `dicom` (the DICOM decoder) so that neither of
those imports the other's caller: images <- dicom <- load.
"""

from __future__ import annotations

import os
from pathlib import Path

from xray_core import dicom
from xray_core.images import DecodeOptions, LoadedImage, SkipInput, load_pillow_image, sniff_kind


def load_image(path: Path, options: DecodeOptions) -> LoadedImage:
    """Decode any supported file by content (not extension). Raises SkipInput with a precise reason."""
    if not os.path.exists(path):  # follows symlinks: a broken one is an input that cannot be read
        target = f" -> {os.readlink(path)}" if os.path.islink(path) else ""
        raise SkipInput(f"broken symlink{target}: target does not exist" if target else "file not found")
    with open(path, "rb") as f:
        head = f.read(132)
    if not head:
        raise SkipInput("empty file (0 bytes)")
    kind = sniff_kind(head)
    if kind == "unknown" or kind == "dicom":
        return dicom.load_dicom(path, options, has_preamble=kind == "dicom")
    return load_pillow_image(path, options)
