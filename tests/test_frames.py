"""Server frame encoding (pure: no sockets)."""

from __future__ import annotations

import asyncio
import struct

import pytest
from websockets.frames import Frame, Opcode

from dwsps.frames import text_frame
from tests.wsclient import OP_TEXT, read_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000, 1 << 20])
def test_text_frame_matches_an_independent_encoder(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    frame = text_frame(payload)
    # websockets' encoder is the reference: same bytes, unmasked server frame.
    assert frame == Frame(Opcode.TEXT, payload).serialize(mask=False)


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e" + struct.pack("!H", 126)),
        (65535, b"\x81\x7e" + struct.pack("!H", 65535)),
        (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
    ],
)
def test_text_frame_header_is_fin_text_unmasked_with_minimal_length(
    size: int, header: bytes
) -> None:
    frame = text_frame(b"a" * size)
    assert frame[: len(header)] == header
    assert frame[len(header) :] == b"a" * size
    assert frame[1] & 0x80 == 0, "server frames must not be masked"


def test_text_frame_reads_back() -> None:
    payload = '{"type":"ack","topic":"ñews"}'.encode()

    async def read_back() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(text_frame(payload) + text_frame(b"x" * 300))
        reader.feed_eof()
        first = await read_frame(reader)
        second = await read_frame(reader)
        assert (first.opcode, first.fin, first.rsv, first.masked) == (OP_TEXT, True, 0, False)
        assert first.payload == payload
        assert second.payload == b"x" * 300

    asyncio.run(read_back())
