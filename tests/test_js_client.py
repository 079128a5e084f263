"""The JavaScript client's own suite (clients/js/test, ``node --test``) against real
``dwsps serve`` processes, run as part of pytest so ``make test`` and CI run it.

The suite starts its servers with this environment's ``dwsps`` (``DWSPS_BIN``). Node 20 has
a WebSocket only behind ``--experimental-websocket``; later versions have it built in.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.procs import finish
from tests.support import scaled, unavailable

PACKAGE = Path(__file__).resolve().parent.parent / "clients" / "js"
NODE = shutil.which("node")

if NODE is None:
    unavailable("node is not installed (make test installs it: scripts/install-system-deps.sh)")


def node_flags() -> list[str]:
    assert NODE is not None
    has_ws = subprocess.run(
        [NODE, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], check=False
    )
    return [] if has_ws.returncode == 0 else ["--experimental-websocket"]


async def test_node_suite_passes() -> None:
    assert NODE is not None
    files = sorted(str(p) for p in (PACKAGE / "test").glob("*.test.mjs"))
    assert len(files) >= 3, files
    env = dict(os.environ, DWSPS_BIN=str(Path(sys.executable).with_name("dwsps")))
    proc = await asyncio.create_subprocess_exec(
        NODE,
        *node_flags(),
        "--test",
        "--test-reporter=tap",
        *files,
        cwd=PACKAGE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await finish(proc, scaled(90))
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report
    assert "\n# fail 0" in report, report
    passed = int(report.split("\n# pass ")[1].split()[0])
    assert passed >= 15, report
