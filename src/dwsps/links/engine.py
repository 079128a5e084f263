"""The backplane engine contract: how servers of one group exchange envelopes.

A :class:`Backplane` moves opaque envelopes (:mod:`dwsps.links.envelope`)
between servers on channels named by *key*, the first level of a topic. The
interface is small on purpose, so that another engine (NATS, …) is one more
module and one more URL scheme (registered in :mod:`dwsps.links.backplane`):

``start(sink, on_state)``
    Begin connecting; return soon even when the engine is unreachable.
    ``sink(payload)`` is called for every envelope received on a subscribed
    key; ``on_state(up, reason)`` when the backplane becomes usable or stops
    being usable.
``close()``
    Stop (best effort to send what is queued first).
``publish(key, payload)``
    Queue an envelope for channel ``key``. Never blocks; while the engine is
    unreachable envelopes wait in a bounded outbox.
``subscribe(key)`` / ``unsubscribe(key)``
    Start / stop receiving channel ``key`` (:data:`~dwsps.interest.ALL`: every
    channel). Called only when a key's local interest goes 0↔1.
``healthy``, ``status()``
    Whether it is usable now, and a JSON-ready description.

An engine may also keep history streams (:class:`SharedHistory`, below; the
Redis engine does, ``memory://`` and ``ipc://`` do not, so their servers keep
history in memory each).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Sink = Callable[[bytes], None]
"""Receives each envelope from the backplane, in the order the engine delivers them."""
StateListener = Callable[[bool, str], None]
"""Called with ``(up, reason)`` when a backplane's usability changes."""


@dataclass(frozen=True, slots=True)
class BackplaneOptions:
    """What a backplane is told besides its URL (filled from the server's config)."""

    server_id: str
    buffer_messages: int = 100_000
    buffer_bytes: int = 64 * 1024 * 1024


class Backplane(ABC):
    """Pub/sub between servers: see the module docstring for the contract."""

    shared: bool = True
    """False when nothing but this server can hear it (the private ``memory://``):
    the server then skips the backplane entirely."""

    marks_deliveries: bool = True
    """Whether deliveries that came through it carry ``"viaBackplane": true``
    (False for ``ipc://``: the workers of one server are one server to clients)."""

    @abstractmethod
    async def start(self, sink: Sink, on_state: StateListener) -> None:
        """Begin; returns without waiting for an unreachable engine."""

    @abstractmethod
    async def close(self) -> None:
        """Stop; queued envelopes get a short chance to leave first."""

    @abstractmethod
    def publish(self, key: str, payload: bytes) -> None:
        """Queue ``payload`` for channel ``key`` (never :data:`ALL`). Must not block."""

    @abstractmethod
    def subscribe(self, key: str) -> None:
        """Receive channel ``key`` (or every channel for :data:`ALL`)."""

    @abstractmethod
    def unsubscribe(self, key: str) -> None:
        """Stop receiving channel ``key``."""

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """Whether publishes leave and subscriptions are in place right now."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """State and counters, JSON-ready (shown in ``/health``)."""


@dataclass(frozen=True, slots=True)
class KeptEntry:
    """One publication read back from a shared history stream."""

    offset: int
    payload: bytes
    """The kept envelope (:mod:`dwsps.links.envelope`, without a position line)."""
    age: float
    """Seconds since the engine appended it, by the engine's clock."""


@dataclass(frozen=True, slots=True)
class StreamRead:
    """What :meth:`SharedHistory.read` found: the stream's position and some entries."""

    epoch: str
    offset: int
    """The stream's last offset when it was read."""
    entries: list[KeptEntry]
    """Oldest first, or newest first for a ``newest`` read."""


class SharedHistory(ABC):
    """An optional capability of a :class:`Backplane`: history streams kept in the engine.

    With it, every server of the group agrees on offsets and a client recovers
    on any server. ``append`` takes the next offset, keeps the envelope and
    sends it on channel ``key`` with a position line
    (:func:`dwsps.links.envelope.position_line`) in one atomic step, so the
    order of a stream's offsets is the order of its channel. The engine
    creates a stream with ``new_epoch`` when it has none (never had one, or
    lost it), and also when ``known`` (the highest (epoch, offset) the caller
    has seen of it) is ahead of what it holds in that epoch: it lost a tail,
    and those offsets must not name a second publication.
    """

    @abstractmethod
    def append(
        self,
        key: str,
        stream: str,
        size: int,
        ttl: float,
        payload: bytes,
        new_epoch: str,
        known: tuple[str, int] | None,
    ) -> asyncio.Future[tuple[str, int]]:
        """Queue the append (never blocks); the future gets the (epoch, offset) taken.

        Cancelling the future before the append was written withdraws it.
        While the engine is unreachable appends wait in the bounded outbox; one
        the bound evicts never completes (the caller bounds its wait).
        """

    @abstractmethod
    async def read(
        self,
        stream: str,
        after: int,
        limit: int,
        *,
        new_epoch: str,
        ttl: float,
        newest: bool = False,
    ) -> StreamRead:
        """Up to ``limit`` entries after offset ``after`` (the newest ones if ``newest``).

        A stream the engine has no state for is created empty with
        ``new_epoch``, so the position it reports stays valid for the first
        publish. Raises :class:`ConnectionError` when the engine is unreachable.
        """
