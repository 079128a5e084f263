"""The backplane link: many servers on one shared engine act as one service.

Engines (:class:`~dwsps.links.engine.Backplane`) are chosen by URL scheme with
:func:`create_backplane`: ``memory://`` (the default: this server alone, so
no link is made at all), ``memory://NAME`` (servers in one process sharing a
named hub: embedding and tests), ``redis://`` and ``rediss://``
(:mod:`dwsps.links.redis`), ``ipc://`` (the workers of ``dwsps serve
--workers N``, :mod:`dwsps.links.ipc`).

A :class:`BackplaneLink` is the server's side, a :class:`~dwsps.links.Link`:

Outgoing
    Every publish a server accepts, organic or from a peer link, is put on the
    backplane once, on the channel of its first topic level, in an envelope
    naming this server as sender and carrying the publish's identity (origin,
    seq). Peer forwarding is not the backplane's business.

Incoming
    An envelope is delivered to the local subscribers only (never forwarded to
    peers nor put back on the backplane). Envelopes this server sent itself
    are skipped (Redis echoes them); the hub's identity check drops this
    server's own publishes and copies seen before (the same publish arrived by
    a peer link, by a second server that got it from a peer, or as a resend).

The marker
    Deliveries that reached this server through the backplane carry the
    extension field ``"viaBackplane": true``; original clients ignore it.
    ``fromPeerServer`` keeps its meaning: the publish entered the service
    through a peer link, on whichever server the subscriber is connected to.

Loss detection
    Each sender numbers its envelopes per channel (``c``). A receiver tracks
    the last number per (sender, channel) while it has interest in the
    channel; a jump is counted in ``gaps`` and logged: envelopes this server
    should have had and did not get (dropped from a full outbox, or lost while
    Redis restarted). Nothing is lost silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from dwsps.errors import ConfigError, EnvelopeError
from dwsps.http import Handler, HttpRequest, HttpResponse, json_response
from dwsps.interest import ALL
from dwsps.links import Link, LinkHost
from dwsps.links import envelope as env
from dwsps.links.engine import Backplane, BackplaneOptions, Sink, StateListener
from dwsps.messages import Publish
from dwsps.redact import redact
from dwsps.router import Admission

__all__ = [
    "ALL",
    "Backplane",
    "BackplaneLink",
    "BackplaneOptions",
    "Sink",
    "StateListener",
    "create_backplane",
    "register_scheme",
]

log = logging.getLogger("dwsps.backplane")

BackplaneFactory = Callable[[str, BackplaneOptions], Backplane]
_SCHEMES: dict[str, BackplaneFactory] = {}


def register_scheme(scheme: str, factory: BackplaneFactory) -> None:
    """Make ``create_backplane`` build ``factory(url, options)`` for ``scheme://`` URLs."""
    _SCHEMES[scheme] = factory


def create_backplane(url: str, options: BackplaneOptions) -> Backplane:
    """Build the backplane for ``url`` (not started); ConfigError for an unknown scheme."""
    scheme = urlsplit(url).scheme.lower()
    factory = _SCHEMES.get(scheme)
    if factory is None:
        _load_builtin(scheme)
        factory = _SCHEMES.get(scheme)
    if factory is None:
        known = ", ".join(sorted({*_SCHEMES, "memory", "redis", "rediss"} - {"ipc"}))
        raise ConfigError(f"backplane: unknown scheme {scheme!r} in {redact(url)}; known: {known}")
    return factory(url, options)


def _load_builtin(scheme: str) -> None:
    # Imported on demand: a server on the memory default never imports redis.
    if scheme == "memory":
        from dwsps.links import memory

        register_scheme("memory", memory.MemoryBackplane.from_url)
    elif scheme in ("redis", "rediss"):
        from dwsps.links import redis

        register_scheme("redis", redis.RedisBackplane)
        register_scheme("rediss", redis.RedisBackplane)
    elif scheme == "ipc":
        from dwsps.links import ipc

        register_scheme("ipc", ipc.IpcBackplane.from_url)


MARKER: Final[dict[str, Any]] = {"viaBackplane": True}
"""Added to every delivery that reached this server through the backplane."""
GAP_LOG_INTERVAL = 5.0


class BackplaneLink(Link):
    """Connects one server (its :class:`~dwsps.links.LinkHost`) to a :class:`Backplane`."""

    status_key = "backplane"

    def __init__(self, host: LinkHost, backplane: Backplane) -> None:
        self.host = host
        self.backplane = backplane
        self._server_id = host.server_id
        self._marker = MARKER if backplane.marks_deliveries else None
        self._wanted: set[str] = set()
        self._channel_seq: dict[str, int] = {}
        # channel key -> sender -> last channel sequence number seen
        self._last_seen: dict[str, dict[str, int]] = {}
        self.forwarded = 0
        self.delivered = 0
        self.duplicates = 0
        self.gaps = 0
        self.invalid = 0
        self._gap_log_at = 0.0

    async def start(self) -> None:
        """Start the engine: returns once connected, or soon if it cannot connect yet."""
        await self.backplane.start(self.receive, self._state_changed)

    async def close(self) -> None:
        """Stop the engine."""
        await self.backplane.close()

    @property
    def healthy(self) -> bool:
        """Whether the backplane is usable right now."""
        return self.backplane.healthy

    # -- interest ---------------------------------------------------------

    def interest_changed(self, key: str, wanted: bool) -> None:
        """Subscribe upstream to ``key`` while some local subscription needs it."""
        if wanted:
            self._wanted.add(key)
            self.backplane.subscribe(key)
            return
        self._wanted.discard(key)
        self.backplane.unsubscribe(key)
        # Numbering seen while subscribed means nothing after a pause.
        if key == ALL:
            for other in [k for k in self._last_seen if k not in self._wanted]:
                del self._last_seen[other]
        elif ALL not in self._wanted:
            self._last_seen.pop(key, None)

    # -- out --------------------------------------------------------------

    def forward(self, pub: Publish) -> None:
        """Put a publish this server accepted on the backplane (queues; never blocks)."""
        key = env.channel_key(pub.topic)
        cseq = self._channel_seq.get(key, 0) + 1
        self._channel_seq[key] = cseq
        payload = env.encode(
            self._server_id,
            cseq,
            pub.topic,
            pub.timestamp or self.host.clock.now(),
            pub.message,
            pub.origin,
            pub.seq,
            pub.from_peer,
        )
        self.forwarded += 1
        self.backplane.publish(key, payload)

    # -- in ---------------------------------------------------------------

    def receive(self, payload: bytes) -> None:
        """Handle one envelope from the engine."""
        try:
            e = env.decode(payload)
        except EnvelopeError as exc:
            self.invalid += 1
            log.warning("ignoring a backplane message that is not a dwsps envelope: %s", exc)
            return
        sender = e.sender
        if sender == self._server_id:
            return
        key = env.channel_key(e.topic)
        wanted = self._wanted
        if key not in wanted and ALL not in wanted:
            return  # in flight when the last local subscriber left
        seen = self._last_seen.get(key)
        if seen is None:
            seen = self._last_seen[key] = {}
        last = seen.get(sender)
        if last is None or e.channel_seq > last:
            seen[sender] = e.channel_seq
            if last is not None and e.channel_seq > last + 1:
                self._gap(sender, key, e.channel_seq - last - 1)
        pub = Publish(
            e.topic, orjson.Fragment(e.body), e.timestamp, None, e.from_peer, e.origin, e.seq
        )
        admission = self.host.receive(pub, self._marker)
        if admission is Admission.NEW:
            self.delivered += 1
        elif admission is Admission.DUPLICATE:
            self.duplicates += 1

    def _gap(self, sender: str, key: str, missing: int) -> None:
        self.gaps += missing
        now = time.monotonic()
        if now >= self._gap_log_at:
            self._gap_log_at = now + GAP_LOG_INTERVAL
            log.warning(
                "backplane: %d message(s) from server %s on channel %r never arrived "
                "(%d missed in total)",
                missing,
                sender,
                key,
                self.gaps,
            )

    # -- state ------------------------------------------------------------

    def _state_changed(self, up: bool, reason: str) -> None:
        if up:
            self.host.emit("backplane_up")
        else:
            self.host.emit("backplane_down", reason)

    def status(self) -> dict[str, Any]:
        """The engine's state and counters, plus this link's own."""
        out = self.backplane.status()
        out.update(
            forwarded=self.forwarded,
            delivered=self.delivered,
            duplicates=self.duplicates,
            gaps=self.gaps,
            invalid=self.invalid,
            interest=sorted(self._wanted),
        )
        return out

    def http_routes(self) -> Mapping[str, Handler]:
        """``GET /health/backplane``: 200 when healthy, else 503; the status as JSON."""
        return {"/health/backplane": self._health}

    def _health(self, request: HttpRequest) -> HttpResponse:
        return json_response(self.status(), 200 if self.healthy else 503)
