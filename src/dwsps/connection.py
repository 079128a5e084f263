"""One client connection on the server: frame assembly and the only write path.

picows parses frames and handles the handshake, control-frame rules and frame
size (close 1009). A :class:`Connection` adds what picows leaves to the
application: RSV-bit checks (no extensions, so 1002), pongs, reassembly of
fragmented messages, UTF-8 checks (close 1007, in the hub), ignoring input
once the connection has failed, and the close handshake. Complete messages go
to its :class:`ConnectionHost` (the hub), which never writes to the socket
itself.

Every byte the server sends a client goes through :meth:`Connection.send`:
frames are queued and leave in one write per connection at the end of the
loop turn (:class:`Writer`), where the slow-consumer decision is made. The
:class:`Writer` is the one scheduler all connections of a server share; it
also queues the fan-out batches the router plans (``dwsps.router``), and
closes the open batch before anything else is queued for one of its members,
so each connection sees its frames in order.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

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
from dwsps.router import Batch

log = logging.getLogger("dwsps.server")

# Close codes by number, as picows wants them.
_WS_CLOSE: dict[int, WSCloseCode] = {c.value: c for c in WSCloseCode}
_ABORT_AFTER_CLOSE = 1.0


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


class BatchPlanner(Protocol):
    """The part of the router the write path needs: closing open fan-out batches."""

    @property
    def open_batch(self) -> Batch[Connection] | None:
        """The batch being filled, if any (read only)."""

    def release(self, member: Connection) -> Batch[Connection] | None:
        """Close and return the open batch if ``member`` is in it."""

    def close_batch(self) -> Batch[Connection] | None:
        """Close and return the open batch."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Bounds every connection of a server enforces."""

    max_message_size: int
    """Largest incoming message (fragments added up); more closes with 1009."""
    max_outbound_buffer: int
    """Unsent bytes past which a connection is closed as a slow consumer (1013)."""


class Writer:
    """Schedules the writes of all connections: one write per connection per loop turn.

    Connections with something queued are *dirty*; at the end of the loop turn
    (``call_soon``) the open fan-out batch is closed and queued, then every
    dirty connection flushes once.
    """

    __slots__ = ("_dirty", "_scheduled", "loop", "planner")

    def __init__(self, loop: asyncio.AbstractEventLoop, planner: BatchPlanner) -> None:
        self.loop = loop
        self.planner = planner
        self._dirty: list[Connection] = []
        self._scheduled = False

    def queue_batch(self, batch: Batch[Connection]) -> None:
        """Queue a closed batch's frames, joined once, on each of its members."""
        data = batch.data()
        dirty = self._dirty
        for conn in batch.members:
            # Connection.send inlined, without the batch check: this is the batch.
            pending = conn.pending
            if pending is None:
                if conn.closing:
                    continue
                conn.pending = [data]
                dirty.append(conn)
            else:
                pending.append(data)

    def mark_dirty(self, conn: Connection) -> None:
        """``conn`` has data queued: flush it at the end of this loop turn."""
        self._dirty.append(conn)
        self.schedule()

    def schedule(self) -> None:
        """Make sure a flush runs at the end of this loop turn."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def release(self, conn: Connection) -> None:
        """Queue the open batch first if ``conn`` is in it (its frames come before)."""
        batch = self.planner.release(conn)
        if batch is not None:
            self.queue_batch(batch)

    def _flush(self) -> None:
        self._scheduled = False
        batch = self.planner.close_batch()
        if batch is not None:
            self.queue_batch(batch)
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()


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
        "client_id",
        "closing",
        "expiry",
        "frag",
        "frag_binary",
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
        "transport",
        "writer",
    )

    def __init__(
        self,
        host: ConnectionHost,
        writer: Writer,
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
        self.raw: asyncio.Transport | None = None
        self.pending: list[bytes] | None = None
        self.frag: bytearray | None = None
        self.frag_binary = False
        self.awaiting_pong = False
        self.invalid_streak = 0
        self.closing = False

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
        return pending + (raw.get_write_buffer_size() if raw is not None else 0)

    @property
    def opened(self) -> bool:
        """Whether the WebSocket handshake completed."""
        return self.transport is not None

    # -- picows callbacks -------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.raw = transport.underlying_transport
        # picows keeps the upgrade request and response for the connection's
        # lifetime; their header dicts are ~0.6 KB that nothing reads after
        # the handshake (the listener factory has seen the request already).
        _drop_headers(transport.request)
        _drop_headers(transport.response)
        self.host.connection_opened(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self.pending = None
        self.host.connection_closed(self)

    def pause_writing(self) -> None:
        # The slow-consumer check reads the buffer size at every flush.
        pass

    def resume_writing(self) -> None:
        pass

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if self.closing or transport.is_close_frame_sent:
            # Failed or closing (by us or by picows, e.g. after 1009): finish the
            # close handshake and act on nothing else (RFC 6455 7.1.7).
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
            self.awaiting_pong = False
        elif msg_type is WSMsgType.PING:
            # Answered here, not by picows, so that the RSV check above sees pings too.
            transport.send_pong(frame.get_payload_as_bytes())
        elif msg_type is WSMsgType.CLOSE:
            self._on_close_frame(frame)
        else:
            self._on_fragment(frame)

    # -- inbound helpers --------------------------------------------------

    def _on_fragment(self, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.CONTINUATION:
            if self.frag is None:
                self.fail(CloseCode.PROTOCOL_ERROR, "continuation frame without a start")
                return
            if len(self.frag) + frame.payload_size > self.limits.max_message_size:
                self.fail(CloseCode.MESSAGE_TOO_BIG, "fragmented message too big")
                return
            # Binary fragments are kept too, only to bound the message's size.
            self.frag += frame.get_payload_as_memoryview()
        elif msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            if self.frag is not None:
                self.fail(CloseCode.PROTOCOL_ERROR, "new message before the last one ended")
                return
            self.frag_binary = msg_type is WSMsgType.BINARY
            self.frag = bytearray(frame.get_payload_as_bytes())
        else:  # picows passes no other opcodes
            return
        if not frame.fin:
            return
        data = bytes(self.frag)
        binary = self.frag_binary
        self.frag = None
        if binary:
            self.host.binary_received(self)
        else:
            self.host.text_received(self, data)

    def _on_close_frame(self, frame: WSFrame) -> None:
        transport = self.transport
        if transport is None:
            return
        self.flush()
        self.closing = True
        if not transport.is_close_frame_sent:
            code = frame.get_close_code()
            transport.send_close(code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK)
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

    def flush(self) -> None:
        """Write everything queued in one call; close the connection if it is too far behind."""
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
        raw.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if raw.get_write_buffer_size() > self.limits.max_outbound_buffer:
            self.host.slow_consumer(self)
            log.warning("closing slow consumer %s", self.client_id)
            self.fail(CloseCode.TRY_AGAIN_LATER, "slow consumer: outbound buffer over the limit")

    def fail(self, code: CloseCode, reason: str) -> None:
        """Send a close frame with ``code`` and drop the connection soon after."""
        transport = self.transport
        if transport is None or self.closing:
            return
        if code is not CloseCode.TRY_AGAIN_LATER:
            # Replies already queued (e.g. the error for the request that broke
            # the limit) go out before the close frame, in order.
            self.flush()
            if self.closing:  # the flush found a slow consumer
                return
        self.closing = True
        self.pending = None
        transport.send_close(_WS_CLOSE[int(code)], reason.encode()[:120])
        # The close frame may sit behind a full buffer; do not wait on the peer.
        raw = self.raw
        if raw is not None:
            self.writer.loop.call_later(_ABORT_AFTER_CLOSE, raw.abort)
        transport.disconnect()

    def go_away(self) -> bool:
        """Server shutdown: flush, send 1001 and stop acting on input; False if already gone."""
        transport = self.transport
        if transport is None:
            return False
        self.flush()
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode.GOING_AWAY, b"server shutting down")
        self.closing = True
        return True

    async def wait_closed(self) -> None:
        """Wait until the connection is gone."""
        if self.transport is not None:
            await self.transport.wait_disconnected()

    def ping(self) -> bool:
        """Heartbeat tick: ping, or report (False) that the last ping went unanswered."""
        if self.awaiting_pong:
            return False
        if self.transport is not None and not self.closing:
            self.awaiting_pong = True
            self.transport.send_ping()
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
