"""Fixtures of the peering suite: clients and proxies, each cleaned up after the
test whatever happened (server processes and reserved ports: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

from tests.peering.helpers import WsClient
from tests.peering.proxy import TcpProxy


class ClientFactory(Protocol):
    async def __call__(self, url: str, **kwargs: Any) -> WsClient: ...


@pytest.fixture
async def client() -> AsyncIterator[ClientFactory]:
    """Open :class:`WsClient` connections; all closed after the test."""
    clients: list[WsClient] = []

    async def connect(url: str, **kwargs: Any) -> WsClient:
        c = await WsClient.connect(url, **kwargs)
        clients.append(c)
        return c

    try:
        yield connect
    finally:
        for c in clients:
            await c.close()


class ProxyFactory(Protocol):
    async def __call__(self, upstream_port: int) -> TcpProxy: ...


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    """``await make_proxy(port)``: a :class:`TcpProxy` to 127.0.0.1:port, closed after."""
    held: list[TcpProxy] = []

    async def make(upstream_port: int) -> TcpProxy:
        proxy = TcpProxy("127.0.0.1", upstream_port)
        held.append(proxy)
        return await proxy.start()

    try:
        yield make
    finally:
        for p in held:
            await p.close()
