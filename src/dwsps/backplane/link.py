"""The server's side of a backplane: what goes out, what comes in, and how it is told apart.

Outgoing
    Every publish a server accepts, organic or from a peer link, is put on the
    backplane once (:meth:`BackplaneLink.forward`), on the channel of its first
    topic level, in an envelope naming this server as sender and carrying the
    publish's identity (origin, seq) when it has one. Peer forwarding is not
    the backplane's business: only organic publishes go to peers, as before.

Incoming
    An envelope is delivered to the local subscribers only (never forwarded to
    peers nor put back on the backplane), after three checks: envelopes this
    server sent itself are skipped (Redis echoes them); publishes whose origin
    is this server are skipped (it delivered them when they were made);
    identities seen before are dropped and counted in
    ``stats.duplicates_dropped`` (the same publish arrived by a peer link, by a
    second server that got it from a peer, or as a resend after a reconnect).

The marker
    Deliveries that reached this server through the backplane carry the
    extension field ``"viaBackplane": true``; original clients ignore it.
    ``fromPeerServer`` keeps its meaning: it is present when the publish
    entered the service through a peer link, on whichever server the
    subscriber is connected to.

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
from typing import TYPE_CHECKING, Any, Final

import orjson

from dwsps.backplane import ALL, Backplane, BackplaneOptions, create_backplane
from dwsps.backplane import envelope as env
from dwsps.backplane.interest import InterestCounter
from dwsps.errors import EnvelopeError
from dwsps.messages import Publish

if TYPE_CHECKING:
    from dwsps.server import Server

log = logging.getLogger("dwsps.backplane")

MARKER: Final[dict[str, Any]] = {"viaBackplane": True}
"""Added to every delivery that reached this server through the backplane."""
GAP_LOG_INTERVAL = 5.0


class BackplaneLink:
    """Connects one :class:`~dwsps.server.Server` to a :class:`Backplane`."""

    def __init__(self, server: Server, backplane: Backplane) -> None:
        self.server = server
        self.backplane = backplane
        self.interest = InterestCounter(self._first, self._last)
        self._server_id = server.server_id
        self._channel_seq: dict[str, int] = {}
        # channel key -> sender -> last channel sequence number seen
        self._last_seen: dict[str, dict[str, int]] = {}
        self.forwarded = 0
        self.delivered = 0
        self.duplicates = 0
        self.gaps = 0
        self.invalid = 0
        self._gap_log_at = 0.0

    @classmethod
    def create(cls, server: Server) -> BackplaneLink | None:
        """The server's backplane link (not started); None for the private ``memory://``."""
        config = server.config
        backplane = create_backplane(
            config.backplane,
            BackplaneOptions(
                server.server_id, config.backplane_buffer_messages, config.backplane_buffer_bytes
            ),
        )
        if not backplane.shared:
            return None
        link = cls(server, backplane)
        server.add_http_route("/health/backplane", link.health_route)
        return link

    async def start(self) -> None:
        """Start the backplane: returns once connected, or soon if it cannot connect yet."""
        await self.backplane.start(self.receive, self._state_changed)

    async def close(self) -> None:
        """Stop the backplane."""
        await self.backplane.close()

    @property
    def healthy(self) -> bool:
        """Whether the backplane is usable right now."""
        return self.backplane.healthy

    # -- interest (called by the server on subscribe / unsubscribe) --------

    def _first(self, key: str) -> None:
        self.backplane.subscribe(key)

    def _last(self, key: str) -> None:
        self.backplane.unsubscribe(key)
        # Numbering seen while subscribed means nothing after a pause.
        if key == ALL:
            for other in [k for k in self._last_seen if k not in self.interest]:
                del self._last_seen[other]
        elif ALL not in self.interest:
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
            pub.timestamp or self.server.clock.now(),
            pub.message,
            pub.origin,
            pub.seq,
            pub.from_peer,
        )
        self.forwarded += 1
        self.backplane.publish(key, payload)

    # -- in ---------------------------------------------------------------

    def receive(self, payload: bytes) -> None:
        """Handle one envelope from the backplane."""
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
        interest = self.interest
        if key not in interest and ALL not in interest:
            return  # in flight when the last local subscriber left
        seen = self._last_seen.get(key)
        if seen is None:
            seen = self._last_seen[key] = {}
        last = seen.get(sender)
        if last is None or e.channel_seq > last:
            seen[sender] = e.channel_seq
            if last is not None and e.channel_seq > last + 1:
                self._gap(sender, key, e.channel_seq - last - 1)
        if e.origin is not None and e.seq is not None:
            if e.origin == self._server_id:
                return
            if not self.server.dedup.first_time(e.origin, e.seq):
                self.duplicates += 1
                self.server.stats.duplicates_dropped += 1
                return
        pub = Publish(
            e.topic, orjson.Fragment(e.body), e.timestamp, None, e.from_peer, e.origin, e.seq
        )
        self.delivered += 1
        self.server.deliver(pub, MARKER)

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
            self.server.events.emit("backplane_up")
        else:
            self.server.events.emit("backplane_down", reason)

    def status(self) -> dict[str, Any]:
        """The backplane's state and counters, plus this link's own."""
        out = self.backplane.status()
        out.update(
            forwarded=self.forwarded,
            delivered=self.delivered,
            duplicates=self.duplicates,
            gaps=self.gaps,
            invalid=self.invalid,
            interest=sorted(self.interest),
        )
        return out

    def health_route(self) -> tuple[int, bytes, str]:
        """``GET /health/backplane``: 200 when healthy, else 503; the status as JSON."""
        return (
            200 if self.healthy else 503,
            orjson.dumps(self.status()),
            "application/json",
        )
