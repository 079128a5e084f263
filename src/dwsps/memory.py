"""How the ``dwsps serve`` process gives memory back (glibc only; elsewhere nothing).

glibc serves allocations above its *mmap threshold* with their own mapping,
unmapped on free, and smaller ones from the heap, which it rarely returns to
the system. By default the threshold moves up (to 32 MiB) each time a mapped
block is freed, so after one burst of large buffers (messages of hundreds of
KB, a backlog) every later large buffer lives in the heap and the process
keeps its peak RSS for good. Fixing the threshold keeps large buffers mapped:
when a burst ends, its memory goes back. Fixing it also fixes the *trim
threshold* (free memory at the top of the heap past which glibc shrinks the
heap), by default at 128 KiB: that would make the heap shrink and grow again
on every busy loop turn, so it is set well above.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
LARGE = 256 * 1024
"""Allocations at least this large get their own mapping."""
TRIM = 32 * 1024 * 1024
"""Free memory at the top of the heap that glibc keeps rather than giving it back."""


def give_back_large_buffers(threshold: int = LARGE, trim: int = TRIM) -> bool:
    """Pin glibc's mmap threshold at ``threshold``; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim)
        )
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
