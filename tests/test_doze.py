"""Idle connections let picows go (``--idle-sweep``) and get a fresh one with their next input.

Over real sockets: a dozing connection still gets its deliveries, answers the
heartbeat without waking, and wakes for requests, pings, closes, framing errors
and shutdown; a partial frame or an unfinished fragmented message keeps picows.
A connection dozes only after its first frame: until then nothing says picows
holds no partial frame (and a client that sends nothing subscribes to nothing).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from dwsps import Server
from dwsps.connection import Connection
from dwsps.metrics import render
from tests.conftest import ClientFactory, ServerFactory
from tests.support import eventually
from tests.wsclient import OP_CONT, OP_PING, OP_TEXT, RawClient, encode_frame

SWEEP = 0.05


def only_connection(srv: Server, *, besides: tuple[Connection, ...] = ()) -> Connection:
    (conn,) = [c for c in srv.connections.values() if c not in besides]
    return conn


def asleep(conn: Connection) -> bool:
    return conn.stream is not None and conn.stream.asleep


def count_sweeps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the hub's idle sweeps: each asks every connection (here: one) to doze.

    Patched on the (interpreted) Connection class: the hub may be compiled (make compiled),
    and a compiled class's methods cannot be replaced on an instance.
    """
    calls = [0]
    doze = Connection.doze

    def counted(conn: Connection) -> None:
        calls[0] += 1
        doze(conn)

    monkeypatch.setattr(Connection, "doze", counted)
    return calls


async def subscriber(
    srv: Server, open_client: ClientFactory, *, dozed: bool = True, **options: Any
) -> tuple[RawClient, Connection]:
    """A client subscribed to ``news`` (its first frame) and its connection, dozed first."""
    client = await open_client(srv.url, **options)
    await client.subscribe("news")
    conn = only_connection(srv)
    if dozed:
        await eventually(lambda: asleep(conn), "the connection to doze")
    return client, conn


async def test_a_dozing_connection_gets_deliveries_and_wakes_for_requests(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(idle_sweep=SWEEP, heartbeat_interval=0)
    sub, conn = await subscriber(srv, open_client)
    assert conn.transport is None  # picows and its buffers are gone
    assert conn.opened
    await eventually(lambda: srv.hub.dozing == 1, "the sweep to count it")
    assert b"dwsps_connections_dozing 1.0" in render(srv)
    pub = await open_client(srv.url)
    for i in range(3):
        await pub.publish("news.uk", i)
    assert [(await sub.next_message())["message"] for _ in range(3)] == [0, 1, 2]
    assert asleep(conn), "deliveries are written without picows"
    # Input wakes it: the request is parsed by a fresh picows and answered in order.
    ack = await sub.publish("news", "from the sleeper")
    assert ack["type"] == "ack"
    assert (await sub.next_message())["message"] == "from the sleeper"
    await eventually(lambda: asleep(conn), "it to doze again")
    await sub.subscribe("weather")
    await pub.publish("weather", "sun")
    assert (await sub.next_message())["message"] == "sun"


async def test_heartbeat_pongs_are_taken_without_waking(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(idle_sweep=SWEEP, heartbeat_interval=0.15)
    client, conn = await subscriber(srv, open_client)
    await eventually(lambda: len(client.pings) >= 4, "four heartbeat pings answered")
    assert asleep(conn)
    assert srv.stats.heartbeat_timeouts == 0
    assert client.pings[-1] == b""


async def test_a_dozing_connection_that_ignores_pings_is_dropped(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(idle_sweep=SWEEP, heartbeat_interval=0.15)
    client, _ = await subscriber(srv, open_client, auto_pong=False)
    await eventually(lambda: not srv.connections, "the silent connection to be dropped")
    assert srv.stats.heartbeat_timeouts == 1
    await client.wait_eof()


async def test_a_ping_and_a_close_wake_a_dozing_connection(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(idle_sweep=SWEEP, heartbeat_interval=0)
    client, conn = await subscriber(srv, open_client)
    await client.send_frame(OP_PING, b"hello")
    await eventually(lambda: client.pongs == [b"hello"], "the pong")
    await eventually(lambda: asleep(conn), "it to doze again")
    await client.close(1000)
    assert client.close_code == 1000
    await eventually(lambda: not srv.connections, "the server to forget it")


async def test_a_framing_error_from_a_dozing_connection_is_1002(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(idle_sweep=SWEEP, heartbeat_interval=0)
    client, _ = await subscriber(srv, open_client)
    await client.send_raw(encode_frame(OP_TEXT, b"{}", rsv=4))
    assert await client.wait_closed() == 1002


async def test_shutdown_says_1001_to_dozing_connections(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(idle_sweep=SWEEP, heartbeat_interval=0)
    clients = [await open_client(srv.url) for _ in range(3)]
    for client in clients:
        await client.subscribe("news")
    await eventually(
        lambda: all(asleep(c) for c in srv.connections.values()), "every connection to doze"
    )
    await srv.close()
    assert [await c.wait_closed() for c in clients] == [1001, 1001, 1001]


_PUBLISH = encode_frame(OP_TEXT, b'{"type":"publish","topic":"t","message":1,"id":7}')


@pytest.mark.parametrize(
    ("first", "rest", "why"),
    [
        (_PUBLISH[:9], _PUBLISH[9:], "picows holds part of a frame"),
        (
            encode_frame(OP_TEXT, b'{"type":"publish",', fin=False),
            encode_frame(OP_CONT, b'"topic":"t","message":1,"id":7}'),
            "a fragmented message is in progress",
        ),
    ],
    ids=["partial frame", "unfinished fragmented message"],
)
async def test_unfinished_input_keeps_picows(
    make_server: ServerFactory,
    open_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    first: bytes,
    rest: bytes,
    why: str,
) -> None:
    srv = await make_server(idle_sweep=SWEEP, heartbeat_interval=0)
    sweeps = count_sweeps(monkeypatch)
    client, conn = await subscriber(srv, open_client, dozed=False)
    await client.send_raw(first)
    start = sweeps[0]
    await eventually(lambda: sweeps[0] >= start + 3, "three idle sweeps")
    assert not asleep(conn), why
    await client.send_raw(rest)
    ack: Any = await client.next_message()
    assert (ack["type"], ack["id"]) == ("ack", 7)


async def test_a_pong_split_across_reads_wakes_picows_and_is_understood(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(idle_sweep=SWEEP, heartbeat_interval=0)
    client, conn = await subscriber(srv, open_client)
    pong = struct.pack("!BB", 0x8A, 0x80 | 2) + b"\0\0\0\0" + b"ok"
    await client.send_raw(pong[:3])
    await eventually(lambda: not asleep(conn), "the partial pong to wake picows")
    await client.send_raw(pong[3:])
    ack = await client.publish("t", 1)
    assert ack["type"] == "ack"
