"""Backplanes: pub/sub between dwsps servers so that many servers act as one service.

A backplane moves opaque envelopes (:mod:`dwsps.backplane.envelope`) between
servers on channels named by *key*, the first level of a topic. The interface
is small on purpose, so that another engine (NATS, …) is one more module and
one more URL scheme:

``start(sink, on_state)``
    Begin connecting; return soon even when the engine is unreachable.
    ``sink(payload)`` is called for every envelope received on a subscribed
    key; ``on_state(up, reason)`` when the backplane becomes usable or stops
    being usable.
``close()``
    Stop (best effort to send what is queued first).
``publish(key, payload)``
    Queue an envelope for channel ``key``. Never blocks; while the engine is
    unreachable envelopes wait in a bounded buffer.
``subscribe(key)`` / ``unsubscribe(key)``
    Start / stop receiving channel ``key`` (:data:`ALL`: every channel). The
    server calls these only when a key's local reference count goes 0↔1.
``healthy``, ``status()``
    Whether it is usable now, and a JSON-ready description.

Implementations are chosen by URL scheme with :func:`create_backplane`:
``memory://`` (the default: embedded, this server alone), ``memory://NAME``
(servers in one process sharing a named in-memory hub: embedding and tests),
``redis://`` and ``rediss://`` (:mod:`dwsps.backplane.redis`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dwsps.backplane.envelope import ALL

__all__ = [
    "ALL",
    "Backplane",
    "BackplaneOptions",
    "Sink",
    "StateListener",
    "create_backplane",
    "register_scheme",
]

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


BackplaneFactory = Callable[[str, BackplaneOptions], Backplane]
_SCHEMES: dict[str, BackplaneFactory] = {}


def register_scheme(scheme: str, factory: BackplaneFactory) -> None:
    """Make ``create_backplane`` build ``factory(url, options)`` for ``scheme://`` URLs."""
    _SCHEMES[scheme] = factory


def create_backplane(url: str, options: BackplaneOptions) -> Backplane:
    """Build the backplane for ``url`` (not started); ValueError for an unknown scheme."""
    scheme = urlsplit(url).scheme.lower()
    factory = _SCHEMES.get(scheme)
    if factory is None:
        _load_builtin(scheme)
        factory = _SCHEMES.get(scheme)
    if factory is None:
        known = ", ".join(sorted({*_SCHEMES, "memory", "redis", "rediss"}))
        raise ValueError(f"unknown backplane scheme {scheme!r} in {redact(url)}; known: {known}")
    return factory(url, options)


def _load_builtin(scheme: str) -> None:
    # Imported on demand: a server on the memory default never imports redis.
    if scheme == "memory":
        from dwsps.backplane import memory

        register_scheme("memory", memory.MemoryBackplane.from_url)
    elif scheme in ("redis", "rediss"):
        from dwsps.backplane import redis

        register_scheme("redis", redis.RedisBackplane)
        register_scheme("rediss", redis.RedisBackplane)


def redact(url: str) -> str:
    """``url`` without its password (for logs and status)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()
