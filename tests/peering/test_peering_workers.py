"""A peer link into a ``--workers`` server, cut mid-stream: the link may come back on
another worker, whose resends must be dropped as copies there and nowhere delivered twice."""

from __future__ import annotations

from tests.conftest import ClientFactory, ProcessFactory
from tests.peering.conftest import ProxyFactory
from tests.peering.helpers import WAIT, wait_health
from tests.peering.test_peering import link
from tests.support import eventually
from tests.wsclient import RawClient, health, reply_to


async def test_a_cut_link_into_workers_loses_and_duplicates_nothing(
    serve_process: ProcessFactory, open_client: ClientFactory, make_proxy: ProxyFactory
) -> None:
    total = 3000
    b = await serve_process("--workers", "2")
    proxy = await make_proxy(b.port)
    a = await serve_process("--peer", proxy.url)
    subs = [await open_client(b.url) for _ in range(6)]  # on both workers, most likely
    for sub in subs:
        await sub.subscribe("stream")
    pub = await open_client(a.url)

    async def heard_everywhere() -> bool:
        await pub.publish("stream", "probe")
        return all("probe" in s.messages("stream") for s in subs)

    await eventually(heard_everywhere, "the link and every worker's interest", WAIT)
    for sub in subs:
        await sub.sync()
        sub.deliveries.clear()

    async def publish_range(start: int, stop: int) -> None:
        for lo in range(start, stop, 250):
            hi = min(stop, lo + 250)
            ids = [
                await pub.send_request({"type": "publish", "topic": "stream", "message": n})
                for n in range(lo, hi)
            ]
            await pub.next_message(reply_to(ids[-1]), within=WAIT)

    def numbers(sub: RawClient) -> list[int]:
        return [m for m in sub.messages("stream") if isinstance(m, int)]

    await publish_range(0, 1000)
    # Acks vanish on the way back: everything is delivered and stays unconfirmed.
    proxy.discard_to_client = True
    await publish_range(1000, 2000)
    for sub in subs:
        await sub.wait_for(lambda s=sub: len(numbers(s)) >= 2000, within=WAIT, what="2000")
    in_flight = link(await health(a.url))["in_flight"]
    assert in_flight > 300, in_flight
    # The cut: the link reconnects (to either worker) and resends what is unconfirmed.
    proxy.cut()
    proxy.discard_to_client = False
    await publish_range(2000, total)
    await wait_health(a.url, lambda d: link(d)["outbox"] == 0, what="outbox drained")
    for sub in subs:
        await sub.wait_for(lambda s=sub: len(numbers(s)) >= total, within=WAIT, what="all")
        await sub.sync()
    await pub.publish("stream", "end")
    for sub in subs:
        await sub.wait_for(lambda s=sub: "end" in s.messages("stream"), within=WAIT, what="end")
        assert numbers(sub) == list(range(total))
    a_link = link(await health(a.url))
    assert a_link["resent"] >= in_flight
    assert a_link["connects"] >= 2
