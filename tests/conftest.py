"""Shared fixtures: in-process servers and raw WebSocket clients, always cleaned up.

Kept generic on purpose; feature suites (peering, backplane) add their own
``conftest.py`` next to their tests.

* ``make_server(**overrides)`` starts a :class:`dwsps.Server` on 127.0.0.1,
  port 0, and closes it after the test; ``server`` is one with the defaults.
* ``open_client(url, **kw)`` opens a :class:`tests.wsclient.RawClient` and
  closes it after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import pytest

from dwsps import Server
from tests.wsclient import RawClient


class ServerFactory(Protocol):
    def __call__(self, **overrides: Any) -> Awaitable[Server]: ...


class ClientFactory(Protocol):
    def __call__(self, url: str, **options: Any) -> Awaitable[RawClient]: ...


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    """Start in-process servers (``Server(host="127.0.0.1", port=0, **overrides)``)."""
    servers: list[Server] = []

    async def make(**overrides: Any) -> Server:
        overrides.setdefault("host", "127.0.0.1")
        overrides.setdefault("port", 0)
        srv = Server(**overrides)
        await srv.start()
        servers.append(srv)
        return srv

    try:
        yield make
    finally:
        for srv in reversed(servers):
            await srv.close()


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    """A server with the default configuration."""
    return await make_server()


@pytest.fixture
async def open_client() -> AsyncIterator[ClientFactory]:
    """Open raw WebSocket clients (see :meth:`RawClient.connect` for the options)."""
    clients: list[RawClient] = []

    async def connect(url: str, **options: Any) -> RawClient:
        client = await RawClient.connect(url, **options)
        clients.append(client)
        return client

    try:
        yield connect
    finally:
        for client in clients:
            await client.dispose()
