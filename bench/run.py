#!/usr/bin/env python3
"""Benchmark dwsps builds against nats-server (WebSocket listener) and write a report.

Each case runs --runs times; within a run the targets of a case alternate (the order is
reversed every other run), and every measurement gets a fresh server pinned to CPU 0
(``taskset``). The load comes from the C generator in bench/loadgen (built by this script
with make if needed) pinned to CPU 1; it reports its own CPU use (``loadgenCpu``), so each
figure says whether the generator could have been the limit. A few ``dwsps bench`` (Python
client) figures are added for comparison.

    make bench                                    # build + self-test loadgen, then this script
    .venv/bin/python bench/run.py --runs 3        # the standard set, ~7 minutes
    .venv/bin/python bench/run.py --target before=/path/to/old/.venv/bin/dwsps \\
        --target after=.venv/bin/dwsps --cases fanout-100,fanout-1000 --runs 3

The standard set (every case, the one default target) rewrites docs/benchmarks.md; any other
selection writes bench/results/<stamp>/report.md unless --report says otherwise. Raw records
(every command, every JSON result) go to bench/results/<stamp>/raw.jsonl; the report is
rewritten after every measurement, so partial runs are kept. bench/results/ is ignored by
git: add a run worth keeping with `git add -f`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
COMPILED_BIN = ROOT / ".venv-compiled" / "bin"
"""``make compiled``: the same dwsps with its request path compiled by mypyc."""
LOADGEN_DIR = ROOT / "bench" / "loadgen"
SERVER_CPU, LOADGEN_CPU = 0, 1
NATS = "nats"
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
WORKERS_SUFFIX = re.compile(r":workers=(\d+)$")


@dataclass(frozen=True)
class Case:
    """One measurement: a loadgen scenario, its options, and whether nats-server runs it too."""

    name: str
    scenario: str
    args: tuple[str, ...]
    reference: bool = True


# rooms uses --flow e2e: a publish completes when every subscriber of its room has it. The
# default (ack) flow means "the server accepted it" for dwsps but "a PONG after a batch of 50"
# for NATS, and lets either server queue without bound, so e2e is the like-for-like shape.
CASES = [
    Case("fanout-1000", "fanout", ("--subs", "1000")),
    Case("fanout-100", "fanout", ("--subs", "100")),
    Case("latency-100x500", "latency", ("--subs", "100", "--rate", "500")),
    Case("latency-1000x1000", "latency", ("--subs", "1000", "--rate", "1000")),
    Case("latency-1000x2000", "latency", ("--subs", "1000", "--rate", "2000")),
    Case(
        "rooms-a",
        "rooms",
        ("--subs", "1000", "--rooms", "100", "--pubs", "10", "--flow", "e2e"),
    ),
    Case(
        "rooms-b",
        "rooms",
        (
            "--subs",
            "2000",
            "--rooms",
            "200",
            "--pubs",
            "20",
            "--subs-per-conn",
            "2",
            "--flow",
            "e2e",
        ),
    ),
    # Idle means idle: a dwsps connection gives its WebSocket parser back one to two idle
    # sweeps (--idle-sweep, 1 s) after its last input, so RSS is read 3 s after the last
    # connection subscribed (nats-server is measured the same way).
    Case("connections-10000", "connections", ("--subs", "10000", "--settle", "3")),
    Case("peered-1000", "peered", ("--subs", "1000", "--flow", "e2e"), reference=False),
]
CASE_BY_NAME = {c.name: c for c in CASES}


class BenchError(Exception):
    """A setup problem that stops the run, reported without a traceback."""


class ServerStartError(BenchError):
    """A server did not come up; the measurement is recorded as failed and the run goes on."""


@dataclass(frozen=True)
class Target:
    """A server to measure: a dwsps executable, or the nats-server reference."""

    name: str
    exe: Path
    workers: int = 1
    """``dwsps serve --workers N`` (the CPU of the supervisor and every worker is counted)."""

    @property
    def is_nats(self) -> bool:
        return self.name == NATS


# -- paths as a reader can paste them -------------------------------------


def default_targets() -> list[Target]:
    """The pure-Python build of this venv, and the compiled build when there is one."""
    targets = [Target("dwsps", VENV_BIN / "dwsps")]
    if os.access(COMPILED_BIN / "dwsps", os.X_OK):
        targets.append(Target("mypyc", COMPILED_BIN / "dwsps"))
    return targets


def shown(arg: str, tmp: Path | None = None) -> str:
    """An argument as printed in records and reports: files in the run's temporary directory
    by name, files in the repository relative to its root, anything else as is."""
    if tmp is not None and arg.startswith(f"{tmp}{os.sep}"):
        return Path(arg).name
    if arg.startswith(f"{ROOT}{os.sep}"):
        return os.path.relpath(arg, ROOT)
    return arg


def shown_cmd(cmd: list[str], tmp: Path | None = None) -> list[str]:
    return [shown(a, tmp) for a in cmd]


# -- servers --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-400:].strip()
            raise ServerStartError(f"server exited with {proc.returncode}: {tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise ServerStartError(f"nothing listening on port {port} after {limit:.0f} s")


@dataclass
class Started:
    """A running server and how to show the command that started it."""

    proc: subprocess.Popen[bytes]
    url: str
    cmd: list[str]
    nats_config: str | None = None
    pids: tuple[int, ...] = ()
    """Every process of the server (a --workers supervisor and its workers)."""


def start_server(target: Target, tmp: Path, peer: str | None = None) -> Started:
    """Start a server pinned to SERVER_CPU."""
    port = free_port()
    nats_config = None
    if target.is_nats:
        conf = tmp / f"nats-{port}.conf"
        nats_config = (
            f"listen: 127.0.0.1:{free_port()}\n"
            f"websocket {{ host: 127.0.0.1, port: {port}, no_tls: true }}\n"
        )
        conf.write_text(nats_config)
        cmd = [str(target.exe), "-c", str(conf)]
    else:
        cmd = [str(target.exe), "serve", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--log-level", "warning"]
        if peer:
            cmd += ["--peer", peer]
        if target.workers > 1:
            cmd += ["--workers", str(target.workers)]
    cmd = ["taskset", "-c", str(SERVER_CPU), *cmd]
    log = tmp / f"server-{port}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=err)
    try:
        wait_port(port, proc, log)
        pids = wait_workers(proc, target.workers, log)
    except ServerStartError:
        stop(proc)
        raise
    return Started(proc, f"ws://127.0.0.1:{port}", cmd, nats_config, pids)


def wait_workers(
    proc: subprocess.Popen[bytes], workers: int, log: Path, limit: float = 15.0
) -> tuple[int, ...]:
    """The server's pids, once a --workers supervisor says every worker listens."""
    if workers <= 1:
        return (proc.pid,)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if f"({workers} workers)" in log.read_text(errors="replace"):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            return (proc.pid, *map(int, children))
        time.sleep(0.05)
    raise ServerStartError(f"not every one of {workers} workers listened after {limit:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def servers(target: Target, case: Case, tmp: Path) -> Iterator[list[Started]]:
    """Fresh server(s) for one measurement; peered yields [A (publisher side), B]."""
    started: list[Started] = []
    try:
        if case.scenario == "peered":
            b = start_server(target, tmp)
            started.append(b)
            started.insert(0, start_server(target, tmp, peer=b.url))
            time.sleep(0.5)  # let A's peer link come up (the generator also probes)
        else:
            started.append(start_server(target, tmp))
        yield started
    finally:
        for s in reversed(started):
            stop(s.proc)


def servers_shown(started: list[Started], tmp: Path) -> str:
    """The commands that started a measurement's servers, B first for peered."""
    lines = []
    for s in reversed(started):
        if s.nats_config is not None:
            conf = s.cmd[-1]
            text = s.nats_config.replace("\\", "\\\\").replace("%", "%%").replace("\n", "\\n")
            lines.append(f"printf {shlex.quote(text)} > {shown(conf, tmp)}")
        lines.append(" ".join(shown_cmd(s.cmd, tmp)))
    return "\n".join(lines)


# -- generators -----------------------------------------------------------


def build_loadgen() -> Path:
    """Build bench/loadgen/loadgen if it is missing or older than its source."""
    subprocess.run(["make", "-s", "-C", str(LOADGEN_DIR), "loadgen"], check=True)
    return LOADGEN_DIR / "loadgen"


def loadgen_cmd(loadgen: Path, target: Target, case: Case, started: list[Started]) -> list[str]:
    proto = NATS if target.is_nats else "dwsps"
    cmd = ["taskset", "-c", str(LOADGEN_CPU), str(loadgen), "--proto", proto, "--quiet"]
    cmd += ["--scenario", case.scenario, *case.args]
    if case.scenario == "peered":
        cmd += ["--pub-url", started[0].url, "--url", started[1].url]
    else:
        cmd += ["--url", started[0].url]
    return [*cmd, "--server-pid", ",".join(str(p) for s in started for p in s.pids)]


def pybench_cmd(client: Path, case: Case, started: list[Started], out: Path) -> list[str]:
    cmd = ["taskset", "-c", str(LOADGEN_CPU), str(client), "bench", case.scenario]
    cmd += ["--quiet", *case.args, "--json", str(out)]
    cmd += ["--url", started[0].url]
    return [*cmd, "--server-pid", ",".join(str(p) for s in started for p in s.pids)]


def measure(cmd: list[str], json_file: Path | None) -> dict[str, Any]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "generator did not finish in 300 s"}
    text = out.stdout if json_file is None else json_file.read_text() if json_file.exists() else ""
    try:
        result: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError:
        return {"error": f"rc={out.returncode}: {out.stderr[-500:]}"}
    if "loadgenCpu" not in result and "clientCpu" in result:
        result["loadgenCpu"] = result["clientCpu"]
    return result


# -- report ---------------------------------------------------------------

METRICS: dict[str, list[tuple[str, str]]] = {
    "fanout": [("deliveriesPerSec", "deliveries/s")],
    "peered": [("deliveriesPerSec", "deliveries/s")],
    "rooms": [("deliveriesPerSec", "deliveries/s"), ("p50ms", "p50 ms"), ("p99ms", "p99 ms")],
    "latency": [("p50ms", "p50 ms"), ("p99ms", "p99 ms"), ("maxms", "max ms")],
    "connections": [("kbPerConnection", "KB/connection")],
}
# The one figure per scenario that the ratio table compares, and which way is better.
HEADLINE: dict[str, tuple[str, str, bool]] = {
    "fanout": ("deliveriesPerSec", "deliveries/s", True),
    "peered": ("deliveriesPerSec", "deliveries/s", True),
    "rooms": ("deliveriesPerSec", "deliveries/s", True),
    "latency": ("p99ms", "p99 ms", False),
    "connections": ("kbPerConnection", "KB/connection", False),
}
ANOMALIES = ("lost", "duplicates", "outOfOrder", "misrouted")
# Throughput scenarios keep the server at a full core when it has one; less means it shared
# the CPU with something else. (Not peered: A and B on one core hand work to each other and
# sum to 0.86-0.91 on a quiet machine.)
CPU_BOUND = ("fanout", "rooms")
BUSY_CPU = 0.9

Records = dict[tuple[str, str, str], list[dict[str, Any]]]


def _value(rec: dict[str, Any], key: str) -> float | None:
    value = rec.get(key)
    if value is None and key.endswith("ms"):
        value = rec.get("latencyMs", {}).get(key[:-2])
    return float(value) if isinstance(value, int | float) else None


def _cpu(rec: dict[str, Any]) -> float | None:
    cpu = rec.get("serverCpu")
    if isinstance(cpu, list) and cpu and all(isinstance(c, int | float) for c in cpu):
        return float(sum(cpu))
    return None


def _fmt(x: float) -> str:
    if x >= 10_000:
        return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def summarize(values: list[float], fmt: Callable[[float], str] = _fmt) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"**{fmt(med)}** ({fmt(min(values))}-{fmt(max(values))})"


def median(records: list[dict[str, Any]], key: str) -> float | None:
    values = [v for r in records if (v := _value(r, key)) is not None]
    return statistics.median(values) if values else None


def anomalies(recs: list[dict[str, Any]]) -> str:
    """Lost, duplicated, reordered and misrouted deliveries summed over runs, plus failures.

    What was still missing when the drain timed out is a backlog (the server was behind),
    not a loss: the generator counts it in `lost` as `tailMissing`."""
    counts = {k: sum(int(r.get(k) or 0) for r in recs) for k in (*ANOMALIES, "backlog")}
    for r in recs:
        if r.get("drainStoppedBy") == "timeout":
            tail = int(r.get("tailMissing") or 0)
            counts["lost"] -= tail
            counts["backlog"] += tail
    text = ", ".join(f"{k} {n}" for k, n in counts.items() if n) or "0"
    failed = sum(1 for r in recs if "error" in r)
    return text + (f" ({failed} failed runs)" if failed else "")


def machine() -> dict[str, str]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    lscpu = sh("lscpu")
    model = re.search(r"Model name:\s*(.+)", lscpu)
    return {
        "cpu": model.group(1) if model else "?",
        "nproc": sh("nproc"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats": sh(str(VENV_BIN / "nats-server"), "--version"),
        "lscpu": lscpu,
    }


def describe_target(exe: Path) -> str:
    """The dwsps version and git revision an executable runs (from its venv's python)."""
    probe = (
        "import dwsps, importlib.metadata, pathlib;"
        "print(importlib.metadata.version('dwsps'));"
        "print(pathlib.Path(dwsps.__file__).resolve().parent);"
        "from dwsps import build; print(build.describe())"
    )
    try:
        out = subprocess.run(
            [str(exe.parent / "python"), "-c", probe], capture_output=True, text=True, timeout=30
        )
        version, pkg, *rest = out.stdout.split("\n")
        # A build before dwsps.build (an older revision) prints no third line.
        kind = f", {rest[0]}" if rest and rest[0] else ""
        if "site-packages" in pkg:
            # Not editable (make compiled): the revision is the working tree it was built from.
            pkg = str(ROOT)
        rev = subprocess.run(
            ["git", "-C", pkg, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", pkg, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return "unknown revision"
    if not rev:
        return f"dwsps {version}{kind}"
    return f"dwsps {version}{kind}, git {rev}" + (" + uncommitted changes" if dirty else "")


def starved(records: list[dict[str, Any]]) -> tuple[int, int]:
    """(measurements with server CPU below BUSY_CPU, all) over the CPU-bound scenarios."""
    cpus = [
        _cpu(r["result"])
        for r in records
        if r["generator"] == "loadgen-c" and CASE_BY_NAME[r["case"]].scenario in CPU_BOUND
    ]
    known = [c for c in cpus if c is not None]
    return sum(1 for c in known if c < BUSY_CPU), len(known)


def group(records: list[dict[str, Any]]) -> Records:
    by: Records = {}
    for rec in records:
        by.setdefault((rec["case"], rec["target"], rec["generator"]), []).append(rec["result"])
    return by


def issue4_table(by: Records, target: str, cases: list[Case]) -> list[str]:
    """The goals of issue 4 for one dwsps target, against nats-server (selected cases only)."""

    def m(case: str, name: str, key: str) -> float | None:
        return median(by.get((case, name, "loadgen-c"), []), key)

    rows = []
    checks = [
        ("fanout 1000 subs ≥ 1.0x nats", "fanout-1000", "deliveriesPerSec", 1.0, True),
        ("fanout 100 subs ≥ 0.8x nats", "fanout-100", "deliveriesPerSec", 0.8, True),
        ("latency 100x500/s p99 ≤ 1.5x nats", "latency-100x500", "p99ms", 1.5, False),
    ]
    selected = {c.name for c in cases}
    for label, case, key, factor, higher in checks:
        if case not in selected:
            continue
        d, n = m(case, target, key), m(case, NATS, key)
        if d is None or n is None:
            rows.append(f"| {label} | - | - | - | not measured |")
            continue
        ratio = d / n
        ok = ratio >= factor if higher else ratio <= factor
        rows.append(
            f"| {label} | {_fmt(d)} | {_fmt(n)} | {ratio:.2f}x | {'met' if ok else 'NOT met'} |"
        )
    kb = m("connections-10000", target, "kbPerConnection")
    if kb is not None:
        nkb = m("connections-10000", NATS, "kbPerConnection")
        rows.append(
            f"| ≤ 8 KB per idle subscribed connection at 10,000 | {kb:.2f} KB | "
            f"{'-' if nkb is None else f'{nkb:.2f} KB'} | - | {'met' if kb <= 8 else 'NOT met'} |"
        )
    peered = m("peered-1000", target, "deliveriesPerSec")
    single = m("fanout-1000", target, "deliveriesPerSec")
    if peered is not None and single:
        ratio = peered / single
        rows.append(
            f"| peered ≥ 0.7x single-server fanout (1000 subs) | {_fmt(peered)} | "
            f"single {_fmt(single)} | {ratio:.2f}x | {'met' if ratio >= 0.7 else 'NOT met'} |"
        )
    return rows


def paired_ratios(
    records: list[dict[str, Any]], case: str, a: str, b: str, key: str
) -> list[float]:
    """a/b for every run in which both were measured: alternation pairs them in time."""
    runs: dict[int, dict[str, float]] = {}
    for rec in records:
        if rec["case"] == case and rec["generator"] == "loadgen-c" and rec["target"] in (a, b):
            value = _value(rec["result"], key)
            if value is not None:
                runs.setdefault(rec["run"], {})[rec["target"]] = value
    return [r[a] / r[b] for r in runs.values() if a in r and b in r and r[b]]


def ratio_table(records: list[dict[str, Any]], targets: list[str], cases: list[Case]) -> list[str]:
    """Headline figure per case and target, with later targets / the first and each / nats."""
    by = group(records)
    refs = [NATS] if any(r["target"] == NATS for r in records) else []
    pairs = [(t, targets[0]) for t in targets[1:]] + [(t, r) for r in refs for t in targets]
    names = [*targets, *refs]
    head = ["case", "metric", *names, *(f"{a}/{b}" for a, b in pairs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        key, label, higher = HEADLINE[case.scenario]
        values = [median(by.get((case.name, t, "loadgen-c"), []), key) for t in names]
        if all(v is None for v in values):
            continue
        cells = [case.name, f"{label} ({'higher' if higher else 'lower'} is better)"]
        cells += ["-" if v is None else _fmt(v) for v in values]
        for a, b in pairs:
            ratios = paired_ratios(records, case.name, a, b, key)
            cells.append(summarize(ratios, lambda x: f"{x:.2f}x"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(path: Path, records: list[dict[str, Any]], info: dict[str, Any]) -> None:
    by = group(records)
    mach = info["machine"]
    # Records written before targets were recorded have the one target "dwsps".
    targets: dict[str, dict[str, str]] = info.get("targets") or {"dwsps": {}}
    names = list(targets)
    cases = [CASE_BY_NAME[c] for c in info.get("cases", [c.name for c in CASES])]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py`; do not edit by hand. Raw records (every command, every",
        f"JSON result): `{info['raw']}`.",
        "",
    ]
    intro = Path(__file__).with_name("intro.md")
    if intro.exists():  # how to run and compare, written by hand
        lines += [intro.read_text().rstrip(), ""]
    lines += [
        "## Cases",
        "",
        "| case | generator arguments | nats-server too |",
        "|---|---|---|",
        *(
            f"| {c.name} | `--scenario {c.scenario} {' '.join(c.args)}` | "
            f"{'yes' if c.reference else 'no'} |"
            for c in CASES
        ),
        "",
        "## This run",
        "",
        f"- Run: {info['started']} - {info.get('finished', 'in progress')}, "
        f"{info['runs']} run(s) per case, targets alternating, a fresh server per measurement.",
        f"- Machine: {mach['cpu']}, {mach['nproc']} CPUs, Linux {mach['kernel']}, "
        f"Python {mach['python']}, {mach['nats']}.",
    ]
    for name, t in targets.items():
        if t:
            lines.append(f"- Target `{name}`: `{t['path']}` ({t['revision']}).")
    busy, bound = starved(records)
    if busy:
        lines.append(
            f"- **Busy machine**: in {busy} of {bound} throughput measurements the server had"
            f" less than {BUSY_CPU:.2f} of its core; compare ratios, not absolute figures."
        )
    lines += [
        f"- Servers pinned to CPU {SERVER_CPU} (`taskset -c {SERVER_CPU}`); the generator "
        f"pinned to CPU {LOADGEN_CPU}. Peered: A and B both on CPU {SERVER_CPU} (their CPU "
        "figures add up).",
        "- Figures: **median** (min-max). `server CPU` and `generator CPU` are fractions of one",
        "  core over the measurement window; a generator near 1.0 may have been the limit.",
        "",
        "## Ratios",
        "",
        "Ratios are per run (targets measured back to back), then median (min-max) over runs.",
        "",
        *ratio_table(records, names, cases),
        "",
    ]
    for name in names:
        lines += [
            f"## Targets (issue 4; C generator figures{f', `{name}`' if len(names) > 1 else ''})",
            "",
            "| target | dwsps | reference | ratio | |",
            "|---|---|---|---|---|",
            *issue4_table(by, name, cases),
            "",
        ]
    lines += [
        "## All figures",
        "",
        "| case | target | generator | metric | value | server CPU | generator CPU | lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {n: i for i, n in enumerate([*names, NATS])}
    for case in cases:
        keys = sorted(
            (k for k in by if k[0] == case.name), key=lambda k: (order.get(k[1], 99), k[2])
        )
        if not keys:
            cmd = " ".join(["bench/loadgen/loadgen", "--scenario", case.scenario, *case.args])
            lines.append(f"| {case.name} | - | - | not yet measured (`{cmd}`) | - | - | - | - |")
        for key in keys:
            recs = by[key]
            cpu = summarize([c for r in recs if (c := _cpu(r)) is not None])
            lg = summarize([float(r["loadgenCpu"]) for r in recs if "loadgenCpu" in r])
            for metric, label in METRICS[case.scenario]:
                values = [v for r in recs if (v := _value(r, metric)) is not None]
                cells = [*key, label, summarize(values), cpu, lg, anomalies(recs)]
                lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "`lost` sums lost, duplicated, out-of-order and misrouted deliveries over the runs;",
        "`backlog` counts deliveries still on their way when the drain timed out (the server",
        "was behind, nothing was dropped).",
        "`dwsps-bench` rows come from `dwsps bench` (one Python process parsing and checking",
        "every delivery): it saturates its own core at roughly half a million deliveries per",
        "second, so those rows measure the client, not the server.",
        "",
        "## Commands",
        "",
        "From the repository root; a fresh server per measurement (ports and PIDs vary):",
        "",
        "```sh",
    ]
    seen: set[tuple[str, str, str]] = set()
    for rec in records:
        key = (rec["case"], rec["target"], rec["generator"])
        if key not in seen:
            seen.add(key)
            lines.append(f"# {', '.join(key)}")
            lines.append(rec["servers"])
            lines.append(" ".join(rec["command"]))
    lines += ["```", ""]
    notes = Path(__file__).with_name("notes.md")
    if notes.exists():  # the hand-written analysis: what bounds each figure, what was tuned
        lines += [notes.read_text().rstrip(), ""]
    lines += ["## Machine", "", "```", mach["lscpu"], "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# -- main -----------------------------------------------------------------


def parse_target(spec: str) -> Target:
    name, sep, exe = spec.partition("=")
    workers = 1
    if found := WORKERS_SUFFIX.search(exe):
        exe, workers = exe[: found.start()], int(found.group(1))
    if not sep or not TARGET_NAME.fullmatch(name) or not exe or workers < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH_TO_DWSPS[:workers=N], got {spec!r}")
    if name == NATS:
        raise argparse.ArgumentTypeError(f"{NATS!r} is the reference server's name")
    return Target(name, Path(exe).absolute(), workers)


def parse_cases(spec: str) -> list[Case]:
    names = [n for n in spec.split(",") if n]
    unknown = [n for n in names if n not in CASE_BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(CASE_BY_NAME)}"
        )
    return [c for c in CASES if c.name in names]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def preflight(targets: list[Target], nats: Target | None) -> None:
    if shutil.which("taskset") is None:
        raise BenchError("taskset not found (util-linux): servers and generator are pinned")
    if not {SERVER_CPU, LOADGEN_CPU} <= os.sched_getaffinity(0):
        raise BenchError(f"needs CPUs {SERVER_CPU} and {LOADGEN_CPU} (one for each side)")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise BenchError(f"target names must differ: {', '.join(names)}")
    for t in [*targets, *([nats] if nats else [])]:
        if not os.access(t.exe, os.X_OK):
            hint = " (pip install -e '.[bench]')" if t.is_nats else ""
            raise BenchError(f"target {t.name}: {t.exe} is not an executable{hint}")
    for t in targets:
        out = subprocess.run([str(t.exe), "serve", "--help"], capture_output=True, text=True)
        if out.returncode or "--log-level" not in out.stdout:
            raise BenchError(f"target {t.name}: `{t.exe} serve` has no --log-level option")


Plan = list[tuple[int, Case, Target, str]]


def make_plan(runs: int, cases: list[Case], targets: list[Target], nats: Target | None) -> Plan:
    """(run, case, target, generator) in measurement order: per run, each case measures all
    its targets back to back, in the reverse order every other run."""
    plan: Plan = []
    for run in range(runs):
        for case in cases:
            order = [*targets, *([nats] if nats and case.reference else [])]
            if run % 2:
                order.reverse()
            plan += [(run, case, t, "loadgen-c") for t in order]
    return plan


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=positive, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--cases",
        type=parse_cases,
        default=CASES,
        help=f"comma-separated, from: {', '.join(CASE_BY_NAME)} (default all)",
    )
    parser.add_argument(
        "--target",
        type=parse_target,
        action="append",
        metavar="NAME=PATH[:workers=N]",
        help="a dwsps executable to measure, repeatable, in this order; :workers=N runs it"
        " with --workers N "
        f"(default dwsps={shown(str(VENV_BIN / 'dwsps'))}, and mypyc="
        f"{shown(str(COMPILED_BIN / 'dwsps'))} when make compiled has built it)",
    )
    parser.add_argument("--no-nats", action="store_true", help="skip the nats-server reference")
    parser.add_argument("--no-python-client", action="store_true", help="skip dwsps bench rows")
    parser.add_argument(
        "--report",
        type=Path,
        help="default: docs/benchmarks.md for the standard set, else results/<stamp>/report.md",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--rewrite", type=Path, metavar="RAW", help="only rewrite the report from a raw.jsonl"
    )
    args = parser.parse_args()
    if args.rewrite:
        old = args.rewrite.read_text().splitlines()
        meta = json.loads((args.rewrite.parent / "machine.json").read_text())
        write_report(
            args.report or ROOT / "docs" / "benchmarks.md", [json.loads(r) for r in old], meta
        )
        return 0

    standard = args.target is None and args.cases == CASES and not args.no_nats
    targets: list[Target] = args.target or default_targets()
    cases: list[Case] = args.cases
    nats = None if args.no_nats else Target(NATS, VENV_BIN / "nats-server")
    if nats is not None and not any(c.reference for c in cases):
        nats = None
    client = VENV_BIN / "dwsps"
    pybench_cases = [] if args.no_python_client else [
        c for c in cases if c.name in ("fanout-100", "latency-100x500")
    ]  # fmt: skip
    if pybench_cases and not os.access(client, os.X_OK):
        raise BenchError(
            f"no dwsps client at {client}: use the venv's python or --no-python-client"
        )
    preflight(targets, nats)
    loadgen = build_loadgen()

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    outdir = args.results.absolute() / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    raw = outdir / "raw.jsonl"
    report: Path = args.report or (
        ROOT / "docs" / "benchmarks.md" if standard else outdir / "report.md"
    )
    info: dict[str, Any] = {
        "started": stamp,
        "runs": args.runs,
        "raw": shown(str(raw)),
        "cases": [c.name for c in cases],
        "targets": {
            t.name: {"path": shown(str(t.exe)), "revision": describe_target(t.exe)} for t in targets
        },
        "machine": machine(),
    }
    (outdir / "machine.json").write_text(json.dumps(info, indent=2))

    plan = make_plan(args.runs, cases, targets, nats)
    plan += [(0, c, t, "dwsps-bench") for c in pybench_cases for t in targets]

    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dwsps-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for i, (run, case, target, gen) in enumerate(plan, 1):
            print(
                f"[{i}/{len(plan)}] run {run + 1} {case.name} {target.name} ({gen})",
                file=sys.stderr,
                flush=True,
            )
            json_file = None if gen == "loadgen-c" else tmp / f"pybench-{i}.json"
            try:
                with servers(target, case, tmp) as started:
                    if json_file is None:
                        cmd = loadgen_cmd(loadgen, target, case, started)
                    else:
                        cmd = pybench_cmd(client, case, started, json_file)
                    result = measure(cmd, json_file)
                    server_cmds = servers_shown(started, tmp)
            except ServerStartError as e:
                result, cmd, server_cmds = {"error": str(e)}, [], f"# {target.name}: {e}"
            rec = {
                "run": run + 1,
                "case": case.name,
                "target": target.name,
                "generator": gen,
                "servers": server_cmds,
                "command": shown_cmd(cmd, tmp),
                "result": result,
            }
            records.append(rec)
            with raw.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            keys = ("deliveriesPerSec", "p99ms", "kbPerConnection", "serverCpu", "loadgenCpu")
            summary = {
                k: result[k] for k in (*keys, *ANOMALIES, "drainStoppedBy", "error") if k in result
            }
            print(f"    {summary}", file=sys.stderr, flush=True)
            write_report(report, records, info)
    info["finished"] = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (outdir / "machine.json").write_text(json.dumps(info, indent=2))
    write_report(report, records, info)
    print("\n".join(ratio_table(records, [t.name for t in targets], cases)))
    print(f"wrote {shown(str(report))} and {shown(str(raw))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(main())
    except (BenchError, subprocess.CalledProcessError) as e:
        sys.exit(f"bench/run.py: {e}")
