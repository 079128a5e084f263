"""Peering between real ``dwsps serve`` processes (PROTOCOL.md, Peering)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import ClientFactory, PortFactory, ProcessFactory
from tests.peering.conftest import ProxyFactory
from tests.peering.helpers import WAIT, wait_health
from tests.support import PortReservation, eventually, scaled
from tests.wsclient import RawClient, health, reply_to

pytestmark = pytest.mark.timeout(scaled(90))


def link(doc: dict[str, Any], url: str | None = None) -> dict[str, Any]:
    """The one (or the named) peer link in a /health document."""
    peers = doc["peers"]
    if url is None:
        assert len(peers) == 1, peers
        return dict(peers[0])
    return next(dict(p) for p in peers if p["url"] == url)


async def flush_marker(pub: RawClient, subs: list[RawClient], marker: str) -> None:
    """Publish ``marker`` and wait until every subscriber has it.

    Deliveries from one publisher keep their order over a link, so once the
    marker is in, anything published before it has arrived too.
    """
    ack = await pub.publish("mark", marker)
    assert ack["type"] == "ack", ack
    for sub in subs:
        await sub.wait_for(lambda s=sub: marker in s.messages("mark"), within=WAIT, what=marker)


@pytest.mark.parametrize("first", ["a", "b"])
async def test_two_servers_peered_both_ways_start_in_either_order(
    first: str,
    serve_process: ProcessFactory,
    open_client: ClientFactory,
    reserve_port: PortFactory,
) -> None:
    pa: PortReservation = reserve_port()
    pb: PortReservation = reserve_port()
    args = {"a": ("--peer", pb.url), "b": ("--peer", pa.url)}
    port = {"a": pa.port, "b": pb.port}
    second = "b" if first == "a" else "a"
    procs = {first: await serve_process(*args[first], port=port[first])}
    # The first server runs with its peer down: its link keeps retrying.
    doc = await wait_health(
        procs[first].url,
        lambda d: link(d)["connects"] == 0 and link(d)["last_error"] != "",
        what="a failed connect attempt",
    )
    assert link(doc)["state"] in ("connecting", "down")
    procs[second] = await serve_process(*args[second], port=port[second])

    a_sub = await open_client(procs["a"].url)
    b_sub = await open_client(procs["b"].url)
    for sub in (a_sub, b_sub):
        await sub.subscribe("news")
        await sub.subscribe("mark")
    a_pub = await open_client(procs["a"].url)
    b_pub = await open_client(procs["b"].url)
    await a_pub.publish("news.uk", {"from": "a"})
    await b_pub.publish("news.fr", {"from": "b"})
    await flush_marker(a_pub, [a_sub, b_sub], "a-done")
    await flush_marker(b_pub, [a_sub, b_sub], "b-done")

    for sub, own in ((a_sub, "a"), (b_sub, "b")):
        news = [d for d in sub.deliveries if d["context"] == "news"]
        assert sorted(d["message"]["from"] for d in news) == ["a", "b"], news
        for d in news:
            assert d.get("fromPeerServer") is (True if d["message"]["from"] != own else None)
    for name in ("a", "b"):
        state = link(await health(procs[name].url))
        assert state["state"] == "up"
        assert state["connects"] >= 1
        assert state["sent"] == state["confirmed"] == 2


async def test_full_mesh_of_four_delivers_everything_once_everywhere(
    serve_process: ProcessFactory, open_client: ClientFactory, reserve_port: PortFactory
) -> None:
    ports = [reserve_port() for _ in range(4)]
    procs = await asyncio.gather(
        *(
            serve_process(*[a for o in ports if o is not p for a in ("--peer", o.url)], port=p.port)
            for p in ports
        )
    )
    subs = [await open_client(p.url) for p in procs]
    pubs = [await open_client(p.url) for p in procs]
    for sub in subs:
        await sub.subscribe("mesh")
        await sub.subscribe("mark")
    for i, pub in enumerate(pubs):
        for n in range(5):
            ack = await pub.publish(f"mesh.s{i}", {"server": i, "n": n})
            assert ack["type"] == "ack"
    for i, pub in enumerate(pubs):
        await flush_marker(pub, subs, f"end-{i}")

    for j, sub in enumerate(subs):
        got = [d for d in sub.deliveries if d["topic"].startswith("mesh.")]
        seen = sorted((d["message"]["server"], d["message"]["n"]) for d in got)
        assert seen == [(i, n) for i in range(4) for n in range(5)], f"server {j}: {seen}"
        for d in got:
            from_peer = d["message"]["server"] != j
            assert d.get("fromPeerServer") is (True if from_peer else None), (j, d)
        # Per publisher, in publish order.
        for i in range(4):
            assert [d["message"]["n"] for d in got if d["message"]["server"] == i] == list(range(5))
    for p in procs:
        doc = await health(p.url)
        assert len(doc["peers"]) == 3
        assert doc["stats"]["duplicates_dropped"] == 0
        for state in doc["peers"]:
            assert state["confirmed"] == state["sent"] == 6, state
            assert state["outbox"] == 0


async def test_one_way_peering_forwards_one_way_only(
    serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    b = await serve_process()
    a = await serve_process("--peer", b.url)
    a_sub, b_sub = await open_client(a.url), await open_client(b.url)
    for sub in (a_sub, b_sub):
        await sub.subscribe("t")
    b_pub, a_pub = await open_client(b.url), await open_client(a.url)
    await b_pub.publish("t", "from-b")
    await a_pub.publish("t", "from-a")
    await b_sub.wait_for(
        lambda: b_sub.messages() == ["from-b", "from-a"], within=WAIT, what="both on b"
    )
    assert b_sub.deliveries[1]["fromPeerServer"] is True
    await a_sub.wait_for(lambda: "from-a" in a_sub.messages(), within=WAIT)
    assert (await health(b.url))["peers"] == []
    # b has no link to a; its publish reached a's server only if a's publisher... did not:
    assert a_sub.messages() == ["from-a"]
    assert (await health(a.url))["stats"]["publishes"] == 1


async def test_link_cut_mid_stream_loses_and_duplicates_nothing(
    serve_process: ProcessFactory, open_client: ClientFactory, make_proxy: ProxyFactory
) -> None:
    total = 6000
    b = await serve_process()
    proxy = await make_proxy(b.port)
    a = await serve_process("--peer", proxy.url)
    sub = await open_client(b.url)
    await sub.subscribe("stream")
    pub = await open_client(a.url)

    async def publish_range(start: int, stop: int) -> None:
        # Pipelined: send a batch, then wait for all its acks.
        for lo in range(start, stop, 250):
            hi = min(stop, lo + 250)
            ids = [
                await pub.send_request({"type": "publish", "topic": "stream", "message": n})
                for n in range(lo, hi)
            ]
            await pub.next_message(reply_to(ids[-1]), within=WAIT)

    def received() -> int:
        return len(sub.deliveries)

    # Phase 1: flowing normally.
    await publish_range(0, 1500)
    await sub.wait_for(lambda: received() >= 1000, within=WAIT, what="1000 through the link")

    # Phase 2: acks vanish on the way back; the messages still reach b. a must
    # resend them all after the cut, and b must drop every one of them.
    proxy.discard_to_client = True
    await publish_range(1500, 3000)
    await sub.wait_for(lambda: received() >= 3000, within=WAIT, what="3000 delivered, unacked")
    in_flight = link(await health(a.url))["in_flight"]
    assert in_flight > 500, in_flight

    # Phase 3: the path breaks, and new connections are refused for a while.
    proxy.accepting = False
    proxy.cut()
    proxy.discard_to_client = False
    await wait_health(a.url, lambda d: link(d)["state"] != "up", what="link down")
    await publish_range(3000, 4500)  # a acks them: they wait in its outbox
    await eventually(lambda: proxy.refused >= 2, "reconnect attempts refused", WAIT)
    held = link(await health(a.url))
    assert held["outbox"] >= 1500 + in_flight, held  # held, not lost
    assert held["state"] != "up"

    # Phase 4: the path comes back; then requests vanish on their way to b and
    # the path breaks again mid-stream: what was written into the void must be
    # resent too (not deduplicated away).
    proxy.connected.clear()
    proxy.accepting = True
    await wait_health(a.url, lambda d: link(d)["outbox"] == 0, what="outbox drained")
    proxy.discard_to_upstream = True
    await publish_range(4500, 5200)
    await wait_health(a.url, lambda d: link(d)["in_flight"] > 0, what="requests in the void")
    proxy.cut()
    proxy.discard_to_upstream = False
    await publish_range(5200, total)

    await sub.wait_for(lambda: received() >= total, within=WAIT, what=f"all {total}")
    await flush_marker_on(pub, sub)
    got = [d["message"] for d in sub.deliveries if d["topic"] == "stream"]
    assert got == list(range(total)), _first_difference(got, total)
    assert all(d["fromPeerServer"] is True for d in sub.deliveries)

    a_link = link(await health(a.url))
    b_doc = await health(b.url)
    assert a_link["resent"] >= in_flight
    assert b_doc["stats"]["duplicates_dropped"] >= in_flight - 1
    assert a_link["dropped"] == a_link["forgotten"] == 0
    assert a_link["connects"] >= 3


async def flush_marker_on(pub: RawClient, sub: RawClient) -> None:
    await sub.subscribe("mark")
    await flush_marker(pub, [sub], "stream-end")


def _first_difference(got: list[int], total: int) -> str:
    for i, (x, y) in enumerate(zip(got, range(total), strict=False)):
        if x != y:
            return f"{len(got)} messages; first difference at {i}: {got[i - 2 : i + 3]}"
    return f"{len(got)} messages, expected {total}"


async def test_sigkilled_peer_restarts_link_recovers_overflow_counted(
    serve_process: ProcessFactory,
    open_client: ClientFactory,
    reserve_port: PortFactory,
    tmp_path: Any,
) -> None:
    config = tmp_path / "a.toml"
    config.write_text("peer_outbox_messages = 50\npeer_reconnect_max = 0.5\n")
    pb: PortReservation = reserve_port()
    b = await serve_process(port=pb.port)
    a = await serve_process("--peer", pb.url, "--config", str(config))
    sub = await open_client(b.url)
    await sub.subscribe("t")
    pub = await open_client(a.url)
    await pub.publish("t", "before")
    await sub.wait_for(lambda: sub.messages() == ["before"], within=WAIT)
    await wait_health(a.url, lambda d: link(d)["confirmed"] == 1, what="first confirmed")

    b.kill()
    await b.stop()
    await wait_health(a.url, lambda d: link(d)["state"] != "up", what="link down")
    for n in range(200):
        assert (await pub.publish("t", n))["type"] == "ack"
    doc = link(await health(a.url))
    assert (doc["outbox"], doc["dropped"], doc["forgotten"]) == (50, 150, 0), doc
    assert "outbox full" in a.log()

    b2 = await serve_process(port=pb.port)
    doc = link(
        await wait_health(a.url, lambda d: link(d)["confirmed"] == 51, what="held 50 confirmed")
    )
    assert doc["state"] == "up"
    assert doc["connects"] == 2
    assert doc["outbox"] == 0
    # The 50 survivors are the newest ones and reached the new process.
    assert (await health(b2.url))["stats"]["publishes"] == 50

    sub2 = await open_client(b2.url)
    await sub2.subscribe("t")
    for n in range(3):
        await pub.publish("t", f"after-{n}")
    await sub2.wait_for(lambda: len(sub2.messages()) == 3, within=WAIT)
    assert sub2.messages() == ["after-0", "after-1", "after-2"]


async def test_peer_tokens_gate_from_peer_server(
    serve_process: ProcessFactory, open_client: ClientFactory, reserve_port: PortFactory
) -> None:
    pb: PortReservation = reserve_port()
    b = await serve_process("--accept-peer-token", "s3cret", port=pb.port)
    good = await serve_process("--peer", pb.url, "--peer-token", f"{pb.url}=s3cret")
    bad = await serve_process("--peer", pb.url, "--peer-token", f"{pb.url}=wrong")
    sub = await open_client(b.url)
    await sub.subscribe("t")

    # A plain client claiming to be a peer is refused, and nothing is delivered.
    intruder = await open_client(b.url)
    reply = await intruder.request(
        {"type": "publish", "topic": "t", "message": "forged", "fromPeerServer": True}
    )
    assert (reply["type"], reply["error"]) == ("error", "forbidden"), reply
    # The same client may still publish organically.
    assert (await intruder.publish("t", "organic"))["type"] == "ack"
    # A client that cannot set headers presents the token in the query string.
    query_peer = await open_client(f"{b.url}/?peer_token=s3cret")
    assert (await query_peer.publish("t", "by-query", fromPeerServer=True))["type"] == "ack"
    # The configured link (Authorization: Bearer) is accepted.
    good_pub = await open_client(good.url)
    await good_pub.publish("t", "via-link")
    await sub.wait_for(lambda: "via-link" in sub.messages(), within=WAIT)
    assert sub.messages() == ["organic", "by-query", "via-link"]
    assert sub.deliveries[0].get("fromPeerServer") is None
    assert sub.deliveries[1]["fromPeerServer"] is True
    assert sub.deliveries[2]["fromPeerServer"] is True

    # A link with the wrong token keeps its publishes and keeps retrying.
    bad_pub = await open_client(bad.url)
    await bad_pub.publish("t", "held")
    doc = link(
        await wait_health(bad.url, lambda d: "forbidden" in link(d)["last_error"], what="forbidden")
    )
    assert doc["outbox"] == 1
    assert doc["confirmed"] == 0
    assert doc["rejected"] == 0
    assert "held" not in sub.messages()
    assert link(await health(good.url))["authenticated"] is True
