"""Pure tests of the peer link's outbox, backoff and wire encoding (no sockets)."""

from __future__ import annotations

import random

import orjson
import pytest

from dwsps.backoff import Backoff
from dwsps.links.peering import PeerOutbox as Outbox
from dwsps.messages import Publish, encode_forward_head, parse_request, with_link_id
from dwsps.redact import redact


def head(n: int) -> bytes:
    return encode_forward_head(Publish("t", n, "2020-01-22T15:44:04.674Z", origin="o", seq=n))


def ids(frames: list[bytes]) -> list[int]:
    return [orjson.loads(f)["id"] for f in frames]


def messages(frames: list[bytes]) -> list[int]:
    return [orjson.loads(f)["message"] for f in frames]


def test_forwarded_publish_is_an_original_publish_plus_ignorable_fields() -> None:
    pub = Publish("news.uk", {"a": [1, 2]}, "2020-01-22T15:44:04.674Z", origin="abc", seq=7)
    frame = with_link_id(encode_forward_head(pub), 42)
    obj = orjson.loads(frame)
    assert obj == {
        "type": "publish",
        "topic": "news.uk",
        "message": {"a": [1, 2]},
        "timestamp": "2020-01-22T15:44:04.674Z",
        "fromPeerServer": True,
        "origin": "abc",
        "seq": 7,
        "id": 42,
    }
    parsed = parse_request(frame)
    assert isinstance(parsed, Publish)
    assert (parsed.from_peer, parsed.origin, parsed.seq, parsed.id) == (True, "abc", 7, 42)


def test_acks_with_ids_confirm_cumulatively() -> None:
    box = Outbox(100, 1 << 20)
    for n in range(5):
        box.add(head(n))
    frames = box.take_unsent(10)
    assert ids(frames) == [1, 2, 3, 4, 5]
    assert box.in_flight == 5
    assert box.settle(3, ok=True) == 3  # replies 1 and 2 lost? 3 covers them
    assert len(box) == 2
    assert box.stats.confirmed == 3
    assert box.settle(5, ok=True) == 5
    assert len(box) == 0
    assert box.size == 0


def test_acks_without_ids_confirm_in_order() -> None:
    """An original server echoes no id: each reply settles the oldest one written."""
    box = Outbox(100, 1 << 20)
    for n in range(3):
        box.add(head(n))
    box.take_unsent(10)
    assert box.settle(None, ok=True) == 1
    assert box.settle("not-ours", ok=True) == 2
    assert len(box) == 1
    assert box.settle(None, ok=True) == 3
    assert box.settle(None, ok=True) is None  # a stray reply changes nothing
    assert box.stats.confirmed == 3


def test_error_reply_rejects_that_publish_only() -> None:
    box = Outbox(100, 1 << 20)
    for n in range(3):
        box.add(head(n))
    box.take_unsent(10)
    box.settle(2, ok=False)  # 1 confirmed implicitly, 2 rejected
    assert (box.stats.confirmed, box.stats.rejected, len(box)) == (1, 1, 1)


def test_connection_lost_resends_exactly_the_unconfirmed_in_order() -> None:
    box = Outbox(100, 1 << 20)
    for n in range(6):
        box.add(head(n))
    box.take_unsent(4)
    box.settle(2, ok=True)
    box.connection_lost()
    box.add(head(6))
    again = box.take_unsent(100)
    assert messages(again) == [2, 3, 4, 5, 6]
    assert ids(again) == [3, 4, 5, 6, 7]
    # 3 and 4 had been written before: resent; 5, 6, 7 go out for the first time.
    assert (box.stats.sent, box.stats.resent) == (4 + 3, 2)


def test_message_bound_drops_oldest_unsent_first_and_counts() -> None:
    box = Outbox(3, 1 << 20)
    evicted = sum(box.add(head(n)) for n in range(10))
    assert evicted == 7
    assert box.stats.dropped == 7
    assert box.stats.forgotten == 0
    assert messages(box.take_unsent(10)) == [7, 8, 9]


def test_byte_bound_and_eviction_of_written_entries_keeps_acks_aligned() -> None:
    size = len(with_link_id(head(0), 1))
    box = Outbox(1000, 3 * size + 2)
    for n in range(3):
        box.add(head(n))
    box.take_unsent(10)  # ids 1, 2, 3 written
    box.add(head(3))  # evicts id 1 (written, no reply yet): forgotten
    assert (box.stats.forgotten, box.stats.dropped, len(box)) == (1, 0, 3)
    assert box.size <= 3 * size + 2
    # The reply to id 1 still comes (without an id): it must not confirm id 2.
    assert box.settle(None, ok=True) == 1
    assert len(box) == 3
    assert box.settle(None, ok=True) == 2
    assert messages(box.take_unsent(10)) == [3]


def test_a_single_oversized_message_is_dropped_not_held() -> None:
    box = Outbox(10, 10)
    box.add(head(1))
    assert len(box) == 0
    assert box.stats.dropped == 1


def test_reject_oldest_in_flight() -> None:
    box = Outbox(10, 1 << 20)
    box.add(head(1))
    box.add(head(2))
    assert not box.reject_oldest_in_flight()
    box.take_unsent(10)
    assert box.reject_oldest_in_flight()
    box.connection_lost()
    assert messages(box.take_unsent(10)) == [2]
    assert box.stats.rejected == 1


@pytest.mark.parametrize("attempt", [0, 1, 3, 10, 1000])
def test_backoff_is_bounded_and_jittered(attempt: int) -> None:
    rng = random.Random(1)
    delays = []
    for _ in range(200):
        backoff = Backoff(0.1, 5.0, rng)
        backoff.attempt = attempt
        delays.append(backoff.next_delay())
    cap = min(5.0, 0.1 * 2**attempt)
    assert all(0 <= d <= cap + 1e-9 for d in delays)
    if attempt > 0:
        assert len({round(d, 6) for d in delays}) > 100  # jitter spreads them


def test_redact_hides_a_query_token() -> None:
    assert "s3cret" not in redact("ws://h:1/x?peer_token=s3cret&a=1")
    assert redact("ws://h:1/") == "ws://h:1/"


def test_stale_and_foreign_reply_ids() -> None:
    box = Outbox(100, 1 << 20)
    for n in range(4):
        box.add(head(n))
    box.take_unsent(10)
    assert box.settle(2, ok=True) == 2
    assert box.settle(1, ok=True) is None  # already settled by the reply to 2
    assert len(box) == 2
    assert box.settle(999, ok=True) == 3  # not an id we issued: in order
    assert len(box) == 1


def test_counters_account_for_every_queued_publish() -> None:
    box = Outbox(5, 1 << 20)
    rng = random.Random(7)
    for n in range(500):
        box.add(head(n))
        roll = rng.random()
        if roll < 0.3:
            box.take_unsent(rng.randint(1, 4))
        elif roll < 0.5:
            box.settle(None, ok=rng.random() < 0.9)
        elif roll < 0.55:
            box.connection_lost()
        s = box.stats
        assert s.queued == s.confirmed + s.rejected + s.dropped + s.forgotten + len(box)
        assert box.in_flight + box.unsent == len(box)
