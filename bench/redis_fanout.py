#!/usr/bin/env python3
"""Cross-server fan-out through Redis: one publisher, subscribers spread over three servers.

Starts its own redis-server (free port, no persistence) and three
``dwsps serve --backplane redis://…`` processes, connects ``--subscribers``
picows clients spread evenly over the three servers (all subscribed to
``bench``), then one publisher on server 0:

* throughput: ``--messages`` publishes sent as fast as acks allow (at most
  ``--window`` unacknowledged); measured from the first send to the last
  delivery at every subscriber. Deliveries/s counts every subscriber copy.
* latency: ``--latency-messages`` publishes at ``--rate`` per second; the
  publisher's send time travels in the message, each subscriber records
  receive - send (same host, same clock).

Prints a table and one JSON object (``--json-only`` for just the JSON).
Everything it starts is stopped on exit.

    .venv/bin/python bench/redis_fanout.py                 # defaults: 300 subs, 5000 msgs
    .venv/bin/python bench/redis_fanout.py --subscribers 900 --messages 2000
    .venv/bin/python bench/redis_fanout.py --history 'bench:100000'   # a history topic
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from dwsps.bench.client import Publisher, Subscriber, Tracker, close, connect
from dwsps.loop import run as run_loop

LISTENING = re.compile(rb"dwsps listening on (ws://\S+)")
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
SERVE = (sys.executable, "-m", "dwsps", "serve", "--host", "127.0.0.1", "--port", "0")
TOPIC = "bench.load"
WAIT = 30.0
"""Seconds a connection or a subscribe ack may take."""
WARM_UP = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Progress:
    """Wakes the publisher and the phase waits when acks or complete deliveries advance."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def wake(self) -> None:
        self.event.set()

    async def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        async def wait() -> None:
            while not done():
                self.event.clear()
                await self.event.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}") from None


async def start_process(args: list[str], ready: re.Pattern[bytes]) -> tuple[Any, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert proc.stdout is not None

    async def wait() -> str:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            match = ready.search(line)
            if match:
                return match.group(1).decode() if match.groups() else ""
        raise RuntimeError(f"{args[0]} exited before it was ready")

    text = await asyncio.wait_for(wait(), 20)

    async def drain() -> None:
        assert proc.stdout is not None
        while await proc.stdout.readline():
            pass

    proc._drain = asyncio.create_task(drain())  # keep the pipe from filling
    return proc, text


async def stop_process(proc: Any) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def publish_window(
    pub: Publisher, progress: Progress, first: int, n: int, window: int
) -> None:
    """Publish ``first .. first+n-1`` as fast as acks allow (at most ``window`` unacked)."""
    for seq in range(first, first + n):
        if pub.sent - pub.acked >= window:
            await progress.until(lambda: pub.sent - pub.acked < window, 60, "acks")
        pub.publish(seq)


async def publish_paced(pub: Publisher, first: int, n: int, rate: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pub.publish(first + i)


async def wait_subscribed(url: str, key: str, timeout: float = 20) -> None:
    """Poll /health/backplane until the server's upstream subscription is confirmed."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /health/backplane HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await reader.read()
        writer.close()
        body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
        if key in body.get("subscribed", []):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} never subscribed to {key}")
        await asyncio.sleep(0.05)


def redis_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def pct(values: list[int], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k] / 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    redis_exe = shutil.which("redis-server")
    if redis_exe is None:
        raise SystemExit("redis-server is not installed (scripts/install-system-deps.sh)")
    procs: list[Any] = []
    listeners: list[Subscriber | Publisher] = []
    try:
        rport = free_port()
        redis_proc, _ = await start_process(
            [redis_exe, "--port", str(rport), "--bind", "127.0.0.1", *NO_PERSISTENCE],
            re.compile(rb"Ready to accept connections"),
        )
        procs.append(redis_proc)
        redis_url = f"redis://127.0.0.1:{rport}/0"
        urls = []
        history = ("--history", args.history) if args.history else ()
        for _ in range(3):
            proc, url = await start_process(
                [*SERVE, "--backplane", redis_url, "--log-level", "warning", *history],
                LISTENING,
            )
            procs.append(proc)
            urls.append(url)

        # One sequence across the phases (subscribers check order); the ring covers it all.
        total = WARM_UP + args.messages + args.latency_messages
        tracker = Tracker(total + 1)
        progress = Progress()
        tracker.wake = progress.wake
        subscribers: list[Subscriber] = []
        for i in range(args.subscribers):
            sub: Subscriber = await connect(lambda: Subscriber(tracker), urls[i % 3], WAIT)
            listeners.append(sub)
            subscribers.append(sub)
        await asyncio.gather(*(s.subscribe("bench", WAIT) for s in subscribers))
        tracker.live = len(subscribers)
        for url in urls:
            await wait_subscribed(url, "bench")
        pub: Publisher = await connect(lambda: Publisher(TOPIC, args.payload), urls[0], WAIT)
        listeners.append(pub)
        pub.wake = progress.wake

        def delivered_to_all(upto: int) -> Callable[[], bool]:
            return lambda: tracker.completed >= upto or tracker.live == 0

        # Warm-up (connections, caches), not measured.
        await publish_window(pub, progress, 0, WARM_UP, args.window)
        await progress.until(delivered_to_all(WARM_UP), 60, "the warm-up")

        first = WARM_UP
        t0 = time.perf_counter()
        await publish_window(pub, progress, first, args.messages, args.window)
        t_sent = time.perf_counter()
        await progress.until(delivered_to_all(first + args.messages), 300, "the deliveries")
        elapsed = time.perf_counter() - t0

        first += args.messages
        tracker.latency_from = first
        await publish_paced(pub, first, args.latency_messages, args.rate)
        await progress.until(delivered_to_all(total), 120, "the latency phase")
        lat = tracker.latencies
        if tracker.live < len(subscribers):
            raise RuntimeError(f"{len(subscribers) - tracker.live} subscribers were closed")
        per_server = [sum(s.expected - s.gaps for s in subscribers[i::3]) for i in range(3)]

        return {
            "scenario": "redis_fanout",
            "history": args.history,
            "servers": 3,
            "subscribers": args.subscribers,
            "messages": args.messages,
            "window": args.window,
            "throughput": {
                "seconds": round(elapsed, 3),
                "publishes_per_s": round(args.messages / elapsed),
                "deliveries_per_s": round(args.subscribers * args.messages / elapsed),
                "publish_phase_seconds": round(t_sent - t0, 3),
            },
            "latency": {
                "messages": args.latency_messages,
                "rate_per_s": args.rate,
                "samples": len(lat),
                "p50_ms": round(pct(lat, 50), 3),
                "p99_ms": round(pct(lat, 99), 3),
                "max_ms": round(max(lat) / 1e6, 3),
                "mean_ms": round(statistics.fmean(lat) / 1e6, 3),
            },
            "deliveries_per_server_total": per_server,
            "gaps": sum(s.gaps for s in subscribers),
            "out_of_order": sum(s.out_of_order for s in subscribers),
            "publish_errors": pub.errors,
            "machine": {
                "nproc": os.cpu_count(),
                "python": platform.python_version(),
                "redis": redis_version(redis_exe),
            },
        }
    finally:
        await close(listeners)
        for proc in reversed(procs):
            await stop_process(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=300)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--window", type=int, default=200, help="unacked publishes in flight")
    parser.add_argument("--latency-messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=500.0, help="publishes/s, latency phase")
    parser.add_argument("--payload", type=int, default=40, help="approx. message bytes")
    parser.add_argument(
        "--history", help="a history pattern for every server, e.g. 'bench:100000' (off by default)"
    )
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    result = run_loop(run(args))
    if not args.json_only:
        t, lat = result["throughput"], result["latency"]
        rows = [
            ("subscribers (3 servers)", f"{args.subscribers}"),
            ("publishes", f"{args.messages}"),
            ("time to last delivery", f"{t['seconds']} s"),
            ("publishes/s", f"{t['publishes_per_s']:,}"),
            ("deliveries/s (all servers)", f"{t['deliveries_per_s']:,}"),
            (f"latency p50 @ {args.rate:g}/s", f"{lat['p50_ms']} ms"),
            (f"latency p99 @ {args.rate:g}/s", f"{lat['p99_ms']} ms"),
            ("latency max", f"{lat['max_ms']} ms"),
        ]
        width = max(len(r[0]) for r in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
