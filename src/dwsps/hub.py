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

With *shared history* (a backplane link that keeps streams in its engine,
:class:`~dwsps.links.KeptHistory`), a publish to a history topic is not
delivered here at once: it goes to the engine, which assigns its offset, and
every server (this one too) delivers it when it comes back through the link.
Its ack waits for that offset; ``recover``, a plain subscribe inside one
stream and ``history`` read the engine. Such replies are *deferred*: a
connection with one outstanding queues its later replies behind it
(``Connection.replies``, bounded by :data:`MAX_DEFERRED`), so replies keep
request order; without one, a reply costs one attribute check more.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson

from dwsps.auth import UNAUTHENTICATED, Authenticator, Identity
from dwsps.config import ServerConfig
from dwsps.connection import Connection, ConnectionLimits
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
from dwsps.history import (
    HistoryPage,
    HistoryPattern,
    HistoryStore,
    Publication,
    Recovery,
    history_store,
)
from dwsps.limits import ConnectionLimiter, RateLimit, RequestLimiter, Verdict
from dwsps.links import KeptHistory, Link
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
from dwsps.topics import matches as topic_matches
from dwsps.writer import Writer

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
    recoveries_attempted: int = 0
    """Subscribes with ``recover`` answered (an ack, or ``overloaded`` when the
    shared history was unavailable). Each one ends as exactly one of ok, failed
    or cut off; the difference is the replays in progress."""
    recoveries_ok: int = 0
    """Recoveries answered ``recovered: true`` whose whole replay was queued."""
    recoveries_failed: int = 0
    """Recoveries answered ``recovered: false`` (or ``overloaded``): messages were lost."""
    recoveries_cut_off: int = 0
    """Recoveries answered ``recovered: true`` whose replay did not finish (the client
    fell behind the history, was closed, or replaced the subscription)."""
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
        self.dozing = 0
        """Connections whose picows was let go, as of the last idle sweep."""
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
        self._writer: Writer[Connection] | None = None
        self._now: Callable[[], float] = time.monotonic
        """The event loop's clock once attached (what rate limits and expiry timers count in)."""
        self._counter = 0
        self.history: HistoryStore | None = None
        """The history streams (None without a history pattern: the publish path skips it)."""
        # Replays too big to queue at once, paged as the connection drains.
        self._replays: dict[Connection, dict[str, asyncio.Task[None]]] = {}
        self._page_bytes = max(64 * 1024, config.max_outbound_buffer // 4)
        # Shared history (set in attach when a link keeps streams in its engine).
        self._shared: KeptHistory | None = None
        self._shared_link: Link | None = None
        # stream -> subscriptions whose live deliveries wait for their engine read.
        self._holds: dict[str, list[_Hold]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def server_id(self) -> str:
        """This server's id."""
        return self._server_id

    @property
    def clock(self) -> Clock:
        """Server time, as the wire wants it."""
        return self._clock

    def attach(self, writer: Writer[Connection], links: list[Link]) -> None:
        """Give the hub its write scheduler and its links (the server does this once).

        The history store is made here, after the server checked the
        configuration, and so is new (a new epoch) every time a server starts.
        """
        self._writer = writer
        self._now = writer.loop.time
        self.links = links
        config = self.config
        self.history = history_store(config.history, config.history_max_bytes, config.topic_limits)
        if self.history is not None:
            for link in links:
                shared = link.kept_history(self.history.patterns)
                if shared is not None:
                    self._shared, self._shared_link = shared, link
                    break

    @property
    def shared_history(self) -> bool:
        """Whether history streams live in the backplane's engine (not in this server)."""
        return self._shared is not None

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
        if self._holds:
            self._drop_holds(conn, None)
        conn.replies = None
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

    def _error_frame(self, err: ProtocolError) -> bytes:
        """An error reply's frame, counted in total and by code."""
        self.stats.errors_sent += 1
        self.stats.errors_by_code[err.code.value] += 1
        return text_frame(encode_error(err, self._clock.now()))

    def _send_error(self, conn: Connection, err: ProtocolError) -> None:
        """Queue an error reply, counted in total and by code."""
        self._reply(conn, self._error_frame(err))

    def _reply(self, conn: Connection, frame: bytes) -> None:
        """Send a reply, or queue it behind a deferred one (request order)."""
        replies = conn.replies
        if replies is None:
            conn.send(frame)
        else:
            replies.append(frame)

    def _defer(self, conn: Connection) -> _Deferred | None:
        """A place in ``conn``'s reply order for a reply that comes later (None: refused).

        Bounded per connection: past :data:`MAX_DEFERRED` waiting replies the
        server stops reading the connection's requests until they drain
        (backpressure, as TCP would give); a connection that still gets to
        four times that (what was read already) is closed with 1013.
        """
        slot = _Deferred()
        replies = conn.replies
        if replies is None:
            conn.replies = deque((slot,))
            return slot
        n = len(replies)
        if n >= 4 * MAX_DEFERRED:
            conn.fail(CloseCode.TRY_AGAIN_LATER, "too many requests waiting for the backplane")
            return None
        if n == MAX_DEFERRED and conn.stream is not None:
            conn.stream.throttle(True)
        replies.append(slot)
        return slot

    def _settle(self, conn: Connection, slot: _Deferred, frame: bytes) -> None:
        """Fill a deferred reply; send it and whatever waited behind it, in order."""
        if slot.frame is not None:
            return
        slot.frame = frame
        replies = conn.replies
        if replies is None:
            return  # the connection is gone
        while replies:
            head = replies[0]
            if type(head) is _Deferred:
                if head.frame is None:
                    break
                conn.send(head.frame)
            else:
                conn.send(head)
            replies.popleft()
        stream = conn.stream
        if stream is not None and stream.throttled and len(replies) <= MAX_DEFERRED // 2:
            stream.throttle(False)
        if not replies:
            conn.replies = None

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
        frame = text_frame(encode_ack(action, topic, self._clock.now(), req_id, extra))
        if conn.replies is None:  # the usual case: nothing deferred
            conn.send(frame)
        else:
            conn.replies.append(frame)

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

    def _on_subscribe(self, conn: Connection, req: Subscribe) -> None:
        history = self.history
        self._cancel_replay(conn, req.topic)
        if self._shared is not None:
            assert history is not None
            if self._holds:
                self._drop_holds(conn, req.topic)
            name = history.patterns.stream_of_subscription(req.topic)
            if name is not None:
                self._subscribe_shared(conn, req, name)
                return
            if req.recover is not None:
                self._recover(conn, req, history)  # raises: not inside one stream
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
            self.stats.recoveries_attempted += 1
            self._ack(conn, "subscribe", req.topic, req.id, _recovery_fields(recovery))
            self._send_replay(conn, req.topic, recovery.publications)
        else:
            self._ack(conn, "subscribe", req.topic, req.id, extra)
        if self.events.has("subscribe"):
            self.events.emit("subscribe", req.topic, conn.client_id)
        if recovery is not None:
            outcome = _OK if recovery.recovered else _FAILED
            self._recovery_ended(conn, req.topic, outcome, len(recovery.publications))

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
            return history.recover(req.topic, epoch, offset, self._now())
        except HistoryError as exc:
            raise ProtocolError(exc.code, exc.detail, "subscribe", req.id) from None

    def _recovery_ended(self, conn: Connection, topic: str, outcome: str, replayed: int) -> None:
        """Count how a recovery ended (one of ok, failed, cut off) and emit ``recovery``.

        ``replayed``: the deliveries it replayed. The event's ``recovered`` is
        True only for a whole replay: a cut-off client missed the rest.
        """
        stats = self.stats
        if outcome == _OK:
            stats.recoveries_ok += 1
        elif outcome == _FAILED:
            stats.recoveries_failed += 1
        else:
            stats.recoveries_cut_off += 1
        if self.events.has("recovery"):
            self.events.emit("recovery", topic, conn.client_id, conn.user, outcome == _OK, replayed)

    def _send_replay(
        self, conn: Connection, context: str, pubs: list[Publication], recovered: bool = True
    ) -> int:
        """Queue replayed deliveries of ``pubs`` on ``conn``, as one write; return the bytes.

        ``recovered=False``: live deliveries that were held (shared history's seam).
        """
        if not pubs:
            return 0
        data = b"".join(
            [
                text_frame(
                    encode_kept_delivery(
                        pub.topic,
                        context,
                        pub.timestamp,
                        pub.message,
                        pub.from_peer,
                        pub,
                        recovered,
                    )
                )
                for pub in pubs
            ]
        )
        conn.send(data)
        if recovered:
            self.stats.replayed += len(pubs)
        else:
            self.stats.deliveries += len(pubs)
        return len(data)

    # -- paged replays ----------------------------------------------------

    def _start_replay(self, conn: Connection, req: Subscribe, recovery: Recovery) -> None:
        """A replay bigger than a page: ack now, page it as ``conn`` drains, subscribe last.

        The subscription joins the router only in the step that queues the last
        page, so live deliveries follow the replay with no gap and no duplicate;
        a client too slow for the history's bound is closed with 1013 (it then
        recovers again from what it got).
        """
        self.stats.recoveries_attempted += 1
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
        replayed = 0
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
                    replayed += len(pubs[done : done + 256])
                    done += 256
                if done >= len(pubs):
                    more = history.recover(req.topic, recovery.epoch, offset, self._now())
                    if not more.recovered:
                        conn.fail(CloseCode.TRY_AGAIN_LATER, "recovery fell behind the history")
                        return
                    pubs, done, offset = more.publications, 0, more.offset
                    if _estimate(pubs) <= self._page_bytes:
                        self._send_replay(conn, req.topic, pubs)
                        replayed += len(pubs)
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
            # Not finished: cut off (behind the history, a drop, replaced, or an error).
            self._recovery_ended(conn, req.topic, _OK if finished else _CUT_OFF, replayed)
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
        if self._shared is not None:
            self._history_shared(conn, req, history)
            return
        try:
            page = history.history(req.topic, req.limit, now=self._now(), since=req.since)
        except HistoryError as exc:
            raise ProtocolError(exc.code, exc.detail, "history", req.id) from None
        self._reply(conn, self._history_frame(req, page))

    def _history_frame(self, req: History, page: HistoryPage) -> bytes:
        """The ``history`` reply for ``page``: one frame of at most half the outbound bound."""
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
        return text_frame(encode_history(req.topic, page, encoded, req.id, truncated))

    def _on_unsubscribe(self, conn: Connection, req: Unsubscribe) -> None:
        self._cancel_replay(conn, req.topic)
        if self._holds:
            self._drop_holds(conn, req.topic)
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
        if self._shared is not None:
            assert self.history is not None
            found = self.history.patterns.stream_of(req.topic)
            if found is not None:
                self._publish_shared(conn, req, found)
                return
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
        if self._shared is not None and self._route_shared(pub, client_id):
            return 0
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

    def receive_kept(self, pub: Publish, extra: dict[str, Any] | None) -> None:
        """A publication of a shared stream, in offset order (LinkHost)."""
        self.deliver(pub, extra)

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
        if self._holds and position is not None:
            waiting = self._holds.get(position.stream)
            if waiting:
                matches = self._divert(position, matches, waiting)
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
            log.debug("closing %s: %d subscriptions match %r", conn.client_id, counts[conn], topic)
            conn.fail(
                CloseCode.POLICY_VIOLATION,
                f"{counts[conn]} subscriptions match one publish (at most {limit})",
            )
            self.router.drop(conn)
        return self.router.match(topic)

    # -- shared history ---------------------------------------------------

    def _append_shared(
        self, pub: Publish, found: tuple[str, HistoryPattern]
    ) -> asyncio.Future[tuple[str, int]]:
        """Hand an admitted publish to the engine; the other links get it as usual."""
        shared = self._shared
        assert shared is not None
        body = orjson.dumps(pub.message)
        future = shared.append(pub, found[0], found[1], body)
        pub.message = orjson.Fragment(body)
        for link in self.links:
            if link is not self._shared_link:
                link.forward(pub)
        self.stats.publishes += 1
        return future

    def _route_shared(self, pub: Publish, client_id: str | None) -> bool:
        """:meth:`route` for a topic with shared history (True: taken); no ack to wait for."""
        assert self.history is not None
        found = self.history.patterns.stream_of(pub.topic)
        if found is None:
            return False
        future = self._keep_shared(pub, found, client_id)
        if future is not None:
            future.add_done_callback(_log_append_failure)
        return True

    def _keep_shared(
        self, pub: Publish, found: tuple[str, HistoryPattern], client_id: str | None
    ) -> asyncio.Future[tuple[str, int]] | None:
        """Admit ``pub`` and hand it to the engine's stream; None for a copy seen before."""
        if self.router.admit(pub) is not Admission.NEW:
            self.stats.duplicates_dropped += 1
            return None
        future = self._append_shared(pub, found)
        if self.events.has("publish"):
            self.events.emit("publish", pub.topic, client_id)
        return future

    def route_kept(self, pub: Publish, client_id: str | None) -> Awaitable[dict[str, Any]] | None:
        """:meth:`route` for a publish whose answer waits for the engine, as a client's ack does.

        For a topic whose history lives in the backplane's engine: hands ``pub``
        there and returns what to await, the ack's ``stream``/``offset``/``epoch``
        (``{}`` for a copy seen before); it raises :class:`ProtocolError`
        ``overloaded`` when the engine refuses the append or does not confirm it
        within ``history_publish_timeout``. None for any other topic: call :meth:`route`.
        """
        if self._shared is None:
            return None
        assert self.history is not None
        found = self.history.patterns.stream_of(pub.topic)
        if found is None:
            return None
        if pub.timestamp is None:
            pub.timestamp = self._clock.now()
        future = self._keep_shared(pub, found, client_id)
        if future is None:
            return _nothing()
        return self._appended(found[0], future)

    async def _appended(
        self, stream: str, future: asyncio.Future[tuple[str, int]]
    ) -> dict[str, Any]:
        done, _ = await asyncio.wait((future,), timeout=self.config.history_publish_timeout)
        if not done:
            future.cancel()  # withdrawn if it was not written yet
            raise ProtocolError(ErrorCode.OVERLOADED, self._append_timeout_detail(), "publish")
        failure = _append_failure(future)
        if failure is not None:
            raise ProtocolError(ErrorCode.OVERLOADED, failure, "publish")
        epoch, offset = future.result()
        return {"stream": stream, "offset": offset, "epoch": epoch}

    def _publish_shared(
        self, conn: Connection, req: Publish, found: tuple[str, HistoryPattern]
    ) -> None:
        """A client's publish to a shared stream: the ack waits for the engine's offset."""
        if req.timestamp is None:
            req.timestamp = self._clock.now()
        if self.router.admit(req) is not Admission.NEW:
            self.stats.duplicates_dropped += 1
            self._ack(conn, "publish", req.topic, req.id)
            return
        slot = self._defer(conn)
        if slot is None:
            return
        future = self._append_shared(req, found)
        assert self._writer is not None
        timer = self._writer.loop.call_later(
            self.config.history_publish_timeout, self._append_timed_out, conn, slot, req, future
        )
        future.add_done_callback(lambda f: self._append_settled(conn, slot, req, f, timer))
        if self.events.has("publish"):
            self.events.emit("publish", req.topic, conn.client_id)

    def _append_settled(
        self,
        conn: Connection,
        slot: _Deferred,
        req: Publish,
        future: asyncio.Future[tuple[str, int]],
        timer: asyncio.TimerHandle,
    ) -> None:
        timer.cancel()
        if slot.frame is not None:
            return  # timed out already
        failure = _append_failure(future)
        if failure is not None:
            self._append_failed(conn, slot, req, failure)
            return
        epoch, offset = future.result()
        assert self.history is not None
        found = self.history.patterns.stream_of(req.topic)
        extra = {"stream": found[0] if found else "", "offset": offset, "epoch": epoch}
        frame = text_frame(encode_ack("publish", req.topic, self._clock.now(), req.id, extra))
        self._settle(conn, slot, frame)

    def _append_timed_out(
        self,
        conn: Connection,
        slot: _Deferred,
        req: Publish,
        future: asyncio.Future[tuple[str, int]],
    ) -> None:
        future.cancel()  # withdrawn if it was not written yet
        self._append_failed(conn, slot, req, self._append_timeout_detail())

    def _append_timeout_detail(self) -> str:
        return (
            f"the backplane did not confirm the history append within "
            f"{self.config.history_publish_timeout:g}s (unreachable?); it was probably not kept"
        )

    def _append_failed(self, conn: Connection, slot: _Deferred, req: Publish, detail: str) -> None:
        err = ProtocolError(ErrorCode.OVERLOADED, detail, "publish", req.id)
        self._settle(conn, slot, self._error_frame(err))

    def _subscribe_shared(self, conn: Connection, req: Subscribe, stream: str) -> None:
        """Subscribe inside one shared stream: join now, hold live deliveries, read, release.

        The subscription joins the router at once (so the channel is wanted
        upstream), but its deliveries of ``stream`` are held (:meth:`_divert`)
        until the engine read is answered: then the ack, the replay, the held
        deliveries beyond it, and from then on live ones beyond it. The link
        delivers a stream in offset order, so this has no gap and no duplicate.
        """
        if req.recover is not None and not conn.permissions.may_subscribe(req.topic):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"not permitted to subscribe to {req.topic!r}",
                "subscribe",
                req.id,
            )
        self._subscribe(conn, req)
        slot = self._defer(conn)
        if slot is None:
            return
        hold = _Hold(conn, req.topic, stream)
        self._holds.setdefault(stream, []).append(hold)
        task = asyncio.get_running_loop().create_task(self._recover_shared(conn, req, hold, slot))
        self._replays.setdefault(conn, {})[req.topic] = task
        if self.events.has("subscribe"):
            self.events.emit("subscribe", req.topic, conn.client_id)

    async def _recover_shared(
        self, conn: Connection, req: Subscribe, hold: _Hold, slot: _Deferred
    ) -> None:
        shared = self._shared
        assert shared is not None
        stream, topic = hold.stream, req.topic
        done = False
        outcome: str | None = None  # once a recover is answered
        replayed = 0
        try:
            if req.recover is None:
                epoch, head, _ = await shared.read(stream, 0, 0)
                fields = {"stream": stream, "epoch": epoch, "offset": head}
                self._settle(conn, slot, self._ack_frame(req, fields))
                self._release(hold, epoch, head)
                done = True
                return
            wanted, after = req.recover
            epoch, head, pubs = await shared.read(stream, max(0, after), REPLAY_PAGE)
            full = len(pubs) >= REPLAY_PAGE
            ok = (
                epoch == wanted
                and 0 <= after <= head
                and (after == head or (bool(pubs) and pubs[0].offset == after + 1))
            )
            count = await self._count_replay(topic, after, epoch, head, pubs) if ok else None
            ok = count is not None
            fields = {"recovered": ok, "stream": stream, "epoch": epoch, "offset": head}
            if count is not None:
                fields["replay"] = count
            self.stats.recoveries_attempted += 1
            outcome = _CUT_OFF if ok else _FAILED
            self._settle(conn, slot, self._ack_frame(req, fields))
            last = after if ok else head
            while ok:
                if pubs:
                    last = pubs[-1].offset
                    if topic != stream:
                        pubs = [p for p in pubs if topic_matches(topic, p.topic)]
                    self._send_replay(conn, topic, pubs)
                    replayed += len(pubs)
                if not full:
                    break
                await self._drained(conn)
                if conn.closing:
                    return
                again, _, pubs = await shared.read(stream, last, REPLAY_PAGE)
                full = len(pubs) >= REPLAY_PAGE
                if again != epoch or (full and pubs[0].offset != last + 1):
                    conn.fail(CloseCode.TRY_AGAIN_LATER, "recovery fell behind the history")
                    return
                if pubs and pubs[0].offset != last + 1:
                    conn.fail(CloseCode.TRY_AGAIN_LATER, "recovery fell behind the history")
                    return
            self._release(hold, epoch, last)
            if ok:
                outcome = _OK
            done = True
        except ConnectionError as exc:
            err = ProtocolError(
                ErrorCode.OVERLOADED, f"history unavailable: {exc}", "subscribe", req.id
            )
            if slot.frame is None:
                self.router.unsubscribe(conn, topic)
                self._settle(conn, slot, self._error_frame(err))
            else:
                conn.fail(CloseCode.TRY_AGAIN_LATER, "history unavailable")
        except Exception:
            log.exception("internal error recovering history for %s", conn.client_id)
            conn.fail(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if not done:
                self._unhold(hold)
                if slot.frame is None:
                    # Cancelled (the subscription was replaced): keep the reply order.
                    cut: dict[str, Any] | None = (
                        {"recovered": False} if req.recover is not None else None
                    )
                    self._settle(conn, slot, self._ack_frame(req, cut))
            if req.recover is not None:
                if outcome is None:  # answered overloaded, or recovered: false when replaced
                    self.stats.recoveries_attempted += 1
                    outcome = _FAILED
                self._recovery_ended(conn, topic, outcome, replayed)
            replays = self._replays.get(conn)
            if replays is not None and replays.get(topic) is asyncio.current_task():
                del replays[topic]
                if not replays:
                    del self._replays[conn]

    async def _count_replay(
        self, topic: str, after: int, epoch: str, head: int, pubs: list[Publication]
    ) -> int | None:
        """The ack's ``replay``: deliveries the replay holds up to ``head``; None if trimmed.

        A client moves its position to the ack's offset once it has them all (so
        a narrow subscription keeps up with its stream); counting a subtopic's
        share beyond the first page reads the rest once more.
        """
        shared = self._shared
        assert shared is not None
        if not pubs:
            return 0
        stream = pubs[0].stream
        if topic == stream:
            return head - after
        count = sum(1 for p in pubs if p.offset <= head and topic_matches(topic, p.topic))
        last, full = pubs[-1].offset, len(pubs) >= REPLAY_PAGE
        while full and last < head:  # the pages the replay reads, as it reads them
            again, _, more = await shared.read(stream, last, REPLAY_PAGE)
            if again != epoch or (more and more[0].offset != last + 1):
                return None  # trimmed meanwhile: recovering from ``after`` fails now
            if not more:
                break
            count += sum(1 for p in more if p.offset <= head and topic_matches(topic, p.topic))
            last, full = more[-1].offset, len(more) >= REPLAY_PAGE
        return count

    def _ack_frame(self, req: Subscribe, fields: dict[str, Any] | None) -> bytes:
        return text_frame(encode_ack("subscribe", req.topic, self._clock.now(), req.id, fields))

    def _release(self, hold: _Hold, epoch: str, last: int) -> None:
        """The seam: send what was held beyond ``last``, then pass live ones beyond it."""
        held, hold.held = hold.held or [], None
        later = [p for p in held if p.epoch != epoch or p.offset > last]
        if later:
            self._send_replay(hold.conn, hold.topic, later, recovered=False)
            self._unhold(hold)  # everything from now on is later still
        else:
            hold.floor = (epoch, last)

    def _unhold(self, hold: _Hold) -> None:
        waiting = self._holds.get(hold.stream)
        if waiting is not None and hold in waiting:
            waiting.remove(hold)
            if not waiting:
                del self._holds[hold.stream]

    def _drop_holds(self, conn: Connection, topic: str | None) -> None:
        for hold in [
            h
            for waiting in self._holds.values()
            for h in waiting
            if h.conn is conn and (topic is None or h.topic == topic)
        ]:
            self._unhold(hold)

    def _divert(
        self,
        position: Any,
        matches: list[tuple[str, dict[Connection, None]]],
        waiting: list[_Hold],
    ) -> list[tuple[str, dict[Connection, None]]]:
        """Keep the held subscriptions' connections out of a delivery of their stream."""
        skip: dict[str, set[Connection]] = {}
        contexts = {context: subs for context, subs in matches}
        for hold in list(waiting):
            subs = contexts.get(hold.topic)
            if subs is None or hold.conn not in subs:
                continue
            if hold.held is not None:
                hold.held.append(position)
                if len(hold.held) > MAX_HELD:
                    hold.conn.fail(
                        CloseCode.TRY_AGAIN_LATER, "too many live publications while recovering"
                    )
                    self._unhold(hold)
            elif hold.floor is not None and (
                position.epoch == hold.floor[0] and position.offset <= hold.floor[1]
            ):
                pass  # covered by the recovery: a duplicate at the seam
            else:
                self._unhold(hold)
                continue
            skip.setdefault(hold.topic, set()).add(hold.conn)
        if not skip:
            return matches
        out: list[tuple[str, dict[Connection, None]]] = []
        for context, subs in matches:
            drop = skip.get(context)
            if drop:
                subs = {c: None for c in subs if c not in drop}
                if not subs:
                    continue
            out.append((context, subs))
        return out

    def _history_shared(self, conn: Connection, req: History, history: HistoryStore) -> None:
        try:
            stream = history.stream_of_request(req.topic)
        except HistoryError as exc:
            raise ProtocolError(exc.code, exc.detail, "history", req.id) from None
        slot = self._defer(conn)
        if slot is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._read_history(conn, req, history, stream, slot)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_history(
        self, conn: Connection, req: History, history: HistoryStore, stream: str, slot: _Deferred
    ) -> None:
        shared = self._shared
        assert shared is not None
        limit = req.limit
        found = history.patterns.stream_of(stream)
        size = found[1].size if found is not None else limit
        # A subtopic's publications are spread among the stream's: read what it keeps.
        count = limit if req.topic == stream else min(max(limit, size), MAX_HISTORY_SCAN)
        try:
            since = req.since
            epoch, head, pubs = await shared.read(
                stream, since[1] if since else 0, count if limit > 0 else 0, newest=True
            )
            ignored = since is not None and since[0] != epoch
            if ignored:
                epoch, head, pubs = await shared.read(
                    stream, 0, count if limit > 0 else 0, newest=True
                )
            if req.topic != stream:
                pubs = [p for p in pubs if topic_matches(req.topic, p.topic)]
            pubs = pubs[-limit:] if limit > 0 else []
            frame = self._history_frame(req, HistoryPage(stream, epoch, head, pubs, ignored))
        except ConnectionError as exc:
            err = ProtocolError(
                ErrorCode.OVERLOADED, f"history unavailable: {exc}", "history", req.id
            )
            frame = self._error_frame(err)
        except Exception:
            log.exception("internal error reading history for %s", conn.client_id)
            err = ProtocolError(ErrorCode.OVERLOADED, "history unavailable", "history", req.id)
            frame = self._error_frame(err)
        self._settle(conn, slot, frame)

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

    def idle_sweep(self) -> None:
        """Let the connections that sent nothing since the last sweep doze (their picows goes)."""
        dozing = 0
        for conn in self.connections.values():
            conn.doze()
            dozing += conn.transport is None
        self.dozing = dozing

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


_OK, _FAILED, _CUT_OFF = "ok", "failed", "cut_off"
"""How a recovery ended (:meth:`Hub._recovery_ended`)."""

_DRAIN_POLL = 0.002
"""Seconds between checks of a connection's queue while a paged replay waits on it."""

MAX_DEFERRED = 1024
"""Replies a connection may have waiting behind a deferred one (shared history)."""
REPLAY_PAGE = 1000
"""Publications per engine read while recovering from shared history."""
MAX_HELD = 10_000
"""Live deliveries held for one subscription while its engine read is in flight."""
MAX_HISTORY_SCAN = 10_000
"""Entries a ``history`` request of a subtopic reads from the engine at most."""


class _Deferred:
    """A reply whose frame comes later, holding its place in the connection's order."""

    __slots__ = ("frame",)

    def __init__(self) -> None:
        self.frame: bytes | None = None


class _Hold:
    """A subscription whose live deliveries of ``stream`` wait for its engine read.

    ``held`` collects them while the read is in flight; once released,
    ``floor`` drops those the read already covered, until a later one passes.
    """

    __slots__ = ("conn", "floor", "held", "stream", "topic")

    def __init__(self, conn: Connection, topic: str, stream: str) -> None:
        self.conn = conn
        self.topic = topic
        self.stream = stream
        self.held: list[Any] | None = []
        self.floor: tuple[str, int] | None = None


def _append_failure(future: asyncio.Future[tuple[str, int]]) -> str | None:
    """Why a settled history append failed (an error's detail), or None when it was kept."""
    if future.cancelled():
        return "the history append was withdrawn"
    exc = future.exception()
    if exc is not None:
        return f"the backplane refused the history append: {exc}"
    return None


async def _nothing() -> dict[str, Any]:
    return {}


def _log_append_failure(future: asyncio.Future[tuple[str, int]]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a history append failed: %s", future.exception())


def _estimate(pubs: list[Publication]) -> int:
    """Roughly the bytes the replayed deliveries of ``pubs`` take (frame, fields, context)."""
    return sum(len(p.message) + 2 * len(p.topic) for p in pubs) + 200 * len(pubs)


def _recovery_fields(recovery: Recovery) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "recovered": recovery.recovered,
        "stream": recovery.stream,
        "epoch": recovery.epoch,
        "offset": recovery.offset,
    }
    if recovery.recovered:
        fields["replay"] = len(recovery.publications)
    return fields


def _expire(conn: Connection) -> None:
    # conn.expiry stays set (to the spent handle): the heartbeat does not arm it again.
    conn.fail(CloseCode.POLICY_VIOLATION, "token expired")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
