"""Peering interop with Node.js (npm ``ws``) playing the original dwsps.

``tests/interop/peer_interop.mjs`` is (a) an original peer server's link: a
plain client sending ``publish`` with ``fromPeerServer: true`` to us, and (b) a
minimal original-style server that our server peers to, which echoes no ids
and ignores every extension field. Forwarding must work both ways without any
extension being required.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ClientFactory, ProcessFactory
from tests.peering.helpers import WAIT, wait_health
from tests.support import scaled, unavailable
from tests.wsclient import health

INTEROP = Path(__file__).parent.parent / "interop"
SCRIPT = INTEROP / "peer_interop.mjs"
NODE = shutil.which("node")

if NODE is None:
    unavailable("node is not installed (make test installs it: scripts/install-system-deps.sh)")

pytestmark = pytest.mark.timeout(scaled(90))


class NodeProc:
    """``node peer_interop.mjs MODE ...``: JSON lines from stdout, always stopped."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.lines: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self.stderr = b""

    async def start(self) -> NodeProc:
        if not (INTEROP / "node_modules" / "ws").is_dir():
            pytest.fail("npm packages missing: run `make node-deps` (npm ci in tests/interop)")
        assert NODE is not None
        self.proc = await asyncio.create_subprocess_exec(
            NODE,
            str(SCRIPT),
            *self.args,
            cwd=INTEROP,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(orjson.loads(line))
            async with self._changed:
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_line(self, key: str, count: int = 1) -> list[Any]:
        """Wait until ``count`` lines have ``key``; return their values."""

        def values() -> list[Any]:
            return [line[key] for line in self.lines if key in line]

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: (
                            len(values()) >= count
                            or (self._reader is not None and self._reader.done())
                        )
                    ),
                    WAIT,
                )
        got = values()
        assert len(got) >= count, f"node {self.args[0]}: wanted {count} {key!r}: {self.lines}"
        return got

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), scaled(5))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, scaled(5))


@pytest.fixture
async def node() -> Any:
    procs: list[NodeProc] = []

    async def start(*args: str) -> NodeProc:
        proc = NodeProc(*args)
        procs.append(proc)
        return await proc.start()

    try:
        yield start
    finally:
        for proc in procs:
            await proc.stop()


@pytest.mark.parametrize("tokens", [False, True])
async def test_original_peer_client_publish_is_delivered_and_not_forwarded(
    tokens: bool, node: Any, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    b = await serve_process()
    a_args = ["--peer", b.url]
    if tokens:
        a_args += ["--accept-peer-token", "tok"]
    a = await serve_process(*a_args)
    a_sub, b_sub = await open_client(a.url), await open_client(b.url)
    for sub in (a_sub, b_sub):
        await sub.subscribe("news")

    peer = await node(
        "peer-publish", a.url, "news.uk", '{"hello": "from node"}', *(["tok"] if tokens else [])
    )
    (reply,) = await peer.wait_line("reply")
    assert (reply["type"], reply["action"]) == ("ack", "publish"), reply
    await a_sub.wait_for(lambda: len(a_sub.deliveries) == 1, within=WAIT)
    delivery = a_sub.deliveries[0]
    assert delivery["message"] == {"hello": "from node"}
    assert delivery["fromPeerServer"] is True
    assert delivery["context"] == "news"
    assert delivery["topic"] == "news.uk"

    # Not forwarded: a's link to b carries only what is published on a next.
    await (await open_client(a.url)).publish("news", "organic")
    await b_sub.wait_for(lambda: len(b_sub.deliveries) >= 1, within=WAIT)
    assert b_sub.messages() == ["organic"]
    state = (await health(a.url))["peers"][0]
    assert state["queued"] == 1


async def test_python_server_peers_to_an_original_style_node_server(
    node: Any, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    origin_server = await node("server")
    (port,) = await origin_server.wait_line("listening")
    node_url = f"ws://127.0.0.1:{port}"
    node_sub = await node("subscribe", node_url, "news", "3")
    await node_sub.wait_line("subscribed")

    a = await serve_process("--peer", node_url)
    pub = await open_client(a.url)
    stamp = "2020-01-22T15:44:04.674Z"
    await pub.publish("news.uk", {"n": 1}, timestamp=stamp)
    await pub.publish("news", [1, 2, 3])
    await pub.publish("news.uk.london", "three")
    deliveries = await node_sub.wait_line("delivery", 3)

    assert [d["message"] for d in deliveries] == [{"n": 1}, [1, 2, 3], "three"]
    assert [d["topic"] for d in deliveries] == ["news.uk", "news", "news.uk.london"]
    assert all(d["fromPeerServer"] is True and d["context"] == "news" for d in deliveries)
    assert deliveries[0]["timestamp"] == stamp  # the publisher's timestamp travels

    requests = [r for r in await origin_server.wait_line("request", 4) if r["type"] == "publish"]
    for req in requests:
        # An original publish plus fields the original ignores.
        assert {"type", "topic", "message", "timestamp", "fromPeerServer"} <= set(req)
        assert req["fromPeerServer"] is True
    # Acks without ids still confirm everything, in order.
    doc = await wait_health(
        a.url, lambda d: d["peers"][0]["confirmed"] == 3, what="3 confirmed by node"
    )
    link = doc["peers"][0]
    assert (link["state"], link["outbox"], link["sent"], link["resent"]) == ("up", 0, 3, 0)
