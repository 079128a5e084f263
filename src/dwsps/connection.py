"""One client connection on the server: frame assembly and the single write path.

picows parses frames and handles the handshake, control-frame rules and frame
size (close 1009). This module adds what picows leaves to the application:
RSV-bit checks (no extensions, so 1002), pongs, reassembly of fragmented
messages, UTF-8 checks (close 1007), ignoring input once the connection has
failed, and the close handshake; and it owns the connection's only outbound
path, where writes are coalesced per event-loop turn and the slow-consumer
decision is made.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

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

from dwsps.errors import CloseCode

if TYPE_CHECKING:
    import asyncio

    from dwsps.server import Server

log = logging.getLogger("dwsps.server")

# Close codes by number, as picows wants them.
_WS_CLOSE: dict[int, WSCloseCode] = {c.value: c for c in WSCloseCode}
_ABORT_AFTER_CLOSE = 1.0


class Connection(WSListener):
    """Server-side state of one WebSocket client.

    Kept small on purpose (``__slots__``, lazily created containers): idle
    connections are the bulk of a busy server's memory.
    """

    __slots__ = (
        "awaiting_pong",
        "client_id",
        "closing",
        "frag",
        "frag_binary",
        "invalid_streak",
        "is_peer",
        "pending",
        "raw",
        "server",
        "subscriptions",
        "transport",
    )

    def __init__(self, server: Server, client_id: str, is_peer: bool) -> None:
        self.server = server
        self.client_id = client_id
        self.is_peer = is_peer
        self.transport: WSTransport | None = None
        self.raw: asyncio.Transport | None = None
        self.subscriptions: set[str] | None = None
        self.pending: list[bytes] | None = None
        self.frag: bytearray | None = None
        self.frag_binary = False
        self.awaiting_pong = False
        self.invalid_streak = 0
        self.closing = False

    def __repr__(self) -> str:
        return f"<Connection {self.client_id}>"

    # -- picows callbacks -------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.raw = transport.underlying_transport
        # picows keeps the upgrade request and response for the connection's
        # lifetime; their header dicts are ~0.6 KB that nothing reads after
        # the handshake (the listener factory has seen the request already).
        _drop_headers(transport.request)
        _drop_headers(transport.response)
        self.server._connected(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self.pending = None
        self.server._disconnected(self)

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
            self.server._request(self, frame.get_payload_as_bytes())
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
            if len(self.frag) + frame.payload_size > self.server.config.max_frame_size:
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
            self.server._binary(self)
        else:
            self.server._request(self, data)

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
        batch = self.server._batch
        if batch is not None and self in batch.members:
            self.server._close_batch()  # deliveries queued before this go first
        pending = self.pending
        if pending is None:
            self.pending = [data]
            self.server._dirty.append(self)
            self.server._schedule_flush()
        else:
            pending.append(data)

    def flush(self) -> None:
        """Write everything queued in one call; close the connection if it is too far behind."""
        batch = self.server._batch
        if batch is not None and self in batch.members:
            self.server._close_batch()
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        raw = self.raw
        if raw is None or self.closing:
            return
        raw.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if raw.get_write_buffer_size() > self.server.config.max_outbound_buffer:
            self.server.stats.slow_consumers += 1
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
            self.server._loop.call_later(_ABORT_AFTER_CLOSE, raw.abort)
        transport.disconnect()

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
