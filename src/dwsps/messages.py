"""Requests and replies: parse and validate at the edge, encode once (pure: no I/O).

Everything that goes on the wire is built here: replies and deliveries (the
server), requests (the client), and the publishes a peer link forwards.

Parsing turns one text frame into a typed request or raises
:class:`~dwsps.errors.ProtocolError` carrying the error code for the reply.
Encoding builds reply bytes with orjson; a delivery is built so that the
message body is encoded once and shared by every context it goes out under.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

import orjson

from dwsps.errors import ErrorCode, ProtocolError, TopicError
from dwsps.topics import DEFAULT_LIMITS, TopicLimits, validate

MAX_ID_LENGTH: Final = 64

MAX_DEPTH: Final = 254
"""Most nested arrays and objects in a publish request, the request object included.

It is what the encoder can write: ``orjson.dumps`` raises past 254 levels. A
delivery and a forwarded publish hold the message exactly as deep as the request
did, so nothing accepted here can fail to encode later. (A reply that wraps
deliveries deeper, such as a history reply, must lower this.)"""

# ISO 8601 date-time as JavaScript's Date.toJSON() writes it, plus offsets and
# any fraction length, which other publishers send.
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})\Z")

RequestId = str | int


class Position(Protocol):
    """Where a publication lies in its history stream (extension: history).

    A kept :class:`~dwsps.history.Publication` is one, so the publish path
    builds no extra object for it.
    """

    @property
    def stream(self) -> str: ...
    @property
    def epoch(self) -> str: ...
    @property
    def offset(self) -> int: ...


@dataclass(slots=True)
class Subscribe:
    """A ``subscribe`` request; ``recover`` is ``(epoch, offset)`` to replay from (extension)."""

    topic: str
    id: RequestId | None = None
    recover: tuple[str, int] | None = None


@dataclass(slots=True)
class Unsubscribe:
    """An ``unsubscribe`` request."""

    topic: str
    id: RequestId | None = None


@dataclass(slots=True)
class Publish:
    """A ``publish`` request, or a message moving between servers.

    ``timestamp`` is the publisher's valid timestamp or ``None`` (the server
    then stamps it on receipt). ``origin`` and ``seq`` (extensions) name the
    server that first accepted the publish and its sequence number there; the
    origin server assigns them, and servers use them to drop duplicates that
    arrive twice (a peer link resend, or peering and a backplane together).
    """

    topic: str
    message: Any
    timestamp: str | None = None
    id: RequestId | None = None
    from_peer: bool = False
    origin: str | None = None
    seq: int | None = None
    position: Position | None = None
    """Set once the publish has taken its offset in a history stream."""


@dataclass(slots=True)
class History:
    """A ``history`` request (extension): the latest kept publications of a topic."""

    topic: str
    limit: int
    since: tuple[str, int] | None = None
    id: RequestId | None = None


@dataclass(slots=True)
class Auth:
    """An ``auth`` request (extension): replace the connection's token and permissions."""

    token: str
    id: RequestId | None = None


Request = Subscribe | Unsubscribe | Publish | Auth | History

MAX_TOKEN_LENGTH: Final = 8192
_KNOWN_TYPES: Final = ("subscribe", "unsubscribe", "publish", "auth", "history")
MAX_EPOCH_LENGTH: Final = 64
HISTORY_LIMIT_DEFAULT: Final = 100
HISTORY_LIMIT_MAX: Final = 1000
"""A ``history`` request's ``limit`` is capped here (larger values are read as this)."""


def parse_request(data: bytes | str, limits: TopicLimits = DEFAULT_LIMITS) -> Request:
    """Parse one text frame; raise ProtocolError (with action and id when known)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):  # orjson's own, at 1024
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, _TOO_DEEP) from None
        raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a request must be a JSON object")
    # Only a frame with that many brackets can nest that deep: a length check,
    # then two counts in C, spare the walk for every ordinary publish.
    if len(data) <= MAX_DEPTH:
        return request_from_object(obj, limits, check_depth=False)
    if isinstance(data, str):
        opens = data.count("[") + data.count("{")
    else:
        opens = data.count(b"[") + data.count(b"{")
    return request_from_object(obj, limits, check_depth=opens > MAX_DEPTH)


def request_from_object(
    obj: dict[str, Any], limits: TopicLimits = DEFAULT_LIMITS, *, check_depth: bool = True
) -> Request:
    """Validate a decoded JSON object as a request.

    ``check_depth=False`` skips the nesting check (:data:`MAX_DEPTH`) for an
    object known to be shallow.
    """
    raw_id = obj.get("id")
    req_id: RequestId | None = None
    id_problem: str | None = None
    if raw_id is not None:
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
            id_problem = "'id' must be a string or an integer"
        elif len(str(raw_id)) > MAX_ID_LENGTH:
            id_problem = f"'id' is longer than {MAX_ID_LENGTH} characters"
        else:
            req_id = raw_id
    kind = obj.get("type")
    if not isinstance(kind, str):
        detail = "missing 'type'" if kind is None else "'type' must be a string"
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, detail, None, req_id)
    if kind not in _KNOWN_TYPES:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown type {kind[:64]!r}", kind[:64], req_id
        )
    if id_problem is not None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, id_problem, kind)
    if kind == "auth":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'token' must be a string", kind, req_id)
        if len(token) > MAX_TOKEN_LENGTH:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "token too long", kind, req_id)
        return Auth(token, req_id)
    if "topic" not in obj:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "missing 'topic'", kind, req_id)
    try:
        topic = validate(obj["topic"], subscription=kind != "publish", limits=limits)
    except TopicError as exc:
        code = ErrorCode.INVALID_TOPIC
        if not isinstance(obj["topic"], str):
            code = ErrorCode.INVALID_MESSAGE
        raise ProtocolError(code, str(exc), kind, req_id) from None
    if kind == "subscribe":
        recover = obj.get("recover")
        if recover is None:
            return Subscribe(topic, req_id)
        return Subscribe(topic, req_id, _position_field(recover, "recover", kind, req_id))
    if kind == "history":
        limit = obj.get("limit", HISTORY_LIMIT_DEFAULT)
        if type(limit) is not int or limit < 0:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, "'limit' must be an integer >= 0", kind, req_id
            )
        since = obj.get("since")
        return History(
            topic,
            min(limit, HISTORY_LIMIT_MAX),
            None if since is None else _position_field(since, "since", kind, req_id),
            req_id,
        )
    if kind == "unsubscribe":
        return Unsubscribe(topic, req_id)
    message = obj.get("message")
    if check_depth and _deeper_than(message, MAX_DEPTH - 1):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, _TOO_DEEP, kind, req_id)
    timestamp = _valid_timestamp(obj.get("timestamp"))
    origin = obj.get("origin")
    seq = obj.get("seq")
    if not (
        isinstance(origin, str)
        and 0 < len(origin) <= MAX_ID_LENGTH
        and type(seq) is int
        and seq >= 0
    ):
        # Both or neither: identity fields are only useful together.
        origin, seq = None, None
    return Publish(
        topic,
        message,
        timestamp,
        req_id,
        obj.get("fromPeerServer") is True,
        origin,
        seq,
    )


_TOO_DEEP: Final = f"nested deeper than {MAX_DEPTH} levels (arrays and objects)"


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` arrays/objects (without recursion)."""
    if type(value) is not dict and type(value) is not list:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if type(node) is dict else node
        for child in children:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def _position_field(
    value: object, name: str, kind: str, req_id: RequestId | None
) -> tuple[str, int]:
    """``(epoch, offset)`` from ``{"epoch": str, "offset": int >= 0}``, else invalid_message."""
    if isinstance(value, dict):
        epoch, offset = value.get("epoch"), value.get("offset")
        if (
            isinstance(epoch, str)
            and 0 < len(epoch) <= MAX_EPOCH_LENGTH
            and type(offset) is int
            and offset >= 0
        ):
            return epoch, offset
    raise ProtocolError(
        ErrorCode.INVALID_MESSAGE,
        f'{name!r} must be {{"epoch": a string of 1 to {MAX_EPOCH_LENGTH} characters,'
        ' "offset": an integer >= 0}',
        kind,
        req_id,
    )


def _valid_timestamp(ts: object) -> str | None:
    """``ts`` if it is an ISO 8601 date-time that exists on the calendar, else None."""
    if not isinstance(ts, str) or len(ts) > 40 or not _timestamp_ok(ts):
        return None
    return ts


@functools.lru_cache(maxsize=512)
def _timestamp_ok(ts: str) -> bool:
    # Cached: a busy publisher sends the same millisecond many times, and the
    # check (a pattern and a calendar parse) was ~1.4 us of every publish.
    if not _TIMESTAMP.match(ts):
        return False
    try:
        # The pattern checks the shape; this rejects month 13, Feb 30, hour 25, ...
        datetime.fromisoformat(ts)
    except ValueError:
        return False
    return True


class Clock:
    """Server time in JavaScript ``Date.toJSON()`` form, formatted once per millisecond."""

    __slots__ = ("_ms", "_prefix", "_s", "_text")

    def __init__(self) -> None:
        self._ms = -1
        self._s = -1
        self._prefix = ""
        self._text = ""

    def now(self) -> str:
        """Current UTC time like ``2020-01-22T15:44:04.674Z``."""
        ms = time.time_ns() // 1_000_000
        if ms != self._ms:
            self._ms = ms
            s = ms // 1000
            if s != self._s:  # strftime (and glibc's tz check) once a second, not per ms
                self._s = s
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(s))
            self._text = f"{self._prefix}{ms % 1000:03d}Z"
        return self._text


def encode_ack(
    action: str,
    topic: str | None,
    timestamp: str,
    req_id: RequestId | None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """An ``ack`` reply (``topic`` is None for requests without one, e.g. ``auth``).

    ``extra`` adds fields (a history stream's ``stream``, ``epoch``, ``offset``).
    """
    reply: dict[str, Any] = {"type": "ack", "action": action, "timestamp": timestamp}
    if topic is not None:
        reply["topic"] = topic
    if req_id is not None:
        reply["id"] = req_id
    if extra:
        reply.update(extra)
    return orjson.dumps(reply)


def position_fields(position: Position) -> dict[str, Any]:
    """The wire fields of a history position, as deliveries and acks carry them."""
    return {"stream": position.stream, "offset": position.offset, "epoch": position.epoch}


def encode_kept_delivery(
    topic: str,
    context: str,
    timestamp: str,
    message: bytes,
    from_peer: bool,
    position: Position,
    recovered: bool,
) -> bytes:
    """The delivery of a kept publication (``message`` is its JSON, kept encoded).

    The same fields as a live delivery (:class:`DeliveryEncoder` with
    :func:`position_fields`), plus ``"recovered": true`` for a replay.
    """
    dumps = orjson.dumps
    out = (
        b'{"type":"publish","timestamp":'
        + dumps(timestamp)
        + b',"topic":'
        + dumps(topic)
        + b',"context":'
        + dumps(context)
        + b',"message":'
        + message
    )
    if from_peer:
        out += b',"fromPeerServer":true'
    out += _position_bytes(position)
    return out + (b',"recovered":true}' if recovered else b"}")


def _position_bytes(position: Position) -> bytes:
    dumps = orjson.dumps
    return b',"stream":%b,"offset":%d,"epoch":%b' % (
        dumps(position.stream),
        position.offset,
        dumps(position.epoch),
    )


def encode_history(
    topic: str,
    position: Position,
    publications: list[bytes],
    req_id: RequestId | None,
    truncated: bool,
) -> bytes:
    """The reply to a ``history`` request; ``publications`` are encoded deliveries."""
    head: dict[str, Any] = {
        "type": "history",
        "topic": topic,
        "stream": position.stream,
        "epoch": position.epoch,
        "offset": position.offset,
    }
    if req_id is not None:
        head["id"] = req_id
    if truncated:
        head["truncated"] = True
    # The deliveries are encoded already: splice them in rather than decode them.
    return orjson.dumps(head)[:-1] + b',"publications":[' + b",".join(publications) + b"]}"


def encode_error(err: ProtocolError, timestamp: str) -> bytes:
    """An ``error`` reply for a rejected request."""
    reply: dict[str, Any] = {
        "type": "error",
        "timestamp": timestamp,
        "error": str(err.code),
        "detail": err.detail,
    }
    if err.action is not None:
        reply["action"] = err.action
    if err.request_id is not None:
        reply["id"] = err.request_id
    return orjson.dumps(reply)


class DeliveryEncoder:
    """Builds the delivery of one publish under any number of contexts.

    The message, topic and timestamp are encoded once; each context costs one
    small ``orjson.dumps`` and a concatenation.
    """

    __slots__ = ("_head", "_tail")

    def __init__(
        self,
        topic: str,
        message: Any,
        timestamp: str,
        from_peer: bool,
        extra: dict[str, Any] | None = None,
        position: Position | None = None,
    ) -> None:
        dumps = orjson.dumps
        self._head = (
            b'{"type":"publish","timestamp":'
            + dumps(timestamp)
            + b',"topic":'
            + dumps(topic)
            + b',"context":'
        )
        tail = b',"message":' + dumps(message)
        if from_peer:
            tail += b',"fromPeerServer":true'
        if extra:
            tail += b"," + dumps(extra)[1:-1]
        if position is not None:
            tail += _position_bytes(position)
        self._tail = tail + b"}"

    def encode(self, context: str) -> bytes:
        """The delivery JSON for one context."""
        return self._head + orjson.dumps(context) + self._tail


def encode_request(obj: dict[str, Any]) -> bytes:
    """Encode a client request object (the client uses this)."""
    return orjson.dumps(obj)


def encode_forward_head(pub: Publish) -> bytes:
    """The ``publish`` request a peer link forwards, without its ``id`` and closing brace.

    Built once per publish and shared by every peer link; each link completes
    it with its own id (:func:`with_link_id`). The identity fields ``origin``
    and ``seq`` (extensions) let a dwsps peer drop a resent copy.
    """
    obj: dict[str, Any] = {
        "type": "publish",
        "topic": pub.topic,
        "message": pub.message,
        "timestamp": pub.timestamp,
        "fromPeerServer": True,
    }
    if pub.origin is not None and pub.seq is not None:
        obj["origin"] = pub.origin
        obj["seq"] = pub.seq
    return orjson.dumps(obj)[:-1]


def with_link_id(head: bytes, link_seq: int) -> bytes:
    """Complete a head from :func:`encode_forward_head` with ``"id": link_seq``."""
    return b'%b,"id":%d}' % (head, link_seq)
