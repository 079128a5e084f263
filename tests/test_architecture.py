"""The shape of the source tree, checked: no import cycles, pure modules stay pure,
no module uses another's private members."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "dwsps"

PURE = {
    "dwsps.topics",
    "dwsps.messages",
    "dwsps.errors",
    "dwsps.frames",
    "dwsps.dedup",
    "dwsps.interest",
    "dwsps.router",
    "dwsps.outbox",
    "dwsps.backoff",
    "dwsps.redact",
    "dwsps.config",
    "dwsps.links.envelope",
    "dwsps.permissions",
    "dwsps.limits",
    "dwsps.auth",
}
"""Modules that do no I/O: they may import neither asyncio nor a WebSocket library."""
IO_LIBRARIES = ("asyncio", "picows", "websockets", "redis", "socket", "ssl", "uvloop")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in SRC.rglob("*.py")}


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every module imported anywhere in ``tree`` (TYPE_CHECKING and function bodies too)."""
    out: set[str] = set()
    package = name if (SRC.parent / name.replace(".", "/") / "__init__.py").exists() else ""
    package = package or name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            for alias in node.names:  # `from dwsps.links import envelope` imports a module
                out.add(f"{base}.{alias.name}")
    return out


NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}
"""Underscored by the standard library to avoid field clashes, but public."""

MODULES = _modules()
GRAPH = {
    name: {m for m in _imports(name, tree) if m in MODULES and m != name}
    for name, tree in MODULES.items()
}


def test_the_import_graph_has_no_cycle() -> None:
    # A package's __init__ is imported by its submodules; that edge is not a cycle
    # unless the package imports the submodule back, which the search below sees.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_do_no_io(module: str) -> None:
    imported = _imports(module, MODULES[module])
    bad = sorted(m for m in imported if m.split(".")[0] in IO_LIBRARIES)
    assert not bad, f"{module} is pure but imports {bad}"
    impure = sorted(m for m in GRAPH[module] if m not in PURE and m != "dwsps")
    assert not impure, f"{module} is pure but imports the I/O modules {impure}"


def test_nothing_below_the_server_imports_it() -> None:
    users = sorted(m for m, deps in GRAPH.items() if "dwsps.server" in deps)
    assert set(users) <= {"dwsps", "dwsps.cli"}, users


def test_no_module_uses_another_objects_private_members() -> None:
    offences = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__") or attr in NAMEDTUPLE_API:
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "super":
                continue
            offences.append(f"{name}:{node.lineno} .{attr}")
    assert not offences, "private members used from outside: " + ", ".join(offences)
