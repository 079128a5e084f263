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
"""

from __future__ import annotations

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
