"""History streams in Redis: real ``dwsps serve`` processes on a real redis-server.

Every server of the group agrees on offsets (one Lua script assigns them and
publishes), a client recovers on any server, a subscriber that stays
connected across a Redis SIGKILL gets every offset once (repaired from the
persisted stream), and without persistence recovery says ``recovered: false``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from tests.backplane.conftest import NO_HEARTBEAT, WAIT, RedisProcess, backplane_status
from tests.conftest import ClientFactory, ProcessFactory, ServerFactory
from tests.procs import ServerProcess
from tests.support import eventually
from tests.test_history_server import (
    as_alice,
    cut_off_replay,
    metric_values,
    narrow_subscription_keeps_up,
    recovery_counts,
)
from tests.wsclient import RawClient, get_json, http_get, http_request, is_delivery, reply_to

from dwsps.auth import Identity, UpgradeRequest
from dwsps.permissions import Permissions

pytestmark = pytest.mark.timeout(90)

HISTORY = ("--history", "chat.*:100000:10m")


async def history_servers(
    serve_process: ProcessFactory, url: str, n: int, *extra: str
) -> list[ServerProcess]:
    return [
        await serve_process("--backplane", url, *HISTORY, *NO_HEARTBEAT, *extra) for _ in range(n)
    ]


async def subscribe(client: RawClient, topic: str, **extra: Any) -> dict[str, Any]:
    reply: dict[str, Any] = await client.request(
        {"type": "subscribe", "topic": topic, **extra}, within=WAIT
    )
    assert reply["type"] == "ack", reply
    return reply


async def history(client: RawClient, **request: Any) -> dict[str, Any]:
    req_id = await client.send_request({"type": "history", **request})
    reply: dict[str, Any] = await client.next_message(
        lambda m: isinstance(m, dict) and m.get("id") == req_id, within=WAIT
    )
    return reply


async def offsets_until(client: RawClient, last: int, within: float = WAIT) -> list[int]:
    got = await client.take_until(lambda m: m["offset"] >= last, within=within)
    return [m["offset"] for m in got]


async def test_three_servers_agree_on_gap_free_offsets(
    redis_url: str, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    procs = await history_servers(serve_process, redis_url, 3)
    subs = [await open_client(p.url) for p in procs]
    acks = [await subscribe(s, "chat.room") for s in subs]
    assert len({a["epoch"] for a in acks}) == 1  # one stream, one epoch, from Redis
    assert {a["offset"] for a in acks} == {0}
    pubs = [await open_client(p.url) for p in procs]
    per = 30
    # Interleaved from the three servers, acks not awaited one by one.
    ids = []
    for i in range(per):
        for j, pub in enumerate(pubs):
            ids.append(
                (
                    j,
                    await pub.send_request(
                        {"type": "publish", "topic": "chat.room", "message": [j, i]}
                    ),
                )
            )
    ack_offsets = []
    for j, req_id in ids:
        ack = await pubs[j].next_message(reply_to(req_id), within=WAIT)
        assert ack["type"] == "ack", ack
        assert ack["stream"] == "chat.room"
        assert ack["epoch"] == acks[0]["epoch"]
        ack_offsets.append(ack["offset"])
    total = 3 * per
    assert sorted(ack_offsets) == list(range(1, total + 1))
    seen = []
    for sub in subs:
        got = await sub.take(total, within=WAIT)
        assert [m["offset"] for m in got] == list(range(1, total + 1))
        assert {m["epoch"] for m in got} == {acks[0]["epoch"]}
        seen.append([tuple(m["message"]) for m in got])
    assert seen[0] == seen[1] == seen[2]  # the same publication at every offset
    for j, pub in enumerate(pubs):
        # a publisher's own publications arrive in its order
        mine = [m for m in seen[0] if m[0] == j]
        assert mine == [(j, i) for i in range(per)]
        await pub.sync()
    for sub in subs:
        await sub.sync()
        assert sub.take_all(is_delivery()) == []
    statuses = [await backplane_status(p.url) for p in procs]
    assert [s["gaps"] for s in statuses] == [0, 0, 0]


async def publish_stream(client: RawClient, topic: str, n: int, start: int = 1) -> list[Any]:
    """Publish ``n`` messages as fast as the socket takes them; return every reply, in order."""
    ids = [
        await client.send_request({"type": "publish", "topic": topic, "message": i})
        for i in range(start, start + n)
    ]
    return [await client.next_message(reply_to(i), within=WAIT) for i in ids]


async def test_recover_on_another_server_while_a_publisher_streams(
    redis_url: str, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    a, b, c = await history_servers(serve_process, redis_url, 3)
    sub = await open_client(a.url)
    ack = await subscribe(sub, "chat.room")
    epoch = ack["epoch"]
    pub = await open_client(c.url)
    total = 3000
    streaming = asyncio.create_task(publish_stream(pub, "chat.room", total))
    got = await sub.take_until(lambda m: m["offset"] >= 200, within=WAIT)
    assert [m["offset"] for m in got] == list(range(1, len(got) + 1))
    last = got[-1]["offset"]
    sub.abort()  # gone without a goodbye, mid-stream
    again = await open_client(b.url)
    ack = await subscribe(again, "chat.room", recover={"epoch": epoch, "offset": last})
    assert ack["recovered"] is True
    assert ack["epoch"] == epoch
    assert ack["offset"] >= last
    rest = await again.take(total - last, within=WAIT)
    assert [m["offset"] for m in rest] == list(range(last + 1, total + 1))
    assert [m["message"] for m in rest] == list(range(last + 1, total + 1))
    replayed = [m["offset"] for m in rest if m.get("recovered")]
    assert replayed == list(range(last + 1, last + 1 + len(replayed)))  # replay, then live
    assert replayed
    assert replayed[-1] >= ack["offset"]
    replies = await streaming
    assert [r["offset"] for r in replies] == list(range(1, total + 1))
    await again.sync()
    assert again.take_all(is_delivery()) == []


async def test_recover_on_another_server_after_a_quiet_disconnect(
    redis_url: str, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    a, b = await history_servers(serve_process, redis_url, 2)
    sub = await open_client(a.url)
    ack = await subscribe(sub, "chat.room.typing")  # a subtopic: position of its stream
    assert (ack["stream"], ack["offset"]) == ("chat.room", 0)
    await sub.close()
    pub = await open_client(b.url)
    for i in range(1, 11):
        await pub.publish("chat.room.typing" if i % 2 else "chat.room", i)
    again = await open_client(b.url)
    ack2 = await subscribe(again, "chat.room.typing", recover={"epoch": ack["epoch"], "offset": 0})
    assert (ack2["recovered"], ack2["offset"]) == (True, 10)
    got = await again.take(5, within=WAIT)
    assert [m["message"] for m in got] == [1, 3, 5, 7, 9]
    assert all(m["recovered"] is True for m in got)
    # The history request reads Redis too, on any server.
    reply = await history(again, topic="chat.room", limit=3)
    assert [p["offset"] for p in reply["publications"]] == [8, 9, 10]
    assert reply["epoch"] == ack["epoch"]
    wrong = await subscribe(again, "chat.room", recover={"epoch": "nope", "offset": 3})
    assert (wrong["recovered"], wrong["epoch"], wrong["offset"]) == (False, ack["epoch"], 10)
    await again.sync()
    assert [m for m in again.take_all(is_delivery())] == []


async def test_acks_keep_request_order_and_carry_the_redis_offset(
    redis_url: str, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    (a,) = await history_servers(serve_process, redis_url, 1)
    client = await open_client(a.url)
    await subscribe(client, "chat.x")
    requests = []
    for i in range(40):
        topic = "chat.x" if i % 3 else "news.x"  # history, and not
        requests.append(
            await client.send_request({"type": "publish", "topic": topic, "message": i})
        )
    requests.append(await client.send_request({"type": "unsubscribe", "topic": "none"}))
    order = []
    while len(order) < len(requests):
        m = await client.next_message(lambda m: m.get("type") in ("ack", "error"), within=WAIT)
        order.append(m)
    assert [m["id"] for m in order] == requests
    kept = [m for m in order[:-1] if m["topic"] == "chat.x"]
    assert [m["offset"] for m in kept] == list(range(1, len(kept) + 1))
    assert all("offset" not in m for m in order[:-1] if m["topic"] == "news.x")


async def test_redis_down_a_history_publish_gets_its_error_within_the_bound(
    redis_proc: RedisProcess, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    (a,) = await history_servers(serve_process, redis_proc.url, 1, "--history-publish-timeout", "1")
    client = await open_client(a.url)
    ok = await client.publish("chat.x", 1)
    assert ok["offset"] == 1
    await redis_proc.kill()

    await backplane_down(a)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = await client.send_request({"type": "publish", "topic": "chat.x", "message": 2})
    plain = await client.send_request({"type": "publish", "topic": "news.x", "message": 3})
    err = await client.next_message(reply_to(first), within=WAIT)
    took = loop.time() - started
    assert err["type"] == "error"
    assert err["error"] == "overloaded"
    assert "did not confirm" in err["detail"]
    assert 0.9 <= took < 1 + WAIT / 2
    ack = await client.next_message(reply_to(plain), within=WAIT)
    assert ack["type"] == "ack"  # after the error: request order
    hist = await history(client, topic="chat.x", limit=5)
    assert hist["type"] == "error"
    assert hist["error"] == "overloaded"


async def backplane_down(server: ServerProcess) -> None:
    """Wait until ``server`` reports its backplane down (Redis killed)."""

    async def down() -> bool:
        return (await backplane_status(server.url))["state"] == "down"

    await eventually(down, "the server to see Redis gone", WAIT)


async def kill_and_restart_mid_stream(
    redis: RedisProcess, a: ServerProcess, pub: RawClient, total: int
) -> list[Any]:
    """Publish 1..total on ``a``: Redis SIGKILLed after a third, restarted after two thirds."""
    third = total // 3
    replies = await publish_stream(pub, "chat.room", third)
    await redis.kill()

    await backplane_down(a)
    waiting = [
        await pub.send_request({"type": "publish", "topic": "chat.room", "message": i})
        for i in range(third + 1, 2 * third + 1)
    ]
    await redis.start()
    replies += [await pub.next_message(reply_to(i), within=WAIT) for i in waiting]
    replies += await publish_stream(pub, "chat.room", total - 2 * third, 2 * third + 1)
    return replies


async def test_redis_killed_with_persistence_a_connected_subscriber_misses_nothing(
    tmp_path: Any, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    redis = RedisProcess(
        args=("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))
    )
    await redis.start()
    try:
        a, b, c = await history_servers(
            serve_process, redis.url, 3, "--history-publish-timeout", "30"
        )
        subs = [await open_client(p.url) for p in (b, c)]
        acks = [await subscribe(s, "chat.room") for s in subs]
        epoch = acks[0]["epoch"]
        pub = await open_client(a.url)
        total = 300
        replies = await kill_and_restart_mid_stream(redis, a, pub, total)
        assert [r["type"] for r in replies] == ["ack"] * total
        assert {r["epoch"] for r in replies} == {epoch}  # Redis kept the stream: same epoch
        assert sorted(r["offset"] for r in replies) == list(range(1, total + 1))
        for sub, proc in zip(subs, (b, c), strict=True):
            got = await sub.take(total, within=WAIT)
            assert [m["offset"] for m in got] == list(range(1, total + 1))
            assert [m["message"] for m in got] == list(range(1, total + 1))
            await sub.sync()
            assert sub.take_all(is_delivery()) == []
            status = await backplane_status(proc.url)
            assert status["gaps"] == 0
            assert status["sessions"] >= 2
        # A client that was away recovers across the restart, on any server.
        late = await open_client(c.url)
        ack = await subscribe(late, "chat.room", recover={"epoch": epoch, "offset": 10})
        assert (ack["recovered"], ack["offset"]) == (True, total)
        assert [m["offset"] for m in await late.take(total - 10)] == list(range(11, total + 1))
    finally:
        await redis.stop()


async def test_redis_killed_without_persistence_recovery_says_false(
    redis_proc: RedisProcess, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    a, b = await history_servers(
        serve_process, redis_proc.url, 2, "--history-publish-timeout", "30"
    )
    sub = await open_client(b.url)
    epoch = (await subscribe(sub, "chat.room"))["epoch"]
    pub = await open_client(a.url)
    total = 90
    replies = await kill_and_restart_mid_stream(redis_proc, a, pub, total)
    assert [r["type"] for r in replies] == ["ack"] * total
    before = [r for r in replies[:30]]
    after = [r for r in replies[30:]]
    assert {r["epoch"] for r in before} == {epoch}
    (fresh,) = {r["epoch"] for r in after}  # Redis lost the stream: one new epoch
    assert fresh != epoch
    assert [r["offset"] for r in after] == list(range(1, 61))
    # The subscriber that stayed sees the old epoch, then the new one from its offset 1.
    got = await sub.take(total, within=WAIT)
    assert [(m["epoch"], m["offset"]) for m in got] == [(epoch, i) for i in range(1, 31)] + [
        (fresh, i) for i in range(1, 61)
    ]
    # A position in the lost epoch is honestly not recovered.
    again = await open_client(a.url)
    ack = await subscribe(again, "chat.room", recover={"epoch": epoch, "offset": 20})
    assert (ack["recovered"], ack["epoch"], ack["offset"]) == (False, fresh, 60)
    await again.sync()
    assert again.take_all(is_delivery()) == []


async def test_a_subscriber_whose_redis_connection_drops_is_repaired_from_the_stream(
    redis_url: str,
    serve_process: ProcessFactory,
    open_client: ClientFactory,
    redis_admin: Any,
) -> None:
    a, b = await history_servers(serve_process, redis_url, 2)
    sub = await open_client(b.url)
    await subscribe(sub, "chat.room")
    pub = await open_client(a.url)
    await publish_stream(pub, "chat.room", 50)
    assert [m["offset"] for m in await sub.take(50)] == list(range(1, 51))
    _, health = await get_json(b.url, "/health")
    # Drop only B's subscribe connection: A goes on publishing, B misses some live.
    clients = await redis_admin.client_list(_type="pubsub")
    (victim,) = [c for c in clients if c["name"] == f"dwsps-{health['server_id']}"]
    streaming = asyncio.create_task(publish_stream(pub, "chat.room", 450, 51))
    await redis_admin.client_kill_filter(_id=victim["id"])
    replies = await streaming
    assert [r["offset"] for r in replies] == list(range(51, 501))
    got = await sub.take(450, within=WAIT)
    assert [m["offset"] for m in got] == list(range(51, 501))
    await sub.sync()
    assert sub.take_all(is_delivery()) == []
    status = await backplane_status(b.url)
    assert status["gaps"] == 0
    assert status["sessions"] >= 2


async def test_recovery_counters_event_and_replay_count_through_redis(
    redis_url: str, make_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Shared history counts as the memory path does: ok, failed, cut off, replayed."""
    srv = await make_server(
        backplane=redis_url,
        history=["chat.*:100000"],
        heartbeat_interval=0,
        authenticate=as_alice,
    )
    events: list[tuple[Any, ...]] = []
    srv.on("recovery", lambda *args: events.append(args))
    pub = await open_client(srv.url)
    epoch = (await pub.publish("chat.a", 1))["epoch"]
    await publish_stream(pub, "chat.a", 2, 2)
    # A subtopic's share of 2500 entries: counted for the ack across the pages.
    n_epoch = (await pub.publish("chat.n.typing", 0))["epoch"]  # each stream its own epoch
    for i in range(1, 2500):
        topic = "chat.n.typing" if i % 10 == 0 else "chat.n.msgs"
        await pub.send_json({"type": "publish", "topic": topic, "message": i})
    await pub.sync()
    sub = await open_client(srv.url)
    ok = await subscribe(sub, "chat.a", recover={"epoch": epoch, "offset": 0})
    assert (ok["recovered"], ok["replay"], ok["offset"]) == (True, 3, 3)
    assert [m["message"] for m in await sub.take(3, within=WAIT)] == [1, 2, 3]
    narrow = await subscribe(sub, "chat.n.typing", recover={"epoch": n_epoch, "offset": 0})
    assert (narrow["recovered"], narrow["replay"], narrow["offset"]) == (True, 250, 2500)
    replayed = await sub.take(250, within=WAIT)
    assert [m["message"] for m in replayed] == list(range(0, 2500, 10))
    lost = await subscribe(sub, "chat.b", recover={"epoch": "not-the-epoch", "offset": 0})
    assert lost["recovered"] is False
    (sub_id,) = [cid for cid, c in srv.connections.items() if srv.hub.router.subscriptions(c)]
    await eventually(lambda: srv.stats.recoveries_ok == 2, "both replays to finish")
    # Paged by the engine's reads this time.
    stalled_id = await cut_off_replay(srv, pub, "chat.big", 6000, 4, WAIT)
    assert events[:3] == [
        ("chat.a", sub_id, "alice", True, 3),
        ("chat.n.typing", sub_id, "alice", True, 250),
        ("chat.b", sub_id, "alice", False, 0),
    ]
    cut = events[3]
    assert cut[:4] == ("chat.big", stalled_id, "alice", False)
    assert 0 < cut[4] < 6000
    assert recovery_counts(srv) == (4, 2, 1, 1, 253 + cut[4])
    _, body = await http_get(srv.url, "/metrics")
    metrics = metric_values(body)
    assert metrics["dwsps_history_recoveries_attempted_total"] == 4
    assert metrics["dwsps_history_recoveries_cut_off_total"] == 1


async def test_a_narrow_subscription_recovers_after_siblings_trimmed_its_position(
    redis_url: str, make_server: ServerFactory, open_client: ClientFactory
) -> None:
    gate = asyncio.Event()
    gate.set()

    async def gated(request: UpgradeRequest) -> Identity:
        await gate.wait()
        return Identity(None, Permissions.EVERYTHING)

    srv = await make_server(
        backplane=redis_url, history=["chat.*:200"], heartbeat_interval=0, authenticate=gated
    )
    await narrow_subscription_keeps_up(srv, open_client, gate)


KEY = "api-key-for-redis-tests"


async def api_publish(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    """``POST /api/publish`` with the API key: (status, JSON answer)."""
    status, _, data = await http_request(
        url, "POST", "/api/publish", orjson.dumps(body), {"Authorization": f"Bearer {KEY}"}
    )
    return status, orjson.loads(data)


async def test_an_http_publish_answers_after_redis_with_the_offset(
    redis_url: str, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    a, b = await history_servers(serve_process, redis_url, 2, "--api-key", KEY)
    sub = await open_client(b.url)
    epoch = (await subscribe(sub, "chat.x"))["epoch"]
    status, doc = await api_publish(a.url, {"topic": "chat.x", "message": "one"})
    # Delivered when Redis hands it back (to every server), so none at once here.
    assert (status, doc) == (
        200,
        {"deliveries": 0, "stream": "chat.x", "offset": 1, "epoch": epoch},
    )
    client = await open_client(a.url)
    assert (await client.publish("chat.x", "two"))["offset"] == 2
    batch = [
        {"topic": "chat.x", "message": "three"},
        {"topic": "news.x", "message": "plain"},
        {"topic": "chat.x", "message": "four"},
    ]
    status, doc = await api_publish(a.url, batch)
    assert (status, doc) == (200, {"published": 3, "deliveries": 0})
    got = await sub.take(4, within=WAIT)
    assert [(m["message"], m["offset"], m["epoch"]) for m in got] == [
        ("one", 1, epoch),
        ("two", 2, epoch),
        ("three", 3, epoch),
        ("four", 4, epoch),
    ]


async def test_redis_down_an_http_publish_gets_503_within_the_bound(
    redis_proc: RedisProcess, serve_process: ProcessFactory
) -> None:
    (a,) = await history_servers(
        serve_process, redis_proc.url, 1, "--api-key", KEY, "--history-publish-timeout", "1"
    )
    status, doc = await api_publish(a.url, {"topic": "chat.x", "message": 1})
    assert (status, doc["offset"]) == (200, 1)
    await redis_proc.kill()

    await backplane_down(a)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, doc = await api_publish(a.url, {"topic": "chat.x", "message": 2})
    took = loop.time() - started
    assert status == 503
    assert doc["error"] == "overloaded"
    assert "did not confirm" in doc["detail"]
    assert "index" not in doc
    assert 0.9 <= took < 1 + WAIT / 2
    # A batch: the publish that was not confirmed is named; a plain topic is no obstacle.
    status, doc = await api_publish(
        a.url, [{"topic": "news.x", "message": 3}, {"topic": "chat.x", "message": 4}]
    )
    assert status == 503
    assert (doc["error"], doc["index"]) == ("overloaded", 1)
    # Topics without history are not held up by Redis.
    status, doc = await api_publish(a.url, {"topic": "news.x", "message": 5})
    assert (status, doc) == (200, {"deliveries": 0})
