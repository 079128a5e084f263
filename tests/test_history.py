"""History and recovery core (pure: no sockets, time and epochs injected)."""

from __future__ import annotations

import itertools
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dwsps.errors import DwspsError, ErrorCode, HistoryConfigError, HistoryError
from dwsps.history import (
    PUBLICATION_OVERHEAD,
    STREAM_OVERHEAD,
    HistoryPattern,
    HistoryPatterns,
    HistoryStore,
    Publication,
    Recovery,
    Stream,
    new_epoch,
    parse_history_pattern,
)
from dwsps.topics import TopicLimits, matches
from tests.support import compiled_refuses

TS = "2020-01-22T15:44:04.674Z"


def counter_epochs(prefix: str = "e") -> Callable[[], str]:
    """An epoch factory giving e1, e2, ...: predictable and never repeating."""
    numbers = itertools.count(1)
    return lambda: f"{prefix}{next(numbers)}"


def pats(*specs: str) -> list[HistoryPattern]:
    return [parse_history_pattern(spec) for spec in specs]


# -- patterns -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pattern", "size", "max_age"),
    [
        ("chat.*:1000:10m", "chat.*", 1000, 600.0),
        ("chat.*:5", "chat.*", 5, None),
        ("news:1:30", "news", 1, 30.0),
        ("news:1:30s", "news", 1, 30.0),
        ("news:1:1.5h", "news", 1, 5400.0),
        ("news:1:2d", "news", 1, 172800.0),
        ("news:1:.5", "news", 1, 0.5),
        ("*.x:7:1m", "*.x", 7, 60.0),
        ("  a.b : 3 : 2m ", "a.b", 3, 120.0),
    ],
)
def test_parse_history_pattern(text: str, pattern: str, size: int, max_age: float | None) -> None:
    assert parse_history_pattern(text) == HistoryPattern(pattern, size, max_age)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("chat.*", "PATTERN:SIZE"),
        ("a:1:2:3", "PATTERN:SIZE"),
        ("chat..x:5", "empty level"),
        (":5", "empty"),
        ("chat x:5", "whitespace"),
        ("chat.*:0", "size '0'"),
        ("chat.*:-5", "size '-5'"),
        ("chat.*:1e3", "size '1e3'"),
        ("chat.*:abc", "size 'abc'"),
        ("chat.*:\u0663", "size"),  # an Arabic-Indic digit: isdigit() alone would take it
        ("chat.*:", "size ''"),
        ("chat.*:5:", "age ''"),
        ("chat.*:5:10x", "age '10x'"),
        ("chat.*:5:0", "age '0'"),
        ("chat.*:5:0m", "age '0m'"),
        ("chat.*:5:-1s", "age '-1s'"),
        ("chat.*:5:m", "age 'm'"),
    ],
)
def test_parse_history_pattern_errors_name_the_bad_part(text: str, names: str) -> None:
    with pytest.raises(HistoryConfigError, match="history pattern") as info:
        parse_history_pattern(text)
    assert names in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, DwspsError)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("chat.*", 0), "size"),
        (("chat.*", True), "size"),
        (("chat.*", 2.0), "size"),
        (("chat.*", 1, 0), "max_age"),
        (("chat.*", 1, -1.0), "max_age"),
        (("chat.*", 1, float("inf")), "max_age"),
        (("chat.*", 1, float("nan")), "max_age"),
        (("chat.*", 1, True), "max_age"),
        (("chat..*", 1), "empty level"),
        (("chat.x y", 1), "whitespace"),
        (("", 1), "empty"),
    ],
)
def test_history_pattern_validates_itself(args: tuple[object, ...], names: str) -> None:
    if names == "size" and compiled_refuses(args[1], int):
        with pytest.raises(TypeError, match="int object expected"):
            HistoryPattern(*args)  # type: ignore[arg-type]
        return
    with pytest.raises(HistoryConfigError, match=names):
        HistoryPattern(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("specs", "unused"),
    [
        (["chat.*:1", "chat.vip.*:1"], "chat.vip.*"),
        (["chat.*:1", "chat.*:5"], "chat.*"),
        (["*:1", "news:1"], "news"),
        (["a:1", "b:1", "a.b.c:1"], "a.b.c"),
    ],
)
def test_a_pattern_that_can_never_be_first_is_refused(specs: list[str], unused: str) -> None:
    with pytest.raises(HistoryConfigError, match="never used") as info:
        HistoryPatterns(pats(*specs))
    assert repr(unused) in str(info.value)


def test_more_specific_first_is_fine() -> None:
    HistoryPatterns(pats("chat.vip.*:1", "chat.*:1", "*.x:1"))


def test_parse_checks_the_servers_topic_limits() -> None:
    deep = ".".join(["a"] * 40)
    with pytest.raises(HistoryConfigError, match="more than 32 levels"):
        parse_history_pattern(f"{deep}:5")
    assert parse_history_pattern(f"{deep}:5", TopicLimits(max_levels=64)).pattern == deep


# -- the stream of a published topic -------------------------------------------


@pytest.mark.parametrize(
    ("topic", "stream"),
    [
        ("chat.room1", "chat.room1"),
        ("chat.room1.typing", "chat.room1"),  # the PROTOCOL's example
        ("chat.vip.x", "chat.vip.x"),  # the first pattern wins
        ("chat.vip.x.typing", "chat.vip.x"),
        ("chat.vip", "chat.vip"),  # too short for chat.vip.*, so chat.*
        ("chat", None),
        ("news.uk", None),
        ("chatroom.x", None),
    ],
)
def test_stream_of(topic: str, stream: str | None) -> None:
    table = HistoryPatterns(pats("chat.vip.*:3", "chat.*:10"))
    for _ in range(2):  # computed, then from the cache
        found = table.stream_of(topic)
        assert (found[0] if found else None) == stream
    if stream is not None:
        found = table.stream_of(topic)
        assert found is not None
        assert found[1].size == (3 if stream.startswith("chat.vip.") else 10)


def test_stream_of_with_a_leading_wildcard() -> None:
    table = HistoryPatterns(pats("*.log:1", "*:1"))
    assert table.stream_of("a") == ("a", table.patterns[1])
    assert table.stream_of("a.b.c") == ("a", table.patterns[1])
    assert table.stream_of("a.log.x") == ("a.log", table.patterns[0])


def test_stream_of_cache_is_bounded() -> None:
    table = HistoryPatterns(pats("chat.*:1"), cache_size=4)
    for i in range(50):
        assert table.stream_of(f"chat.r{i}.x") == (f"chat.r{i}", table.patterns[0])
        assert table.stream_of(f"other{i}") is None
        assert len(table._cache) <= 4
    assert table.stream_of("chat.r3.x") == ("chat.r3", table.patterns[0])


LEVEL = st.sampled_from(["a", "b", "*"])
PATTERN = st.lists(LEVEL, min_size=1, max_size=3).map(".".join)
PATTERNS = st.lists(PATTERN, min_size=1, max_size=4)


def usable(patterns: Sequence[str]) -> list[HistoryPattern]:
    """Drop the patterns an earlier one shadows (HistoryPatterns refuses those)."""
    kept: list[HistoryPattern] = []
    for text in patterns:
        levels = text.split(".")
        shadowed = any(
            len(k.levels) <= len(levels)
            and all(o in ("*", i) for o, i in zip(k.levels, levels, strict=False))
            for k in kept
        )
        if not shadowed:
            kept.append(HistoryPattern(text, 1))
    return kept


def brute_stream_of(patterns: Sequence[HistoryPattern], topic: str) -> str | None:
    for p in patterns:
        if matches(p.pattern, topic):
            return ".".join(topic.split(".")[: len(p.levels)])
    return None


@settings(max_examples=300, deadline=None)
@given(patterns=PATTERNS, topic=st.lists(st.sampled_from("abc"), min_size=1, max_size=4))
def test_stream_of_matches_brute_force(patterns: list[str], topic: list[str]) -> None:
    kept = usable(patterns)
    table = HistoryPatterns(kept)
    found = table.stream_of(".".join(topic))
    assert (found[0] if found else None) == brute_stream_of(kept, ".".join(topic))


# -- the stream a subscription lies in -----------------------------------------


@pytest.mark.parametrize(
    ("subscription", "stream"),
    [
        ("chat.room1", "chat.room1"),
        ("chat.room1.typing", "chat.room1"),
        ("chat.room1.*", "chat.room1"),
        ("chat.room1.*.x", "chat.room1"),
        ("chat.vip.x", "chat.vip.x"),
        ("chat.vip.x.*", "chat.vip.x"),
        ("chat.vip", None),  # chat.vip itself is in chat.vip, chat.vip.x in chat.vip.x
        ("chat", None),  # chat itself has no history
        ("chat.*", None),
        ("chat.*.typing", None),
        ("chat.vip.*", None),
        ("*", None),
        ("news", None),
    ],
)
def test_stream_of_subscription(subscription: str, stream: str | None) -> None:
    table = HistoryPatterns(pats("chat.vip.*:3", "chat.*:10"))
    assert table.stream_of_subscription(subscription) == stream


def brute_stream_of_subscription(patterns: Sequence[HistoryPattern], sub: str) -> str | None:
    """Enumerate every topic ``sub`` matches, over an alphabet that stands for all levels.

    Patterns and subscriptions use levels a, b and *; the level c stands for
    every other level (nothing compares equal to it). Topics longer than the
    longest pattern or subscription behave as their prefix of that length, so
    enumerating up to it is exhaustive.
    """
    k = len(sub.split("."))
    longest = max([k, *(len(p.levels) for p in patterns)])
    streams: set[str | None] = set()
    for n in range(k, longest + 1):
        for levels in itertools.product("abc", repeat=n):
            topic = ".".join(levels)
            if matches(sub, topic):
                streams.add(brute_stream_of(patterns, topic))
    if len(streams) == 1:
        return streams.pop()
    return None


@settings(max_examples=600, deadline=None)
@given(patterns=PATTERNS, subscription=PATTERN)
def test_stream_of_subscription_matches_brute_force(patterns: list[str], subscription: str) -> None:
    kept = usable(patterns)
    table = HistoryPatterns(kept)
    assert table.stream_of_subscription(subscription) == brute_stream_of_subscription(
        kept, subscription
    )


# -- one stream ---------------------------------------------------------------


def fill(stream: Stream, count: int, now: float = 0.0, topic: str | None = None) -> None:
    for i in range(count):
        stream.append(topic or stream.name, TS, b'"m%d"' % i, False, now)


def offsets(publications: Sequence[Publication] | None) -> list[int] | None:
    return None if publications is None else [p.offset for p in publications]


def test_offsets_count_from_one_without_gaps() -> None:
    stream = Stream("chat.r", "E", size=3)
    assert stream.offset == 0
    assert stream.first == 1
    pubs = [stream.append("chat.r.x", TS, b"1", True, 5.0) for _ in range(5)]
    assert [p.offset for p in pubs] == [1, 2, 3, 4, 5]
    assert pubs[0] == Publication("chat.r", "E", 1, "chat.r.x", TS, b"1", True, 5.0)
    assert stream.offset == 5


def test_ring_bounded_by_size() -> None:
    stream = Stream("s", "E", size=3)
    fill(stream, 5)
    assert len(stream) == 3
    assert stream.first == 3
    assert stream.stats.trimmed_by_size == 2
    assert offsets(stream.since(2)) == [3, 4, 5]
    assert offsets(stream.since(4)) == [5]
    assert stream.since(5) == [], "at the current offset nothing was missed"
    assert stream.since(1) is None, "offset 2 is gone"
    assert stream.since(6) is None, "never reached"
    assert stream.since(-1) is None


def test_since_zero_before_anything_was_trimmed() -> None:
    stream = Stream("s", "E", size=10)
    assert stream.since(0) == []
    fill(stream, 4)
    assert offsets(stream.since(0)) == [1, 2, 3, 4]


def test_ring_bounded_by_age_lazily() -> None:
    stream = Stream("s", "E", size=100, max_age=10.0)
    for t in (0.0, 1.0, 2.0, 3.0):
        stream.append("s", TS, b"x", False, t)
    assert stream.expire(11.0) == 1, "received at 0.0: older than 10 s at 11.0"
    assert stream.expire(11.0) == 0
    assert stream.first == 2
    assert stream.expire(12.0) == 1, "received at 1.0 is exactly 11 s old: gone"
    stream.append("s", TS, b"x", False, 20.0)  # the publish trims too
    assert offsets(stream.since(4)) == [5]
    assert stream.since(3) is None
    assert stream.stats.expired_by_age == 4
    assert stream.expire(1000.0) == 1
    assert len(stream) == 0
    assert stream.first == 6
    assert stream.since(5) == [], "everything expired, but this client missed nothing"
    assert stream.since(4) is None


def test_no_age_limit_keeps_everything_in_size() -> None:
    stream = Stream("s", "E", size=3)
    stream.append("s", TS, b"x", False, 0.0)
    assert stream.expire(1e9) == 0
    assert len(stream) == 1


def test_byte_accounting() -> None:
    stream = Stream("chat.r", "E", size=2)
    empty = STREAM_OVERHEAD + len("chat.r")
    assert stream.bytes == empty == stream.stats.bytes
    a = stream.append("chat.r.x", TS, b"12345", False, 0.0)
    assert a.size == len("chat.r.x") + 5 + PUBLICATION_OVERHEAD
    assert stream.bytes == empty + a.size
    b = stream.append("chat.r", TS, b"1", False, 0.0)
    c = stream.append("chat.r", TS, b"123", False, 0.0)
    assert stream.bytes == empty + b.size + c.size == stream.stats.bytes
    assert stream.stats.publications == 2
    assert stream.trim_oldest()
    assert stream.bytes == empty + c.size
    assert stream.trim_oldest()
    assert not stream.trim_oldest()
    assert stream.bytes == empty
    assert stream.stats.trimmed_by_bytes == 2
    stream.discard()
    assert (stream.stats.bytes, stream.stats.publications, stream.stats.streams) == (0, 0, 0)


def test_publication_overhead_covers_what_python_holds() -> None:
    """The constant must cover the real per-publication memory, and not by much.

    In the compiled build the object holds ``offset`` and ``received`` unboxed, so it is
    larger and the boxed values below count them twice: the constant covers both builds.
    """
    pub = Publication("s", "e", 123456, "t", "2020-01-22T15:44:04.674Z", b"", False, 12.5)
    held = (
        sys.getsizeof(pub)
        + sys.getsizeof(pub.offset)
        + sys.getsizeof(pub.topic)
        - len(pub.topic)
        + sys.getsizeof(pub.timestamp)
        + sys.getsizeof(pub.message)
        + sys.getsizeof(pub.received)
        + 8  # its slot in the deque
    )
    assert held <= PUBLICATION_OVERHEAD <= held + 32


def test_stream_overhead_covers_what_python_holds() -> None:
    stream = Stream("", "e", size=1)
    entry = 100  # an OrderedDict entry: hash, key and value, its node, spare table room
    held = sys.getsizeof(stream) + sys.getsizeof(deque()) + sys.getsizeof("") + entry
    assert held <= STREAM_OVERHEAD <= held + 128


def test_latest() -> None:
    stream = Stream("c.r", "E", size=10)
    for topic in ["c.r", "c.r.t", "c.r", "c.r.t", "c.r.t", "c.r"]:
        stream.append(topic, TS, b"x", False, 0.0)
    assert offsets(stream.latest(3)) == [4, 5, 6]
    assert offsets(stream.latest(100)) == [1, 2, 3, 4, 5, 6]
    assert offsets(stream.latest(0)) == []
    assert offsets(stream.latest(-1)) == []
    assert offsets(stream.latest(10, since=4)) == [5, 6]
    assert offsets(stream.latest(1, since=4)) == [6]
    assert offsets(stream.latest(10, since=6)) == []
    assert offsets(stream.latest(2, subscription="c.r.t")) == [4, 5]
    assert offsets(stream.latest(10, since=2, subscription="c.r.t")) == [4, 5]


# -- the store ----------------------------------------------------------------


def store(*specs: str, max_bytes: int = 1 << 30) -> HistoryStore:
    return HistoryStore(pats(*specs), max_bytes=max_bytes, epoch_factory=counter_epochs())


def test_publish_without_history_keeps_nothing() -> None:
    hs = store("chat.*:10")
    assert hs.publish("news.uk", TS, b"1", False, 0.0) is None
    assert hs.publish("chat", TS, b"1", False, 0.0) is None
    stats = hs.stats()
    assert (stats.streams, stats.publications, stats.bytes, stats.published) == (0, 0, 0, 0)


def test_publish_gives_stream_offset_epoch() -> None:
    hs = store("chat.*:10")
    a = hs.publish("chat.r1.typing", TS, b'{"a":1}', True, 1.0)
    b = hs.publish("chat.r1", TS, b"2", False, 2.0)
    c = hs.publish("chat.r2", TS, b"3", False, 2.0)
    assert a is not None
    assert b is not None
    assert c is not None
    assert (a.stream, a.epoch, a.offset, a.topic, a.message, a.from_peer, a.received) == (
        "chat.r1",
        "e1",
        1,
        "chat.r1.typing",
        b'{"a":1}',
        True,
        1.0,
    )
    assert (b.stream, b.offset) == ("chat.r1", 2)
    assert (c.stream, c.offset) == ("chat.r2", 1)
    assert hs.position("chat.r1") == ("e1", 2)
    stats = hs.stats()
    assert (stats.streams, stats.publications, stats.published) == (2, 3, 3)
    assert stats.bytes == sum(s.bytes for s in (hs.stream("chat.r1"), hs.stream("chat.r2")) if s)


def test_a_stream_without_state_has_a_stable_position() -> None:
    """A client subscribed before the first publish can recover it later."""
    hs = store("chat.*:10")
    assert hs.position("chat.r1") == ("e1", 0)
    assert hs.locate("chat.r1.typing") == ("chat.r1", "e1", 0)
    assert hs.locate("chat") is None
    early = hs.recover("chat.r1", "e1", 0, 0.0)
    assert early == Recovery(True, "chat.r1", "e1", 0, [])
    assert hs.stats().streams == 0, "asking creates no state"
    hs.publish("chat.r1", TS, b"1", False, 1.0)
    hs.publish("chat.r1", TS, b"2", False, 1.0)
    later = hs.recover("chat.r1", "e1", 0, 2.0)
    assert later.recovered
    assert [p.message for p in later.publications] == [b"1", b"2"]
    assert (later.epoch, later.offset) == ("e1", 2)


def test_recover_on_a_stream_without_state() -> None:
    hs = store("chat.*:10")
    assert hs.recover("chat.r1", "e1", 3, 0.0) == Recovery(False, "chat.r1", "e1", 0, [])
    assert hs.recover("chat.r1", "old", 0, 0.0) == Recovery(False, "chat.r1", "e1", 0, [])


def test_a_restarted_server_has_new_epochs() -> None:
    first = HistoryStore(pats("chat.*:10"))
    second = HistoryStore(pats("chat.*:10"))
    assert first.epoch != second.epoch
    assert len(new_epoch()) == 12
    pub = first.publish("chat.r", TS, b"1", False, 0.0)
    assert pub is not None
    second.publish("chat.r", TS, b"1", False, 0.0)
    second.publish("chat.r", TS, b"2", False, 0.0)
    again = second.recover("chat.r", pub.epoch, pub.offset, 0.0)
    assert again == Recovery(False, "chat.r", second.epoch, 2, [])


def test_recover_filters_by_subscription() -> None:
    hs = store("chat.*:10")
    for topic in ["chat.r", "chat.r.typing", "chat.r.x", "chat.r.typing.a", "chat.q"]:
        hs.publish(topic, TS, topic.encode(), False, 0.0)
    rec = hs.recover("chat.r.typing", "e1", 0, 0.0)
    assert rec.recovered
    assert [(p.offset, p.topic) for p in rec.publications] == [
        (2, "chat.r.typing"),
        (4, "chat.r.typing.a"),
    ]
    assert rec.offset == 4, "the stream's offset, not the last matching one"
    assert offsets(hs.recover("chat.r", "e1", 1, 0.0).publications) == [2, 3, 4]
    assert offsets(hs.recover("chat.r.*", "e1", 1, 0.0).publications) == [2, 3, 4]


@pytest.mark.parametrize(
    ("subscription", "detail"),
    [
        ("chat", "does not lie inside one history stream"),
        ("chat.*", "does not lie inside one history stream"),
        ("chat.*.typing", "does not lie inside one history stream"),
        ("*", "does not lie inside one history stream"),
        ("news", "no history is kept for 'news'"),
        ("chatroom.a", "no history is kept"),
    ],
)
def test_recover_outside_one_stream_is_an_invalid_message(subscription: str, detail: str) -> None:
    hs = store("chat.*:10")
    with pytest.raises(HistoryError, match=detail) as info:
        hs.recover(subscription, "e1", 0, 0.0)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert repr(subscription) in info.value.detail
    with pytest.raises(HistoryError):
        hs.history(subscription, 10, now=0.0)


def test_recover_fails_when_history_no_longer_reaches_back() -> None:
    hs = store("chat.*:3:10s")
    for i in range(5):
        hs.publish("chat.r", TS, b"%d" % i, False, float(i))
    assert hs.recover("chat.r", "e1", 1, 5.0) == Recovery(False, "chat.r", "e1", 5, [])
    assert offsets(hs.recover("chat.r", "e1", 2, 5.0).publications) == [3, 4, 5]
    assert hs.recover("chat.r", "e1", 5, 5.0) == Recovery(True, "chat.r", "e1", 5, [])
    assert hs.recover("chat.r", "e1", 6, 5.0).recovered is False
    assert hs.recover("chat.r", "e2", 5, 5.0).recovered is False
    # Expiry on read: at 13.5 the publications received at 2.0 and 3.0 are too old.
    assert hs.recover("chat.r", "e1", 2, 13.5).recovered is False
    assert offsets(hs.recover("chat.r", "e1", 4, 13.5).publications) == [5]
    assert hs.stats().expired_by_age == 2


def test_recovery_includes_marks_the_seam() -> None:
    rec = Recovery(True, "s", "E", 7, [])
    assert rec.includes("E", 7)
    assert rec.includes("E", 1)
    assert not rec.includes("E", 8)
    assert not rec.includes("F", 3)
    assert not Recovery(False, "s", "E", 7, []).includes("E", 3)


def test_history_request() -> None:
    hs = store("chat.*:10")
    for topic in ["chat.r", "chat.r.t", "chat.r", "chat.r.t", "chat.r"]:
        hs.publish(topic, TS, b"x", False, 0.0)
    page = hs.history("chat.r", 2, now=0.0)
    assert (page.stream, page.epoch, page.offset, page.since_ignored) == ("chat.r", "e1", 5, False)
    assert offsets(page.publications) == [4, 5]
    assert offsets(hs.history("chat.r", 50, now=0.0).publications) == [1, 2, 3, 4, 5]
    assert offsets(hs.history("chat.r", 0, now=0.0).publications) == []
    assert offsets(hs.history("chat.r.t", 50, now=0.0).publications) == [2, 4]
    assert offsets(hs.history("chat.r", 50, now=0.0, since=("e1", 3)).publications) == [4, 5]
    assert offsets(hs.history("chat.r.t", 50, now=0.0, since=("e1", 3)).publications) == [4]
    other = hs.history("chat.r", 2, now=0.0, since=("old", 3))
    assert other.since_ignored
    assert offsets(other.publications) == [4, 5]


def test_history_of_a_stream_without_state() -> None:
    hs = store("chat.*:10")
    page = hs.history("chat.new", 10, now=0.0)
    assert (page.stream, page.epoch, page.offset, page.publications) == ("chat.new", "e1", 0, [])
    assert not page.since_ignored
    assert not hs.history("chat.new", 10, now=0.0, since=("e1", 0)).since_ignored
    assert hs.history("chat.new", 10, now=0.0, since=("e0", 0)).since_ignored


def test_history_expires_on_read() -> None:
    hs = store("chat.*:10:5s")
    hs.publish("chat.r", TS, b"1", False, 0.0)
    hs.publish("chat.r", TS, b"2", False, 3.0)
    assert offsets(hs.history("chat.r", 10, now=6.0).publications) == [2]
    assert hs.stats().publications == 1


def test_expire_sweeps_every_stream() -> None:
    hs = store("a.*:10:5s", "b.*:10")
    hs.publish("a.x", TS, b"1", False, 0.0)
    hs.publish("a.y", TS, b"1", False, 0.0)
    hs.publish("a.y", TS, b"1", False, 4.0)
    hs.publish("b.z", TS, b"1", False, 0.0)
    assert hs.expire(6.0) == 2
    stats = hs.stats()
    assert (stats.publications, stats.expired_by_age, stats.streams) == (2, 2, 3)
    assert hs.position("a.x") == ("e1", 1), "an emptied stream keeps its position"


def test_byte_cap_evicts_least_recently_published_streams() -> None:
    one = STREAM_OVERHEAD + len("c.a") + len("c.a") + 1 + PUBLICATION_OVERHEAD
    hs = store("c.*:10", max_bytes=3 * one)
    for name in ["c.a", "c.b", "c.c"]:
        hs.publish(name, TS, b"1", False, 0.0)
    assert hs.stats().bytes == 3 * one
    hs.publish("c.a", TS, b"2", False, 0.0)  # c.b is now the least recently published
    stats = hs.stats()
    assert stats.evicted_streams == 1
    assert stats.bytes <= 3 * one
    assert hs.stream("c.b") is None
    assert hs.position("c.a") == ("e1", 2), "survivors keep their epoch and offsets"
    assert hs.position("c.c") == ("e1", 1)
    assert hs.epoch == "e2", "each eviction starts a new epoch for streams created later"
    assert hs.position("c.b") == ("e2", 0)
    assert hs.recover("c.b", "e1", 1, 0.0).recovered is False
    again = hs.publish("c.b", TS, b"3", False, 0.0)
    assert again is not None
    assert (again.epoch, again.offset) == ("e2", 1), "recreated: a new epoch, offsets restart"


def test_byte_cap_trims_the_current_stream_last() -> None:
    size = len("c.a") + 10 + PUBLICATION_OVERHEAD
    hs = store("c.*:100", max_bytes=STREAM_OVERHEAD + len("c.a") + 3 * size)
    for i in range(5):
        hs.publish("c.a", TS, b"%010d" % i, False, 0.0)
    stats = hs.stats()
    assert (stats.evicted_streams, stats.trimmed_by_bytes, stats.publications) == (0, 2, 3)
    assert hs.epoch == "e1", "nothing was evicted, so no new epoch"
    assert hs.recover("c.a", "e1", 1, 0.0).recovered is False
    assert offsets(hs.recover("c.a", "e1", 2, 0.0).publications) == [3, 4, 5]
    huge = hs.publish("c.a", TS, b"x" * 10_000, False, 0.0)
    assert huge is not None
    assert huge.offset == 6, "a publish too big to keep still takes its offset"
    assert hs.stats().publications == 0
    assert hs.recover("c.a", "e1", 5, 0.0).recovered is False
    assert hs.recover("c.a", "e1", 6, 0.0).recovered is True


def test_store_refuses_a_bad_byte_cap() -> None:
    with pytest.raises(HistoryConfigError, match="max_bytes"):
        HistoryStore(pats("a:1"), max_bytes=0)


# -- THE property: recovery is exact, or says it is not ------------------------

MACHINE_PATTERNS = ["chat.vip.*:3:5", "chat.*:4", "log:2:3"]
TOPICS = [
    "chat.r1",
    "chat.r1.typing",
    "chat.r1.x.y",
    "chat.r2",
    "chat.vip",
    "chat.vip.a",
    "chat.vip.a.t",
    "chat.vip.b",
    "log",
    "log.a",
    "news",
    "chat",
]
STREAM_NAMES = sorted(
    {found[0] for t in TOPICS if (found := HistoryPatterns(pats(*MACHINE_PATTERNS)).stream_of(t))}
)
SUBSCRIPTIONS = [
    "chat.r1",
    "chat.r1.typing",
    "chat.r1.*",
    "chat.r2",
    "chat.vip.a",
    "chat.vip.a.t",
    "chat.vip.b",
    "log",
    "log.a",
    "chat.vip",
    "chat.*",
    "chat",
    "news",
]


@dataclass(frozen=True)
class Kept:
    """What the model remembers of every publish, forever."""

    stream: str
    epoch: str
    offset: int
    topic: str
    message: bytes
    received: float


class RecoveryMachine(RuleBasedStateMachine):
    """Publishes, time, sweeps, restarts and recovers against a model that forgets nothing."""

    max_bytes = 1 << 30
    """Large: nothing is evicted, so whether recovery is possible is fully predictable."""
    evicting = False

    def __init__(self) -> None:
        super().__init__()
        self.epochs = counter_epochs()
        self.patterns = pats(*MACHINE_PATTERNS)
        self.table = HistoryPatterns(self.patterns)
        self.now = 0.0
        self.model: list[Kept] = []
        self.positions: list[tuple[str, int]] = []
        self.current: dict[str, str] = {}
        """The epoch of each stream's last publish since the last restart."""
        self.serial = 0

    @initialize()
    def start(self) -> None:
        self.store = HistoryStore(self.patterns, self.max_bytes, self.epochs)

    @rule()
    def restart(self) -> None:
        self.store = HistoryStore(self.patterns, self.max_bytes, self.epochs)
        self.current.clear()

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 6.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def sweep(self) -> None:
        self.store.expire(self.now)

    @rule(topic=st.sampled_from(TOPICS))
    def publish(self, topic: str) -> None:
        self.serial += 1
        message = b"%d" % self.serial
        pub = self.store.publish(topic, TS, message, False, self.now)
        found = self.table.stream_of(topic)
        if found is None:
            assert pub is None
            return
        assert pub is not None
        assert (pub.stream, pub.topic, pub.message) == (found[0], topic, message)
        earlier = [k.offset for k in self.model if (k.stream, k.epoch) == (pub.stream, pub.epoch)]
        assert pub.offset == len(earlier) + 1, "offsets are 1, 2, 3, ... within an epoch"
        self.model.append(Kept(pub.stream, pub.epoch, pub.offset, topic, message, self.now))
        self.positions.append((pub.epoch, pub.offset))
        self.current[pub.stream] = pub.epoch

    @rule(subscription=st.sampled_from(SUBSCRIPTIONS))
    def look_up_position(self, subscription: str) -> None:
        """What a plain subscribe's ack would tell a client."""
        found = self.store.locate(subscription)
        if found is not None:
            self.positions.append(found[1:])

    @rule(
        subscription=st.sampled_from(SUBSCRIPTIONS),
        which=st.integers(min_value=0),
        tweak=st.sampled_from([0, 0, 0, -1, 1, 2, -100]),
        bogus=st.booleans(),
    )
    def recover(self, subscription: str, which: int, tweak: int, bogus: bool) -> None:
        name = self.table.stream_of_subscription(subscription)
        if bogus or not self.positions:
            epoch, offset = "bogus", max(0, tweak)
        else:
            epoch, offset = self.positions[which % len(self.positions)]
            offset += tweak
        if name is None:
            with pytest.raises(HistoryError):
                self.store.recover(subscription, epoch, offset, self.now)
            return
        rec = self.store.recover(subscription, epoch, offset, self.now)
        assert rec.stream == name
        state = self.store.stream(name)
        if state is None:
            assert name not in self.current or self.evicting, "without eviction, never lost"
            assert (rec.epoch, rec.offset) == (self.store.epoch, 0)
            current: list[Kept] = []
        else:
            epoch_now = self.current[name]
            current = [k for k in self.model if (k.stream, k.epoch) == (name, epoch_now)]
            assert (rec.epoch, rec.offset) == (epoch_now, current[-1].offset)
        if rec.recovered:
            expected = [
                (k.offset, k.topic, k.message)
                for k in self.model
                if k.stream == name
                and k.epoch == epoch
                and k.offset > offset
                and matches(subscription, k.topic)
            ]
            got = [(p.offset, p.topic, p.message) for p in rec.publications]
            assert got == expected, "exactly what was missed, in offset order"
        else:
            assert rec.publications == []
        self.check_complete(rec, name, epoch, offset, current)

    def check_complete(
        self, rec: Recovery, name: str, epoch: str, offset: int, current: list[Kept]
    ) -> None:
        """Without eviction, refusing is right exactly when something missed is gone."""
        found = self.table.stream_of(name)
        assert found is not None
        assert found[0] == name, "a stream's name lies in the stream itself"
        pattern = found[1]
        last = current[-1].offset if current else 0
        if epoch != rec.epoch or not 0 <= offset <= last:
            possible = False
        elif offset == last:
            possible = True
        else:
            kept = current[-pattern.size :]
            if pattern.max_age is not None:
                kept = [k for k in kept if k.received >= self.now - pattern.max_age]
            possible = any(k.offset == offset + 1 for k in kept)
        assert rec.recovered == possible

    @invariant()
    def accounting_adds_up(self) -> None:
        stats = self.store.stats()
        streams = [s for name in STREAM_NAMES if (s := self.store.stream(name)) is not None]
        assert stats.streams == len(streams)
        assert stats.publications == sum(len(s) for s in streams)
        assert stats.bytes == sum(
            STREAM_OVERHEAD + len(s.name) + sum(p.size for p in s.latest(len(s))) for s in streams
        )
        assert stats.bytes <= self.max_bytes
        if not self.evicting:
            assert stats.evicted_streams == 0


class EvictingRecoveryMachine(RecoveryMachine):
    """A tiny byte cap: streams come and go, and epochs must never be reused."""

    max_bytes = 3 * (STREAM_OVERHEAD + 20 + PUBLICATION_OVERHEAD)
    evicting = True

    def check_complete(
        self, rec: Recovery, name: str, epoch: str, offset: int, current: list[Kept]
    ) -> None:
        """With eviction, refusing is allowed; replaying wrongly is not (checked above)."""

    @invariant()
    def no_pair_names_two_publications(self) -> None:
        triples = [(k.stream, k.epoch, k.offset) for k in self.model]
        assert len(triples) == len(set(triples))


TestRecovery = RecoveryMachine.TestCase
TestRecovery.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestEvictingRecovery = EvictingRecoveryMachine.TestCase
TestEvictingRecovery.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
