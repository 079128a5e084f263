"""Peer links: forward organic publishes to other dwsps servers, and survive the network.

A server configured with peer URLs keeps one outbound WebSocket connection
(a :class:`PeerLink`) per URL. There it behaves as an ordinary dwsps client: it
sends ``publish`` requests carrying ``"fromPeerServer": true`` and reads the
replies. :class:`PeerManager` is the server's forwarder: it encodes each
organic publish once and hands it to every link.

How a link keeps its promises (the rules :class:`Outbox` enforces, no I/O):

* Every forwarded publish gets a link sequence number, sent as the request
  ``id``; numbers grow by one and never restart while the server runs.
* A publish stays in the outbox until the peer replied to it. A reply is an
  ``ack`` (confirmed) or an ``error`` (rejected) for the action ``publish``.
  A reply carrying one of our ids settles every publish up to that id (replies
  come in request order). A reply without an id (an original Node.js server
  does not echo ids) settles the oldest publish written on this connection
  that has no reply yet: the protocol promises replies in request order.
* When the connection drops, everything not yet settled is written again, in
  order, on the next connection (counted as ``resent``). The receiving dwsps
  server drops what it already delivered by ``origin`` + ``seq``.
* The outbox is bounded in messages and bytes; when a new publish would pass
  a bound, the oldest entries go first: ``dropped`` if they were never
  written, ``forgotten`` if they were written but not yet confirmed (they may
  well have arrived). Both are counted per link and logged.

The link reconnects forever with exponential backoff and full jitter between
``peer_reconnect_min`` and ``peer_reconnect_max`` seconds, and pings the peer
to notice a connection that died without a FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from dwsps.errors import ErrorCode
from dwsps.messages import Publish

if TYPE_CHECKING:
    from dwsps.server import Server

log = logging.getLogger("dwsps.peering")

_WRITE_CHUNK: Final = 256
"""Frames written between two checks of the transport's flow control."""

_RETRY_LATER: Final = frozenset({str(ErrorCode.FORBIDDEN), str(ErrorCode.RATE_LIMITED)})
"""Error replies that say "not now, not here" rather than "never": the link keeps
the publish, drops the connection and retries after a backoff."""

_STABLE_AFTER: Final = 5.0
"""A connection that lived this long resets the backoff to its minimum."""


class LinkState(StrEnum):
    """Where a peer link is in its life."""

    CONNECTING = "connecting"
    """Opening the TCP connection and the WebSocket handshake."""
    UP = "up"
    """Connected: publishes flow."""
    DOWN = "down"
    """Not connected; waiting for the backoff delay before the next attempt."""
    CLOSED = "closed"
    """The server is shutting down; the link will not reconnect."""


# -- wire encoding (pure) ---------------------------------------------------


def encode_forward_head(pub: Publish) -> bytes:
    """The forwarded ``publish`` request, without its ``id`` and closing brace.

    Built once per publish and shared by every link; a link appends its own id
    with :func:`with_link_id`.
    """
    obj: dict[str, Any] = {
        "type": "publish",
        "topic": pub.topic,
        "message": pub.message,
        "timestamp": pub.timestamp,
        "fromPeerServer": True,
    }
    if pub.origin is not None and pub.seq is not None:
        obj["origin"] = pub.origin
        obj["seq"] = pub.seq
    return orjson.dumps(obj)[:-1]


def with_link_id(head: bytes, link_seq: int) -> bytes:
    """Complete a head from :func:`encode_forward_head` with ``"id": link_seq``."""
    return b'%b,"id":%d}' % (head, link_seq)


def redact(url: str) -> str:
    """``url`` with a ``peer_token`` query parameter masked, for logs and status."""
    parts = urlsplit(url)
    if "peer_token" not in parts.query:
        return url
    query = [(k, "***" if k == "peer_token" else v) for k, v in parse_qsl(parts.query, True)]
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- the outbox (pure) --------------------------------------------------------


@dataclass(slots=True)
class OutboxStats:
    """Per-link counters (messages)."""

    queued: int = 0
    """Publishes handed to the link."""
    sent: int = 0
    """First writes of a publish."""
    resent: int = 0
    """Writes of a publish already written on an earlier connection."""
    confirmed: int = 0
    """Publishes the peer acknowledged."""
    rejected: int = 0
    """Publishes the peer answered with an error (not retried)."""
    dropped: int = 0
    """Evicted by the outbox bound before ever being written: lost for this peer."""
    forgotten: int = 0
    """Evicted by the outbox bound after being written, before a reply: not resent."""


class Outbox:
    """Publishes for one peer that it has not confirmed yet, oldest first.

    >>> box = Outbox(max_messages=2, max_bytes=1 << 20)
    >>> box.add(b'{"type":"publish"')
    0
    >>> [f.decode() for f in box.take_unsent(10)]
    ['{"type":"publish","id":1}']
    >>> box.settle(None, ok=True)
    1
    """

    __slots__ = (
        "_awaiting",
        "_bytes",
        "_entries",
        "_max_bytes",
        "_max_messages",
        "_max_written",
        "_next_seq",
        "_written",
        "stats",
    )

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._max_messages = max(1, max_messages)
        self._max_bytes = max(1, max_bytes)
        self._entries: deque[tuple[int, bytes]] = deque()
        # How many entries, from the front, were written on the current connection.
        self._written = 0
        # Link seqs written on the current connection whose reply has not come,
        # in write order: lines up replies that carry no id.
        self._awaiting: deque[int] = deque()
        self._bytes = 0
        self._next_seq = 1
        self._max_written = 0
        self.stats = OutboxStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Size of the held frames."""
        return self._bytes

    @property
    def in_flight(self) -> int:
        """Held publishes written on the current connection, reply pending."""
        return self._written

    @property
    def unsent(self) -> int:
        """Held publishes not written on the current connection."""
        return len(self._entries) - self._written

    def add(self, head: bytes) -> int:
        """Queue a publish (see :func:`encode_forward_head`); return how many were evicted."""
        seq = self._next_seq
        self._next_seq = seq + 1
        frame = with_link_id(head, seq)
        self._entries.append((seq, frame))
        self._bytes += len(frame)
        self.stats.queued += 1
        evicted = 0
        while len(self._entries) > self._max_messages or self._bytes > self._max_bytes:
            _, old = self._entries.popleft()
            self._bytes -= len(old)
            evicted += 1
            if self._written:
                self._written -= 1
                self.stats.forgotten += 1
            else:
                self.stats.dropped += 1
        return evicted

    def take_unsent(self, limit: int) -> list[bytes]:
        """Mark up to ``limit`` unwritten publishes as written; return their frames in order."""
        start = self._written
        stop = min(len(self._entries), start + limit)
        if start >= stop:
            return []
        entries = self._entries
        frames = []
        stats = self.stats
        awaiting = self._awaiting
        for i in range(start, stop):
            seq, frame = entries[i]
            frames.append(frame)
            awaiting.append(seq)
            if seq <= self._max_written:
                stats.resent += 1
            else:
                stats.sent += 1
                self._max_written = seq
        self._written = stop
        # A peer that never replies must not grow this without bound; the
        # alignment it gives is lost anyway. (Room for twice the outbox: seqs
        # of written entries evicted from a full outbox still await replies.)
        while len(awaiting) > 2 * self._max_messages + 1024:
            awaiting.popleft()
        return frames

    def settle(self, reply_id: object, ok: bool) -> int | None:
        """Apply one ``ack`` (``ok``) or ``error`` reply to a publish.

        Returns the link seq the reply settled, or None when nothing was
        waiting for a reply (a stray reply).
        """
        awaiting = self._awaiting
        if not awaiting:
            return None
        if type(reply_id) is int and 0 < reply_id < self._next_seq:
            # One of our ids (a dwsps peer echoes them): settles all up to it.
            if reply_id < awaiting[0]:
                return None  # already settled by a later reply
            while awaiting and awaiting[0] <= reply_id:
                awaiting.popleft()
            upto = reply_id
        else:
            # No id (an original server): replies come in request order.
            upto = awaiting.popleft()
        entries = self._entries
        stats = self.stats
        while entries and entries[0][0] <= upto and self._written:
            seq, frame = entries.popleft()
            self._written -= 1
            self._bytes -= len(frame)
            if seq == upto and not ok:
                stats.rejected += 1
            else:
                stats.confirmed += 1
        return upto

    def reject_oldest_in_flight(self) -> bool:
        """Give up on the oldest written publish (the peer closed on it, e.g. with 1009)."""
        if not self._written:
            return False
        _, frame = self._entries.popleft()
        self._written -= 1
        self._bytes -= len(frame)
        self.stats.rejected += 1
        if self._awaiting:
            self._awaiting.popleft()
        return True

    def connection_lost(self) -> None:
        """The connection is gone: everything held is unwritten again (resent next time)."""
        self._written = 0
        self._awaiting.clear()

    def clear(self) -> int:
        """Forget everything held (shutdown); return how many."""
        n = len(self._entries)
        self._entries.clear()
        self._awaiting.clear()
        self._written = 0
        self._bytes = 0
        return n


_TCP_CORK: Final = getattr(socket, "TCP_CORK", None)  # Linux only


def _cork(transport: WSTransport) -> Any:
    """Hold back partial segments on the link's socket; return it, or None if not possible."""
    if _TCP_CORK is None:
        return None
    sock = transport.underlying_transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
    except OSError:
        return None
    return sock


def _uncork(sock: Any) -> None:
    """Send what :func:`_cork` held back, now."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Delay before reconnect ``attempt`` (0-based): exponential, capped, full jitter.

    The cap grows ``low * 2**attempt`` up to ``high``; the delay is uniform in
    ``[low, cap]`` so that many servers restarting together spread out.
    """
    cap = min(high, low * (2 ** min(attempt, 30)))
    return rng.uniform(low, max(low, cap))


# -- the link (asyncio) --------------------------------------------------------


class _LinkListener(WSListener):
    """picows callbacks of one connection, handed to its :class:`PeerLink`."""

    def __init__(self, link: PeerLink) -> None:
        self.link = link

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.link._connected(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.link._disconnected(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT and frame.fin:
            self.link._reply(frame.get_payload_as_bytes())
        elif frame.msg_type is WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                code = frame.get_close_code()
                transport.send_close(code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK)
            transport.disconnect()

    def pause_writing(self) -> None:
        self.link._paused = True

    def resume_writing(self) -> None:
        self.link._paused = False
        self.link._schedule_flush()


class PeerLink:
    """One outbound connection to a peer server, with its outbox and reconnect loop."""

    def __init__(self, server: Server, url: str, token: str | None = None) -> None:
        cfg = server.config
        self.server = server
        self.url = url
        self.display_url = redact(url)
        self._token = token
        self.outbox = Outbox(cfg.peer_outbox_messages, cfg.peer_outbox_bytes)
        self.state = LinkState.DOWN
        self.connects = 0
        self.last_error = ""
        self.up_since: float | None = None
        self._transport: WSTransport | None = None
        self._paused = False
        self._flush_scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._rng = random.Random()
        self._drop_logged = 0
        self._reject_logged = False
        self._refused = False
        self._drained: asyncio.Event | None = None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start connecting (in the background: the peer need not be up)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"dwsps-peer {self.display_url}"
            )

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop the link; first wait up to ``drain_timeout`` for the peer to confirm the outbox."""
        if drain_timeout > 0 and self.state is LinkState.UP and len(self.outbox):
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain_timeout)
        self._closing = True
        transport = self._transport
        if transport is not None:
            transport.send_close(WSCloseCode.GOING_AWAY, b"server shutting down")
            transport.disconnect()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if transport is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(transport.wait_disconnected(), 1.0)
        self.state = LinkState.CLOSED
        lost = self.outbox.clear()
        if lost:
            log.warning("peer %s: %d publishes unconfirmed at shutdown", self.display_url, lost)

    # -- forwarding -----------------------------------------------------------

    def enqueue(self, head: bytes) -> None:
        """Queue one forwarded publish (never blocks)."""
        evicted = self.outbox.add(head)
        if evicted:
            self._log_drops()
        if self.state is LinkState.UP:
            self._schedule_flush()

    def _log_drops(self) -> None:
        # Logged at the first eviction and then at each power of two, so a long
        # outage is visible in the log without one line per message.
        stats = self.outbox.stats
        total = stats.dropped + stats.forgotten
        if total >= 2 * self._drop_logged or self._drop_logged == 0:
            self._drop_logged = max(1, total)
            log.warning(
                "peer %s (%s): outbox full, %d publishes dropped and %d forgotten so far",
                self.display_url,
                self.state,
                stats.dropped,
                stats.forgotten,
            )

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if transport is None or self.state is not LinkState.UP:
            return
        outbox = self.outbox
        if not outbox.unsent:
            return
        send = transport.send
        text = WSMsgType.TEXT
        # picows writes (masks) each frame on its own. Corked, this turn's
        # frames leave together when we uncork below, still in this loop turn,
        # so the peer reads and fans them out in one batch instead of being
        # woken per frame (measured: ~1.5-2x deliveries/s on the peer).
        sock = _cork(transport)
        try:
            while not self._paused:
                frames = outbox.take_unsent(_WRITE_CHUNK)
                if not frames:
                    return
                for frame in frames:
                    send(text, frame)
        finally:
            if sock is not None:
                _uncork(sock)

    # -- replies ----------------------------------------------------------------

    def _reply(self, data: bytes) -> None:
        try:
            reply = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(reply, dict):
            return
        kind = reply.get("type")
        if kind == "ack":
            if reply.get("action") == "publish":
                self.outbox.settle(reply.get("id"), ok=True)
                if self._drained is not None and not len(self.outbox):
                    self._drained.set()
        elif kind == "error" and reply.get("action", "publish") == "publish":
            code = str(reply.get("error"))
            if code in _RETRY_LATER:
                # Keep the publish; try again on a new connection after a backoff.
                error = f"{code}: {reply.get('detail', '')}"
                if error != self.last_error:  # once per cause, not per retry
                    log.warning(
                        "peer %s refused a publish (%s); holding publishes, retrying",
                        self.display_url,
                        error,
                    )
                self.last_error = error
                self._refused = True
                if self._transport is not None:
                    self._transport.disconnect()
                return
            self.outbox.settle(reply.get("id"), ok=False)
            if not self._reject_logged:
                self._reject_logged = True
                log.warning(
                    "peer %s rejected a publish: %s %s (further ones counted only)",
                    self.display_url,
                    code,
                    reply.get("detail", ""),
                )
        # Anything else (a delivery, should someone subscribe us) is not ours.

    # -- connection loop ----------------------------------------------------

    async def _run(self) -> None:
        cfg = self.server.config
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        ping = cfg.heartbeat_interval
        attempt = 0
        while not self._closing:
            self.state = LinkState.CONNECTING
            try:
                transport, _ = await asyncio.wait_for(
                    ws_connect(
                        lambda: _LinkListener(self),
                        self.url,
                        extra_headers=headers,
                        websocket_handshake_timeout=cfg.handshake_timeout,
                        enable_auto_ping=ping > 0,
                        auto_ping_idle_timeout=ping if ping > 0 else 10.0,
                        auto_ping_reply_timeout=ping if ping > 0 else 10.0,
                        max_frame_size=cfg.max_frame_size,
                        max_redirects=0,
                        logger_name="dwsps.peering.ws",
                        use_aiofastnet=False,
                    ),
                    cfg.handshake_timeout * 2,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}".strip()
                if error != self.last_error or attempt == 0:
                    log.info("peer %s: cannot connect (%s); retrying", self.display_url, error)
                self.last_error = error
            else:
                started = time.monotonic()
                await transport.wait_disconnected()
                if time.monotonic() - started >= _STABLE_AFTER:
                    attempt = 0
            if self._closing:
                break
            self.state = LinkState.DOWN
            delay = backoff_delay(
                attempt, cfg.peer_reconnect_min, cfg.peer_reconnect_max, self._rng
            )
            attempt += 1
            await asyncio.sleep(delay)

    def _connected(self, transport: WSTransport) -> None:
        if self._closing:
            transport.disconnect()
            return
        self._transport = transport
        self._paused = False
        self.state = LinkState.UP
        self.connects += 1
        self.up_since = time.time()
        self._reject_logged = False
        self._refused = False  # last_error stays: the last problem seen, for status
        held = len(self.outbox)
        log.info("peer %s up (%d publishes to send)", self.display_url, held)
        self.server.events.emit("peer_up", self.display_url)
        self._flush()

    def _disconnected(self, transport: WSTransport) -> None:
        if transport is not self._transport:
            return
        self._transport = None
        handshake = transport.close_handshake
        recv = handshake.recv if handshake is not None else None
        # The peer processes in order, so on 1009 the oldest publish without a
        # reply is the one too big for it: resending it would loop forever.
        too_big = recv is not None and recv.code is WSCloseCode.MESSAGE_TOO_BIG
        if too_big and self.outbox.reject_oldest_in_flight():
            log.warning(
                "peer %s: a publish is over its frame size limit; skipped", self.display_url
            )
        self.outbox.connection_lost()
        self.up_since = None
        if recv is not None:
            self.last_error = f"closed by peer: {recv.code.value} {recv.reason}".strip()
        elif not self._refused:
            self.last_error = "connection lost"
        if not self._closing:
            self.state = LinkState.DOWN
            log.warning(
                "peer %s down (%s); %d publishes held",
                self.display_url,
                self.last_error,
                len(self.outbox),
            )
        if self._drained is not None:
            self._drained.set()
        self.server.events.emit("peer_down", self.display_url)

    # -- introspection --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """State and counters of this link, JSON-ready."""
        box = self.outbox
        out: dict[str, Any] = {
            "url": self.display_url,
            "state": str(self.state),
            "authenticated": self._token is not None,
            "outbox": len(box),
            "outbox_bytes": box.size,
            "in_flight": box.in_flight,
            "connects": self.connects,
            "last_error": self.last_error,
        }
        out.update({f.name: getattr(box.stats, f.name) for f in fields(box.stats)})
        return out


class PeerManager:
    """The server's forwarder to its peers: one :class:`PeerLink` per configured URL."""

    def __init__(self, server: Server) -> None:
        cfg = server.config
        self.server = server
        self.links: list[PeerLink] = []
        for url in dict.fromkeys(cfg.peers):  # keep order, drop repeats
            self.links.append(PeerLink(server, url, cfg.peer_tokens.get(url)))

    def start(self) -> None:
        """Start every link's connect loop; returns at once."""
        for link in self.links:
            link.start()

    def forward(self, publish: Publish) -> None:
        """Queue an organic publish for every peer (encoded once)."""
        head = encode_forward_head(publish)
        for link in self.links:
            link.enqueue(head)

    async def close(self, drain_timeout: float = 1.0) -> None:
        """Give links up to ``drain_timeout`` to deliver what they hold, then close them."""
        await asyncio.gather(*(link.close(drain_timeout) for link in self.links))

    def status(self) -> list[dict[str, Any]]:
        """One :meth:`PeerLink.status` per link."""
        return [link.status() for link in self.links]
