"""The (origin, seq) deduplicator (pure: no sockets)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dwsps.dedup import Deduplicator


def test_each_pair_is_new_exactly_once() -> None:
    dedup = Deduplicator()
    assert dedup.first_time("a", 1) is True
    assert dedup.first_time("a", 1) is False
    assert dedup.first_time("a", 2) is True
    assert dedup.first_time("b", 1) is True, "origins are independent"
    assert dedup.first_time("b", 1) is False


def test_out_of_order_within_the_window() -> None:
    dedup = Deduplicator(window=8)
    assert dedup.first_time("a", 10)
    assert dedup.first_time("a", 7)
    assert dedup.first_time("a", 3)  # offset 7: still inside
    assert not dedup.first_time("a", 7)
    assert not dedup.first_time("a", 2), "older than the window: cannot tell, so dropped"


def test_a_big_jump_resets_the_window() -> None:
    dedup = Deduplicator(window=8)
    assert dedup.first_time("a", 1)
    assert dedup.first_time("a", 1000)
    assert not dedup.first_time("a", 1000)
    assert dedup.first_time("a", 999)
    assert not dedup.first_time("a", 1)


def test_forget_and_origin_eviction() -> None:
    dedup = Deduplicator(max_origins=2)
    assert dedup.first_time("a", 1)
    assert dedup.first_time("b", 1)
    dedup.forget("a")
    assert dedup.first_time("a", 1), "forgotten origin starts over"
    assert dedup.first_time("c", 1)  # evicts the least recently used: b
    assert not dedup.first_time("a", 1)
    assert dedup.first_time("b", 1)
    dedup.forget("never-seen")  # no error


@settings(max_examples=300, deadline=None)
@given(
    seqs=st.lists(
        st.tuples(st.sampled_from(["x", "y"]), st.integers(min_value=0, max_value=40)),
        max_size=80,
    )
)
def test_matches_a_model(seqs: list[tuple[str, int]]) -> None:
    window = 8
    dedup = Deduplicator(window=window)
    seen: dict[str, set[int]] = {}
    for origin, seq in seqs:
        got = seen.setdefault(origin, set())
        high = max(got, default=-1)
        expected = not got or seq > high or (high - seq < window and seq not in got)
        assert dedup.first_time(origin, seq) is expected, (origin, seq, sorted(got))
        if expected:
            got.add(seq)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.integers(min_value=-12, max_value=12), max_size=120),
)
def test_matches_a_model_on_mostly_in_order_streams(steps: list[int]) -> None:
    # Runs longer than the window, gaps and late arrivals around them.
    window = 8
    dedup = Deduplicator(window=window)
    got: set[int] = set()
    seq = 100
    for step in steps:
        seq = max(0, seq + (1 if step > -3 else step))
        high = max(got, default=-1)
        expected = not got or seq > high or (high - seq < window and seq not in got)
        assert dedup.first_time("o", seq) is expected, (seq, sorted(got))
        if expected:
            got.add(seq)
