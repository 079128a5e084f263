"""Lean benchmark connections: subscribers that account for every delivery, one publisher.

These are not :mod:`dwsps.client`: they skip everything a benchmark does not
need (reconnects, handlers, per-request futures) so that one Python process
can receive as many frames as possible. Every delivery is still parsed and
checked: each publish carries a sequence number ``s`` and a send time ``t``
(``time.perf_counter_ns`` of this process) in its message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

_loads = orjson.loads
_now_ns = time.perf_counter_ns


class Tracker:
    """Delivery accounting shared by every subscriber of one run.

    Sequence numbers start at 0 and a subscriber must see them in order.
    ``completed`` is the count of leading publishes every live subscriber has
    received (the e2e flow window). Probe messages (negative ``s``) only mark
    that the path from publisher to subscribers works.
    """

    def __init__(self, ring: int) -> None:
        size = 1
        while size < ring:
            size *= 2
        self._counts = [0] * size
        self._mask = size - 1
        self.live = 0
        self.delivered = 0
        self.completed = 0
        self.probe_seen = False
        self.latency_from = -1
        """Record latency samples for sequence numbers at or above this (-1: none)."""
        self.latencies: list[int] = []
        self.wake: Callable[[], None] | None = None

    def count(self, seq: int) -> None:
        """One subscriber received ``seq`` in order: advance the e2e window."""
        i = seq & self._mask
        self._counts[i] += 1
        if seq == self.completed and self._counts[i] >= self.live:
            self._advance()

    def subscriber_gone(self) -> None:
        """A subscriber closed: the window no longer waits for it."""
        self.live -= 1
        if self.live > 0:
            self._advance()

    def _advance(self) -> None:
        counts, mask, live = self._counts, self._mask, self.live
        done = self.completed
        while counts[done & mask] >= live and counts[done & mask] > 0:
            counts[done & mask] = 0
            done += 1
        if done != self.completed:
            self.completed = done
            if self.wake is not None:
                self.wake()


class Subscriber(WSListener):
    """One subscriber connection: checks order, counts gaps and repeats."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.transport: WSTransport | None = None
        self.expected = 0
        self.gaps = 0
        self.out_of_order = 0
        self.other = 0
        self.errors: list[str] = []
        self.close_code: int | None = None
        self.closed_by_server = False
        self.stopping = False
        self._frag: bytearray | None = None
        self._ack: asyncio.Future[None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.stopping:
            self.closed_by_server = True
            self.tracker.subscriber_gone()
        if self._ack is not None and not self._ack.done():
            self._ack.set_exception(ConnectionError("closed before the subscribe ack"))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT and frame.fin and self._frag is None:
            self._message(frame.get_payload_as_bytes())
        elif kind is WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code().value)
            if not self.stopping:
                self.closed_by_server = True
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        elif kind is WSMsgType.TEXT:
            self._frag = bytearray(frame.get_payload_as_bytes())
        elif kind is WSMsgType.CONTINUATION and self._frag is not None:
            self._frag += frame.get_payload_as_memoryview()
            if frame.fin:
                data, self._frag = bytes(self._frag), None
                self._message(data)

    def _message(self, data: bytes) -> None:
        obj = _loads(data)
        if obj.get("type") == "publish":
            seq = obj["message"]["s"]
            tracker = self.tracker
            if seq == self.expected:
                self.expected = seq + 1
            elif seq > self.expected:
                self.gaps += seq - self.expected
                self.expected = seq + 1
            elif seq < 0:
                tracker.probe_seen = True
                return
            else:
                self.out_of_order += 1
                return
            tracker.delivered += 1
            tracker.count(seq)
            if 0 <= tracker.latency_from <= seq:
                tracker.latencies.append(_now_ns() - obj["message"]["t"])
        elif obj.get("type") == "ack" and self._ack is not None:
            if not self._ack.done():
                self._ack.set_result(None)
        else:
            self.other += 1
            if len(self.errors) < 5:
                self.errors.append(data[:200].decode(errors="replace"))
            if self._ack is not None and not self._ack.done():
                self._ack.set_exception(RuntimeError(data[:200].decode(errors="replace")))

    async def subscribe(self, topic: str, wait: float) -> None:
        """Subscribe and wait for the ack."""
        assert self.transport is not None
        self._ack = asyncio.get_running_loop().create_future()
        self.transport.send(WSMsgType.TEXT, orjson.dumps({"type": "subscribe", "topic": topic}))
        await asyncio.wait_for(self._ack, wait)
        self._ack = None


class Publisher(WSListener):
    """The publishing connection: sends numbered publishes and counts acks."""

    def __init__(self, topic: str, payload: int) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.error_sample: list[str] = []
        self.closed = False
        self.stopping = False
        self.wake: Callable[[], None] | None = None
        self._head = _head(topic)
        # Pad so that the message JSON is about ``payload`` bytes.
        pad = max(0, payload - 40)
        self._tail = b',"p":"' + b"x" * pad + b'"}}'

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.stopping:
            self.closed = True
        if self.wake is not None:
            self.wake()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.closed = True
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.TEXT:
            return
        data = frame.get_payload_as_bytes()
        # Acks are the bulk; check the common case cheaply before parsing.
        if data.startswith(b'{"type":"ack"'):
            self.acked += 1
        else:
            obj = _loads(data)
            if obj.get("type") == "ack":
                self.acked += 1
            elif obj.get("type") == "error":
                self.errors += 1
                self.acked += 1
                if len(self.error_sample) < 5:
                    self.error_sample.append(data[:200].decode(errors="replace"))
        if self.wake is not None:
            self.wake()

    def publish(self, seq: int, topic: str | None = None) -> None:
        """Send publish number ``seq`` (negative: a probe), to ``topic`` if given."""
        assert self.transport is not None
        head = self._head if topic is None else _head(topic)
        frame = head + b"%d" % seq + b',"t":%d' % _now_ns() + self._tail
        self.transport.send(WSMsgType.TEXT, frame)
        if seq >= 0:
            self.sent += 1


def _head(topic: str) -> bytes:
    return b'{"type":"publish","topic":' + orjson.dumps(topic) + b',"message":{"s":'


async def connect(
    factory: Callable[[], Any], url: str, wait: float, token: str | None = None
) -> Any:
    """Open one benchmark connection (``token``: a bearer token to present); return its listener."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    _, listener = await asyncio.wait_for(
        ws_connect(
            factory,
            url,
            read_buffer_init_size=64 * 1024,
            max_frame_size=64 << 20,
            extra_headers=headers,
        ),
        wait,
    )
    return listener


async def probe(url: str, wait: float, token: str | None = None) -> None:
    """Open and close one connection to ``url``; raise what stopped it."""
    listener: Publisher = await connect(lambda: Publisher("probe", 0), url, wait, token)
    await close([listener], wait)


async def close(listeners: list[Any], wait: float = 2.0) -> None:
    """Close every connection with 1000 and wait (bounded) for them to go."""
    waits = []
    for listener in listeners:
        listener.stopping = True
        transport: WSTransport | None = listener.transport
        if transport is None or transport.is_disconnected:
            continue
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode.OK)
        waits.append(transport.wait_disconnected())
    if waits:
        try:
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), wait)
        except TimeoutError:
            for listener in listeners:
                if listener.transport is not None:
                    listener.transport.disconnect(graceful=False)
