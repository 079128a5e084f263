"""bench/run.py: target and case options, run order, ratios and the report (no servers run)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


run = _load()


def test_target_option() -> None:
    target = run.parse_target("before=/opt/old/.venv/bin/dwsps")
    assert (target.name, target.exe) == ("before", Path("/opt/old/.venv/bin/dwsps"))
    assert run.parse_target("after=.venv/bin/dwsps").exe == Path.cwd() / ".venv/bin/dwsps"


@pytest.mark.parametrize("spec", ["before", "=x", "before=", "a b=x", "nats=/usr/bin/dwsps"])
def test_bad_target_option(spec: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        run.parse_target(spec)


def test_cases_option_keeps_the_published_order() -> None:
    cases = run.parse_cases("rooms-a,fanout-100")
    assert [c.name for c in cases] == ["fanout-100", "rooms-a"]


def test_unknown_case_names_the_choices() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="fanout-1000") as err:
        run.parse_cases("fanout-100,fanout-7")
    assert "fanout-7" in str(err.value)


def test_published_cases_include_rooms_and_latency_at_1000() -> None:
    args = {c.name: (c.scenario, c.args) for c in run.CASES}
    assert args["rooms-a"][1][:6] == ("--subs", "1000", "--rooms", "100", "--pubs", "10")
    assert "--subs-per-conn" in args["rooms-b"][1]
    assert args["latency-1000x2000"] == ("latency", ("--subs", "1000", "--rate", "2000"))


def test_plan_alternates_targets_and_nats() -> None:
    before, after = run.Target("before", Path("/b")), run.Target("after", Path("/a"))
    nats = run.Target(run.NATS, Path("/n"))
    cases = run.parse_cases("fanout-100,peered-1000")
    plan = run.make_plan(3, cases, [before, after], nats)
    order = [(r, c.name, t.name) for r, c, t, _ in plan]
    assert order == [
        (0, "fanout-100", "before"), (0, "fanout-100", "after"), (0, "fanout-100", "nats"),
        (0, "peered-1000", "before"), (0, "peered-1000", "after"),
        (1, "fanout-100", "nats"), (1, "fanout-100", "after"), (1, "fanout-100", "before"),
        (1, "peered-1000", "after"), (1, "peered-1000", "before"),
        (2, "fanout-100", "before"), (2, "fanout-100", "after"), (2, "fanout-100", "nats"),
        (2, "peered-1000", "before"), (2, "peered-1000", "after"),
    ]  # fmt: skip


def test_shown_paths_are_relative_to_the_repository(tmp_path: Path) -> None:
    assert run.shown(str(ROOT / "bench" / "loadgen" / "loadgen")) == "bench/loadgen/loadgen"
    assert run.shown(str(tmp_path / "nats-4222.conf"), tmp_path) == "nats-4222.conf"
    assert run.shown("/opt/old/.venv/bin/dwsps", tmp_path) == "/opt/old/.venv/bin/dwsps"
    assert run.shown("ws://127.0.0.1:8000") == "ws://127.0.0.1:8000"


def _rec(run_no: int, case: str, target: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": run_no,
        "case": case,
        "target": target,
        "generator": "loadgen-c",
        "servers": "",
        "command": [],
        "result": result,
    }


def test_ratios_pair_runs() -> None:
    records = [
        _rec(1, "fanout-100", "before", {"deliveriesPerSec": 100}),
        _rec(1, "fanout-100", "after", {"deliveriesPerSec": 150}),
        _rec(1, "fanout-100", "nats", {"deliveriesPerSec": 50}),
        _rec(2, "fanout-100", "nats", {"deliveriesPerSec": 40}),
        _rec(2, "fanout-100", "after", {"deliveriesPerSec": 120}),
        _rec(2, "fanout-100", "before", {"error": "server exited with 2"}),
    ]
    assert run.paired_ratios(records, "fanout-100", "after", "before", "deliveriesPerSec") == [1.5]
    assert run.paired_ratios(records, "fanout-100", "after", "nats", "deliveriesPerSec") == [
        3.0,
        3.0,
    ]
    table = run.ratio_table(records, ["before", "after"], run.parse_cases("fanout-100"))
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head == [
        "case", "metric", "before", "after", "nats", "after/before", "before/nats", "after/nats",
    ]  # fmt: skip
    row = [c.strip() for c in table[2].strip("|").split("|")]
    assert row[5:] == ["1.50x", "2.00x", "**3.00x** (3.00x-3.00x)"]


def test_report_marks_a_busy_machine_and_unmeasured_cases(tmp_path: Path) -> None:
    info = {
        "started": "20260101T000000Z",
        "runs": 1,
        "raw": "bench/results/20260101T000000Z/raw.jsonl",
        "cases": ["fanout-100", "rooms-a"],
        "targets": {"dwsps": {"path": ".venv/bin/dwsps", "revision": "git abc1234"}},
        "machine": {k: "?" for k in ("cpu", "nproc", "kernel", "python", "nats", "lscpu")},
    }
    records = [_rec(1, "fanout-100", "dwsps", {"deliveriesPerSec": 1e6, "serverCpu": [0.5]})]
    report = tmp_path / "report.md"
    run.write_report(report, records, info)
    text = report.read_text()
    assert "**Busy machine**: in 1 of 1 throughput measurements" in text
    assert "| rooms-a | - | - | not yet measured" in text
    assert "Target `dwsps`: `.venv/bin/dwsps` (git abc1234)" in text


@pytest.mark.parametrize("stamp", sorted(p.parent.name for p in RESULTS.glob("*/raw.jsonl")))
def test_kept_records_rewrite_without_machine_paths(tmp_path: Path, stamp: str) -> None:
    raw = RESULTS / stamp / "raw.jsonl"
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    info = json.loads((raw.parent / "machine.json").read_text())
    report = tmp_path / "benchmarks.md"
    run.write_report(report, records, info)
    commands = report.read_text().split("## Commands", 1)[1].split("```")[1]
    assert "bench/loadgen/loadgen --proto" in commands
    assert "/tmp" not in commands
    assert "/work" not in commands
    assert str(ROOT) not in commands


def test_a_drain_timeout_is_a_backlog_not_a_loss() -> None:
    behind = {"lost": 30, "gapLost": 0, "tailMissing": 30, "drainStoppedBy": "timeout"}
    dropped = {"lost": 2, "gapLost": 2, "tailMissing": 0, "drainStoppedBy": "complete"}
    assert run.anomalies([behind]) == "backlog 30"
    assert (
        run.anomalies([behind, dropped, {"error": "rc=1"}]) == "lost 2, backlog 30 (1 failed runs)"
    )
