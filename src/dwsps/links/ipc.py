"""The IPC backplane: the worker processes of one ``dwsps serve --workers N`` as one server.

``ipc:///DIR?slot=I&workers=N`` is worker ``I`` of ``N``; the supervisor
(:mod:`dwsps.workers`) makes the private directory ``DIR`` and hands each
worker its URL. It is a :class:`~dwsps.links.engine.Backplane` like Redis, so
everything the backplane link already does (identity, channel numbering and
gap counting, local-only delivery) applies unchanged; only the transport is
new, and it has no broker:

* each worker listens on the Unix socket ``DIR/I.sock`` and connects to every
  other worker's socket: one stream per ordered pair, which carries the
  connecting worker's envelopes one way and the listening worker's interest
  the other way;
* interest is per channel key, as on Redis: a worker announces ``+key`` /
  ``-key`` as its local interest goes 0↔1 (and its whole set to every worker
  that connects), and a sender writes an envelope only to the workers that
  want its key, so a worker receives only topics it has subscribers for;
* one stream per pair keeps each publisher's order; a worker that is gone
  (crashed, restarting) simply has no stream and no interest: its clients
  are gone too, and its replacement announces its own interest when it
  connects.

Frames on a stream are ``4-byte big-endian length`` + ``kind`` + body, with
kind ``E`` (an envelope), ``+`` / ``-`` (interest in a key), ``H`` (the
connecting worker's slot, first: a worker that hears from a restarted one
connects back at once instead of waiting for its reconnect delay). Writes are
gathered per loop turn. What one stream may hold in the kernel's and the
transport's buffers is bounded by ``backplane_buffer_bytes``: beyond it
envelopes for that worker are dropped and counted (``dropped``; the receiver
counts them as ``gaps``). A frame longer than that bound closes the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

from dwsps.backoff import Backoff
from dwsps.links.engine import Backplane, BackplaneOptions, Sink, StateListener

log = logging.getLogger("dwsps.ipc")

_HEAD: Final = struct.Struct(">I")
ENVELOPE: Final = b"E"
WANT: Final = b"+"
DROP: Final = b"-"
HELLO: Final = b"H"


def frame(kind: bytes, body: bytes) -> bytes:
    """One frame: length of ``kind + body``, then both."""
    return _HEAD.pack(len(body) + 1) + kind + body


class FrameReader:
    """Splits a byte stream into ``(kind, body)`` frames; pure.

    >>> reader = FrameReader(100)
    >>> data = frame(b"+", b"news") + frame(b"E", b"x")
    >>> reader.feed(data[:3]), reader.feed(data[3:])
    ([], [(b'+', b'news'), (b'E', b'x')])
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add ``data``; return the frames it completed. ValueError for an oversized frame."""
        buf = self._buf
        buf += data
        out: list[tuple[bytes, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (size,) = _HEAD.unpack_from(buf, pos)
            if size == 0 or size > self.max_frame:
                raise ValueError(f"frame of {size} bytes (limit {self.max_frame})")
            if end - pos - 4 < size:
                break
            start = pos + 4
            out.append((bytes(buf[start : start + 1]), bytes(buf[start + 1 : start + size])))
            pos = start + size
        if pos:
            del buf[:pos]
        return out


def socket_path(directory: str, slot: int) -> str:
    """Where worker ``slot`` listens."""
    return os.path.join(directory, f"{slot}.sock")


class _Stream(asyncio.Protocol):
    """One end of a worker-to-worker stream (either side)."""

    def __init__(self, owner: IpcBackplane, outbound: bool) -> None:
        self.owner = owner
        self.outbound = outbound
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(owner.max_frame)
        self.wanted: set[str] = set()
        """Outbound: the keys the worker at the other end wants."""
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.owner.stream_up(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.wanted.clear()
        self.owner.stream_down(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except ValueError as exc:
            log.warning("ipc: closing a worker stream: %s", exc)
            self.close()
            return
        owner = self.owner
        for kind, body in frames:
            if kind == ENVELOPE:
                owner.envelope_received(body)
            elif self.outbound and kind == WANT:
                self.wanted.add(body.decode())
            elif self.outbound and kind == DROP:
                self.wanted.discard(body.decode())
            elif kind == HELLO and body.isdigit():
                owner.hello(int(body))

    def queue(self, data: bytes) -> bool:
        """Queue ``data`` for this loop turn's write; False when over the bound."""
        transport = self.transport
        if transport is None:
            return False
        if self.pending_bytes + transport.get_write_buffer_size() + len(data) > self.owner.bound:
            return False
        if not self.pending:
            self.owner.dirty.append(self)
        self.pending.append(data)
        self.pending_bytes += len(data)
        return True

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        if self.transport is not None and pending:
            self.transport.write(b"".join(pending))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class IpcBackplane(Backplane):
    """Worker ``slot`` of ``workers`` on the Unix sockets in ``directory``."""

    marks_deliveries = False

    def __init__(self, directory: str, slot: int, workers: int, bound: int) -> None:
        self.directory = directory
        self.slot = slot
        self.workers = workers
        self.bound = max(bound, 1 << 16)
        self.max_frame = self.bound
        self.dirty: list[_Stream] = []
        self._sink: Sink | None = None
        self._keys: set[str] = set()
        self._inbound: set[_Stream] = set()
        self._outbound: dict[int, _Stream] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[int, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self.published = 0
        self.received = 0
        self.dropped = 0

    @classmethod
    def from_url(cls, url: str, options: BackplaneOptions) -> IpcBackplane:
        """``ipc:///DIR?slot=I&workers=N``; ValueError when a part is missing or wrong."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        try:
            slot = int(query["slot"][0])
            workers = int(query["workers"][0])
        except (KeyError, ValueError):
            raise ValueError("ipc:// wants ?slot=I&workers=N") from None
        if not parts.path or not 0 <= slot < workers:
            raise ValueError("ipc:// wants a directory and 0 <= slot < workers")
        return cls(parts.path, slot, workers, options.buffer_bytes)

    # -- the engine contract ------------------------------------------------

    async def start(self, sink: Sink, on_state: StateListener) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._sink = sink
        path = socket_path(self.directory, self.slot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the worker this one replaces
        self._server = await loop.create_unix_server(lambda: _Stream(self, False), path)
        for other in range(self.workers):
            if other != self.slot:
                self._tasks.append(loop.create_task(self._connect(other)))
        on_state(True, f"worker {self.slot} of {self.workers}")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._flush()
        for stream in [*self._inbound, *self._outbound.values()]:
            stream.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        self._sink = None

    def publish(self, key: str, payload: bytes) -> None:
        data: bytes | None = None
        for stream in self._outbound.values():
            wanted = stream.wanted
            if key in wanted or "*" in wanted:
                if data is None:
                    data = frame(ENVELOPE, payload)
                if stream.queue(data):
                    self.published += 1
                else:
                    self.dropped += 1
        self._schedule_flush()

    def subscribe(self, key: str) -> None:
        if key not in self._keys:
            self._keys.add(key)
            self._announce(frame(WANT, key.encode()))

    def unsubscribe(self, key: str) -> None:
        if key in self._keys:
            self._keys.discard(key)
            self._announce(frame(DROP, key.encode()))

    @property
    def healthy(self) -> bool:
        # A missing worker has no clients, so nothing it should have is lost.
        return self._server is not None

    def status(self) -> dict[str, Any]:
        return {
            "url": f"ipc://{self.directory}?slot={self.slot}&workers={self.workers}",
            "state": "up" if self._server is not None else "closed",
            "healthy": self.healthy,
            "slot": self.slot,
            "workers": self.workers,
            "connected": sorted(self._outbound),
            "subscribed": sorted(self._keys),
            "published": self.published,
            "received": self.received,
            "dropped": self.dropped,
        }

    # -- streams ------------------------------------------------------------

    async def _connect(self, other: int) -> None:
        """Keep a stream to worker ``other`` open (it may start later, or restart)."""
        assert self._loop is not None
        backoff = Backoff(0.02, 1.0)
        path = socket_path(self.directory, other)
        wake = self._wake[other] = asyncio.Event()
        while True:
            try:
                _, stream = await self._loop.create_unix_connection(
                    lambda: _Stream(self, True), path
                )
            except OSError:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), backoff.next_delay())
                continue
            backoff.reset()
            self._outbound[other] = stream
            try:
                await stream.lost
            finally:
                if self._outbound.get(other) is stream:
                    del self._outbound[other]
                stream.close()

    def stream_up(self, stream: _Stream) -> None:
        """A stream opened: say who we are, or tell the other worker our interest."""
        if stream.outbound:
            stream.queue(frame(HELLO, str(self.slot).encode()))
            self._schedule_flush()
        else:
            self._inbound.add(stream)
            for key in self._keys:
                stream.queue(frame(WANT, key.encode()))
            self._schedule_flush()

    def hello(self, slot: int) -> None:
        """Worker ``slot`` connected to us: connect to it now if we have no stream."""
        wake = self._wake.get(slot)
        if wake is not None and slot not in self._outbound:
            wake.set()

    def stream_down(self, stream: _Stream) -> None:
        self._inbound.discard(stream)

    def envelope_received(self, payload: bytes) -> None:
        self.received += 1
        if self._sink is not None:
            self._sink(payload)

    def _announce(self, data: bytes) -> None:
        for stream in list(self._inbound):
            if not stream.queue(data):
                # Interest must not be lost: the other worker reconnects and gets
                # the whole set again.
                stream.close()
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self.dirty and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for stream in dirty:
            stream.flush()
