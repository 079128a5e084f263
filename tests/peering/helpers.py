"""Waits for the peering tests.

Clients are the shared :class:`tests.wsclient.RawClient` (the ``open_client``
fixture) and /health is read with :func:`tests.wsclient.health`. Nothing here
sleeps to wait for an event: cross-process state (a server's /health) is
polled at a short interval within a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.support import scaled
from tests.wsclient import health

WAIT = scaled(15.0)
"""How long a test waits for something that should happen soon (links reconnect
with a backoff of up to a few seconds)."""


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
