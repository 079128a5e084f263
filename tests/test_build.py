"""The build: what the compiled build compiles, and that each run tests the build it means to."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from dwsps import build

SRC = Path(__file__).resolve().parent.parent / "src" / "dwsps"


def test_compiled_modules_exist_and_subclass_no_extension_type() -> None:
    # mypyc cannot compile a subclass of picows' or asyncio's classes (it crashed on them).
    for name in build.COMPILED:
        path = SRC / (name.removeprefix("dwsps.").replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                assert not any(b.startswith(("WS", "asyncio.", "picows.")) for b in bases), (
                    f"{name}.{node.name} subclasses {bases}"
                )


def test_build_kind_is_the_one_this_run_expects() -> None:
    # make test sets DWSPS_EXPECT_BUILD for each of its two runs, so the compiled run
    # cannot quietly test the pure build (or a partial one).
    expected = os.environ.get("DWSPS_EXPECT_BUILD")
    if expected is None:
        pytest.skip("DWSPS_EXPECT_BUILD is not set")
    assert build.kind() == expected, build.compiled_modules()
