#!/usr/bin/env python3
"""The replay rate of a big recovery: publish N messages to a history stream, then recover them.

Starts ``dwsps serve --history 'chat.*:N'`` pinned to CPU 0 (``taskset``), publishes N
messages (100-character payload) to ``chat.bench`` with one connection, then a second
connection subscribes with ``recover`` from offset 0 and reads until offset N. Prints the
wall time and the server's CPU time over the recovery alone (/proc/PID/stat utime+stime),
as CPU-µs per replayed message. The reading client is Python (tests/wsclient.py), so the
wall-clock rate is bound by it; the server CPU per message is the figure to compare.

    .venv/bin/python bench/history_replay.py             # N = 100000
    .venv/bin/python bench/history_replay.py 20000
    .venv/bin/python bench/history_replay.py --backplane redis://127.0.0.1:6379/0

With ``--backplane``, the stream lives in that Redis (start one yourself; its CPU is not
counted): the recovery reads it in pages of 1000.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.wsclient import RawClient  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def measure(n: int, backplane: str | None = None) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dwsps = ROOT / ".venv" / "bin" / "dwsps"
    args = ["serve", "--port", str(port), "--history", f"chat.*:{n}"]
    args += ["--history-max-bytes", "1GiB", "--heartbeat-interval", "0"]
    if backplane:
        args += ["--backplane", backplane]
    proc = await asyncio.create_subprocess_exec(
        "taskset", "-c", "0", str(dwsps), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    await proc.stdout.readline()  # dwsps listening on ...
    url = f"ws://127.0.0.1:{port}"
    try:
        pub = await RawClient.connect(url)
        ack = await pub.publish("chat.bench", "x" * 100)
        for i in range(n - 1):
            await pub.send_json({"type": "publish", "topic": "chat.bench", "message": "x" * 100})
            if i % 1000 == 0:
                pub.inbox.clear()
        await pub.sync(within=120)
        sub = await RawClient.connect(url)
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        recover = {"epoch": ack["epoch"], "offset": 0}
        reply = await sub.request({"type": "subscribe", "topic": "chat.bench", "recover": recover})
        assert reply["recovered"] is True, reply
        last = 0
        while last < n:
            msg = await sub.next_message(within=60)
            if msg.get("type") == "publish":
                last = msg["offset"]
        wall, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
        print(
            f"replayed {n} in {wall:.2f}s: {n / wall:,.0f} msg/s;"
            f" server CPU {cpu:.2f}s = {cpu / n * 1e6:.1f} us/msg"
        )
        await pub.close()
        await sub.close()
    finally:
        proc.terminate()
        await proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=100_000)
    parser.add_argument("--backplane", help="e.g. redis://127.0.0.1:6379/0")
    options = parser.parse_args()
    asyncio.run(measure(options.n, options.backplane))
