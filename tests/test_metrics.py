"""``dwsps.metrics``: known traffic on real servers, then the exposition parsed and checked."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from dwsps import Server
from dwsps.build import kind
from dwsps.errors import ErrorCode
from dwsps.http import HttpRequest
from dwsps.metrics import CONTENT_TYPE, Metrics, render
from tests.conftest import ClientFactory, ProcessFactory, ServerFactory
from tests.support import eventually
from tests.wsclient import DEFAULT_TIMEOUT, http_request, is_delivery

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: Server) -> Samples:
    """Every sample of ``render(server)``, keyed by (name, sorted labels)."""
    return parse(render(server).decode())


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_traffic_counters_and_errors_by_code(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server()
    sub1 = await open_client(srv.url)
    sub2 = await open_client(srv.url)
    pub = await open_client(srv.url)
    for i, (client, topic) in enumerate([(sub1, "news"), (sub1, "sport"), (sub2, "news")]):
        await client.request({"type": "subscribe", "topic": topic, "id": f"s{i}"})
    for i in range(2):  # two publishes, each matching two subscriptions
        ack = await pub.request({"type": "publish", "topic": "news.uk", "message": i, "id": i})
        assert ack["type"] == "ack"
    await pub.request({"type": "publish", "topic": "sport", "message": "x", "id": "p3"})
    bad_topic = await pub.request({"type": "publish", "topic": "a..b", "message": 1, "id": "e1"})
    assert bad_topic["error"] == "invalid_topic"
    await pub.send_text("{not json")
    await pub.send_text("[1]")  # JSON, but not a request
    await pub.sync()
    for _ in range(3):
        await sub1.next_message(is_delivery())
    await sub2.next_message(is_delivery())

    m = scrape(srv)
    assert value(m, "dwsps_connections") == 3
    assert value(m, "dwsps_subscriptions") == 3
    assert value(m, "dwsps_publishes_total") == 3
    assert value(m, "dwsps_deliveries_total") == 5
    assert value(m, "dwsps_connections_opened_total") == 3
    errors = {code: value(m, "dwsps_errors_total", code=str(code)) for code in ErrorCode}
    assert errors == {
        **dict.fromkeys(ErrorCode, 0.0),
        ErrorCode.INVALID_TOPIC: 1.0,
        ErrorCode.INVALID_JSON: 1.0,
        ErrorCode.INVALID_MESSAGE: 1.0,
    }
    assert sum(errors.values()) == srv.stats.errors_sent
    # Every counter is the server's own, read at scrape time.
    stats = srv.stats
    for name, field in [
        ("dwsps_requests_total", stats.requests),
        ("dwsps_slow_consumers_total", stats.slow_consumers),
        ("dwsps_heartbeat_timeouts_total", stats.heartbeat_timeouts),
        ("dwsps_invalid_closes_total", stats.invalid_closes),
        ("dwsps_duplicates_dropped_total", stats.duplicates_dropped),
    ]:
        assert value(m, name) == field, name
    assert value(m, "dwsps_requests_total") == 3 + 3 + 3 + 1  # subscribes, publishes, bad, sync
    assert value(m, "dwsps_info", server_id=srv.server_id, version="0.1.0", build=kind()) == 1

    await sub2.close()
    await eventually(lambda: len(srv.connections) == 2, "the close to be seen")
    m = scrape(srv)
    assert (value(m, "dwsps_connections"), value(m, "dwsps_subscriptions")) == (2, 2)


async def test_a_real_scrape_of_dwsps_serve_after_known_traffic(
    serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    proc = await serve_process("--heartbeat-interval", "0", "--api-key", "k")
    sub = await open_client(proc.url)
    pub = await open_client(proc.url)
    await sub.subscribe("news", "news.uk")
    for i in range(2):  # each to both subscriptions
        await pub.publish("news.uk", i)
    await pub.publish("news", "one more")  # to one
    status, _, _ = await http_request(
        proc.url, "POST", "/api/publish", b'{"topic": "news", "message": 3}',
        {"Authorization": "Bearer k"},
    )  # fmt: skip
    assert status == 200
    bad = await pub.request({"type": "publish", "topic": "news..uk", "message": 4})
    assert bad["error"] == "invalid_topic"
    await sub.take(6)

    status, headers, body = await http_request(proc.url, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE
    m = parse(body.decode())
    assert value(m, "dwsps_connections") == 2
    assert value(m, "dwsps_subscriptions") == 2
    assert value(m, "dwsps_publishes_total") == 4
    assert value(m, "dwsps_deliveries_total") == 6
    errors = {code: value(m, "dwsps_errors_total", code=str(code)) for code in ErrorCode}
    assert errors == {**dict.fromkeys(ErrorCode, 0.0), ErrorCode.INVALID_TOPIC: 1.0}
    assert value(m, "dwsps_connections_opened_total") == 2
    assert value(m, "dwsps_slow_consumers_total") == 0
    # The process collector of the serving process, not of this one.
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "process_open_fds") >= 3


async def test_heartbeat_timeouts_are_counted(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server(heartbeat_interval=0.05)
    silent = await open_client(srv.url, auto_pong=False)
    await silent.wait_eof(within=DEFAULT_TIMEOUT)
    assert value(scrape(srv), "dwsps_heartbeat_timeouts_total") == 1


async def test_process_and_platform_metrics_in_a_private_registry(
    make_server: ServerFactory,
) -> None:
    first, second = await make_server(), await make_server()
    first.publish("news", 1)
    m = scrape(first)
    assert value(m, "process_resident_memory_bytes") > 1_000_000
    assert value(m, "process_open_fds") > 0
    assert any(name == "python_info" for name, _ in m)
    # Each server has its own registry: nothing leaks into the global one or the other server.
    assert value(scrape(second), "dwsps_publishes_total") == 0
    assert REGISTRY.get_sample_value("dwsps_publishes_total") is None
    metrics = Metrics(first)
    response = metrics.response(HttpRequest("GET", "/metrics"))
    assert (response.status, response.content_type) == (200, CONTENT_TYPE)
    assert b"\ndwsps_publishes_total 1.0\n" in response.body
    first.publish("news", 2)
    assert b"\ndwsps_publishes_total 2.0\n" in metrics.render()  # read again on every scrape


async def test_peer_links_state_and_counters(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    remote = await make_server()
    watcher = await open_client(remote.url)
    await watcher.request({"type": "subscribe", "topic": "news", "id": 1})
    dead = "ws://user:s3cret@127.0.0.1:1/?token=t0ken"  # port 1: refused
    local = await make_server(peers=[remote.url, dead])
    up = asyncio.Event()
    local.on("peer_up", lambda url: up.set())
    if local.peer_status()[0]["state"] != "up":
        await asyncio.wait_for(up.wait(), DEFAULT_TIMEOUT)
    local.publish("news", "hello")
    await watcher.next_message(is_delivery("news"))
    await eventually(lambda: local.peer_status()[0]["confirmed"] == 1, "the peer's ack")

    m = scrape(local)
    url = remote.url
    states = {s: value(m, "dwsps_peer_state", url=url, state=s) for s in ("connecting", "up")}
    assert states == {"connecting": 0, "up": 1}
    assert value(m, "dwsps_peer_state", url=url, state="down") == 0
    assert value(m, "dwsps_peer_sent_total", url=url) == 1
    assert value(m, "dwsps_peer_confirmed_total", url=url) == 1
    assert value(m, "dwsps_peer_connects_total", url=url) == 1
    assert value(m, "dwsps_peer_outbox_messages", url=url) == 0
    # The unreachable peer: redacted label, not up, its publish waiting in the outbox.
    shown = local.peer_status()[1]["url"]
    assert "s3cret" not in shown
    assert "t0ken" not in shown
    assert value(m, "dwsps_peer_state", url=shown, state="up") == 0
    assert (
        sum(value(m, "dwsps_peer_state", url=shown, state=s) for s in ("connecting", "down")) == 1
    )
    assert value(m, "dwsps_peer_outbox_messages", url=shown) == 1
    assert value(m, "dwsps_peer_outbox_bytes", url=shown) > 0
    assert value(m, "dwsps_peer_sent_total", url=shown) == 0
    assert "s3cret" not in render(local).decode()


async def test_backplane_state_and_counters(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    plain = await make_server()
    assert not any(name.startswith("dwsps_backplane") for name, _ in scrape(plain))
    first = await make_server(backplane="memory://metrics-test")
    second = await make_server(backplane="memory://metrics-test")
    watcher = await open_client(second.url)
    await watcher.request({"type": "subscribe", "topic": "news", "id": 1})
    first.publish("news", 1)
    await watcher.next_message(is_delivery("news"))

    url = "memory://metrics-test"
    m1, m2 = scrape(first), scrape(second)
    assert value(m1, "dwsps_backplane_state", url=url, state="up") == 1
    assert value(m1, "dwsps_backplane_state", url=url, state="down") == 0
    assert value(m1, "dwsps_backplane_healthy", url=url) == 1
    assert value(m1, "dwsps_backplane_forwarded_total", url=url) == 1
    assert value(m2, "dwsps_backplane_delivered_total", url=url) == 1
    assert value(m2, "dwsps_backplane_gaps_total", url=url) == 0
    assert value(m2, "dwsps_deliveries_total") == 1
