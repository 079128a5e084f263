"""Clients and status reads for the peering tests.

Test clients use the ``websockets`` library: a plain, independent WebSocket
client, so what they see is what any client would see. Nothing here sleeps to
wait for an event: waits are on conditions, bounded by (scaled) timeouts;
cross-process state (a server's /health) is polled at a short interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from tests.support import scaled

WAIT = scaled(15.0)
"""How long a test waits for something that should happen soon (links reconnect
with a backoff of up to a few seconds)."""


async def health(url: str) -> dict[str, Any]:
    """GET /health of the server at ``ws://host:port``."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, parts.port), scaled(5)
    )
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: dwsps\r\nConnection: close\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(5))
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await asyncio.wait_for(reader.readexactly(length), scaled(5))
    finally:
        writer.close()
    result: dict[str, Any] = orjson.loads(body)
    return result


async def wait_health(
    url: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT, what: str = ""
) -> dict[str, Any]:
    """Poll /health until ``predicate(doc)``; return that document."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        doc = await health(url)
        if predicate(doc):
            return doc
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'health'} at {url}: {doc}")
        await asyncio.sleep(0.05)


class WsClient:
    """A raw dwsps client: sends requests with ids, files replies and deliveries."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.deliveries: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> WsClient:
        ws = await asyncio.wait_for(
            websockets.connect(url, max_size=None, max_queue=None, **kwargs), scaled(10)
        )
        return cls(ws)

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                msg = orjson.loads(raw)
                if msg.get("type") == "publish":
                    self.deliveries.append(msg)
                else:
                    self.replies.append(msg)
                async with self._changed:
                    self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = WAIT, what: str = ""
    ) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
            except TimeoutError:
                raise AssertionError(
                    f"timed out waiting for {what or 'messages'}: "
                    f"{len(self.deliveries)} deliveries, replies {self.replies[-3:]}"
                ) from None

    async def send(self, obj: dict[str, Any]) -> int:
        req_id = next(self._ids)
        await self.ws.send(orjson.dumps({**obj, "id": req_id}).decode())
        return req_id

    async def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its reply (ack or error)."""
        req_id = await self.send(obj)
        await self.wait_for(
            lambda: any(r.get("id") == req_id for r in self.replies), what=f"reply {req_id}"
        )
        return next(r for r in self.replies if r.get("id") == req_id)

    async def subscribe(self, topic: str) -> None:
        reply = await self.request({"type": "subscribe", "topic": topic})
        assert reply["type"] == "ack", reply

    async def publish(self, topic: str, message: Any, **extra: Any) -> dict[str, Any]:
        return await self.request({"type": "publish", "topic": topic, "message": message, **extra})

    def messages(self, topic: str | None = None) -> list[Any]:
        """The ``message`` of every delivery so far (optionally for one topic)."""
        return [d["message"] for d in self.deliveries if topic is None or d["topic"] == topic]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), scaled(5))
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
