"""``dwsps serve --workers N``: N processes on one port that act as one server.

The :class:`Supervisor` (the ``dwsps serve`` process itself) starts N worker
processes, each an ordinary ``dwsps serve`` that binds the same port with
``SO_REUSEPORT`` (the kernel spreads new connections over them) and is told
which :class:`Worker` it is through the ``DWSPS_WORKER`` variable. Unless a
shared backplane is configured (then every worker joins it as a server of the
group), the workers are tied together by the ``ipc://`` backplane
(:mod:`dwsps.links.ipc`): Unix sockets in a private directory, interest per
channel key, one ordered stream per pair of workers.

The supervisor owns no client socket. It

* reserves the port when asked for port 0 (a bound, never listening
  ``SO_REUSEPORT`` socket), so every worker, and a restarted one, binds the
  same port;
* prints ``dwsps listening on URL`` once every worker listens (what the
  workers print themselves is not repeated);
* restarts a worker that exits while it should run, with backoff;
* forwards SIGTERM / SIGINT to every worker, waits for them, removes the
  directory and exits 0. Workers run in their own session (a terminal's
  Ctrl-C reaches only the supervisor, which decides) and stop by themselves
  when the supervisor's end of their stdin pipe closes (a supervisor killed
  with SIGKILL leaves no workers behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from dwsps.backoff import Backoff
from dwsps.config import ServerConfig

log = logging.getLogger("dwsps.workers")

ENV: Final = "DWSPS_WORKER"
"""``SLOT/COUNT:DIRECTORY``, set by the supervisor for each worker."""
_LISTENING: Final = re.compile(rb"dwsps listening on (\S+)")
_STABLE_AFTER: Final = 5.0
"""A worker that lived this long resets the restart backoff."""


@dataclass(frozen=True, slots=True)
class Worker:
    """Which worker of a ``--workers`` server this process is."""

    slot: int
    count: int
    directory: str

    def to_env(self) -> str:
        """The value of :data:`ENV` for this worker."""
        return f"{self.slot}/{self.count}:{self.directory}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Worker | None:
        """This process's worker, or None when it is not one (ValueError for a bad value)."""
        text = environ.get(ENV)
        if not text:
            return None
        numbers, sep, directory = text.partition(":")
        slot, _, count = numbers.partition("/")
        if not sep or not directory or not slot.isdigit() or not count.isdigit():
            raise ValueError(f"{ENV}={text!r}: want SLOT/COUNT:DIRECTORY")
        return cls(int(slot), int(count), directory)

    @property
    def label(self) -> str:
        """The ``worker`` label of this worker's metrics."""
        return str(self.slot)

    def backplane_url(self) -> str:
        """The ``ipc://`` URL of this worker's backplane."""
        return f"ipc://{self.directory}?slot={self.slot}&workers={self.count}"


class Supervisor:
    """Runs ``count`` workers of ``dwsps serve ARGS``; see the module docstring."""

    def __init__(self, serve_args: list[str], config: ServerConfig, count: int) -> None:
        self.serve_args = serve_args
        self.config = config
        self.count = count
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._directory = ""
        self._port = config.port
        self._url = ""
        self._pumps: set[asyncio.Task[None]] = set()

    def _command(self, slot: int) -> list[str]:
        # Flags given last win over the same flags given earlier, the TOML file and
        # the environment.
        args = [*self.serve_args, "--workers", "1", "--port", str(self._port)]
        if self.config.backplane.startswith(("memory://", "ipc://")):  # not shared: ours
            worker = Worker(slot, self.count, self._directory)
            args += ["--backplane", worker.backplane_url()]
        return [sys.executable, "-m", "dwsps", "serve", *args]

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the exit code."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            reservation = self._reserve_port() if self.config.port == 0 else None
        except OSError as exc:
            where = f"{self.config.host}:{self.config.port}"
            print(
                f"dwsps serve: port (--port): cannot listen on {where}: {exc.strerror or exc}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        self._directory = tempfile.mkdtemp(prefix="dwsps-workers-")
        failed: asyncio.Future[int] = loop.create_future()
        ready = [loop.create_future() for _ in range(self.count)]
        keepers = [
            loop.create_task(self._keep(slot, ready[slot], failed)) for slot in range(self.count)
        ]
        stopped = loop.create_task(stop.wait())
        started = asyncio.gather(*ready)
        code = 0
        try:
            first: list[asyncio.Future[Any]] = [started, failed, stopped]
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if failed.done():
                code = failed.result()
            elif started.done():
                # Failures only count before the first listen: from here on, restarts.
                print(f"dwsps listening on {self._url} ({self.count} workers)", flush=True)
                await stopped
        finally:
            started.cancel()
            stopped.cancel()
            await self._stop_all(keepers)
            if reservation is not None:
                reservation.close()
            shutil.rmtree(self._directory, ignore_errors=True)
        return code

    def _reserve_port(self) -> socket.socket:
        infos = socket.getaddrinfo(
            self.config.host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        self._port = int(sock.getsockname()[1])
        return sock

    async def _keep(
        self, slot: int, ready: asyncio.Future[None], failed: asyncio.Future[int]
    ) -> None:
        """Run worker ``slot``; start it again whenever it exits while it should run."""
        backoff = Backoff(0.1, 5.0)
        while not self._stopping:
            env = dict(os.environ, **{ENV: Worker(slot, self.count, self._directory).to_env()})
            proc = await asyncio.create_subprocess_exec(
                *self._command(slot),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            self.procs[slot] = proc
            if self._stopping:  # SIGTERM came while it was being started
                proc.terminate()
                await proc.wait()
                return
            began = time.monotonic()
            listening = await self._pump(proc)
            if listening:
                log.info("worker %d (pid %d) listening", slot, proc.pid)
                if not ready.done():
                    ready.set_result(None)
            code = await proc.wait()
            if self._stopping:
                return
            if not ready.done():
                # A worker that cannot even start the first time (a bad setting, a
                # port in use) will not do better when restarted.
                log.error("worker %d exited with %s before listening", slot, code)
                if not failed.done():
                    failed.set_result(code or 1)
                return
            log.warning("worker %d (pid %d) exited with %s; restarting it", slot, proc.pid, code)
            if time.monotonic() - began > _STABLE_AFTER:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())

    async def _pump(self, proc: asyncio.subprocess.Process) -> bool:
        """Pass the worker's stdout on until it says it listens (True) or ends (False)."""
        assert proc.stdout is not None
        stdout = proc.stdout
        while line := await stdout.readline():
            match = _LISTENING.match(line)
            if match:
                self._url = match.group(1).decode()
                pump = asyncio.get_running_loop().create_task(self._pass_through(stdout))
                self._pumps.add(pump)
                pump.add_done_callback(self._pumps.discard)
                return True
            _out(line)
        return False

    async def _pass_through(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            _out(line)

    async def _stop_all(self, keepers: list[asyncio.Task[None]]) -> None:
        self._stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        waits = [proc.wait() for proc in self.procs.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.config.close_timeout + 5.0)
        except TimeoutError:
            for proc in self.procs.values():
                if proc.returncode is None:
                    log.warning("worker (pid %d) did not stop; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(proc.wait() for proc in self.procs.values()))
        for task in [*keepers, *self._pumps]:
            task.cancel()
        await asyncio.gather(*keepers, *self._pumps, return_exceptions=True)


def _out(line: bytes) -> None:
    sys.stdout.buffer.write(line)
    sys.stdout.flush()
