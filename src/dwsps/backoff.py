"""Reconnect delays: exponential backoff with full jitter (pure: no I/O).

The one formula every reconnecting part uses (the client, peer links, the
Redis backplane): attempt ``n`` (0-based) waits a uniformly random time in
``[0, min(maximum, initial * 2**n)]``. Full jitter spreads a crowd that lost
the same server at the same moment over the whole window instead of sending
it back in waves.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for successive reconnect attempts; :meth:`reset` after a success.

    >>> backoff = Backoff(0.1, 5.0, random.Random(1))
    >>> 0 <= backoff.next_delay() <= 0.1
    True
    >>> backoff.attempt
    1
    """

    __slots__ = ("_rng", "attempt", "initial", "maximum")

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff wants 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        """Attempts since the last :meth:`reset`."""
        self._rng = rng or random.Random()

    def bound(self) -> float:
        """The upper bound of the next delay."""
        return min(self.maximum, self.initial * 2.0 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        """The delay before the next attempt (counts the attempt)."""
        delay = self._rng.uniform(0, self.bound())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the smallest delays (a connection worked)."""
        self.attempt = 0
