"""Duplicate detection by (origin server, sequence number) (pure: no I/O).

A message can reach a server twice: a peer link resends what the peer had not
confirmed when the link broke, and peering plus a backplane are two paths for
the same publish. Each origin numbers its publishes; a receiver remembers, per
origin, the highest number seen and which of the numbers just below it have
been seen, in a bitmap window.
"""

from __future__ import annotations

from collections import OrderedDict


class Deduplicator:
    """``first_time(origin, seq)`` is True exactly once per pair within the window."""

    __slots__ = ("_max_origins", "_origins", "_window")

    def __init__(self, window: int = 1 << 16, max_origins: int = 4096) -> None:
        self._window = window
        self._max_origins = max_origins
        # origin -> [highest seq seen, bitmap: bit i set = (highest - i) seen]
        self._origins: OrderedDict[str, list[int]] = OrderedDict()

    def first_time(self, origin: str, seq: int) -> bool:
        """Record the pair; return False if it was seen before (or is too old to tell)."""
        state = self._origins.get(origin)
        if state is None:
            self._origins[origin] = [seq, 1]
            if len(self._origins) > self._max_origins:
                self._origins.popitem(last=False)
            return True
        self._origins.move_to_end(origin)
        high, bits = state
        if seq > high:
            shift = seq - high
            bits = ((bits << shift) | 1) & ((1 << self._window) - 1) if shift < self._window else 1
            state[0], state[1] = seq, bits
            return True
        offset = high - seq
        if offset >= self._window:
            return False
        mask = 1 << offset
        if bits & mask:
            return False
        state[1] = bits | mask
        return True

    def forget(self, origin: str) -> None:
        """Drop what is known about ``origin`` (e.g. it restarted with a new id)."""
        self._origins.pop(origin, None)
