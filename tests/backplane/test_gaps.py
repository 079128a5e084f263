"""The pure gap tracker of shared history streams, tested by value (and by hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dwsps.links.gaps import GapTracker, Repair


def test_in_order_arrivals_are_delivered_and_copies_dropped() -> None:
    t: GapTracker[str] = GapTracker()
    assert t.arrive("s", "e", 5, "p5") == (["p5"], None)  # first seen: wherever it starts
    assert t.arrive("s", "e", 6, "p6") == (["p6"], None)
    assert t.arrive("s", "e", 6, "again") == ([], None)
    assert t.arrive("s", "e", 4, "old") == ([], None)
    assert t.position("s") == ("e", 6)
    assert (t.gaps, t.repaired) == (0, 0)


def test_a_jump_holds_later_arrivals_until_the_read_fills_the_gap() -> None:
    t: GapTracker[str] = GapTracker()
    t.arrive("s", "e", 1, "p1")
    assert t.arrive("s", "e", 4, "p4") == ([], Repair("s", "e", 1))
    assert t.repairing("s")
    assert t.arrive("s", "e", 5, "p5") == ([], None)  # held
    # The read (after 1) finds 2..5: it delivers 2, 3 from the stream, then the held.
    out, more = t.fill("s", "e", 5, [(2, "r2"), (3, "r3"), (4, "r4"), (5, "r5")], False)
    assert out == ["r2", "r3", "r4", "r5"]
    assert more is None
    assert not t.repairing("s")
    assert (t.gaps, t.repaired) == (0, 4)
    assert t.arrive("s", "e", 6, "p6") == (["p6"], None)


def test_what_the_stream_no_longer_has_is_counted_as_gaps() -> None:
    t: GapTracker[str] = GapTracker()
    t.arrive("s", "e", 1, "p1")
    _, repair = t.arrive("s", "e", 10, "p10")
    assert repair == Repair("s", "e", 1)
    # Trimmed: the stream starts at 5 now.
    out, more = t.fill("s", "e", 10, [(5, "r5"), (6, "r6")], False)
    assert out == ["r5", "r6", "p10"]  # 2..4 trimmed, 7..9 also gone (10 was held)
    assert more is None
    assert t.gaps == 3 + 3
    assert t.position("s") == ("e", 10)


def test_full_pages_ask_for_more() -> None:
    t: GapTracker[int] = GapTracker()
    t.arrive("s", "e", 1, 1)
    t.arrive("s", "e", 5, 5)
    out, more = t.fill("s", "e", 5, [(2, 2), (3, 3)], True)
    assert (out, more) == ([2, 3], Repair("s", "e", 3))
    out, more = t.fill("s", "e", 5, [(4, 4)], False)
    assert (out, more) == ([4, 5], None)


def test_another_epoch_resets_and_starts_from_its_first_offset() -> None:
    t: GapTracker[str] = GapTracker()
    t.arrive("s", "old", 7, "o7")
    # Live: the engine lost the stream; the new epoch's offset 3 arrives first.
    assert t.arrive("s", "new", 3, "n3") == ([], Repair("s", "new", 0))
    out, more = t.fill("s", "new", 3, [(1, "n1"), (2, "n2"), (3, "n3")], False)
    assert (out, more) == (["n1", "n2", "n3"], None)
    assert t.resets == 1
    # A read that finds another epoch than the tracker's: read that epoch from 0.
    t.arrive("s", "new", 9, "n9")
    out, more = t.fill("s", "newer", 2, [(4, "x")], False)
    assert (out, more) == ([], Repair("s", "newer", 0))


def test_resync_repairs_every_tracked_stream_and_overflow_reads_again() -> None:
    t: GapTracker[int] = GapTracker(max_held=2)
    t.arrive("a", "e", 1, 1)
    t.arrive("b", "e", 4, 4)
    assert sorted(t.resync(), key=lambda r: r.stream) == [Repair("a", "e", 1), Repair("b", "e", 4)]
    for i in range(2, 6):
        assert t.arrive("a", "e", i, i) == ([], None)  # two held, two dropped
    out, more = t.fill("a", "e", 1, [], False)
    assert (out, more) == ([2, 3], Repair("a", "e", 3))  # the dropped ones: read again
    out, more = t.fill("a", "e", 5, [(4, 4), (5, 5)], False)
    assert (out, more) == ([4, 5], None)
    assert t.abandon("b") == []
    assert sorted(t.resync(), key=lambda r: r.stream) == [Repair("a", "e", 5), Repair("b", "e", 4)]


def test_streams_are_bounded_and_forgotten() -> None:
    t: GapTracker[int] = GapTracker(max_streams=2)
    for name in "abc":
        t.arrive(name, "e", 1, 1)
    assert t.streams() == ["b", "c"]
    t.forget(["b"])
    assert t.streams() == ["c"]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 40),
    lost=st.sets(st.integers(2, 40)),
    trimmed=st.integers(0, 40),
    page=st.integers(1, 7),
    copies=st.lists(st.integers(1, 40), max_size=5),
)
def test_any_loss_is_repaired_exactly_once_in_order_or_counted(
    n: int, lost: set[int], trimmed: int, page: int, copies: list[int]
) -> None:
    """Live arrivals 1..n with some lost and some copied; the stream keeps offsets > trimmed.

    Delivered: every offset once, in order, except those both lost live and
    trimmed from the stream, and exactly those are counted in ``gaps``.
    """
    kept = {i: i for i in range(1, n + 1) if i > trimmed}
    t: GapTracker[int] = GapTracker()
    delivered: list[int] = []
    repairs: list[Repair] = []

    def run(repair: Repair | None) -> None:
        while repair is not None:
            entries = [(o, o) for o in sorted(kept) if o > repair.after][:page]
            out, repair = t.fill("s", "e", n, entries, len(entries) == page)
            delivered.extend(out)

    arrivals = [i for i in range(1, n + 1) if i not in lost or i == 1]
    for c in copies:
        if c <= n and c in arrivals:
            arrivals.insert(arrivals.index(c) + 1, c)
    for i in arrivals:
        out, repair = t.arrive("s", "e", i, i)
        delivered.extend(out)
        if repair is not None:
            repairs.append(repair)
    for repair in repairs:
        run(repair)
    if t.repairing("s"):
        run(Repair("s", "e", t.position("s")[1]))  # type: ignore[index]
    # The end of the stream: a resync reads whatever is still missing.
    for repair in t.resync():
        run(repair)
    gone = {i for i in range(1, n + 1) if i in lost and i != 1 and i not in kept}
    assert delivered == [i for i in range(1, n + 1) if i not in gone]
    assert t.gaps == len(gone)
