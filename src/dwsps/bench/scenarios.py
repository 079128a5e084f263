"""The ``dwsps bench`` scenarios: fanout, peered, latency and connections.

Each scenario takes :class:`Params` and returns one flat JSON-ready dict whose
field names follow the C load generator's (``deliveriesPerSec``, ``lost``,
``serverCpu``, ``kbPerConnection``…) so results from both tools compare
directly.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from dwsps.bench.client import Publisher, Subscriber, Tracker, close, connect
from dwsps.bench.procfs import Sample, raise_open_files, rss_kb
from dwsps.redact import redact

SCENARIOS = ("fanout", "latency", "peered", "connections")


@dataclass(slots=True)
class Params:
    """Everything a scenario needs (``dwsps bench --help`` explains each)."""

    scenario: str = "fanout"
    url: str = "ws://127.0.0.1:8000"
    pub_url: str | None = None
    subs: int = 100
    topic: str = "bench"
    payload: int = 100
    inflight: int = 200
    flow: str = "e2e"
    warmup: float = 1.0
    duration: float = 5.0
    rate: float = 500.0
    drain: float = 5.0
    settle: float = 1.0
    concurrency: int = 100
    setup_timeout: float = 20.0
    server_pids: list[int] = field(default_factory=list)
    progress: bool = True
    token: str | None = None
    """Presented as ``Authorization: Bearer`` by every connection."""


class Progress:
    """One status line on stderr, rewritten in place on a terminal."""

    def __init__(self, enabled: bool, name: str) -> None:
        self.enabled = enabled
        self.name = name
        self.tty = sys.stderr.isatty()

    def show(self, text: str) -> None:
        """Replace the status line."""
        if not self.enabled:
            return
        line = f"[{self.name}] {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        """End the status line."""
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _base(p: Params) -> dict[str, Any]:
    params = asdict(p)
    # The token is a credential: it stays out of results (and so do ?token= values).
    for key in ("scenario", "url", "pub_url", "subs", "server_pids", "progress", "token"):
        params.pop(key)
    return {
        "tool": "dwsps-bench",
        "scenario": p.scenario,
        "url": redact(p.url),
        "pubUrl": redact(p.pub_url or p.url),
        "subs": p.subs,
        "params": params,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "serverPids": p.server_pids,
    }


async def _open_subscribers(
    p: Params, tracker: Tracker, topics: list[str], progress: Progress
) -> tuple[list[Subscriber], list[str]]:
    """Open one subscriber per topic (``concurrency`` at a time); return them and failures."""
    raise_open_files(len(topics) + 256)
    limit = asyncio.Semaphore(p.concurrency)
    subs: list[Subscriber] = []
    failures: list[str] = []

    async def one(topic: str) -> None:
        async with limit:
            sub: Subscriber | None = None
            try:
                sub = await connect(lambda: Subscriber(tracker), p.url, p.setup_timeout, p.token)
                await sub.subscribe(topic, p.setup_timeout)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                if sub is not None:
                    await close([sub], wait=0.5)
                return
            subs.append(sub)
            if len(subs) % 500 == 0:
                progress.show(f"connected {len(subs):,}/{len(topics):,}")

    await asyncio.gather(*(one(t) for t in topics))
    tracker.live = sum(1 for s in subs if not s.closed_by_server)
    return subs, failures


async def _wait_for_path(pub: Publisher, tracker: Tracker, wait: float) -> bool:
    """Publish probes until one reaches a subscriber (a peer link may still be connecting)."""
    deadline = time.monotonic() + wait
    while not tracker.probe_seen and time.monotonic() < deadline:
        pub.publish(-1)
        for _ in range(20):
            await asyncio.sleep(0.01)
            if tracker.probe_seen:
                break
    return tracker.probe_seen


def _loss_report(subs: list[Subscriber], published: int) -> dict[str, Any]:
    gaps = sum(s.gaps for s in subs)
    tail = sum(published - s.expected for s in subs if s.expected < published)
    closed = [s for s in subs if s.closed_by_server]
    errors = [e for s in subs for e in s.errors][:10]
    return {
        "gapLost": gaps,
        "tailMissing": tail,
        "lost": gaps + tail,
        "outOfOrder": sum(s.out_of_order for s in subs),
        "subsWithLoss": sum(1 for s in subs if s.gaps or s.expected < published),
        "subsClosed": len(closed),
        "closeCodes": sorted({s.close_code for s in closed if s.close_code is not None}),
        "otherFrames": sum(s.other for s in subs),
        "errors": errors,
    }


async def _drain(
    subs: list[Subscriber], tracker: Tracker, published: int, p: Params, progress: Progress
) -> tuple[float, str]:
    """Wait until every live subscriber has every publish, or no progress / the time limit."""
    start = time.monotonic()
    last_progress, last_count = start, tracker.delivered
    while True:
        missing = sum(published - s.expected for s in subs if not s.closed_by_server)
        if missing <= 0:
            return time.monotonic() - start, "complete"
        now = time.monotonic()
        if tracker.delivered != last_count:
            last_progress, last_count = now, tracker.delivered
        elif now - last_progress > min(2.0, p.drain):
            return now - start, "idle"
        if now - start > p.drain:
            return now - start, "timeout"
        progress.show(f"draining: {missing:,} deliveries outstanding")
        await asyncio.sleep(0.02)


async def fanout(p: Params) -> dict[str, Any]:
    """1 publisher, N subscribers on ``topic``, publishes to ``topic.x`` with a bounded window.

    With ``flow=e2e`` a publish is complete when every subscriber has it;
    with ``flow=ack`` when the server acked it (then the window bounds only
    the server's input, and slow subscribers build a backlog on the server).
    """
    progress = Progress(p.progress, p.scenario)
    result = _base(p)
    tracker = Tracker(p.inflight + 1)
    subs, failures = await _open_subscribers(p, tracker, [p.topic] * p.subs, progress)
    pub: Publisher = await connect(
        lambda: Publisher(f"{p.topic}.x", p.payload), p.pub_url or p.url, p.setup_timeout, p.token
    )
    if not await _wait_for_path(pub, tracker, p.setup_timeout):
        await close([*subs, pub])
        raise RuntimeError("no probe publish reached a subscriber (is the peer link up?)")

    e2e = p.flow == "e2e"
    window = p.inflight
    room = asyncio.Event()
    refill = max(1, window // 8)

    def outstanding() -> int:
        return pub.sent - (tracker.completed if e2e else pub.acked)

    def wake() -> None:
        if window - outstanding() >= refill or pub.closed:
            room.set()

    tracker.wake = wake
    pub.wake = wake
    running = True

    async def publish_loop() -> None:
        while running and not pub.closed:
            free = window - outstanding()
            if free >= refill:
                for _ in range(free):
                    pub.publish(pub.sent)
            room.clear()
            await room.wait()

    task = asyncio.create_task(publish_loop())
    pids = p.server_pids
    await asyncio.sleep(p.warmup)
    start = Sample.take(pids)
    d0, c0 = tracker.delivered, (tracker.completed if e2e else pub.acked)
    end_at = start.wall + p.duration
    while (now := time.perf_counter()) < end_at and tracker.live > 0 and not pub.closed:
        elapsed = now - start.wall
        if elapsed > 0:
            rate = (tracker.delivered - d0) / elapsed
            progress.show(f"{elapsed:4.1f}s  {rate:,.0f} deliveries/s  published {pub.sent:,}")
        await asyncio.sleep(min(0.5, end_at - now))
    end = Sample.take(pids)
    d1, c1 = tracker.delivered, (tracker.completed if e2e else pub.acked)
    running = False
    room.set()
    await task
    secs = end.wall - start.wall
    own_cpu, server_cpu = end.cpu_since(start)
    published = pub.sent
    drain_secs, drained = await _drain(subs, tracker, published, p, progress)
    progress.done()
    live = sum(1 for s in subs if not s.closed_by_server)
    result.update(
        {
            "subscribers": len(subs),
            "subsFailed": len(failures),
            "failureSample": failures[:5],
            "windowSecs": round(secs, 3),
            "deliveriesPerSec": round((d1 - d0) / secs),
            "publishesPerSec": round((c1 - c0) / secs),
            "deliveriesPerPublish": round((d1 - d0) / max(1, c1 - c0), 2),
            "totalPublished": published,
            "publishAcks": pub.acked,
            "publishErrors": pub.errors,
            "publishErrorSample": pub.error_sample,
            "totalDelivered": tracker.delivered,
            "expectedDeliveries": published * live,
            "drainSecs": round(drain_secs, 3),
            "drainStoppedBy": drained,
            "serverCpu": server_cpu,
            "serverRssKB": [rss_kb(pid) for pid in pids],
            "clientCpu": own_cpu,
            **_loss_report(subs, published),
        }
    )
    await close([*subs, pub])
    return result


def _percentiles(samples_ns: list[int]) -> dict[str, float | int]:
    if not samples_ns:
        return {"samples": 0}
    ordered = sorted(samples_ns)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] / 1e6, 3)

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(ordered[-1] / 1e6, 3),
        "min": round(ordered[0] / 1e6, 3),
        "mean": round(sum(ordered) / n / 1e6, 3),
        "samples": n,
    }


async def latency(p: Params) -> dict[str, Any]:
    """Publish at a fixed rate (open loop); measure publish-to-delivery time."""
    progress = Progress(p.progress, p.scenario)
    result = _base(p)
    tracker = Tracker(1 << 16)
    subs, failures = await _open_subscribers(p, tracker, [p.topic] * p.subs, progress)
    pub: Publisher = await connect(
        lambda: Publisher(f"{p.topic}.x", p.payload), p.pub_url or p.url, p.setup_timeout, p.token
    )
    if not await _wait_for_path(pub, tracker, p.setup_timeout):
        await close([*subs, pub])
        raise RuntimeError("no probe publish reached a subscriber")
    loop = asyncio.get_running_loop()
    period = 1.0 / p.rate
    warm = int(p.warmup * p.rate)
    total = warm + int(p.duration * p.rate)
    tracker.latency_from = warm
    t0 = loop.time()
    backlog = 0
    start: Sample | None = None
    last_shown = t0
    while pub.sent < total and not pub.closed:
        due = min(total, int((loop.time() - t0) / period) + 1)
        backlog = max(backlog, due - pub.sent)
        while pub.sent < due:
            if pub.sent == warm:
                start = Sample.take(p.server_pids)
            pub.publish(pub.sent)
        now = loop.time()
        if now - last_shown >= 0.5:
            last_shown = now
            progress.show(f"{now - t0:4.1f}s  published {pub.sent:,}/{total:,}")
        await asyncio.sleep(max(0.0, t0 + pub.sent * period - loop.time()))
    end = Sample.take(p.server_pids)
    drain_secs, drained = await _drain(subs, tracker, pub.sent, p, progress)
    progress.done()
    start = start or end
    own_cpu, server_cpu = end.cpu_since(start)
    secs = max(end.wall - start.wall, 1e-9)
    lat = _percentiles(tracker.latencies)
    result.update(
        {
            "subscribers": len(subs),
            "subsFailed": len(failures),
            "failureSample": failures[:5],
            "targetRate": p.rate,
            "achievedPublishRate": round((pub.sent - warm) / secs, 1),
            "maxPublishBacklog": backlog,
            "totalPublished": pub.sent,
            "publishAcks": pub.acked,
            "publishErrors": pub.errors,
            "totalDelivered": tracker.delivered,
            "deliveriesPerSec": round(len(tracker.latencies) / secs),
            "drainSecs": round(drain_secs, 3),
            "drainStoppedBy": drained,
            "latencyMs": lat,
            **{f"{k}ms": v for k, v in lat.items() if k in ("p50", "p90", "p99", "p999", "max")},
            "serverCpu": server_cpu,
            "serverRssKB": [rss_kb(pid) for pid in p.server_pids],
            "clientCpu": own_cpu,
            **_loss_report(subs, pub.sent),
        }
    )
    await close([*subs, pub])
    return result


async def connections(p: Params) -> dict[str, Any]:
    """N idle connections, each subscribed to ``topic.conn.<i>``; server memory per connection.

    Afterwards one publish goes to every connection's topic, to check that
    each connection is still there and subscribed.
    """
    progress = Progress(p.progress, p.scenario)
    result = _base(p)
    pid = p.server_pids[0] if p.server_pids else None
    before = rss_kb(pid) if pid else None
    tracker = Tracker(2)
    topics = [f"{p.topic}.conn.{i}" for i in range(p.subs)]
    started = time.perf_counter()
    subs, failures = await _open_subscribers(p, tracker, topics, progress)
    connect_secs = time.perf_counter() - started
    progress.show(f"{len(subs):,} connected; settling {p.settle}s")
    await asyncio.sleep(p.settle)
    after = rss_kb(pid) if pid else None
    closed_before_check = sum(1 for s in subs if s.closed_by_server)
    # Liveness: one publish per topic; each connection must get exactly one.
    pub: Publisher = await connect(
        lambda: Publisher(p.topic, p.payload), p.url, p.setup_timeout, p.token
    )
    for i, topic in enumerate(topics):
        pub.publish(0, topic)
        if i % 1000 == 999:
            await asyncio.sleep(0)
    deadline = time.monotonic() + p.drain
    while time.monotonic() < deadline:
        missing = sum(1 for s in subs if s.expected < 1 and not s.closed_by_server)
        if not missing:
            break
        progress.show(f"liveness check: {missing:,} connections still waiting")
        await asyncio.sleep(0.05)
    progress.done()
    n = len(subs)
    per_conn = None if before is None or after is None or n <= 0 else round((after - before) / n, 2)
    result.update(
        {
            "connections": n,
            "failed": len(failures),
            "failureSample": failures[:5],
            "connectSecs": round(connect_secs, 3),
            "connectsPerSec": round(n / max(connect_secs, 1e-9)),
            "serverRssBeforeKB": before,
            "serverRssAfterKB": after,
            "kbPerConnection": per_conn,
            "closedBeforeCheck": closed_before_check,
            "liveConnections": sum(1 for s in subs if s.expected >= 1),
            **_loss_report(subs, 1),
        }
    )
    await close([*subs, pub], wait=5.0)
    return result


RUNNERS = {"fanout": fanout, "peered": fanout, "latency": latency, "connections": connections}
