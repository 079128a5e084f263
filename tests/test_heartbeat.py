"""Heartbeat: the server pings at a fixed interval and drops only clients that do not pong."""

from __future__ import annotations

import asyncio

import orjson
from websockets.asyncio.client import connect as ws_connect

from tests.conftest import ClientFactory, ServerFactory
from tests.support import scaled
from tests.wsclient import is_delivery

INTERVAL = 0.2


async def test_live_clients_stay_and_dead_ones_are_dropped(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(heartbeat_interval=INTERVAL)
    dropped: asyncio.Queue[str] = asyncio.Queue()
    ids: asyncio.Queue[str] = asyncio.Queue()
    srv.on("connect", ids.put_nowait)
    srv.on("disconnect", dropped.put_nowait)

    live = await open_client(srv.url)  # answers pings
    live_id = await asyncio.wait_for(ids.get(), scaled(5))
    dead = await open_client(srv.url, auto_pong=False)
    dead_id = await asyncio.wait_for(ids.get(), scaled(5))
    await dead.request({"type": "subscribe", "topic": "news", "id": 1})
    async with ws_connect(srv.url, ping_interval=None) as lib:  # a real library answers too
        # The dead client is pinged, does not answer, and is dropped at the next tick.
        await dead.wait_for(lambda: len(dead.pings) >= 1, within=scaled(5))
        await dead.wait_eof(within=scaled(5))
        assert await asyncio.wait_for(dropped.get(), scaled(5)) == dead_id
        assert srv.stats.heartbeat_timeouts == 1
        assert dead_id not in srv.connections
        assert srv.subscription_topics() == [], "its subscriptions went with it"

        # Several more intervals: the live clients are pinged and stay.
        await live.wait_for(lambda: len(live.pings) >= 5, within=scaled(10))
        assert dropped.empty()
        await live.request({"type": "subscribe", "topic": "news", "id": 2})
        await lib.send(orjson.dumps({"type": "publish", "topic": "news", "message": "hb"}).decode())
        assert orjson.loads(await asyncio.wait_for(lib.recv(), scaled(5)))["type"] == "ack"
        assert (await live.next_message(is_delivery("news")))["message"] == "hb"
        assert set(srv.connections) >= {live_id}
        assert len(srv.connections) == 2
        assert srv.stats.heartbeat_timeouts == 1


async def test_no_pings_when_the_heartbeat_is_off(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(heartbeat_interval=0)
    c = await open_client(srv.url, auto_pong=False)
    other = await make_server(heartbeat_interval=INTERVAL)
    clock = await open_client(other.url)  # measures time in heartbeat ticks
    await clock.wait_for(lambda: len(clock.pings) >= 3, within=scaled(10))
    await c.request({"type": "subscribe", "topic": "still.here", "id": 1})
    assert c.pings == []
    assert srv.stats.heartbeat_timeouts == 0
