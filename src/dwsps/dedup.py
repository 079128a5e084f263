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

    __slots__ = ("_mask", "_max_origins", "_origins", "_window")

    def __init__(self, window: int = 1 << 16, max_origins: int = 4096) -> None:
        self._window = window
        self._mask = (1 << window) - 1
        self._max_origins = max_origins
        # origin -> [highest seq seen, run, bits]: the ``run`` numbers up to the
        # highest were all seen; below them bit i of ``bits`` set = (highest - run - i)
        # seen. In-order arrival (the usual case on a link or a backplane) only
        # counts the run up, instead of shifting a window-sized bitmap per publish.
        self._origins: OrderedDict[str, list[int]] = OrderedDict()

    def first_time(self, origin: str, seq: int) -> bool:
        """Record the pair; return False if it was seen before (or is too old to tell)."""
        state = self._origins.get(origin)
        if state is None:
            self._origins[origin] = [seq, 1, 0]
            if len(self._origins) > self._max_origins:
                self._origins.popitem(last=False)
            return True
        self._origins.move_to_end(origin)
        high, run, bits = state
        window = self._window
        if seq == high + 1:
            state[0] = seq
            if run < window:
                state[1] = run + 1
            else:
                state[2] = 0  # the run covers the whole window
            return True
        if seq > high:
            gap = seq - high
            below = 0  # a jump past the window forgets everything
            if gap < window:
                # The run and the bits below it move down by the gap, behind the new high.
                below = (((bits << run) | ((1 << run) - 1)) << (gap - 1)) & self._mask
            state[0], state[1], state[2] = seq, 1, below
            return True
        offset = high - seq
        if offset >= window:
            return False
        if offset < run:
            return False
        mask = 1 << (offset - run)
        if bits & mask:
            return False
        state[2] = bits | mask
        return True

    def forget(self, origin: str) -> None:
        """Drop what is known about ``origin`` (e.g. it restarted with a new id)."""
        self._origins.pop(origin, None)
