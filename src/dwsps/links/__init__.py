"""Links: where a publish goes after local delivery, and where remote publishes come from.

A server is one node of a group. Its links connect it to the rest:

* peer links (:mod:`dwsps.links.peering`): outbound connections to other
  dwsps servers, to which organic publishes are forwarded (one hop);
* the backplane (:mod:`dwsps.links.backplane`): a shared engine (Redis, or an
  in-process hub) that makes many servers one service.

Both are a :class:`Link`. The server hands every publish it accepted to every
link (:meth:`Link.forward`: each link decides what it takes, e.g. peer links
skip what came from a peer), and tells every link when local interest in a
channel key starts or ends (:meth:`Link.interest_changed`). A link delivers
what it receives through its :class:`LinkHost` (the hub), which checks the
publish's identity before local delivery and never forwards it again.

The embedded default (``memory://``, no peers) is no link at all: nothing to
hand publishes to, and no branch for it anywhere.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Protocol

from dwsps.history import HistoryPattern, HistoryPatterns, Publication
from dwsps.http import Handler
from dwsps.messages import Clock, Publish
from dwsps.router import Admission


class LinkHost(Protocol):
    """What a link may ask of the server it belongs to."""

    @property
    def server_id(self) -> str:
        """This server's id (the ``origin`` of its organic publishes)."""

    @property
    def clock(self) -> Clock:
        """The server's clock (timestamps for publishes that have none)."""

    def receive(self, pub: Publish, extra: dict[str, Any] | None) -> Admission:
        """Deliver a publish that arrived through a link to local subscribers only.

        ``extra`` adds fields to the delivery (how it arrived). Returns what the
        identity check decided (duplicates and own publishes are not delivered).
        """

    def receive_kept(self, pub: Publish, extra: dict[str, Any] | None) -> None:
        """Deliver a publication of a shared history stream (``pub.position`` set).

        The link has put these in offset order and dropped copies, the
        server's own publications included: no identity check.
        """

    def emit(self, event: str, *args: Any) -> None:
        """Fire a server event (``peer_up``, ``backplane_down``, ...)."""


class KeptHistory(Protocol):
    """History streams shared by every server of a group (a link offers it; the hub uses it)."""

    def append(
        self, pub: Publish, stream: str, pattern: HistoryPattern, body: bytes
    ) -> asyncio.Future[tuple[str, int]]:
        """Append ``pub`` (``body``: its message as JSON) to ``stream``: the future gets
        (epoch, offset); every server of the group delivers it with that position."""

    async def read(
        self, stream: str, after: int, limit: int, newest: bool = False
    ) -> tuple[str, int, list[Publication]]:
        """(epoch, last offset, publications after ``after``), the ones past the age limit
        left out; oldest first, or the newest ``limit`` (still oldest first) if ``newest``.
        Raises ConnectionError when the engine is unreachable."""


class Link(ABC):
    """A way to the rest of the group; see the module docstring."""

    status_key: str
    """Where :meth:`status` goes in ``/health`` (e.g. ``peers``, ``backplane``)."""

    @abstractmethod
    async def start(self) -> None:
        """Begin connecting; return soon even when the other side is unreachable."""

    @abstractmethod
    async def close(self) -> None:
        """Stop, after a short chance to send what is held."""

    @abstractmethod
    def forward(self, pub: Publish) -> None:
        """Take a publish this server accepted (organic or from a peer). Never blocks."""

    def interest_changed(self, key: str, wanted: bool) -> None:  # noqa: B027 - optional hook
        """Local interest in channel ``key`` started (``wanted``) or ended (default: ignore)."""

    @property
    def healthy(self) -> bool:
        """False while the server should report itself degraded because of this link."""
        return True

    @abstractmethod
    def status(self) -> Any:
        """State and counters, JSON-ready."""

    def http_routes(self) -> Mapping[str, Handler]:
        """Extra ``GET`` paths this link serves (e.g. its own health check)."""
        return {}

    def kept_history(self, patterns: HistoryPatterns) -> KeptHistory | None:
        """Keep the history of ``patterns`` in the shared engine, if this link can."""
        return None
