"""The JavaScript client's TypeScript declarations (clients/js/dwsps.d.ts) type-check: ``tsc
--noEmit --strict`` over tests/interop/dwsps_types.ts, which uses the whole API and marks what
the declarations must refuse with ``@ts-expect-error`` (so declarations that decay to ``any``
fail too). ``typescript`` comes from tests/interop's package-lock (``make node-deps``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import scaled, unavailable

INTEROP = Path(__file__).parent / "interop"
TSC = INTEROP / "node_modules" / ".bin" / "tsc"

if shutil.which("node") is None:
    unavailable("node is not installed (make test installs it: scripts/install-system-deps.sh)")


def test_declarations_type_check_strictly() -> None:
    if not TSC.exists():
        pytest.fail("typescript missing: run `make node-deps` (npm ci in tests/interop)")
    done = subprocess.run(
        [
            str(TSC),
            "--noEmit",
            "--strict",
            "--target",
            "es2022",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            "--lib",
            "es2022,dom",
            "dwsps_types.ts",
        ],
        cwd=INTEROP,
        capture_output=True,
        text=True,
        timeout=scaled(120),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
