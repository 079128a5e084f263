"""History and recovery over real sockets: the wire fields, ``recover`` and its seam,
the ``recovered: false`` cases, the ``history`` request, the byte cap in the metrics,
and the Python client and ``dwsps sub`` recovering across dropped connections.

The pure rules (streams, offsets, epochs, trimming) are tests/test_history.py.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import orjson
import pytest

from dwsps import Server
from dwsps.auth import Identity, UpgradeRequest
from dwsps.client import Client
from dwsps.permissions import Permissions
from tests.conftest import ClientFactory, PortFactory, ProcessFactory, ServerFactory
from tests.support import eventually, scaled
from tests.test_cli_ops import dwsps, line_of
from tests.wsclient import RawClient, http_get, http_request, is_delivery, is_type

WAIT = scaled(20.0)
CHAT = ["chat.*:5000:10m"]


async def history_server(make_server: ServerFactory, **overrides: Any) -> Server:
    overrides.setdefault("history", CHAT)
    return await make_server(**overrides)


async def recover(
    client: RawClient, topic: str, epoch: str, offset: int, **extra: Any
) -> dict[str, Any]:
    reply: dict[str, Any] = await client.request(
        {
            "type": "subscribe",
            "topic": topic,
            "recover": {"epoch": epoch, "offset": offset},
            **extra,
        }
    )
    return reply


async def history(client: RawClient, **request: Any) -> dict[str, Any]:
    await client.send_json({"type": "history", **request})
    reply: dict[str, Any] = await client.next_message(
        lambda m: isinstance(m, dict) and m.get("type") in ("history", "error")
    )
    return reply


def offsets(deliveries: list[dict[str, Any]]) -> list[int]:
    return [d["offset"] for d in deliveries]


# -- the wire -----------------------------------------------------------------------------


async def test_acks_and_deliveries_carry_stream_offset_and_epoch(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server)
    sub = await open_client(srv.url)
    ack = await sub.request({"type": "subscribe", "topic": "chat.room1"})
    # A position before anything was published: a client can recover from it.
    epoch = ack["epoch"]
    assert (ack["stream"], ack["offset"]) == ("chat.room1", 0)
    assert "recovered" not in ack
    await sub.subscribe("news")
    acks = [await sub.publish("chat.room1.typing", {"n": i}) for i in range(3)]
    assert [(a["stream"], a["offset"], a["epoch"]) for a in acks] == [
        ("chat.room1", i, epoch) for i in (1, 2, 3)
    ]
    news_ack = await sub.publish("news", "no history")
    assert "offset" not in news_ack
    assert "stream" not in news_ack
    got = await sub.take(4)
    assert [(d["topic"], d["stream"], d["offset"], d["epoch"]) for d in got[:3]] == [
        ("chat.room1.typing", "chat.room1", i, epoch) for i in (1, 2, 3)
    ]
    assert [d["message"] for d in got[:3]] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert "recovered" not in got[0]
    assert got[3]["topic"] == "news"
    assert "offset" not in got[3]
    assert "epoch" not in got[3]
    # A subscription spanning streams has no single position.
    wide = await sub.request({"type": "subscribe", "topic": "chat"})
    assert wide["type"] == "ack"
    assert "epoch" not in wide


async def test_two_contexts_share_the_position_of_one_publish(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server)
    sub = await open_client(srv.url)
    await sub.subscribe("chat", "chat.room1")
    await sub.publish("chat.room1", "x")
    got = await sub.take(2)
    assert sorted(d["context"] for d in got) == ["chat", "chat.room1"]
    assert {(d["offset"], d["epoch"]) for d in got} == {(1, got[0]["epoch"])}


async def test_api_publish_reports_the_position(make_server: ServerFactory) -> None:
    srv = await history_server(make_server, api_key="k")
    status, _, body = await http_request(
        srv.url,
        "POST",
        "/api/publish",
        orjson.dumps({"topic": "chat.r", "message": 1}),
        {"Authorization": "Bearer k"},
    )
    assert status == 200, body
    reply = orjson.loads(body)
    assert (reply["stream"], reply["offset"]) == ("chat.r", 1)
    assert reply["epoch"]


# -- recover --------------------------------------------------------------------------------


async def test_recover_replays_exactly_what_was_missed_then_goes_live(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server)
    first = await open_client(srv.url)
    ack = await first.request({"type": "subscribe", "topic": "chat.room1"})
    pub = await open_client(srv.url)
    await pub.publish("chat.room1", "seen")
    (seen,) = await first.take(1)
    await first.close()
    for i in range(1000):
        await pub.send_json({"type": "publish", "topic": "chat.room1", "message": i})
    await pub.publish("chat.room1", "last missed")
    again = await open_client(srv.url)
    reply = await recover(again, "chat.room1", seen["epoch"], seen["offset"])
    assert reply["type"] == "ack"
    assert reply["recovered"] is True
    assert (reply["epoch"], reply["offset"]) == (ack["epoch"], 1002)
    replay = await again.take(1001)
    assert offsets(replay) == list(range(2, 1003))
    assert [d["message"] for d in replay] == [*range(1000), "last missed"]
    assert all(d["recovered"] is True and d["context"] == "chat.room1" for d in replay)
    await pub.publish("chat.room1", "live")
    (live,) = await again.take(1)
    assert (live["offset"], live["message"]) == (1003, "live")
    assert "recovered" not in live
    await again.sync()
    assert not again.take_all(is_delivery())
    assert reply["replay"] == 1001
    assert srv.stats.recoveries_ok == 1
    assert srv.stats.replayed == 1001


async def test_recover_of_a_subtopic_replays_only_what_it_matches(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server)
    pub = await open_client(srv.url)
    first = await pub.publish("chat.room1", "a")
    await pub.publish("chat.room1.typing", "t1")
    await pub.publish("chat.room1", "b")
    await pub.publish("chat.room1.typing", "t2")
    sub = await open_client(srv.url)
    reply = await recover(sub, "chat.room1.typing", first["epoch"], 0)
    assert reply["recovered"] is True
    assert reply["offset"] == 4
    got = await sub.take(2)
    assert [(d["offset"], d["message"]) for d in got] == [(2, "t1"), (4, "t2")]


def recovery_counts(srv: Server) -> tuple[int, int, int, int, int]:
    """Recoveries attempted, ok, failed, cut off, and the publications replayed."""
    s = srv.stats
    return (
        s.recoveries_attempted,
        s.recoveries_ok,
        s.recoveries_failed,
        s.recoveries_cut_off,
        s.replayed,
    )


def metric_values(body: bytes) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in (
            line.rsplit(" ", 1) for line in body.decode().splitlines() if line.startswith("dwsps_")
        )
    }


async def as_alice(request: UpgradeRequest) -> Identity:
    return Identity("alice", Permissions.EVERYTHING)


async def cut_off_replay(
    srv: Server, pub: RawClient, topic: str, count: int, attempts: int, within: float
) -> str:
    """Publish ``count`` 1 KB messages to ``topic`` (more than the kernel buffers take at
    once), recover them all on a client that reads nothing, and let it go: its paged replay
    is cut off. ``attempts`` is the server's recovery count once it has started; returns the
    stalled connection's id."""
    epoch = (await pub.publish(topic, "z" * 1000))["epoch"]
    for _ in range(count - 1):
        await pub.send_json({"type": "publish", "topic": topic, "message": "z" * 1000})
    await pub.sync()
    before = set(srv.connections)
    stalled = await RawClient.connect(srv.url, rcvbuf=4096)
    try:
        stalled.pause_reading()
        await stalled.send_json(
            {"type": "subscribe", "topic": topic, "recover": {"epoch": epoch, "offset": 0}}
        )
        await eventually(
            lambda: srv.stats.recoveries_attempted == attempts, "the paged recovery", within
        )
        (stalled_id,) = set(srv.connections) - before
    finally:
        await stalled.dispose()
    await eventually(lambda: srv.stats.recoveries_cut_off == 1, "the replay to be cut off", within)
    return stalled_id


async def test_recovery_counters_and_event_after_known_traffic(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    """One recovery of each outcome: every counter, the event, /metrics and /health."""
    srv = await history_server(
        make_server,
        history=["chat.*:5000", "big.*:8000"],
        max_outbound_buffer=64 * 1024,
        authenticate=as_alice,
    )
    events: list[tuple[Any, ...]] = []
    srv.on("recovery", lambda *args: events.append(args))
    pub = await open_client(srv.url)
    epoch = (await pub.publish("chat.a", 1))["epoch"]
    for i in (2, 3):
        await pub.publish("chat.a", i)
    sub = await open_client(srv.url)
    ok = await recover(sub, "chat.a", epoch, 0)
    assert (ok["recovered"], ok["replay"]) == (True, 3)
    assert [d["message"] for d in await sub.take(3)] == [1, 2, 3]
    lost = await recover(sub, "chat.b", "not-the-epoch", 0)
    assert lost["recovered"] is False
    assert "replay" not in lost
    (sub_id,) = [cid for cid, c in srv.connections.items() if srv.hub.router.subscriptions(c)]
    stalled_id = await cut_off_replay(srv, pub, "big.s", 8000, 3, scaled(10.0))
    cut = events[2]
    assert events[:2] == [
        ("chat.a", sub_id, "alice", True, 3),
        ("chat.b", sub_id, "alice", False, 0),
    ]
    assert cut[:4] == ("big.s", stalled_id, "alice", False)
    assert 0 < cut[4] < 8000
    assert recovery_counts(srv) == (3, 1, 1, 1, 3 + cut[4])
    _, body = await http_get(srv.url, "/metrics")
    metrics = metric_values(body)
    assert metrics["dwsps_history_recoveries_attempted_total"] == 3
    assert metrics["dwsps_history_recoveries_ok_total"] == 1
    assert metrics["dwsps_history_recoveries_failed_total"] == 1
    assert metrics["dwsps_history_recoveries_cut_off_total"] == 1
    assert metrics["dwsps_history_replayed_total"] == 3 + cut[4]
    _, health = await http_get(srv.url, "/health")
    doc = orjson.loads(health)["stats"]
    assert [doc[k] for k in ("recoveries_attempted", "recoveries_ok", "recoveries_failed")] == [
        3,
        1,
        1,
    ]
    assert (doc["recoveries_cut_off"], doc["replayed"]) == (1, 3 + cut[4])


async def narrow_subscription_keeps_up(
    srv: Server, open_client: ClientFactory, gate: asyncio.Event
) -> None:
    """``chat.r.typing`` in the stream ``chat.r`` of a 200-message history: sibling
    traffic while it is away would trim its last delivery's offset; it recovers all
    the same, because after each recovery its position is the ack's offset.

    ``srv`` keeps ``chat.*:200`` and admits upgrades only while ``gate`` is set.
    """
    pub = await open_client(srv.url)
    got: list[Any] = []
    recoveries: list[bool] = []

    async def away(*topics: str) -> None:
        gate.clear()  # the client reconnects only once all of it is published
        (conn,) = [c for c in srv.connections.values() if srv.hub.router.subscriptions(c)]
        conn.abort()
        for topic in topics:
            message = "t" if topic.endswith("typing") else "x" * 2000
            await pub.send_json({"type": "publish", "topic": topic, "message": message})
        await pub.sync()
        gate.set()

    async with Client(srv.url, backoff_initial=0.05, backoff_max=0.2, queue_size=0) as client:
        client.on("recovery", lambda topic, ok, reply: recoveries.append(ok))
        await client.subscribe("chat.r.typing", lambda d: got.append(d["offset"]))
        sub = client.subscription("chat.r.typing")
        assert sub is not None
        await pub.publish("chat.r.typing", "t")
        await eventually(lambda: got == [1], "the first delivery")
        siblings = ["chat.r.msgs"] * 75
        await away(*siblings, "chat.r.typing", *siblings)  # offsets 2..152, typing at 77
        await eventually(lambda: got == [1, 77], "the replayed delivery", WAIT)
        assert recoveries == [True]
        assert sub.offset == 152  # the ack's offset: its replay is in
        await away(*["chat.r.msgs"] * 150)  # 153..302: offset 78 is gone, 153 is kept
        await eventually(lambda: len(recoveries) == 2, "the second recovery", WAIT)
        assert recoveries == [True, True]
        assert sub.recovered is True
        assert sub.offset == 302  # nothing replayed: the ack's offset at once
        await pub.publish("chat.r.typing", "t")
        await eventually(lambda: got == [1, 77, 303], "the live delivery")


async def test_a_narrow_subscription_recovers_after_siblings_trimmed_its_position(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    gate = asyncio.Event()
    gate.set()

    async def gated(request: UpgradeRequest) -> Identity:
        await gate.wait()
        return Identity(None, Permissions.EVERYTHING)

    srv = await history_server(make_server, history=["chat.*:200"], authenticate=gated)
    await narrow_subscription_keeps_up(srv, open_client, gate)


async def test_recover_while_a_publisher_streams_sees_every_offset_once(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    """The seam under load: drop and recover repeatedly while publishes keep coming."""
    srv = await history_server(make_server)
    pub = await open_client(srv.url)
    total = 3000
    stop = asyncio.Event()

    async def publish() -> None:
        for i in range(total):
            await pub.send_json({"type": "publish", "topic": "chat.fast", "message": i})
            if i % 50 == 0:
                await asyncio.sleep(0)  # let the subscribers' requests in between
        stop.set()

    sub = await open_client(srv.url)
    ack = await sub.request({"type": "subscribe", "topic": "chat.fast"})
    epoch, position = ack["epoch"], ack["offset"]
    received: list[int] = []
    task = asyncio.create_task(publish())
    try:
        rounds = 0
        while position < total:
            got = await sub.take(min(1 + rounds % 40, total - position))
            received += offsets(got)
            position = got[-1]["offset"]
            if position >= total:
                break
            await sub.close()
            rounds += 1
            sub = await open_client(srv.url)
            reply = await recover(sub, "chat.fast", epoch, position)
            assert reply["recovered"] is True, reply
    finally:
        await task
    assert rounds > 5
    assert stop.is_set()
    assert received == list(range(1, total + 1))


async def test_a_big_recovery_is_paged_and_still_seamless(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    """More than the outbound bound allows at once: paged as the client reads, no 1013."""
    srv = await history_server(make_server, history=["big.*:30000"], max_outbound_buffer=256 * 1024)
    pub = await open_client(srv.url)
    payload = "x" * 100
    ack = await pub.publish("big.s", payload)
    for _ in range(19_999):
        await pub.send_json({"type": "publish", "topic": "big.s", "message": payload})
    await pub.sync()
    sub = await open_client(srv.url)
    reply = await recover(sub, "big.s", ack["epoch"], 0)
    assert reply["recovered"] is True
    assert reply["offset"] == 20_000
    assert reply["replay"] == 20_000
    # Publishes that arrive while the replay is paged come right after it, once each.
    for _ in range(100):
        await pub.send_json({"type": "publish", "topic": "big.s", "message": "during"})
    got = await sub.take(20_100, within=WAIT)
    assert offsets(got) == list(range(1, 20_101))
    assert all(d.get("recovered") is True for d in got[:20_000])
    await pub.publish("big.s", "after")
    (after,) = await sub.take(1)
    assert after["offset"] == 20_101
    assert "recovered" not in after
    assert srv.stats.slow_consumers == 0
    assert srv.stats.replayed >= 20_000
    # Counted once the last page is queued: before the live deliveries that follow it.
    assert (srv.stats.recoveries_ok, srv.stats.recoveries_cut_off) == (1, 0)


async def test_a_client_that_stops_reading_during_a_paged_replay_is_cut_off(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server, history=["big.*:2000"], max_outbound_buffer=64 * 1024)
    pub = await open_client(srv.url)
    payload = "y" * 500
    ack = await pub.publish("big.s", payload)
    for _ in range(1999):
        await pub.send_json({"type": "publish", "topic": "big.s", "message": payload})
    await pub.sync()
    sub = await RawClient.connect(srv.url, rcvbuf=4096)
    try:
        sub.pause_reading()
        await sub.send_json(
            {"type": "subscribe", "topic": "big.s", "recover": {"epoch": ack["epoch"], "offset": 0}}
        )
        # Meanwhile the ring moves on past what the stalled replay still has to send.
        for _ in range(2500):
            await pub.send_json({"type": "publish", "topic": "big.s", "message": payload})
        await pub.sync()
        sub.resume_reading()
        assert await sub.wait_closed(within=WAIT) == 1013
    finally:
        await sub.dispose()
    # Cut off either way: the replay fell behind the ring (a failed recovery), or
    # it finished while the reader was stalled and live deliveries then passed
    # the outbound bound (a slow consumer); which one depends on how the read
    # budget interleaves the publisher's frames with the replay's pages.
    assert srv.stats.recoveries_cut_off + srv.stats.slow_consumers == 1
    assert srv.stats.recoveries_failed == 0
    assert srv.stats.recoveries_attempted == 1
    assert len(srv.connections) == 1


# -- recovered: false -------------------------------------------------------------------------


async def test_a_wrong_epoch_is_not_recovered(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server)
    pub = await open_client(srv.url)
    ack = await pub.publish("chat.room1", "a")
    sub = await open_client(srv.url)
    reply = await recover(sub, "chat.room1", "not-the-epoch", 0)
    assert reply["type"] == "ack"
    assert reply["recovered"] is False
    assert (reply["epoch"], reply["offset"]) == (ack["epoch"], 1)
    # Subscribed all the same: live deliveries follow, nothing is replayed.
    await pub.publish("chat.room1", "b")
    (live,) = await sub.take(1)
    assert live["message"] == "b"
    assert "recovered" not in live
    assert srv.stats.recoveries_failed == 1


async def test_history_trimmed_by_size_is_not_recovered(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server, history=["chat.*:10"])
    pub = await open_client(srv.url)
    first = await pub.publish("chat.room1", 0)
    for i in range(1, 12):
        await pub.publish("chat.room1", i)
    sub = await open_client(srv.url)
    # Offset 1 is gone (kept: 3..12), so from 1 the client would miss 2.
    assert (await recover(sub, "chat.room1", first["epoch"], 1))["recovered"] is False
    ok = await recover(sub, "chat.room1", first["epoch"], 2)
    assert ok["recovered"] is True
    assert offsets(await sub.take(10)) == list(range(3, 13))
    # An offset the stream never reached is refused too.
    assert (await recover(sub, "chat.room1", first["epoch"], 99))["recovered"] is False


async def test_history_expired_by_age_is_not_recovered(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server, history=["chat.*:100:0.3s"])
    pub = await open_client(srv.url)
    first = await pub.publish("chat.room1", "old")
    epoch = first["epoch"]

    async def gone() -> bool:
        page = await history(pub, topic="chat.room1", limit=10)
        return page["publications"] == []

    await eventually(gone, "the publication to expire")
    sub = await open_client(srv.url)
    assert (await recover(sub, "chat.room1", epoch, 0))["recovered"] is False
    # Up to date before it expired: nothing was missed, so that still recovers.
    assert (await recover(sub, "chat.room1", epoch, 1))["recovered"] is True


async def test_evicted_streams_are_not_recovered_and_show_in_metrics(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server, history_max_bytes=20_000)
    pub = await open_client(srv.url)
    first = await pub.publish("chat.first", "x" * 1000)
    for i in range(40):
        await pub.publish(f"chat.other{i}", "y" * 1000)
    sub = await open_client(srv.url)
    reply = await recover(sub, "chat.first", first["epoch"], 0)
    assert reply["recovered"] is False
    assert reply["epoch"] != first["epoch"]  # the offsets of the evicted stream are gone
    status, body = await http_get(srv.url, "/metrics")
    assert status == 200
    metrics = dict(
        line.rsplit(" ", 1) for line in body.decode().splitlines() if line.startswith("dwsps_")
    )
    assert float(metrics["dwsps_history_evicted_streams_total"]) > 0
    assert 0 < float(metrics["dwsps_history_bytes"]) <= 20_000
    assert float(metrics["dwsps_history_recoveries_failed_total"]) == 1
    _, health = await http_get(srv.url, "/health")
    doc = orjson.loads(health)
    assert doc["history"]["evicted_streams"] > 0
    assert doc["history"]["bytes"] <= 20_000
    assert doc["stats"]["recoveries_failed"] == 1


async def test_a_restarted_server_does_not_recover_old_offsets(
    serve_process: ProcessFactory, reserve_port: PortFactory, open_client: ClientFactory
) -> None:
    port = reserve_port().port
    first = await serve_process("--history", "chat.*:100", port=port)
    pub = await open_client(first.url)
    ack = await pub.publish("chat.room1", "before")
    await pub.close()
    await first.stop()
    second = await serve_process("--history", "chat.*:100", port=port)
    sub = await open_client(second.url)
    reply = await recover(sub, "chat.room1", ack["epoch"], ack["offset"])
    assert reply["recovered"] is False
    assert reply["epoch"] != ack["epoch"]
    assert reply["offset"] == 0


@pytest.mark.parametrize(
    ("request_fields", "detail"),
    [
        ({"topic": "chat.*", "recover": {"epoch": "e", "offset": 0}}, "does not lie inside"),
        ({"topic": "news", "recover": {"epoch": "e", "offset": 0}}, "no history is kept"),
        ({"topic": "chat.a", "recover": {"epoch": "e", "offset": -1}}, "'recover' must be"),
        ({"topic": "chat.a", "recover": {"epoch": 5, "offset": 0}}, "'recover' must be"),
        ({"topic": "chat.a", "recover": {"epoch": "e" * 65, "offset": 0}}, "'recover' must be"),
        ({"topic": "chat.a", "recover": "yes"}, "'recover' must be"),
    ],
)
async def test_bad_recover_requests_get_invalid_message(
    make_server: ServerFactory,
    open_client: ClientFactory,
    request_fields: dict[str, Any],
    detail: str,
) -> None:
    srv = await history_server(make_server)
    sub = await open_client(srv.url)
    reply = await sub.request({"type": "subscribe", **request_fields})
    assert reply["type"] == "error", reply
    assert reply["error"] == "invalid_message", reply
    assert detail in reply["detail"]
    assert reply["action"] == "subscribe"
    assert srv.hub.router.subscriptions(next(iter(srv.connections.values()))) == frozenset()


async def test_recover_without_history_configured(
    server: Server, open_client: ClientFactory
) -> None:
    sub = await open_client(server.url)
    reply = await recover(sub, "chat.a", "e", 0)
    assert reply["error"] == "invalid_message"
    assert "no history" in reply["detail"]
    ack = await sub.request({"type": "subscribe", "topic": "chat.a"})
    assert "epoch" not in ack
    assert "offset" not in await sub.publish("chat.a", 1)


async def test_recover_needs_permission_to_subscribe(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    import jwt

    srv = await history_server(make_server, auth_jwt_secret="s" * 32)
    token = jwt.encode({"dwsps": {"subscribe": ["news"], "publish": []}}, "s" * 32)
    sub = await open_client(f"{srv.url}/?token={token}")
    reply = await recover(sub, "chat.a", "e", 0)
    assert reply["error"] == "forbidden"
    page = await history(sub, topic="chat.a")
    assert page["error"] == "forbidden"
    assert page["action"] == "history"


# -- the history request --------------------------------------------------------------------


async def test_history_request_pages_the_latest(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server)
    pub = await open_client(srv.url)
    acks = [await pub.publish("chat.room1", i) for i in range(10)]
    await pub.publish("chat.room1.typing", "t")
    epoch = acks[0]["epoch"]
    page = await history(pub, topic="chat.room1", limit=3, id=7)
    assert (page["id"], page["topic"], page["stream"]) == (7, "chat.room1", "chat.room1")
    assert (page["epoch"], page["offset"]) == (epoch, 11)
    pubs = page["publications"]
    assert [(p["offset"], p["message"]) for p in pubs] == [(9, 8), (10, 9), (11, "t")]
    assert all(p["type"] == "publish" and p["context"] == "chat.room1" for p in pubs)
    assert "truncated" not in page
    typing = await history(pub, topic="chat.room1.typing", limit=50)
    assert [p["message"] for p in typing["publications"]] == ["t"]
    since = await history(pub, topic="chat.room1", limit=50, since={"epoch": epoch, "offset": 8})
    assert offsets(since["publications"]) == [9, 10, 11]
    position = await history(pub, topic="chat.room1", limit=0)
    assert position["publications"] == []
    assert position["offset"] == 11
    empty = await history(pub, topic="chat.nothing")
    assert (empty["offset"], empty["publications"]) == (0, [])


@pytest.mark.parametrize(
    ("request_fields", "detail"),
    [
        ({"topic": "chat.*"}, "does not lie inside"),
        ({"topic": "news"}, "no history is kept"),
        ({"topic": "chat.a", "limit": -1}, "'limit'"),
        ({"topic": "chat.a", "limit": "5"}, "'limit'"),
        ({"topic": "chat.a", "since": {"epoch": "e"}}, "'since' must be"),
    ],
)
async def test_bad_history_requests_get_invalid_message(
    make_server: ServerFactory,
    open_client: ClientFactory,
    request_fields: dict[str, Any],
    detail: str,
) -> None:
    srv = await history_server(make_server)
    sub = await open_client(srv.url)
    reply = await history(sub, **request_fields)
    assert reply["type"] == "error", reply
    assert reply["error"] == "invalid_message", reply
    assert detail in reply["detail"]
    assert reply["action"] == "history"


async def test_a_history_reply_stays_within_half_the_outbound_bound(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server, max_outbound_buffer=64 * 1024)
    pub = await open_client(srv.url)
    for i in range(100):
        await pub.send_json({"type": "publish", "topic": "chat.big", "message": f"{i:04}" * 250})
    await pub.sync()
    page = await history(pub, topic="chat.big", limit=100)
    assert page["truncated"] is True
    pubs = page["publications"]
    assert 0 < len(pubs) < 100
    assert pubs[-1]["offset"] == 100
    assert len(orjson.dumps(page)) <= 32 * 1024


# -- the Python client and dwsps sub --------------------------------------------------------


async def test_client_recovers_everything_across_a_server_side_drop(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server)
    pub = await open_client(srv.url)
    got: list[Any] = []
    recoveries: list[tuple[str, bool]] = []
    reconnected = asyncio.Event()
    async with Client(srv.url, backoff_initial=0.2, backoff_max=0.5, queue_size=0) as client:
        client.on("recovery", lambda topic, ok, reply: recoveries.append((topic, ok)))
        client.on("reconnect", reconnected.set)
        await client.subscribe("chat.room1", lambda d: got.append(d["message"]))
        await client.subscribe("news")
        for i in range(5):
            await pub.publish("chat.room1", i)
        sub = client.subscription("chat.room1")
        assert sub is not None
        await eventually(lambda: sub.offset == 5, "the first deliveries")
        assert sub.recovered is None
        assert client.subscription("news").epoch is None  # type: ignore[union-attr]
        # The server drops the client's connection; publishes go on meanwhile.
        (conn,) = [c for c in srv.connections.values() if srv.hub.router.subscriptions(c)]
        conn.abort()
        for i in range(5, 300):
            await pub.send_json({"type": "publish", "topic": "chat.room1", "message": i})
        await asyncio.wait_for(reconnected.wait(), WAIT)
        await pub.publish("chat.room1", "live")
        await eventually(lambda: got[-1:] == ["live"], "the live delivery")
        assert got == [*range(300), "live"]
        assert recoveries == [("chat.room1", True)]
        assert sub.recovered is True
        assert sub.offset == 301


async def test_client_says_when_it_could_not_recover(
    serve_process: ProcessFactory, reserve_port: PortFactory
) -> None:
    port = reserve_port().port
    first = await serve_process("--history", "chat.*:100", port=port)
    events: list[tuple[str, bool]] = []
    recovered = asyncio.Event()

    def on_recovery(topic: str, ok: bool, reply: dict[str, Any]) -> None:
        events.append((topic, ok))
        recovered.set()

    async with Client(first.url, backoff_initial=0.1, backoff_max=0.3) as client:
        client.on("recovery", on_recovery)
        await client.subscribe("chat.room1")
        await client.publish("chat.room1", "before")
        old = client.subscription("chat.room1")
        assert old is not None
        await eventually(lambda: old.offset == 1, "the delivery")
        old_epoch = old.epoch
        await first.stop()
        second = await serve_process("--history", "chat.*:100", port=port)
        await asyncio.wait_for(recovered.wait(), WAIT)
        assert events == [("chat.room1", False)]
        assert old.recovered is False
        assert old.epoch != old_epoch
        assert old.offset == 0
        assert second.url


async def test_client_history_call(make_server: ServerFactory) -> None:
    srv = await history_server(make_server)
    async with Client(srv.url) as client:
        for i in range(4):
            await client.publish("chat.room1", i)
        page = await client.history("chat.room1", limit=2)
        assert [p["message"] for p in page["publications"]] == [2, 3]
        since = await client.history("chat.room1", since=(page["epoch"], 1))
        assert [p["offset"] for p in since["publications"]] == [2, 3, 4]


async def test_sub_says_when_messages_could_not_be_recovered(
    serve_process: ProcessFactory, reserve_port: PortFactory
) -> None:
    port = reserve_port().port
    first = await serve_process("--history", "chat.*:100", port=port)
    async with dwsps("sub", "chat.room1", "--url", first.url) as sub:
        assert "subscribed to chat.room1" in await line_of(sub.stderr)
        await first.stop()
        assert "lost the connection" in await line_of(sub.stderr)
        await serve_process("--history", "chat.*:100", port=port)
        assert await line_of(sub.stderr) == (
            "dwsps sub: messages published to chat.room1 while disconnected could not be"
            " recovered (the server's history of it was lost or no longer reaches back)\n"
        )
        assert "reconnected" in await line_of(sub.stderr)
        sub.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sub.wait(), WAIT) == 0


# -- more than one server ----------------------------------------------------------------------


@pytest.mark.parametrize("link", ["backplane", "peer"])
async def test_each_server_keeps_its_own_streams(
    make_server: ServerFactory, open_client: ClientFactory, link: str
) -> None:
    """Without shared streams, another server's offsets are never taken for its own."""
    shared = {"backplane": "memory://history"} if link == "backplane" else {}
    b = await history_server(make_server, **shared)
    if link == "peer":
        a = await history_server(make_server, peers=[b.url])
        await eventually(lambda: a.peer_status()[0]["state"] == "up", "the peer link")
    else:
        a = await history_server(make_server, **shared)
    on_b = await open_client(b.url)
    ack_b = await on_b.request({"type": "subscribe", "topic": "chat.room1"})
    on_a = await open_client(a.url)
    ack_a = await on_a.publish("chat.room1", "hello")
    (got,) = await on_b.take(1)
    assert got["message"] == "hello"
    assert got["epoch"] == ack_b["epoch"] != ack_a["epoch"]  # each server its own epoch
    # On the server it came from, b's position recovers; on the other, never.
    again_b = await open_client(b.url)
    ok = await recover(again_b, "chat.room1", got["epoch"], 0)
    assert ok["recovered"] is True
    assert [d["message"] for d in await again_b.take(1)] == ["hello"]
    again_a = await open_client(a.url)
    refused = await recover(again_a, "chat.room1", got["epoch"], 0)
    assert refused["recovered"] is False
    assert refused["epoch"] == ack_a["epoch"]


async def test_recovering_a_held_subscription_again_stays_seamless(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await history_server(make_server, history=["big.*:5000"], max_outbound_buffer=64 * 1024)
    sub = await open_client(srv.url)
    ack = await sub.request({"type": "subscribe", "topic": "big.s"})
    pub = await open_client(srv.url)
    for _ in range(5000):
        await pub.send_json({"type": "publish", "topic": "big.s", "message": "z" * 100})
    assert offsets(await sub.take(5000, within=WAIT)) == list(range(1, 5001))
    reply = await recover(sub, "big.s", ack["epoch"], 0)  # paged: bigger than a page
    assert reply["recovered"] is True
    for _ in range(50):
        await pub.send_json({"type": "publish", "topic": "big.s", "message": "during"})
    got = await sub.take(5050, within=WAIT)
    assert offsets(got) == list(range(1, 5051))
    await pub.publish("big.s", "after")
    (after,) = await sub.take(1)
    assert after["offset"] == 5051


async def test_several_paged_replays_on_one_connection_take_turns(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Five big recoveries at once: they share the connection's bound instead of each
    queueing a page, so the client is not closed as a slow consumer."""
    srv = await history_server(make_server, history=["big.*:2000"], max_outbound_buffer=256 * 1024)
    pub = await open_client(srv.url)
    streams = [f"big.s{i}" for i in range(5)]
    epoch = (await pub.publish(streams[0], "x" * 100))["epoch"]
    for name in streams:
        for _ in range(2000 if name != streams[0] else 1999):
            await pub.send_json({"type": "publish", "topic": name, "message": "x" * 100})
    await pub.sync()
    # A client that reads nothing yet: what the server queues stays queued.
    sub = await RawClient.connect(srv.url, rcvbuf=4096)
    try:
        sub.pause_reading()
        for name in streams:
            await sub.send_json(
                {"type": "subscribe", "topic": name, "recover": {"epoch": epoch, "offset": 0}}
            )
        await eventually(lambda: srv.stats.recoveries_attempted == 5, "the five recoveries")
        sub.resume_reading()
        got = await sub.take(10_000, within=WAIT)
    finally:
        await sub.dispose()
    for name in streams:
        assert offsets([d for d in got if d["stream"] == name]) == list(range(1, 2001))
    assert srv.stats.slow_consumers == 0
    acks = sub.take_all(is_type("ack"))
    assert [a["recovered"] for a in acks] == [True] * 5
