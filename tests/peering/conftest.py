"""Fixtures of the peering suite: TCP proxies, each closed after the test whatever
happened (servers, clients and reserved ports come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import pytest

from tests.peering.proxy import TcpProxy


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
