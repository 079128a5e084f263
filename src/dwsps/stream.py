"""The TCP stream under one WebSocket connection: fair reads, ordered writes, a closing that lands.

After the front door hands a socket over (:mod:`dwsps.listener`), a
:class:`Stream` sits between the event loop's transport and picows, on both
sides:

Reads
    The loop reads into one buffer per server (:class:`ReadBuffer`; its size
    bounds a read) and the stream feeds picows from it, never more than half
    of picows' free space at a time, so picows' own buffer grows only for a
    frame that needs the room, not for a client that sends fast. After
    :attr:`ReadBuffer.budget` bytes the stream pauses reading until the next
    loop turn: one client's flood cannot hold the loop, every other
    connection gets its turn in between (fairness).

Writes
    picows sees the stream as its transport. What picows writes itself
    (pongs, pings, close frames, also the close frame of a framing error it
    found) goes to the owner's write path (:meth:`StreamOwner.send`), behind
    the replies already queued and counted toward the connection's outbound
    bound: no control frame jumps the queue or escapes the bound.

Renewal
    picows' read buffer grows to hold the largest frame and never shrinks.
    When a large frame has been taken and picows holds nothing after it
    (:meth:`renew`, the connection asks), the stream swaps in a fresh picows
    protocol for the same connection: a canned opening handshake puts it
    straight into the open state (its 101 reply goes nowhere), and the old
    protocol goes, with its buffer.

Dozing
    An idle connection does not need picows (its read buffer, its write
    buffer, its transport: about a third of what a connection costs). When
    nothing was read for a whole idle sweep and picows holds no partial
    frame (:meth:`doze`, the hub's sweep asks), the stream lets picows go;
    what the server sends never goes through picows anyway. A lone pong (the
    heartbeat's answer) is taken without it; any other input wakes a fresh
    picows first, the way a renewal does.

Closing
    ``close()`` does not drop the socket: with unread input the kernel would
    answer with a reset, and the client would lose the replies and the close
    frame still in flight. The stream half-closes instead (FIN after the
    queued data) and keeps reading: into picows while picows can still parse
    (at most :data:`DRAIN_PARSE` bytes), so the client's close reply is
    seen; into nowhere after that or after a framing error. It closes when
    the client's close frame or EOF arrives, and drops the socket after
    :data:`LINGER` seconds or :data:`DRAIN_BYTES` bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, Protocol

READ_SIZE = 64 * 1024
"""Bytes one read takes from the socket (the shared buffer's size)."""
READ_BUDGET = 128 * 1024
"""Bytes read for one connection before it waits for the next loop turn."""
DRAIN_PARSE = 1024 * 1024
"""Input picows still parses while closing (to see the client's close frame), at most."""
DRAIN_BYTES = 64 * 1024 * 1024
"""Input read (and thrown away) while closing, at most, before the socket is dropped."""
LINGER = 3.0
"""Seconds a closing connection waits for the client to finish, at most."""


def half_close(
    transport: asyncio.Transport, loop: asyncio.AbstractEventLoop
) -> asyncio.TimerHandle:
    """Send FIN once the queued data is out and keep reading; drop after :data:`LINGER`.

    The caller reads (and bounds, :data:`DRAIN_BYTES`) what still arrives and
    closes at the client's EOF; the returned timer is cancelled when the
    connection is lost.
    """
    timer = loop.call_later(LINGER, transport.abort)
    transport.resume_reading()
    if transport.can_write_eof():
        transport.write_eof()
    return timer


# What a fresh picows protocol is told, so that it opens without a client.
_CANNED_UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: dwsps\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: ZHdzcHMgcmVuZXdhbCAxMg==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
_CLOSE_FRAME = 0x88  # FIN + opcode 8, the first byte of every close frame picows writes


class StreamOwner(Protocol):
    """What a stream needs from its connection."""

    @property
    def closing(self) -> bool:
        """Whether the connection is failing or closing (its close frame is written)."""

    def send(self, data: bytes) -> None:
        """Queue ``data`` (a whole frame) behind what is queued."""

    def protocol_failed(self, close_frame: bytes) -> None:
        """picows found a framing error and wrote ``close_frame``: finish the connection."""

    def pause_writing(self) -> None:
        """The transport's buffer is full: hold further data back."""

    def resume_writing(self) -> None:
        """The transport's buffer drained: write what was held back."""

    def pong_received(self) -> None:
        """A pong arrived while picows was dozing."""


class Picows(Protocol):
    """The part of picows' protocol a stream drives."""

    def connection_made(self, transport: Any) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def eof_received(self) -> bool | None: ...
    def get_buffer(self, size_hint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class _Gone:
    """picows' stand-in once the connection is lost (nothing reaches it any more)."""

    def connection_made(self, transport: Any) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def eof_received(self) -> bool | None:
        return False

    def get_buffer(self, size_hint: int) -> memoryview:
        return memoryview(bytearray(1))

    def buffer_updated(self, nbytes: int) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


_GONE = _Gone()
_ASLEEP = _Gone()
"""picows' stand-in while a stream dozes (see :meth:`Stream.doze`)."""

_PONG: Final = 0x8A
"""FIN + pong, no reserved bits: the first byte of the one frame a dozing stream takes itself."""


def _is_pong(data: memoryview) -> bool:
    """Whether ``data`` is exactly one masked client pong (RFC 6455 5.2; payload <= 125)."""
    if len(data) < 6 or data[0] != _PONG:
        return False
    second = data[1]
    return second & 0x80 != 0 and len(data) == 6 + (second & 0x7F)


class ReadBuffer:
    """The one read buffer of a server's streams (reads are copied out at once)."""

    __slots__ = ("budget", "data", "view")

    def __init__(self, size: int = READ_SIZE, budget: int = READ_BUDGET) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.budget = budget


class Stream(asyncio.BufferedProtocol):
    """The socket of one handed-over WebSocket connection (see the module docstring).

    To the event loop it is the (buffered) protocol, to picows the transport.
    """

    __slots__ = (
        "_drained",
        "_heard",
        "_linger",
        "_make_picows",
        "_parse",
        "_read",
        "_reader",
        "_renew",
        "_renewing",
        "_throttled",
        "loop",
        "owner",
        "proto",
        "quiet",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        proto: Picows,
        reader: ReadBuffer,
        loop: asyncio.AbstractEventLoop,
        make_picows: Callable[[], Picows] | None = None,
    ) -> None:
        self.transport = transport
        self.proto = proto
        self._make_picows = make_picows
        self._renew = False
        self._renewing = False
        self.loop = loop
        self.owner: StreamOwner | None = None
        self._reader = reader
        self._read = 0
        self._throttled = False
        self._drained = 0
        self._parse = True
        self._linger: asyncio.TimerHandle | None = None
        self._heard = True
        self.quiet = False
        """picows holds no partial frame (the owner sets it after a frame that ended the input)."""

    def attach(self, owner: StreamOwner) -> None:
        """``owner`` (the connection) takes over every write picows makes from now on."""
        self.owner = owner

    # -- the event loop's side (asyncio.BufferedProtocol) -------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The stream is set on a transport that is already connected.
        pass

    def get_buffer(self, size_hint: int) -> memoryview:
        return self._reader.view

    def buffer_updated(self, nbytes: int) -> None:
        if self._linger is not None or not self._parse:
            # Closing: read what the client still sends (a reset would lose what
            # we sent), within a bound; picows sees it only while it can parse.
            self._drained += nbytes
            if self._drained > DRAIN_BYTES:
                self.transport.abort()
                return
            if not self._parse or self._drained > DRAIN_PARSE:
                return
        self.feed(self._reader.view[:nbytes])
        self._read += nbytes
        if self._read >= self._reader.budget and not self.transport.is_closing():
            # Enough for this turn: the other connections' input comes first.
            self._read = 0
            self.transport.pause_reading()
            self.loop.call_soon(self._resume_reading)

    def feed(self, data: memoryview) -> None:
        """Give ``data`` to picows in pieces of at most half its free space."""
        self._heard = True
        self.quiet = False
        if self.proto is _ASLEEP and data and self._parse:
            owner = self.owner
            if owner is not None and _is_pong(data):
                owner.pong_received()
                self.quiet = True
                return
            self._wake()
        # After a framing error picows must see nothing more (its parser would go on).
        while data and self._parse:
            proto = self.proto
            buffer = proto.get_buffer(-1)
            n = min(len(data), max(len(buffer) // 2, 1))
            buffer[:n] = data[:n]
            data = data[n:]
            proto.buffer_updated(n)
            if self._renew:
                self._renew_picows()

    def renew(self) -> None:
        """picows holds nothing after the (large) frame it handed over: renew it after this."""
        if self._make_picows is not None:
            self._renew = True

    @property
    def renewing(self) -> bool:
        """Whether a fresh picows is opening (its ``on_ws_connected`` is not a new connection)."""
        return self._renewing

    @property
    def asleep(self) -> bool:
        """Whether :meth:`doze` let picows go (a :meth:`wake` brings a fresh one)."""
        return self.proto is _ASLEEP

    def doze(self) -> bool:
        """Idle sweep: let picows go if nothing was read since the last sweep; True if it went.

        Not while picows holds part of a frame, nor while closing: those need its parser.
        """
        if self._heard:
            self._heard = False
            return False
        owner = self.owner
        if (
            not self.quiet
            or self.proto is _ASLEEP
            or self._make_picows is None
            or not self._parse
            or self._linger is not None
            or owner is None
            or owner.closing
        ):
            return False
        self.proto = _ASLEEP
        return True

    def wake(self) -> None:
        """A fresh picows for a dozing stream (the owner needs its transport)."""
        if self.proto is _ASLEEP:
            self._wake()

    def _renew_picows(self) -> None:
        self._renew = False
        owner = self.owner
        if owner is None or owner.closing or not self._parse or self._make_picows is None:
            return
        self._wake()

    def _wake(self) -> None:
        # Renewal and waking alike: a canned handshake opens a fresh picows.
        assert self._make_picows is not None
        fresh = self._make_picows()
        self._renewing = True
        try:
            fresh.connection_made(self)
            buffer = fresh.get_buffer(-1)
            buffer[: len(_CANNED_UPGRADE)] = _CANNED_UPGRADE
            self.proto = fresh
            fresh.buffer_updated(len(_CANNED_UPGRADE))  # -> the owner's on_ws_connected
        finally:
            self._renewing = False

    def _resume_reading(self) -> None:
        if not self.transport.is_closing() and not self._throttled:
            self.transport.resume_reading()

    @property
    def throttled(self) -> bool:
        """Whether :meth:`throttle` stopped reading."""
        return self._throttled

    def throttle(self, on: bool) -> None:
        """Stop reading the client's requests (``on``) or start again: backpressure.

        The hub uses it while a connection has many replies waiting on the
        backplane; the per-turn read budget never resumes a throttled stream.
        """
        self._throttled = on
        transport = self.transport
        if transport.is_closing() or self._linger is not None:
            return
        if on:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def eof_received(self) -> bool | None:
        if self._linger is not None:
            return False  # the client is done too: close
        self.wake()
        return self.proto.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        # picows tells the connection it is gone (and settles its futures).
        self.wake()
        self.proto.connection_lost(exc)
        # Break the reference cycles (stream, picows, connection), so that a
        # closed connection's buffers go now, not at the next full collection.
        self.proto = _GONE
        self.owner = None

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.pause_writing()

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.resume_writing()

    # -- picows' side (its transport) ---------------------------------------

    def write(self, data: bytes) -> None:
        if self._renewing:
            return  # the fresh protocol's 101 reply: the client has had one
        owner = self.owner
        if owner is None or owner.closing:
            # The 101 response before a connection owns the stream, or the
            # connection's own close frame (after what was queued).
            self.transport.write(data)
        elif data[0] == _CLOSE_FRAME:
            # picows failed the connection (a framing error): it cannot parse further input.
            self._parse = False
            owner.protocol_failed(bytes(data))
        else:
            owner.send(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(bytes(chunk))

    def get_write_buffer_size(self) -> int:
        # Never 0, so picows always calls write() and never sends on the socket itself.
        return self.transport.get_write_buffer_size() + 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        """Half-close, drain briefly, then close (see the module docstring)."""
        transport = self.transport
        if self._linger is not None or transport.is_closing():
            return
        owner = self.owner
        if owner is not None and not owner.closing and not self._parse:
            # picows' own close came first (a framing error): the connection
            # writes its replies and the close frame first, then this runs again.
            self.loop.call_soon(self.close)
            return
        self._linger = half_close(transport, self.loop)

    def finish(self) -> None:
        """The close handshake is complete: close now (the client sends nothing more)."""
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        self.transport.abort()
