"""``check_startup``: each bad setting is one line naming it, from ``dwsps serve`` (exit 1)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dwsps import Server
from dwsps.config import ServerConfig
from dwsps.errors import ConfigError
from dwsps.startup import check_startup
from tests.procs import finish, run_cli
from tests.support import scaled

WAIT = scaled(20.0)


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cert.pem + key.pem, other-key.pem (another key), encrypted-key.pem, both.pem, junk.pem,
    short.txt (a short secret) and empty.txt (a newline)."""
    folder = tmp_path_factory.mktemp("pems")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    for name in ("", "other-"):
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=127.0.0.1", "-keyout", f"{name}key.pem", "-out", f"{name}cert.pem",
        )  # fmt: skip
    openssl("rsa", "-in", "key.pem", "-aes256", "-passout", "pass:pw", "-out", "encrypted-key.pem")
    (folder / "both.pem").write_bytes(
        (folder / "cert.pem").read_bytes() + (folder / "key.pem").read_bytes()
    )
    (folder / "junk.pem").write_text("not a certificate\n")
    (folder / "short.txt").write_text("short\n")
    (folder / "empty.txt").write_text("\n")
    return folder


async def serve(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m dwsps serve --port 0 ARGS`` until it exits: (code, stdout, stderr)."""
    return await run_cli("serve", "--host", "127.0.0.1", "--port", "0", *args, env=env)


BAD = [  # (flags, the setting named, the problem); {d} is the folder of the PEM files
    (
        "--tls-cert {d}/missing.pem",
        "tls_cert (--tls-cert)",
        "cannot read {d}/missing.pem: No such file or directory",
    ),
    (
        "--tls-cert {d}/cert.pem --tls-key {d}/missing.pem",
        "tls_key (--tls-key)",
        "cannot read {d}/missing.pem: No such file or directory",
    ),
    ("--tls-cert {d}", "tls_cert (--tls-cert)", "cannot read {d}: Is a directory"),
    ("--tls-cert {d}/junk.pem", "tls_cert (--tls-cert)", "{d}/junk.pem holds no PEM certificate"),
    (
        "--tls-cert {d}/cert.pem",
        "tls_cert (--tls-cert)",
        "{d}/cert.pem holds no private key; give it with --tls-key",
    ),
    (
        "--tls-cert {d}/cert.pem --tls-key {d}/junk.pem",
        "tls_key (--tls-key)",
        "{d}/junk.pem holds no PEM private key",
    ),
    (
        "--tls-cert {d}/cert.pem --tls-key {d}/other-key.pem",
        "tls_key (--tls-key)",
        "{d}/other-key.pem is not the private key of the certificate in {d}/cert.pem",
    ),
    (
        "--tls-cert {d}/cert.pem --tls-key {d}/encrypted-key.pem",
        "tls_key (--tls-key)",
        "the private key is encrypted; give an unencrypted PEM key",
    ),
    ("--tls-key {d}/key.pem", "tls_key (--tls-key)", "is set but tls_cert (--tls-cert) is not"),
    ("--peer http://peer:8000", "peers (--peer)", "http://peer:8000 is not a ws:// or wss:// URL"),
    ("--peer ws://:8000", "peers (--peer)", "ws://:8000 has no host"),
    ("--peer ws://peer:99999", "peers (--peer)", "ws://peer:99999 has a bad port (want 1-65535)"),
    ("--peer ws://peer:http", "peers (--peer)", "ws://peer:http has a bad port (want 1-65535)"),
    ("--peer ws://peer:0", "peers (--peer)", "ws://peer:0 has a bad port (want 1-65535)"),
    (
        "--peer wss://user:hunter2@peer:x",
        "peers (--peer)",
        "wss://user:***@peer:x has a bad port (want 1-65535)",
    ),
    (
        "--backplane nats://bus:4222",
        "backplane (--backplane)",
        "unknown scheme 'nats' in nats://bus:4222; known: memory, redis, rediss",
    ),
    (
        "--history chat.*:lots",
        "history (--history)",
        "pattern 'chat.*:lots': size 'lots' is not a whole number >= 1",
    ),
    (
        "--history chat.*:10 --history chat.vip.*:5",
        "history (--history)",
        "pattern 'chat.vip.*' is never used: 'chat.*' comes first and matches every topic it"
        " does (list the more specific pattern first)",
    ),
    (
        "--backplane redis://cache:port",
        "backplane (--backplane)",
        "redis://cache:port: Port could not be cast to integer value as 'port'",
    ),
    (
        "--api-key-file {d}/missing.txt",
        "api_key_file (--api-key-file)",
        "cannot read {d}/missing.txt: No such file or directory",
    ),
    ("--api-key-file {d}/empty.txt", "api_key_file (--api-key-file)", "{d}/empty.txt is empty"),
    (
        "--status-key-file {d}/missing.txt",
        "status_key_file (--status-key-file)",
        "cannot read {d}/missing.txt: No such file or directory",
    ),
    (
        "--auth-jwt-secret-file {d}/missing.txt",
        "auth_jwt_secret_file (--auth-jwt-secret-file)",
        "cannot read {d}/missing.txt: No such file or directory",
    ),
    (
        "--auth-jwt-secret-file {d}/short.txt",
        "auth_jwt_secret_file (--auth-jwt-secret-file)",
        "the JWT secret is 5 bytes; at least 32 are needed (RFC 7518, 3.2)",
    ),
    (
        "--auth-jwt-secret short",
        "auth_jwt_secret (--auth-jwt-secret)",
        "the JWT secret is 5 bytes; at least 32 are needed (RFC 7518, 3.2)",
    ),
    (
        "--auth-jwt-public-key {d}/junk.pem",
        "auth_jwt_public_key (--auth-jwt-public-key)",
        "the JWT public key is not a PEM public key or certificate",
    ),
    (
        "--auth-jwt-public-key {d}/missing.pem",
        "auth_jwt_public_key (--auth-jwt-public-key)",
        "cannot read {d}/missing.pem: No such file or directory",
    ),
    (
        f"--auth-jwt-secret {'s' * 40} --auth-jwt-algorithm HS512",
        "auth_jwt_algorithms (--auth-jwt-algorithm)",
        "the JWT secret is too short for HS512: 64 bytes are needed",
    ),
    (
        "--anonymous-publish a..b",
        "anonymous_publish (--anonymous-publish)",
        "empty level in 'a..b'",
    ),
]


@pytest.mark.parametrize(("flags", "setting", "problem"), BAD)
async def test_serve_names_the_bad_setting_and_exits_1(
    pems: Path, flags: str, setting: str, problem: str
) -> None:
    code, out, err = await serve(*flags.format(d=pems).split())
    assert (code, out) == (1, "")
    assert err == f"dwsps serve: {setting}: {problem.format(d=pems)}\n"


async def test_redis_backplane_without_the_redis_package(tmp_path: Path) -> None:
    # A package that fails to import as a missing one does: redis is "not installed".
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'redis'\", name='redis')\n"
    )
    code, out, err = await serve(
        "--backplane", "redis://127.0.0.1:6379/0", env={"PYTHONPATH": str(tmp_path)}
    )
    assert (code, out) == (1, "")
    assert err == (
        "dwsps serve: backplane (--backplane): redis:// needs the redis package:"
        " pip install 'dwsps[redis]'\n"
    )


async def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dwsps", "serve", "--host", "127.0.0.1", "--port", str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await finish(proc, WAIT)
    assert (proc.returncode, out) == (1, b"")
    assert err.decode() == (
        f"dwsps serve: port (--port): cannot listen on 127.0.0.1:{port}: address already in use\n"
    )


async def test_a_setting_from_the_toml_file_or_the_environment_names_it(tmp_path: Path) -> None:
    toml = tmp_path / "dwsps.toml"
    toml.write_text('tls-cert = "nope.pem"\napi_key_file = "no-key"\n')
    code, out, err = await serve("--config", str(toml))
    assert (code, out) == (1, "")
    assert (
        err == f"dwsps serve: {toml}: tls-cert: cannot read nope.pem: No such file or directory\n"
    )
    code, _, err = await serve("--config", str(toml), env={"DWSPS_TLS_CERT": "env.pem"})
    assert code == 1
    assert err == (
        "dwsps serve: environment DWSPS_TLS_CERT: cannot read env.pem: No such file or directory\n"
    )
    code, _, err = await serve("--config", str(toml), "--tls-cert", "flag.pem")
    assert code == 1
    assert (
        err
        == "dwsps serve: tls_cert (--tls-cert): cannot read flag.pem: No such file or directory\n"
    )


async def test_server_start_on_a_port_in_use_cleans_up() -> None:
    before = asyncio.all_tasks()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # Peers, a heartbeat and a backplane: links and tasks that must not outlive the failure.
        srv = Server(
            host="127.0.0.1",
            port=port,
            peers=["ws://127.0.0.1:1"],
            backplane="memory://start-fails",
            heartbeat_interval=0.05,
        )
        with pytest.raises(ConfigError) as failed:
            await srv.start()
    assert str(failed.value) == (
        f"port (--port): cannot listen on 127.0.0.1:{port}: address already in use"
    )
    assert isinstance(failed.value.__cause__, OSError)
    assert asyncio.all_tasks() == before, "a task outlived the failed start"
    assert srv.peer_status() == []
    assert srv.backplane is None
    await asyncio.wait_for(srv.close(), WAIT)  # nothing to undo
    # Nothing half-started is in the way: the same server starts once the port is free.
    await srv.start()
    try:
        assert srv.port == port
        assert [p["url"] for p in srv.peer_status()] == ["ws://127.0.0.1:1"]
    finally:
        await srv.close()
    assert asyncio.all_tasks() == before


def test_good_configurations_pass(pems: Path) -> None:
    check_startup(ServerConfig())
    check_startup(ServerConfig(tls_cert=str(pems / "cert.pem"), tls_key=str(pems / "key.pem")))
    check_startup(ServerConfig(tls_cert=str(pems / "both.pem")))
    check_startup(
        ServerConfig(
            peers=["ws://peer-a:8000", "wss://peer.example/dwsps?x=1", "ws://[::1]:9000"],
            backplane="memory://group",
        )
    )
    check_startup(ServerConfig(backplane="rediss://:secret@cache:6380/1?prefix=app"))


def test_the_error_is_a_config_error_without_secrets() -> None:
    with pytest.raises(ConfigError, match=r"^peers \(--peer\): ws://u:\*\*\*@:1 has no host$"):
        check_startup(ServerConfig(peers=["ws://u:hunter2@:1"]))


def test_history_from_toml_and_the_environment(tmp_path: Path) -> None:
    from dwsps.config import load_config

    toml = tmp_path / "dwsps.toml"
    toml.write_text('history = ["chat.*:1000:10m", "audit:50"]\nhistory_max_bytes = "2MiB"\n')
    config = load_config(toml)
    assert config.history == ["chat.*:1000:10m", "audit:50"]
    assert config.history_max_bytes == 2 * 1024 * 1024
    check_startup(config)
    env = load_config(environ={"DWSPS_HISTORY": "chat.*:10,news:5:1h"})
    assert env.history == ["chat.*:10", "news:5:1h"]
    with pytest.raises(ConfigError, match=r"^history \(--history\): pattern 'news\.\.x:5'"):
        check_startup(ServerConfig(history=["news..x:5"]))
    with pytest.raises(ConfigError, match=r"^history_max_bytes \(--history-max-bytes\): "):
        check_startup(ServerConfig(history=["a:1"], history_max_bytes=0))
