"""Malformed input for the robustness suite, generated from a seeded ``random.Random``.

:func:`bad_request` makes one text or binary frame the server must answer with
exactly one error reply and keep the connection open: bad JSON, JSON that is not
an object, missing or wrong-typed fields, unknown types, bad topics, nesting past
the limit, binary frames. :data:`FRAMING_CASES` are violations of RFC 6455 that
must close the connection with a given code (or at least end it): bad opcodes,
RSV bits, unmasked frames, fragments out of order or interleaved, control frames
fragmented or too long, invalid UTF-8, frames over the size limit, truncated frames.
"""

from __future__ import annotations

import random
import string
import struct
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from tests.wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    close_payload,
    encode_frame,
)

MAX_FRAME = 1024 * 1024
"""The target server's frame size limit (the default)."""

_PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "


def _garbage(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_PRINTABLE) for _ in range(n))


def _bad_topic(rng: random.Random, action: str) -> object:
    if action == "publish" and rng.random() < 0.1:
        return rng.choice(["news.*.x", "*"])  # a * level: only a subscription may have one
    return rng.choice(
        [
            "",
            "a..b",
            ".a",
            "a.",
            "a b",
            "a\tb",
            "tab\x01",
            "x" * 300,
            ".".join(["l"] * 40),
            5,
            None,
            ["a"],
            {"t": 1},
        ]
    )


def _deep(depth: int) -> bytes:
    return b'{"type":"publish","topic":"d","message":' + b"[" * depth + b"]" * depth + b"}"


def bad_request(rng: random.Random) -> tuple[int, bytes]:
    """(opcode, payload) of one request that gets exactly one error reply."""
    kind = rng.randrange(10)
    if kind == 0:  # not JSON at all, or cut short
        valid = orjson.dumps({"type": "publish", "topic": "a.b", "message": _garbage(rng, 20)})
        text = valid[: rng.randrange(1, len(valid) - 1)] if rng.random() < 0.5 else None
        return OP_TEXT, text if text is not None else ("{" + _garbage(rng, 30)).encode()
    if kind == 1:  # JSON, not an object
        return OP_TEXT, rng.choice([b"[]", b"1", b'"s"', b"null", b"true", b"[{}]", b"-0.5e9"])
    if kind == 2:  # no type, or a type that is not a string
        return OP_TEXT, orjson.dumps({"topic": "a", "type": rng.choice([None, 5, [], {}, True])})
    if kind == 3:
        return OP_TEXT, orjson.dumps({"type": _garbage(rng, rng.randrange(1, 100))})
    if kind == 4:  # bad topics, every request type
        action = rng.choice(["subscribe", "unsubscribe", "publish"])
        return OP_TEXT, orjson.dumps(
            {"type": action, "topic": _bad_topic(rng, action), "message": 1}
        )
    if kind == 5:  # bad ids
        bad_id = rng.choice([[1], {"a": 1}, 1.5, True, "i" * 65])
        return OP_TEXT, orjson.dumps({"type": "subscribe", "topic": "a", "id": bad_id})
    if kind == 6:
        return OP_TEXT, orjson.dumps({"type": "publish", "message": 1})  # no topic
    if kind == 7:
        return OP_TEXT, _deep(rng.choice([255, 300, 1023, 1030]))
    if kind == 8:
        return OP_TEXT, orjson.dumps({"type": "auth", "token": rng.choice(["", 5, None])})
    return OP_BINARY, rng.randbytes(rng.randrange(0, 200))


@dataclass(frozen=True)
class FramingCase:
    """Bytes to send after the handshake and the ways the connection may end.

    ``outcomes`` holds close codes and ``"eof"`` (the stream ended without a close
    frame); ``eof_after`` half-closes our side after sending (a truncated frame).
    """

    name: str
    data: Callable[[random.Random], bytes]
    outcomes: frozenset[int | str]
    eof_after: bool = False


def _frames(*frames: bytes) -> Callable[[random.Random], bytes]:
    joined = b"".join(frames)
    return lambda rng: joined


def _invalid_utf8(rng: random.Random) -> bytes:
    bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"])
    return b'{"type":"publish","topic":"u","message":"' + bad + b'"}'


PROTOCOL_ERROR = frozenset({1002})
_PUB = orjson.dumps({"type": "publish", "topic": "f", "message": "x" * 64})

FRAMING_CASES: tuple[FramingCase, ...] = (
    *(
        FramingCase(f"opcode-{op:#x}", _frames(encode_frame(op, b"x")), PROTOCOL_ERROR)
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ),
    *(
        FramingCase(f"rsv-{rsv}", _frames(encode_frame(OP_TEXT, _PUB, rsv=rsv)), PROTOCOL_ERROR)
        for rsv in range(1, 8)
    ),
    FramingCase("unmasked", _frames(encode_frame(OP_TEXT, _PUB, mask=False)), PROTOCOL_ERROR),
    FramingCase("continuation-first", _frames(encode_frame(OP_CONT, _PUB)), PROTOCOL_ERROR),
    FramingCase(
        "text-inside-fragmented-text",
        _frames(encode_frame(OP_TEXT, _PUB[:10], fin=False), encode_frame(OP_TEXT, _PUB)),
        PROTOCOL_ERROR,
    ),
    FramingCase(
        "binary-inside-fragmented-text",
        _frames(encode_frame(OP_TEXT, _PUB[:10], fin=False), encode_frame(OP_BINARY, b"b")),
        PROTOCOL_ERROR,
    ),
    FramingCase("fragmented-ping", _frames(encode_frame(OP_PING, b"p", fin=False)), PROTOCOL_ERROR),
    FramingCase("ping-126-bytes", _frames(encode_frame(OP_PING, b"p" * 126)), PROTOCOL_ERROR),
    FramingCase("close-1-byte", _frames(encode_frame(OP_CLOSE, b"\x03")), PROTOCOL_ERROR),
    FramingCase(
        "invalid-utf8", lambda rng: encode_frame(OP_TEXT, _invalid_utf8(rng)), frozenset({1007})
    ),
    FramingCase(
        "invalid-utf8-across-fragments",
        _frames(
            encode_frame(OP_TEXT, b'{"type":"publish","topic":"u","message":"\xe2', fin=False),
            encode_frame(OP_CONT, b'("}'),
        ),
        frozenset({1007}),
    ),
    FramingCase(
        "length-over-limit",
        _frames(encode_frame(OP_TEXT, b"", length=MAX_FRAME + 1)[:14]),
        frozenset({1009}),
    ),
    FramingCase(
        "length-2^63",
        _frames(struct.pack("!BBQ", 0x81, 0x80 | 127, 2**63 - 1) + b"mask"),
        frozenset({1009, 1002}),
    ),
    FramingCase("truncated-header", _frames(b"\x81"), frozenset({"eof", 1002}), eof_after=True),
    FramingCase(
        "truncated-payload",
        _frames(encode_frame(OP_TEXT, _PUB)[: len(_PUB) // 2]),
        frozenset({"eof", 1002}),
        eof_after=True,
    ),
    FramingCase(
        "truncated-fragmented",
        _frames(encode_frame(OP_TEXT, _PUB[:20], fin=False)),
        frozenset({"eof", 1002}),
        eof_after=True,
    ),
)
"""One connection each, run in rounds (:data:`tests.robustness.harness.SCALE` rounds)."""

OVERSIZED_FRAGMENTS = FramingCase(
    "fragments-over-limit",
    _frames(
        *(
            encode_frame(OP_TEXT if i == 0 else OP_CONT, b"a" * (MAX_FRAME // 3), fin=False)
            for i in range(4)
        )
    ),
    frozenset({1009}),
)
"""A fragmented message whose total passes the limit (run once per round: it is big)."""

BAD_CLOSE_CODES: tuple[int, ...] = (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
"""Close codes a client may not send (RFC 6455 7.4): the answer is 1002."""


def bad_close(code: int) -> FramingCase:
    """A close frame with a code no endpoint may send."""
    return FramingCase(
        f"close-code-{code}", _frames(encode_frame(OP_CLOSE, close_payload(code))), PROTOCOL_ERROR
    )
