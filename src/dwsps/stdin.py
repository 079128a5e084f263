"""Lines of standard input as they arrive, for ``dwsps pub --lines``.

A pipe, a terminal or a socket is read without blocking the event loop, so
``tail -f app.log | dwsps pub logs --lines`` publishes each line the moment
``tail`` writes it; a regular file (``< app.log``) or ``/dev/null`` never
blocks and is read directly. Lines are bounded: one longer than the limit is skipped whole and
reported as :class:`LineTooLong`, never held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from types import TracebackType
from typing import BinaryIO, Final

# Re-exported: callers catch dwsps.stdin.LineTooLong.
from dwsps.errors import LineTooLong

LINE_LIMIT: Final = 16 * 1024 * 1024
"""Longest line kept, in bytes (the dwsps client's own message size limit)."""


class StdinLines:
    """``async with StdinLines() as lines: while (line := await lines.next()) is not None``."""

    def __init__(self, stream: BinaryIO | None = None, limit: int = LINE_LIMIT) -> None:
        self.stream = stream or sys.stdin.buffer
        self.limit = limit
        self.number = 0
        """The number of the line last returned (or skipped), from 1."""
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.ReadTransport | None = None
        self._stopped = False

    async def __aenter__(self) -> StdinLines:
        fd = self.stream.fileno()
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
            # A file or /dev/null: plain reads, which never wait (and which libuv
            # cannot poll: it aborts the process on them).
            return self
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limit)
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self.stream
        )
        self._reader = reader
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._transport is not None:
            # The pipe transport made the descriptor non-blocking; a terminal shares
            # it with the shell, which must get it back as it was.
            with contextlib.suppress(OSError, ValueError):
                os.set_blocking(self.stream.fileno(), True)
            self._transport.close()

    def stop(self) -> None:
        """End the lines now (e.g. on a signal): :meth:`next` returns None."""
        self._stopped = True
        if self._reader is not None:
            self._reader.feed_eof()

    async def next(self) -> bytes | None:
        """The next line without its line ending; None at the end of input.

        Raises :class:`LineTooLong` for a line over the limit (then go on reading).
        """
        if self._stopped:
            return None
        got = await self._read_pipe() if self._reader is not None else self._read_file()
        if got is None or self._stopped:
            return None
        line, too_long = got
        self.number += 1
        if too_long:
            raise LineTooLong(f"line {self.number} is longer than {self.limit} bytes; skipped")
        return line.removesuffix(b"\n").removesuffix(b"\r")

    async def _read_pipe(self) -> tuple[bytes, bool] | None:
        reader = self._reader
        assert reader is not None
        too_long = False
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # the end: a last line without newline
                line = exc.partial
                if not line and not too_long:
                    return None
            except asyncio.LimitOverrunError as exc:
                # Drop what is buffered of the long line and keep looking for its end.
                await reader.readexactly(exc.consumed)
                too_long = True
                continue
            return line, too_long

    def _read_file(self) -> tuple[bytes, bool] | None:
        line = self.stream.readline(self.limit + 1)
        if not line:
            return None
        if len(line) <= self.limit or line.endswith(b"\n"):
            return line, False
        while (rest := self.stream.readline(self.limit)) and not rest.endswith(b"\n"):
            pass
        return b"", True
