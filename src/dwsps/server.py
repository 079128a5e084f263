"""The dwsps server: connections, requests, fan-out, heartbeat and events.

The asyncio layer around the pure modules. Per request it parses
(:mod:`dwsps.messages`), updates the subscription trie (:mod:`dwsps.topics`)
and queues replies on the connection's write path
(:class:`~dwsps.connection.Connection`). A publish is encoded once per
matching context and the same frame bytes are queued for every subscriber;
queued frames leave in one write per connection at the end of the loop turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from types import TracebackType
from typing import Any, Protocol

import orjson
from picows import (
    WSCloseCode,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from dwsps.backplane.link import BackplaneLink
from dwsps.config import ServerConfig
from dwsps.connection import Connection
from dwsps.dedup import Deduplicator
from dwsps.errors import CloseCode, ErrorCode, ProtocolError
from dwsps.events import Events
from dwsps.frames import text_frame
from dwsps.messages import (
    Clock,
    DeliveryEncoder,
    Publish,
    Subscribe,
    Unsubscribe,
    encode_ack,
    encode_error,
    parse_request,
)
from dwsps.peering import PeerManager
from dwsps.topics import SubscriptionTrie, validate

log = logging.getLogger("dwsps.server")
_WS_LOG = logging.LoggerAdapter(logging.getLogger("picows.dwsps.ws"), {})

SERVER_EVENTS = (
    "subscribe",
    "unsubscribe",
    "publish",
    "connect",
    "disconnect",
    "peer_up",
    "peer_down",
    "backplane_up",
    "backplane_down",
)


class Forwarder(Protocol):
    """Something organic publishes are handed to after local delivery (peer links).

    ``forward`` must not block: it queues and returns.
    """

    def forward(self, publish: Publish) -> None: ...


@dataclass(slots=True)
class ServerStats:
    """Counters a server keeps; read them with :attr:`Server.stats`."""

    connections_total: int = 0
    requests: int = 0
    publishes: int = 0
    deliveries: int = 0
    errors_sent: int = 0
    slow_consumers: int = 0
    heartbeat_timeouts: int = 0
    invalid_closes: int = 0
    duplicates_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Batch:
    """Deliveries for one subscription queued during one loop turn, sent as one buffer.

    Consecutive publishes matching the same subscription (the usual fan-out)
    append their frame here instead of to every subscriber's queue; when the
    batch closes, the frames are joined once and the same bytes are queued
    on every member. It closes at the end of the loop turn, before anything
    else is queued on one of its members, and when a publish matches another
    subscription, so each connection still sees its frames in order.

    ``members`` is a snapshot taken at the start: the subscribers when those
    publishes were made. A subscription change bumps the trie's version, and
    the next publish then starts a new batch.
    """

    __slots__ = ("frames", "members", "subscribers", "version")

    def __init__(self, subscribers: dict[Connection, None], frame: bytes, version: int) -> None:
        self.subscribers = subscribers
        self.members = subscribers.copy()
        self.frames = [frame]
        self.version = version


class Server:
    """A dwsps pub/sub server.

    >>> server = Server(port=8000)            # doctest: +SKIP
    >>> server.on("subscribe", lambda topic, client_id: print(client_id, topic))
    >>> await server.start()
    """

    _loop: asyncio.AbstractEventLoop  # bound in start()

    def __init__(self, config: ServerConfig | None = None, **options: Any) -> None:
        """Configure from a :class:`ServerConfig`, keyword options, or both (options win)."""
        base = config or ServerConfig()
        self.config: ServerConfig = replace(base, **options) if options else base
        self.server_id = secrets.token_hex(8)
        self.stats = ServerStats()
        self.clock = Clock()
        self.connections: dict[str, Connection] = {}
        self.events = Events(SERVER_EVENTS, log)
        self._trie: SubscriptionTrie[Connection] = SubscriptionTrie()
        self._topic_limits = self.config.topic_limits
        self._dirty: list[Connection] = []
        self._batch: _Batch | None = None
        self._flush_scheduled = False
        self._forwarders: list[Forwarder] = []
        self._http_routes: dict[str, Callable[[], tuple[int, bytes, str]]] = {
            "/health": self._health,
        }
        self._server: asyncio.base_events.Server | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._counter = 0
        self._seq = 0
        self.dedup = Deduplicator()
        self._peering: PeerManager | None = None
        self.backplane: BackplaneLink | None = None

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; returns once the port is open."""
        self._loop = asyncio.get_running_loop()
        self._server = await ws_create_server(
            self._listener_factory,
            self.config.host,
            self.config.port,
            max_frame_size=self.config.max_frame_size,
            websocket_handshake_timeout=self.config.handshake_timeout,
            enable_auto_ping=False,
            enable_auto_pong=False,  # Connection answers pings (after its RSV check)
            read_buffer_init_size=2048,
            # An adapter, not a name: given a Logger, picows makes a child
            # Logger per connection (~0.5 KB each); an adapter is shared.
            logger_name=_WS_LOG,
            use_aiofastnet=False,
            ssl=self._tls_context(),
        )
        if self.config.heartbeat_interval > 0:
            self._heartbeat = self._loop.create_task(self._heartbeat_loop())
        if self.config.peers:
            self._peering = PeerManager(self)
            self.add_forwarder(self._peering)
            self._peering.start()
        # Created before the await: subscriptions made meanwhile are counted.
        self.backplane = BackplaneLink.create(self)
        if self.backplane is not None:
            await self.backplane.start()
        log.info("dwsps server %s listening on %s", self.server_id, self.url)

    async def close(self) -> None:
        """Stop accepting, close every client with 1001 and wait briefly for them to go."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        if self._peering is not None:
            peering, self._peering = self._peering, None
            self._forwarders.remove(peering)
            await peering.close(self.config.close_timeout / 2)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        conns = list(self.connections.values())
        waits = []
        for conn in conns:
            transport = conn.transport
            if transport is None:
                continue
            conn.flush()
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.GOING_AWAY, b"server shutting down")
            conn.closing = True
            waits.append(transport.wait_disconnected())
        if waits:
            done = asyncio.gather(*waits, return_exceptions=True)
            try:
                await asyncio.wait_for(done, self.config.close_timeout)
            except TimeoutError:
                for conn in list(self.connections.values()):
                    conn.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)
        if self.backplane is not None:
            backplane, self.backplane = self.backplane, None
            await backplane.close()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Start (if needed) and run until cancelled."""
        if self._server is None:
            await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.close()

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            return self.config.port
        return int(self._server.sockets[0].getsockname()[1])

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key or None)
        return context

    @property
    def url(self) -> str:
        """``ws://host:port`` (``wss://`` with TLS) of this server."""
        host = self.config.host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.config.tls_cert else "ws"
        return f"{scheme}://{host}:{self.port}"

    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Listen for a server event: subscribe(topic, client_id),
        unsubscribe(topic, client_id), publish(topic, client_id), connect(client_id),
        disconnect(client_id), peer_up(url), peer_down(url), backplane_up(),
        backplane_down(reason). Usable as a decorator."""
        return self.events.on(event, handler)

    def off(self, event: str, handler: Callable[..., Any]) -> None:
        """Remove an event handler."""
        self.events.off(event, handler)

    def add_forwarder(self, forwarder: Forwarder) -> None:
        """Hand organic publishes to ``forwarder`` after local delivery."""
        self._forwarders.append(forwarder)

    def peer_status(self) -> list[dict[str, Any]]:
        """Per peer link: url, state, outbox depth and bytes, in_flight, and the
        sent / resent / confirmed / rejected / dropped / forgotten counters."""
        return self._peering.status() if self._peering is not None else []

    def add_http_route(self, path: str, handler: Callable[[], tuple[int, bytes, str]]) -> None:
        """Serve ``GET path`` (non-upgrade requests only) with ``(status, body, content type)``."""
        self._http_routes[path] = handler

    # -- publishing -------------------------------------------------------

    def publish(self, topic: str, message: Any = None) -> int:
        """Publish from the embedding code, as an organic publish; return local deliveries."""
        validate(topic, subscription=False, limits=self._topic_limits)
        return self.route(Publish(topic, message, self.clock.now()), None)

    def route(self, pub: Publish, client_id: str | None) -> int:
        """Deliver locally, then forward unless it came from a peer. Returns local deliveries.

        An organic publish is given this server's identity (``origin``, ``seq``);
        one that carries an identity already seen is dropped (and counted).
        """
        if pub.timestamp is None:
            pub.timestamp = self.clock.now()
        if pub.origin is None:
            if not pub.from_peer:
                self._seq += 1
                pub.origin, pub.seq = self.server_id, self._seq
        elif pub.seq is not None and not self.dedup.first_time(pub.origin, pub.seq):
            self.stats.duplicates_dropped += 1
            return 0
        count = self.deliver(pub)
        if not pub.from_peer:
            for forwarder in self._forwarders:
                forwarder.forward(pub)
        if self.backplane is not None:
            # Peer publishes too: behind a backplane, servers are one service.
            self.backplane.forward(pub)
        self.stats.publishes += 1
        if self.events.has("publish"):
            self.events.emit("publish", pub.topic, client_id)
        return count

    def deliver(self, pub: Publish, extra: dict[str, Any] | None = None) -> int:
        """Queue one delivery per matching subscription on this server (no forwarding).

        ``extra`` adds fields to the delivery (e.g. how it arrived).
        """
        matches = self._trie.match(pub.topic)
        if not matches:
            return 0
        encoder = DeliveryEncoder(
            pub.topic, pub.message, pub.timestamp or self.clock.now(), pub.from_peer, extra
        )
        version = self._trie.version
        count = 0
        for context, subscribers in matches:
            frame = text_frame(encoder.encode(context))
            count += len(subscribers)
            # The hot path: consecutive publishes to one subscription share a
            # batch, so a delivery costs no per-subscriber work here.
            batch = self._batch
            if batch is not None and batch.subscribers is subscribers and batch.version == version:
                batch.frames.append(frame)
            else:
                if batch is not None:
                    self._close_batch()
                self._batch = _Batch(subscribers, frame, version)
        self.stats.deliveries += count
        self._schedule_flush()
        return count

    def _close_batch(self) -> None:
        """Queue the open batch's frames, joined once, on each of its members."""
        batch = self._batch
        if batch is None:
            return
        self._batch = None
        frames = batch.frames
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        dirty = self._dirty
        for conn in batch.members:
            # Connection.send, inlined (and without its batch check: we are closing it).
            pending = conn.pending
            if pending is None:
                if conn.closing:
                    continue
                conn.pending = [data]
                dirty.append(conn)
            else:
                pending.append(data)

    def has_subscribers(self, topic: str) -> bool:
        """Whether any local subscription matches ``topic``."""
        return bool(self._trie.match(topic))

    def subscription_topics(self) -> list[str]:
        """Every topic some local client is subscribed to."""
        return list(self._trie.topics())

    # -- connections (called by Connection) -------------------------------

    def _listener_factory(
        self, request: WSUpgradeRequest
    ) -> Connection | WSUpgradeResponseWithListener | None:
        upgrade = request.headers.get("Upgrade", "")
        if upgrade.lower() != "websocket":
            path = request.path.split(b"?", 1)[0].decode("latin-1")
            route = self._http_routes.get(path)
            if route is None:
                response = WSUpgradeResponse.create_error_response(
                    404, b"not found: dwsps speaks WebSocket here\n"
                )
            else:
                status, body, ctype = route()
                if status == 200:
                    response = WSUpgradeResponse.create_ok_response(body, {"Content-Type": ctype})
                else:
                    response = WSUpgradeResponse.create_error_response(
                        status, body, {"Content-Type": ctype}
                    )
            return WSUpgradeResponseWithListener(response, None)
        is_peer = self._is_authenticated_peer(request)
        self._counter += 1
        client_id = f"{secrets.token_urlsafe(9)}{self._counter:x}"
        return Connection(self, client_id, is_peer)

    def _is_authenticated_peer(self, request: WSUpgradeRequest) -> bool:
        tokens = self.config.accept_peer_tokens
        if not tokens:
            return False
        auth = request.headers.get("Authorization", "")
        presented = auth[7:] if auth.startswith("Bearer ") else ""
        if not presented:
            query = request.path.partition(b"?")[2].decode("latin-1")
            for part in query.split("&"):
                key, _, value = part.partition("=")
                if key == "peer_token":
                    presented = value
        return bool(presented) and any(secrets.compare_digest(presented, token) for token in tokens)

    def _connected(self, conn: Connection) -> None:
        self.connections[conn.client_id] = conn
        self.stats.connections_total += 1
        if self.events.has("connect"):
            self.events.emit("connect", conn.client_id)

    def _disconnected(self, conn: Connection) -> None:
        if self.connections.pop(conn.client_id, None) is None:
            return
        if conn.subscriptions:
            backplane = self.backplane
            for topic in conn.subscriptions:
                self._trie.remove(topic, conn)
                if backplane is not None:
                    backplane.interest.remove(topic)
            conn.subscriptions = None
        if self.events.has("disconnect"):
            self.events.emit("disconnect", conn.client_id)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and (self._dirty or self._batch is not None):
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._close_batch()
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    # -- requests ---------------------------------------------------------

    def _request(self, conn: Connection, data: bytes) -> None:
        self.stats.requests += 1
        try:
            req = parse_request(data, self._topic_limits)
            if type(req) is Publish:
                self._on_publish(conn, req)
            elif type(req) is Subscribe:
                self._on_subscribe(conn, req)
            elif type(req) is Unsubscribe:
                self._on_unsubscribe(conn, req)
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

    def _binary(self, conn: Connection) -> None:
        self.stats.requests += 1
        self._reject(
            conn,
            ProtocolError(ErrorCode.INVALID_MESSAGE, "binary frames are not accepted; send text"),
        )

    def _reject(self, conn: Connection, err: ProtocolError) -> None:
        self.stats.errors_sent += 1
        conn.send(text_frame(encode_error(err, self.clock.now())))
        conn.invalid_streak += 1
        if conn.invalid_streak >= self.config.max_invalid_requests:
            self.stats.invalid_closes += 1
            conn.fail(CloseCode.POLICY_VIOLATION, "too many invalid requests")

    def _ack(self, conn: Connection, action: str, topic: str, req_id: str | int | None) -> None:
        conn.send(text_frame(encode_ack(action, topic, self.clock.now(), req_id)))

    def _on_subscribe(self, conn: Connection, req: Subscribe) -> None:
        subs = conn.subscriptions
        if subs is None:
            subs = conn.subscriptions = set()
        if req.topic not in subs:
            if len(subs) >= self.config.max_subscriptions:
                raise ProtocolError(
                    ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                    f"at most {self.config.max_subscriptions} subscriptions per connection",
                    "subscribe",
                    req.id,
                )
            subs.add(req.topic)
            self._trie.add(req.topic, conn)
            if self.backplane is not None:
                self.backplane.interest.add(req.topic)
        self._ack(conn, "subscribe", req.topic, req.id)
        if self.events.has("subscribe"):
            self.events.emit("subscribe", req.topic, conn.client_id)

    def _on_unsubscribe(self, conn: Connection, req: Unsubscribe) -> None:
        subs = conn.subscriptions
        if subs is not None and req.topic in subs:
            subs.discard(req.topic)
            self._trie.remove(req.topic, conn)
            if self.backplane is not None:
                self.backplane.interest.remove(req.topic)
            if not subs:
                conn.subscriptions = None
        self._ack(conn, "unsubscribe", req.topic, req.id)
        if self.events.has("unsubscribe"):
            self.events.emit("unsubscribe", req.topic, conn.client_id)

    def _on_publish(self, conn: Connection, req: Publish) -> None:
        if req.from_peer and self.config.accept_peer_tokens and not conn.is_peer:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                "fromPeerServer is accepted only from authenticated peers",
                "publish",
                req.id,
            )
        self.route(req, conn.client_id)
        self._ack(conn, "publish", req.topic, req.id)

    # -- heartbeat and health ---------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            for conn in list(self.connections.values()):
                if not conn.ping():
                    self.stats.heartbeat_timeouts += 1
                    log.info("dropping %s: no pong to the last ping", conn.client_id)
                    conn.abort()

    def _health(self) -> tuple[int, bytes, str]:
        body = {
            "status": "ok",
            "server_id": self.server_id,
            "connections": len(self.connections),
            "subscriptions": len(self._trie),
            "stats": self.stats.as_dict(),
            "peers": self.peer_status(),
        }
        if self.backplane is not None:
            body["backplane"] = self.backplane.status()
            if not self.backplane.healthy:
                body["status"] = "degraded"
        return 200, orjson.dumps(body), "application/json"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
