"""Small helpers every test suite shares: time scaling, ports and polling.

* :func:`scaled` stretches a timeout by ``DWSPS_TEST_TIME_SCALE`` (say ``3`` on
  a slow machine); every wait in the tests goes through it.
* :func:`free_port` is a port free right now; :class:`PortReservation` holds one
  for the whole test, for servers that must come back on the same port.
* :func:`eventually` polls state that has no push notification (another
  process's /health, Redis PUBSUB) within a deadline; everything that can be
  awaited is awaited instead.
* :func:`compiled_refuses` is what a compiled class does with a value of the wrong type
  (the pure build's own checks answer it otherwise).
* :func:`unavailable` skips tests whose tool (node, chromium, redis-server) is missing, or
  fails them under ``make unit``/``make test`` (``DWSPS_REQUIRE_TOOLS=1``), so a machine
  without the tool cannot pass the suite by skipping.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import Awaitable, Callable
from typing import NoReturn

import pytest

from dwsps import build

TIME_SCALE = float(os.environ.get("DWSPS_TEST_TIME_SCALE", "1"))
"""How much slower than a quiet developer machine this one is."""

REQUIRE_TOOLS = "DWSPS_REQUIRE_TOOLS"
"""Set to 1 (the Makefile's unit target does) to turn a missing tool's skip into a failure."""


def scaled(seconds: float) -> float:
    """``seconds`` scaled for slow machines (``DWSPS_TEST_TIME_SCALE``)."""
    return seconds * TIME_SCALE


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortReservation:
    """A port nobody else gets while the test runs, yet free to ``listen`` on.

    The socket is bound with SO_REUSEADDR and never listens: connections to the
    port are refused until a server (also SO_REUSEADDR) listens on it, and the
    kernel hands the port to no one else, including after that server dies.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT``."""
        return f"ws://127.0.0.1:{self.port}"

    def release(self) -> None:
        """Give the port back."""
        self.sock.close()


async def eventually(
    probe: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = scaled(10.0)
) -> None:
    """Poll ``probe`` (sync or async) until it returns True; fail naming ``what`` at ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.02)


COMPILED = build.kind() != "pure"
"""Whether this run tests the compiled build (make unit-compiled)."""


def compiled_refuses(value: object, declared: type) -> bool:
    """Check what the compiled build does with ``value`` passed where ``declared`` is
    annotated; True when it is the compiled build's to answer (the test is done).

    mypyc checks annotations at the call: a float for an ``int`` is a ``TypeError`` before
    the class's own check runs, and a bool for an ``int`` passes as an int (as it does for
    mypy), so there is nothing to refuse. The pure build leaves both to the class.
    """
    if not COMPILED or type(value) not in (bool, float) or declared is not int:
        return False
    if type(value) is bool:
        pytest.skip("compiled build: a bool is an int to mypyc (as to mypy)")
    return True


def unavailable(reason: str) -> NoReturn:
    """Skip (the module, at import; else the test) because a tool is missing: ``reason`` says
    which and how to install it. With ``DWSPS_REQUIRE_TOOLS=1`` fail instead."""
    if os.environ.get(REQUIRE_TOOLS, "") not in ("", "0"):
        pytest.fail(f"{reason} [{REQUIRE_TOOLS}=1: every test must run here]", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
