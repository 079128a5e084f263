"""Tokens on the command line: ``dwsps token``, and ``pub``/``sub``/``bench`` presenting one.

``dwsps token`` runs in-process (its output is checked with PyJWT); the client
commands run as real subprocesses against an in-process server that requires
a JWT, so the token travels the way it does for a user.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from dwsps.auth import JwtVerifier, mint_token
from dwsps.cli import main
from dwsps.errors import TokenSourceError
from dwsps.tokens import TOKEN_ENV, add_token_options, token_from_args
from tests.conftest import ServerFactory
from tests.procs import run_cli
from tests.support import eventually, scaled

SECRET = "tokens-test-secret-0123456789abcdef"
WAIT = scaled(15.0)


def run_token(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["token", *args])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def claims_of(token: str, key: Any = SECRET, alg: str = "HS256") -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(
        token, key, algorithms=[alg], options={"verify_aud": False}
    )
    return decoded


# -- dwsps token -------------------------------------------------------------------


def test_token_with_a_secret_and_every_claim(capsys: pytest.CaptureFixture[str]) -> None:
    before = int(time.time())
    code, out, err = run_token(
        capsys,
        *("--secret", SECRET, "--sub", "alice", "--ttl", "10m"),
        *("--aud", "dwsps", "--iss", "https://idp/"),
        *("--subscribe", "news", "--subscribe", "chat.*", "--publish", "news.*"),
    )
    assert (code, err) == (0, "")
    claims = claims_of(out)
    assert claims["sub"] == "alice"
    assert before + 600 <= claims["exp"] <= int(time.time()) + 600
    assert (claims["aud"], claims["iss"]) == ("dwsps", "https://idp/")
    assert claims["dwsps"] == {"subscribe": ["news", "chat.*"], "publish": ["news.*"]}
    # The server's verifier agrees, permissions included.
    identity = JwtVerifier(secret=SECRET, audience="dwsps", issuer="https://idp/").verify(out)
    assert identity.user == "alice"
    assert identity.permissions.publish == ("news.*",)


def test_token_defaults_exp_and_claims(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DWSPS_AUTH_JWT_SECRET", SECRET)
    code, out, _ = run_token(capsys)
    assert code == 0
    claims = claims_of(out)
    assert "dwsps" not in claims  # the server's default permissions apply
    assert "sub" not in claims
    assert 3590 <= claims["exp"] - time.time() <= 3600  # one hour by default
    _, out, _ = run_token(capsys, "--no-exp", "--publish", "p")
    claims = claims_of(out)
    assert "exp" not in claims
    assert claims["dwsps"] == {"subscribe": [], "publish": ["p"]}
    _, out, _ = run_token(capsys, "--exp", "4102444800")
    assert claims_of(out)["exp"] == 4102444800
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-" + "x" * 30 + "\n")
    monkeypatch.delenv("DWSPS_AUTH_JWT_SECRET")
    _, out, _ = run_token(capsys, "--secret-file", str(secret_file), "--alg", "HS256")
    assert claims_of(out, "file-secret-" + "x" * 30)["iat"] <= time.time()


@pytest.mark.parametrize("kind", ["ES256", "EdDSA"])
def test_token_with_a_private_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str
) -> None:
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ES256"
        else ed25519.Ed25519PrivateKey.generate()
    )
    pem = tmp_path / "private.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    code, out, _ = run_token(capsys, "--key", str(pem), "--sub", "svc")
    assert code == 0
    assert jwt.get_unverified_header(out)["alg"] == kind  # from the key's type
    assert claims_of(out, key.public_key(), kind)["sub"] == "svc"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--secret", "short"], "HS256 needs 32"),
        (["--secret", SECRET, "--alg", "HS512"], "HS512 needs 64"),
        (["--secret", SECRET, "--alg", "RS256"], "does not go with a secret"),
        (["--secret", SECRET, "--subscribe", "bad..topic"], "bad 'subscribe' pattern"),
        (["--key", "/nonexistent/key.pem"], "cannot read"),
        ([], "give --secret, --secret-file, --key"),
    ],
)
def test_token_errors_are_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    fragment: str,
) -> None:
    monkeypatch.delenv("DWSPS_AUTH_JWT_SECRET", raising=False)
    code, out, err = run_token(capsys, *args)
    assert code == 1
    assert out == ""
    assert err.startswith("dwsps token: ")
    assert fragment in err
    assert "\n" not in err


def test_token_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--secret", SECRET, "--ttl", "0s"]) == 2
    assert main(["token", "--secret", SECRET, "--ttl", "1h", "--no-exp"]) == 2
    assert main(["token", "--secret", SECRET, "--key", "k.pem"]) == 2
    assert main(["token", "--alg", "none", "--secret", SECRET]) == 2
    capsys.readouterr()


# -- where client commands get their token ------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_token_options(parser)
    return parser.parse_args(argv)


def test_token_sources_in_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert token_from_args(parse()) is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert token_from_args(parse()) == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert token_from_args(parse("--token-file", str(token_file))) == "from-file"
    assert token_from_args(parse("--token", "from-arg")) == "from-arg"
    token_file.write_text("\n")
    with pytest.raises(TokenSourceError, match="is empty"):
        token_from_args(parse("--token-file", str(token_file)))
    with pytest.raises(TokenSourceError, match="cannot read"):
        token_from_args(parse("--token-file", str(tmp_path / "missing")))
    with pytest.raises(SystemExit):
        parse("--token", "a", "--token-file", str(token_file))


# -- pub, sub and bench against a server that requires a token --------------------


async def test_pub_and_sub_present_their_tokens(make_server: ServerFactory, tmp_path: Path) -> None:
    srv = await make_server(auth_jwt_secret=SECRET, heartbeat_interval=0)
    users: list[str | None] = []
    srv.on("connect", lambda cid: users.append(srv.user(cid)))
    env = {TOKEN_ENV: ""}
    sub_token = tmp_path / "sub-token"
    sub_token.write_text(mint_token(SECRET, sub="reader", ttl=60) + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "dwsps", "sub", "news", "--count", "1", "--url", srv.url),
        *("--token-file", str(sub_token)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), WAIT)
        assert b"subscribed to news" in line, line
        writer = mint_token(SECRET, sub="writer", ttl=60)
        code, out, err = await run_cli(
            "pub", "news.uk", '{"n": 1}', "--url", srv.url, env={TOKEN_ENV: writer}
        )
        assert (code, err) == (0, ""), err
        assert orjson.loads(out)["action"] == "publish"
        stdout, _ = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert orjson.loads(stdout)["message"] == {"n": 1}
    assert users == ["reader", "writer"]

    # No token, or a bad one: one line with the server's reason, exit 1.
    code, _, err = await run_cli("pub", "news", "1", "--url", srv.url, env=env)
    assert code == 1
    assert err.strip() == f"dwsps pub: could not connect to {srv.url}: HTTP 401: missing token"
    bad = mint_token("another-secret-of-at-least-32-bytes!", sub="x", ttl=60)
    code, _, err = await run_cli("sub", "news", "--url", srv.url, "--token", bad, env=env)
    assert code == 1
    assert "HTTP 401: bad signature" in err
    # A token in the URL is masked in what the command prints.
    code, _, err = await run_cli("pub", "news", "1", "--url", f"{srv.url}/?token={bad}", env=env)
    assert code == 1
    assert bad not in err
    assert "token=%2A%2A%2A" in err or "token=***" in err


async def test_sub_reads_a_rotated_token_file_before_its_token_expires(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    srv = await make_server(auth_jwt_secret=SECRET, heartbeat_interval=0)
    token_file = tmp_path / "token"
    first = mint_token(SECRET, sub="first", ttl=5)
    token_file.write_text(first + "\n")
    first_exp = jwt.decode(first, options={"verify_signature": False})["exp"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "dwsps", "sub", "news", "--count", "1", "--url", srv.url),
        *("--token-file", str(token_file)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, TOKEN_ENV: ""},
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), WAIT)
        assert b"subscribed to news" in line, line
        # Rotated by whoever issues tokens (a sidecar, a projected volume).
        token_file.write_text(mint_token(SECRET, sub="second", ttl=3600))
        await eventually(
            lambda: [c.user for c in srv.connections.values()] == ["second"],
            "the renewed token on the same connection",
        )
        (renewed,) = srv.connections
        await eventually(lambda: time.time() > first_exp + 0.5, "the first token's exp to pass")
        assert list(srv.connections) == [renewed], "the connection was not kept"
        writer = mint_token(SECRET, sub="writer", ttl=60)
        code, _, err = await run_cli(
            "pub", "news", '"after"', "--url", srv.url, env={TOKEN_ENV: writer}
        )
        assert (code, err) == (0, ""), err
        stdout, stderr = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr
    assert orjson.loads(stdout)["message"] == "after"
    assert b"connection lost" not in stderr


async def test_bench_presents_its_token(make_server: ServerFactory, tmp_path: Path) -> None:
    srv = await make_server(auth_jwt_secret=SECRET, heartbeat_interval=0)
    token = mint_token(SECRET, sub="bench", ttl=60)
    out_file = tmp_path / "result.json"
    common = ("bench", "fanout", "--url", srv.url, "--subs", "2", "--quiet")
    code, _, err = await run_cli(*common, env={TOKEN_ENV: ""})
    assert code == 1
    assert "cannot connect" in err
    code, _, err = await run_cli(
        *common,
        *("--warmup", "0.1", "--duration", "0.3", "--json", str(out_file)),
        env={TOKEN_ENV: token},
    )
    assert code == 0, err
    result = orjson.loads(out_file.read_bytes())
    assert result["totalDelivered"] > 0
    assert token not in out_file.read_text()  # the credential stays out of results
