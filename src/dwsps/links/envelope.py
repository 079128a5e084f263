"""The backplane envelope: how a publish travels between servers (pure: no I/O).

One envelope is one backplane message::

    {"v":1,"s":"<sender>","c":17,"o":"<origin>","q":42,"t":"news.uk","ts":"…","p":true}
    "Hello news.uk channel!"

A JSON header line, a newline (``\\n``), then the message exactly as JSON (orjson never
writes a raw newline, so the first ``\\n`` ends the header). The body is kept
as bytes on the receiving side and spliced into the delivery unparsed.

Header fields:

``v``  envelope version (1).
``s``  sender: id of the server that put the envelope on the backplane.
``c``  the sender's sequence number on this channel (per sender and first
       topic level); a receiver that sees it jump knows it missed envelopes.
``o``, ``q``  the publish's identity (origin server id and its sequence
       number), when it has one; receivers drop an identity seen before.
``t``  published topic. ``ts`` publisher or server timestamp.
``p``  present and true when the publish entered the service through a
       peer link (``fromPeerServer``).
``h``  the history stream of the publish, when it goes through shared history.

A publish to a topic with shared history (:class:`~dwsps.links.engine.SharedHistory`)
is sent as a *kept* envelope: the engine prefixes the envelope above with a
position line that only it can write, since it assigns the offset::

    @<epoch> <offset>
    {"v":1,"s":…,"h":"chat.room1",…}
    "Hello"

The same bytes (without the position line) are what the engine keeps in the
stream, so a read from the history decodes with :func:`decode` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from dwsps.errors import EnvelopeError
from dwsps.interest import ALL, channel_key

__all__ = ["ALL", "Envelope", "channel_key", "decode", "encode"]

VERSION: Final = 1


@dataclass(slots=True)
class Envelope:
    """A decoded envelope; ``body`` is the message's JSON, still encoded."""

    sender: str
    channel_seq: int
    topic: str
    timestamp: str
    body: bytes
    origin: str | None = None
    seq: int | None = None
    from_peer: bool = False
    stream: str | None = None
    """The history stream (kept envelopes only)."""
    epoch: str | None = None
    """The stream's epoch, from the engine's position line (None when there is none)."""
    offset: int = 0
    """The offset the engine assigned (0 when there is no position line)."""


def encode(
    sender: str,
    channel_seq: int,
    topic: str,
    timestamp: str,
    message: Any,
    origin: str | None = None,
    seq: int | None = None,
    from_peer: bool = False,
    stream: str | None = None,
) -> bytes:
    """Build one envelope (``stream``: a kept envelope's history stream)."""
    header: dict[str, Any] = {"v": VERSION, "s": sender, "c": channel_seq}
    if origin is not None and seq is not None:
        header["o"] = origin
        header["q"] = seq
    header["t"] = topic
    header["ts"] = timestamp
    if from_peer:
        header["p"] = True
    if stream is not None:
        header["h"] = stream
    return orjson.dumps(header) + b"\n" + orjson.dumps(message)


def position_line(epoch: str, offset: int) -> bytes:
    """The line an engine puts before a kept envelope (what its script writes)."""
    return b"@%b %d\n" % (epoch.encode(), offset)


def decode(payload: bytes) -> Envelope:
    """Parse an envelope, with its position line if any; :class:`EnvelopeError` if not one."""
    epoch: str | None = None
    offset = 0
    if payload[:1] == b"@":
        line, sep, payload = payload.partition(b"\n")
        parts = line[1:].split(b" ")
        if not sep or len(parts) != 2 or not parts[0] or not parts[1].isdigit():
            raise EnvelopeError("bad position line")
        epoch, offset = parts[0].decode("ascii", "replace"), int(parts[1])
    head, sep, body = payload.partition(b"\n")
    if not sep or not body:
        raise EnvelopeError("no header line")
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise EnvelopeError("unknown envelope version")
    sender, cseq, topic, ts = header.get("s"), header.get("c"), header.get("t"), header.get("ts")
    if not (
        isinstance(sender, str)
        and type(cseq) is int
        and isinstance(topic, str)
        and topic
        and isinstance(ts, str)
    ):
        raise EnvelopeError("header lacks s, c, t or ts")
    origin, seq = header.get("o"), header.get("q")
    if not (isinstance(origin, str) and type(seq) is int):
        origin, seq = None, None
    stream = header.get("h")
    if not isinstance(stream, str) or not stream:
        stream = None
    if epoch is not None and stream is None:
        raise EnvelopeError("a position line on an envelope without a stream")
    return Envelope(
        sender, cseq, topic, ts, body, origin, seq, header.get("p") is True, stream, epoch, offset
    )
