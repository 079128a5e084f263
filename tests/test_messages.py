"""Request parsing and reply encoding (pure: no sockets)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dwsps import messages
from dwsps.errors import ErrorCode, ProtocolError
from dwsps.messages import (
    MAX_DEPTH,
    MAX_ID_LENGTH,
    Clock,
    DeliveryEncoder,
    Publish,
    Subscribe,
    Unsubscribe,
    encode_ack,
    encode_error,
    parse_request,
)
from dwsps.topics import TopicLimits

JS_DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")


def parse(obj: Any) -> Any:
    return parse_request(orjson.dumps(obj))


def parse_error(data: bytes | str | dict[str, Any] | list[Any]) -> ProtocolError:
    raw = data if isinstance(data, bytes | str) else orjson.dumps(data)
    with pytest.raises(ProtocolError) as info:
        parse_request(raw)
    return info.value


# -- well-formed requests ---------------------------------------------------------


def test_parse_subscribe_and_unsubscribe() -> None:
    assert parse({"type": "subscribe", "topic": "news"}) == Subscribe("news")
    assert parse({"type": "unsubscribe", "topic": "news.uk", "id": "a"}) == Unsubscribe(
        "news.uk", "a"
    )
    assert parse({"type": "subscribe", "topic": "news.*.weather", "id": 7}) == Subscribe(
        "news.*.weather", 7
    )


def test_parse_original_client_publish() -> None:
    # What the original Node client sends: no id, always a timestamp.
    req = parse(
        {
            "type": "publish",
            "topic": "news.uk",
            "message": {"text": "Hello", "n": [1, 2.5, None, True]},
            "timestamp": "2020-01-21T17:03:13.625Z",
        }
    )
    assert req == Publish(
        "news.uk", {"text": "Hello", "n": [1, 2.5, None, True]}, "2020-01-21T17:03:13.625Z"
    )
    assert req.from_peer is False


def test_absent_message_is_null_and_extra_fields_are_ignored() -> None:
    req = parse({"type": "publish", "topic": "t", "extra": {"x": 1}})
    assert isinstance(req, Publish)
    assert req.message is None


def test_from_peer_server_must_be_exactly_true() -> None:
    assert parse({"type": "publish", "topic": "t", "fromPeerServer": True}).from_peer is True
    assert parse({"type": "publish", "topic": "t", "fromPeerServer": "yes"}).from_peer is False
    assert parse({"type": "publish", "topic": "t", "fromPeerServer": 1}).from_peer is False


def test_whitespace_around_json_is_fine() -> None:
    assert parse_request(b' \n{"type":"subscribe","topic":"a"}\t ') == Subscribe("a")
    assert parse_request('{"type":"subscribe","topic":"a"}') == Subscribe("a")


# -- timestamps ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "ts",
    [
        "2020-01-21T17:03:13.625Z",
        "2020-01-21T17:03:13Z",
        "2020-01-21T17:03:13.625123Z",
        "2020-01-21T17:03:13.625+01:00",
        "2020-02-29T23:59:59.999Z",
    ],
)
def test_valid_publisher_timestamp_is_kept(ts: str) -> None:
    assert parse({"type": "publish", "topic": "t", "timestamp": ts}).timestamp == ts


@pytest.mark.parametrize(
    "ts",
    [
        None,
        "",
        "yesterday",
        1579628593625,
        "2020-01-21 17:03:13.625Z",
        "2020-01-21T17:03:13.625Z junk",
        "2020-13-45T99:99:99.000Z",
        "2021-02-29T10:00:00.000Z",
        ["2020-01-21T17:03:13.625Z"],
    ],
)
def test_invalid_publisher_timestamp_is_dropped(ts: object) -> None:
    # None here means "the server stamps it on receipt".
    assert parse({"type": "publish", "topic": "t", "timestamp": ts}).timestamp is None


# -- ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("req_id", ["abc", "", 0, 7, -3, "x" * MAX_ID_LENGTH, 10**18])
def test_valid_ids_are_kept(req_id: str | int) -> None:
    assert parse({"type": "subscribe", "topic": "t", "id": req_id}).id == req_id


def test_null_id_means_no_id() -> None:
    assert parse({"type": "subscribe", "topic": "t", "id": None}).id is None


@pytest.mark.parametrize(
    "req_id", [b"true", b"false", b"1.5", b'["a"]', b'{"a":1}', b'"' + b"x" * 65 + b'"', b"1" * 70]
)
def test_invalid_id_is_an_invalid_message_without_echo(req_id: bytes) -> None:
    err = parse_error(b'{"type":"subscribe","topic":"t","id":' + req_id + b"}")
    assert err.code is ErrorCode.INVALID_MESSAGE
    assert "'id'" in err.detail
    assert err.action == "subscribe"
    assert err.request_id is None


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"{", b"", b"nope", b'{"type": "subscribe",}', b"NaN", b'"\\ud800"']
)
def test_invalid_json(data: bytes) -> None:
    err = parse_error(data)
    assert err.code is ErrorCode.INVALID_JSON
    assert err.action is None
    assert err.request_id is None


def test_invalid_utf8_is_invalid_json_at_this_layer() -> None:
    # The server turns this into close 1007; the parser only says it is not JSON.
    assert parse_error(b'{"type":"subscribe","topic":"\xff"}').code is ErrorCode.INVALID_JSON


@pytest.mark.parametrize("data", [[], [1, 2], "subscribe", 42, None, True])
def test_non_object_json_is_invalid_message(data: Any) -> None:
    err = parse_error(orjson.dumps(data))
    assert err.code is ErrorCode.INVALID_MESSAGE
    assert err.action is None


@pytest.mark.parametrize(
    ("request_obj", "code", "action", "req_id"),
    [
        ({"topic": "t", "id": 1}, ErrorCode.INVALID_MESSAGE, None, 1),
        ({"type": 5, "topic": "t", "id": 2}, ErrorCode.INVALID_MESSAGE, None, 2),
        ({"type": None, "topic": "t"}, ErrorCode.INVALID_MESSAGE, None, None),
        ({"type": "hello", "topic": "t", "id": "x"}, ErrorCode.UNKNOWN_TYPE, "hello", "x"),
        ({"type": "Subscribe", "topic": "t"}, ErrorCode.UNKNOWN_TYPE, "Subscribe", None),
        ({"type": "ack", "topic": "t"}, ErrorCode.UNKNOWN_TYPE, "ack", None),
        ({"type": "subscribe", "id": 3}, ErrorCode.INVALID_MESSAGE, "subscribe", 3),
        ({"type": "publish", "message": 1}, ErrorCode.INVALID_MESSAGE, "publish", None),
        ({"type": "unsubscribe", "topic": 9, "id": 4}, ErrorCode.INVALID_MESSAGE, "unsubscribe", 4),
        ({"type": "subscribe", "topic": None}, ErrorCode.INVALID_MESSAGE, "subscribe", None),
        ({"type": "subscribe", "topic": "a..b", "id": 5}, ErrorCode.INVALID_TOPIC, "subscribe", 5),
        ({"type": "publish", "topic": "", "id": 6}, ErrorCode.INVALID_TOPIC, "publish", 6),
        ({"type": "publish", "topic": "news.*", "id": 7}, ErrorCode.INVALID_TOPIC, "publish", 7),
        ({"type": "unsubscribe", "topic": "a b"}, ErrorCode.INVALID_TOPIC, "unsubscribe", None),
    ],
)
def test_error_codes_with_action_and_id(
    request_obj: dict[str, Any], code: ErrorCode, action: str | None, req_id: object
) -> None:
    err = parse_error(request_obj)
    assert err.code is code
    assert err.action == action
    assert err.request_id == req_id
    assert err.detail


def test_unknown_type_is_truncated_in_the_reply() -> None:
    err = parse_error({"type": "x" * 10_000, "topic": "t"})
    assert err.code is ErrorCode.UNKNOWN_TYPE
    assert err.action is not None
    assert len(err.action) <= 64
    assert len(err.detail) < 200


def test_topic_limits_are_applied() -> None:
    limits = TopicLimits(max_length=5, max_levels=2)
    assert parse_request(b'{"type":"subscribe","topic":"a.b"}', limits) == Subscribe("a.b")
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"type":"subscribe","topic":"a.b.c"}', limits)
    assert info.value.code is ErrorCode.INVALID_TOPIC
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"type":"subscribe","topic":"abcdef"}', limits)
    assert info.value.code is ErrorCode.INVALID_TOPIC


# -- encoding --------------------------------------------------------------------------


def test_clock_formats_like_javascript_date_tojson(monkeypatch: pytest.MonkeyPatch) -> None:
    # new Date(1579707844674).toJSON() === '2020-01-22T15:44:04.674Z'
    clock = Clock()
    monkeypatch.setattr(messages.time, "time_ns", lambda: 1579707844674 * 1_000_000 + 999_999)
    assert clock.now() == "2020-01-22T15:44:04.674Z"
    monkeypatch.setattr(messages.time, "time_ns", lambda: 1579707844999 * 1_000_000)
    assert clock.now() == "2020-01-22T15:44:04.999Z"  # same second, new millisecond
    monkeypatch.setattr(messages.time, "time_ns", lambda: 1579707845000 * 1_000_000)
    assert clock.now() == "2020-01-22T15:44:05.000Z"
    monkeypatch.setattr(messages.time, "time_ns", lambda: 0)
    assert clock.now() == "1970-01-01T00:00:00.000Z"


def test_clock_is_current_utc() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    text = Clock().now()
    assert JS_DATE.match(text), text
    stamped = datetime.fromisoformat(text)
    assert stamped.tzinfo is not None
    assert abs((stamped - before).total_seconds()) < 5
    later = Clock()
    time.sleep(0.002)  # a pure value check, not waiting for an event
    assert later.now() >= text


def test_encode_ack() -> None:
    ts = "2020-01-22T15:44:04.674Z"
    raw = encode_ack("subscribe", "news", ts, None)
    assert orjson.loads(raw) == {
        "type": "ack",
        "action": "subscribe",
        "timestamp": ts,
        "topic": "news",
    }
    # Key order as the original README shows it (harmless either way, nice to diff).
    assert list(orjson.loads(raw)) == ["type", "action", "timestamp", "topic"]
    assert orjson.loads(encode_ack("publish", "a.b", ts, "req-1"))["id"] == "req-1"
    assert orjson.loads(encode_ack("publish", "a.b", ts, 0))["id"] == 0


def test_encode_error() -> None:
    ts = "2020-01-22T15:44:04.674Z"
    err = ProtocolError(ErrorCode.INVALID_TOPIC, "empty level in 'news..uk'", "subscribe", 7)
    assert orjson.loads(encode_error(err, ts)) == {
        "type": "error",
        "timestamp": ts,
        "error": "invalid_topic",
        "detail": "empty level in 'news..uk'",
        "action": "subscribe",
        "id": 7,
    }
    bare = orjson.loads(encode_error(ProtocolError(ErrorCode.INVALID_JSON, "bad"), ts))
    assert bare == {"type": "error", "timestamp": ts, "error": "invalid_json", "detail": "bad"}


MESSAGES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(message=MESSAGES, topic=st.sampled_from(["news", "news.uk", 'ñ."q"\\']))
def test_delivery_round_trips_any_json(message: Any, topic: str) -> None:
    ts = "2020-01-21T17:03:13.625Z"
    encoder = DeliveryEncoder(topic, message, ts, False)
    out = orjson.loads(encoder.encode("news"))
    assert out == {
        "type": "publish",
        "timestamp": ts,
        "topic": topic,
        "context": "news",
        "message": message,
    }


def test_delivery_contexts_share_one_encoder() -> None:
    encoder = DeliveryEncoder(
        "news.uk", "Hello news.uk channel!", "2020-01-21T17:03:13.625Z", False
    )
    a, b = encoder.encode("news"), encoder.encode("news.uk")
    assert orjson.loads(a)["context"] == "news"
    assert orjson.loads(b)["context"] == "news.uk"
    assert a == encoder.encode("news")
    assert b'"fromPeerServer"' not in a


def test_delivery_from_peer_and_extra_fields() -> None:
    encoder = DeliveryEncoder("t", None, "2020-01-21T17:03:13.625Z", True, {"via": "backplane"})
    out = orjson.loads(encoder.encode("t"))
    assert out["fromPeerServer"] is True
    assert out["via"] == "backplane"
    assert out["message"] is None


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_max_depth_is_what_the_encoder_can_write() -> None:
    # A delivery holds the message one level down, as the request did.
    orjson.dumps({"message": _nested(MAX_DEPTH - 1)})
    with pytest.raises(TypeError):
        orjson.dumps({"message": _nested(MAX_DEPTH)})


@pytest.mark.parametrize("as_text", [False, True])
def test_nesting_past_max_depth_is_invalid_message(as_text: bool) -> None:
    def frame(depth: int) -> bytes | str:
        raw = b'{"type":"publish","topic":"t","id":3,"message":' + b"[" * depth + b"]" * depth
        return (raw + b"}").decode() if as_text else raw + b"}"

    pub = parse_request(frame(MAX_DEPTH - 1))
    assert isinstance(pub, Publish)
    assert pub.message == _nested(MAX_DEPTH - 1)
    with pytest.raises(ProtocolError) as err:
        parse_request(frame(MAX_DEPTH))
    assert (err.value.code, err.value.action, err.value.request_id) == (
        ErrorCode.INVALID_MESSAGE,
        "publish",
        3,
    )
    with pytest.raises(ProtocolError) as err:
        parse_request(frame(2000))  # past orjson's own parse limit: the same code
    assert err.value.code is ErrorCode.INVALID_MESSAGE
    # Brackets inside strings are not nesting.
    wide = parse_request(orjson.dumps({"type": "publish", "topic": "t", "message": "[" * 999}))
    assert isinstance(wide, Publish)
