"""Fixtures for the backplane suite: a real redis-server, dwsps processes, small clients.

* ``RedisProcess`` runs ``redis-server --port N --save '' --appendonly no`` on a
  free port, waits for its "Ready to accept connections" line, and can be
  SIGKILLed and started again on the same port. Every one is stopped.
* ``redis_proc`` / ``redis_url`` / ``redis_admin``: one Redis per test, its
  URL, and a redis-py client for ``PUBSUB`` checks.
* ``NO_HEARTBEAT``: the arguments for the ``dwsps serve`` processes these tests
  start with the shared ``serve_process`` fixture (tests/conftest.py).
* ``clients``: :class:`WSClient` connections (``websockets``), all closed.

Nothing here sleeps to wait for an event: waits are on futures, queues and
process output, with timeouts; ``tests.support.eventually`` polls state that has
no push notification (a server's /health JSON, Redis PUBSUB) within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from tests import wsclient
from tests.support import eventually, free_port, scaled

WAIT = scaled(10.0)
"""Seconds to wait for something that should happen soon."""

NO_HEARTBEAT = ("--heartbeat-interval", "0")
"""Added to every ``dwsps serve`` here: the heartbeat is not what these tests are about."""


class RedisProcess:
    """A redis-server subprocess on a fixed port, restartable."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> RedisProcess:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed (scripts/install-system-deps.sh)")
        self.proc = await asyncio.create_subprocess_exec(
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        seen: list[bytes] = []

        async def ready() -> None:
            assert self.proc is not None
            assert self.proc.stdout is not None
            while line := await self.proc.stdout.readline():
                seen.append(line)
                if b"Ready to accept connections" in line:
                    return
            raise RuntimeError("redis-server exited:\n" + b"".join(seen).decode(errors="replace"))

        try:
            await asyncio.wait_for(ready(), WAIT)
        except BaseException:
            await self.stop()
            raise
        self._drain = asyncio.create_task(self._discard_output())
        return self

    async def _discard_output(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain, 5)
            self._drain = None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self.kill()


@pytest.fixture
async def redis_proc() -> AsyncIterator[RedisProcess]:
    proc = RedisProcess()
    try:
        yield await proc.start()
    finally:
        await proc.stop()


@pytest.fixture
def redis_url(redis_proc: RedisProcess) -> str:
    return redis_proc.url


@pytest.fixture
async def redis_admin(redis_proc: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=redis_proc.port, protocol=2)
    try:
        yield client
    finally:
        await client.aclose()


async def numsub(admin: aioredis.Redis, key: str, prefix: str = "dwsps") -> int:
    """Subscribers of the channel for first level ``key`` (Redis ``PUBSUB NUMSUB``)."""
    reply = await admin.pubsub_numsub(f"{prefix}:{key}")
    return int(reply[0][1])


async def http_get(url: str, path: str) -> tuple[int, Any]:
    """GET ``path`` from the server of ws ``url``; (status, decoded JSON body)."""
    status, body = await wsclient.http_get(url, path)
    return status, orjson.loads(body)


async def backplane_status(url: str) -> dict[str, Any]:
    _, body = await http_get(url, "/health/backplane")
    assert isinstance(body, dict)
    return body


async def wait_subscribed(url: str, *keys: str) -> None:
    """Wait until the server at ``url`` has Redis's confirmation for every key."""

    async def probe() -> bool:
        status = await backplane_status(url)
        return set(keys) <= set(status["subscribed"])

    await eventually(probe, f"{url} to be subscribed upstream to {keys}", WAIT)


class WSClient:
    """A minimal dwsps client over ``websockets``: requests with ids, a delivery queue."""

    _ids = itertools.count(1)

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.deliveries: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str) -> WSClient:
        ws = await asyncio.wait_for(websockets.connect(url, max_size=None), WAIT)
        return cls(ws)

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                msg = orjson.loads(raw)
                if msg.get("type") == "publish":
                    self.deliveries.put_nowait(msg)
                elif (
                    "id" in msg
                    and (fut := self.replies.pop(str(msg["id"]), None))
                    and not fut.done()
                ):
                    fut.set_result(msg)

    async def request(self, **req: Any) -> dict[str, Any]:
        req_id = f"r{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[req_id] = fut
        await self.ws.send(orjson.dumps({**req, "id": req_id}).decode())
        reply = await asyncio.wait_for(fut, WAIT)
        assert reply["type"] == "ack", reply
        return reply

    async def subscribe(self, *topics: str) -> None:
        for topic in topics:
            await self.request(type="subscribe", topic=topic)

    async def unsubscribe(self, topic: str) -> None:
        await self.request(type="unsubscribe", topic=topic)

    async def publish(self, topic: str, message: Any, **extra: Any) -> None:
        await self.request(type="publish", topic=topic, message=message, **extra)

    async def take(self, n: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        """The next ``n`` deliveries (fails if they do not come in time)."""
        out: list[dict[str, Any]] = []

        async def collect() -> None:
            while len(out) < n:
                out.append(await self.deliveries.get())

        try:
            await asyncio.wait_for(collect(), timeout)
        except TimeoutError:
            raise AssertionError(f"got {len(out)} of {n} deliveries: {out[-3:]}") from None
        return out

    async def take_until(
        self, stop: Callable[[dict[str, Any]], bool], timeout: float = WAIT
    ) -> list[dict[str, Any]]:
        """Deliveries up to and including the first for which ``stop`` is true."""
        out: list[dict[str, Any]] = []

        async def collect() -> None:
            while True:
                msg = await self.deliveries.get()
                out.append(msg)
                if stop(msg):
                    return

        try:
            await asyncio.wait_for(collect(), timeout)
        except TimeoutError:
            raise AssertionError(f"stop delivery never came; got {len(out)}: {out[-3:]}") from None
        return out

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


ClientFactory = Callable[[str], Awaitable[WSClient]]


@pytest.fixture
async def clients() -> AsyncIterator[ClientFactory]:
    opened: list[WSClient] = []

    async def connect(url: str) -> WSClient:
        client = await WSClient.connect(url)
        opened.append(client)
        return client

    try:
        yield connect
    finally:
        for client in opened:
            with contextlib.suppress(Exception):
                await client.close()
