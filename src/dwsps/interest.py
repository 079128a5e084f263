"""Upstream interest: reference counts of local subscriptions by channel key (pure).

A server subscribes upstream (on the backplane) to one channel per first topic
level that some local subscription needs, and to every channel while some
subscription starts with ``*``. Each (subscription topic, connection) pair
counts once for the channel key of its topic; the backplane is told only when
a key's count goes from 0 to 1 (:meth:`add`) or from 1 to 0 (:meth:`remove`),
so the subscribe path costs a string split and a dict update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

ALL: Final = "*"
"""The interest key meaning "every channel" (a subscription whose first level is ``*``)."""


def channel_key(topic: str) -> str:
    """The channel key of a topic or subscription: its first level.

    A subscription whose first level is ``*`` gets :data:`ALL`.
    """
    return topic.partition(".")[0]


class InterestCounter:
    """Counts local subscriptions per channel key and reports 0↔1 changes."""

    __slots__ = ("_counts", "_on_first", "_on_last")

    def __init__(self, on_first: Callable[[str], None], on_last: Callable[[str], None]) -> None:
        self._counts: dict[str, int] = {}
        self._on_first = on_first
        self._on_last = on_last

    def add(self, topic: str) -> None:
        """One more (topic, connection) subscription."""
        key = channel_key(topic)
        counts = self._counts
        n = counts.get(key, 0)
        counts[key] = n + 1
        if n == 0:
            self._on_first(key)

    def remove(self, topic: str) -> None:
        """One (topic, connection) subscription fewer (ignored if none was counted)."""
        key = channel_key(topic)
        counts = self._counts
        n = counts.get(key, 0)
        if n > 1:
            counts[key] = n - 1
        elif n == 1:
            del counts[key]
            self._on_last(key)

    def __contains__(self, key: object) -> bool:
        return key in self._counts

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, key: str) -> int:
        """Local subscriptions under ``key``."""
        return self._counts.get(key, 0)
