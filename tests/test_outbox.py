"""The shared bounded outbox, backoff and redaction, by value."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dwsps.backoff import Backoff
from dwsps.outbox import Outbox
from dwsps.redact import redact


def test_write_confirm_rewind() -> None:
    box: Outbox[int] = Outbox(10, 1000)
    for n in range(5):
        box.add(n, 10)
    assert box.take_unsent(2) == [0, 1]
    assert (box.in_flight, box.unsent) == (2, 3)
    assert box.oldest_written() == 0
    assert box.confirm() == 0
    assert box.confirm(ok=False) == 1
    assert box.confirm() is None  # nothing written is waiting
    assert box.take_unsent(2) == [2, 3]
    box.rewind()
    assert box.take_unsent(10) == [2, 3, 4]
    assert box.stats.as_dict() == {
        "queued": 5,
        "sent": 5,
        "resent": 2,
        "confirmed": 1,
        "rejected": 1,
        "dropped": 0,
        "forgotten": 0,
    }


def test_take_unsent_respects_a_byte_budget_but_always_moves() -> None:
    box: Outbox[str] = Outbox(10, 10_000)
    box.add("big", 5000)
    box.add("small", 10)
    assert box.take_unsent(10, max_bytes=100) == ["big"]
    assert box.take_unsent(10, max_bytes=100) == ["small"]


def test_bounds_evict_oldest_and_count_written_as_forgotten() -> None:
    box: Outbox[int] = Outbox(3, 1000)
    for n in range(3):
        box.add(n, 1)
    box.take_unsent(1)  # 0 written
    assert box.add(3, 1) == 1
    assert (box.stats.forgotten, box.stats.dropped) == (1, 0)
    assert box.add(4, 1) == 1
    assert box.stats.dropped == 1
    assert list(box) == [2, 3, 4]
    assert box.add(5, 5000) == 4, "a single entry over the byte bound is not held"
    assert len(box) == 0
    assert box.size == 0


@given(st.lists(st.tuples(st.sampled_from("atcr"), st.integers(1, 40)), max_size=200))
def test_every_entry_is_accounted_for(ops: list[tuple[str, int]]) -> None:
    box: Outbox[int] = Outbox(8, 100)
    for n, (op, size) in enumerate(ops):
        if op == "a":
            box.add(n, size)
        elif op == "t":
            box.take_unsent(size % 4 + 1)
        elif op == "c":
            box.confirm(ok=size % 3 != 0)
        else:
            box.rewind()
        s = box.stats
        assert s.queued == s.confirmed + s.rejected + s.dropped + s.forgotten + len(box)
        assert box.in_flight + box.unsent == len(box)
        assert len(box) <= 8
        assert box.size <= 100


@pytest.mark.parametrize("attempt", [0, 1, 3, 10, 1000])
def test_backoff_is_full_jitter_under_a_growing_cap(attempt: int) -> None:
    rng = random.Random(1)
    backoff = Backoff(0.1, 5.0, rng)
    backoff.attempt = attempt
    cap = backoff.bound()
    assert cap == min(5.0, 0.1 * 2**attempt)
    delays = []
    for _ in range(200):
        backoff.attempt = attempt
        delays.append(backoff.next_delay())
    assert all(0 <= d <= cap for d in delays)
    assert len({round(d, 9) for d in delays}) > 150, "jitter spreads them"
    backoff.reset()
    assert backoff.attempt == 0


def test_backoff_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(0, 1)
    with pytest.raises(ValueError, match="initial"):
        Backoff(2, 1)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://h:1/", "ws://h:1/"),
        ("ws://h:1/x?peer_token=s3cret&a=1", "ws://h:1/x?peer_token=***&a=1"),
        ("ws://h/?TOKEN=abc", "ws://h/?TOKEN=***"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:pw@[::1]:6380/0?token=x", "rediss://user:***@[::1]:6380/0?token=***"),
        ("ws://user:pw@h/?api_key=k", "ws://user:***@h/?api_key=***"),
        # A user name alone is often a token (ws://TOKEN@host): masked too.
        ("redis://user@h/0", "redis://***@h/0"),
        ("ws://tok@h:1/x", "ws://***@h:1/x"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


def test_redact_never_shows_a_password_in_a_malformed_url() -> None:
    assert "pw" not in redact("redis://u:pw@h:notaport/0")
