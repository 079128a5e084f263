"""History streams in Redis: real ``dwsps serve`` processes on a real redis-server.

Every server of the group agrees on offsets (one Lua script assigns them and
publishes), a client recovers on any server, a subscriber that stays
connected across a Redis SIGKILL gets every offset once (repaired from the
persisted stream), and without persistence recovery says ``recovered: false``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tests.backplane.conftest import NO_HEARTBEAT, WAIT, RedisProcess, backplane_status
from tests.conftest import ClientFactory, ProcessFactory
from tests.procs import ServerProcess
from tests.support import eventually
from tests.wsclient import RawClient, is_delivery, reply_to

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
