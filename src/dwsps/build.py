"""Which build this is: pure Python, or with the request path compiled by mypyc.

``DWSPS_COMPILE=1 pip install --no-build-isolation .`` (``make compiled``) compiles
:data:`COMPILED`; setup.py reads the list from here, so this module imports nothing but the
standard library.
"""

from __future__ import annotations

import importlib
from typing import Final

COMPILED: Final = (
    "dwsps.frames",
    "dwsps.messages",
    "dwsps.topics",
    "dwsps.dedup",
    "dwsps.limits",
    "dwsps.router",
    "dwsps.writer",
    "dwsps.interest",
    "dwsps.outbox",
    "dwsps.history",
    "dwsps.hub",
    "dwsps.events",
)
"""The request path, in the order a publish meets it, and the event emitter it asks. Modules
that subclass picows' or asyncio's protocol classes (connection, stream, listener) stay
interpreted: mypyc cannot compile a subclass of another extension's type."""


def compiled_modules() -> list[str]:
    """The modules of :data:`COMPILED` that this installation runs compiled."""
    return [
        name
        for name in COMPILED
        if not str(getattr(importlib.import_module(name), "__file__", "")).endswith(".py")
    ]


def kind() -> str:
    """``mypyc`` (every module of :data:`COMPILED` is compiled), ``pure``, or ``partial``."""
    done = len(compiled_modules())
    return "pure" if done == 0 else "mypyc" if done == len(COMPILED) else "partial"


def describe() -> str:
    """For ``dwsps --version`` and the startup log: which build, in words."""
    done = len(compiled_modules())
    if done == 0:
        return "pure Python"
    if done == len(COMPILED):
        return f"mypyc-compiled request path, {done} modules"
    return f"partly mypyc-compiled request path, {done} of {len(COMPILED)} modules"
