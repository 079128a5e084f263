"""Fixtures for the backplane suite: a real redis-server and reads of its status.

* ``RedisProcess`` runs ``redis-server --port N --save '' --appendonly no`` on a
  free port, waits for its "Ready to accept connections" line, and can be
  SIGKILLed and started again on the same port. Every one is stopped.
* ``redis_proc`` / ``redis_url`` / ``redis_admin``: one Redis per test, its
  URL, and a redis-py client for ``PUBSUB`` checks.
* ``NO_HEARTBEAT``: the arguments for the ``dwsps serve`` processes these tests
  start with the shared ``serve_process`` fixture; clients come from the shared
  ``open_client`` fixture (both in tests/conftest.py).

Nothing here sleeps to wait for an event: waits are on process output, with
timeouts; ``tests.support.eventually`` polls state that has no push
notification (a server's /health JSON, Redis PUBSUB) within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from tests.support import eventually, free_port, scaled, unavailable
from tests.wsclient import get_json

WAIT = scaled(10.0)
"""Seconds to wait for something that should happen soon."""

NO_HEARTBEAT = ("--heartbeat-interval", "0")
"""Added to every ``dwsps serve`` here: the heartbeat is not what these tests are about."""


class RedisProcess:
    """A redis-server subprocess on a fixed port, restartable."""

    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args
        """More redis-server arguments (they override the defaults: persistence, --dir)."""
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> RedisProcess:
        exe = shutil.which("redis-server")
        if exe is None:
            unavailable("redis-server not installed (scripts/install-system-deps.sh)")
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
            *self.args,
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


async def backplane_status(url: str) -> dict[str, Any]:
    """The ``/health/backplane`` document of the server at ``url``."""
    _, body = await get_json(url, "/health/backplane")
    assert isinstance(body, dict)
    return body


async def wait_subscribed(url: str, *keys: str) -> None:
    """Wait until the server at ``url`` has Redis's confirmation for every key."""

    async def probe() -> bool:
        status = await backplane_status(url)
        return set(keys) <= set(status["subscribed"])

    await eventually(probe, f"{url} to be subscribed upstream to {keys}", WAIT)
