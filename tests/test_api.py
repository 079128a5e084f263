"""The HTTP endpoints over real sockets: health, the publish API and introspection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from dwsps import Server
from dwsps.http import HttpRequest, HttpResponse, KeyCheck, json_response
from tests.conftest import ClientFactory, ProcessFactory, ServerFactory
from tests.support import scaled
from tests.wsclient import DEFAULT_TIMEOUT, http_request, is_delivery, open_socket

KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
PEER_WAIT = scaled(15.0)
"""A peer link connects, with backoff, to a server that may still be starting."""


async def post(srv: Server, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    status, _, data = await http_request(srv.url, "POST", "/api/publish", body, headers)
    return status, orjson.loads(data) if data.startswith((b"{", b"[")) else {"raw": data}


async def test_api_is_off_without_a_key(make_server: ServerFactory) -> None:
    srv = await make_server()
    status, _ = await post(srv, b'{"topic": "a"}', AUTH)
    assert status == 404


async def test_publish_goes_the_websocket_way(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(api_key=KEY)
    events: list[tuple[str, str | None]] = []
    srv.on("publish", lambda topic, client_id: events.append((topic, client_id)))
    sub = await open_client(srv.url)
    await sub.subscribe("news", "news.uk")
    status, doc = await post(srv, b'{"topic": "news.uk", "message": {"a": 1}}', AUTH)
    assert (status, doc) == (200, {"deliveries": 2})
    got = await sub.take(2)
    assert sorted(m["context"] for m in got) == ["news", "news.uk"]
    assert got[0]["message"] == {"a": 1}
    assert events == [("news.uk", "http")]
    assert srv.stats.publishes == 1


async def test_batch_publish_is_validated_first(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(api_key=KEY)
    sub = await open_client(srv.url)
    await sub.subscribe("b")
    batch = [{"topic": "b.1", "message": 1}, {"topic": "b..2"}, {"topic": "b.3"}]
    status, doc = await post(srv, orjson.dumps(batch), AUTH)
    assert status == 400
    assert (doc["error"], doc["index"]) == ("invalid_topic", 1)
    assert srv.stats.publishes == 0, "nothing of a bad batch is published"
    status, doc = await post(srv, orjson.dumps([batch[0], batch[2]]), AUTH)
    assert (status, doc) == (200, {"published": 2, "deliveries": 2})
    assert [m["topic"] for m in await sub.take(2)] == ["b.1", "b.3"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{nope", "invalid_json"),
        (b'"a string"', "invalid_message"),
        (b'{"message": 1}', "invalid_message"),
        (b'{"topic": 5}', "invalid_message"),
        (b'{"topic": "a.*"}', "invalid_topic"),
        (b"[]", "invalid_message"),
    ],
)
async def test_bad_publishes_get_the_websocket_error_codes(
    make_server: ServerFactory, body: bytes, code: str
) -> None:
    srv = await make_server(api_key=KEY)
    status, doc = await post(srv, body, AUTH)
    assert status == 400
    assert doc["error"] == code
    assert doc["detail"]


@pytest.mark.parametrize(
    "headers", [None, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}]
)
async def test_the_key_is_required(make_server: ServerFactory, headers: dict | None) -> None:
    srv = await make_server(api_key=KEY)
    status, doc = await post(srv, b'{"topic": "a"}', headers)
    assert status == 401
    assert doc["error"] == "unauthorized"
    for path in ("/api/topics", "/api/connections"):
        status, _, _ = await http_request(srv.url, "GET", path, headers=headers)
        assert status == 401


async def test_a_body_over_the_frame_limit_is_413(make_server: ServerFactory) -> None:
    srv = await make_server(api_key=KEY, max_frame_size=1000)
    body = orjson.dumps({"topic": "a", "message": "x" * 2000})
    status, _ = await post(srv, body, AUTH)
    assert status == 413


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/nowhere", AUTH, 404),
        ("POST", "/api/publish", None, 401),
        ("POST", "/api/publish", {"Authorization": "Bearer wrong"}, 401),
        ("POST", "/health", AUTH, 405),
        ("PUT", "/api/publish", AUTH, 405),
        ("GET", "/health", None, 413),
    ],
)
async def test_a_request_refused_anyway_gets_that_answer_not_413(
    make_server: ServerFactory, method: str, path: str, headers: dict | None, status: int
) -> None:
    # The order PROTOCOL.md implies: no such route, then the key, then the size.
    srv = await make_server(api_key=KEY, max_frame_size=1000)
    body = orjson.dumps({"topic": "a", "message": "x" * 2000})
    got, _, _ = await http_request(srv.url, method, path, body, headers)
    assert got == status
    assert srv.stats.publishes == 0


async def test_the_api_off_is_404_even_for_a_large_body(make_server: ServerFactory) -> None:
    srv = await make_server(max_frame_size=1000)
    status, _ = await post(srv, b"x" * 2000, AUTH)
    assert status == 404


async def test_topics_and_connections(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(api_key=KEY)
    one = await open_client(srv.url)
    two = await open_client(srv.url)
    await one.subscribe("news", "sport")
    await two.subscribe("news")
    status, _, data = await http_request(srv.url, "GET", "/api/topics", headers=AUTH)
    assert status == 200
    assert orjson.loads(data) == {"topics": {"news": 2, "sport": 1}}
    status, _, data = await http_request(srv.url, "GET", "/api/connections", headers=AUTH)
    rows = orjson.loads(data)["connections"]
    assert sorted(r["subscriptions"] for r in rows) == [["news"], ["news", "sport"]]
    assert all(r["remote"] == "127.0.0.1" and r["user"] is None for r in rows)
    assert all(isinstance(r["queued_bytes"], int) for r in rows)


async def test_health_live_ready_and_methods(make_server: ServerFactory) -> None:
    srv = await make_server()
    for path, expected in (("/health/live", "live"), ("/health/ready", "ready")):
        status, _, data = await http_request(srv.url, "GET", path)
        assert (status, orjson.loads(data)["status"]) == (200, expected)
    status, headers, _ = await http_request(srv.url, "POST", "/health", b"{}")
    assert status == 405
    assert "GET" in headers["allow"]
    status, _, data = await http_request(srv.url, "HEAD", "/health")
    assert (status, data) == (200, b"")
    status, _, _ = await http_request(srv.url, "DELETE", "/anything/else")
    assert status == 404


async def test_any_other_path_still_upgrades(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(api_key=KEY)
    client = await open_client(srv.url + "/api/publish?x=1")
    await client.subscribe("t")


def test_key_check_compares_every_key() -> None:
    def request(auth: str | None) -> HttpRequest:
        headers = CIMultiDict({"Authorization": auth} if auth is not None else {})
        return HttpRequest("GET", "/metrics", headers=CIMultiDictProxy(headers))

    keys = KeyCheck("a-key", "", "b-key")
    assert keys
    assert not KeyCheck("", "")
    assert keys.allows(request("Bearer a-key"))
    assert keys.allows(request("bearer b-key"))
    for bad in (None, "", "Bearer", "Bearer c-key", "Basic a-key", "Bearer a-ke"):
        assert not keys.allows(request(bad)), bad


async def test_a_deferred_answer_is_sent_when_ready_even_after_the_client_half_closed(
    make_server: ServerFactory,
) -> None:
    srv = await make_server()
    called = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: HttpRequest) -> HttpResponse:
        called.set()
        await release.wait()
        return json_response({"late": True})

    srv.http.add("/slow", slow)
    reader, writer = await open_socket(srv.url)
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: dwsps\r\n\r\n")
        writer.write_eof()  # done sending, still reading
        await asyncio.wait_for(called.wait(), DEFAULT_TIMEOUT)
        release.set()
        answer = await asyncio.wait_for(reader.read(), DEFAULT_TIMEOUT)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b'{"late":true}')


# -- against a real ``dwsps serve`` ----------------------------------------------------


async def test_the_status_codes_of_dwsps_serve(
    serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    proc = await serve_process("--api-key", KEY, "--max-frame-size", "1000")
    sub = await open_client(proc.url)
    await sub.subscribe("news")
    cases: list[tuple[str, str, bytes | None, dict[str, str] | None, int, dict | None]] = [
        ("POST", "/api/publish", b'{"topic": "news", "message": 1}', AUTH, 200, {"deliveries": 1}),
        (
            "POST", "/api/publish", b'[{"topic": "news", "message": 2}, {"topic": "x"}]', AUTH,
            200, {"published": 2, "deliveries": 1},
        ),
        ("POST", "/api/publish", b'{"topic": "news..x"}', AUTH, 400, None),
        ("POST", "/api/publish", b"{nope", AUTH, 400, None),
        ("POST", "/api/publish", b'{"topic": "news"}', None, 401, None),
        ("POST", "/api/publish", b'{"topic": "news"}', {"Authorization": "Bearer no"}, 401, None),
        ("POST", "/api/publish", b'{"topic": "news", "m": "' + b"x" * 999 + b'"}', AUTH, 413, None),
        ("GET", "/api/publish", None, AUTH, 405, None),
        ("POST", "/api/nothing", b"{}", AUTH, 404, None),
        ("GET", "/api/topics", None, AUTH, 200, {"topics": {"news": 1}}),
    ]  # fmt: skip
    for method, path, body, headers, status, expected in cases:
        got, _, data = await http_request(proc.url, method, path, body, headers)
        assert got == status, (method, path, body, data)
        if expected is not None:
            assert orjson.loads(data) == expected
        elif status in (400, 401):
            assert orjson.loads(data)["error"] in ("invalid_topic", "invalid_json", "unauthorized")
    assert [m["message"] for m in await sub.take(2)] == [1, 2]
    await sub.sync()
    assert sub.take_all(is_delivery()) == [], "a refused publish was delivered"


async def test_the_api_key_from_a_file_and_from_the_environment(
    serve_process: ProcessFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "api.key"
    key_file.write_text("from-a-file\n")  # the newline is not part of the key
    from_file = await serve_process("--api-key-file", str(key_file))
    monkeypatch.setenv("DWSPS_API_KEY", "from-the-environment")
    from_env = await serve_process()
    body = b'{"topic": "t", "message": 1}'
    for proc, key, other in (
        (from_file, "from-a-file", "from-the-environment"),
        (from_env, "from-the-environment", "from-a-file"),
    ):
        for presented, status in ((key, 200), (other, 401)):
            headers = {"Authorization": f"Bearer {presented}"}
            got, _, _ = await http_request(proc.url, "POST", "/api/publish", body, headers)
            assert got == status, (proc.args, presented)


async def test_an_http_publish_is_forwarded_to_a_peer(
    serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    remote = await serve_process("--heartbeat-interval", "0")
    local = await serve_process("--api-key", KEY, "--peer", remote.url, "--heartbeat-interval", "0")
    sub = await open_client(remote.url)
    await sub.subscribe("news")
    body = b'{"topic": "news.uk", "message": {"via": "http"}}'
    status, _, data = await http_request(local.url, "POST", "/api/publish", body, AUTH)
    assert (status, orjson.loads(data)) == (200, {"deliveries": 0})
    # Held in the peer link's outbox until it is up, then delivered over there.
    got = await sub.next_message(is_delivery("news.uk"), within=PEER_WAIT)
    assert got["message"] == {"via": "http"}
    assert got["context"] == "news"
