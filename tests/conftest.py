"""Shared fixtures: servers (in-process or ``dwsps serve`` processes), raw WebSocket
clients and held ports, always cleaned up.

Kept generic on purpose; feature suites (peering, backplane) add their own
``conftest.py`` next to their tests for what only they need.

* ``make_server(**overrides)`` starts a :class:`dwsps.Server` on 127.0.0.1,
  port 0, and closes it after the test; ``server`` is one with the defaults.
* ``serve_process(*args, port=0)`` starts ``dwsps serve ARGS``
  (:class:`tests.procs.ServerProcess`) and stops it after the test; when the
  test fails, each process's output is added to the report.
* ``open_client(url, **kw)`` opens a :class:`tests.wsclient.RawClient` and
  closes it after the test.
* ``reserve_port()`` holds a port for the test (:class:`tests.support.PortReservation`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any, Protocol

import pytest

from dwsps import Server
from tests.procs import ServerProcess
from tests.support import PortReservation
from tests.wsclient import RawClient


class ServerFactory(Protocol):
    def __call__(self, **overrides: Any) -> Awaitable[Server]: ...


class ProcessFactory(Protocol):
    def __call__(self, *args: str, port: int = 0) -> Awaitable[ServerProcess]: ...


class ClientFactory(Protocol):
    def __call__(self, url: str, **options: Any) -> Awaitable[RawClient]: ...


PortFactory = Callable[[], PortReservation]

_PROCESSES = pytest.StashKey[list[ServerProcess]]()
"""The ``dwsps serve`` processes a test started, for its failure report."""


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
async def serve_process(request: pytest.FixtureRequest) -> AsyncIterator[ProcessFactory]:
    """Start ``dwsps serve ARGS`` processes (port 0 unless told); all stopped after the test."""
    started = request.node.stash.setdefault(_PROCESSES, [])

    async def start(*args: str, port: int = 0) -> ServerProcess:
        proc = ServerProcess(*args, port=port)
        started.append(proc)
        return await proc.start()

    try:
        yield start
    finally:
        results = await asyncio.gather(*(p.stop() for p in started), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report shows what its ``dwsps serve`` processes printed."""
    if call.excinfo is not None:
        for proc in item.stash.get(_PROCESSES, []):
            title = f"dwsps {' '.join(proc.args)} ({proc.url or 'not listening'})"
            item.add_report_section(call.when, title, proc.log())
    return (yield)


@pytest.fixture
def reserve_port() -> Iterator[PortFactory]:
    """``reserve_port()`` holds a free port until the test ends (see PortReservation)."""
    held: list[PortReservation] = []

    def reserve() -> PortReservation:
        held.append(PortReservation())
        return held[-1]

    try:
        yield reserve
    finally:
        for p in held:
            p.release()


@pytest.fixture
async def open_client() -> AsyncIterator[ClientFactory]:
    """Open raw WebSocket clients (see :meth:`RawClient.connect` for the options).

    After the test each one still open says goodbye with a close handshake (all at
    once, each bounded), as a well-behaved client would, then its socket is dropped.
    """
    clients: list[RawClient] = []

    async def connect(url: str, **options: Any) -> RawClient:
        client = await RawClient.connect(url, **options)
        clients.append(client)
        return client

    try:
        yield connect
    finally:
        await asyncio.gather(*(client.close() for client in clients))
