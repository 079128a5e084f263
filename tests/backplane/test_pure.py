"""Pure parts of the backplane: envelope, interest counting, URL handling."""

from __future__ import annotations

import orjson
import pytest

from dwsps.errors import EnvelopeError
from dwsps.interest import InterestCounter
from dwsps.links import envelope as env
from dwsps.links.backplane import BackplaneOptions, create_backplane
from dwsps.links.memory import MemoryBackplane
from dwsps.links.redis import RedisBackplane
from dwsps.redact import redact

OPTS = BackplaneOptions("me")


def test_envelope_round_trip_keeps_the_message_bytes() -> None:
    message = {"text": "line\nbreak", "n": [1, 2.5, None]}
    payload = env.encode("s1", 7, "news.uk", "2020-01-22T15:44:04.674Z", message, "o1", 42, True)
    e = env.decode(payload)
    assert (e.sender, e.channel_seq, e.topic, e.timestamp) == (
        "s1",
        7,
        "news.uk",
        "2020-01-22T15:44:04.674Z",
    )
    assert (e.origin, e.seq, e.from_peer) == ("o1", 42, True)
    assert orjson.loads(e.body) == message
    # The header is one line: the newline inside the message is escaped.
    assert payload.count(b"\n") == 1


def test_envelope_without_identity_or_peer_flag() -> None:
    e = env.decode(env.encode("s1", 1, "a", "t", None))
    assert (e.origin, e.seq, e.from_peer) == (None, None, False)
    assert e.body == b"null"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"no header",
        b'{"v":1}\n1',
        b'{"v":2,"s":"a","c":1,"t":"x","ts":"t"}\n1',
        b'{"v":1,"s":"a","c":"1","t":"x","ts":"t"}\n1',
        b'{"v":1,"s":"a","c":1,"t":"","ts":"t"}\n1',
        b"[1]\n1",
        b'{"v":1,"s":"a","c":1,"t":"x","ts":"t"}\n',
    ],
)
def test_envelope_rejects_junk(payload: bytes) -> None:
    with pytest.raises(EnvelopeError):
        env.decode(payload)


@pytest.mark.parametrize(
    ("topic", "key"),
    [("news", "news"), ("news.uk.london", "news"), ("*", "*"), ("*.uk", "*"), ("a:b.c", "a:b")],
)
def test_channel_key_is_the_first_level(topic: str, key: str) -> None:
    assert env.channel_key(topic) == key


def test_interest_reports_only_zero_one_transitions() -> None:
    events: list[tuple[str, str]] = []
    interest = InterestCounter(lambda k: events.append(("+", k)), lambda k: events.append(("-", k)))
    interest.add("news")
    interest.add("news.uk")
    interest.add("news")  # a second connection on the same topic
    interest.add("*.weather")
    assert events == [("+", "news"), ("+", "*")]
    assert interest.count("news") == 3
    interest.remove("news.uk")
    interest.remove("news")
    assert events == [("+", "news"), ("+", "*")]
    interest.remove("news")
    interest.remove("*.weather")
    interest.remove("sport")  # never counted: ignored
    assert events == [("+", "news"), ("+", "*"), ("-", "news"), ("-", "*")]
    assert len(interest) == 0
    assert "news" not in interest


def test_factory_by_scheme() -> None:
    private = create_backplane("memory://", OPTS)
    assert isinstance(private, MemoryBackplane)
    assert not private.shared
    named = create_backplane("memory://hub-a", OPTS)
    assert isinstance(named, MemoryBackplane)
    assert named.shared
    assert isinstance(create_backplane("redis://127.0.0.1:1/0", OPTS), RedisBackplane)
    assert isinstance(create_backplane("rediss://127.0.0.1:1/0", OPTS), RedisBackplane)
    with pytest.raises(ValueError, match="unknown scheme 'nats'"):
        create_backplane("nats://127.0.0.1:4222", OPTS)


def test_redis_url_options_and_redaction() -> None:
    bp = create_backplane(
        "redis://user:secret@127.0.0.1:6390/3?prefix=svc&health_interval=0.5&socket_timeout=2",
        OPTS,
    )
    assert isinstance(bp, RedisBackplane)
    assert bp.prefix == "svc"
    assert bp.health_interval == 0.5
    assert "secret" not in bp.url
    assert "secret" not in orjson.dumps(bp.status()).decode()
    status = bp.status()
    assert status["state"] == "connecting"
    assert status["healthy"] is False
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    with pytest.raises(ValueError, match="unusable option"):
        create_backplane("redis://127.0.0.1/0?no_such_option=1", OPTS)
    with pytest.raises(ValueError, match="glob"):
        create_backplane("redis://127.0.0.1/0?prefix=a*", OPTS)


async def test_redis_outbox_bound_drops_oldest_and_counts() -> None:
    bp = RedisBackplane("redis://127.0.0.1:1/0", BackplaneOptions("me", 3, 1 << 20))
    for i in range(5):
        bp.publish("news", str(i).encode())
    status = bp.status()
    assert status["outbox"] == 3
    assert status["dropped"] == 2
    assert [p for _, p in bp._outbox] == [b"2", b"3", b"4"]


def test_kept_envelope_carries_the_engine_position() -> None:
    payload = env.encode("s1", 0, "chat.room.x", "t", {"a": 1}, "o1", 3, stream="chat.room")
    assert env.decode(payload).stream == "chat.room"
    assert env.decode(payload).epoch is None
    e = env.decode(env.position_line("ab12", 42) + payload)
    assert (e.stream, e.epoch, e.offset, e.topic) == ("chat.room", "ab12", 42, "chat.room.x")
    assert orjson.loads(e.body) == {"a": 1}


@pytest.mark.parametrize(
    "bad",
    [b"@ab12\n", b"@ab12 x\n{}", b"@ 3\n{}", b"@ab12 3"],
)
def test_bad_position_lines_are_refused(bad: bytes) -> None:
    with pytest.raises(EnvelopeError):
        env.decode(bad + env.encode("s", 0, "t", "ts", 1, stream="t"))


def test_a_position_line_needs_a_stream() -> None:
    with pytest.raises(EnvelopeError, match="without a stream"):
        env.decode(env.position_line("e", 1) + env.encode("s", 0, "t", "ts", 1))
