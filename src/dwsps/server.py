"""The dwsps server: composes the listener, the hub, the links and HTTP.

:class:`Server` owns the lifecycle (start, graceful close) and the heartbeat,
and decides per incoming request whether it is plain HTTP
(:mod:`dwsps.http`) or a WebSocket upgrade, which becomes a
:class:`~dwsps.connection.Connection` of the :class:`~dwsps.hub.Hub`. What
happens to messages is the hub's and the router's business; where publishes
go beyond this server is the links' (:mod:`dwsps.links`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType
from typing import Any

import orjson
from picows import WSListener

from dwsps.api import HttpApi
from dwsps.auth import Authenticate, Authenticator, Identity, UpgradeRequest
from dwsps.build import describe as describe_build
from dwsps.config import ServerConfig
from dwsps.connection import Connection
from dwsps.errors import AuthError
from dwsps.events import Events
from dwsps.http import (
    Answer,
    Handler,
    HttpRequest,
    HttpResponse,
    HttpRoutes,
    KeyCheck,
    json_response,
    text_response,
    unauthorized,
)
from dwsps.hub import Hub, ServerStats
from dwsps.limits import OriginPolicy
from dwsps.links import Link
from dwsps.links.backplane import BackplaneLink, BackplaneOptions, create_backplane
from dwsps.links.peering import PeerAuth, PeerLinks
from dwsps.listener import Admitted, FrontDoor, ListenerSettings, PicowsLog
from dwsps.messages import Clock, Publish
from dwsps.metrics import Metrics, WorkerMetrics
from dwsps.permissions import Permissions
from dwsps.startup import (
    check_startup,
    jwt_verifier,
    permissions_setting,
    read_key,
    setting_error,
)
from dwsps.topics import validate
from dwsps.web import routes as web_routes
from dwsps.workers import Worker
from dwsps.writer import Writer

log = logging.getLogger("dwsps.server")
_WS_LOG = logging.getLogger("picows.dwsps.ws")

SERVER_EVENTS = (
    "subscribe",
    "unsubscribe",
    "publish",
    "connect",
    "disconnect",
    "recovery",
    "peer_up",
    "peer_down",
    "backplane_up",
    "backplane_down",
)


class Server:
    """A dwsps pub/sub server.

    >>> server = Server(port=8000)            # doctest: +SKIP
    >>> server.on("subscribe", lambda topic, client_id: print(client_id, topic))
    >>> await server.start()
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        authenticate: Authenticate | None = None,
        worker: Worker | None = None,
        **options: Any,
    ) -> None:
        """Configure from a :class:`ServerConfig`, keyword options, or both (options win).

        ``authenticate`` is an embedding application's own admission: an async
        callable given each upgrade's :class:`~dwsps.auth.UpgradeRequest` that
        returns an :class:`~dwsps.auth.Identity` or raises
        :class:`~dwsps.errors.AuthError` (the client gets 401 with its reason).
        ``worker`` makes this server one worker of ``dwsps serve --workers N``
        (:mod:`dwsps.workers`): it shares the port and serves every worker's metrics.
        Raises :class:`~dwsps.errors.ConfigError` for unusable auth settings.
        """
        base = config or ServerConfig()
        self.config: ServerConfig = replace(base, **options) if options else base
        self.server_id = secrets.token_hex(8)
        self.events = Events(SERVER_EVENTS, log)
        self.hub = Hub(
            self.config, self.server_id, self.events, _authenticator(self.config, authenticate)
        )
        api_key = read_key(self.config, "api_key")
        status_key = read_key(self.config, "status_key")
        # With a status key, what the server is and counts is for the operator only.
        self._status_keys = KeyCheck(status_key, api_key) if status_key else None
        self.http = HttpRoutes()
        self.http.add("/health", self._status_route(self._health))
        self.http.add("/health/live", _live)
        self.http.add("/health/ready", self._ready)
        self.worker = worker
        metrics = Metrics(self)
        self._worker_metrics: WorkerMetrics | None = None
        if worker is None:
            metrics_route = metrics.response
        else:
            self._worker_metrics = WorkerMetrics(metrics, worker.slot, worker.directory)
            metrics_route = self._worker_metrics.response
        self.http.add("/metrics", self._status_route(metrics_route, summary=False))
        self._metrics_task: asyncio.Task[None] | None = None
        for path, handler in web_routes().items():
            self.http.add(path, handler)
        if api_key:
            HttpApi(self.hub, api_key).register(self.http)
        self._peer_auth = PeerAuth(self.config.accept_peer_tokens)
        self._origins = OriginPolicy(self.config.allowed_origins)
        self._links: list[Link] = []
        self._peering: PeerLinks | None = None
        self._backplane: BackplaneLink | None = None
        self._server: asyncio.base_events.Server | None = None
        self._started = False
        self._heartbeat: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None

    # -- what the server is made of ----------------------------------------

    @property
    def stats(self) -> ServerStats:
        """The server's counters."""
        return self.hub.stats

    @property
    def clock(self) -> Clock:
        """Server time, as the wire wants it."""
        return self.hub.clock

    @property
    def connections(self) -> dict[str, Connection]:
        """Open connections by client id (read only)."""
        return self.hub.connections

    @property
    def backplane(self) -> BackplaneLink | None:
        """The link to a shared backplane, or None on the embedded default."""
        return self._backplane

    def _make_links(self) -> list[Link]:
        links: list[Link] = []
        if self.config.peers:
            self._peering = PeerLinks(self.config, self.hub)
            links.append(self._peering)
        backplane = create_backplane(
            self.config.backplane,
            BackplaneOptions(
                self.server_id,
                self.config.backplane_buffer_messages,
                self.config.backplane_buffer_bytes,
            ),
        )
        if backplane.shared:
            self._backplane = BackplaneLink(self.hub, backplane)
            links.append(self._backplane)
        for link in links:
            for path, handler in link.http_routes().items():
                self.http.add(path, self._status_route(handler))
        return links

    def _status_route(self, handler: Handler, *, summary: bool = True) -> Handler:
        """``handler`` behind the status key, if one is configured.

        Without the key a request gets only ``{"status"}`` with the handler's
        HTTP status (so probes keep working), or 401 when ``summary`` is False.
        """
        keys = self._status_keys
        if keys is None:
            return handler

        def guarded(request: HttpRequest) -> HttpResponse:
            if keys.allows(request):
                return handler(request)
            if not summary:
                return unauthorized("the status key")
            answer = handler(request)
            return json_response(
                {"status": "ok" if answer.status < 500 else "degraded"}, answer.status
            )

        return guarded

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; returns once the port is open.

        Raises :class:`~dwsps.errors.SettingError` (a
        :class:`~dwsps.errors.ConfigError`: one line naming the setting) for an
        unusable configuration or a port that cannot be bound (the OSError as
        its cause); either way nothing is left running and :meth:`close` has
        nothing to do.
        """
        if self._started:
            raise RuntimeError("the server is already started")
        check_startup(self.config)
        loop = asyncio.get_running_loop()
        self._started = True
        try:
            self._links = self._make_links()
            # Before the listener: subscriptions made while links start are seen by them.
            writer = Writer(loop, self.hub.router, budget=self.config.memory_budget)
            self.hub.attach(writer, self._links)
            self._server = await self._listen(loop)
            if self.config.heartbeat_interval > 0:
                self._heartbeat = loop.create_task(self._heartbeat_loop())
            if self.config.idle_sweep > 0:
                self._sweep = loop.create_task(self._sweep_loop())
            if self._worker_metrics is not None:
                self._metrics_task = loop.create_task(self._worker_metrics.run())
            for link in self._links:
                await link.start()
        except BaseException:
            await self.close()
            raise
        log.info("dwsps server %s listening on %s (%s)", self.server_id, self.url, describe_build())

    async def _listen(self, loop: asyncio.AbstractEventLoop) -> asyncio.base_events.Server:
        config = self.config
        settings = ListenerSettings(
            max_frame_size=config.max_frame_size,
            handshake_timeout=config.handshake_timeout,
            max_body=config.max_frame_size,
            # Not a Logger: given a Logger, picows makes a child Logger per
            # connection (~0.5 KB each); this one is shared, and it counts.
            logger=PicowsLog(_WS_LOG, self.hub.framing_error),
        )
        tls = self._tls_context()  # checked by check_startup
        try:
            return await loop.create_server(
                lambda: FrontDoor(self, settings),
                config.host,
                config.port,
                ssl=tls,
                backlog=config.listen_backlog,
                # Workers share the port; the kernel spreads connections over them.
                reuse_port=self.worker is not None or None,
            )
        except OSError as exc:
            where = f"{config.host or '*'}:{config.port}"
            raise setting_error(
                _listen_setting(exc), f"cannot listen on {where}: {_listen_error(exc)}"
            ) from exc

    async def close(self) -> None:
        """Stop accepting, close every client with 1001 and wait briefly for them to go.

        Undoes whatever :meth:`start` got to; a no-op when not started.
        """
        if not self._started:
            return
        self._started = False
        server, self._server = self._server, None
        if server is not None:
            server.close()
        links, self._links = self._links, []
        peering, self._peering = self._peering, None
        if peering is not None:
            # First, while the rest still runs: peers get a chance to confirm.
            await peering.close()
        for task in (self._heartbeat, self._sweep, self._metrics_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._heartbeat = self._sweep = self._metrics_task = None
        waits = [conn.wait_closed() for conn in list(self.connections.values()) if conn.go_away()]
        if waits:
            done = asyncio.gather(*waits, return_exceptions=True)
            try:
                await asyncio.wait_for(done, self.config.close_timeout)
            except TimeoutError:
                for conn in list(self.connections.values()):
                    conn.abort()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._backplane = None
        for link in links:
            if link is not peering:
                await link.close()

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
        if not self._started:
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

    # -- the embedding API ------------------------------------------------

    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Listen for a server event: subscribe(topic, client_id),
        unsubscribe(topic, client_id), publish(topic, client_id), connect(client_id),
        disconnect(client_id), recovery(topic, client_id, user, recovered, replayed),
        peer_up(url), peer_down(url), backplane_up(), backplane_down(reason).
        Usable as a decorator."""
        return self.events.on(event, handler)

    def off(self, event: str, handler: Callable[..., Any]) -> None:
        """Remove an event handler."""
        self.events.off(event, handler)

    def publish(self, topic: str, message: Any = None) -> int:
        """Publish from the embedding code, as an organic publish; return local deliveries."""
        validate(topic, subscription=False, limits=self.config.topic_limits)
        return self.hub.route(Publish(topic, message, self.clock.now()), None)

    def peer_status(self) -> list[dict[str, Any]]:
        """Per peer link: url, state, outbox depth and bytes, in_flight, and the
        sent / resent / confirmed / rejected / dropped / forgotten counters."""
        return self._peering.status() if self._peering is not None else []

    def user(self, client_id: str) -> str | None:
        """Who the client ``client_id`` authenticated as (the token's ``sub``), or None.

        For event handlers, whose arguments stay those of the original dwsps:
        ``server.on("connect", lambda cid: print(cid, server.user(cid)))``.
        Answers in every handler, ``disconnect`` included.
        """
        return self.hub.user(client_id)

    def has_subscribers(self, topic: str) -> bool:
        """Whether any local subscription matches ``topic``."""
        return self.hub.router.has_subscribers(topic)

    def subscription_topics(self) -> list[str]:
        """Every topic some local client is subscribed to."""
        return self.hub.router.topics()

    def add_http_route(self, path: str, handler: Handler) -> None:
        """Serve ``GET path`` (non-upgrade requests only) with ``handler()``'s HttpResponse."""
        self.http.add(path, handler)

    # -- listener, heartbeat, health --------------------------------------

    # -- the front door (dwsps.listener.Gate) ------------------------------

    def http_request(self, request: HttpRequest) -> Answer:
        """Answer a plain HTTP request."""
        return self.http.respond(request)

    def http_refusal(self, request: HttpRequest) -> HttpResponse | None:
        """What a plain HTTP request gets whatever its body (404, 405, 401), or None."""
        return self.http.refusal(request)

    def admit(self, request: HttpRequest) -> Admitted | Awaitable[Admitted]:
        """Decide on a WebSocket upgrade: Origin, connection caps, peer token, authentication."""
        if not self._origins.allows(request.headers.get("Origin")):
            return self._refuse(403, "origin not allowed")
        hub = self.hub
        if hub.over_budget:
            return self._refuse(503, "server over its memory budget")
        refused = hub.admission.admit(request.remote)
        if refused is not None:
            return self._refuse(
                refused,
                "server at its connection limit"
                if refused == 503
                else "too many connections from your address",
            )
        if self._peer_auth.enabled and self._peer_auth.accepts(
            request.headers.get("Authorization", ""), request.query
        ):
            return hub.new_connection(True, _PEER, request.remote)
        upgrade = UpgradeRequest(request.path, request.query, request.headers, request.remote)
        auth = hub.authenticator
        if auth.hook is not None:
            return self._admit_async(auth, upgrade)
        try:
            identity = auth.authenticate(upgrade)
        except AuthError as exc:
            hub.admission.release(request.remote)
            return self._refuse(401, exc.reason)
        return hub.new_connection(False, identity, request.remote)

    def _refuse(self, status: int, reason: str) -> HttpResponse:
        # Counted, and logged at debug only: refusals are what a flood of bad
        # clients produces, so they must not flood the log.
        self.hub.stats.upgrades_refused[str(status)] += 1
        log.debug("upgrade refused: %d %s", status, reason)
        return text_response(status, reason)

    async def _admit_async(self, auth: Authenticator, upgrade: UpgradeRequest) -> Admitted:
        # Bounded like the rest of the handshake: a hung hook must not hold the slot.
        try:
            identity = await asyncio.wait_for(
                auth.authenticate_async(upgrade), self.config.handshake_timeout
            )
        except AuthError as exc:
            self.hub.admission.release(upgrade.remote)
            return self._refuse(401, exc.reason)
        except TimeoutError:
            self.hub.admission.release(upgrade.remote)
            log.warning("the authenticate hook did not answer within the handshake timeout")
            return self._refuse(503, "authentication timed out")
        except BaseException:
            self.hub.admission.release(upgrade.remote)
            raise
        if not isinstance(identity, Identity):
            self.hub.admission.release(upgrade.remote)
            raise TypeError(f"the authenticate hook returned {identity!r}, not an Identity")
        return self.hub.new_connection(False, identity, upgrade.remote)

    def abandon(self, listener: WSListener) -> None:
        """An admitted upgrade never opened (the client left, or its headers were bad)."""
        assert isinstance(listener, Connection)
        self.hub.abandon(listener)

    def opened(self, listener: WSListener) -> bool:
        """Whether the handshake of ``listener`` completed."""
        return isinstance(listener, Connection) and listener.opened

    async def _sweep_loop(self) -> None:
        interval = self.config.idle_sweep
        while True:
            await asyncio.sleep(interval)
            self.hub.idle_sweep()

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            self.hub.heartbeat()

    def _health(self, request: HttpRequest) -> HttpResponse:
        healthy, body = self.hub.health()
        # Readable from any origin: a console served elsewhere (or another server's
        # /console) shows it. It reveals nothing a plain HTTP client cannot already read.
        return HttpResponse(200 if healthy else 503, orjson.dumps(body), headers=_HEALTH_HEADERS)

    def _ready(self, request: HttpRequest) -> HttpResponse:
        healthy, _ = self.hub.health()
        status = "ready" if healthy else "degraded"
        return json_response({"status": status}, 200 if healthy else 503)


def _live(request: HttpRequest) -> HttpResponse:
    return json_response({"status": "live"})


_HEALTH_HEADERS = {"Access-Control-Allow-Origin": "*"}

_PEER = Identity("peer", Permissions.EVERYTHING)
"""The identity of a connection that presented a peer token."""


def _authenticator(config: ServerConfig, hook: Authenticate | None) -> Authenticator:
    """The server's authenticator from its settings (reads the key files)."""
    verifier = jwt_verifier(config)
    if verifier is None and config.allow_anonymous and hook is None:
        log.warning("allow_anonymous has no effect without a JWT key: everyone may do everything")
    return Authenticator(
        verifier,
        allow_anonymous=config.allow_anonymous,
        anonymous_permissions=Permissions(
            permissions_setting(config, "anonymous_subscribe"),
            permissions_setting(config, "anonymous_publish"),
        ),
        hook=hook,
    )


def _listen_error(exc: OSError) -> str:
    """``address already in use``, not asyncio's whole sentence around it."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return str(exc.strerror or exc)  # getaddrinfo errors have negative numbers


def _listen_setting(exc: OSError) -> str:
    """Which setting a failed bind is about: the host (unknown, not ours) or the port."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return "host"
    return "port"
