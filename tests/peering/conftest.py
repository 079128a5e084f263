"""Fixtures of the peering suite: server processes, clients, reserved ports and
proxies, each cleaned up after the test whatever happened."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import pytest

from tests.peering.helpers import WsClient
from tests.peering.proxy import TcpProxy
from tests.procs import ServerProcess
from tests.support import PortReservation


class ProcFactory(Protocol):
    async def __call__(self, *args: str, port: int = 0) -> ServerProcess: ...


class ClientFactory(Protocol):
    async def __call__(self, url: str, **kwargs: Any) -> WsClient: ...


@pytest.fixture
async def serve() -> AsyncIterator[ProcFactory]:
    """Start ``dwsps serve`` processes; every one is stopped after the test."""
    procs: list[ServerProcess] = []

    async def start(*args: str, port: int = 0) -> ServerProcess:
        proc = ServerProcess(*args, port=port)
        procs.append(proc)
        return await proc.start()

    try:
        yield start
    finally:
        for proc in procs:
            await proc.stop()


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


@pytest.fixture
def reserve_port() -> Iterator[Callable[[], PortReservation]]:
    """``reserve_port()`` holds a free port for the test (see PortReservation)."""
    held: list[PortReservation] = []

    def reserve() -> PortReservation:
        held.append(PortReservation())
        return held[-1]

    try:
        yield reserve
    finally:
        for p in held:
            p.release()


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
