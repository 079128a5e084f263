"""The command line for the person using it: JSON logs, ``pub -`` and ``--lines`` with real
stdin, the 1009 report, ``sub`` telling about lost connections, and ``dwsps stat``.

Every process is started as ``python -m dwsps`` and stopped by the test that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pty
import re
import select
import signal
import sys
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from dwsps.cli import _too_large
from dwsps.logs import JsonFormatter
from tests.conftest import ClientFactory, PortFactory, ProcessFactory, ServerFactory
from tests.procs import run_cli
from tests.support import scaled
from tests.wsclient import is_delivery

WAIT = scaled(15.0)


@contextlib.asynccontextmanager
async def dwsps(*args: str, stdin: int | None = None) -> AsyncIterator[asyncio.subprocess.Process]:
    """A running ``python -m dwsps ARGS`` with pipes; killed if the test did not end it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dwsps",
        *args,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def line_of(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    return (await asyncio.wait_for(stream.readline(), WAIT)).decode()


async def run_with_stdin(data: bytes, *args: str) -> tuple[int, str, str]:
    async with dwsps(*args, stdin=asyncio.subprocess.PIPE) as proc:
        out, err = await asyncio.wait_for(proc.communicate(data), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- serve: logs ----------------------------------------------------------------------


async def test_serve_json_logs_listening_and_shutdown(serve_process: ProcessFactory) -> None:
    srv = await serve_process("--log-format", "json")
    assert await srv.stop() == 0
    lines = srv.log().splitlines()
    assert lines.count(f"dwsps listening on {srv.url}") == 1  # stdout, exactly as before
    records = [orjson.loads(line) for line in lines if not line.startswith("dwsps listening")]
    assert records, srv.log()
    for r in records:
        assert set(r) >= {"time", "level", "logger", "message"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"])
    messages = [(r["level"], r["logger"], r["message"]) for r in records]
    # "... listening on URL (pure Python)": the build is named too (dwsps.build)
    listening = [m for m in messages if f"listening on {srv.url} (" in m[2]]
    assert listening == [("info", "dwsps.server", listening[0][2])]
    assert ("info", "dwsps.cli", "SIGTERM: shutting down, closing 0 connection(s)") in messages
    assert messages[-1][:2] == ("info", "dwsps.cli")
    assert messages[-1][2].endswith(" stopped")


async def test_serve_text_logs_say_so_too(serve_process: ProcessFactory) -> None:
    srv = await serve_process()
    assert await srv.stop() == 0
    log = srv.log()
    assert re.search(r" INFO dwsps\.server: dwsps server \w+ listening on ", log)
    assert "INFO dwsps.cli: SIGTERM: shutting down" in log


async def test_bad_log_format_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = await run_cli("serve", "--log-format", "xml")
    assert code == 2
    assert "invalid choice: 'xml'" in err
    monkeypatch.setenv("DWSPS_LOG_FORMAT", "xml")
    code, _, err = await run_cli("serve", "--port", "0")
    assert (code, err) == (1, "dwsps serve: log format must be one of text, json\n")


def test_json_formatter_carries_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("dwsps.test").makeRecord(
            "dwsps.test", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    doc = orjson.loads(JsonFormatter().format(record))
    assert (doc["level"], doc["logger"], doc["message"]) == ("error", "dwsps.test", "failed x")
    assert doc["exception"].startswith("Traceback (most recent call last):")
    assert doc["exception"].endswith("ValueError: boom")


# -- pub ------------------------------------------------------------------------------


async def test_pub_dash_reads_the_message_from_stdin(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server()
    watcher = await open_client(srv.url)
    await watcher.request({"type": "subscribe", "topic": "news", "id": 1})
    code, out, err = await run_with_stdin(b'{"n": [1, 2]}\n', "pub", "news", "-", "--url", srv.url)
    assert code == 0, err
    assert orjson.loads(out)["action"] == "publish"
    code, _, err = await run_with_stdin(b"plain text\n", "pub", "news", "-", "--url", srv.url)
    assert code == 0, err
    got = [(await watcher.next_message(is_delivery("news")))["message"] for _ in range(2)]
    assert got == [{"n": [1, 2]}, "plain text"]


async def test_pub_lines_publishes_each_line_as_it_arrives(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server()
    watcher = await open_client(srv.url)
    await watcher.request({"type": "subscribe", "topic": "logs", "id": 1})
    args = ("pub", "logs", "--lines", "--url", srv.url)
    async with dwsps(*args, stdin=asyncio.subprocess.PIPE) as proc:
        assert proc.stdin is not None
        # Each line is delivered while stdin is still open: nothing waits for the end.
        for line, expected in [
            (b"GET /index.html 200\n", "GET /index.html 200"),
            (b'{"level": "warn", "n": 3}\r\n', {"level": "warn", "n": 3}),
            (b"\n   \n42\n", 42),  # blank lines are skipped
        ]:
            proc.stdin.write(line)
            await proc.stdin.drain()
            assert (await watcher.next_message(is_delivery("logs")))["message"] == expected
        proc.stdin.write(b"last line, no newline")
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
    assert (await watcher.next_message(is_delivery("logs")))["message"] == "last line, no newline"
    assert err == "dwsps pub: published 4 line(s) to logs\n"
    await watcher.sync()
    assert watcher.take_all(is_delivery()) == []


async def test_pub_lines_stops_on_a_signal_with_a_summary(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server()
    watcher = await open_client(srv.url)
    await watcher.request({"type": "subscribe", "topic": "logs", "id": 1})
    async with dwsps(
        "pub", "logs", "--lines", "--url", srv.url, stdin=asyncio.subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None
        proc.stdin.write(b"one\n")
        await watcher.next_message(is_delivery("logs"))
        proc.send_signal(signal.SIGINT)  # stdin stays open, as with `tail -f`
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        assert proc.stderr is not None
        assert await proc.stderr.read() == b"dwsps pub: published 1 line(s) to logs\n"


async def test_pub_reports_1009_as_message_too_large(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(max_frame_size=200)
    code, out, err = await run_cli("pub", "news", "x" * 300, "--url", srv.url)
    assert (code, out) == (1, "")
    assert err == "dwsps pub: message too large (limit 200 bytes)\n"

    watcher = await open_client(srv.url)
    await watcher.request({"type": "subscribe", "topic": "news", "id": 1})
    lines = b"small\n" + b"y" * 300 + b"\nafter\n"
    code, _, err = await run_with_stdin(lines, "pub", "news", "--lines", "--url", srv.url)
    assert code == 1
    said = err.splitlines()
    assert "dwsps pub: line 2: message too large (limit 200 bytes)" in said
    assert said[-1] == "dwsps pub: published 2 line(s) to news, 1 failed"
    # The client reconnected after the server's 1009 and went on with the next line.
    got = [(await watcher.next_message(is_delivery("news")))["message"] for _ in range(2)]
    assert got == ["small", "after"]


def test_too_large_without_a_limit_in_the_reason() -> None:
    assert _too_large(1009, "fragmented message too big") == (
        "message too large (larger than the server accepts)"
    )
    assert _too_large(1009, "Received frame ... size, 389 > 100") == (
        "message too large (limit 100 bytes)"
    )
    assert _too_large(1006, "") is None


async def test_pub_usage_errors() -> None:
    code, _, err = await run_cli("pub", "news")
    assert (code, err) == (2, "dwsps pub: give a MESSAGE, - to read it from stdin, or --lines\n")
    code, _, err = await run_cli("pub", "news", "x", "--lines")
    assert code == 2
    assert "give no MESSAGE" in err


# -- sub ------------------------------------------------------------------------------


async def test_sub_says_when_it_lost_the_connection_and_when_it_is_back(
    serve_process: ProcessFactory, reserve_port: PortFactory
) -> None:
    port = reserve_port().port
    first = await serve_process(port=port)
    async with dwsps("sub", "news", "--url", first.url) as sub:
        assert "subscribed to news" in await line_of(sub.stderr)
        await first.stop()
        lost = await line_of(sub.stderr)
        assert lost == (
            f"dwsps sub: lost the connection to {first.url} (1001 server shutting down);"
            " reconnecting\n"
        )
        second = await serve_process(port=port)
        assert await line_of(sub.stderr) == f"dwsps sub: reconnected to {second.url}\n"
        # Subscribed again: a publish on the new server arrives.
        code, _, err = await run_cli("pub", "news", "back", "--url", second.url)
        assert code == 0, err
        delivery = orjson.loads(await line_of(sub.stdout))
        assert delivery["message"] == "back"
        sub.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sub.wait(), WAIT) == 0
        assert sub.stderr is not None
        assert await sub.stderr.read() == b""  # nothing said about its own close


# -- stat -----------------------------------------------------------------------------


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split()[1:])


async def test_stat_once_shows_a_sample(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server()
    watcher = await open_client(srv.url)
    for i, topic in enumerate(["news", "sport"]):
        await watcher.request({"type": "subscribe", "topic": topic, "id": i})
    for n in range(3):
        srv.publish("news", n)
    code, out, err = await run_cli("stat", srv.url, "--once", "--interval", "0.2")
    assert code == 0, err
    [line] = out.splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line)
    fields = _fields(line)
    assert fields["status"] == "ok"
    assert (fields["connections"], fields["subscriptions"]) == ("1", "2")
    assert (fields["publishes"], fields["deliveries"], fields["errors"]) == ("3", "3", "0")
    assert fields["publishes/s"] == fields["deliveries/s"] == "0.0"


async def test_stat_with_a_status_key(make_server: ServerFactory) -> None:
    srv = await make_server(status_key="st-key")
    code, _, err = await run_cli("stat", srv.url, "--once", "--interval", "0.1")
    assert code == 1
    assert "shows only its status: give its status key with --key" in err
    code, out, err = await run_cli(
        "stat", srv.url, "--once", "--interval", "0.1", "--key", "st-key"
    )
    assert code == 0, err
    assert _fields(out)["status"] == "ok"


async def test_stat_continuous_lines_show_rates(make_server: ServerFactory) -> None:
    srv = await make_server()
    async with dwsps("stat", srv.url, "--interval", "0.3") as proc:
        first = _fields(await line_of(proc.stdout))
        assert first["publishes/s"] == "-"  # no rate from one sample
        for n in range(50):
            srv.publish("news", n)
        later = [_fields(await line_of(proc.stdout)) for _ in range(2)]
        assert any(float(f["publishes/s"]) > 0 for f in later)
        assert later[-1]["publishes"] == "50"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0


def _read_pty(fd: int, until: bytes, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while until not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {until!r} in {data!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            data += os.read(fd, 65536)
    return data


async def test_stat_redraws_in_place_on_a_terminal(make_server: ServerFactory) -> None:
    srv = await make_server(peers=["ws://127.0.0.1:1"])  # a peer that is never up
    master, slave = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dwsps", "stat", srv.url, "--interval", "0.2",
            stdout=slave, stderr=slave,
        )  # fmt: skip
        try:
            screen = await asyncio.to_thread(_read_pty, master, b"publishes/s", WAIT)
            assert screen.startswith(b"\x1b[2J\x1b[H")  # cleared once, then drawn from the top
            srv.publish("news", 1)
            screen = await asyncio.to_thread(_read_pty, master, b"total 1\x1b[K", WAIT)
            redraws = screen.count(b"\x1b[H")
            assert redraws >= 1
            assert b"peer " in screen
            assert b"ws://127.0.0.1:1" in screen
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        os.close(master)
        os.close(slave)


async def test_stat_unreachable_and_bad_urls(reserve_port: PortFactory) -> None:
    gone = reserve_port()
    code, out, err = await run_cli("stat", gone.url, "--once", "--interval", "0.1")
    assert (code, out) == (1, "")
    assert err.startswith(f"dwsps stat: cannot read http://127.0.0.1:{gone.port}/health: ")
    assert "refused" in err
    code, _, err = await run_cli("stat", "ftp://example", "--once")
    assert (code, err) == (
        1,
        "dwsps stat: not a ws://, wss://, http:// or https:// URL: ftp://example\n",
    )
