"""The in-memory backplane with in-process servers: the contract without Redis."""

from __future__ import annotations

import uuid

import orjson
import pytest
from tests.conftest import ClientFactory, ServerFactory
from tests.support import eventually
from tests.wsclient import is_delivery

from dwsps.links import envelope as env
from dwsps.links.memory import hub


@pytest.fixture
def hub_url() -> str:
    return f"memory://test-{uuid.uuid4().hex[:8]}"


async def test_default_memory_backplane_is_skipped(make_server: ServerFactory) -> None:
    srv = await make_server(heartbeat_interval=0)
    assert srv.backplane is None


async def test_cross_server_delivery_marked_and_exactly_once(
    make_server: ServerFactory, open_client: ClientFactory, hub_url: str
) -> None:
    a = await make_server(backplane=hub_url, heartbeat_interval=0)
    b = await make_server(backplane=hub_url, heartbeat_interval=0)
    on_a, on_b = await open_client(a.url), await open_client(b.url)
    # Two contexts on B that share channel "news" plus a wildcard (pattern) one.
    await on_b.subscribe("news", "news.uk", "*.uk")
    await on_a.subscribe("news")
    await on_a.publish("news.uk", {"n": 1})
    await on_a.publish("news.uk", "fence")
    got = await on_b.take_until(lambda m: m["message"] == "fence")
    first = [m for m in got if m["message"] == {"n": 1}]
    assert sorted(m["context"] for m in first) == ["*.uk", "news", "news.uk"]
    assert all(m.get("viaBackplane") is True and "fromPeerServer" not in m for m in first)
    local = await on_a.take(2)
    assert [m["message"] for m in local] == [{"n": 1}, "fence"]
    assert all("viaBackplane" not in m for m in local)
    # The publisher's server does not hear its own publish back.
    assert a.backplane is not None
    assert a.backplane.delivered == 0
    assert on_a.take_all(is_delivery()) == []


async def test_interest_follows_subscriptions_and_disconnects(
    make_server: ServerFactory, open_client: ClientFactory, hub_url: str
) -> None:
    a = await make_server(backplane=hub_url, heartbeat_interval=0)
    b = await make_server(backplane=hub_url, heartbeat_interval=0)
    shared = hub(hub_url.removeprefix("memory://"))
    c1, c2 = await open_client(b.url), await open_client(b.url)
    await c1.subscribe("sport.football")
    await c2.subscribe("sport")
    assert shared.subscribers("sport") == 1
    await c1.unsubscribe("sport.football")
    assert shared.subscribers("sport") == 1
    await c2.close()
    await eventually(lambda: shared.subscribers("sport") == 0, "interest to drop on disconnect")
    # No interest: B receives nothing for "sport" at all.
    pub = await open_client(a.url)
    await pub.publish("sport.tennis", 1)
    assert b.backplane is not None
    assert b.backplane.status()["received"] == 0


async def test_duplicates_own_origin_and_gaps(
    make_server: ServerFactory, open_client: ClientFactory, hub_url: str
) -> None:
    srv = await make_server(backplane=hub_url, heartbeat_interval=0)
    sub = await open_client(srv.url)
    await sub.subscribe("news")
    link = srv.backplane
    assert link is not None
    ts = "2020-01-22T15:44:04.674Z"
    link.receive(env.encode("peer1", 1, "news.a", ts, "one", "origin1", 10))
    link.receive(env.encode("peer2", 1, "news.a", ts, "one", "origin1", 10))  # same identity
    link.receive(env.encode("peer1", 2, "news.a", ts, "mine", srv.server_id, 3))  # own origin
    link.receive(env.encode("peer1", 5, "news.a", ts, "after gap", "origin1", 11))
    link.receive(env.encode(srv.server_id, 9, "news.a", ts, "own echo", "x", 1))
    link.receive(b"not an envelope")
    got = await sub.take(2)
    assert [m["message"] for m in got] == ["one", "after gap"]
    assert got[0]["timestamp"] == ts
    assert link.duplicates == 1
    assert srv.stats.duplicates_dropped == 1
    assert link.gaps == 2  # channel numbers 3 and 4 from peer1 never came
    assert link.invalid == 1


async def test_peer_flag_travels_and_peer_publishes_go_on_the_backplane(
    make_server: ServerFactory, open_client: ClientFactory, hub_url: str
) -> None:
    a = await make_server(backplane=hub_url, heartbeat_interval=0)
    b = await make_server(backplane=hub_url, heartbeat_interval=0)
    on_b = await open_client(b.url)
    await on_b.subscribe("news")
    # Something that looks like an original dwsps peer (no identity fields).
    fake_peer = await open_client(a.url)
    await fake_peer.publish("news.x", "from a peer", fromPeerServer=True)
    (got,) = await on_b.take(1)
    assert got["fromPeerServer"] is True
    assert got["viaBackplane"] is True


async def test_health_reports_backplane(make_server: ServerFactory, hub_url: str) -> None:
    srv = await make_server(backplane=hub_url, heartbeat_interval=0)
    answer = srv.http.get("/health")
    health = orjson.loads(answer.body)
    assert answer.status == 200
    assert health["status"] == "ok"
    assert health["backplane"]["state"] == "up"
