"""The shape of the source tree, checked: no import cycles, pure modules stay pure,
no module uses another's private members."""

from __future__ import annotations

import ast
import builtins
import re
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
    "dwsps.history",
    "dwsps.links.gaps",
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


def _documented_pure() -> set[str]:
    """The modules docs/architecture.md calls pure: its "Pure (no I/O)" list, and any
    other entry that says "(pure)" or "the pure" (e.g. ``history.py``, ``links/gaps.py``)."""
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    modules = doc.split("\n## Modules", 1)[1].split("\n## ", 1)[0]
    pure_list = modules.split("Pure (no I/O):", 1)[1].split("The asyncio layer:", 1)[0]
    found = set(re.findall(r"^- \*\*`([\w/]+)\.py`\*\*", pure_list, re.M))
    # One bullet per module (the indented ones are the files of links/); an entry may
    # name several modules (**`auth.py`**, **`permissions.py`**, ...).
    for entry in re.split(r"\n(?=\s*- )", modules):
        if not re.search(r"\(pure\)|the pure\b", entry):
            continue
        links = "links/" if entry.startswith(" ") else ""
        found.update(links + p for p in re.findall(r"`([\w/]+)\.py`", entry.split(" — ")[0]))
    return {"dwsps." + name.replace("/", ".") for name in found}


def test_every_module_documented_as_pure_is_checked() -> None:
    documented = _documented_pure()
    unknown = documented - set(MODULES)
    assert not unknown, f"docs/architecture.md names modules that do not exist: {unknown}"
    assert documented <= PURE, f"documented as pure but not in PURE: {documented - PURE}"
    assert not PURE - documented, f"in PURE but not documented as pure: {PURE - documented}"


def _exception_classes() -> dict[str, list[str]]:
    """Module -> the exception classes it defines, found by their bases (transitively:
    builtin exceptions, then any class derived from one found so far)."""
    known = {
        n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)
    }
    found: dict[str, list[str]] = {}
    grew = True
    while grew:
        grew = False
        for name, tree in MODULES.items():
            for node in ast.walk(tree):
                if not isinstance(node, ast.ClassDef) or node.name in found.get(name, []):
                    continue
                bases = {
                    b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
                }
                if bases & known:
                    known.add(node.name)
                    found.setdefault(name, []).append(node.name)
                    grew = True
    return found


def test_public_exceptions_are_defined_in_errors() -> None:
    # Private ones (``_Lost`` in client.py, ``_SessionLost`` in links/redis.py) are
    # control flow inside one module and never reach a caller: they may stay there.
    found = _exception_classes()
    assert {"DwspsError", "ConnectionLost"} <= set(found["dwsps.errors"]), "the search works"
    outside = sorted(
        f"{module}.{cls}"
        for module, classes in found.items()
        if module != "dwsps.errors"
        for cls in classes
        if not cls.startswith("_")
    )
    assert not outside, f"public exceptions outside errors.py: {outside}"


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
