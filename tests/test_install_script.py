"""scripts/install-system-deps.sh (``make system-deps``): silent when every tool is there, and
a clear failure when ``node`` is older than 20 (Debian 12's nodejs is 18: no global WebSocket).

The tools are stubs first on PATH, so the script finds them all and never runs apt-get.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install-system-deps.sh"
TOOLS = ("redis-server", "npm", "openssl", "chromium", "chromedriver")


def run_with_node(tmp_path: Path, version: str | None) -> subprocess.CompletedProcess[str]:
    for name in TOOLS:
        stub = tmp_path / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    node = tmp_path / "node"
    # `node -p 'process.versions.node'` prints the version; None: a node that does not run
    node.write_text(f"#!/bin/sh\necho {version}\n" if version else "#!/bin/sh\nexit 127\n")
    node.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("version", ["20.0.0", "20.20.2", "22.11.0"])
def test_quiet_when_everything_is_there(tmp_path: Path, version: str) -> None:
    done = run_with_node(tmp_path, version)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize("version", ["18.20.4", "8.0.0", None])
def test_node_older_than_20_fails_clearly(tmp_path: Path, version: str | None) -> None:
    done = run_with_node(tmp_path, version)
    assert done.returncode == 1
    assert "Node.js >= 20" in done.stderr
    assert (version or "no working node") in done.stderr
    assert "Debian 12" in done.stderr
    assert done.stdout == ""
