"""How the ``dwsps serve`` process gives memory back (glibc only; elsewhere nothing).

glibc serves allocations above its *mmap threshold* with their own mapping,
unmapped on free, and smaller ones from the heap, which it rarely returns to
the system. By default the threshold moves up (to 32 MiB) each time a mapped
block is freed, so after one burst of large buffers (messages of hundreds of
KB, a backlog) every later large buffer lives in the heap and the process
keeps its peak RSS for good. Fixing the threshold keeps large buffers mapped:
when a burst ends, its memory goes back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
LARGE = 128 * 1024
"""Allocations at least this large get their own mapping (glibc's initial threshold)."""


def give_back_large_buffers(threshold: int = LARGE) -> bool:
    """Pin glibc's mmap threshold at ``threshold``; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
