"""The write scheduler all connections of a server share: one write per connection per
loop turn.

A connection queues frames on itself (``pending``) and tells the :class:`Writer` it is
*dirty*; at the end of the loop turn (``call_soon``) the writer closes and queues the open
fan-out batch the router planned (``dwsps.router``), then flushes every dirty connection
once. The open batch is closed before anything else is queued for one of its members, so
each connection sees its frames in order. The writer also keeps the server's count of
bytes held for connections (``buffered``, the memory budget's measure).

A module of its own so that the compiled build compiles it: it runs per publish and per
member, and a connection, which subclasses picows' listener, cannot be compiled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

from dwsps.router import Batch


class Outgoing(Hashable, Protocol):
    """What the writer needs of a connection."""

    pending: list[bytes] | None
    """Frames queued since the last flush, or None (not dirty)."""

    @property
    def closing(self) -> bool:
        """Whether the connection is closing (it takes no more deliveries)."""

    def flush(self) -> None:
        """Write what is queued (one write)."""


C = TypeVar("C", bound=Outgoing)


class BatchPlanner(Protocol[C]):
    """The part of the router the writer needs: closing open fan-out batches."""

    @property
    def open_batch(self) -> Batch[C] | None:
        """The batch being filled, if any (read only)."""

    def release(self, member: C) -> Batch[C] | None:
        """Close and return the open batch if ``member`` is in it."""

    def close_batch(self) -> Batch[C] | None:
        """Close and return the open batch."""


class Writer(Generic[C]):
    """Schedules the writes of all connections: one write per connection per loop turn.

    Connections with something queued are *dirty*; at the end of the loop turn
    (``call_soon``) the open fan-out batch is closed and queued, then every
    dirty connection flushes once. ``turn`` counts the bytes queued since
    the last flush (each frame once); past ``flush_at`` whoever queues calls
    :meth:`flush_now`.
    """

    __slots__ = (
        "_dirty",
        "_scheduled",
        "budget",
        "buffered",
        "flush_at",
        "loop",
        "planner",
        "turn",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        planner: BatchPlanner[C],
        *,
        flush_at: int = 1024 * 1024,
        budget: int = 0,
    ) -> None:
        self.loop = loop
        self.planner = planner
        self._dirty: list[C] = []
        self._scheduled = False
        self.turn = 0
        """Bytes queued since the last flush."""
        self.flush_at = flush_at
        """``turn`` past which queuing flushes at once."""
        self.buffered = 0
        """Bytes the server holds for its connections: backlogs, the transport buffers of
        connections that stopped reading, partial fragmented messages."""
        self.budget = budget or 1 << 62
        """``buffered`` past which the server refuses new work (0: no budget)."""

    @property
    def over_budget(self) -> bool:
        """Whether the server holds more than its memory budget."""
        return self.buffered > self.budget

    def queue_batch(self, batch: Batch[C]) -> None:
        """Queue a closed batch's frames, joined once, on each of its members."""
        data = batch.data()
        dirty = self._dirty
        for conn in batch.members:
            # Connection.send inlined, without the batch check: this is the batch.
            pending = conn.pending
            if pending is None:
                if conn.closing:
                    continue
                conn.pending = [data]
                dirty.append(conn)
            else:
                pending.append(data)

    def mark_dirty(self, conn: C) -> None:
        """``conn`` has data queued: flush it at the end of this loop turn."""
        self._dirty.append(conn)
        self.schedule()

    def schedule(self) -> None:
        """Make sure a flush runs at the end of this loop turn."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._turn_ends)

    def release(self, conn: C) -> None:
        """Queue the open batch first if ``conn`` is in it (its frames come before)."""
        batch = self.planner.release(conn)
        if batch is not None:
            self.queue_batch(batch)

    def flush_now(self) -> None:
        """Flush every dirty connection now (``turn`` passed ``flush_at``)."""
        self.turn = 0
        batch = self.planner.close_batch()
        if batch is not None:
            self.queue_batch(batch)
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    def _turn_ends(self) -> None:
        self._scheduled = False
        self.flush_now()
