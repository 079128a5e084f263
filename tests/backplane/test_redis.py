"""Real ``dwsps serve`` processes on a real redis-server.

Exactly-once checks use fences: after its messages each publisher publishes a
"fence" on the same topic; deliveries from one publisher reach a subscriber in
order, so once every fence is in, anything that was going to arrive (copies
included) has arrived.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
import redis.asyncio as aioredis
from tests.backplane.conftest import (
    NO_HEARTBEAT,
    WAIT,
    RedisProcess,
    backplane_status,
    numsub,
    wait_subscribed,
)
from tests.conftest import ClientFactory, PortFactory, ProcessFactory
from tests.procs import ServerProcess
from tests.support import eventually
from tests.wsclient import RawClient, get_json, http_get, is_delivery

pytestmark = pytest.mark.timeout(90)


def is_fence(m: dict[str, Any]) -> bool:
    return isinstance(m["message"], str) and m["message"].startswith("fence")


async def take_fences(client: RawClient, fences: int) -> list[dict[str, Any]]:
    """Deliveries until ``fences`` fence deliveries have come."""
    seen = 0

    def stop(m: dict[str, Any]) -> bool:
        nonlocal seen
        seen += is_fence(m)
        return seen == fences

    return await client.take_until(stop, within=WAIT)


async def test_three_servers_each_publish_everyone_receives_once(
    redis_url: str, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    procs = [await serve_process("--backplane", redis_url, *NO_HEARTBEAT) for _ in range(3)]
    subs = [await open_client(p.url) for p in procs]
    pubs = [await open_client(p.url) for p in procs]
    contexts = ["news", "news.uk", "*.uk"]
    for sub, proc in zip(subs, procs, strict=True):
        await sub.subscribe(*contexts)
        await wait_subscribed(proc.url, "news", "*")
    for i, pub in enumerate(pubs):
        await pub.publish("news.uk", {"from": i})
        await pub.publish("news.uk", f"fence{i}")
    for j, sub in enumerate(subs):
        got = await take_fences(sub, 3 * len(contexts))
        counts = collections.Counter(
            (str(m["message"]), m["context"]) for m in got if not is_fence(m)
        )
        assert counts == {(str({"from": i}), c): 1 for i in range(3) for c in contexts}
        for m in got:
            assert m["topic"] == "news.uk"
            assert "fromPeerServer" not in m
            sender = m["message"]["from"] if not is_fence(m) else int(m["message"][5:])
            # Marked exactly when it came from another server.
            assert m.get("viaBackplane", False) is (sender != j)
        assert sub.take_all(is_delivery()) == []


async def test_wildcard_and_prefix_across_servers(
    redis_url: str,
    serve_process: ProcessFactory,
    open_client: ClientFactory,
    redis_admin: aioredis.Redis,
) -> None:
    a, b, c = [await serve_process("--backplane", redis_url, *NO_HEARTBEAT) for _ in range(3)]
    on_b, on_c = await open_client(b.url), await open_client(c.url)
    # B has the pattern subscription and the "weather" channel: Redis sends
    # weather traffic to it twice (message and pmessage).
    await on_b.subscribe("*.uk.london", "weather.nowhere")
    await on_c.subscribe("weather")
    await wait_subscribed(b.url, "*", "weather")
    await wait_subscribed(c.url, "weather")
    pub = await open_client(a.url)
    for topic in ("news.uk.london", "sport.uk.london", "news.fr.paris", "weather.uk.london"):
        await pub.publish(topic, topic)
    await pub.publish("weather.fence", "fence")
    await pub.publish("zz.uk.london", "fence")
    got_b = await take_fences(on_b, 1)
    assert [(m["message"], m["context"]) for m in got_b] == [
        ("news.uk.london", "*.uk.london"),
        ("sport.uk.london", "*.uk.london"),
        ("weather.uk.london", "*.uk.london"),
        ("fence", "*.uk.london"),
    ]
    got_c = await take_fences(on_c, 1)
    assert [m["message"] for m in got_c] == ["weather.uk.london", "fence"]
    assert await numsub(redis_admin, "weather") == 2
    # B takes each of the 6 publishes once, the weather ones included.
    status_b = await backplane_status(b.url)
    assert status_b["received"] == 6
    assert status_b["duplicates"] == 0


async def test_no_interest_no_traffic(
    redis_url: str,
    serve_process: ProcessFactory,
    open_client: ClientFactory,
    redis_admin: aioredis.Redis,
) -> None:
    a, b, c = [await serve_process("--backplane", redis_url, *NO_HEARTBEAT) for _ in range(3)]
    on_b, on_c = await open_client(b.url), await open_client(c.url)
    await on_b.subscribe("sport.football")
    await on_c.subscribe("news")
    await wait_subscribed(b.url, "sport")
    await wait_subscribed(c.url, "news")
    assert await numsub(redis_admin, "sport") == 1  # B only
    pub = await open_client(a.url)
    for i in range(20):
        await pub.publish("sport.football", i)
    await pub.publish("news", "fence")
    assert len(await on_b.take(20, within=WAIT)) == 20
    await take_fences(on_c, 1)
    status_c = await backplane_status(c.url)
    assert status_c["received"] == 1  # the news fence, no sport traffic
    channels = {ch.decode() for ch in await redis_admin.pubsub_channels("dwsps:*")}
    assert channels == {"dwsps:sport", "dwsps:news"}
    # The last subscriber goes: the upstream subscription goes too.
    await on_b.close()
    await eventually(
        lambda: _numsub_is(redis_admin, "sport", 0), "B to unsubscribe upstream from sport"
    )


async def _numsub_is(admin: aioredis.Redis, key: str, n: int) -> bool:
    return await numsub(admin, key) == n


async def _knows(url: str, n: int) -> bool:
    return len((await backplane_status(url))["servers"]) == n


async def _outbox_empty(url: str) -> bool:
    return (await backplane_status(url))["outbox"] == 0


async def _state_is(url: str, state: str) -> bool:
    return (await backplane_status(url))["state"] == state


async def test_redis_killed_and_restarted_while_publishing(
    redis_proc: RedisProcess, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    procs = [await serve_process("--backplane", redis_proc.url, *NO_HEARTBEAT) for _ in range(3)]
    a = procs[0]
    subs = [await open_client(p.url) for p in procs[1:]]
    for sub, proc in zip(subs, procs[1:], strict=True):
        await sub.subscribe("load")
        await wait_subscribed(proc.url, "load")
    # A resyncs with the servers it knows (presence is refreshed every second).
    await eventually(lambda: _knows(a.url, 3), "A to see all three servers")
    pub = await open_client(a.url)
    total, kill_at, restart_at = 300, 100, 200
    for i in range(1, total + 1):
        await pub.publish("load.x", i)
        if i == kill_at:
            await redis_proc.kill()
            await eventually(lambda: _state_is(a.url, "down"), "A to notice Redis is gone")
        elif i == restart_at:
            status = await backplane_status(a.url)
            assert status["outbox"] > 0  # publishes made meanwhile are waiting
            await redis_proc.start()
    # Redis pub/sub is at-most-once: a message Redis had accepted but not yet
    # written to a subscriber's socket dies with it. The promise is that such
    # a loss is never silent: every message either arrives (once, in order)
    # or is counted in the receiving server's `gaps`.
    received: dict[str, list[int]] = {}
    for sub, proc in zip(subs, procs[1:], strict=True):
        got = received[proc.url] = []

        async def settled(
            sub: RawClient = sub, proc: ServerProcess = proc, got: list[int] = got
        ) -> bool:
            got.extend(m["message"] for m in sub.take_all(is_delivery()))
            gaps = (await backplane_status(proc.url))["gaps"]
            return len(got) + int(gaps) >= total

        await eventually(settled, f"all of {total} delivered or counted on {proc.url}", 30)
        assert got == sorted(set(got)), "no duplicates, in order"
        assert set(got) <= set(range(1, total + 1))
    for proc in procs:
        await eventually(lambda p=proc: _state_is(p.url, "up"), f"{proc.url} to be up")
        status = await backplane_status(proc.url)
        assert status["dropped"] == 0
        missed = total - len(received[proc.url]) if proc.url in received else 0
        assert status["gaps"] == missed
        assert missed <= 5, "only what Redis held at the kill may be lost"
        assert status["sessions"] >= 2
        assert "backplane" in proc.log()
        assert "down" in proc.log()
    for sub in subs:
        assert sub.take_all(is_delivery()) == []


async def test_outbox_overflow_is_counted(
    redis_proc: RedisProcess,
    serve_process: ProcessFactory,
    open_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = await serve_process("--backplane", redis_proc.url, *NO_HEARTBEAT)
    monkeypatch.setenv("DWSPS_BACKPLANE_BUFFER_MESSAGES", "5")
    a = await serve_process("--backplane", redis_proc.url, *NO_HEARTBEAT)
    on_b = await open_client(b.url)
    await on_b.subscribe("load")
    await wait_subscribed(b.url, "load")
    await eventually(lambda: _knows(a.url, 2), "A to see B")
    pub = await open_client(a.url)
    await pub.publish("load", 0)
    assert [m["message"] for m in await on_b.take(1, within=WAIT)] == [0]
    await redis_proc.kill()
    await eventually(lambda: _state_is(a.url, "down"), "A to notice Redis is gone")
    for i in range(1, 21):
        await pub.publish("load", i)
    await redis_proc.start()
    await eventually(lambda: _state_is(a.url, "up"), "A to reconnect")
    await eventually(lambda: _outbox_empty(a.url), "A to send what it kept")
    await pub.publish("load", "fence")
    got = await take_fences(on_b, 1)
    assert [m["message"] for m in got] == [16, 17, 18, 19, 20, "fence"]
    assert (await backplane_status(a.url))["dropped"] == 15
    assert (await backplane_status(b.url))["gaps"] == 15
    assert "outbox full" in a.log()


async def test_redis_down_at_start(
    serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    redis_proc = RedisProcess()  # not started yet
    try:
        a = await serve_process("--backplane", redis_proc.url, *NO_HEARTBEAT)
        code, health = await get_json(a.url, "/health")
        assert code == 503, "degraded answers 503 (PROTOCOL: HTTP endpoints)"
        assert health["status"] == "degraded"
        assert health["backplane"]["state"] == "down"
        assert health["backplane"]["healthy"] is False
        code, _ = await get_json(a.url, "/health/backplane")
        assert code == 503
        # It serves clients meanwhile (locally).
        local = await open_client(a.url)
        await local.subscribe("news")
        await local.publish("news", "local")
        assert [m["message"] for m in await local.take(1, within=WAIT)] == ["local"]
        await redis_proc.start()
        await eventually(lambda: _state_is(a.url, "up"), "A to connect once Redis is there")
        code, health = await get_json(a.url, "/health")
        assert code == 200
        assert health["status"] == "ok"
        code, _ = await get_json(a.url, "/health/backplane")
        assert code == 200
        b = await serve_process("--backplane", redis_proc.url, *NO_HEARTBEAT)
        await wait_subscribed(a.url, "news")
        await (await open_client(b.url)).publish("news", "remote")
        (got,) = await local.take(1, within=WAIT)
        assert got["message"] == "remote"
        assert got["viaBackplane"] is True
        assert "backplane" in a.log()
        assert "down" in a.log()
    finally:
        await redis_proc.stop()


async def test_peering_and_backplane_together_no_duplicates(
    redis_url: str,
    serve_process: ProcessFactory,
    open_client: ClientFactory,
    reserve_port: PortFactory,
) -> None:
    pa, pb = reserve_port(), reserve_port()
    a = await serve_process("--backplane", redis_url, "--peer", pb.url, *NO_HEARTBEAT, port=pa.port)
    b = await serve_process("--backplane", redis_url, "--peer", pa.url, *NO_HEARTBEAT, port=pb.port)
    c = await serve_process("--backplane", redis_url, *NO_HEARTBEAT)  # backplane only
    procs = [a, b, c]
    subs = [await open_client(p.url) for p in procs]
    for sub, proc in zip(subs, procs, strict=True):
        await sub.subscribe("news")
        await wait_subscribed(proc.url, "news")
    pubs = [await open_client(p.url) for p in (a, b)]
    # The peer links may still be connecting: publishes wait in their outboxes.
    for i, pub in enumerate(pubs):
        for n in range(10):
            await pub.publish("news", f"{i}-{n}")
        await pub.publish("news", f"fence{i}")
    for sub in subs:
        got = await take_fences(sub, 2)
        counts = collections.Counter(m["message"] for m in got)
        assert counts == {f"{i}-{n}": 1 for i in range(2) for n in range(10)} | {
            "fence0": 1,
            "fence1": 1,
        }
    dropped = 0
    for proc in procs:
        _, health = await get_json(proc.url, "/health")
        dropped += health["stats"]["duplicates_dropped"]
    assert dropped > 0  # both paths carried copies; the copies were dropped
    for sub in subs:
        assert sub.take_all(is_delivery()) == []


async def test_backplane_credentials_never_appear_in_health_or_logs(
    redis_proc: RedisProcess,
    redis_admin: aioredis.Redis,
    serve_process: ProcessFactory,
    open_client: ClientFactory,
) -> None:
    # A Redis user with a password: the URL carries credentials, as a managed Redis needs.
    await redis_admin.execute_command(
        "ACL", "SETUSER", "dwsps", "on", ">pw-s3cret-9", "~*", "&*", "+@all"
    )
    good = f"redis://dwsps:pw-s3cret-9@127.0.0.1:{redis_proc.port}/0"
    wrong = f"redis://dwsps:wrong-pw-7@127.0.0.1:{redis_proc.port}/0"
    a = await serve_process("--backplane", good, *NO_HEARTBEAT, "--log-level", "debug")
    b = await serve_process("--backplane", wrong, *NO_HEARTBEAT, "--log-level", "debug")
    await eventually(lambda: _state_is(a.url, "up"), "A to log in to Redis")
    clients = await redis_admin.execute_command("CLIENT", "LIST")
    assert b"user=dwsps" in (clients if isinstance(clients, bytes) else str(clients).encode())
    sub = await open_client(a.url)
    await sub.subscribe("news")
    await wait_subscribed(a.url, "news")
    await (await open_client(a.url)).publish("news", "hi")
    assert [m["message"] for m in await sub.take(1, within=WAIT)] == ["hi"]

    code, _ = await get_json(b.url, "/health")
    assert code == 503  # the wrong password leaves B degraded
    for proc, password in ((a, "pw-s3cret-9"), (b, "wrong-pw-7")):
        for path in ("/health", "/health/backplane", "/metrics"):
            _, body = await http_get(proc.url, path)
            assert password.encode() not in body, (path, body[:300])
        assert "dwsps:***@" in str((await get_json(proc.url, "/health"))[1]["backplane"])
    await proc_stopped_logs_clean(a, "pw-s3cret-9")
    await proc_stopped_logs_clean(b, "wrong-pw-7")


async def proc_stopped_logs_clean(proc: ServerProcess, password: str) -> None:
    """Everything the process logged, shutdown included, is free of ``password``."""
    await proc.stop()
    assert proc.log(), "the server logged nothing at debug level"
    assert password not in proc.log()
