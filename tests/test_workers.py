"""``dwsps serve --workers N``: the IPC backplane by value and in one process, then real
supervisors with N worker processes on one port (exactly once, order, interest
forwarding, a worker killed and restarted, shutdown)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dwsps.links.engine import BackplaneOptions
from dwsps.links.ipc import ENVELOPE, WANT, FrameReader, IpcBackplane, frame
from dwsps.workers import Worker
from tests.conftest import ClientFactory, ProcessFactory
from tests.procs import ServerProcess
from tests.support import eventually, scaled
from tests.wsclient import RawClient, http_get

# -- pure parts ---------------------------------------------------------------


def test_frames_split_at_any_byte_and_an_oversized_one_is_refused() -> None:
    data = frame(WANT, b"news") + frame(ENVELOPE, b'{"v":1}\n"x"') + frame(ENVELOPE, b"")
    reader = FrameReader(100)
    got = [f for byte in range(len(data)) for f in reader.feed(data[byte : byte + 1])]
    assert got == [(WANT, b"news"), (ENVELOPE, b'{"v":1}\n"x"'), (ENVELOPE, b"")]
    with pytest.raises(ValueError, match="limit 100"):
        FrameReader(100).feed(frame(ENVELOPE, b"x" * 100))


def test_worker_identity_round_trips_through_the_environment() -> None:
    worker = Worker(2, 4, "/tmp/d")
    assert Worker.from_env({"DWSPS_WORKER": worker.to_env()}) == worker
    assert Worker.from_env({}) is None
    with pytest.raises(ValueError, match="SLOT/COUNT"):
        Worker.from_env({"DWSPS_WORKER": "two"})
    engine = IpcBackplane.from_url(worker.backplane_url(), BackplaneOptions("s"))
    assert (engine.directory, engine.slot, engine.workers) == ("/tmp/d", 2, 4)
    with pytest.raises(ValueError, match="slot"):
        IpcBackplane.from_url("ipc:///tmp/d?slot=4&workers=4", BackplaneOptions("s"))


# -- two engines in one process -------------------------------------------------


async def test_a_worker_receives_only_the_keys_it_announced(tmp_path: Path) -> None:
    got: dict[int, list[bytes]] = {0: [], 1: []}
    engines = [IpcBackplane(str(tmp_path), slot, 2, 1 << 20) for slot in (0, 1)]
    for slot, engine in enumerate(engines):
        await engine.start(got[slot].append, lambda up, reason: None)
    try:
        a, b = engines
        b.subscribe("room")

        async def interest_arrived() -> bool:
            a.publish("room", b"probe")
            await asyncio.sleep(0.01)
            return bool(got[1])

        await eventually(interest_arrived, "worker 1's interest to reach worker 0")
        sent = a.published
        for n in range(20):
            a.publish("other", b"other %d" % n)
        a.publish("room", b"last")
        await eventually(lambda: got[1][-1:] == [b"last"], "the last envelope")
        assert set(got[1]) == {b"probe", b"last"}, "an envelope for a key nobody wanted came"
        assert a.published == sent + 1
        assert got[0] == [], "worker 1 announced nothing and sent nothing"
        b.unsubscribe("room")

        async def interest_ended() -> bool:
            before = a.published
            a.publish("room", b"after")
            return a.published == before

        await eventually(interest_ended, "worker 1's -room to reach worker 0")
    finally:
        for engine in engines:
            await engine.close()


async def test_a_stream_holds_at_most_its_bound_and_counts_what_it_drops(tmp_path: Path) -> None:
    got: list[bytes] = []
    a = IpcBackplane(str(tmp_path), 0, 2, 1 << 16)
    b = IpcBackplane(str(tmp_path), 1, 2, 1 << 16)
    await a.start(lambda payload: None, lambda up, reason: None)
    await b.start(got.append, lambda up, reason: None)
    try:
        b.subscribe("k")

        async def connected() -> bool:
            a.publish("k", b"probe")
            await asyncio.sleep(0.01)
            return bool(got)

        await eventually(connected, "worker 1's interest")
        got.clear()
        sent_before = a.published
        for n in range(50):  # one loop turn: 200 KB against a 64 KiB bound
            a.publish("k", b"%02d" % n + b"x" * 4000)
        assert a.dropped > 0
        await eventually(lambda: len(got) == a.published - sent_before, "what was kept")
        assert len(got) + a.dropped == 50
        assert [p[:2] for p in got] == [b"%02d" % n for n in range(len(got))], "oldest kept"
    finally:
        await a.close()
        await b.close()


# -- real supervisors ------------------------------------------------------------

_WORKER_UP = re.compile(rb"worker (\d+) \(pid (\d+)\) listening")


def _worker_pids(proc: ServerProcess) -> dict[int, int]:
    """The latest pid of every worker, from the supervisor's log."""
    pids: dict[int, int] = {}
    for line in proc.output:
        if match := _WORKER_UP.search(line):
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


def _worker_directory(pid: int) -> Path:
    """The supervisor's private directory, from a worker's environment."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    worker = Worker.from_env(dict(e.decode().split("=", 1) for e in environ if b"=" in e))
    assert worker is not None
    return Path(worker.directory)


async def _metric(url: str, name: str) -> dict[str, float]:
    """``name``'s value per worker, from one scrape (whichever worker answers)."""
    status, body = await http_get(url, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels["worker"]] = sample.value
    return out


async def _connected(url: str, open_client: ClientFactory, n: int) -> list[RawClient]:
    return [await open_client(url) for _ in range(n)]


async def _settle(publishers: list[RawClient], subscribers: list[RawClient], topic: str) -> None:
    """Probe until every subscriber heard every publisher: interest reached every worker.

    (Interest travels asynchronously, as on any backplane: a subscription made on one
    worker is in place on the others a moment after its ack.)
    """
    probes = {f"probe-{p}" for p in range(len(publishers))}

    async def all_heard() -> bool:
        for p, pub in enumerate(publishers):
            await pub.publish(topic, f"probe-{p}")
        await asyncio.sleep(0.05)
        return all(probes <= set(map(str, s.messages(topic))) for s in subscribers)

    await eventually(all_heard, "every worker's interest", timeout=scaled(20))
    for sub in subscribers:
        await sub.sync()
        sub.deliveries.clear()


async def _exactly_once_in_order(
    publishers: list[RawClient], subscribers: list[RawClient], topic: str, per: int
) -> None:
    async def publish_all(p: int, pub: RawClient) -> None:
        for n in range(per):
            await pub.send_request({"type": "publish", "topic": topic, "message": {"p": p, "n": n}})
        await pub.sync()

    await asyncio.gather(*(publish_all(p, pub) for p, pub in enumerate(publishers)))
    want = len(publishers) * per
    for sub in subscribers:
        await sub.wait_for(
            lambda s=sub: len([m for m in s.messages(topic) if isinstance(m, dict)]) >= want,
            within=scaled(30),
            what="deliveries",
        )
        await sub.sync()
        got = [m for m in sub.messages(topic) if not str(m).startswith("probe")]
        assert len(got) == want, f"{len(got)} deliveries, want {want}"
        for p in range(len(publishers)):
            assert [m["n"] for m in got if m["p"] == p] == list(range(per)), f"publisher {p}"


@pytest.mark.parametrize("workers", [2, 4])
async def test_every_publish_reaches_every_worker_once_in_order(
    workers: int, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    srv = await serve_process("--workers", str(workers))
    assert f"({workers} workers)" in srv.log()
    pids = _worker_pids(srv)
    assert sorted(pids) == list(range(workers))
    subscribers = await _connected(srv.url, open_client, 3 * workers)
    for sub in subscribers:
        await sub.subscribe("room")
    publishers = await _connected(srv.url, open_client, 2 * workers)
    await _settle(publishers, subscribers, "room")
    await _exactly_once_in_order(publishers, subscribers, "room", 150)

    async def crossed_workers() -> bool:
        delivered = await _metric(srv.url, "dwsps_backplane_delivered_total")
        return len(delivered) == workers and sum(delivered.values()) > 0

    await eventually(crossed_workers, "deliveries across workers in /metrics")

    async def all_counted() -> bool:  # the other workers' figures are up to 1 s old
        return sum((await _metric(srv.url, "dwsps_connections")).values()) == 5 * workers

    await eventually(all_counted, "every connection counted once in /metrics")
    directory = _worker_directory(pids[0])
    assert directory.is_dir()
    assert await srv.stop() == 0
    await eventually(lambda: all(_gone(pid) for pid in pids.values()), "every worker to exit")
    assert not directory.exists(), "the supervisor left its directory behind"


async def test_a_worker_without_subscribers_for_a_topic_receives_none_of_it(
    serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    srv = await serve_process("--workers", "2")
    subscribers = await _connected(srv.url, open_client, 6)
    for sub in subscribers:
        await sub.subscribe("room")
    publisher = await open_client(srv.url)
    for n in range(100):
        await publisher.send_request({"type": "publish", "topic": "nobody", "message": n})
    await publisher.sync()

    async def forwarded_all() -> bool:
        forwarded = await _metric(srv.url, "dwsps_backplane_forwarded_total")
        return sum(forwarded.values()) == 100

    await eventually(forwarded_all, "the 100 publishes in /metrics")
    received = await _metric(srv.url, "dwsps_backplane_received_total")
    assert sum(received.values()) == 0, received
    await _settle([publisher], subscribers, "room")  # the same path does carry wanted topics


async def test_a_killed_worker_is_restarted_and_serves_again(
    serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    srv = await serve_process("--workers", "2")
    before = _worker_pids(srv)
    os.kill(before[1], signal.SIGKILL)

    def restarted() -> bool:
        pid = _worker_pids(srv).get(1)
        return pid is not None and pid != before[1]

    await eventually(restarted, "worker 1 to be restarted", timeout=scaled(20))
    assert b"exited with -9; restarting it" in b"".join(srv.output)
    subscribers = await _connected(srv.url, open_client, 6)
    for sub in subscribers:
        await sub.subscribe("room")
    publishers = await _connected(srv.url, open_client, 4)
    await _settle(publishers, subscribers, "room")
    await _exactly_once_in_order(publishers, subscribers, "room", 50)
    assert set(await _metric(srv.url, "dwsps_connections")) == {"0", "1"}


async def test_workers_stop_when_the_supervisor_is_killed(
    serve_process: ProcessFactory,
) -> None:
    srv = await serve_process("--workers", "2")
    pids = _worker_pids(srv)
    srv.kill()
    await eventually(lambda: all(_gone(pid) for pid in pids.values()), "orphaned workers to exit")


async def test_a_worker_that_cannot_start_fails_the_supervisor(
    serve_process: ProcessFactory,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:  # no SO_REUSEPORT: not shareable
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="cannot listen"):
            await serve_process("--workers", "2", port=port)
