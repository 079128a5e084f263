"""``dwsps bench`` runs each scenario on a tiny load and writes sane JSON (no timing asserts)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from dwsps.cli import main
from tests.conftest import PortFactory, ServerFactory

TINY = ("--warmup", "0.1", "--duration", "0.4", "--drain", "3", "--quiet")


async def bench(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "result.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dwsps",
        "bench",
        *args,
        *TINY,
        "--json",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert out.exists(), stderr.decode()
    return proc.returncode or 0, json.loads(out.read_text()), stdout.decode()


def assert_clean(result: dict[str, Any]) -> None:
    assert result["lost"] == 0
    assert result["outOfOrder"] == 0
    assert result["subsClosed"] == 0
    assert result["errors"] == []


@pytest.mark.parametrize("flow", ["e2e", "ack"])
async def test_fanout(make_server: ServerFactory, tmp_path: Path, flow: str) -> None:
    server = await make_server()
    rc, result, table = await bench(
        tmp_path, "fanout", "--url", server.url, "--subs", "3", "--flow", flow,
        "--server-pid", str(os.getpid()),
    )  # fmt: skip
    assert rc == 0
    assert result["scenario"] == "fanout"
    assert result["subscribers"] == 3
    assert_clean(result)
    assert result["totalPublished"] > 0
    assert result["totalDelivered"] == 3 * result["totalPublished"]
    assert result["expectedDeliveries"] == result["totalDelivered"]
    assert result["drainStoppedBy"] == "complete"
    assert result["deliveriesPerSec"] > 0
    assert len(result["serverCpu"]) == 1
    assert result["clientCpu"] >= 0
    assert "deliveries/s" in table


async def test_latency(make_server: ServerFactory, tmp_path: Path) -> None:
    server = await make_server()
    rc, result, _ = await bench(
        tmp_path, "latency", "--url", server.url, "--subs", "2", "--rate", "200"
    )
    assert rc == 0
    assert_clean(result)
    lat = result["latencyMs"]
    assert lat["samples"] > 0
    assert 0 <= lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert result["totalDelivered"] == 2 * result["totalPublished"]


async def test_connections(make_server: ServerFactory, tmp_path: Path) -> None:
    server = await make_server()
    rc, result, _ = await bench(
        tmp_path, "connections", "--url", server.url, "--subs", "20", "--settle", "0.1",
        "--server-pid", str(os.getpid()),
    )  # fmt: skip
    assert rc == 0
    assert result["connections"] == 20
    assert result["failed"] == 0
    assert result["liveConnections"] == 20
    assert isinstance(result["kbPerConnection"], float)
    assert_clean(result)


async def test_peered(make_server: ServerFactory, tmp_path: Path) -> None:
    b = await make_server()
    a = await make_server(peers=[b.url])
    rc, result, _ = await bench(
        tmp_path, "peered", "--pub-url", a.url, "--url", b.url, "--subs", "2"
    )
    assert rc == 0
    assert result["pubUrl"] == a.url
    assert_clean(result)
    assert result["totalDelivered"] == 2 * result["totalPublished"] > 0


async def test_reports_loss_when_subscribers_are_cut(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    # A tiny outbound limit makes the server close subscribers as slow consumers:
    # the bench must say so and exit non-zero rather than report a clean run.
    # The limit counts what waits in the server, not what the kernel took, so
    # the publisher must outrun the subscribers (ack flow, messages near the
    # frame limit, four subscribers in one process) for anything to wait at all.
    server = await make_server(max_outbound_buffer=1)
    rc, result, table = await bench(
        tmp_path,
        "fanout",
        "--url", server.url,
        "--subs", "4",
        "--payload", "900000",
        "--flow", "ack",
    )  # fmt: skip
    assert rc == 1
    assert result["subsClosed"] > 0
    assert "LOSS" in table


async def test_unreachable_server_is_one_line_and_exit_1(reserve_port: PortFactory) -> None:
    url = reserve_port().url  # held, never listening: connections are refused
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dwsps", "bench", "--url", url, "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert stdout == b""
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"dwsps bench: cannot connect to {url}: ")


def test_peered_without_pub_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "peered"]) == 2
    assert "peered needs --pub-url" in capsys.readouterr().err


def test_bad_server_pid_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--server-pid", "12,abc"]) == 2
    assert "argument --server-pid: wants PID[,PID...]" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for entry in (
        "SCENARIO fanout, latency, peered, connections (default: fanout)",
        "--url URL server the subscribers use (default: ws://127.0.0.1:8000)",
        "--payload BYTES approx. message size in bytes (default: 100)",
        "--flow {e2e,ack}",
        "(default: e2e)",
        "--duration SECONDS seconds measured (default: 5.0)",
        "(default: 100; connections: 1000)",
    ):
        assert entry in text
