"""Peer links: forward organic publishes to other dwsps servers, and survive the network.

A server configured with peer URLs keeps one outbound WebSocket connection
(a :class:`PeerLink`) per URL. There it behaves as an ordinary dwsps client: it
sends ``publish`` requests carrying ``"fromPeerServer": true`` and reads the
replies. :class:`PeerLinks` is the server's :class:`~dwsps.links.Link` to its
peers: it encodes each organic publish once and hands it to every link.

How a link keeps its promises (the rules :class:`PeerOutbox` enforces on top
of the shared :class:`~dwsps.outbox.Outbox`, no I/O):

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

The link reconnects forever with exponential backoff and full jitter
(:mod:`dwsps.backoff`, ``peer_reconnect_min`` doubling up to
``peer_reconnect_max`` seconds), and pings the peer to notice a connection
that died without a FIN.

Inbound, :class:`PeerAuth` tells whether a connecting client is an
authenticated peer (it presented one of ``accept_peer_tokens``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, Final
from urllib.parse import parse_qsl

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from dwsps.auth import bearer_token
from dwsps.backoff import Backoff
from dwsps.config import ServerConfig
from dwsps.errors import ErrorCode
from dwsps.links import Link, LinkHost
from dwsps.messages import Publish, encode_forward_head, with_link_id
from dwsps.outbox import Outbox, OutboxStats
from dwsps.redact import redact

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


# -- the outbox (pure) --------------------------------------------------------


class PeerOutbox:
    """Publishes for one peer that it has not confirmed yet, oldest first.

    An :class:`~dwsps.outbox.Outbox` of ``(link seq, frame)`` plus the
    alignment of replies to requests.

    >>> box = PeerOutbox(max_messages=2, max_bytes=1 << 20)
    >>> box.add(b'{"type":"publish"')
    0
    >>> [f.decode() for f in box.take_unsent(10)]
    ['{"type":"publish","id":1}']
    >>> box.settle(None, ok=True)
    1
    """

    __slots__ = ("_awaiting", "_box", "_max_messages", "_next_seq")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._box: Outbox[tuple[int, bytes]] = Outbox(max_messages, max_bytes)
        self._max_messages = max(1, max_messages)
        # Link seqs written on the current connection whose reply has not come,
        # in write order: lines up replies that carry no id.
        self._awaiting: deque[int] = deque()
        self._next_seq = 1

    def __len__(self) -> int:
        return len(self._box)

    @property
    def stats(self) -> OutboxStats:
        """The counters of the underlying outbox."""
        return self._box.stats

    @property
    def size(self) -> int:
        """Size of the held frames."""
        return self._box.size

    @property
    def in_flight(self) -> int:
        """Held publishes written on the current connection, reply pending."""
        return self._box.in_flight

    @property
    def unsent(self) -> int:
        """Held publishes not written on the current connection."""
        return self._box.unsent

    def add(self, head: bytes) -> int:
        """Queue a publish (see :func:`~dwsps.messages.encode_forward_head`); return evictions."""
        seq = self._next_seq
        self._next_seq = seq + 1
        frame = with_link_id(head, seq)
        return self._box.add((seq, frame), len(frame))

    def take_unsent(self, limit: int) -> list[bytes]:
        """Mark up to ``limit`` unwritten publishes as written; return their frames in order."""
        entries = self._box.take_unsent(limit)
        awaiting = self._awaiting
        awaiting.extend(seq for seq, _ in entries)
        # A peer that never replies must not grow this without bound; the
        # alignment it gives is lost anyway. (Room for twice the outbox: seqs
        # of written entries evicted from a full outbox still await replies.)
        while len(awaiting) > 2 * self._max_messages + 1024:
            awaiting.popleft()
        return [frame for _, frame in entries]

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
        box = self._box
        while (entry := box.oldest_written()) is not None and entry[0] <= upto:
            box.confirm(ok or entry[0] != upto)
        return upto

    def reject_oldest_in_flight(self) -> bool:
        """Give up on the oldest written publish (the peer closed on it, e.g. with 1009)."""
        if self._box.confirm(ok=False) is None:
            return False
        if self._awaiting:
            self._awaiting.popleft()
        return True

    def connection_lost(self) -> None:
        """The connection is gone: everything held is unwritten again (resent next time)."""
        self._box.rewind()
        self._awaiting.clear()

    def clear(self) -> int:
        """Forget everything held (shutdown); return how many."""
        self._awaiting.clear()
        return self._box.clear()


class PeerAuth:
    """Inbound: whether a connecting client is an authenticated peer.

    A peer presents its token as ``Authorization: Bearer <token>`` (scheme
    case-insensitive, as for client tokens) or as the query parameter
    ``peer_token``; tokens are compared in constant time.
    """

    __slots__ = ("_tokens",)

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(t for t in tokens if t)

    @property
    def enabled(self) -> bool:
        """Whether peer authentication is configured at all."""
        return bool(self._tokens)

    def accepts(self, authorization: str, query: str) -> bool:
        """Whether the ``Authorization`` header or the query string carries a known token."""
        if not self._tokens:
            return False
        presented = bearer_token(authorization)
        if not presented:
            for key, value in parse_qsl(query, keep_blank_values=True):
                if key == "peer_token":
                    presented = value
        return bool(presented) and any(
            secrets.compare_digest(presented.encode(), token.encode()) for token in self._tokens
        )


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


# -- the link (asyncio) --------------------------------------------------------


class _LinkListener(WSListener):
    """picows callbacks of one connection, handed to its :class:`PeerLink`."""

    def __init__(self, link: PeerLink) -> None:
        self.link = link

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.link.on_connected(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.link.on_disconnected(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT and frame.fin:
            self.link.on_reply(frame.get_payload_as_bytes())
        elif frame.msg_type is WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                code = frame.get_close_code()
                transport.send_close(code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK)
            transport.disconnect()

    def pause_writing(self) -> None:
        self.link.set_writable(False)

    def resume_writing(self) -> None:
        self.link.set_writable(True)


class PeerLink:
    """One outbound connection to a peer server, with its outbox and reconnect loop."""

    def __init__(
        self, config: ServerConfig, host: LinkHost, url: str, token: str | None = None
    ) -> None:
        self.config = config
        self.host = host
        self.url = url
        self.display_url = redact(url)
        self._token = token
        self.outbox = PeerOutbox(config.peer_outbox_messages, config.peer_outbox_bytes)
        self.state = LinkState.DOWN
        self.connects = 0
        self.last_error = ""
        self.up_since: float | None = None
        self._transport: WSTransport | None = None
        self._paused = False
        self._flush_scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._backoff = Backoff(config.peer_reconnect_min, config.peer_reconnect_max)
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

    def set_writable(self, writable: bool) -> None:
        """Flow control from the transport: stop writing while its buffer is full."""
        self._paused = not writable
        if writable:
            self._schedule_flush()

    # -- replies ----------------------------------------------------------------

    def on_reply(self, data: bytes) -> None:
        """A text frame from the peer: the reply to one of our publishes."""
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
        cfg = self.config
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        ping = cfg.heartbeat_interval
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
                if error != self.last_error or self._backoff.attempt == 0:
                    log.info("peer %s: cannot connect (%s); retrying", self.display_url, error)
                self.last_error = error
            else:
                started = time.monotonic()
                await transport.wait_disconnected()
                if time.monotonic() - started >= _STABLE_AFTER:
                    self._backoff.reset()
            if self._closing:
                break
            self.state = LinkState.DOWN
            await asyncio.sleep(self._backoff.next_delay())

    def on_connected(self, transport: WSTransport) -> None:
        """A connection to the peer is up: send what the outbox holds."""
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
        self.host.emit("peer_up", self.display_url)
        self._flush()

    def on_disconnected(self, transport: WSTransport) -> None:
        """The connection is gone: keep what was not confirmed for the next one."""
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
        self.host.emit("peer_down", self.display_url)

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
        out.update(box.stats.as_dict())
        return out


class PeerLinks(Link):
    """The server's link to its peers: one :class:`PeerLink` per configured URL."""

    status_key = "peers"

    def __init__(self, config: ServerConfig, host: LinkHost) -> None:
        self.links: list[PeerLink] = []
        self._drain_timeout = config.close_timeout / 2
        for url in dict.fromkeys(config.peers):  # keep order, drop repeats
            self.links.append(PeerLink(config, host, url, config.peer_tokens.get(url)))

    async def start(self) -> None:
        """Start every link's connect loop; returns at once."""
        for link in self.links:
            link.start()

    def forward(self, pub: Publish) -> None:
        """Queue an organic publish for every peer (encoded once); peering is one hop."""
        if pub.from_peer:
            return
        head = encode_forward_head(pub)
        for link in self.links:
            link.enqueue(head)

    async def close(self) -> None:
        """Give links a moment to deliver what they hold, then close them."""
        await asyncio.gather(*(link.close(self._drain_timeout) for link in self.links))

    def status(self) -> list[dict[str, Any]]:
        """One :meth:`PeerLink.status` per link."""
        return [link.status() for link in self.links]
