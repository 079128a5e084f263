"""The hub: this server's connections and what their requests do.

The hub sits between the connections and everything else. For each complete
message a :class:`~dwsps.connection.Connection` hands it, the hub parses it
(:mod:`dwsps.messages`), acts through the :class:`~dwsps.router.Router`, and
queues the replies on that connection's write path. A publish takes one path,
whatever brought it (a client, the embedding code, a link)::

    parse -> router.admit (identity) -> router.match -> encode once per context
          -> router.batch (fan-out plan) -> Writer -> each connection's write path
          -> links (peers, backplane) when it was accepted here

The hub is the connections' :class:`~dwsps.connection.ConnectionHost` and the
links' :class:`~dwsps.links.LinkHost`; it holds no socket and no listener.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson

from dwsps.auth import UNAUTHENTICATED, Authenticator, Identity
from dwsps.config import ServerConfig
from dwsps.connection import Connection, ConnectionLimits, Writer
from dwsps.errors import (
    AuthError,
    CloseCode,
    ErrorCode,
    HistoryError,
    PermissionDenied,
    ProtocolError,
    SubscriptionLimitError,
)
from dwsps.events import Events
from dwsps.frames import text_frame
from dwsps.history import HistoryStore, Publication, Recovery, history_store
from dwsps.limits import ConnectionLimiter, RateLimit, RequestLimiter, Verdict
from dwsps.links import Link
from dwsps.messages import (
    Auth,
    Clock,
    DeliveryEncoder,
    History,
    Position,
    Publish,
    Subscribe,
    Unsubscribe,
    encode_ack,
    encode_error,
    encode_history,
    encode_kept_delivery,
    parse_request,
    position_fields,
)
from dwsps.permissions import UNRESTRICTED, checker_for
from dwsps.router import Admission, Router

log = logging.getLogger("dwsps.server")


@dataclass(slots=True)
class ServerStats:
    """Counters a server keeps; read them with :attr:`dwsps.Server.stats`."""

    connections_total: int = 0
    requests: int = 0
    publishes: int = 0
    deliveries: int = 0
    errors_sent: int = 0
    slow_consumers: int = 0
    rate_limited: int = 0
    heartbeat_timeouts: int = 0
    invalid_closes: int = 0
    duplicates_dropped: int = 0
    recoveries_ok: int = 0
    """Subscribes with ``recover`` answered ``recovered: true``."""
    recoveries_failed: int = 0
    """Subscribes with ``recover`` answered ``recovered: false`` (or cut off mid-replay)."""
    replayed: int = 0
    """Publications replayed to recovering subscribers."""
    history_requests: int = 0
    framing_errors: int = 0
    """Connections failed for breaking RFC 6455 framing (by picows or the connection)."""
    amplification_closes: int = 0
    """Connections closed for holding more subscriptions matching one publish than allowed."""
    errors_by_code: Counter[str] = field(default_factory=Counter)
    """``errors_sent`` per error code (the ErrorCode's value)."""
    upgrades_refused: Counter[str] = field(default_factory=Counter)
    """WebSocket upgrades refused at admission, per HTTP status (401, 403, 429, 500, 503)."""

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (``errors_by_code`` copied)."""
        return {f.name: copy.copy(getattr(self, f.name)) for f in fields(self)}


class Hub:
    """Connections, requests and the publish path of one server (see the module docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        server_id: str,
        events: Events,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.authenticator = authenticator or Authenticator()
        self.admission = ConnectionLimiter(config.max_connections, config.max_connections_per_ip)
        self._rate = RateLimit(config.rate_limit, config.rate_burst) if config.rate_limit else None
        # An expiry timer costs ~0.6 KB per connection, and most tokens expire
        # long after they are presented: a timer is armed only for an expiry
        # within two heartbeats, and the heartbeat arms the others as they come due.
        interval = config.heartbeat_interval
        self._expiry_horizon = 2.0 * interval if interval > 0 else None
        # fromPeerServer is trusted only from authenticated peers once anything is authenticated.
        self._peers_must_authenticate = bool(
            config.accept_peer_tokens or self.authenticator.enabled
        )
        self._server_id = server_id
        self.events = events
        self.stats = ServerStats()
        self._clock = Clock()
        self.connections: dict[str, Connection] = {}
        # A connection being closed, while its disconnect event runs (see user()).
        self._departing: Connection | None = None
        self.router: Router[Connection] = Router(
            server_id,
            max_subscriptions=config.max_subscriptions,
            max_subscriptions_total=config.max_subscriptions_total,
            on_interest=self._interest_changed,
        )
        self.links: list[Link] = []
        self._limits = ConnectionLimits(
            config.max_frame_size, config.max_outbound_buffer, config.fragment_timeout
        )
        self._max_matches = config.max_deliveries_per_publish or 1 << 62
        self._topic_limits = config.topic_limits
        self._writer: Writer | None = None
        self._counter = 0
        self.history: HistoryStore | None = None
        """The history streams (None without a history pattern: the publish path skips it)."""
        # Replays too big to queue at once, paged as the connection drains.
        self._replays: dict[Connection, dict[str, asyncio.Task[None]]] = {}
        self._page_bytes = max(64 * 1024, config.max_outbound_buffer // 4)

    @property
    def server_id(self) -> str:
        """This server's id."""
        return self._server_id

    @property
    def clock(self) -> Clock:
        """Server time, as the wire wants it."""
        return self._clock

    def attach(self, writer: Writer, links: list[Link]) -> None:
        """Give the hub its write scheduler and its links (the server does this once).

        The history store is made here, after the server checked the
        configuration, and so is new (a new epoch) every time a server starts.
        """
        self._writer = writer
        self.links = links
        config = self.config
        self.history = history_store(config.history, config.history_max_bytes, config.topic_limits)

    def new_connection(
        self, is_peer: bool, identity: Identity = UNAUTHENTICATED, remote: str = ""
    ) -> Connection:
        """A connection object for an admitted upgrade (counted in :attr:`admission`)."""
        assert self._writer is not None, "attach() first"
        self._counter += 1
        client_id = f"{secrets.token_urlsafe(9)}{self._counter:x}"
        limiter = RequestLimiter(self._rate) if self._rate is not None and not is_peer else None
        return Connection(
            self, self._writer, self._limits, client_id, is_peer, identity, remote, limiter
        )

    def user(self, client_id: str) -> str | None:
        """Who the connection ``client_id`` authenticated as (its token's ``sub``), or None.

        Answers in every event handler, ``disconnect`` included.
        """
        conn = self.connections.get(client_id)
        if conn is None:
            departing = self._departing
            if departing is None or departing.client_id != client_id:
                return None
            conn = departing
        return conn.user

    def abandon(self, conn: Connection) -> None:
        """An admitted upgrade that never opened: release what admission counted."""
        self.admission.release(conn.remote)

    # -- ConnectionHost ---------------------------------------------------

    def connection_opened(self, conn: Connection) -> None:
        """Register a connection whose handshake completed."""
        self.connections[conn.client_id] = conn
        self.stats.connections_total += 1
        self._schedule_expiry(conn)
        if self.events.has("connect"):
            self.events.emit("connect", conn.client_id)

    def connection_closed(self, conn: Connection) -> None:
        """Forget a connection and everything it held."""
        if self.connections.pop(conn.client_id, None) is None:
            return
        self.admission.release(conn.remote)
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        self.router.drop(conn)
        replays = self._replays.pop(conn, None)
        if replays:
            for task in replays.values():
                task.cancel()
        if self.events.has("disconnect"):
            self._departing = conn
            try:
                self.events.emit("disconnect", conn.client_id)
            finally:
                self._departing = None

    def text_received(self, conn: Connection, data: bytes) -> None:
        """Parse and carry out one request."""
        self.stats.requests += 1
        try:
            req = parse_request(data, self._topic_limits)
            limiter = conn.limiter
            if limiter is not None and not self._allowed(conn, limiter, req):
                return
            if type(req) is Publish:
                self._on_publish(conn, req)
            elif type(req) is Subscribe:
                self._on_subscribe(conn, req)
            elif type(req) is Unsubscribe:
                self._on_unsubscribe(conn, req)
            elif type(req) is Auth:
                self._on_auth(conn, req)
            elif type(req) is History:
                self._on_history(conn, req)
        except ProtocolError as err:
            if err.code is ErrorCode.INVALID_JSON and not _is_utf8(data):
                conn.fail(CloseCode.INVALID_TEXT, "text frame is not valid UTF-8")
                return
            self._reject(conn, err)
            return
        except Exception:
            log.exception("internal error handling a request from %s", conn.client_id)
            conn.fail(CloseCode.INTERNAL_ERROR, "internal error")
            return
        conn.invalid_streak = 0

    def binary_received(self, conn: Connection) -> None:
        """Binary frames carry no requests: say so, keep the connection."""
        self.stats.requests += 1
        self._reject(
            conn,
            ProtocolError(ErrorCode.INVALID_MESSAGE, "binary frames are not accepted; send text"),
        )

    def slow_consumer(self, conn: Connection) -> None:
        """Count a connection closed for falling behind."""
        self.stats.slow_consumers += 1

    def framing_error(self) -> None:
        """Count a connection failed for a framing error (picows' log reports them too)."""
        self.stats.framing_errors += 1

    @property
    def buffered_bytes(self) -> int:
        """Data the server holds for its connections (what the memory budget bounds)."""
        return self._writer.buffered if self._writer is not None else 0

    @property
    def over_budget(self) -> bool:
        """Whether the server holds more buffered data than its memory budget."""
        return self._writer is not None and self._writer.over_budget

    # -- requests ---------------------------------------------------------

    def _send_error(self, conn: Connection, err: ProtocolError) -> None:
        """Queue an error reply, counted in total and by code."""
        self.stats.errors_sent += 1
        self.stats.errors_by_code[err.code.value] += 1
        conn.send(text_frame(encode_error(err, self._clock.now())))

    def _reject(self, conn: Connection, err: ProtocolError) -> None:
        self._send_error(conn, err)
        conn.invalid_streak += 1
        if conn.invalid_streak >= self.config.max_invalid_requests:
            self.stats.invalid_closes += 1
            conn.fail(CloseCode.POLICY_VIOLATION, "too many invalid requests")

    def _ack(
        self,
        conn: Connection,
        action: str,
        topic: str | None,
        req_id: str | int | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        conn.send(text_frame(encode_ack(action, topic, self._clock.now(), req_id, extra)))

    def _allowed(self, conn: Connection, limiter: RequestLimiter, req: object) -> bool:
        """The rate limit: False (and the refusal sent) when ``req`` is over it."""
        verdict = limiter.check(self._now())
        if verdict is Verdict.ALLOW:
            return True
        action = type(req).__name__.lower()
        err = ProtocolError(
            ErrorCode.RATE_LIMITED,
            f"over {self.config.rate_limit:g} requests/s (burst {self.config.rate_burst})",
            action,
            getattr(req, "id", None),
        )
        self.stats.rate_limited += 1
        self._send_error(conn, err)
        if verdict is Verdict.CLOSE:
            conn.fail(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        return False

    def _now(self) -> float:
        """The event loop's clock (what rate limits and expiry timers count in)."""
        assert self._writer is not None
        return self._writer.loop.time()

    def _on_subscribe(self, conn: Connection, req: Subscribe) -> None:
        history = self.history
        self._cancel_replay(conn, req.topic)
        extra: dict[str, Any] | None = None
        recovery: Recovery | None = None
        if req.recover is not None:
            recovery = self._recover(conn, req, history)
            if recovery.publications and _estimate(recovery.publications) > self._page_bytes:
                self._start_replay(conn, req, recovery)
                return
        elif history is not None:
            # A position even before anything arrives: the client can recover from it.
            found = history.locate(req.topic)
            if found is not None:
                extra = {"stream": found[0], "epoch": found[1], "offset": found[2]}
        self._subscribe(conn, req)
        if recovery is not None:
            # The ack, then the replay, then (later turns) live deliveries: taken in
            # one synchronous step with the subscription, so no gap and no duplicate.
            self._ack(conn, "subscribe", req.topic, req.id, _recovery_fields(recovery))
            self._send_replay(conn, req.topic, recovery.publications)
        else:
            self._ack(conn, "subscribe", req.topic, req.id, extra)
        if self.events.has("subscribe"):
            self.events.emit("subscribe", req.topic, conn.client_id)

    def _subscribe(self, conn: Connection, req: Subscribe) -> None:
        try:
            self.router.subscribe(conn, req.topic, conn.permissions)
        except PermissionDenied as exc:
            raise ProtocolError(ErrorCode.FORBIDDEN, str(exc), "subscribe", req.id) from None
        except SubscriptionLimitError as exc:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS, str(exc), "subscribe", req.id
            ) from None

    def _recover(self, conn: Connection, req: Subscribe, history: HistoryStore | None) -> Recovery:
        """The recovery a ``recover`` asks for (counted); ProtocolError when it cannot be."""
        assert req.recover is not None
        if history is None:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, "no history is kept on this server", "subscribe", req.id
            )
        if not conn.permissions.may_subscribe(req.topic):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"not permitted to subscribe to {req.topic!r}",
                "subscribe",
                req.id,
            )
        epoch, offset = req.recover
        try:
            recovery = history.recover(req.topic, epoch, offset, self._now())
        except HistoryError as exc:
            raise ProtocolError(exc.code, exc.detail, "subscribe", req.id) from None
        if recovery.recovered:
            self.stats.recoveries_ok += 1
        else:
            self.stats.recoveries_failed += 1
        return recovery

    def _send_replay(self, conn: Connection, context: str, pubs: list[Publication]) -> int:
        """Queue replayed deliveries of ``pubs`` on ``conn``, as one write; return the bytes."""
        if not pubs:
            return 0
        data = b"".join(
            [
                text_frame(
                    encode_kept_delivery(
                        pub.topic, context, pub.timestamp, pub.message, pub.from_peer, pub, True
                    )
                )
                for pub in pubs
            ]
        )
        conn.send(data)
        self.stats.replayed += len(pubs)
        return len(data)

    # -- paged replays ----------------------------------------------------

    def _start_replay(self, conn: Connection, req: Subscribe, recovery: Recovery) -> None:
        """A replay bigger than a page: ack now, page it as ``conn`` drains, subscribe last.

        The subscription joins the router only in the step that queues the last
        page, so live deliveries follow the replay with no gap and no duplicate;
        a client too slow for the history's bound is closed with 1013 (it then
        recovers again from what it got).
        """
        self._ack(conn, "subscribe", req.topic, req.id, _recovery_fields(recovery))
        # Held already (a client recovering again)? Live deliveries would overtake
        # the replay: the subscription rejoins after the last page instead.
        self.router.unsubscribe(conn, req.topic)
        task = asyncio.get_running_loop().create_task(self._replay(conn, req, recovery))
        self._replays.setdefault(conn, {})[req.topic] = task

    def _cancel_replay(self, conn: Connection, topic: str) -> None:
        replays = self._replays.get(conn)
        if replays is not None:
            task = replays.pop(topic, None)
            if task is not None:
                task.cancel()

    async def _replay(self, conn: Connection, req: Subscribe, recovery: Recovery) -> None:
        history = self.history
        assert history is not None
        pubs, done, offset = recovery.publications, 0, recovery.offset
        finished = False
        try:
            while True:
                # Checked before every page, so that several replays on one
                # connection take turns instead of queueing a page each at once.
                await self._drained(conn)
                if conn.closing:
                    return
                budget = self._page_bytes
                while done < len(pubs) and budget > 0:
                    budget -= self._send_replay(conn, req.topic, pubs[done : done + 256])
                    done += 256
                if done >= len(pubs):
                    more = history.recover(req.topic, recovery.epoch, offset, self._now())
                    if not more.recovered:
                        conn.fail(CloseCode.TRY_AGAIN_LATER, "recovery fell behind the history")
                        return
                    pubs, done, offset = more.publications, 0, more.offset
                    if _estimate(pubs) <= self._page_bytes:
                        self._send_replay(conn, req.topic, pubs)
                        try:
                            self._subscribe(conn, req)
                        except ProtocolError as err:
                            self._send_error(conn, err)
                            return
                        if self.events.has("subscribe"):
                            self.events.emit("subscribe", req.topic, conn.client_id)
                        finished = True
                        return
        except Exception:
            log.exception("internal error replaying history to %s", conn.client_id)
            conn.fail(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if not finished:
                # Cut off: behind the history, a slow consumer, a drop, or an error.
                self.stats.recoveries_failed += 1
            replays = self._replays.get(conn)
            if replays is not None and replays.get(req.topic) is asyncio.current_task():
                del replays[req.topic]
                if not replays:
                    del self._replays[conn]

    async def _drained(self, conn: Connection) -> None:
        """Return once ``conn`` has at most a page queued (or is closing)."""
        await asyncio.sleep(0)  # what was queued goes out at the end of this turn
        # Polled rather than signalled: the connection's write path stays as it is
        # (no per-write hook), and only a replaying connection pays for the check.
        while conn.queued_bytes > self._page_bytes and not conn.closing:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL)

    def _on_history(self, conn: Connection, req: History) -> None:
        history = self.history
        self.stats.history_requests += 1
        if history is None:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, "no history is kept on this server", "history", req.id
            )
        if not conn.permissions.may_subscribe(req.topic):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"not permitted to read {req.topic!r}", "history", req.id
            )
        try:
            page = history.history(req.topic, req.limit, now=self._now(), since=req.since)
        except HistoryError as exc:
            raise ProtocolError(exc.code, exc.detail, "history", req.id) from None
        # The reply is one frame: keep it to half the outbound bound, newest first.
        budget = self.config.max_outbound_buffer // 2 - 512  # the reply's own fields
        encoded: list[bytes] = []
        for pub in reversed(page.publications):
            item = encode_kept_delivery(
                pub.topic,
                req.topic,
                pub.timestamp,
                pub.message,
                pub.from_peer,
                pub,
                False,
            )
            budget -= len(item) + 1
            if budget < 0:
                break
            encoded.append(item)
        encoded.reverse()
        truncated = len(encoded) < len(page.publications)
        conn.send(text_frame(encode_history(req.topic, page, encoded, req.id, truncated)))

    def _on_unsubscribe(self, conn: Connection, req: Unsubscribe) -> None:
        self._cancel_replay(conn, req.topic)
        self.router.unsubscribe(conn, req.topic)
        self._ack(conn, "unsubscribe", req.topic, req.id)
        if self.events.has("unsubscribe"):
            self.events.emit("unsubscribe", req.topic, conn.client_id)

    def _on_publish(self, conn: Connection, req: Publish) -> None:
        if req.from_peer and self._peers_must_authenticate and not conn.is_peer:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                "fromPeerServer is accepted only from authenticated peers",
                "publish",
                req.id,
            )
        if req.origin is not None and not (req.from_peer or conn.is_peer):
            # Identity is for copies between servers: from an ordinary client a
            # forged one (a peer's id, a huge seq) would make us drop that
            # peer's real publishes as duplicates. It gets our own instead.
            req.origin = req.seq = None
        writer = self._writer
        assert writer is not None
        if writer.buffered > writer.budget:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                "the server is over its memory budget; try again later",
                "publish",
                req.id,
            )
        permissions = conn.permissions
        if permissions is not UNRESTRICTED:  # the usual case pays one comparison
            try:
                self.router.authorize_publish(permissions, req.topic)
            except PermissionDenied as exc:
                raise ProtocolError(ErrorCode.FORBIDDEN, str(exc), "publish", req.id) from None
        self.route(req, conn.client_id)
        position = req.position
        extra = None if position is None else position_fields(position)
        self._ack(conn, "publish", req.topic, req.id, extra)

    def _on_auth(self, conn: Connection, req: Auth) -> None:
        try:
            identity = self.authenticator.refresh(req.token)
        except AuthError as exc:
            err = ProtocolError(ErrorCode.UNAUTHORIZED, exc.reason, "auth", req.id)
            self._send_error(conn, err)
            conn.fail(CloseCode.POLICY_VIOLATION, "unauthorized")
            return
        conn.identity = identity
        conn.permissions = checker_for(identity.permissions)
        # New permissions apply to what is held, not only to what comes next.
        revoked = self.router.revoke(conn, conn.permissions)
        if revoked and self.events.has("unsubscribe"):
            for topic in revoked:
                self.events.emit("unsubscribe", topic, conn.client_id)
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        self._schedule_expiry(conn)
        self._ack(conn, "auth", None, req.id)

    def _schedule_expiry(self, conn: Connection) -> None:
        """Arm the connection's expiry timer if its identity expires within the horizon."""
        expires_at = conn.identity.expires_at
        if expires_at is None or self._writer is None:
            return
        delay = max(0.0, expires_at - time.time())
        horizon = self._expiry_horizon
        if horizon is not None and delay > horizon:
            return  # a later heartbeat arms it
        conn.expiry = self._writer.loop.call_later(delay, _expire, conn)

    # -- the publish path -------------------------------------------------

    def route(self, pub: Publish, client_id: str | None) -> int:
        """Accept a publish here: deliver locally, then hand it to every link.

        Returns the local deliveries (0 for a copy seen before, which is dropped).
        """
        if pub.timestamp is None:
            pub.timestamp = self._clock.now()
        if self.router.admit(pub) is not Admission.NEW:
            self.stats.duplicates_dropped += 1
            return 0
        count = self.deliver(pub)
        for link in self.links:
            link.forward(pub)
        self.stats.publishes += 1
        if self.events.has("publish"):
            self.events.emit("publish", pub.topic, client_id)
        return count

    def receive(self, pub: Publish, extra: dict[str, Any] | None) -> Admission:
        """A publish that arrived through a link: local delivery only (LinkHost)."""
        admission = self.router.admit(pub)
        if admission is Admission.NEW:
            self.deliver(pub, extra)
        elif admission is Admission.DUPLICATE:
            self.stats.duplicates_dropped += 1
        return admission

    def deliver(self, pub: Publish, extra: dict[str, Any] | None = None) -> int:
        """Plan one delivery per matching subscription on this server; return how many.

        ``extra`` adds fields to the delivery (e.g. how it arrived).
        """
        history = self.history
        position = pub.position
        if history is not None and position is None:
            # Decided per publish (the stream of a topic is cached): a topic
            # without history pays nothing per delivery, one with history gets
            # its fields encoded once, in the shared tail of every delivery.
            position = self._keep(history, pub)
        router = self.router
        matches = router.match(pub.topic)
        if not matches:
            return 0
        if len(matches) > self._max_matches:
            # Only then can one connection hold more matching subscriptions than allowed.
            matches = self._limit_amplification(pub.topic, matches)
        writer = self._writer
        assert writer is not None
        encoder = DeliveryEncoder(
            pub.topic,
            pub.message,
            pub.timestamp or self._clock.now(),
            pub.from_peer,
            extra,
            position,
        )
        count = 0
        for context, subscribers in matches:
            count += len(subscribers)
            frame = text_frame(encoder.encode(context))
            closed = router.batch(subscribers, frame)
            if closed is not None:
                writer.queue_batch(closed)
            # The turn's bytes, once per frame: a bound on what waits for the flush.
            turn = writer.turn + len(frame)
            writer.turn = turn
            if turn > writer.flush_at:
                writer.flush_now()
        self.stats.deliveries += count
        writer.schedule()
        return count

    def _keep(self, history: HistoryStore, pub: Publish) -> Position | None:
        """Append ``pub`` to its stream, if it has one; its message is then encoded once."""
        found = history.patterns.stream_of(pub.topic)
        if found is None:
            return None
        if pub.timestamp is None:
            pub.timestamp = self._clock.now()
        body = orjson.dumps(pub.message)
        assert self._writer is not None
        kept = history.append(
            found, pub.topic, pub.timestamp, body, pub.from_peer, self._writer.loop.time()
        )
        # Deliveries and links splice the encoded message in as it is.
        pub.message = orjson.Fragment(body)
        pub.position = kept
        return kept

    def _limit_amplification(
        self, topic: str, matches: list[tuple[str, dict[Connection, None]]]
    ) -> list[tuple[str, dict[Connection, None]]]:
        """Close the connections that would get more than ``max_deliveries_per_publish``."""
        counts: Counter[Connection] = Counter()
        for _, subscribers in matches:
            counts.update(subscribers.keys())
        limit = self._max_matches
        over = [conn for conn, n in counts.items() if n > limit]
        if not over:
            return matches
        for conn in over:
            self.stats.amplification_closes += 1
            log.warning(
                "closing %s: %d subscriptions match %r", conn.client_id, counts[conn], topic
            )
            conn.fail(
                CloseCode.POLICY_VIOLATION,
                f"{counts[conn]} subscriptions match one publish (at most {limit})",
            )
            self.router.drop(conn)
        return self.router.match(topic)

    def emit(self, event: str, *args: Any) -> None:
        """Fire a server event (LinkHost)."""
        self.events.emit(event, *args)

    def _interest_changed(self, key: str, wanted: bool) -> None:
        for link in self.links:
            link.interest_changed(key, wanted)

    # -- heartbeat and status ---------------------------------------------

    def heartbeat(self) -> None:
        """Ping every connection; drop those that did not answer the previous ping.

        Also arms the expiry timers of identities that expire within the horizon.
        """
        if self.history is not None:
            self.history.expire(self._now())
        for conn in list(self.connections.values()):
            if not conn.ping():
                self.stats.heartbeat_timeouts += 1
                log.info("dropping %s: no pong to the last ping", conn.client_id)
                conn.abort()
            elif conn.expiry is None and conn.identity.expires_at is not None:
                self._schedule_expiry(conn)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, document)`` for ``GET /health``."""
        body: dict[str, Any] = {
            "status": "ok",
            "server_id": self._server_id,
            "connections": len(self.connections),
            "subscriptions": len(self.router),
            "buffered_bytes": self.buffered_bytes,
            "stats": self.stats.as_dict(),
            "peers": [],
        }
        if self.history is not None:
            body["history"] = asdict(self.history.stats())
        healthy = True
        for link in self.links:
            body[link.status_key] = link.status()
            if not link.healthy:
                healthy = False
        if not healthy:
            body["status"] = "degraded"
        return healthy, body


_DRAIN_POLL = 0.002
"""Seconds between checks of a connection's queue while a paged replay waits on it."""


def _estimate(pubs: list[Publication]) -> int:
    """Roughly the bytes the replayed deliveries of ``pubs`` take (frame, fields, context)."""
    return sum(len(p.message) + 2 * len(p.topic) for p in pubs) + 200 * len(pubs)


def _recovery_fields(recovery: Recovery) -> dict[str, Any]:
    return {
        "recovered": recovery.recovered,
        "stream": recovery.stream,
        "epoch": recovery.epoch,
        "offset": recovery.offset,
    }


def _expire(conn: Connection) -> None:
    # conn.expiry stays set (to the spent handle): the heartbeat does not arm it again.
    conn.fail(CloseCode.POLICY_VIOLATION, "token expired")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
