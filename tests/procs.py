"""Real ``dwsps serve`` processes for tests: started on port 0, always stopped.

``dwsps serve --port 0`` prints ``dwsps listening on ws://HOST:PORT`` on stdout
once it is accepting connections; :class:`ServerProcess` waits for that line.
Tests get them from the ``serve_process`` fixture (tests/conftest.py), which
stops every one and puts their output in the report of a failing test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys

from tests.support import scaled

CLI_WAIT = scaled(20.0)


async def finish(proc: asyncio.subprocess.Process, timeout: float) -> tuple[bytes, bytes]:
    """Await ``proc``'s exit and output; killed (and reaped) if it outlives ``timeout``."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return out or b"", err or b""


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m dwsps ARGS`` to completion; return (exit code, stdout, stderr).

    ``env`` is added to this process's environment.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dwsps",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await finish(proc, CLI_WAIT)
    return proc.returncode or 0, out.decode(), err.decode()


_LISTENING = re.compile(rb"dwsps listening on (wss?://\S+)")


class ServerProcess:
    """A ``python -m dwsps serve ARGS`` subprocess; everything it prints is kept in ``output``."""

    def __init__(self, *args: str, port: int = 0, startup_timeout: float = 20.0) -> None:
        self.args = ["serve", "--host", "127.0.0.1", "--port", str(port), *args]
        self.startup_timeout = scaled(startup_timeout)
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.output: list[bytes] = []
        self._reader: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port the server bound."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> ServerProcess:
        """Start the process and wait until it listens."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dwsps",
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(listening))
        try:
            self.url = await asyncio.wait_for(listening, self.startup_timeout)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _read(self, listening: asyncio.Future[str]) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.output.append(line)
            match = _LISTENING.search(line)
            if match and not listening.done():
                listening.set_result(match.group(1).decode())
        if not listening.done():
            listening.set_exception(
                RuntimeError(
                    "dwsps serve exited:\n" + b"".join(self.output).decode(errors="replace")
                )
            )

    def kill(self) -> None:
        """SIGKILL, for crash tests (``stop`` still reaps it)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        return proc.returncode

    def log(self) -> str:
        """Everything the process printed so far."""
        return b"".join(self.output).decode(errors="replace")
