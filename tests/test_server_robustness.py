"""Hostile and broken clients: framing errors, bad input floods, slow consumers, shutdown.

Every test also shows that the server keeps serving: other clients, or the same
one when the connection is meant to stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from dwsps import Server
from tests.conftest import ClientFactory, ServerFactory
from tests.support import scaled
from tests.wsclient import (
    DEFAULT_TIMEOUT,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    HandshakeError,
    RawClient,
    close_payload,
    encode_frame,
    http_get,
    is_delivery,
    is_type,
    open_socket,
    reply_to,
)

SUB = b'{"type":"subscribe","topic":"news","id":"s"}'


async def assert_serving(server: Server, open_client: ClientFactory) -> None:
    """A fresh client can subscribe, publish and receive its own message."""
    c = await open_client(server.url)
    ack = await c.request({"type": "subscribe", "topic": "alive", "id": "a"})
    assert ack["type"] == "ack"
    await c.send_json({"type": "publish", "topic": "alive", "message": "yes", "id": "p"})
    assert (await c.next_message(is_delivery("alive")))["message"] == "yes"
    await c.close()


class Watcher:
    """A subscriber to ``watched`` that can prove nothing was published there."""

    def __init__(self, client: RawClient) -> None:
        self.client = client

    @classmethod
    async def start(cls, server: Server, open_client: ClientFactory) -> Watcher:
        c = await open_client(server.url)
        await c.request({"type": "subscribe", "topic": "watched", "id": "w"})
        return cls(c)

    async def assert_nothing_published(self) -> None:
        await self.client.sync()
        assert self.client.take_all(is_delivery()) == []


# -- binary and UTF-8 --------------------------------------------------------------


async def test_binary_frame_gets_invalid_message_and_stays_open(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url)
    await c.send_frame(OP_BINARY, SUB)
    err = await c.next_message(is_type("error"))
    assert err["error"] == "invalid_message"
    assert "binary" in err["detail"]
    # A fragmented binary message is one message: one error.
    await c.send_frame(OP_BINARY, b"ab", fin=False)
    await c.send_frame(OP_CONT, b"cd", fin=False)
    await c.send_frame(OP_CONT, b"ef")
    err = await c.next_message(is_type("error"))
    assert err["error"] == "invalid_message"
    ack = await c.request({"type": "subscribe", "topic": "news", "id": 1})
    assert ack["type"] == "ack"
    assert c.take_all() == [], "exactly one error per binary message"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        b'{"type":"subscribe","topic":"\xff"}',
        b'{"type":"subscribe","topic":"news","id":"\xc0\xaf"}',  # overlong encoding
        b'{"type":"publish","topic":"t","message":"\xed\xa0\x80"}',  # UTF-16 surrogate
        b'{"type":"publish","topic":"t","message":"\xe2\x82"}',  # truncated sequence
        b'{"type":"publish","topic":"t","message":"\xf4\x90\x80\x80"}',  # above U+10FFFF
    ],
)
async def test_invalid_utf8_text_closes_1007(
    server: Server, open_client: ClientFactory, payload: bytes
) -> None:
    watcher = await Watcher.start(server, open_client)
    c = await open_client(server.url)
    await c.send_text(payload)
    assert await c.wait_closed() == 1007
    await c.wait_eof()
    assert c.take_all() == []
    await watcher.assert_nothing_published()


async def test_invalid_utf8_in_a_fragmented_message_closes_1007(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url)
    await c.send_frame(OP_TEXT, b'{"type":"subscribe",', fin=False)
    await c.send_frame(OP_CONT, b'"topic":"\xfe"}')
    assert await c.wait_closed() == 1007


async def test_a_character_split_across_fragments_is_fine(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url)
    data = '{"type":"subscribe","topic":"caf\u00e9.\u65e5\u672c","id":1}'.encode()
    cut = data.index(b"\xc3") + 1  # in the middle of the two bytes of é
    cut2 = data.index("\u65e5".encode()) + 2  # in the middle of a three-byte character
    await c.send_frame(OP_TEXT, data[:cut], fin=False)
    await c.send_frame(OP_CONT, data[cut:cut2], fin=False)
    await c.send_frame(OP_CONT, data[cut2:])
    ack = await c.next_message(reply_to(1))
    assert (ack["type"], ack["topic"]) == ("ack", "caf\u00e9.\u65e5\u672c")


# -- frame size ----------------------------------------------------------------------


async def test_frame_over_the_limit_closes_1009(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(max_frame_size=1024)
    watcher = await Watcher.start(srv, open_client)
    ok = await open_client(srv.url)
    msg = b'{"type":"publish","topic":"watched","message":"'
    at_limit = msg + b"x" * (1024 - len(msg) - 2) + b'"}'
    assert len(at_limit) == 1024
    await ok.send_text(at_limit)
    assert (await ok.next_message(is_type("ack")))["action"] == "publish"
    assert (await watcher.client.next_message(is_delivery("watched")))["message"] == "x" * (
        1024 - len(msg) - 2
    )
    big = await open_client(srv.url)
    await big.send_text(msg + b"x" * (1025 - len(msg) - 2) + b'"}')
    assert await big.wait_closed() == 1009
    await watcher.assert_nothing_published()


async def test_announced_huge_frame_closes_1009_without_waiting_for_it(
    server: Server, open_client: ClientFactory
) -> None:
    # Default limit is 1 MiB; announce 1 GiB and send nothing more.
    c = await open_client(server.url)
    await c.send_raw(encode_frame(OP_TEXT, b"", length=1 << 30))
    assert await c.wait_closed() == 1009


async def test_fragmented_message_is_reassembled_with_pings_in_between(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url)
    data = b'{"type":"subscribe","topic":"frag.mented","id":"f"}'
    parts = [data[:5], data[5:20], data[20:21], data[21:]]
    await c.send_frame(OP_TEXT, parts[0], fin=False)
    await c.send_frame(OP_PING, b"p1")
    await c.send_frame(OP_CONT, parts[1], fin=False)
    await c.send_frame(OP_CONT, parts[2], fin=False)
    await c.send_frame(OP_PING, b"p2")
    await c.send_frame(OP_CONT, parts[3])
    ack = await c.next_message(reply_to("f"))
    assert ack["topic"] == "frag.mented"
    # Empty fragments are legal too.
    await c.send_frame(OP_TEXT, b"", fin=False)
    await c.send_frame(OP_CONT, b'{"type":"unsubscribe","topic":"frag","id":"g"}', fin=False)
    await c.send_frame(OP_CONT, b"")
    assert (await c.next_message(reply_to("g")))["action"] == "unsubscribe"


async def test_pings_are_answered_with_the_same_payload(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url)
    await c.send_frame(OP_PING, b"hello-ping")
    await c.send_frame(OP_PING, b"")
    await c.wait_for(lambda: len(c.pongs) == 2)
    assert c.pongs == [b"hello-ping", b""]


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
async def test_fragmented_total_over_the_limit_closes_1009(
    make_server: ServerFactory, open_client: ClientFactory, opcode: int
) -> None:
    srv = await make_server(max_frame_size=1024)
    c = await open_client(srv.url)
    await c.send_frame(opcode, b"[" + b"1," * 300, fin=False)
    await c.send_frame(OP_CONT, b"1," * 200, fin=False)  # 1001 bytes so far: fine
    await c.send_frame(OP_CONT, b"1," * 20, fin=False)  # 1041: over
    await c.send_frame(OP_CONT, b"1]")
    assert await c.wait_closed() == 1009
    assert c.take_all() == []


async def test_close_frame_with_invalid_utf8_reason_closes_1007(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url)
    await c.send_frame(OP_CLOSE, close_payload(1000) + b"\xff\xfe")
    assert await c.wait_closed() == 1007


# -- framing violations (RFC 6455 says: fail the connection) ------------------------------


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([encode_frame(OP_CONT, SUB)], "continuation without a start"),
        (
            [encode_frame(OP_TEXT, SUB[:5], fin=False), encode_frame(OP_TEXT, SUB)],
            "new message inside a fragmented one",
        ),
        ([encode_frame(OP_TEXT, SUB, rsv=4)], "RSV1 without an extension"),
        ([encode_frame(OP_TEXT, SUB, rsv=2)], "RSV2"),
        ([encode_frame(OP_TEXT, SUB, rsv=1)], "RSV3"),
        ([encode_frame(OP_PING, b"x", rsv=4)], "RSV1 on a control frame"),
        (
            [encode_frame(OP_TEXT, SUB[:5], fin=False), encode_frame(OP_CONT, SUB[5:], rsv=4)],
            "RSV1 on a continuation",
        ),
        ([encode_frame(0x3, SUB)], "reserved non-control opcode"),
        ([encode_frame(0xB, b"")], "reserved control opcode"),
        ([encode_frame(OP_TEXT, SUB, mask=False)], "unmasked client frame"),
        ([encode_frame(OP_PING, b"x", fin=False)], "fragmented control frame"),
        ([encode_frame(OP_PING, b"x" * 126)], "control frame over 125 bytes"),
        ([encode_frame(OP_CLOSE, b"\x03")], "one-byte close payload"),
        ([encode_frame(OP_CLOSE, close_payload(1005))], "reserved close code"),
    ],
)
async def test_protocol_violations_close_1002(
    server: Server, open_client: ClientFactory, frames: list[bytes], why: str
) -> None:
    c = await open_client(server.url)
    await c.send_raw(b"".join(frames))
    assert await c.wait_closed() == 1002, why
    assert c.take_all(is_type("ack")) == [], f"{why}: the frame was acted on"
    await assert_serving(server, open_client)


async def test_nothing_is_processed_after_the_connection_failed(
    server: Server, open_client: ClientFactory
) -> None:
    # RFC 6455 7.1.7: once the connection is failed, no more data is processed.
    watcher = await Watcher.start(server, open_client)
    c = await open_client(server.url)
    publish = orjson.dumps({"type": "publish", "topic": "watched", "message": "ghost", "id": 1})
    await c.send_raw(encode_frame(OP_CONT, b"x") + encode_frame(OP_TEXT, publish))
    assert await c.wait_closed() == 1002
    await watcher.assert_nothing_published()


async def test_client_close_handshake(server: Server, open_client: ClientFactory) -> None:
    gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    server.on("disconnect", lambda cid: gone.done() or gone.set_result(cid))
    c = await open_client(server.url)
    await c.request({"type": "subscribe", "topic": "news", "id": 1})
    c.echo_close = False
    await c.send_frame(OP_CLOSE, close_payload(1000, "bye"))
    assert await c.wait_closed() == 1000  # echoed
    await c.wait_eof()  # and the server closed TCP
    await asyncio.wait_for(gone, DEFAULT_TIMEOUT)
    assert server.connections == {}
    assert server.subscription_topics() == []


async def test_replies_queued_before_a_failure_are_sent_before_the_close(
    server: Server, open_client: ClientFactory
) -> None:
    c = await open_client(server.url)
    await c.send_raw(
        encode_frame(OP_TEXT, b'{"type":"subscribe","topic":"a","id":1}')
        + encode_frame(OP_TEXT, b'{"type":"nope","id":2}')
        + encode_frame(OP_TEXT, b"\xff\xfe")
    )
    assert await c.wait_closed() == 1007
    assert [(m["type"], m["id"]) for m in c.take_all()] == [("ack", 1), ("error", 2)]


# -- bad input floods ------------------------------------------------------------------------


BAD_REQUESTS: list[tuple[int, bytes]] = [
    (OP_TEXT, b"{not json"),
    (OP_TEXT, b"[1,2,3]"),
    (OP_TEXT, b'{"type":"explode"}'),
    (OP_TEXT, b'{"type":"subscribe","topic":"a..b"}'),
    (OP_TEXT, b'{"type":"publish","topic":7}'),
    (OP_BINARY, b"\x00\x01\x02"),
]


async def test_a_flood_of_bad_requests_closes_1008(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(max_invalid_requests=10)
    c = await open_client(srv.url)
    # The count is of consecutive bad requests: a good one resets it.
    for i in range(9):
        op, data = BAD_REQUESTS[i % len(BAD_REQUESTS)]
        await c.send_frame(op, data)
    await c.request({"type": "subscribe", "topic": "ok", "id": "good"})
    assert len(c.take_all(is_type("error"))) == 9
    for i in range(9):
        op, data = BAD_REQUESTS[i % len(BAD_REQUESTS)]
        await c.send_frame(op, data)
    # (No sync() here: a good request would reset the count.)
    await c.wait_for(lambda: len(c.inbox) == 9)
    assert len(c.take_all(is_type("error"))) == 9
    assert srv.stats.invalid_closes == 0
    await c.send_text(b"{one too many")
    assert await c.wait_closed() == 1008
    assert len(c.take_all(is_type("error"))) == 1, "every bad request got its error first"
    assert srv.stats.invalid_closes == 1


async def test_flooders_do_not_disturb_other_clients(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(max_invalid_requests=20)
    n_messages = 600
    s = await open_client(srv.url)
    p = await open_client(srv.url)
    await s.request({"type": "subscribe", "topic": "feed", "id": 1})
    flooders = [await open_client(srv.url) for _ in range(12)]

    async def flood(c: RawClient, seed: int) -> int | None:
        rng = random.Random(seed)
        for _ in range(40):  # well past the limit: the server closes first
            op, data = rng.choice(BAD_REQUESTS)
            try:
                await c.send_frame(op, data)
            except ConnectionError:
                break
        return await c.wait_closed(within=scaled(20))

    async def publish_all() -> None:
        for i in range(n_messages):
            body = {"i": i, "text": f"message {i} " + "é" * (i % 50), "list": list(range(i % 7))}
            await p.send_json({"type": "publish", "topic": "feed.x", "message": body, "id": i})
            if i % 50 == 49:
                await p.next_message(reply_to(i), within=scaled(20))

    results = await asyncio.gather(publish_all(), *(flood(c, k) for k, c in enumerate(flooders)))
    assert results[1:] == [1008] * len(flooders)
    got = [
        await s.next_message(is_delivery("feed.x"), within=scaled(20)) for _ in range(n_messages)
    ]
    for i, m in enumerate(got):
        assert m["message"] == {
            "i": i,
            "text": f"message {i} " + "é" * (i % 50),
            "list": list(range(i % 7)),
        }
    assert srv.stats.invalid_closes == len(flooders)
    await s.sync()
    assert s.take_all(is_delivery()) == []


async def test_junk_from_many_connections_then_the_server_still_serves(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    server = await make_server(handshake_timeout=1.0)
    connects: list[str] = []
    disconnects: list[str] = []
    all_gone = asyncio.Event()
    server.on("connect", connects.append)

    def on_disconnect(cid: str) -> None:
        disconnects.append(cid)
        if len(disconnects) == len(connects):
            all_gone.set()

    server.on("disconnect", on_disconnect)
    rng = random.Random(1234)

    async def raw_junk(i: int) -> None:
        reader, writer = await open_socket(server.url)
        kind = i % 5
        if kind == 0:
            writer.write(rng.randbytes(rng.randrange(1, 3000)))  # not even HTTP
        elif kind == 1:
            writer.write(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"
            )  # half an upgrade
        elif kind == 2:
            writer.write(b"POST /health HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        elif kind == 3:
            writer.write(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n")  # endless request line
        # kind 4: connect and say nothing
        try:
            # The server answers (an HTTP error) and/or closes: it never hangs on to junk.
            while await asyncio.wait_for(reader.read(65536), scaled(10)):
                pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def ws_junk(i: int) -> None:
        c = await RawClient.connect(server.url, path=f"/junk/{i}")
        kind = i % 5
        try:
            if kind == 0:
                await c.send_raw(rng.randbytes(rng.randrange(1, 5000)))  # random "frames"
            elif kind == 1:
                await c.send_frame(OP_TEXT, b"\xff" + rng.randbytes(200))  # not UTF-8
            elif kind == 2:
                await c.send_raw(encode_frame(OP_TEXT, b"x" * 500)[:100])  # half a frame
            elif kind == 3:
                for _ in range(60):
                    await c.send_frame(OP_TEXT, rng.randbytes(rng.randrange(1, 100)))
            else:
                await c.send_frame(OP_TEXT, b'{"type":"subscribe","topic":"junk"}', fin=False)
        except ConnectionError:
            pass
        if kind in (1, 3):
            assert await c.wait_closed(within=scaled(10)) in (1007, 1008)
        await c.dispose()  # the rest vanish, some of them mid-frame

    await asyncio.gather(*(raw_junk(i) for i in range(25)), *(ws_junk(i) for i in range(40)))
    assert len(connects) == 40
    await asyncio.wait_for(all_gone.wait(), scaled(15))
    assert server.connections == {}
    assert server.subscription_topics() == []
    status, body = await http_get(server.url, "/health")
    assert status == 200
    assert orjson.loads(body)["status"] == "ok"
    await assert_serving(server, open_client)


# -- slow consumers -----------------------------------------------------------------------------


async def test_slow_consumer_is_closed_1013_and_others_get_everything(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(max_outbound_buffer=256 * 1024)
    gone: asyncio.Queue[str] = asyncio.Queue()
    srv.on("disconnect", gone.put_nowait)
    slow = await open_client(srv.url, rcvbuf=8192)
    fast = await open_client(srv.url)
    p = await open_client(srv.url)
    for c in (slow, fast):
        await c.request({"type": "subscribe", "topic": "bulk", "id": "s"})
    slow.pause_reading()
    payload = "y" * 16_000
    sent = 0
    # Publish until the server gives up on the slow client; the cap only
    # bounds a broken server (kernel buffers hold a few MB at most).
    while srv.stats.slow_consumers == 0 and sent < 3000:
        for _ in range(20):
            await p.send_json(
                {"type": "publish", "topic": "bulk", "message": [sent, payload], "id": sent}
            )
            sent += 1
        # The ack is written in the same flush as the deliveries: once it is
        # here, the server has made its slow-consumer decision for them.
        await p.next_message(reply_to(sent - 1), within=scaled(20))
        got = [await fast.next_message(is_delivery("bulk")) for _ in range(20)]
        assert [m["message"][0] for m in got] == list(range(sent - 20, sent))
        assert all(m["message"][1] == payload for m in got)
    assert srv.stats.slow_consumers == 1, f"no slow consumer after {sent} publishes"
    # The slow client, once it reads again, finds the backlog then the close code.
    slow.resume_reading()
    assert await slow.wait_closed(within=scaled(20)) == 1013
    assert len(srv.connections) == 2
    backlog = [m["message"] for m in slow.take_all(is_delivery())]
    assert 0 < len(backlog) <= sent
    assert [m[0] for m in backlog] == list(range(len(backlog))), "in order, none lost before"
    assert all(m[1] == payload for m in backlog), "whole"
    # The others carry on.
    await p.send_json({"type": "publish", "topic": "bulk", "message": ["after"], "id": "x"})
    assert (await fast.next_message(is_delivery("bulk")))["message"] == ["after"]
    assert srv.stats.slow_consumers == 1


# -- shutdown -------------------------------------------------------------------------------------


async def test_graceful_shutdown_closes_clients_with_1001(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server()
    raw = await open_client(srv.url)
    await raw.request({"type": "subscribe", "topic": "news", "id": 1})
    async with ws_connect(srv.url, ping_interval=None) as lib:
        await lib.send(orjson.dumps({"type": "subscribe", "topic": "news", "id": 2}).decode())
        assert orjson.loads(await lib.recv())["type"] == "ack"
        loop = asyncio.get_running_loop()
        started = loop.time()
        await srv.close()
        # Both clients answered the close handshake: no waiting for close_timeout.
        assert loop.time() - started < srv.config.close_timeout
        assert await raw.wait_closed() == 1001
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(lib.recv(), DEFAULT_TIMEOUT)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1001
    assert srv.connections == {}
    with pytest.raises(ConnectionRefusedError):
        await RawClient.connect(srv.url)
    await srv.close()  # idempotent


async def test_shutdown_does_not_wait_forever_for_a_silent_client(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(close_timeout=0.3)
    mute = await open_client(srv.url, echo_close=False)
    await mute.request({"type": "subscribe", "topic": "news", "id": 1})
    await asyncio.wait_for(srv.close(), scaled(5))
    assert await mute.wait_closed() == 1001
    await mute.wait_eof()
    assert srv.connections == {}


async def test_server_refuses_plain_http_upgrade_failures_cleanly(server: Server) -> None:
    with pytest.raises(HandshakeError) as info:
        await RawClient.connect(server.url, headers={"Sec-WebSocket-Version": "99"})
    assert 400 <= info.value.status < 500
    status, _ = await http_get(server.url, "/health")
    assert status == 200


@pytest.mark.parametrize("size", [200_000, 4_000_000])
async def test_an_oversized_request_head_gets_its_431_not_a_reset(
    server: Server, size: int
) -> None:
    # The client is still sending when the server answers: closing at once with
    # unread input would make the kernel reset, and the 431 would be lost.
    reader, writer = await open_socket(server.url)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(10))
        assert head.startswith(b"HTTP/1.1 431 "), head
        # And the server ends the connection within its lingering bound.
        while await asyncio.wait_for(reader.read(65536), scaled(10)):
            pass
    finally:
        writer.close()
