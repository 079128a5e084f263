"""The router by value: subscriptions, identity, interest and the fan-out plan."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwsps.errors import SubscriptionLimitError
from dwsps.messages import Publish
from dwsps.router import Admission, Batch, Router
from dwsps.topics import matches


def test_subscriptions_are_idempotent_and_per_subscriber() -> None:
    router: Router[str] = Router("me")
    assert router.subscribe("a", "news")
    assert not router.subscribe("a", "news")
    assert router.subscribe("a", "news.uk")
    assert router.subscribe("b", "news")
    assert router.subscriptions("a") == {"news", "news.uk"}
    assert len(router) == 3
    assert not router.unsubscribe("b", "sport")
    assert router.unsubscribe("b", "news")
    assert router.subscriptions("b") == frozenset()
    assert router.subscriber_count() == 1
    assert router.drop("a") == ["news", "news.uk"]
    assert len(router) == 0
    assert router.topics() == []


def test_subscription_limit() -> None:
    router: Router[str] = Router("me", max_subscriptions=2)
    router.subscribe("a", "x")
    router.subscribe("a", "y")
    assert not router.subscribe("a", "x")  # held already: no limit hit
    with pytest.raises(SubscriptionLimitError):
        router.subscribe("a", "z")
    assert router.subscriptions("a") == {"x", "y"}
    router.subscribe("b", "z")  # the limit is per subscriber


def test_interest_changes_are_reported_on_zero_one_transitions() -> None:
    changes: list[tuple[str, bool]] = []
    router: Router[str] = Router("me", on_interest=lambda k, w: changes.append((k, w)))
    router.subscribe("a", "news")
    router.subscribe("b", "news.uk")
    router.subscribe("a", "*.weather")
    router.unsubscribe("a", "news")
    assert changes == [("news", True), ("*", True)]
    router.drop("b")
    router.drop("a")
    assert changes[2:] == [("news", False), ("*", False)]
    assert router.interest() == []


def test_identity_stamping_and_duplicates() -> None:
    router: Router[str] = Router("me")
    first, second = Publish("t", 1), Publish("t", 2)
    assert router.admit(first) is Admission.NEW
    assert router.admit(second) is Admission.NEW
    assert (first.origin, first.seq, second.seq) == ("me", 1, 2)
    assert router.admit(Publish("t", 1, origin="me", seq=1)) is Admission.OWN
    assert router.admit(Publish("t", 1, origin="other", seq=5)) is Admission.NEW
    assert router.admit(Publish("t", 1, origin="other", seq=5)) is Admission.DUPLICATE
    # From an original peer: no identity, nothing to check, not stamped.
    peer = Publish("t", 1, from_peer=True)
    assert router.admit(peer) is Admission.NEW
    assert peer.origin is None


# -- the fan-out plan against a brute-force model -----------------------------

CONNS = ["a", "b", "c"]
TOPICS = ["n", "n.u", "n.u.l", "n.f", "s", "*", "n.*", "*.u"]
PUB_TOPICS = ["n", "n.u", "n.u.l", "n.f", "s", "s.u"]

Op = tuple[str, str, str]  # (kind, conn, topic)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("sub"), st.sampled_from(CONNS), st.sampled_from(TOPICS)),
        st.tuples(st.just("unsub"), st.sampled_from(CONNS), st.sampled_from(TOPICS)),
        st.tuples(st.just("pub"), st.just(""), st.sampled_from(PUB_TOPICS)),
        st.tuples(st.just("pub"), st.just(""), st.sampled_from(PUB_TOPICS)),
        st.tuples(st.just("reply"), st.sampled_from(CONNS), st.just("")),
        st.tuples(st.just("drop"), st.sampled_from(CONNS), st.just("")),
        st.tuples(st.just("turn"), st.just(""), st.just("")),
    ),
    max_size=60,
)


@dataclass
class Wire:
    """What the write path would have queued per connection, from the router's plan."""

    queued: dict[str, list[bytes]] = field(default_factory=lambda: {c: [] for c in CONNS})
    batches: int = 0

    def apply(self, batch: Batch[str] | None) -> None:
        if batch is None:
            return
        self.batches += 1
        data = batch.data()
        for member in batch.members:
            self.queued[member].append(data)


def _split(chunks: list[bytes]) -> list[bytes]:
    return [f for chunk in chunks for f in chunk.split(b"|") if f]


def _run(script: list[Op]) -> tuple[dict[str, list[list[bytes]]], dict[str, list[bytes]], int]:
    """Play ``script`` on a router; return (model groups, queued frames, batches)."""
    router: Router[str] = Router("me")
    wire = Wire()
    model: dict[str, list[list[bytes]]] = {c: [] for c in CONNS}
    subs: dict[str, set[str]] = {c: set() for c in CONNS}
    for n, (kind, conn, topic) in enumerate(script):
        if kind == "sub":
            router.subscribe(conn, topic)
            subs[conn].add(topic)
        elif kind == "unsub":
            router.unsubscribe(conn, topic)
            subs[conn].discard(topic)
        elif kind == "drop":
            router.drop(conn)
            subs[conn].clear()
        elif kind == "reply":
            wire.apply(router.release(conn))
            wire.queued[conn].append(b"reply%d|" % n)
            model[conn].append([b"reply%d" % n])
        elif kind == "turn":
            wire.apply(router.close_batch())
        else:  # pub
            for context, subscribers in router.match(topic):
                wire.apply(router.batch(subscribers, b"p%d:%b|" % (n, context.encode())))
            for c in CONNS:
                group = sorted(b"p%d:%b" % (n, s.encode()) for s in subs[c] if matches(s, topic))
                if group:
                    model[c].append(group)
    wire.apply(router.close_batch())
    return model, wire.queued, wire.batches


@settings(max_examples=400, deadline=None)
@given(ops)
def test_every_connection_gets_exactly_its_deliveries_in_order(script: list[Op]) -> None:
    model, queued, _ = _run(script)
    for conn in CONNS:
        frames = _split(queued[conn])
        # One group per publish (or reply), in order; within a publish, one frame
        # per matching subscription, in any order.
        got: list[list[bytes]] = []
        for expected in model[conn]:
            got.append(sorted(frames[: len(expected)]))
            frames = frames[len(expected) :]
        assert got == model[conn]
        assert frames == [], "nothing more than the model says"


def test_consecutive_publishes_to_one_set_share_one_batch() -> None:
    script: list[Op] = [("sub", c, "n") for c in CONNS]
    script += [("pub", "", "n.u")] * 50
    _, queued, batches = _run(script)
    assert batches == 1
    for conn in CONNS:
        assert len(queued[conn]) == 1, "one buffer per connection"
        assert len(_split(queued[conn])) == 50


def test_a_reply_closes_the_batch_of_its_member_only() -> None:
    script: list[Op] = [("sub", "a", "n"), ("sub", "b", "s")]
    script += [("pub", "", "n"), ("reply", "b", ""), ("pub", "", "n"), ("reply", "a", "")]
    script += [("pub", "", "n")]
    _, queued, batches = _run(script)
    # b is not in a's batch: its reply does not split it; a's reply does.
    assert batches == 2
    assert _split(queued["a"]) == [b"p2:n", b"p4:n", b"reply5", b"p6:n"]


def test_a_subscription_change_starts_a_new_batch() -> None:
    script: list[Op] = [("sub", "a", "n"), ("pub", "", "n"), ("sub", "b", "n"), ("pub", "", "n")]
    _, queued, batches = _run(script)
    assert batches == 2
    assert _split(queued["a"]) == [b"p1:n", b"p3:n"]
    assert _split(queued["b"]) == [b"p3:n"], "b subscribed after the first publish"
