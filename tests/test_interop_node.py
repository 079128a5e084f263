"""Cross-language interop: a Node.js client on npm ``ws`` against the Python server.

``tests/interop/client_interop.mjs`` behaves like the original dwsps client
(requests without ids, always a timestamp) and checks acks and deliveries
itself; this test runs it and checks what the server saw, also against a
server that requires a token (given as ``?token=`` in the script's URL). ``make test``
installs Node.js and the npm packages (``npm ci`` in tests/interop).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import orjson
import pytest

from dwsps.auth import mint_token
from dwsps.permissions import Permissions
from tests.conftest import ServerFactory
from tests.procs import finish
from tests.support import scaled, unavailable

INTEROP = Path(__file__).parent / "interop"
NODE = shutil.which("node")

if NODE is None:
    unavailable("node is not installed (make test installs it: scripts/install-system-deps.sh)")


async def run_node(script: str, *args: str) -> tuple[int, dict[str, object], str]:
    assert NODE is not None
    if not (INTEROP / "node_modules" / "ws").is_dir():
        pytest.fail("npm packages missing: run `make node-deps` (npm ci in tests/interop)")
    proc = await asyncio.create_subprocess_exec(
        NODE,
        script,
        *args,
        cwd=INTEROP,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await finish(proc, scaled(30))
    lines = out.decode().strip().splitlines()
    assert lines, f"no output; stderr: {err.decode()}"
    return proc.returncode or 0, orjson.loads(lines[-1]), err.decode()


async def test_node_ws_client_against_python_server(make_server: ServerFactory) -> None:
    srv = await make_server()
    seen: list[tuple[str, str]] = []
    srv.on("subscribe", lambda topic, _cid: seen.append(("subscribe", topic)))
    srv.on("unsubscribe", lambda topic, _cid: seen.append(("unsubscribe", topic)))
    srv.on("publish", lambda topic, _cid: seen.append(("publish", topic)))
    disconnected: asyncio.Queue[str] = asyncio.Queue()
    srv.on("disconnect", disconnected.put_nowait)

    code, result, stderr = await run_node("client_interop.mjs", srv.url)

    assert result["ok"] is True, f"{result}\n{stderr}"
    assert code == 0, stderr
    assert len(result["checks"]) >= 8  # type: ignore[arg-type]
    assert ("subscribe", "interop.*.weather") in seen
    assert seen.count(("publish", "interop.news.uk")) == 1
    assert ("unsubscribe", "interop") in seen
    for _ in range(2):  # both Node clients are gone, their subscriptions with them
        await asyncio.wait_for(disconnected.get(), scaled(10))
    assert srv.subscription_topics() == []
    assert srv.stats.errors_sent == 1  # the one deliberate bad topic


async def test_interop_script_reports_failure(make_server: ServerFactory) -> None:
    # The script must be able to fail: against a closed port it exits non-zero.
    srv = await make_server()
    url = srv.url
    await srv.close()
    code, result, _ = await run_node("client_interop.mjs", url)
    assert code != 0
    assert result["ok"] is False


async def test_node_ws_client_with_a_token_in_its_url(make_server: ServerFactory) -> None:
    # An original client cannot set headers, but passes its URL through: ?token= works.
    secret = "interop-secret-0123456789abcdef-0123456789"
    srv = await make_server(auth_jwt_secret=secret)
    users: list[str | None] = []
    srv.on("connect", lambda cid: users.append(srv.user(cid)))
    token = mint_token(
        secret, sub="node", ttl=300, permissions=Permissions(("interop",), ("interop",))
    )

    code, result, stderr = await run_node("client_interop.mjs", f"{srv.url}/?token={token}")

    assert result["ok"] is True, f"{result}\n{stderr}"
    assert code == 0, stderr
    assert users == ["node", "node"]
    assert srv.stats.errors_sent == 1  # the deliberate bad topic: no forbidden, no 401
    # Without the token the same script is refused at the upgrade (401) and says so.
    code, result, _ = await run_node("client_interop.mjs", srv.url)
    assert code != 0
    assert result["ok"] is False
    assert "401" in str(result["error"])
