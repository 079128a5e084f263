"""The asyncio dwsps client: awaitable acks, subscription handlers, reconnect + resubscribe.

>>> async with dwsps.connect("ws://127.0.0.1:8000") as client:   # doctest: +SKIP
...     await client.subscribe("news", lambda m: print(m["message"]))
...     await client.publish("news.uk", "hello")
...     async for delivery in client:
...         print(delivery)

Requests
    Every request carries an integer ``id``; the server echoes it in the ack or
    error reply, which resolves the awaiting call. A reply without an ``id``
    (the original Node.js server does not echo it) is matched to the oldest
    outstanding request with the same action and topic: replies come in
    request order, so that pairing is exact.

Deliveries
    Each delivery goes, in this order, to the ``message`` event, to the handler
    of the subscription named by its ``context`` (a ``news`` handler also gets
    ``news.uk`` publishes; a client subscribed to ``news`` and ``news.uk``
    receives a ``news.uk.x`` publish twice, once per handler), and to the
    bounded queue read by ``async for``. When that queue is full the *oldest*
    delivery is dropped and counted in :attr:`Client.dropped`: the reader must
    never stall, because acks arrive on the same connection and a server closes
    a client that stops reading (1013). ``queue_size=0`` turns the queue off
    for applications that only use handlers.

Reconnection
    When the connection drops, the client reconnects with exponential backoff
    and full jitter (:mod:`dwsps.backoff`: ``uniform(0, min(backoff_max,
    backoff_initial * 2**n))``),
    re-subscribes every held subscription, then emits ``reconnect``. Requests
    made meanwhile wait for the reconnection within their own timeout. An
    in-flight subscribe or unsubscribe is sent again (both are idempotent); an
    in-flight publish is not, because it may have been delivered already: it
    raises :class:`ConnectionLost`. Close codes that reconnecting cannot cure
    (1008 policy / authentication, 1002, 1003, 1007: this client broke a rule)
    end the client for good instead of retrying against the same wall.

Authentication
    ``token=`` is presented as ``Authorization: Bearer <token>`` in every
    upgrade request (a token in the URL's ``?token=`` works too; the header wins
    when both are present). :meth:`Client.refresh_token` sends an ``auth``
    request so an open connection outlives its token's ``exp``; the latest
    token is the one every reconnection presents. A refused upgrade (HTTP 401,
    403, 429, 503) is reported with the server's one-line reason.

    ``token_provider=`` (a function, sync or async, returning a fresh token)
    makes tokens renew themselves: the client asks it for a new token shortly
    before the current one's ``exp`` (read from the token, unverified) and
    sends it with :meth:`Client.refresh_token`; and when the server closes the
    connection because the token expired or was refused (1008 ``token
    expired`` / ``unauthorized``), or refuses an upgrade with 401, the client
    asks for a new token and reconnects (recovering what it missed) instead of
    closing for good. A provider that raises is retried with the reconnect
    backoff.

Recovery (history)
    On a server that keeps history, a subscription that lies inside one
    stream is acked with the stream's ``epoch`` and ``offset``; the client
    remembers them and moves them on with every delivery. When it reconnects
    it resubscribes with ``recover``, so the server replays what was published
    meanwhile before live deliveries resume; once the replay is in (the ack's
    ``replay`` counts it), the position moves to the ack's offset, so a
    subscription narrower than its stream does not fall behind it. Whether that worked is on the
    :class:`Subscription` (``recovered``) and in the ``recovery(topic,
    recovered, reply)`` event, emitted before any replayed delivery: ``False``
    means messages were lost (the server restarted, or its history no longer
    reaches back), and the position starts afresh from the ack's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeVar, overload

import jwt
import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.datastructures import Headers

from dwsps.backoff import Backoff
from dwsps.errors import (
    AckTimeout,
    CloseCode,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
    InvalidMessageError,
    InvalidTopicError,
    RequestError,
    TopicError,
    request_error,
)
from dwsps.events import Events
from dwsps.messages import Clock, encode_request
from dwsps.redact import redact
from dwsps.topics import TopicLimits, validate

log = logging.getLogger("dwsps.client")

Message = dict[str, Any]
"""A decoded server message (delivery, ack or error reply)."""

Handler = Callable[[Message], Any]
"""A subscription handler: called with each delivery; may be a coroutine function."""

TokenProvider = Callable[[], str | Awaitable[str]]
"""Returns a fresh token (``token_provider=``); may be a coroutine function."""

TOKEN_CLOSE_REASONS: Final = frozenset({"token expired", "unauthorized"})
"""1008 reasons a fresh token cures: with a ``token_provider`` the client reconnects."""

REFRESH_AHEAD: Final = 30.0
"""Seconds before ``exp`` a provider's token is renewed (at most a fifth of what is left)."""

F = TypeVar("F", bound=Callable[..., Any])

CLIENT_EVENTS: Final = (
    "open",
    "message",
    "ack",
    "error",
    "disconnect",
    "close",
    "reconnect",
    "recovery",
)

NO_RECONNECT_CODES: Final = frozenset(
    {
        CloseCode.PROTOCOL_ERROR,
        1003,  # unsupported data
        CloseCode.INVALID_TEXT,
        CloseCode.POLICY_VIOLATION,
    }
)
"""Close codes after which the client does not reconnect: the server rejected
this client itself (authentication, repeated bad input, broken framing), and
the next connection would be rejected the same way."""

# The server enforces its own (configurable) limits; the client only checks shape.
_NO_LIMITS: Final = TopicLimits(max_length=1 << 30, max_levels=1 << 30)
_MIB: Final = 1024 * 1024


class _Lost(Exception):
    """Internal: the connection an attempt used went away (the attempt may retry)."""


@dataclass(slots=True)
class _Pending:
    """One request awaiting its reply."""

    action: str
    topic: str
    future: asyncio.Future[Message]
    on_ack: Callable[[Message], None] | None


@dataclass(slots=True)
class Subscription:
    """A subscription this client holds, and where it is in its history stream."""

    topic: str
    handler: Handler | None = None
    stream: str | None = None
    """The history stream it lies in, when the server keeps one (from the ack)."""
    epoch: str | None = None
    offset: int | None = None
    """The last position received: the next recovery replays what came after it."""
    recovered: bool | None = None
    """After the last reconnect: True when everything missed was replayed, False
    when messages were lost; None before any reconnect, or without history."""
    seam: tuple[int, int] | None = field(default=None, repr=False)
    """After ``recovered: true``: (replayed deliveries still to come at or below
    the ack's offset, that offset)."""

    def take_position(self, reply: Message) -> None:
        """Take the ``stream``/``epoch``/``offset`` of an ack (none: not recoverable)."""
        stream, epoch, offset = reply.get("stream"), reply.get("epoch"), reply.get("offset")
        self.seam = None
        if isinstance(stream, str) and isinstance(epoch, str) and type(offset) is int:
            self.stream, self.epoch, self.offset = stream, epoch, offset
        else:
            self.stream = self.epoch = self.offset = None

    def expect_replay(self, reply: Message) -> None:
        """After a ``recovered: true`` ack: move to its offset once its ``replay`` is in.

        A subscription narrower than its stream gets no delivery for its siblings'
        offsets; without this its position would lag until the stream's history
        no longer reached back to it. Nothing at or below the ack's offset comes
        after the replay (PROTOCOL.md's seam), so once the replay's deliveries up
        to it are in, the position is the ack's.
        """
        count, epoch, offset = reply.get("replay"), reply.get("epoch"), reply.get("offset")
        self.seam = None
        if type(count) is int and type(offset) is int and epoch == self.epoch:
            self.seam = (count, offset)
            if count <= 0:
                self._pass_seam()

    def advance(self, epoch: str, offset: int, replayed: bool) -> None:
        """Take the position of a delivery (``replayed``: it carries ``recovered: true``)."""
        seam = self.seam
        if seam is not None and (epoch != self.epoch or offset >= seam[1]):
            seam = self.seam = None  # past the seam (or a new epoch): the delivery says it all
        self.epoch, self.offset = epoch, offset
        if seam is not None and replayed:
            self.seam = (seam[0] - 1, seam[1])
            if seam[0] <= 1:
                self._pass_seam()

    def _pass_seam(self) -> None:
        assert self.seam is not None
        if self.offset is not None and self.offset < self.seam[1]:
            self.offset = self.seam[1]
        self.seam = None


class Client:
    """A dwsps client.

    Use ``async with Client(url) as client`` (or :func:`connect`), or call
    :meth:`connect` and :meth:`close` yourself.

    :param url: ``ws://`` or ``wss://`` URL of a dwsps server.
    :param request_timeout: seconds a request waits for its reply (including
        time spent waiting for a reconnection); then :class:`AckTimeout`.
    :param reconnect: reconnect after an unexpected drop.
    :param backoff_initial: first reconnect delay bound, in seconds.
    :param backoff_max: largest reconnect delay bound, in seconds.
    :param max_reconnect_attempts: give up (close for good) after this many
        failed attempts in a row; ``None`` retries until :meth:`close`.
    :param queue_size: deliveries buffered for ``async for`` (oldest dropped
        beyond it); 0 disables the queue.
    :param open_timeout: seconds allowed for one connection attempt.
    :param ping_interval: seconds between the client's own pings, which detect
        a dead server; ``None`` disables them (the server pings us anyway).
    :param ping_timeout: seconds to wait for the pong before dropping.
    :param max_size: largest incoming message in bytes (``None``: no limit).
    :param topic_limits: check topic length/levels client-side too (by
        default only the shape is checked; the server enforces its limits).
    :param token: a JWT (or any bearer token the server's authentication
        hook understands), sent as ``Authorization: Bearer`` on every
        connection; replace it with :meth:`refresh_token`.
    :param token_provider: returns a fresh token (sync or async): called
        before the first connection when ``token`` is not given, shortly
        before each token's ``exp``, and when the server refuses or expires
        the token (see "Authentication" above).
    :param websocket_options: passed on to :func:`websockets.asyncio.client.connect`
        (e.g. ``additional_headers``, ``ssl``, ``proxy``).
    """

    def __init__(
        self,
        url: str,
        *,
        request_timeout: float = 10.0,
        reconnect: bool = True,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        max_reconnect_attempts: int | None = None,
        queue_size: int = 1024,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        max_size: int | None = 16 * _MIB,
        topic_limits: TopicLimits | None = None,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        **websocket_options: Any,
    ) -> None:
        if request_timeout <= 0 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("timeouts and backoff bounds must be positive, initial <= max")
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        _check_token(token)
        self.url = url
        self.display_url = redact(url)
        """``url`` as logs and errors show it: a ``?token=`` or password masked."""
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_reconnect_attempts = max_reconnect_attempts
        self.events = Events(CLIENT_EVENTS, log)
        self.dropped = 0
        """Deliveries dropped from the full ``async for`` queue."""
        self.close_code: int | None = None
        """Why the client closed for good (1000 after :meth:`close`); None while usable."""
        self.close_reason = ""
        self._ws_options: dict[str, Any] = {
            "open_timeout": open_timeout,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "max_size": max_size,
            "close_timeout": 2.0,
            # The server does not negotiate compression; skip the offer.
            "compression": None,
            **websocket_options,
        }
        self._token = token or None
        self._token_provider = token_provider
        self._token_stale = False
        self._refresher: asyncio.Task[None] | None = None
        self._limits = topic_limits or _NO_LIMITS
        self._clock = Clock()
        self._subscriptions: dict[str, Subscription] = {}
        self._inflight: dict[int, _Pending] = {}
        self._next_id = 0
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        # Set while a connection is usable, and (for good) once closed, so that
        # waiting requests wake up either way and then check which it is.
        self._ready = asyncio.Event()
        self._started = False
        self._closing = False
        self._closed = False
        self._closed_by_user = False
        self._queue: deque[Message] | None = deque(maxlen=queue_size) if queue_size else None
        self._queue_event = asyncio.Event()
        self._closed_event = asyncio.Event()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self.connected else "disconnected"
        return f"<dwsps.Client {self.display_url} {state}>"

    # -- state ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection is up and its subscriptions are in place."""
        return self._ready.is_set() and not self._closed

    @property
    def closed(self) -> bool:
        """Whether the client is closed for good (by :meth:`close` or a final drop)."""
        return self._closed

    @property
    def token(self) -> str | None:
        """The token this client presents (the latest one given to :meth:`refresh_token`)."""
        return self._token

    @property
    def user(self) -> str | None:
        """Who the token says this client is: its ``sub`` claim, or None.

        Read from the token itself (the server does not send it back): a
        server with JWT authentication that accepted the token gives the
        connection exactly this identity. None without a token, for a token
        that is not a JWT, or one without ``sub``.
        """
        return _subject(self._token)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The topics this client holds (acknowledged subscriptions)."""
        return tuple(self._subscriptions)

    def subscription(self, topic: str) -> Subscription | None:
        """The held subscription ``topic`` (its position and ``recovered`` flag), if any."""
        return self._subscriptions.get(topic)

    @overload
    def on(self, event: str, handler: F) -> F: ...
    @overload
    def on(self, event: str, handler: None = None) -> Callable[[F], F]: ...
    def on(self, event: str, handler: F | None = None) -> F | Callable[[F], F]:
        """Listen for an event; without ``handler``, return a decorator.

        Events: ``open()`` (each WebSocket connection, reconnections included),
        ``message(delivery)``, ``ack(reply)``, ``error(reply)``,
        ``disconnect(code, reason)`` (each connection that ends),
        ``reconnect()`` (reconnected and resubscribed), ``recovery(topic,
        recovered, reply)`` (a subscription with history was resubscribed:
        ``recovered`` False means messages published meanwhile are lost) and
        ``close(code, reason)`` (once: the client is closed for good).
        Handlers may be sync or async.
        """
        result: F | Callable[[F], F] = self.events.on(event, handler)
        return result

    def off(self, event: str, handler: Callable[..., Any]) -> None:
        """Remove an event handler."""
        self.events.off(event, handler)

    # -- lifecycle --------------------------------------------------------

    async def connect(self) -> Client:
        """Open the connection; raise :class:`ConnectionClosed` if that fails.

        The first connection is not retried (a wrong URL should fail fast),
        except once with a fresh token when a ``token_provider`` is set and the
        server answered 401. Reconnection applies once a connection has been
        established.
        """
        if self._closed or self._closing:
            raise RuntimeError("this client is closed; make a new one")
        if self._started:
            raise RuntimeError("connect() was already called")
        self._started = True
        try:
            if self._token is None and self._token_provider is not None:
                self._token = await self._fresh_token()
            try:
                ws = await self._open()
            except ConnectionClosed:
                if not (self._token_stale and self._token_provider is not None):
                    raise
                # A 401 for the given token: once more with the provider's.
                self._token, self._token_stale = await self._fresh_token(), False
                ws = await self._open()
        except BaseException:
            self._started = False
            raise
        self._attach(ws)
        self._ready.set()
        self._schedule_refresh()
        return self

    async def close(self) -> None:
        """Close the connection (code 1000) and stop reconnecting; idempotent.

        Outstanding requests raise :class:`ConnectionClosed`; ``async for``
        ends once the deliveries already received are consumed.
        """
        if self._closed or self._closing:
            await self._closed_event.wait()
            return
        self._closing = True
        for task in (self._reconnect_task, self._refresher):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        ws = self._ws
        if ws is not None:
            await ws.close()
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self._closed_by_user = True
        self._finish(1000, "client closed")

    async def wait_closed(self) -> None:
        """Return once the client is closed for good (see :attr:`close_code`)."""
        await self._closed_event.wait()

    async def __aenter__(self) -> Client:
        if not self._started:
            await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- requests ---------------------------------------------------------

    async def subscribe(self, topic: str, handler: Handler | None = None) -> Message:
        """Subscribe to ``topic`` (a ``*`` level matches any one level); return the ack.

        ``handler`` is called with every delivery whose ``context`` is
        ``topic``. Subscribing again with a handler replaces it; without one
        keeps the current handler. Raises :class:`~dwsps.errors.InvalidTopicError`
        (before sending, for a malformed topic) or another
        :class:`~dwsps.errors.RequestError` subclass, :class:`AckTimeout`,
        :class:`ConnectionClosed`.
        """
        self._check_topic(topic, "subscribe")

        def held(reply: Message) -> None:
            # Runs in the reader as the ack arrives, before any delivery that follows it.
            sub = self._subscriptions.get(topic)
            if sub is None:
                sub = self._subscriptions[topic] = Subscription(topic, handler)
            elif handler is not None:
                sub.handler = handler
            sub.take_position(reply)

        return await self._request("subscribe", topic, None, held)

    async def unsubscribe(self, topic: str) -> Message:
        """Remove exactly the subscription ``topic`` (and its handler); return the ack."""
        self._check_topic(topic, "unsubscribe")

        def released(reply: Message) -> None:
            self._subscriptions.pop(topic, None)

        return await self._request("unsubscribe", topic, None, released)

    async def publish(self, topic: str, message: Any = None) -> Message:
        """Publish ``message`` (any JSON value) to ``topic``; return the ack.

        Raises like :meth:`subscribe`, plus :class:`ConnectionLost` if the
        connection dropped after the publish was sent but before its ack.
        """
        self._check_topic(topic, "publish")
        return await self._request("publish", topic, message, None)

    async def refresh_token(self, token: str) -> Message:
        """Present a fresh ``token`` on the open connection (an ``auth`` request); return the ack.

        The server replaces the connection's identity and permissions (and
        releases subscriptions the new permissions do not cover). From now on
        ``token`` is also what reconnections present, even if this request
        fails. A token the server refuses raises
        :class:`~dwsps.errors.UnauthorizedError`, and the server closes the
        connection (1008): the client is then closed for good.
        """
        _check_token(token)
        if not token:
            raise ValueError("token must not be empty")
        # Before sending: a reconnection meanwhile must not present the old token.
        self._token = token
        reply = await self._request("auth", "", None, None, {"token": token})
        if self._refresher is not asyncio.current_task():
            self._schedule_refresh()
        return reply

    async def history(
        self, topic: str, limit: int = 100, since: tuple[str, int] | None = None
    ) -> Message:
        """The latest kept publications of ``topic`` (at most ``limit``, oldest first).

        Returns the server's ``history`` reply: ``epoch``, ``offset`` and
        ``publications`` (deliveries). With ``since=(epoch, offset)``, only those
        after it. Raises like :meth:`subscribe` (``invalid_message`` when the
        server keeps no history for ``topic``).
        """
        self._check_topic(topic, "history")
        fields: Message = {"limit": limit}
        if since is not None:
            fields["since"] = {"epoch": since[0], "offset": since[1]}
        return await self._request("history", topic, None, None, fields)

    def _check_topic(self, topic: str, action: str) -> None:
        try:
            validate(topic, subscription=action != "publish", limits=self._limits)
        except TopicError as exc:
            # The same type the server's invalid_topic reply raises, so one
            # except clause covers both; ``reply`` is built locally (no timestamp).
            reply: Message = {
                "type": "error",
                "error": str(ErrorCode.INVALID_TOPIC),
                "detail": str(exc),
                "action": action,
            }
            raise InvalidTopicError(ErrorCode.INVALID_TOPIC, str(exc), reply) from None

    async def _request(
        self,
        action: str,
        topic: str,
        message: Any,
        on_ack: Callable[[Message], None] | None,
        fields: Message | None = None,
    ) -> Message:
        if not self._started:
            raise RuntimeError("call connect() (or use 'async with') before making requests")
        try:
            async with asyncio.timeout(self.request_timeout):
                while True:
                    ws = await self._wait_ready()
                    try:
                        return await self._attempt(ws, action, topic, message, on_ack, fields)
                    except _Lost as lost:
                        if action == "publish" and lost.args and lost.args[0] == "sent":
                            raise ConnectionLost(
                                f"connection lost before the publish to {topic!r} was"
                                " acknowledged; it may or may not have been delivered"
                            ) from None
                        # Not sent, or idempotent: try again on the next connection.
        except TimeoutError:
            what = f"{action} {topic!r}" if topic else action
            raise AckTimeout(f"no reply to {what} within {self.request_timeout} s") from None

    async def _wait_ready(self) -> ClientConnection:
        while True:
            await self._ready.wait()
            if self._closed or self._closing:
                raise ConnectionClosed(self._closed_message())
            if self._ws is not None:
                return self._ws
            await asyncio.sleep(0)  # pragma: no cover - ready set between swaps

    async def _attempt(
        self,
        ws: ClientConnection,
        action: str,
        topic: str,
        message: Any,
        on_ack: Callable[[Message], None] | None,
        fields: Message | None = None,
    ) -> Message:
        """Send one request on ``ws`` and await its reply; raise _Lost if ``ws`` goes.

        ``fields`` are added to the request (``recover``, ``limit``, ...).
        """
        if ws is not self._ws:
            raise _Lost("unsent")
        self._next_id += 1
        req_id = self._next_id
        request: Message = {"type": action, "id": req_id}
        if topic:
            request["topic"] = topic
        if action == "publish":
            request["message"] = message
        if fields:
            request.update(fields)
        request["timestamp"] = self._clock.now()
        data = encode_request(request)  # TypeError here if message is not JSON-able
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._inflight[req_id] = _Pending(action, topic, future, on_ack)
        try:
            try:
                await ws.send(data, text=True)
            except websockets.ConnectionClosed:
                # Never sent: wait for the reader to notice the drop, then retry.
                with contextlib.suppress(_Lost):
                    await future
                raise _Lost("unsent") from None
            try:
                return await future
            except _Lost:
                raise _Lost("sent") from None
        finally:
            self._inflight.pop(req_id, None)

    def _closed_message(self) -> str:
        if self._closed_by_user or self._closing:
            return "the client is closed"
        return f"connection closed for good (code {self.close_code}: {self.close_reason})"

    # -- async iteration --------------------------------------------------

    def __aiter__(self) -> Client:
        if self._queue is None:
            raise RuntimeError("async iteration needs queue_size > 0")
        return self

    async def __anext__(self) -> Message:
        """The next delivery; ends after :meth:`close`, raises ConnectionClosed after a
        final drop (once the deliveries already received are consumed)."""
        queue = self._queue
        assert queue is not None
        while not queue:
            if self._closed:
                if self._closed_by_user:
                    raise StopAsyncIteration
                raise ConnectionClosed(self._closed_message())
            self._queue_event.clear()
            await self._queue_event.wait()
        return queue.popleft()

    # -- connection management --------------------------------------------

    async def _open(self) -> ClientConnection:
        options = self._ws_options
        if self._token is not None:
            # Built per attempt: a reconnection presents the latest token.
            given = Headers(options.get("additional_headers") or {}).raw_items()
            headers = [(k, v) for k, v in given if k.lower() != "authorization"]
            headers.append(("Authorization", f"Bearer {self._token}"))
            options = {**options, "additional_headers": headers}
        try:
            return await ws_connect(self.url, **options)
        except websockets.InvalidStatus as exc:
            if exc.response.status_code == 401:
                self._token_stale = True
            raise ConnectionClosed(
                f"could not connect to {self.display_url}: {_refusal(exc)}"
            ) from exc
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            raise ConnectionClosed(f"could not connect to {self.display_url}: {exc}") from exc

    def _attach(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._reader = asyncio.create_task(
            self._read_loop(ws), name=f"dwsps-client {self.display_url}"
        )
        self.events.emit("open")

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            while True:
                data = await ws.recv(decode=False)
                try:
                    self._dispatch(data)
                except Exception:  # a bug here must not kill the connection
                    log.exception("error dispatching a server message")
        except websockets.ConnectionClosed:
            pass
        except Exception:
            log.exception("client reader failed")
            ws.transport.abort()
        with contextlib.suppress(Exception):
            await ws.wait_closed()
        self._lost(ws, ws.close_code or 1006, ws.close_reason or "")

    def _dispatch(self, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("ignoring a message that is not JSON: %.80r", data)
            return
        if not isinstance(msg, dict):
            log.warning("ignoring a message that is not an object: %.80r", data)
            return
        kind = msg.get("type")
        if kind == "publish":
            self._deliver(msg)
        elif kind == "ack":
            self.events.emit("ack", msg)
            pending = self._take_pending(msg)
            if pending is not None:
                if pending.on_ack is not None:
                    pending.on_ack(msg)
                pending.future.set_result(msg)
        elif kind == "history":
            pending = self._take_pending(msg)
            if pending is not None:
                pending.future.set_result(msg)
        elif kind == "error":
            self.events.emit("error", msg)
            pending = self._take_pending(msg)
            if pending is not None:
                code = msg.get("error")
                detail = msg.get("detail")
                pending.future.set_exception(
                    request_error(
                        code if isinstance(code, str) else "unknown",
                        detail if isinstance(detail, str) else "",
                        msg,
                    )
                )
        else:
            log.debug("ignoring a message of type %r", kind)

    def _take_pending(self, reply: Message) -> _Pending | None:
        req_id = reply.get("id")
        if isinstance(req_id, int) and not isinstance(req_id, bool):
            pending = self._inflight.pop(req_id, None)
        elif req_id is None:
            pending = self._oldest_pending(reply.get("action"), reply.get("topic"))
        else:
            pending = None
        if pending is None or pending.future.done():
            return None
        return pending

    def _oldest_pending(self, action: object, topic: object) -> _Pending | None:
        # Servers that do not echo ids reply in request order (dicts keep insertion order).
        for req_id, pending in self._inflight.items():
            if pending.action == action and (topic is None or pending.topic == topic):
                del self._inflight[req_id]
                return pending
        return None

    def _deliver(self, msg: Message) -> None:
        self.events.emit("message", msg)
        context = msg.get("context")
        sub = self._subscriptions.get(context) if isinstance(context, str) else None
        if sub is not None:
            if sub.stream is not None and msg.get("stream") == sub.stream:
                epoch, offset = msg.get("epoch"), msg.get("offset")
                if isinstance(epoch, str) and type(offset) is int:
                    sub.advance(epoch, offset, msg.get("recovered") is True)
            if sub.handler is not None:
                self._call(sub.handler, msg)
        queue = self._queue
        if queue is not None:
            if len(queue) == queue.maxlen:
                if not self.dropped:
                    log.warning(
                        "delivery queue full (%d): dropping the oldest; iterate the client"
                        " faster, or pass queue_size=0 if you only use handlers",
                        queue.maxlen,
                    )
                self.dropped += 1
            queue.append(msg)
            self._queue_event.set()

    def _call(self, handler: Handler, msg: Message) -> None:
        try:
            result = handler(msg)
        except Exception:
            log.exception("subscription handler %r raised", handler)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("async subscription handler raised", exc_info=task.exception())

    def _lost(self, ws: ClientConnection, code: int, reason: str) -> None:
        """The connection ``ws`` ended: fail its requests, then reconnect or finish."""
        if ws is not self._ws:
            return
        self._ws = None
        if not self._closed:
            self._ready.clear()
        for pending in list(self._inflight.values()):
            if not pending.future.done():
                pending.future.set_exception(
                    ConnectionClosed("the client is closed") if self._closing else _Lost()
                )
        log.info("connection to %s closed: %s %s", self.display_url, code, reason)
        self.events.emit("disconnect", code, reason)
        if self._closing or self._closed:
            return
        if not self.reconnect:
            self._finish(code, reason)
        elif (
            code == CloseCode.POLICY_VIOLATION
            and reason in TOKEN_CLOSE_REASONS
            and self._token_provider is not None
        ):
            log.info("%s: %s; reconnecting with a fresh token", self.display_url, reason)
            self._token_stale = True
            self._start_reconnecting()
        elif code in NO_RECONNECT_CODES:
            log.warning(
                "not reconnecting to %s after close code %s (%s)", self.display_url, code, reason
            )
            self._finish(code, reason)
        else:
            self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        while not (self._closing or self._closed):
            limit = self.max_reconnect_attempts
            failures = backoff.attempt
            if limit is not None and failures >= limit:
                log.warning(
                    "giving up on %s after %d reconnect attempts", self.display_url, failures
                )
                self._finish(1006, f"gave up after {failures} reconnect attempts")
                return
            await asyncio.sleep(backoff.next_delay())
            try:
                if self._token_stale and self._token_provider is not None:
                    self._token = await self._fresh_token()
                    self._token_stale = False
                ws = await self._open()
            except ConnectionClosed as exc:
                log.debug("reconnect attempt %d failed: %s", backoff.attempt, exc)
                continue
            self._attach(ws)
            try:
                await self._resubscribe(ws)
            except (_Lost, TimeoutError) as exc:
                log.info("resubscribing on %s failed (%r); reconnecting", self.display_url, exc)
                ws.transport.abort()
                continue
            except ConnectionClosed:
                return  # closed for good meanwhile
            if ws is not self._ws:  # dropped right after the last ack
                continue
            self._ready.set()
            log.info("reconnected to %s", self.display_url)
            self._schedule_refresh()
            self.events.emit("reconnect")
            return

    # -- token renewal ------------------------------------------------------

    async def _fresh_token(self) -> str:
        """Ask the provider; its failure is a failed connection attempt."""
        provider = self._token_provider
        assert provider is not None
        try:
            result = provider()
            token = await result if inspect.isawaitable(result) else result
        except Exception as exc:
            raise ConnectionClosed(f"the token provider failed: {exc!r}") from exc
        if not isinstance(token, str) or not token:
            raise ConnectionClosed(
                f"the token provider returned {type(token).__name__}, not a token"
            )
        _check_token(token)
        return token

    def _schedule_refresh(self) -> None:
        """With a provider, renew the token shortly before its ``exp`` (one timer at a time)."""
        if self._token_provider is None or self._closing or self._closed:
            return
        exp = _expiry(self._token)
        current = self._refresher
        if current is not None and not current.done() and current is not asyncio.current_task():
            current.cancel()
        self._refresher = None
        if exp is not None:
            left = exp - time.time()
            due = max(0.0, left - min(REFRESH_AHEAD, left / 5))
            self._refresher = asyncio.create_task(self._refresh_at(due, exp))

    async def _refresh_at(self, delay: float, exp: float) -> None:
        await asyncio.sleep(delay)
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        while not (self._closing or self._closed) and time.time() < exp:
            try:
                await self.refresh_token(await self._fresh_token())
            except ConnectionClosed as exc:
                # The provider failed, or the connection is down: a reconnect
                # presents the latest token (and fetches one if it is refused).
                level = logging.WARNING if backoff.attempt == 0 else logging.DEBUG
                log.log(level, "renewing the token for %s failed: %s", self.display_url, exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            except Exception as exc:  # refused: the server closes 1008 and we reconnect
                log.warning("the server refused the renewed token: %s", exc)
                return
            self._schedule_refresh()
            return

    async def _resubscribe(self, ws: ClientConnection) -> None:
        subs = list(self._subscriptions.values())
        if not subs:
            return
        async with asyncio.timeout(self.request_timeout):
            results = await asyncio.gather(
                *(self._resubscribe_one(ws, sub) for sub in subs), return_exceptions=True
            )
        for sub, result in zip(subs, results, strict=True):
            if isinstance(result, RequestError):
                # The server will not hold it any more (e.g. a lower limit): say so, drop it.
                log.warning("could not resubscribe to %r: %s", sub.topic, result)
                self._subscriptions.pop(sub.topic, None)
            elif isinstance(result, BaseException):
                raise result

    async def _resubscribe_one(self, ws: ClientConnection, sub: Subscription) -> Message:
        """Subscribe ``sub`` again, recovering from its position when it has one."""
        if sub.epoch is None or sub.offset is None:
            return await self._attempt(ws, "subscribe", sub.topic, None, sub.take_position)
        recover = {"recover": {"epoch": sub.epoch, "offset": sub.offset}}

        def recovered(reply: Message) -> None:
            # In the reader, before the replayed deliveries that follow the ack.
            ok = reply.get("recovered") is True
            if ok:
                sub.expect_replay(reply)
            else:
                sub.take_position(reply)  # start afresh from the server's position
            sub.recovered = ok
            self.events.emit("recovery", sub.topic, ok, reply)

        try:
            return await self._attempt(ws, "subscribe", sub.topic, None, recovered, recover)
        except InvalidMessageError:
            # This server keeps no history for it (any more): a plain subscribe,
            # and whatever was published meanwhile is lost.
            def plain(reply: Message) -> None:
                sub.take_position(reply)
                sub.recovered = False
                self.events.emit("recovery", sub.topic, False, reply)

            return await self._attempt(ws, "subscribe", sub.topic, None, plain)

    def _finish(self, code: int, reason: str) -> None:
        """Close for good: wake every waiter with the news, emit ``close`` once."""
        if self._closed:
            return
        self._closed = True
        self.close_code = code
        self.close_reason = reason
        for task in (self._reconnect_task, self._refresher):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
        message = self._closed_message()
        for pending in list(self._inflight.values()):
            if not pending.future.done():
                pending.future.set_exception(ConnectionClosed(message))
        self._inflight.clear()
        self._ready.set()
        self._queue_event.set()
        self._closed_event.set()
        self.events.emit("close", code, reason)


def _check_token(token: object) -> None:
    if token is not None and not isinstance(token, str):
        raise TypeError("token must be a str")
    if isinstance(token, str) and (not token.isascii() or any(c in token for c in "\r\n")):
        raise ValueError("token must be ASCII without line breaks")


def _claims(token: str | None) -> dict[str, Any] | None:
    """A JWT's claims, unverified (the server verifies), or None."""
    if not token:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


def _expiry(token: str | None) -> float | None:
    claims = _claims(token)
    exp = None if claims is None else claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def _subject(token: str | None) -> str | None:
    claims = _claims(token)
    if claims is None:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) else None


def _refusal(exc: websockets.InvalidStatus) -> str:
    """``HTTP 401: token expired``: the status and the server's one-line reason."""
    response = exc.response
    reason = (response.body or b"").decode("utf-8", "replace").strip().splitlines()
    text = f"HTTP {response.status_code}"
    return f"{text}: {reason[0][:200]}" if reason else text


class Connect:
    """What :func:`connect` returns: ``await`` it, or use it with ``async with``."""

    def __init__(self, url: str, **options: Any) -> None:
        self.client = Client(url, **options)

    def __await__(self) -> Generator[Any, None, Client]:
        return self.client.connect().__await__()

    async def __aenter__(self) -> Client:
        return await self.client.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.client.close()


def connect(url: str, **options: Any) -> Connect:
    """Connect a :class:`Client` to ``url``: ``async with dwsps.connect(url) as client:``
    (closed on exit) or ``client = await dwsps.connect(url)``. ``options`` are
    :class:`Client`'s keyword arguments."""
    return Connect(url, **options)


__all__ = [
    "CLIENT_EVENTS",
    "NO_RECONNECT_CODES",
    "Client",
    "Connect",
    "ConnectionLost",
    "Handler",
    "Message",
    "Subscription",
    "TokenProvider",
    "connect",
]
