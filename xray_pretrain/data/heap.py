"""Returning freed memory to the OS after large one-off numpy temporaries (epoch order, val subset)."""

from __future__ import annotations

import contextlib
import ctypes


def release_freed_heap() -> None:
    """Give the heap that large temporaries freed back to the OS. glibc keeps freed chunks below its
    dynamic mmap threshold (up to 32 MB) in the heap, so a rank's RSS would keep an epoch's
    temporaries: measured ~2.5 bytes per sample per rank at 9M samples without this call.
    A no-op where the C library has no malloc_trim."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
