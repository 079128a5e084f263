"""The bounded outbox: what a link holds until the other side confirms it (pure: no I/O).

Peer links and the Redis backplane both queue outgoing messages while the
other side is slow or unreachable, write them in order, and keep each one
until it is confirmed, so that a broken connection resends exactly what was
not confirmed. This is that queue, once:

* Entries are kept oldest first, each with its size in bytes; a write cursor
  tells how many of the oldest were written on the current connection.
* :meth:`Outbox.take_unsent` moves the cursor (the caller writes what it
  returns); :meth:`Outbox.confirm` removes the oldest written entry;
  :meth:`Outbox.rewind` (the connection broke) makes everything unwritten
  again, so the next connection writes it all once more, in order.
* It is bounded in entries and in bytes. When an :meth:`Outbox.add` passes a
  bound, the oldest entries go: counted as ``dropped`` if they were never
  written, ``forgotten`` if they were written but not confirmed (they may
  well have arrived). Nothing leaves uncounted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class OutboxStats:
    """What happened to the entries of an outbox (counts of entries)."""

    queued: int = 0
    """Entries added."""
    sent: int = 0
    """First writes of an entry."""
    resent: int = 0
    """Writes of an entry already written on an earlier connection."""
    confirmed: int = 0
    """Entries the other side accepted."""
    rejected: int = 0
    """Entries the other side refused (not retried)."""
    dropped: int = 0
    """Evicted by a bound before ever being written: lost for this link."""
    forgotten: int = 0
    """Evicted by a bound after being written, before a confirmation: not resent."""

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Outbox(Generic[T]):
    """Entries not yet confirmed, oldest first, bounded in count and bytes.

    >>> box: Outbox[str] = Outbox(max_entries=2, max_bytes=100)
    >>> box.add("a", 1), box.add("b", 1), box.add("c", 1)
    (0, 0, 1)
    >>> box.take_unsent(10)
    ['b', 'c']
    >>> box.confirm(), len(box)
    ('b', 1)
    """

    __slots__ = (
        "_bytes",
        "_entries",
        "_high_water",
        "_max_bytes",
        "_max_entries",
        "_serial",
        "_written",
        "stats",
    )

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._max_entries = max(1, max_entries)
        self._max_bytes = max(1, max_bytes)
        # (serial, item, size); serials tell a first write from a resend.
        self._entries: deque[tuple[int, T, int]] = deque()
        self._written = 0
        self._bytes = 0
        self._serial = 0
        self._high_water = 0  # highest serial ever written
        self.stats = OutboxStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[T]:
        """The held entries, oldest first."""
        return (item for _, item, _ in self._entries)

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._bytes

    @property
    def in_flight(self) -> int:
        """Entries written on the current connection and not confirmed yet."""
        return self._written

    @property
    def unsent(self) -> int:
        """Entries not written on the current connection."""
        return len(self._entries) - self._written

    def add(self, item: T, size: int) -> int:
        """Queue ``item`` (``size`` bytes); return how many old entries the bounds evicted."""
        self._serial += 1
        entries = self._entries
        entries.append((self._serial, item, size))
        self._bytes += size
        self.stats.queued += 1
        evicted = 0
        while len(entries) > self._max_entries or self._bytes > self._max_bytes:
            _, _, old = entries.popleft()
            self._bytes -= old
            evicted += 1
            if self._written:
                self._written -= 1
                self.stats.forgotten += 1
            else:
                self.stats.dropped += 1
        return evicted

    def take_unsent(self, limit: int, max_bytes: int | None = None) -> list[T]:
        """Mark up to ``limit`` unwritten entries (and about ``max_bytes``) written; return them.

        At least one entry is returned when any is unwritten, whatever its size.
        """
        entries = self._entries
        start = self._written
        stop = min(len(entries), start + limit)
        out: list[T] = []
        total = 0
        stats = self.stats
        i = start
        while i < stop:
            serial, item, size = entries[i]
            if max_bytes is not None and out and total + size > max_bytes:
                break
            total += size
            out.append(item)
            if serial <= self._high_water:
                stats.resent += 1
            else:
                stats.sent += 1
                self._high_water = serial
            i += 1
        self._written = i
        return out

    def oldest_written(self) -> T | None:
        """The oldest entry written on this connection and not confirmed, or None."""
        return self._entries[0][1] if self._written else None

    def confirm(self, ok: bool = True) -> T | None:
        """Settle the oldest written entry: accepted (``ok``) or rejected. None if none."""
        if not self._written:
            return None
        _, item, size = self._entries.popleft()
        self._written -= 1
        self._bytes -= size
        if ok:
            self.stats.confirmed += 1
        else:
            self.stats.rejected += 1
        return item

    def rewind(self) -> None:
        """The connection is gone: every entry held is unwritten again (resent next time)."""
        self._written = 0

    def clear(self) -> int:
        """Forget everything held (shutdown); return how many entries."""
        n = len(self._entries)
        self._entries.clear()
        self._written = 0
        self._bytes = 0
        return n
