"""The robustness suite's target: one ``dwsps serve`` process for the whole module,
with the canary connected to it from start to finish (see harness.py).

The attacks (test_attacks.py) are marked ``robustness``: ``make test`` runs the short
version (scale 1), ``make fuzz`` only them, at the long scale (``DWSPS_FUZZ_SCALE``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest_asyncio

from tests.procs import ServerProcess
from tests.robustness.harness import MEMORY_BUDGET, Canary, Memory, Tally

HANDSHAKE_TIMEOUT = 2.0
"""The target's --handshake-timeout: how long a slowloris client may hold a socket."""


@dataclass
class Target:
    """The server under attack and what watches it."""

    proc: ServerProcess
    canary: Canary
    memory: Memory
    tally: Tally = field(default_factory=Tally)

    @property
    def url(self) -> str:
        return self.proc.url

    def alive(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.returncode is None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def target() -> AsyncIterator[Target]:
    """One server for every attack of the module; stopped (and reported) at the end."""
    proc = ServerProcess(
        "--handshake-timeout",
        str(HANDSHAKE_TIMEOUT),
        "--memory-budget",
        str(MEMORY_BUDGET),
    )
    try:
        await proc.start()
        canary = Canary(proc.url)
        try:
            await canary.start()
            found = Target(proc, canary, Memory(proc.pid))
            yield found
        finally:
            await canary.stop()
            report = os.environ.get("DWSPS_FUZZ_REPORT")
            if report:
                data = orjson.dumps(found.tally.summary(), option=orjson.OPT_INDENT_2)
                await asyncio.to_thread(Path(report).write_bytes, data)
    finally:
        await proc.stop()
