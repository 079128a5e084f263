"""The one WebSocket test client: it can send any frame, well-formed or not.

Real client libraries refuse to send the input a server must survive (binary
junk, bad UTF-8, fragments in odd orders, RSV bits, oversized frames), so the
tests speak RFC 6455 by hand over an asyncio stream:

* :func:`encode_frame` builds one frame with any opcode, flags, mask and length;
* :class:`RawClient` does the opening handshake, then a background task reads
  frames, reassembles messages, answers pings (unless told not to), echoes a
  close frame, and files every text message (decoded JSON when it parses) in an
  inbox that tests take from with :meth:`RawClient.next_message`;
* on top of that, dwsps conveniences for the suites that only need a client:
  :meth:`RawClient.request` (ids added when missing), ``subscribe``/``publish``
  checking the ack, :meth:`RawClient.take` / ``take_until`` for deliveries, and
  the :attr:`RawClient.deliveries` record with :meth:`RawClient.messages`;
* :func:`http_get`, :func:`get_json` and :func:`health` read the server's HTTP
  routes.

Waits are bounded by timeouts scaled with ``DWSPS_TEST_TIME_SCALE``; nothing here
sleeps to wait for an event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

from tests.support import scaled

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

SYNC_TOPIC = "_sync"
"""The topic :meth:`RawClient.sync` unsubscribes from (never subscribed)."""

DEFAULT_TIMEOUT = scaled(5.0)
"""Seconds a test waits for something that should happen at once."""


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """One WebSocket frame as a client would send it (masked unless ``mask=False``).

    ``rsv`` is the three RSV bits (0-7); ``length`` overrides the length field
    (to announce a huge frame without sending it).
    """
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    repeated = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(data), "big"
    )


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame."""
    return struct.pack("!H", code) + reason.encode()


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as read from the server."""

    opcode: int
    payload: bytes
    fin: bool
    rsv: int
    masked: bool


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read one frame (raises ``asyncio.IncompleteReadError`` at end of stream)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    masked = bool(b1 & 0x80)
    key = await reader.readexactly(4) if masked else b""
    payload = await reader.readexactly(n)
    if masked:
        payload = _xor(payload, key)
    return Frame(b0 & 0x0F, payload, bool(b0 & 0x80), (b0 >> 4) & 7, masked)


class WSClosed(ConnectionError):
    """The connection ended while a test was waiting for a message."""


class HandshakeError(ConnectionError):
    """The server did not answer the upgrade with 101."""

    def __init__(self, status: int, head: bytes, body: bytes = b"") -> None:
        super().__init__(f"upgrade refused with {status}: {head[:200]!r} {body[:200]!r}")
        self.status = status
        self.head = head
        self.body = body
        """The refusal's body (up to its Content-Length, at most 64 KiB)."""

    @property
    def reason(self) -> str:
        """The body as text without its line end: the server's one-line reason."""
        return self.body.decode(errors="replace").rstrip("\r\n")

    def header(self, name: str) -> str | None:
        """One header of the refusal (case-insensitive), or None."""
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode(errors="replace")
        return None


async def _refusal_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length" and value.strip().isdigit():
            length = min(int(value.strip()), 64 * 1024)
    try:
        return await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as exc:
        return exc.partial


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None, url
    assert parts.port is not None, url
    return parts.hostname, parts.port


async def open_socket(
    url: str, *, rcvbuf: int | None = None, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP stream to the host and port of ``url`` (``rcvbuf`` shrinks the kernel buffer;
    ``source`` is the local address to connect from, e.g. ``127.0.0.2``)."""
    host, port = _host_port(url)
    if source is not None:
        assert rcvbuf is None, "source and rcvbuf together are not needed yet"
        return await asyncio.open_connection(host, port, local_addr=(source, 0))
    if rcvbuf is None:
        return await asyncio.open_connection(host, port)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def http_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET to the server of ``url``; returns (status, body)."""
    status, _, body = await http_request(url, "GET", path, headers=headers)
    return status, body


async def http_request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP/1.1 request to the server of ``url``; (status, headers, body)."""
    reader, writer = await open_socket(url)
    try:
        host, port = _host_port(url)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEFAULT_TIMEOUT)
        status = int(head.split(b" ", 2)[1])
        fields: dict[str, str] = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name:
                fields[name.strip().decode().lower()] = value.strip().decode()
        length = fields.get("content-length")
        if method == "HEAD":
            data = b""
        elif length is None:
            data = await asyncio.wait_for(reader.read(), DEFAULT_TIMEOUT)
        else:
            data = await asyncio.wait_for(reader.readexactly(int(length)), DEFAULT_TIMEOUT)
        return status, fields, data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def get_json(url: str, path: str) -> tuple[int, Any]:
    """:func:`http_get` with the body decoded as JSON: (status, document)."""
    status, body = await http_get(url, path)
    return status, orjson.loads(body)


async def health(url: str) -> dict[str, Any]:
    """The ``/health`` document of the server at ``url``, whatever its status (200 or 503)."""
    _, doc = await get_json(url, "/health")
    assert isinstance(doc, dict), doc
    return doc


Predicate = Callable[[Any], bool]


class RawClient:
    """A hand-rolled WebSocket client connection (see the module docstring)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        auto_pong: bool = True,
        echo_close: bool = True,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.auto_pong = auto_pong
        self.echo_close = echo_close
        self.inbox: deque[Any] = deque()
        """Messages not yet taken: decoded JSON, else ``str`` (bad JSON) or ``bytes`` (binary)."""
        self.frames: list[Frame] = []
        """Every non-control frame received, in order (for frame-level checks)."""
        self.deliveries: list[dict[str, Any]] = []
        """Every ``publish`` delivery received, in order, taken from the inbox or not."""
        self.pings: list[bytes] = []
        self.pongs: list[bytes] = []
        self.key = ""
        """The Sec-WebSocket-Key this client sent."""
        self.close_code: int | None = None
        self.close_reason = ""
        self.close_sent = False
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[int | None] = loop.create_future()
        """Resolves with the close code when a close frame arrives, or None at end of stream."""
        self.eof: asyncio.Future[None] = loop.create_future()
        self._changed = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self.error: Exception | None = None
        """Set when the server sent something this client cannot accept."""
        self._syncs = 0
        self._ids = itertools.count(1)
        self._frag: list[bytes] | None = None
        self._frag_op = OP_TEXT
        self._task = loop.create_task(self._read_loop())

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        path: str | None = None,
        headers: dict[str, str] | None = None,
        auto_pong: bool = True,
        echo_close: bool = True,
        rcvbuf: int | None = None,
        lowercase_headers: bool = False,
        source: str | None = None,
    ) -> RawClient:
        """Open a TCP connection to ``url`` and do the opening handshake.

        A refusal raises :class:`HandshakeError` with the status and the body.
        """
        reader, writer = await open_socket(url, rcvbuf=rcvbuf, source=source)
        try:
            key = await asyncio.wait_for(
                cls._handshake(reader, writer, url, path, headers, lowercase_headers),
                DEFAULT_TIMEOUT,
            )
        except BaseException:
            writer.close()
            raise
        client = cls(reader, writer, auto_pong=auto_pong, echo_close=echo_close)
        client.key = key
        return client

    @staticmethod
    async def _handshake(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        url: str,
        path: str | None,
        headers: dict[str, str] | None,
        lowercase: bool,
    ) -> str:
        parts = urlsplit(url)
        if path is not None:
            target = path
        else:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        key = base64.b64encode(os.urandom(16)).decode()
        fields = {
            "Host": parts.netloc,
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        }
        lines = [f"GET {target} HTTP/1.1"]
        lines += [f"{k.lower() if lowercase else k}: {v}" for k, v in fields.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            raise HandshakeError(status, head, await _refusal_body(reader, head))
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest())
        received = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        assert received.get(b"sec-websocket-accept") == accept, head
        return key

    # -- reading ----------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                await self._reading.wait()
                frame = await read_frame(self.reader)
                self._on_frame(frame)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception as exc:  # a frame the server should never have sent
            self.error = exc
        finally:
            if not self.closed.done():
                self.closed.set_result(None)
            if not self.eof.done():
                self.eof.set_result(None)
            self._changed.set()

    def _on_frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op == OP_PING:
            self.pings.append(frame.payload)
            if self.auto_pong and not self.close_sent:
                self.writer.write(encode_frame(OP_PONG, frame.payload))
            self._changed.set()
            return
        if op == OP_PONG:
            self.pongs.append(frame.payload)
            self._changed.set()
            return
        if op == OP_CLOSE:
            code = struct.unpack("!H", frame.payload[:2])[0] if len(frame.payload) >= 2 else 1005
            self.close_code = code
            self.close_reason = frame.payload[2:].decode(errors="replace")
            if self.echo_close and not self.close_sent:
                self.close_sent = True
                with contextlib.suppress(ConnectionError):
                    self.writer.write(encode_frame(OP_CLOSE, frame.payload[:2]))
            if not self.closed.done():
                self.closed.set_result(code)
            self._changed.set()
            return
        self.frames.append(frame)
        if op == OP_CONT:
            assert self._frag is not None, "server sent a continuation without a start"
            self._frag.append(frame.payload)
        else:
            assert self._frag is None, "server interleaved messages"
            self._frag = [frame.payload]
            self._frag_op = op
        if not frame.fin:
            return
        data = b"".join(self._frag)
        self._frag = None
        if self._frag_op == OP_BINARY:
            self.inbox.append(data)
        else:
            try:
                msg = orjson.loads(data)
            except orjson.JSONDecodeError:
                self.inbox.append(data.decode())
            else:
                self.inbox.append(msg)
                if isinstance(msg, dict) and msg.get("type") == "publish":
                    self.deliveries.append(msg)
        self._changed.set()

    async def next_message(
        self, predicate: Predicate | None = None, *, within: float = DEFAULT_TIMEOUT
    ) -> Any:
        """Take the first message in the inbox that matches ``predicate`` (waiting for it).

        Messages that do not match stay in the inbox. Raises ``TimeoutError``
        or :class:`WSClosed`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            for i, msg in enumerate(self.inbox):
                if predicate is None or predicate(msg):
                    del self.inbox[i]
                    return msg
            if self.error is not None:
                raise self.error
            if self.closed.done():
                raise WSClosed(f"closed ({self.close_code}) while waiting; inbox {self._peek()}")
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no matching message in {within:.1f}s; inbox {self._peek()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def take_all(self, predicate: Predicate | None = None) -> list[Any]:
        """Remove and return every message now in the inbox that matches (no waiting)."""
        taken = [m for m in self.inbox if predicate is None or predicate(m)]
        kept = [m for m in self.inbox if not (predicate is None or predicate(m))]
        self.inbox = deque(kept)
        return taken

    async def sync(self, *, within: float = DEFAULT_TIMEOUT) -> None:
        """Round-trip a request that changes nothing (unsubscribe from a topic never held).

        The server answers a connection's requests in order and writes in order,
        so afterwards everything it sent this client before is in the inbox:
        a test can then check that something did *not* arrive, without sleeping.
        """
        self._syncs += 1
        req_id = f"sync-{self._syncs}"
        await self.send_json({"type": "unsubscribe", "topic": SYNC_TOPIC, "id": req_id})
        await self.next_message(reply_to(req_id), within=within)

    def _peek(self) -> str:
        items = list(self.inbox)
        return f"({len(items)}): {items[:5]!r}"

    async def wait_for(
        self, condition: Callable[[], bool], *, within: float = DEFAULT_TIMEOUT, what: str = ""
    ) -> None:
        """Wait until ``condition()`` holds; it is checked whenever something arrives."""

        async def _wait() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(_wait(), within)
        except TimeoutError:
            raise TimeoutError(
                f"timed out after {within:.1f}s waiting for {what or 'a condition'}: "
                f"{len(self.deliveries)} deliveries, inbox {self._peek()}"
            ) from None

    async def take_until(
        self, stop: Callable[[dict[str, Any]], bool], *, within: float = DEFAULT_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Take deliveries from the inbox up to and including the first one ``stop`` accepts.

        ``within`` bounds the whole wait; other messages stay in the inbox.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        taken: list[dict[str, Any]] = []
        while True:
            try:
                msg = await self.next_message(is_delivery(), within=deadline - loop.time())
            except TimeoutError:
                raise TimeoutError(
                    f"the last delivery wanted did not come in {within:.1f}s; "
                    f"took {len(taken)}: {taken[-3:]!r}"
                ) from None
            taken.append(msg)
            if stop(msg):
                return taken

    async def take(self, n: int, *, within: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Take the next ``n`` deliveries from the inbox (all within ``within``)."""
        if n == 0:
            return []
        count = itertools.count(1)
        return await self.take_until(lambda _: next(count) == n, within=within)

    def messages(self, topic: str | None = None) -> list[Any]:
        """The ``message`` of every delivery received so far (optionally on one topic)."""
        return [d["message"] for d in self.deliveries if topic is None or d["topic"] == topic]

    async def wait_closed(self, *, within: float = DEFAULT_TIMEOUT) -> int | None:
        """The close code the server sent, or None if the stream ended without one."""
        return await asyncio.wait_for(asyncio.shield(self.closed), within)

    async def wait_eof(self, *, within: float = DEFAULT_TIMEOUT) -> None:
        """Wait until the server has closed the TCP connection."""
        await asyncio.wait_for(asyncio.shield(self.eof), within)

    def pause_reading(self) -> None:
        """Stop reading from the socket (the server's writes back up)."""
        self._reading.clear()
        self._transport().pause_reading()

    def resume_reading(self) -> None:
        """Read again."""
        self._reading.set()
        self._transport().resume_reading()

    def _transport(self) -> asyncio.Transport:
        # A stream's transport reads too; StreamWriter types it as write-only.
        return cast(asyncio.Transport, self.writer.transport)

    # -- writing ----------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are."""
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, opcode: int, payload: bytes = b"", **flags: Any) -> None:
        """Write one frame (see :func:`encode_frame` for the flags)."""
        await self.send_raw(encode_frame(opcode, payload, **flags))

    async def send_text(self, text: str | bytes) -> None:
        """One text frame (bytes are sent as they are, valid UTF-8 or not)."""
        await self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text)

    async def send_json(self, obj: Any) -> None:
        """One text frame holding ``obj`` as JSON."""
        await self.send_frame(OP_TEXT, orjson.dumps(obj))

    async def send_request(self, obj: dict[str, Any]) -> Any:
        """Send a request, with an ``id`` of its own unless it has one; returns the ``id``."""
        if "id" not in obj:
            obj = {**obj, "id": f"auto-{next(self._ids)}"}
        await self.send_json(obj)
        return obj["id"]

    async def request(self, obj: dict[str, Any], *, within: float = DEFAULT_TIMEOUT) -> Any:
        """Send a request (see :meth:`send_request`) and return its ack or error reply."""
        req_id = await self.send_request(obj)
        return await self.next_message(reply_to(req_id), within=within)

    async def _acked(self, obj: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await self.request(obj)
        assert reply["type"] == "ack", reply
        return reply

    async def subscribe(self, *topics: str) -> None:
        """Subscribe to each topic in turn; each must be acked."""
        for topic in topics:
            await self._acked({"type": "subscribe", "topic": topic})

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribe; it must be acked."""
        await self._acked({"type": "unsubscribe", "topic": topic})

    async def publish(self, topic: str, message: Any, **extra: Any) -> dict[str, Any]:
        """Publish (``extra``: more request fields); returns the ack, which it must be."""
        return await self._acked({"type": "publish", "topic": topic, "message": message, **extra})

    async def close(self, code: int = 1000) -> None:
        """Close handshake if still possible, then drop the socket and stop reading."""
        if not self.closed.done() and not self.close_sent:
            self.close_sent = True
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.writer.write(encode_frame(OP_CLOSE, close_payload(code)))
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.eof), scaled(1.0))
        self.abort()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        self._task.cancel()
        self.writer.transport.abort()

    async def dispose(self) -> None:
        """Abort and wait for the reader task to end (test teardown)."""
        self.abort()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# -- predicates -------------------------------------------------------------


def reply_to(req_id: str | int) -> Predicate:
    """An ack or error carrying ``id``."""
    return lambda m: (
        isinstance(m, dict) and m.get("type") in ("ack", "error") and m.get("id") == req_id
    )


def is_type(kind: str) -> Predicate:
    """Any message of ``type`` kind."""
    return lambda m: isinstance(m, dict) and m.get("type") == kind


def is_delivery(topic: str | None = None, context: str | None = None) -> Predicate:
    """A ``publish`` delivery, optionally with this topic and/or context."""

    def pred(m: Any) -> bool:
        return (
            isinstance(m, dict)
            and m.get("type") == "publish"
            and (topic is None or m.get("topic") == topic)
            and (context is None or m.get("context") == context)
        )

    return pred
