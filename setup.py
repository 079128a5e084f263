"""The optional compiled build: ``DWSPS_COMPILE=1 pip install --no-build-isolation .``
(after ``pip install '.[dev]'``; ``make compiled`` does both) compiles the request path
(parse, route, fan-out plan, encode) with mypyc; without it dwsps is pure Python.

Everything else (metadata, dependencies) is in pyproject.toml. The compiled modules are the
same source, checked by ``mypy --strict``: mypyc turns their annotations into C types, so a
publish runs less bytecode (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import os
import runpy

from setuptools import setup


def _ext_modules() -> list[object]:
    if os.environ.get("DWSPS_COMPILE", "") not in ("1", "true", "yes"):
        return []
    # mypyc type-checks the modules it compiles, so it needs dwsps' dependencies installed
    # beside it: build with --no-build-isolation in an environment that has '.[dev]'
    # (make compiled does).
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit(
            "DWSPS_COMPILE=1 needs mypy (for mypyc) and dwsps' dependencies in the build "
            "environment: pip install '.[dev]', then DWSPS_COMPILE=1 pip install "
            "--no-build-isolation ."
        ) from exc

    names = runpy.run_path("src/dwsps/build.py")["COMPILED"]
    paths = ["src/" + name.replace(".", "/") + ".py" for name in names]
    return list(mypycify(paths, opt_level="3"))


setup(ext_modules=_ext_modules())
