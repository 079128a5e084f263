"""The ``dwsps`` command: ``serve``, ``pub`` and ``sub`` as real subprocesses.

Every process a test starts is stopped by it (``dwsps serve`` by the
``serve_process`` fixture, the others by context managers that kill on the way
out); waits are bounded and scaled with ``DWSPS_TEST_TIME_SCALE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

import dwsps
from dwsps import Client, build
from dwsps.cli import main
from dwsps.errors import InvalidTopicError, TooManySubscriptionsError
from tests.conftest import ProcessFactory
from tests.procs import run_cli
from tests.support import free_port, scaled

WAIT = scaled(10.0)


@contextlib.asynccontextmanager
async def subscriber(url: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A running ``dwsps sub`` process, yielded once its subscriptions are in place."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dwsps",
        "sub",
        "--url",
        url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), WAIT)
        assert b"subscribed to" in line, line
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- help and usage -----------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["serve"], ["pub"], ["sub"], ["bench"]])
def test_help_everywhere(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dwsps {' '.join(command)}".rstrip())


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"dwsps {dwsps.__version__} ({build.describe()})\n"


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2  # no command
    assert "usage: dwsps" in capsys.readouterr().err
    assert main(["pub", "only-a-topic"]) == 2
    assert main(["serve", "--port", "eighty"]) == 2
    assert main(["sub", "news", "--count", "0"]) == 1


async def test_python_m_dwsps_help() -> None:
    code, out, _ = await run_cli("--help")
    assert code == 0
    assert all(cmd in out for cmd in ("serve", "pub", "sub", "bench"))


# -- serve --------------------------------------------------------------------


def test_serve_rejects_bad_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("max_frame_sise = 10\n")
    assert main(["serve", "--config", str(bad)]) == 1
    assert "unknown key 'max_frame_sise'" in capsys.readouterr().err
    monkeypatch.setenv("DWSPS_MAX_SUBSCRIPTIONS", "many")
    assert main(["serve", "--port", "0"]) == 1
    assert "DWSPS_MAX_SUBSCRIPTIONS" in capsys.readouterr().err
    monkeypatch.delenv("DWSPS_MAX_SUBSCRIPTIONS")
    monkeypatch.setenv("DWSPS_LOG_LEVEL", "verbose")
    assert main(["serve", "--port", "0"]) == 1
    assert "log level must be one of debug, info" in capsys.readouterr().err
    assert main(["serve", "--peer-token", "no-equals-sign"]) == 2  # a usage error
    assert "argument --peer-token: wants KEY=VALUE" in capsys.readouterr().err


def test_config_errors_name_the_file_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "dwsps.toml").write_text("port = -1\n")
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--config", "etc/dwsps.toml"]) == 1
    err = capsys.readouterr().err
    assert err == "dwsps serve: etc/dwsps.toml: port: must not be negative, got -1\n"


def test_serve_reports_a_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--log-level", "error"]) == 1
    assert "cannot listen" in capsys.readouterr().err


async def test_serve_sigterm_closes_clients_with_1001_and_exits_0(
    serve_process: ProcessFactory,
) -> None:
    srv = await serve_process()
    client = Client(srv.url, reconnect=False)
    closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
    client.on("close", lambda code, reason: closed.set_result((code, reason)))
    async with client:
        assert (await client.subscribe("news"))["action"] == "subscribe"
        assert await srv.stop() == 0
        code, _ = await asyncio.wait_for(closed, WAIT)
    assert code == 1001
    assert "Traceback" not in srv.log()


async def test_serve_sigint_exits_0(serve_process: ProcessFactory) -> None:
    srv = await serve_process()
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(srv.proc.wait(), WAIT) == 0


async def test_serve_config_precedence_toml_env_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve_process: ProcessFactory
) -> None:
    config = tmp_path / "dwsps.toml"
    config.write_text("max_topic_length = 10\nmax_topic_levels = 2\nmax_subscriptions = 2\n")
    monkeypatch.setenv("DWSPS_MAX_TOPIC_LENGTH", "20")  # env beats the file ...
    monkeypatch.setenv("DWSPS_MAX_TOPIC_LEVELS", "3")
    srv = await serve_process("--config", str(config), "--max-topic-length", "30")  # ... CLI both
    async with Client(srv.url) as client:
        await client.publish("x" * 25, 1)  # CLI (30) beat env (20) and file (10)
        with pytest.raises(InvalidTopicError):
            await client.publish("x" * 31, 1)
        await client.subscribe("a.b.c")  # env (3 levels) beat the file (2)
        with pytest.raises(InvalidTopicError):
            await client.subscribe("a.b.c.d")
        await client.subscribe("b")  # the file's max_subscriptions = 2 applies
        with pytest.raises(TooManySubscriptionsError):
            await client.subscribe("c")


# -- pub and sub --------------------------------------------------------------


async def test_pub_prints_the_ack_and_sub_prints_deliveries(serve_process: ProcessFactory) -> None:
    srv = await serve_process()
    async with subscriber(srv.url, "news", "--count", "2") as sub:
        code, out, err = await run_cli("pub", "news.uk", '{"n": [1, 2]}', "--url", srv.url)
        assert code == 0, err
        ack = orjson.loads(out)
        assert (ack["type"], ack["action"], ack["topic"]) == ("ack", "publish", "news.uk")
        code, out, err = await run_cli("pub", "news", "not json", "--url", srv.url)
        assert code == 0, err
        assert orjson.loads(out)["topic"] == "news"

        stdout, _ = await asyncio.wait_for(sub.communicate(), WAIT)
        assert sub.returncode == 0
    lines = [orjson.loads(line) for line in stdout.decode().splitlines()]
    assert [(m["topic"], m["context"], m["message"]) for m in lines] == [
        ("news.uk", "news", {"n": [1, 2]}),
        ("news", "news", "not json"),
    ]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_sub_exits_0_on_signal(sig: signal.Signals, serve_process: ProcessFactory) -> None:
    srv = await serve_process()
    async with subscriber(srv.url, "news") as sub:
        await run_cli("pub", "news", "1", "--url", srv.url)
        assert sub.stdout is not None
        first = await asyncio.wait_for(sub.stdout.readline(), WAIT)
        assert orjson.loads(first)["message"] == 1
        sub.send_signal(sig)
        assert await asyncio.wait_for(sub.wait(), WAIT) == 0


async def test_pub_errors_exit_non_zero(serve_process: ProcessFactory) -> None:
    srv = await serve_process()
    code, out, err = await run_cli("pub", "news..uk", "x", "--url", srv.url)
    assert code == 1
    assert out == ""
    assert orjson.loads(err.split(": ", 1)[1])["error"] == "invalid_topic"
    code, _, err = await run_cli("pub", "news", "x", "--url", f"ws://127.0.0.1:{free_port()}")
    assert code == 1
    assert "could not connect" in err
