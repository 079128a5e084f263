"""In-process: peer_up / peer_down events, peer_status and the /health view of links."""

from __future__ import annotations

import asyncio

from dwsps import Server
from tests.peering.helpers import WAIT
from tests.support import PortReservation
from tests.wsclient import RawClient, health


async def test_peer_events_and_status_follow_the_link() -> None:
    spot = PortReservation()
    a = Server(host="127.0.0.1", port=0, peers=[spot.url], peer_reconnect_max=0.2)
    b = Server(host="127.0.0.1", port=spot.port)
    events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    a.on("peer_up", lambda url: events.put_nowait(("up", url)))
    a.on("peer_down", lambda url: events.put_nowait(("down", url)))
    try:
        await a.start()
        a.publish("t", "early")  # the peer is not there yet: held
        (state,) = a.peer_status()
        assert state["url"] == spot.url
        assert state["state"] in ("connecting", "down")
        assert (state["outbox"], state["sent"], state["connects"]) == (1, 0, 0)

        await b.start()
        assert await asyncio.wait_for(events.get(), WAIT) == ("up", spot.url)
        sub = await RawClient.connect(b.url)
        try:
            await sub.subscribe("t")
            a.publish("t", "late")
            await sub.wait_for(lambda: sub.messages() == ["late"], within=WAIT)
        finally:
            await sub.close()
        (state,) = a.peer_status()
        assert state["state"] == "up"
        assert (state["sent"], state["confirmed"], state["outbox"]) == (2, 2, 0)
        assert (await health(a.url))["peers"] == [state]
        assert b.stats.publishes == 2  # "early" went out once the link was up

        await b.close()
        assert await asyncio.wait_for(events.get(), WAIT) == ("down", spot.url)
        assert a.peer_status()[0]["state"] != "up"
    finally:
        await a.close()
        await b.close()
        spot.release()
    assert a.peer_status() == []


async def test_close_waits_briefly_for_the_outbox_to_drain() -> None:
    b = Server(host="127.0.0.1", port=0)
    await b.start()
    a = Server(host="127.0.0.1", port=0, peers=[b.url])
    up = asyncio.Event()
    a.on("peer_up", lambda url: up.set())
    try:
        await a.start()
        await asyncio.wait_for(up.wait(), WAIT)
        for n in range(2000):
            a.publish("t", n)
        await a.close()  # returns once b confirmed everything (or after a bound)
        assert b.stats.publishes == 2000
    finally:
        await a.close()
        await b.close()
