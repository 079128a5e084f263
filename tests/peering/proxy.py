"""A TCP proxy the peering tests control: cut every connection, refuse new ones, or
silently discard one direction of traffic (to strand messages or their acks).

It listens on a port it owns for its whole life, so the link under test keeps
one URL while the test breaks the path behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class TcpProxy:
    """``127.0.0.1:port`` -> ``upstream``, with switches.

    * :meth:`cut` aborts every open connection (both sides, no FIN handshake
      waiting on the peer), and :attr:`accepting` = False makes new ones reset
      at once: the path is "down".
    * :attr:`discard_to_upstream` / :attr:`discard_to_client` drop the bytes
      flowing that way while the TCP connections stay up: requests that vanish,
      or replies (acks) that vanish.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.accepting = True
        self.discard_to_upstream = False
        self.discard_to_client = False
        self.accepted = 0
        self.refused = 0
        self.connected = asyncio.Event()
        """Set whenever a connection is piped through (clear it to wait for the next)."""
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def cut(self) -> None:
        """Abort every open connection (RST both ways)."""
        for client, upstream in list(self._pairs):
            _reset(client)
            _reset(upstream)
        self._pairs.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            self.refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.refused += 1
            _reset(writer)
            return
        if not self.accepting:  # cut while we were connecting upstream
            self.refused += 1
            _reset(writer)
            _reset(up_writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        self.accepted += 1
        self.connected.set()
        to_up = asyncio.create_task(self._pipe(reader, up_writer, upstream=True))
        to_client = asyncio.create_task(self._pipe(up_reader, writer, upstream=False))
        for task in (to_up, to_client):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait({to_up, to_client}, return_when=asyncio.FIRST_COMPLETED)
        self._pairs.discard(pair)
        _reset(writer)
        _reset(up_writer)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self.discard_to_upstream if upstream else self.discard_to_client:
                    continue
                writer.write(data)
                await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a broken network or a crashed host would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
