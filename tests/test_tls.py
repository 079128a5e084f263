"""``wss://``: the server with a certificate, the client trusting it, and the CLI flags."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest

import dwsps
from dwsps import Server
from tests.conftest import ProcessFactory


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with openssl."""
    folder = tmp_path_factory.mktemp("tls")
    crt, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(crt),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return crt, key


def _trusting(crt: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(crt))


async def test_publish_and_deliver_over_wss(cert: tuple[Path, Path]) -> None:
    crt, key = cert
    async with Server(port=0, tls_cert=str(crt), tls_key=str(key)) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        got: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        async with dwsps.connect(server.url, ssl=_trusting(crt)) as client:
            await client.subscribe("news", got.put_nowait)
            ack = await client.publish("news.uk", {"secure": True})
            assert ack["action"] == "publish"
            delivery = await asyncio.wait_for(got.get(), 10)
            assert delivery["topic"] == "news.uk"
            assert delivery["message"] == {"secure": True}


async def test_untrusted_certificate_is_refused(cert: tuple[Path, Path]) -> None:
    crt, key = cert
    async with Server(port=0, tls_cert=str(crt), tls_key=str(key)) as server:
        client = dwsps.Client(server.url, reconnect=False)
        with pytest.raises(dwsps.ConnectionClosed):
            await client.connect()
        await client.close()


async def test_cli_serves_wss(cert: tuple[Path, Path], serve_process: ProcessFactory) -> None:
    crt, key = cert
    proc = await serve_process("--tls-cert", str(crt), "--tls-key", str(key))
    assert proc.url.startswith("wss://")
    async with dwsps.connect(proc.url, ssl=_trusting(crt)) as client:
        ack = await client.subscribe("a")
        assert ack["topic"] == "a"
