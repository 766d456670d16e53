"""Pins glibc's heap thresholds so that timings measure work, not the allocator's moods.

With glibc's defaults, freeing a solver's 200 KB temporaries hands memory back to the kernel
(heap trimming, adaptive mmap threshold) and the next allocation faults it in again: a 10-step
heun run on a (64, 1, 28, 28) float32 state took ~409 minor page faults, and identical processes
on a 2-core VM measured anywhere from 110 to 13,800 µs per step. With a fixed mmap threshold
(64 MiB) and trim threshold (256 MiB) the heap keeps its pages (2 faults per run) and repeated
runs agree far better. The setting is recorded with every result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20


def pin_glibc_heap() -> str:
    """Apply the thresholds where the C library is glibc; returns what was done, for the record."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "platform default (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = (
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if not applied:
        return "glibc default (mallopt refused)"
    return f"glibc mallopt M_MMAP_THRESHOLD={MMAP_THRESHOLD} M_TRIM_THRESHOLD={TRIM_THRESHOLD}"
