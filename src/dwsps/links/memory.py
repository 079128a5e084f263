"""The in-memory backplane: servers in one process, or just this one.

``memory://`` (the default) is private to one server: nothing else can hear
it, so the server skips the backplane altogether and pays nothing for it.
``memory://NAME`` joins the process-wide hub called NAME; every server in the
process on the same name behaves as one service, exactly as servers on one
Redis do (asynchronous delivery, channels by first topic level, the sender
hears its own envelopes). It is the test double for the backplane contract
and the way to embed several servers in one program.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from dwsps.interest import ALL
from dwsps.links.engine import Backplane, BackplaneOptions, Sink, StateListener


class MemoryHub:
    """Channels shared by the memory backplanes of one name."""

    __slots__ = ("channels", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.channels: dict[str, set[MemoryBackplane]] = {}

    def publish(self, key: str, payload: bytes) -> int:
        """Hand ``payload`` to every subscriber of ``key`` or of everything; return how many."""
        direct = self.channels.get(key)
        every = self.channels.get(ALL)
        receivers = (direct | every) if direct and every else (direct or every or set())
        for backplane in receivers:
            backplane.receive(payload)
        return len(receivers)

    def subscribers(self, key: str) -> int:
        """How many backplanes subscribe to ``key`` exactly (like Redis ``PUBSUB NUMSUB``)."""
        return len(self.channels.get(key, ()))


_HUBS: dict[str, MemoryHub] = {}


def hub(name: str) -> MemoryHub:
    """The process-wide hub called ``name`` (created on first use)."""
    found = _HUBS.get(name)
    if found is None:
        found = _HUBS[name] = MemoryHub(name)
    return found


class MemoryBackplane(Backplane):
    """A backplane on a :class:`MemoryHub`; always healthy."""

    def __init__(self, hub_: MemoryHub | None) -> None:
        self.hub = hub_
        self.shared = hub_ is not None
        self._sink: Sink | None = None
        self._keys: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.published = 0
        self.received = 0

    @classmethod
    def from_url(cls, url: str, options: BackplaneOptions) -> MemoryBackplane:
        """``memory://`` → private; ``memory://NAME`` → the hub NAME."""
        name = urlsplit(url).netloc
        return cls(hub(name) if name else None)

    async def start(self, sink: Sink, on_state: StateListener) -> None:
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        on_state(True, "in-memory hub")

    async def close(self) -> None:
        for key in list(self._keys):
            self.unsubscribe(key)
        self._sink = None

    def publish(self, key: str, payload: bytes) -> None:
        self.published += 1
        if self.hub is not None:
            self.hub.publish(key, payload)

    def receive(self, payload: bytes) -> None:
        """Called by the hub; delivers on a later loop turn, in order, like a network would."""
        if self._sink is not None and self._loop is not None:
            self.received += 1
            self._loop.call_soon(self._deliver, payload)

    def _deliver(self, payload: bytes) -> None:
        if self._sink is not None:
            self._sink(payload)

    def subscribe(self, key: str) -> None:
        self._keys.add(key)
        if self.hub is not None:
            self.hub.channels.setdefault(key, set()).add(self)

    def unsubscribe(self, key: str) -> None:
        self._keys.discard(key)
        if self.hub is not None:
            members = self.hub.channels.get(key)
            if members is not None:
                members.discard(self)
                if not members:
                    del self.hub.channels[key]

    @property
    def healthy(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {
            "url": f"memory://{self.hub.name if self.hub else ''}",
            "state": "up",
            "healthy": True,
            "keys": sorted(self._keys),
            "subscribed": sorted(self._keys),
            "published": self.published,
            "received": self.received,
        }
