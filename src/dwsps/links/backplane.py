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

Shared history
    When the engine keeps history streams (:class:`SharedHistory`, Redis) and
    the server has history patterns, the link offers them to the hub
    (:meth:`BackplaneLink.kept_history`): a publish to a history topic goes
    to the engine's append, which assigns the offset and sends it on the
    channel as a *kept* envelope. Every server, the publisher's own included,
    delivers kept envelopes as they come back, in offset order: a
    :class:`~dwsps.links.gaps.GapTracker` per stream drops copies, holds
    later ones after a jump while it reads the missing range from the
    engine, and, after a new engine session, reads every tracked stream from
    where it was. ``gaps`` then also counts what the stream no longer had;
    ``repaired`` what it restored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from dwsps.errors import ConfigError, EnvelopeError
from dwsps.history import HistoryPattern, HistoryPatterns, Publication, new_epoch, shared_ttl
from dwsps.http import Handler, HttpRequest, HttpResponse, json_response
from dwsps.interest import ALL
from dwsps.links import KeptHistory, Link, LinkHost
from dwsps.links import envelope as env
from dwsps.links.engine import (
    Backplane,
    BackplaneOptions,
    SharedHistory,
    Sink,
    StateListener,
)
from dwsps.links.gaps import GapTracker, Repair
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
REPAIR_PAGE = 1000
"""Entries per read while repairing a gap."""
_ASSIGNED_STREAMS = 65_536


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
        # Shared history (kept_history): off until the hub asks for it.
        self._engine_history: SharedHistory | None = None
        self._patterns: HistoryPatterns | None = None
        self._tracker: GapTracker[Publish] = GapTracker()
        self._repairs: dict[str, asyncio.Task[None]] = {}
        # stream -> the highest (epoch, offset) the engine assigned to our appends,
        # for the fence against a Redis that came back without its tail.
        self._assigned: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self.kept_delivered = 0

    async def start(self) -> None:
        """Start the engine: returns once connected, or soon if it cannot connect yet."""
        await self.backplane.start(self.receive, self._state_changed)

    async def close(self) -> None:
        """Stop the engine."""
        for task in list(self._repairs.values()):
            task.cancel()
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
        keys = self._wanted
        if len(self._tracker) and ALL not in keys:
            self._tracker.forget(
                [s for s in self._tracker.streams() if env.channel_key(s) not in keys]
            )

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
        if e.epoch is not None:
            self._receive_kept(e)
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

    # -- shared history ----------------------------------------------------

    def kept_history(self, patterns: HistoryPatterns) -> KeptHistory | None:
        """Keep the streams of ``patterns`` in the engine, if it can (Redis can)."""
        engine = self.backplane
        if not isinstance(engine, SharedHistory):
            return None
        self._engine_history = engine
        self._patterns = patterns
        return self

    def append(
        self, pub: Publish, stream: str, pattern: HistoryPattern, body: bytes
    ) -> asyncio.Future[tuple[str, int]]:
        """Append to the engine's stream (KeptHistory); it comes back as a kept envelope."""
        engine = self._engine_history
        assert engine is not None
        payload = env.encode(
            self._server_id,
            0,
            pub.topic,
            pub.timestamp or self.host.clock.now(),
            orjson.Fragment(body),
            pub.origin,
            pub.seq,
            pub.from_peer,
            stream,
        )
        known = self._known(stream)
        self.forwarded += 1
        future = engine.append(
            env.channel_key(pub.topic),
            stream,
            pattern.size,
            shared_ttl(pattern),
            payload,
            new_epoch(),
            known,
        )
        future.add_done_callback(lambda f: self._assigned_to(stream, f))
        return future

    def _known(self, stream: str) -> tuple[str, int] | None:
        seen = self._tracker.position(stream)
        mine = self._assigned.get(stream)
        if seen is None or (mine is not None and mine[0] == seen[0] and mine[1] > seen[1]):
            return mine
        return seen

    def _assigned_to(self, stream: str, future: asyncio.Future[tuple[str, int]]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        assigned = self._assigned
        assigned[stream] = future.result()
        assigned.move_to_end(stream)
        if len(assigned) > _ASSIGNED_STREAMS:
            assigned.popitem(last=False)

    async def read(
        self, stream: str, after: int, limit: int, newest: bool = False
    ) -> tuple[str, int, list[Publication]]:
        """Publications of ``stream`` after ``after`` from the engine (KeptHistory)."""
        epoch, head, pubs = await self._read_publishes(stream, after, limit, newest)
        return epoch, head, [p.position for p in pubs]  # type: ignore[misc]

    async def _read_publishes(
        self, stream: str, after: int, limit: int, newest: bool = False
    ) -> tuple[str, int, list[Publish]]:
        engine = self._engine_history
        patterns = self._patterns
        assert engine is not None
        assert patterns is not None
        found = patterns.stream_of(stream)
        pattern = found[1] if found is not None else None
        ttl = shared_ttl(pattern) if pattern is not None else 3600.0
        got = await engine.read(stream, after, limit, new_epoch=new_epoch(), ttl=ttl, newest=newest)
        max_age = pattern.max_age if pattern is not None else None
        pubs: list[Publish] = []
        entries = reversed(got.entries) if newest else got.entries
        for entry in entries:
            if max_age is not None and entry.age > max_age:
                continue
            kept = self._decode_kept(entry.payload, got.epoch, entry.offset)
            if kept is not None:
                pubs.append(kept)
        return got.epoch, got.offset, pubs

    def _decode_kept(self, payload: bytes, epoch: str, offset: int) -> Publish | None:
        try:
            e = env.decode(payload)
        except EnvelopeError as exc:
            self.invalid += 1
            log.warning("ignoring a history entry that is not a dwsps envelope: %s", exc)
            return None
        if e.stream is None:
            self.invalid += 1
            return None
        e.epoch, e.offset = epoch, offset
        return _kept_publish(e)

    def _receive_kept(self, e: env.Envelope) -> None:
        key = env.channel_key(e.topic)
        wanted = self._wanted
        if (key not in wanted and ALL not in wanted) or self._engine_history is None:
            return
        assert e.stream is not None
        assert e.epoch is not None
        pub = _kept_publish(e)
        ready, repair = self._tracker.arrive(e.stream, e.epoch, e.offset, pub)
        for item in ready:
            self._deliver_kept(item)
        if repair is not None:
            self._start_repair(repair)

    def _deliver_kept(self, pub: Publish) -> None:
        self.kept_delivered += 1
        self.delivered += 1
        self.host.receive_kept(pub, None if pub.origin == self._server_id else self._marker)

    def _start_repair(self, repair: Repair) -> None:
        if repair.stream in self._repairs:
            return
        task = asyncio.get_running_loop().create_task(self._repair(repair))
        self._repairs[repair.stream] = task

    async def _repair(self, repair: Repair | None) -> None:
        assert repair is not None
        stream = repair.stream
        gaps_before = self._tracker.gaps
        try:
            while repair is not None:
                epoch, head, pubs = await self._read_publishes(stream, repair.after, REPAIR_PAGE)
                ready, repair = self._tracker.fill(
                    stream,
                    epoch,
                    head,
                    [(p.position.offset, p) for p in pubs if p.position is not None],
                    len(pubs) >= REPAIR_PAGE,
                )
                for item in ready:
                    self._deliver_kept(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Resumed by the resync of the next engine session.
            self._tracker.abandon(stream)
            log.warning(
                "backplane: repairing stream %r failed (%s); retried on reconnect", stream, exc
            )
        finally:
            if self._repairs.get(stream) is asyncio.current_task():
                del self._repairs[stream]
        lost = self._tracker.gaps - gaps_before
        if lost:
            log.warning(
                "backplane: %d publication(s) of stream %r were missed and are no longer "
                "in the engine's history (%d in total)",
                lost,
                stream,
                self._tracker.gaps,
            )

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
            if self._engine_history is not None:
                # Anything may have been missed while the session was down.
                for repair in self._tracker.resync():
                    self._start_repair(repair)
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
            gaps=self.gaps + self._tracker.gaps,
            repaired=self._tracker.repaired,
            epochs_reset=self._tracker.resets,
            invalid=self.invalid,
            interest=sorted(self._wanted),
        )
        return out

    def http_routes(self) -> Mapping[str, Handler]:
        """``GET /health/backplane``: 200 when healthy, else 503; the status as JSON."""
        return {"/health/backplane": self._health}

    def _health(self, request: HttpRequest) -> HttpResponse:
        return json_response(self.status(), 200 if self.healthy else 503)


def _kept_publish(e: env.Envelope) -> Publish:
    """The publish of a kept envelope, its position a :class:`Publication` (message bytes kept)."""
    assert e.stream is not None
    assert e.epoch is not None
    kept = Publication(e.stream, e.epoch, e.offset, e.topic, e.timestamp, e.body, e.from_peer, 0.0)
    return Publish(
        e.topic, orjson.Fragment(e.body), e.timestamp, None, e.from_peer, e.origin, e.seq, kept
    )
