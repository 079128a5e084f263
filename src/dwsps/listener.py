"""The server's port: every new TCP connection starts here.

A :class:`FrontDoor` reads the connection's first HTTP request (h11 parses
it, bounded in size and time) and then does one of two things:

* a plain HTTP request (any method, with a body up to a limit) is answered by
  the :class:`Gate`'s routes and the connection is closed, lingering as a
  WebSocket's does (:func:`~dwsps.stream.half_close`), so that an answer to a
  client still sending (431, 413, a refused upgrade) is not lost to a reset.
  A body over the limit gets 413 only if the request would not be refused
  anyway (404, 405, 401: :meth:`Gate.http_refusal`). An answer may be
  *deferred* (an awaitable: a publish waiting for Redis's offset); it is sent
  when ready, what the client sends meanwhile is drained;
* a WebSocket upgrade is *admitted* by the gate first (Origin, connection
  caps, authentication — possibly awaiting an embedding application's hook)
  and, if it may proceed, the socket is handed to a picows protocol together
  with the bytes read so far, through a :class:`~dwsps.stream.Stream` (fair
  reads, every write picows makes on the connection's write path, a
  lingering close). The fast path pays nothing more for the front door.

An upgrade must be a WebSocket opening handshake as RFC 6455 4.1 has it:
HTTP/1.1 with a non-empty ``Host`` header, or it gets 400.

:class:`PicowsLog` is the logger picows gets: a client's framing error is
the client's fault, not the server's, so it is counted and logged at debug
level instead of flooding the log at ERROR.

A refused upgrade gets its HTTP status and a one-line plain-text reason; the
WebSocket never opens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, Protocol, TypeVar, cast

import h11
from multidict import CIMultiDict, CIMultiDictProxy
from picows import WSAutoPingStrategy, WSListener

# Not in picows' public stubs, but the class ws_create_server instantiates: the
# hand-over builds the same protocol for a socket whose request we already read.
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from dwsps.http import Answer, HttpRequest, HttpResponse, text_response
from dwsps.stream import DRAIN_BYTES, ReadBuffer, Stream, half_close

log = logging.getLogger("dwsps.server")
_T = TypeVar("_T")

Admitted = WSListener | HttpResponse
"""What admission decides: the connection's listener, or the HTTP refusal to send."""


class Gate(Protocol):
    """What the front door asks of the server."""

    def http_request(self, request: HttpRequest) -> Answer:
        """Answer a plain HTTP request, now or later (an awaitable)."""

    def http_refusal(self, request: HttpRequest) -> HttpResponse | None:
        """What ``request`` (its head) gets whatever its body, or None (it may get 413)."""

    def admit(self, request: HttpRequest) -> Admitted | Awaitable[Admitted]:
        """Decide on a WebSocket upgrade (may be awaitable: an embedding hook)."""

    def abandon(self, listener: WSListener) -> None:
        """An admitted upgrade never became a connection: undo what admission counted."""

    def opened(self, listener: WSListener) -> bool:
        """Whether picows completed the handshake for ``listener``."""


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """Bounds of the front door and the picows protocol it hands over to."""

    max_frame_size: int
    handshake_timeout: float
    max_body: int
    """Largest plain-HTTP request body (413 beyond)."""
    max_head: int = 16 * 1024
    """Largest request line plus headers (431 beyond)."""
    logger: Any = None
    reader: ReadBuffer = field(default_factory=ReadBuffer)
    """The read buffer every connection of the server shares."""


class PicowsLog:
    """The logger picows writes to: client framing errors at debug level, and counted.

    A logger-like object rather than a :class:`logging.Logger`, so picows
    does not make a child logger per connection.
    """

    __slots__ = ("_client_fault", "_logger")

    _CLIENT_FAULTS = ("WS parser error",)

    def __init__(self, logger: logging.Logger, client_fault: Callable[[], None]) -> None:
        self._logger = logger
        self._client_fault = client_fault

    def isEnabledFor(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR and msg.startswith(self._CLIENT_FAULTS):
            self._client_fault()
            level = logging.DEBUG
        if self._logger.isEnabledFor(level):
            self._logger.log(level, msg, *args, **kwargs)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.WARNING, msg, *args, **kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.ERROR, msg, *args, **kwargs)

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self.log(logging.ERROR, msg, *args, **kwargs)


class _Released(asyncio.Protocol):
    """What a handed-over transport's previous-protocol slot points to (see _hand_over)."""

    def data_received(self, data: bytes) -> None:  # never called: picows reads now
        pass


_RELEASED: Final = _Released()


class FrontDoor(asyncio.Protocol):
    """One accepted TCP connection until its first request is dealt with."""

    def __init__(self, gate: Gate, settings: ListenerSettings) -> None:
        self._gate = gate
        self._settings = settings
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_head)
        self._raw = bytearray()
        self._transport: asyncio.Transport | None = None
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._drained = 0
        self._done = False
        self._lost = False
        self._deferred: asyncio.Future[HttpResponse] | None = None
        self._eof = False

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are.
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._settings.handshake_timeout, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timer()
        if self._linger is not None:
            self._linger.cancel()

    def data_received(self, data: bytes) -> None:
        if self._done:
            # Answered: what the client still sends is read and dropped (bounded).
            self._drained += len(data)
            if self._drained > DRAIN_BYTES and self._transport is not None:
                self._transport.abort()
            return
        if self._request is None:
            # Kept until a handover: picows reads the upgrade request again.
            self._raw += data
        try:
            self._h11.receive_data(data)
            self._advance()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            reason = "request header too large" if status == 431 else "malformed HTTP request"
            self._answer(text_response(status, reason))

    def eof_received(self) -> bool | None:
        if self._deferred is not None:
            self._eof = True
            return True  # still open for the deferred answer
        return False  # close the transport (lingering after an answer, or not)

    # -- reading the request ----------------------------------------------

    def _advance(self) -> None:
        while not self._done:
            event = self._h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if event is h11.PAUSED and self._request is not None:
                    self._upgrade(self._request)
                return
            if isinstance(event, h11.Request):
                if _is_upgrade(event):
                    self._upgrade(event)
                    return
                self._request = event
                self._raw.clear()
                length = _header(event, b"content-length")
                if length is not None and (
                    not length.isdigit() or int(length) > self._settings.max_body
                ):
                    self._too_large(event)
                    return
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._settings.max_body:
                    assert self._request is not None
                    self._too_large(self._request)
                    return
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                answer = self._gate.http_request(
                    self._http_request(self._request, bytes(self._body))
                )
                if isinstance(answer, HttpResponse):
                    self._answer(answer)
                else:
                    self._defer(answer)
                return
            else:  # ConnectionClosed
                self._close()
                return

    def _too_large(self, event: h11.Request) -> None:
        refused = self._gate.http_refusal(self._http_request(event, b""))
        self._answer(refused or text_response(413, "request body too large"))

    def _defer(self, answer: Awaitable[HttpResponse]) -> None:
        self._done = True  # the request is read: what else arrives is drained
        self._cancel_timer()  # what the answer waits for has its own bound
        self._deferred = asyncio.ensure_future(answer)
        self._deferred.add_done_callback(self._deferred_done)

    def _deferred_done(self, task: asyncio.Future[HttpResponse]) -> None:
        self._deferred = None
        self._answer(_settled(task, "answering an HTTP request"))

    def _http_request(self, event: h11.Request, body: bytes) -> HttpRequest:
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers
        )
        return HttpRequest(
            event.method.decode("ascii", "replace"),
            path,
            query,
            CIMultiDictProxy(headers),
            body,
            self._remote(),
        )

    def _remote(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    # -- upgrades ---------------------------------------------------------

    def _upgrade(self, event: h11.Request) -> None:
        if event.http_version != b"1.1" or not _header(event, b"host"):
            # RFC 6455 4.1 (h11 lets an empty Host through, and HTTP/1.0 without one).
            self._answer(text_response(400, "a WebSocket upgrade needs HTTP/1.1 and a Host header"))
            return
        self._done = True
        transport = self._transport
        assert transport is not None
        transport.pause_reading()
        request = self._http_request(event, b"")
        decision = self._gate.admit(request)
        if isinstance(decision, WSListener | HttpResponse):
            self._decided(decision)
        else:
            task = asyncio.ensure_future(decision)
            task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Future[Admitted]) -> None:
        self._decided(_settled(task, "admitting an upgrade"))

    def _decided(self, decision: Admitted) -> None:
        if isinstance(decision, HttpResponse):
            self._answer(decision, upgrade=True)
            return
        if self._lost:
            self._gate.abandon(decision)
            return
        self._cancel_timer()
        self._hand_over(decision)
        if not self._gate.opened(decision):
            self._gate.abandon(decision)

    def _hand_over(self, listener: WSListener) -> None:
        transport = self._transport
        assert transport is not None
        s = self._settings
        # What the stream calls for a fresh picows (renewal, waking): a partial is about
        # 140 bytes smaller per connection than a closure.
        picows = functools.partial(_picows, s, listener)
        proto = picows()
        stream = Stream(transport, proto, s.reader, asyncio.get_running_loop(), picows)
        # uvloop keeps the previous protocol's data_received when the new one is
        # buffered, which would keep this FrontDoor and its h11 parser (~1.5 KB)
        # alive as long as the connection: point it at a shared stub first.
        transport.set_protocol(_RELEASED)
        transport.set_protocol(stream)
        proto.connection_made(stream)
        data = memoryview(bytes(self._raw))
        self._raw = bytearray()
        stream.feed(data)
        if not transport.is_closing():
            transport.resume_reading()

    # -- answers ----------------------------------------------------------

    def _answer(self, response: HttpResponse, upgrade: bool = False) -> None:
        self._done = True
        self._cancel_timer()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        method = b"GET" if upgrade or self._request is None else self._request.method
        out = _encode_response(response, with_body=method != b"HEAD")
        transport.write(out)
        self._raw = bytearray()
        self._body = bytearray()
        if self._eof:  # the client is done sending: nothing to linger for
            transport.close()
            return
        # Not close(): with the client still sending (a huge head, a body not
        # read) the kernel would reset, and the answer would be lost.
        self._linger = half_close(transport, asyncio.get_running_loop())

    def _close(self) -> None:
        self._done = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()

    def _timed_out(self) -> None:
        self._timer = None
        if not self._done:
            self._answer(text_response(408, "request timeout"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _settled(task: asyncio.Future[_T], doing: str) -> _T | HttpResponse:
    """A finished task's result, or the answer when it was cancelled (503) or raised (500)."""
    if task.cancelled():
        return text_response(503, "server shutting down")
    exc = task.exception()
    if exc is not None:
        log.error("%s failed", doing, exc_info=exc)
        return text_response(500, "internal error")
    return task.result()


def _picows(s: ListenerSettings, listener: WSListener) -> Any:
    """A server-side picows protocol whose handshake hands over to ``listener``."""
    return WSProtocol(
        None,  # host+port (client side only)
        None,  # path (client side only)
        False,  # is_client_side
        lambda _request: listener,
        s.logger,
        True,  # disconnect_on_exception
        s.handshake_timeout,
        False,  # enable_auto_ping: the server's own heartbeat pings
        20.0,
        20.0,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        False,  # enable_auto_pong: Connection answers pings after its RSV check
        s.max_frame_size,
        None,  # extra headers
        2048,  # read_buffer_init_size: idle connections are most of the memory
    )


def _encode_response(response: HttpResponse, with_body: bool) -> bytes:
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [
        f"HTTP/1.1 {response.status} {phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers.items()),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + response.body if with_body else head


def _header(event: h11.Request, name: bytes) -> str | None:
    for key, value in event.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _is_upgrade(event: h11.Request) -> bool:
    upgrade = _header(event, b"upgrade")
    return upgrade is not None and upgrade.lower() == "websocket"
