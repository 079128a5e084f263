"""PROTOCOL.md, line by line, against a real server over real sockets (peering aside)."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect

from dwsps import Server
from dwsps.errors import TopicError
from tests.conftest import ClientFactory, ServerFactory
from tests.wsclient import (
    DEFAULT_TIMEOUT,
    OP_TEXT,
    RawClient,
    encode_frame,
    http_get,
    is_delivery,
    is_type,
)

JS_DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")


def assert_server_time(ts: str) -> None:
    """A JS ``Date.toJSON()`` string within a few seconds of now."""
    assert JS_DATE.match(ts), ts
    delta = datetime.fromisoformat(ts) - datetime.now(UTC)
    assert abs(delta.total_seconds()) < 10, ts


async def sub(client: RawClient, topic: str, req_id: str | int | None = None) -> Any:
    req_id = req_id if req_id is not None else f"sub:{topic[:32]}"
    reply = await client.request({"type": "subscribe", "topic": topic, "id": req_id})
    assert reply["type"] == "ack", reply
    return reply


async def pub(client: RawClient, topic: str, message: Any = None, **extra: Any) -> Any:
    req_id = extra.pop("id", f"pub:{topic[:32]}")
    reply = await client.request(
        {"type": "publish", "topic": topic, "message": message, "id": req_id, **extra}
    )
    assert reply["type"] == "ack", reply
    return reply


async def expect_error(client: RawClient, request: Any, code: str) -> dict[str, Any]:
    """Send ``request`` (object, or raw text), expect one error reply with ``code``, stay open."""
    if isinstance(request, str | bytes):
        await client.send_text(request)
    else:
        await client.send_json(request)
    reply: dict[str, Any] = await client.next_message(is_type("error"))
    assert reply["error"] == code, reply
    assert isinstance(reply["detail"], str), reply
    assert reply["detail"], reply
    assert_server_time(reply["timestamp"])
    await client.sync()  # still open and serving
    return reply


# -- acknowledgements -------------------------------------------------------------


async def test_ack_format_for_an_original_client(
    server: Server, open_client: ClientFactory
) -> None:
    # The original client sends no id; its acks carry none.
    c = await open_client(server.url)
    for action, topic in [("subscribe", "news"), ("publish", "news"), ("unsubscribe", "news")]:
        await c.send_json({"type": action, "topic": topic, "timestamp": "2020-01-22T15:44:04.674Z"})
        ack = await c.next_message(is_type("ack"))
        assert set(ack) == {"type", "action", "timestamp", "topic"}
        assert (ack["type"], ack["action"], ack["topic"]) == ("ack", action, topic)
        assert_server_time(ack["timestamp"])


@pytest.mark.parametrize("req_id", ["req-1", 0, 42, -7, "x" * 64])
async def test_id_is_echoed(server: Server, open_client: ClientFactory, req_id: str | int) -> None:
    c = await open_client(server.url)
    ack = await c.request({"type": "subscribe", "topic": "news", "id": req_id})
    assert ack["id"] == req_id
    assert type(ack["id"]) is type(req_id)
    err = await c.request({"type": "subscribe", "topic": "news..uk", "id": req_id})
    assert err["type"] == "error"
    assert err["id"] == req_id


async def test_subscribe_and_unsubscribe_are_idempotent(
    server: Server, open_client: ClientFactory
) -> None:
    s = await open_client(server.url)
    p = await open_client(server.url)
    await sub(s, "news", 1)
    await sub(s, "news", 2)  # acked again, still one subscription
    await pub(p, "news", "once")
    await s.sync()
    assert [m["message"] for m in s.take_all(is_delivery())] == ["once"]
    for i in (3, 4):
        ack = await s.request({"type": "unsubscribe", "topic": "news", "id": i})
        assert (ack["type"], ack["action"], ack["topic"]) == ("ack", "unsubscribe", "news")
    ack = await s.request({"type": "unsubscribe", "topic": "never.held", "id": 5})
    assert ack["type"] == "ack"
    await pub(p, "news", "none")
    await s.sync()
    assert s.take_all(is_delivery()) == []


# -- topics and deliveries --------------------------------------------------------------


async def test_prefix_matching_with_context(server: Server, open_client: ClientFactory) -> None:
    s = await open_client(server.url)
    p = await open_client(server.url)
    await sub(s, "news")
    for topic in ["news", "news.uk", "news.uk.london", "newsroom", "news2.uk", "sport", "a.news"]:
        await pub(p, topic, f"to {topic}")
    await s.sync()
    got = [(m["topic"], m["context"], m["message"]) for m in s.take_all(is_delivery())]
    assert got == [
        ("news", "news", "to news"),
        ("news.uk", "news", "to news.uk"),
        ("news.uk.london", "news", "to news.uk.london"),
    ]


async def test_delivery_format(server: Server, open_client: ClientFactory) -> None:
    s = await open_client(server.url)
    p = await open_client(server.url)
    await sub(s, "news")
    await p.send_json(
        {
            "type": "publish",
            "topic": "news.uk",
            "message": "Hello news.uk channel!",
            "timestamp": "2020-01-21T17:03:13.625Z",
        }
    )
    await p.next_message(is_type("ack"))
    delivery = await s.next_message(is_delivery())
    assert delivery == {
        "type": "publish",
        "timestamp": "2020-01-21T17:03:13.625Z",
        "topic": "news.uk",
        "context": "news",
        "message": "Hello news.uk channel!",
    }


async def test_parent_and_child_subscriptions_give_two_deliveries(
    server: Server, open_client: ClientFactory
) -> None:
    s = await open_client(server.url)
    p = await open_client(server.url)
    await sub(s, "news")
    await sub(s, "news.uk")
    await pub(p, "news.uk.london", "twice")
    await s.sync()
    got = s.take_all(is_delivery())
    assert sorted(m["context"] for m in got) == ["news", "news.uk"]
    assert all(m["topic"] == "news.uk.london" and m["message"] == "twice" for m in got)
    await pub(p, "news.fr", "once")
    await s.sync()
    assert [m["context"] for m in s.take_all(is_delivery())] == ["news"]
    # Unsubscribing the parent leaves the child in place.
    await s.request({"type": "unsubscribe", "topic": "news", "id": "u"})
    await pub(p, "news.uk.london", "child only")
    await pub(p, "news.fr", "nobody")
    await s.sync()
    got = s.take_all(is_delivery())
    assert [(m["context"], m["message"]) for m in got] == [("news.uk", "child only")]


async def test_wildcard_level(server: Server, open_client: ClientFactory) -> None:
    s = await open_client(server.url)
    p = await open_client(server.url)
    await sub(s, "news.*.weather")
    for topic in ["news.uk.weather", "news.fr.weather.today", "news.uk.sport", "news.weather"]:
        await pub(p, topic, topic)
    await s.sync()
    got = [(m["topic"], m["context"]) for m in s.take_all(is_delivery())]
    assert got == [
        ("news.uk.weather", "news.*.weather"),
        ("news.fr.weather.today", "news.*.weather"),
    ]


async def test_publishing_to_a_wildcard_topic_is_rejected(
    server: Server, open_client: ClientFactory
) -> None:
    s = await open_client(server.url)
    await sub(s, "*")
    for i, topic in enumerate(["*", "news.*", "*.uk"]):
        err = await s.request({"type": "publish", "topic": topic, "message": "x", "id": i})
        assert (err["type"], err["error"], err["action"], err["id"]) == (
            "error",
            "invalid_topic",
            "publish",
            i,
        )
    await s.sync()
    assert s.take_all(is_delivery()) == []


async def test_publisher_receives_its_own_message_before_the_ack(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url)
    await sub(c, "me")
    await c.send_json({"type": "publish", "topic": "me.too", "message": [1], "id": "p"})
    first = await c.next_message()
    second = await c.next_message()
    assert (first["type"], first["topic"], first["context"], first["message"]) == (
        "publish",
        "me.too",
        "me",
        [1],
    )
    assert (second["type"], second["id"]) == ("ack", "p")


@pytest.mark.parametrize(
    "message",
    [
        "text",
        "ünïcødé ✓ 😀",
        0,
        -1.5,
        12345678901234567890,
        True,
        None,
        [],
        [1, "two", {"three": [3]}],
        {"nested": {"deep": {"list": [None, False]}}},
        "x" * 100_000,  # 64-bit length frame from the server
    ],
)
async def test_any_json_message_is_carried(
    server: Server, open_client: ClientFactory, message: Any
) -> None:
    s = await open_client(server.url)
    p = await open_client(server.url)
    await sub(s, "t")
    await pub(p, "t", message)
    delivery = await s.next_message(is_delivery("t"))
    assert delivery["message"] == message


async def test_absent_message_is_delivered_as_null(
    server: Server, open_client: ClientFactory
) -> None:
    s = await open_client(server.url)
    await sub(s, "t")
    await s.send_json({"type": "publish", "topic": "t", "id": 1})
    delivery = await s.next_message(is_delivery("t"))
    assert "message" in delivery
    assert delivery["message"] is None


@pytest.mark.parametrize(
    "timestamp",
    [None, "yesterday", 1579628593625, "2020-13-45T99:99:99.000Z", "2020-01-21 17:03:13Z"],
)
async def test_missing_or_invalid_timestamp_is_replaced_by_server_time(
    server: Server, open_client: ClientFactory, timestamp: object
) -> None:
    c = await open_client(server.url)
    await sub(c, "t")
    req: dict[str, Any] = {"type": "publish", "topic": "t", "message": 1, "id": 1}
    if timestamp is not None:
        req["timestamp"] = timestamp
    await c.send_json(req)
    delivery = await c.next_message(is_delivery("t"))
    assert_server_time(delivery["timestamp"])


@pytest.mark.parametrize(
    "timestamp", ["2020-01-21T17:03:13.625Z", "1999-12-31T23:59:59Z", "2020-01-21T17:03:13+01:00"]
)
async def test_valid_publisher_timestamp_is_carried(
    server: Server, open_client: ClientFactory, timestamp: str
) -> None:
    c = await open_client(server.url)
    await sub(c, "t")
    await c.send_json({"type": "publish", "topic": "t", "timestamp": timestamp})
    delivery = await c.next_message(is_delivery("t"))
    assert delivery["timestamp"] == timestamp
    ack = await c.next_message(is_type("ack"))
    assert_server_time(ack["timestamp"])  # the ack is always server time


async def test_from_peer_server_publish_is_delivered_with_the_flag(
    server: Server, open_client: ClientFactory
) -> None:
    s = await open_client(server.url)
    peer = await open_client(server.url)
    await sub(s, "news")
    await pub(peer, "news.uk", "via peer", fromPeerServer=True)
    delivery = await s.next_message(is_delivery("news.uk"))
    assert delivery["fromPeerServer"] is True
    await pub(peer, "news.uk", "organic")
    delivery = await s.next_message(is_delivery("news.uk"))
    assert "fromPeerServer" not in delivery


# -- transport: paths and HTTP -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/ws", "/some/deep/path?x=1&y", "/health", "/metrics"])
async def test_any_request_path_is_accepted_for_the_upgrade(
    server: Server, open_client: ClientFactory, path: str
) -> None:
    c = await open_client(server.url, path=path)
    await sub(c, "news")
    await pub(c, "news", path)
    assert (await c.next_message(is_delivery("news")))["message"] == path


async def test_upgrade_with_lowercase_header_names(
    server: Server, open_client: ClientFactory
) -> None:
    # HTTP header names are case-insensitive; some clients send them in lower case.
    c = await open_client(server.url, lowercase_headers=True)
    await sub(c, "news")


async def test_a_real_client_library_works(server: Server) -> None:
    async with ws_connect(server.url + "/any/path", ping_interval=None) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "topic": "lib", "id": 1}).decode())
        assert orjson.loads(await ws.recv())["action"] == "subscribe"
        await ws.send(
            orjson.dumps({"type": "publish", "topic": "lib.x", "message": {"a": 1}}).decode()
        )
        delivery = orjson.loads(await ws.recv())
        assert (delivery["type"], delivery["context"], delivery["message"]) == (
            "publish",
            "lib",
            {"a": 1},
        )
        assert orjson.loads(await ws.recv())["type"] == "ack"


async def test_health_is_plain_http_and_does_not_break_websockets(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url, path="/health")
    await sub(c, "news")
    status, body = await http_get(server.url, "/health")
    assert status == 200
    health = orjson.loads(body)
    assert health["status"] == "ok"
    assert health["connections"] == 1
    assert health["subscriptions"] == 1
    status, body = await http_get(server.url, "/health?verbose=1")
    assert status == 200
    status, _ = await http_get(server.url, "/no/such/page")
    assert status == 404
    # The WebSocket on /health still works after the plain requests.
    await pub(c, "news", "still here")
    assert (await c.next_message(is_delivery("news")))["message"] == "still here"


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["{", "nope", '{"type":"subscribe",}', "", "NaN", '{"type":"subscribe","topic":"a"} trailing'],
)
async def test_invalid_json(server: Server, open_client: ClientFactory, text: str) -> None:
    c = await open_client(server.url)
    reply = await expect_error(c, text, "invalid_json")
    assert "action" not in reply
    assert "id" not in reply


@pytest.mark.parametrize(
    "text", ["[]", '["subscribe","news"]', '"subscribe"', "42", "null", "true"]
)
async def test_non_object_json_is_invalid_message(
    server: Server, open_client: ClientFactory, text: str
) -> None:
    c = await open_client(server.url)
    reply = await expect_error(c, text, "invalid_message")
    assert "action" not in reply


@pytest.mark.parametrize(
    ("request_obj", "action", "req_id"),
    [
        ({"topic": "news", "id": 1}, None, 1),
        ({"type": 3, "topic": "news", "id": 2}, None, 2),
        ({"type": "subscribe", "id": 3}, "subscribe", 3),
        ({"type": "publish", "message": "no topic", "id": 4}, "publish", 4),
        ({"type": "subscribe", "topic": 12, "id": 5}, "subscribe", 5),
        ({"type": "unsubscribe", "topic": ["news"], "id": 6}, "unsubscribe", 6),
        ({"type": "subscribe", "topic": "news", "id": 1.5}, "subscribe", None),
        ({"type": "subscribe", "topic": "news", "id": True}, "subscribe", None),
        ({"type": "subscribe", "topic": "news", "id": {"n": 1}}, "subscribe", None),
        ({"type": "subscribe", "topic": "news", "id": "x" * 65}, "subscribe", None),
    ],
)
async def test_missing_or_wrong_typed_fields_are_invalid_message(
    server: Server,
    open_client: ClientFactory,
    request_obj: dict[str, Any],
    action: str | None,
    req_id: int | None,
) -> None:
    c = await open_client(server.url)
    reply = await expect_error(c, request_obj, "invalid_message")
    assert reply.get("action") == action
    assert reply.get("id") == req_id


async def test_unknown_type(server: Server, open_client: ClientFactory) -> None:
    c = await open_client(server.url)
    reply = await expect_error(c, {"type": "shout", "topic": "news", "id": "u1"}, "unknown_type")
    assert (reply["action"], reply["id"]) == ("shout", "u1")


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "news..uk",
        ".news",
        "news.",
        ".",
        "news uk",
        "news\tuk",
        "news\nuk",
        "news\u00a0uk",
        "news\x00uk",
        "news\x7fuk",
        "x" * 257,
        ".".join(["l"] * 33),
    ],
)
@pytest.mark.parametrize("action", ["subscribe", "unsubscribe", "publish"])
async def test_invalid_topics(
    server: Server, open_client: ClientFactory, topic: str, action: str
) -> None:
    c = await open_client(server.url)
    reply = await expect_error(
        c, {"type": action, "topic": topic, "message": 1, "id": 9}, "invalid_topic"
    )
    assert (reply["action"], reply["id"]) == (action, 9)


async def test_topic_limits_at_the_boundary(server: Server, open_client: ClientFactory) -> None:
    c = await open_client(server.url)
    await sub(c, "x" * 256)
    await sub(c, ".".join(["l"] * 32))
    await pub(c, "x" * 256, "longest")
    assert (await c.next_message(is_delivery("x" * 256)))["message"] == "longest"


async def test_topic_limits_are_configurable(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(max_topic_length=10, max_topic_levels=3)
    c = await open_client(srv.url)
    await sub(c, "a.b.c")
    await sub(c, "abcdefghij")
    await expect_error(c, {"type": "subscribe", "topic": "a.b.c.d"}, "invalid_topic")
    await expect_error(c, {"type": "publish", "topic": "abcdefghijk"}, "invalid_topic")


async def test_too_many_subscriptions(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(max_subscriptions=3)
    c = await open_client(srv.url)
    other = await open_client(srv.url)
    for topic in ["a", "b", "c"]:
        await sub(c, topic)
    err = await c.request({"type": "subscribe", "topic": "d", "id": "over"})
    assert (err["type"], err["error"], err["action"], err["id"]) == (
        "error",
        "too_many_subscriptions",
        "subscribe",
        "over",
    )
    await sub(c, "a")  # already held: idempotent, still fine at the limit
    await sub(other, "d")  # the limit is per connection
    await c.request({"type": "unsubscribe", "topic": "b", "id": "u"})
    await sub(c, "d")  # room again
    await pub(other, "d", "to d")
    assert (await c.next_message(is_delivery("d")))["context"] == "d"


async def test_forbidden_peer_publish_without_a_token(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(accept_peer_tokens=["s3cret"])
    s = await open_client(srv.url)
    await sub(s, "news")
    intruder = await open_client(srv.url)
    err = await intruder.request(
        {"type": "publish", "topic": "news", "message": "fake", "fromPeerServer": True, "id": 1}
    )
    assert (err["type"], err["error"], err["action"], err["id"]) == (
        "error",
        "forbidden",
        "publish",
        1,
    )
    wrong = await open_client(srv.url, headers={"Authorization": "Bearer wrong"})
    err = await wrong.request({"type": "publish", "topic": "news", "fromPeerServer": True, "id": 2})
    assert err["error"] == "forbidden"
    # Organic publishes from the same connection are fine.
    await pub(intruder, "news", "organic")
    # A peer presenting the token (header, or query string) is accepted.
    peer = await open_client(srv.url, headers={"Authorization": "Bearer s3cret"})
    await pub(peer, "news", "from peer", fromPeerServer=True)
    peer2 = await open_client(srv.url, path="/?peer_token=s3cret")
    await pub(peer2, "news", "from peer 2", fromPeerServer=True)
    await s.sync()
    got = [(m["message"], m.get("fromPeerServer")) for m in s.take_all(is_delivery())]
    assert got == [("organic", None), ("from peer", True), ("from peer 2", True)]


# -- ordering ----------------------------------------------------------------------------


async def test_replies_come_in_request_order(server: Server, open_client: ClientFactory) -> None:
    c = await open_client(server.url)
    requests: list[bytes] = [
        b'{"type":"subscribe","topic":"a","id":1}',
        b"{bad json",
        b'{"type":"publish","topic":"b","id":2}',
        b'{"type":"nope","id":3}',
        b'{"type":"subscribe","topic":"a..b","id":4}',
        b'{"type":"unsubscribe","topic":"a","id":5}',
        b"[]",
        b'{"type":"publish","topic":"a","message":"x","id":6}',
        b'{"type":"subscribe","topic":"c","id":7}',
    ]
    # One TCP write: the server sees them all in one read.
    await c.send_raw(b"".join(encode_frame(OP_TEXT, r) for r in requests))
    replies = [await c.next_message() for _ in requests]
    assert [(r["type"], r.get("id")) for r in replies] == [
        ("ack", 1),
        ("error", None),
        ("ack", 2),
        ("error", 3),
        ("error", 4),
        ("ack", 5),
        ("error", None),
        ("ack", 6),
        ("ack", 7),
    ]
    assert [r.get("error") for r in replies if r["type"] == "error"] == [
        "invalid_json",
        "unknown_type",
        "invalid_topic",
        "invalid_message",
    ]


async def test_2000_publishes_arrive_in_order(server: Server, open_client: ClientFactory) -> None:
    n = 2000
    s1 = await open_client(server.url)
    s2 = await open_client(server.url)
    p = await open_client(server.url)
    await sub(s1, "seq")
    await sub(s2, "seq.*")
    # Pipelined: the publisher does not wait for acks between publishes.
    frames = [
        encode_frame(
            OP_TEXT, orjson.dumps({"type": "publish", "topic": "seq.n", "message": i, "id": i})
        )
        for i in range(n)
    ]
    for start in range(0, n, 100):
        await p.send_raw(b"".join(frames[start : start + 100]))
    acks = [await p.next_message(is_type("ack")) for _ in range(n)]
    assert [a["id"] for a in acks] == list(range(n))
    for s, context in [(s1, "seq"), (s2, "seq.*")]:
        got = [await s.next_message(is_delivery("seq.n")) for _ in range(n)]
        assert [m["message"] for m in got] == list(range(n))
        assert {m["context"] for m in got} == {context}
        await s.sync()
        assert s.take_all(is_delivery()) == [], "no extra deliveries"
        # One final, unmasked text frame per message, no RSV bits.
        assert {(f.opcode, f.fin, f.masked, f.rsv) for f in s.frames} == {(OP_TEXT, True, False, 0)}


# -- server events -----------------------------------------------------------------------


async def test_events_have_the_documented_arguments(
    server: Server, open_client: ClientFactory
) -> None:
    seen: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    for name in ("connect", "disconnect", "subscribe", "unsubscribe", "publish"):
        server.on(name, lambda *args, _n=name: seen.put_nowait((_n, *args)))

    async def next_event() -> tuple[Any, ...]:
        return await asyncio.wait_for(seen.get(), DEFAULT_TIMEOUT)

    c = await open_client(server.url)
    name, client_id = await next_event()
    assert name == "connect"
    assert isinstance(client_id, str)
    assert client_id
    assert c.key
    assert c.key not in client_id, "the client id is not the Sec-WebSocket-Key"
    await sub(c, "news")
    assert await next_event() == ("subscribe", "news", client_id)
    await pub(c, "news.uk", "x")
    assert await next_event() == ("publish", "news.uk", client_id)
    await c.request({"type": "unsubscribe", "topic": "news", "id": "u"})
    assert await next_event() == ("unsubscribe", "news", client_id)
    # A rejected request raises no event.
    await c.request({"type": "subscribe", "topic": "bad..topic", "id": "bad"})
    # Publishing from the embedding code: no client.
    assert server.publish("news.uk", {"from": "server"}) == 0
    assert await next_event() == ("publish", "news.uk", None)
    other = await open_client(server.url)
    name, other_id = await next_event()
    assert name == "connect"
    assert other_id != client_id
    await c.close()
    assert await next_event() == ("disconnect", client_id)
    await other.close()
    assert await next_event() == ("disconnect", other_id)
    assert seen.empty()
    assert server.connections == {}


async def test_server_publish_reaches_subscribers(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url)
    await sub(c, "news")
    assert server.publish("news.uk", {"hello": 1}) == 1
    delivery = await c.next_message(is_delivery("news.uk"))
    assert delivery["message"] == {"hello": 1}
    assert_server_time(delivery["timestamp"])
    with pytest.raises(TopicError):
        server.publish("bad..topic", 1)
    with pytest.raises(TopicError):
        server.publish("news.*", 1)


async def test_decorator_form_and_off(server: Server, open_client: ClientFactory) -> None:
    calls: list[str] = []

    @server.on("subscribe")
    def on_subscribe(topic: str, client_id: str) -> None:
        calls.append(topic)

    c = await open_client(server.url)
    await sub(c, "one")
    server.off("subscribe", on_subscribe)
    await sub(c, "two")
    assert calls == ["one"]
    with pytest.raises(ValueError, match="unknown event"):
        server.on("no-such-event", print)


async def test_raising_handlers_do_not_break_the_server(
    server: Server, open_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async_ran = asyncio.Event()
    good: list[tuple[str, str]] = []

    def bad_sync(*args: Any) -> None:
        raise RuntimeError("sync handler boom")

    async def bad_async(*args: Any) -> None:
        async_ran.set()
        raise RuntimeError("async handler boom")

    for name in ("connect", "subscribe", "unsubscribe", "publish", "disconnect"):
        server.on(name, bad_sync)
        server.on(name, bad_async)
    server.on("subscribe", lambda topic, cid: good.append((topic, cid)))

    caplog.set_level(logging.ERROR)
    s = await open_client(server.url)
    p = await open_client(server.url)
    await sub(s, "news")
    await pub(p, "news", "still delivered")
    assert (await s.next_message(is_delivery("news")))["message"] == "still delivered"
    await s.request({"type": "unsubscribe", "topic": "news", "id": "u"})
    await asyncio.wait_for(async_ran.wait(), DEFAULT_TIMEOUT)
    await p.close()
    await s.sync()  # a round trip: the failed async handlers have been reported by now
    assert [t for t, _ in good] == ["news"], "later handlers still ran"
    messages = [r.getMessage() + str(r.exc_info) for r in caplog.records]
    assert any("sync handler boom" in m for m in messages)
    assert any("async handler boom" in m for m in messages)
    # And a new client is served normally.
    c = await open_client(server.url)
    await sub(c, "after")
