"""Fan-out batching keeps every ordering rule when requests arrive in one read.

The server joins consecutive deliveries to one subscriber set into a batch.
These tests send many requests in a single write, so the server handles them
in one loop turn, and check that acks, deliveries and subscription changes
still reach each client in request order.
"""

from __future__ import annotations

from typing import Any

import orjson

from tests.conftest import ClientFactory, ServerFactory
from tests.wsclient import OP_TEXT, encode_frame, is_delivery


def _burst(requests: list[dict[str, Any]]) -> bytes:
    return b"".join(encode_frame(OP_TEXT, orjson.dumps(r)) for r in requests)


def _summary(msg: dict[str, Any]) -> tuple[str, ...]:
    if msg["type"] == "publish":
        return ("delivery", msg["context"], str(msg["message"]))
    return (msg["type"], msg.get("action", ""), str(msg.get("id", "")))


async def test_own_subscription_changes_within_one_read(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    server = await make_server()
    watcher = await open_client(server.url)
    me = await open_client(server.url)
    await watcher.request({"type": "subscribe", "topic": "news", "id": "w"})
    await me.request({"type": "subscribe", "topic": "news", "id": "s0"})

    await me.send_raw(
        _burst(
            [
                {"type": "publish", "topic": "news.a", "message": 1, "id": "p1"},
                {"type": "publish", "topic": "news.a", "message": 2, "id": "p2"},
                {"type": "unsubscribe", "topic": "news", "id": "u"},
                {"type": "publish", "topic": "news.a", "message": 3, "id": "p3"},
                {"type": "subscribe", "topic": "news.a", "id": "s1"},
                {"type": "publish", "topic": "news.a", "message": 4, "id": "p4"},
                {"type": "subscribe", "topic": "news", "id": "s2"},
                {"type": "publish", "topic": "news.a", "message": 5, "id": "p5"},
            ]
        )
    )
    last = await me.next_message(lambda m: m.get("id") == "p5")
    got = [_summary(m) for m in me.take_all()] + [_summary(last)]
    assert got == [
        ("delivery", "news", "1"),
        ("ack", "publish", "p1"),
        ("delivery", "news", "2"),
        ("ack", "publish", "p2"),
        ("ack", "unsubscribe", "u"),
        ("ack", "publish", "p3"),
        ("ack", "subscribe", "s1"),
        ("delivery", "news.a", "4"),
        ("ack", "publish", "p4"),
        ("ack", "subscribe", "s2"),
        # Trie order: the shallower context first.
        ("delivery", "news", "5"),
        ("delivery", "news.a", "5"),
        ("ack", "publish", "p5"),
    ]

    # The other subscriber saw every publish, in order, once.
    for n in range(1, 6):
        msg = await watcher.next_message(is_delivery())
        assert msg["message"] == n
    await watcher.sync()
    assert watcher.take_all(is_delivery()) == []


async def test_alternating_subscriber_sets_keep_publish_order(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    server = await make_server()
    broad = await open_client(server.url)
    narrow = await open_client(server.url)
    publisher = await open_client(server.url)
    await broad.request({"type": "subscribe", "topic": "t", "id": 1})
    await narrow.request({"type": "subscribe", "topic": "t.x", "id": 1})

    # Alternate between a topic only `broad` matches and one both match, so
    # batches open and close on every publish.
    reqs = [
        {"type": "publish", "topic": "t.x" if i % 2 else "t.y", "message": i, "id": i}
        for i in range(400)
    ]
    await publisher.send_raw(_burst(reqs))
    await publisher.next_message(lambda m: m.get("id") == 399)

    got_broad = [(await broad.next_message(is_delivery()))["message"] for _ in range(400)]
    assert got_broad == list(range(400))
    got_narrow = [(await narrow.next_message(is_delivery()))["message"] for _ in range(200)]
    assert got_narrow == list(range(1, 400, 2))
