"""One client connection on the server: frame assembly and the only write path.

picows parses frames and handles the handshake, control-frame rules and frame
size (close 1009). A :class:`Connection` adds what picows leaves to the
application: RSV-bit checks (no extensions, so 1002), pongs, reassembly of
fragmented messages, UTF-8 checks (close 1007, in the hub), ignoring input
once the connection has failed, and the close handshake. Complete messages go
to its :class:`ConnectionHost` (the hub), which never writes to the socket
itself.

Every byte the server sends a client goes through :meth:`Connection.send`,
control frames included (picows writes them through the connection's
:class:`~dwsps.stream.Stream`): frames are queued and leave in one write per
connection at the end of the loop turn, scheduled by the server's one
:class:`~dwsps.writer.Writer`, which also queues the fan-out batches the
router plans.

The outbound bound holds at enqueue time, at no cost per delivery: the writer
counts the bytes queued in the current loop turn (once per frame, whatever
the number of subscribers) and flushes early past ``flush_at``, so a turn
never holds much; and once the kernel stops taking a connection's data (the
transport asks it to pause writing) further data waits in the connection's
*backlog*, counted against ``max_outbound_buffer`` with what the transport
holds. Past that the connection is a slow consumer: its backlog is dropped so
that the 1013 close frame goes out next. Backlogs, partial fragmented
messages and the transports' buffers of paused connections add up to
:attr:`Writer.buffered`, the server's memory budget's measure.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
)

from dwsps.auth import UNAUTHENTICATED, Identity
from dwsps.errors import CloseCode
from dwsps.limits import RequestLimiter
from dwsps.permissions import PermissionChecker, checker_for
from dwsps.stream import Stream
from dwsps.writer import Writer

log = logging.getLogger("dwsps.server")

# Close codes by number, as picows wants them.
_WS_CLOSE: dict[int, WSCloseCode] = {c.value: c for c in WSCloseCode}
_RENEW_AFTER = 64 * 1024
"""A frame at least this large makes the stream renew picows (and its read buffer) after it."""
_PING = b"\x89\x00"
"""An empty ping, as the server sends it (FIN + ping, unmasked, no payload)."""

# RFC 6455 7.4: codes a peer may send (1004-1006 and 1015 are never sent; 1016-2999
# are unassigned; 3000-4999 are for libraries and applications).
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)))


class ConnectionHost(Protocol):
    """What a connection tells the server (the hub) about its life and its input."""

    def connection_opened(self, conn: Connection) -> None:
        """The WebSocket handshake completed."""

    def connection_closed(self, conn: Connection) -> None:
        """The connection is gone (after any close handshake)."""

    def text_received(self, conn: Connection, data: bytes) -> None:
        """A complete text message arrived (not yet checked for UTF-8)."""

    def binary_received(self, conn: Connection) -> None:
        """A complete binary message arrived (its content is not kept)."""

    def slow_consumer(self, conn: Connection) -> None:
        """The connection is being closed for falling behind (1013)."""

    def framing_error(self) -> None:
        """A connection is being failed for breaking RFC 6455 framing (1002)."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Bounds every connection of a server enforces."""

    max_message_size: int
    """Largest incoming message (fragments added up); more closes with 1009."""
    max_outbound_buffer: int
    """Unsent bytes past which a connection is closed as a slow consumer (1013)."""
    fragment_timeout: float = 10.0
    """Seconds a fragmented message may take from its first frame to its last (1008)."""


class Connection(WSListener):
    """Server-side state of one WebSocket client.

    Kept small on purpose (``__slots__``, lazily created containers): idle
    connections are the bulk of a busy server's memory. ``identity``,
    ``permissions``, ``limiter``, ``expiry``, ``invalid_streak`` and
    ``is_peer`` are the hub's per-connection state, kept here to save a lookup
    per request.
    """

    __slots__ = (
        "awaiting_pong",
        "backlog",
        "backlog_bytes",
        "client_id",
        "closing",
        "expiry",
        "frag",
        "frag_binary",
        "frag_timer",
        "grown",
        "held",
        "host",
        "identity",
        "invalid_streak",
        "is_peer",
        "limiter",
        "limits",
        "pending",
        "permissions",
        "raw",
        "remote",
        "replies",
        "stream",
        "transport",
        "writer",
    )

    def __init__(
        self,
        host: ConnectionHost,
        writer: Writer[Connection],
        limits: ConnectionLimits,
        client_id: str,
        is_peer: bool,
        identity: Identity = UNAUTHENTICATED,
        remote: str = "",
        limiter: RequestLimiter | None = None,
    ) -> None:
        self.host = host
        self.writer = writer
        self.limits = limits
        self.client_id = client_id
        self.is_peer = is_peer
        self.identity = identity
        self.permissions: PermissionChecker = checker_for(identity.permissions)
        self.remote = remote
        self.limiter = limiter
        self.expiry: asyncio.TimerHandle | None = None
        self.transport: WSTransport | None = None
        self.stream: Stream | None = None
        self.raw: asyncio.Transport | None = None
        self.pending: list[bytes] | None = None
        self.backlog: list[bytes] | None = None
        """Data waiting while the transport is paused (None: write straight through)."""
        self.backlog_bytes = 0
        self.held = 0
        """This connection's share of :attr:`Writer.buffered` (backlog + paused transport)."""
        self.frag: bytearray | None = None
        self.frag_binary = False
        self.frag_timer: asyncio.TimerHandle | None = None
        self.awaiting_pong = False
        self.grown = False
        self.invalid_streak = 0
        self.closing = False
        self.replies: deque[Any] | None = None
        """The hub's replies waiting behind one it deferred (None: none deferred)."""

    def __repr__(self) -> str:
        return f"<Connection {self.client_id}>"

    @property
    def user(self) -> str | None:
        """Who the connection authenticated as (the token's ``sub``), if anyone."""
        return self.identity.user

    @property
    def queued_bytes(self) -> int:
        """Bytes queued for this client and not yet taken by the kernel."""
        pending = sum(len(chunk) for chunk in self.pending) if self.pending else 0
        raw = self.raw
        buffered = raw.get_write_buffer_size() if raw is not None else 0
        return pending + self.backlog_bytes + buffered

    @property
    def opened(self) -> bool:
        """Whether the WebSocket handshake completed."""
        return self.transport is not None or (self.stream is not None and self.stream.asleep)

    def doze(self) -> None:
        """Idle sweep: let picows go while the client is silent (it comes back with input)."""
        stream = self.stream
        if (
            stream is not None
            and self.transport is not None
            and self.frag is None
            and not self.closing
            and stream.doze()
        ):
            self.transport = None

    def pong_received(self) -> None:
        """The client answered the heartbeat (also while picows dozes)."""
        self.awaiting_pong = False

    def _ws(self) -> WSTransport | None:
        """picows' transport, woken first if the stream let it doze."""
        stream = self.stream
        if self.transport is None and stream is not None and stream.asleep:
            stream.wake()  # -> on_ws_connected
        return self.transport

    # -- picows callbacks -------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.transport is not None or (self.stream is not None and self.stream.renewing):
            # The stream renewed picows (a fresh read buffer, or woke from a doze): same connection.
            self.transport = transport
            _drop_headers(transport.request)
            _drop_headers(transport.response)
            return
        self.transport = transport
        stream = transport.underlying_transport
        if isinstance(stream, Stream):
            stream.attach(self)
            self.stream = stream
            self.raw = stream.transport
        else:  # handed a plain transport (not through the front door)
            self.raw = stream
        # picows keeps the upgrade request and response for the connection's
        # lifetime; their header dicts are ~0.6 KB that nothing reads after
        # the handshake (the listener factory has seen the request already).
        _drop_headers(transport.request)
        _drop_headers(transport.response)
        self.host.connection_opened(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self.pending = None
        self._drop_buffers()
        self.stream = None  # no cycle through the stream and picows outlives the connection
        self.host.connection_closed(self)

    def pause_writing(self) -> None:
        # The kernel takes no more for now: what comes next waits in the backlog.
        if self.backlog is None:
            self.backlog = []

    def resume_writing(self) -> None:
        backlog = self.backlog
        if backlog is None:
            return
        self.backlog = None
        self.backlog_bytes = 0
        raw = self.raw
        if backlog and raw is not None and not self.closing:
            raw.writelines(backlog)  # no copy per connection: the transport keeps the chunks
        if self.backlog is None:  # not paused again by that write
            self.writer.buffered -= self.held
            self.held = 0
        else:
            self._account()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if frame.payload_size >= _RENEW_AFTER:
            self.grown = True  # picows' read buffer grew to hold it
        if frame.last_in_buffer and not frame.tail_size:
            stream = self.stream
            if stream is not None:
                stream.quiet = True  # nothing is buffered after this frame
                if self.grown:
                    self.grown = False
                    stream.renew()
        if self.closing:
            # Failed or closing: finish the close handshake and act on nothing
            # else (RFC 6455 7.1.7).
            if msg_type is WSMsgType.CLOSE:
                self._on_close_frame(frame)
            return
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # No extension is negotiated, so reserved bits must be 0 (RFC 6455 5.2).
            self.fail(CloseCode.PROTOCOL_ERROR, "reserved bits set without an extension")
            return
        if msg_type is WSMsgType.TEXT and frame.fin and self.frag is None:
            self.host.text_received(self, frame.get_payload_as_bytes())
        elif msg_type is WSMsgType.PONG:
            self.pong_received()
        elif msg_type is WSMsgType.PING:
            # Answered here, not by picows, so that the RSV check above sees pings
            # too; the pong goes through the stream, so through send().
            transport.send_pong(frame.get_payload_as_bytes())
        elif msg_type is WSMsgType.CLOSE:
            self._on_close_frame(frame)
        else:
            self._on_fragment(frame)

    # -- inbound helpers --------------------------------------------------

    def _on_fragment(self, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        frag = self.frag
        if msg_type is WSMsgType.CONTINUATION:
            if frag is None:
                self.fail(CloseCode.PROTOCOL_ERROR, "continuation frame without a start")
                return
            size = frame.payload_size
            if len(frag) + size > self.limits.max_message_size:
                self.fail(CloseCode.MESSAGE_TOO_BIG, "fragmented message too big")
                return
            # Binary fragments are kept too, only to bound the message's size.
            frag += frame.get_payload_as_memoryview()
            self.writer.buffered += size
        elif msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            if frag is not None:
                self.fail(CloseCode.PROTOCOL_ERROR, "new message before the last one ended")
                return
            if frame.fin:  # a one-frame binary message
                self.host.binary_received(self)
                return
            writer = self.writer
            if writer.over_budget:
                self.fail(CloseCode.TRY_AGAIN_LATER, "server over its memory budget")
                return
            self.frag_binary = msg_type is WSMsgType.BINARY
            frag = self.frag = bytearray(frame.get_payload_as_bytes())
            writer.buffered += len(frag)
            self.frag_timer = writer.loop.call_later(
                self.limits.fragment_timeout, self._fragment_expired
            )
            return
        else:  # picows passes no other opcodes
            return
        if not frame.fin:
            return
        data = bytes(frag)
        binary = self.frag_binary
        self._drop_fragments()
        if binary:
            self.host.binary_received(self)
        else:
            self.host.text_received(self, data)

    def _fragment_expired(self) -> None:
        self.frag_timer = None
        timeout = self.limits.fragment_timeout
        self.fail(CloseCode.POLICY_VIOLATION, f"fragmented message not finished in {timeout:g}s")

    def _drop_fragments(self) -> None:
        frag = self.frag
        if frag is not None:
            self.frag = None
            self.writer.buffered -= len(frag)
        if self.frag_timer is not None:
            self.frag_timer.cancel()
            self.frag_timer = None

    def _on_close_frame(self, frame: WSFrame) -> None:
        transport = self.transport
        if transport is None:
            return
        if not self.closing:
            # The client closes: what is queued goes first, then the echo.
            self._write_out()
            if self.closing:  # it found a slow consumer
                return
            self.closing = True
            self._drop_buffers()
            if frame.payload_size == 0:
                transport.send_close(WSCloseCode.OK)
            elif frame.get_close_code().value in _VALID_CLOSE:
                transport.send_close(frame.get_close_code())
            else:
                self.host.framing_error()
                transport.send_close(WSCloseCode.PROTOCOL_ERROR, b"invalid close code")
        # The handshake is complete: the client sends nothing after its close frame.
        if self.stream is not None:
            self.stream.finish()
        else:
            transport.disconnect()

    # -- the write path ---------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue one pre-encoded frame; it goes out with the rest at the end of this turn."""
        if self.closing:
            return
        writer = self.writer
        batch = writer.planner.open_batch
        if batch is not None and self in batch.members:
            writer.release(self)  # deliveries planned before this go first
        pending = self.pending
        if pending is None:
            self.pending = [data]
            writer.mark_dirty(self)
        else:
            pending.append(data)
        turn = writer.turn + len(data)
        writer.turn = turn
        if turn > writer.flush_at:
            writer.flush_now()

    def flush(self) -> None:
        """Write everything queued in one call (or add it to the backlog while paused)."""
        # Inlined check (this runs once per connection per loop turn): at the end
        # of a turn the writer has closed the batch already.
        batch = self.writer.planner.open_batch
        if batch is not None and self in batch.members:
            self.writer.release(self)
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        raw = self.raw
        if raw is None or self.closing:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        backlog = self.backlog
        if backlog is None:
            raw.write(data)
            if self.backlog is not None:  # that write filled the transport: it paused
                self._account()
            return
        # Paused: the transport's buffer does not grow, only the backlog does.
        backlog.append(data)
        n = len(data)
        self.backlog_bytes += n
        held = self.held + n
        self.held = held
        writer = self.writer
        buffered = writer.buffered + n
        writer.buffered = buffered
        if held > self.limits.max_outbound_buffer or buffered > writer.budget:
            self._slow_consumer()

    def _account(self) -> None:
        """Measure what this paused connection holds; close it if that is too much."""
        raw = self.raw
        held = self.backlog_bytes + (raw.get_write_buffer_size() if raw is not None else 0)
        writer = self.writer
        writer.buffered += held - self.held
        self.held = held
        if held > self.limits.max_outbound_buffer or writer.over_budget:
            self._slow_consumer()

    def _slow_consumer(self) -> None:
        self.host.slow_consumer(self)
        # Debug only (counted in dwsps_slow_consumers): one line per connection would
        # let an attacker opening many connections flood the log.
        log.debug("closing slow consumer %s", self.client_id)
        self.fail(CloseCode.TRY_AGAIN_LATER, "slow consumer: outbound buffer over the limit")

    def _write_out(self) -> None:
        """Write what is queued and the backlog now, paused or not (ahead of a close frame)."""
        self.flush()
        backlog = self.backlog
        raw = self.raw
        if backlog and raw is not None and not self.closing:
            self.backlog = []
            self.backlog_bytes = 0
            raw.writelines(backlog)  # no copy per connection: the transport keeps the chunks

    def _drop_buffers(self) -> None:
        """Forget the backlog and partial input; give their bytes back to the budget."""
        self.backlog = None
        self.backlog_bytes = 0
        self.writer.buffered -= self.held
        self.held = 0
        self._drop_fragments()

    def fail(self, code: CloseCode, reason: str) -> None:
        """Send a close frame with ``code``, then close the connection gracefully.

        Replies already queued (e.g. the error for the request that broke a
        limit) go out before the close frame, in order; for a slow consumer
        (1013) they are dropped instead, so that the close frame is next.
        """
        transport = self._ws()
        if transport is None or self.closing:
            return
        if code is CloseCode.PROTOCOL_ERROR:
            self.host.framing_error()
        if code is CloseCode.TRY_AGAIN_LATER:
            self.pending = None
        else:
            self._write_out()
            if self.closing:  # the flush found a slow consumer
                return
        self.closing = True
        self._drop_buffers()
        transport.send_close(_WS_CLOSE[int(code)], reason.encode()[:120])
        # The stream half-closes and drains the input briefly (no reset).
        transport.disconnect()

    def protocol_failed(self, close_frame: bytes) -> None:
        """picows found a framing error and wrote ``close_frame`` (through the stream).

        picows still hands over the frame it parsed before the bad one, so the
        close frame is written once this read is done, after the replies.
        """
        self.writer.loop.call_soon(self._close_after_replies, close_frame)

    def _close_after_replies(self, close_frame: bytes) -> None:
        if self.closing:
            return
        self._write_out()
        if self.closing:
            return
        self.closing = True
        self._drop_buffers()
        if self.raw is not None:
            self.raw.write(close_frame)
        transport = self._ws()
        if transport is not None:
            transport.disconnect()

    def go_away(self) -> bool:
        """Server shutdown: flush, send 1001 and stop acting on input; False if already gone."""
        transport = self._ws()
        if transport is None:
            return False
        if not self.closing:
            self._write_out()
        if not self.closing:
            self.closing = True
            self._drop_buffers()
            transport.send_close(WSCloseCode.GOING_AWAY, b"server shutting down")
        return True

    async def wait_closed(self) -> None:
        """Wait until the connection is gone."""
        transport = self._ws()
        if transport is not None:
            await transport.wait_disconnected()

    def ping(self) -> bool:
        """Heartbeat tick: ping, or report (False) that the last ping went unanswered."""
        if self.awaiting_pong:
            return False
        if self.opened and not self.closing:
            self.awaiting_pong = True
            # The bytes picows' send_ping() writes (a server frame is not masked),
            # without waking a dozing picows for them.
            self.send(_PING)
        return True

    def abort(self) -> None:
        """Drop the connection without a close handshake."""
        self.closing = True
        self.pending = None
        if self.raw is not None:
            self.raw.abort()


# Read-only, so one instance can stand in for every connection's headers.
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _drop_headers(message: WSUpgradeRequest | WSUpgradeResponse | None) -> None:
    if message is not None:
        message.headers = _NO_HEADERS  # type: ignore[assignment]
