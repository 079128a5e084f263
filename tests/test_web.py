"""What the server serves to browsers (dwsps.web): /dwsps.js byte-identical to the npm
package's source, with CORS and caching headers; /console and its assets; /health readable
cross-origin; and those paths still upgrade to WebSockets."""

from __future__ import annotations

from pathlib import Path

import orjson

from dwsps import Server
from dwsps.web import FILES, read
from tests.conftest import ClientFactory
from tests.wsclient import http_request

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SOURCE = ROOT / "clients" / "js" / "dwsps.js"


def test_the_served_client_is_the_npm_packages_file() -> None:
    assert read("dwsps.js") == CLIENT_SOURCE.read_bytes()
    link = ROOT / "src" / "dwsps" / "web" / "dwsps.js"
    assert link.is_symlink()
    assert link.resolve() == CLIENT_SOURCE.resolve()


def test_every_static_file_exists_and_is_package_data() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"web/*"' in pyproject  # the wheel carries dwsps/web/*
    for file in FILES:
        assert read(file.resource), file


async def test_dwsps_js_is_served_for_any_origin(server: Server) -> None:
    status, headers, body = await http_request(server.url, "GET", "/dwsps.js")
    assert status == 200
    assert body == CLIENT_SOURCE.read_bytes()
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["cache-control"] == "no-cache"
    etag = headers["etag"]
    assert etag.startswith('"')
    assert etag.endswith('"')

    # Revalidation: the same ETag costs a 304 without a body; another one gets the file.
    status, again, body = await http_request(
        server.url, "GET", "/dwsps.js", headers={"If-None-Match": f'"other", {etag}'}
    )
    assert (status, body, again["etag"]) == (304, b"", etag)
    status, _, body = await http_request(
        server.url, "GET", "/dwsps.js", headers={"If-None-Match": '"other"'}
    )
    assert status == 200
    assert body
    status, head, body = await http_request(server.url, "HEAD", "/dwsps.js")
    assert (status, body, head["content-length"]) == (200, b"", str(CLIENT_SOURCE.stat().st_size))


async def test_the_console_and_its_assets(server: Server) -> None:
    status, headers, body = await http_request(server.url, "GET", "/console")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert b'src="console/console.js"' in body
    status, headers, body = await http_request(server.url, "GET", "/console/console.js")
    assert (status, headers["content-type"]) == (200, "text/javascript; charset=utf-8")
    assert b'from "../dwsps.js"' in body  # resolves to /dwsps.js from /console/console.js
    status, headers, _ = await http_request(server.url, "GET", "/console/console.css")
    assert (status, headers["content-type"]) == (200, "text/css; charset=utf-8")
    status, _, _ = await http_request(server.url, "POST", "/console", body=b"")
    assert status == 405


async def test_health_is_readable_cross_origin(server: Server) -> None:
    status, headers, body = await http_request(server.url, "GET", "/health")
    assert status == 200
    assert headers["access-control-allow-origin"] == "*"
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body)["status"] == "ok"


async def test_browser_paths_still_upgrade_to_websockets(
    server: Server, open_client: ClientFactory
) -> None:
    for path in ("/console", "/dwsps.js"):
        client = await open_client(server.url, path=path)
        ack = await client.publish("news", path)
        assert ack["action"] == "publish"


def test_the_docker_build_has_the_client_behind_the_symlink() -> None:
    # The image's wheel is built from `COPY src`: the symlink's target must be copied too.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY clients/js/dwsps.js ./clients/js/dwsps.js" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(p in ignored for p in ("clients", "clients/js", "*.js"))
