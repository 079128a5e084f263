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


def encode(
    sender: str,
    channel_seq: int,
    topic: str,
    timestamp: str,
    message: Any,
    origin: str | None = None,
    seq: int | None = None,
    from_peer: bool = False,
) -> bytes:
    """Build one envelope."""
    header: dict[str, Any] = {"v": VERSION, "s": sender, "c": channel_seq}
    if origin is not None and seq is not None:
        header["o"] = origin
        header["q"] = seq
    header["t"] = topic
    header["ts"] = timestamp
    if from_peer:
        header["p"] = True
    return orjson.dumps(header) + b"\n" + orjson.dumps(message)


def decode(payload: bytes) -> Envelope:
    """Parse an envelope; raise :class:`EnvelopeError` if it is not one."""
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
    return Envelope(sender, cseq, topic, ts, body, origin, seq, header.get("p") is True)
