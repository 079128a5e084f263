"""One test per finding of the hardening issue (issue 9) that is fixed on this branch,
each over real sockets and each failing before its fix.

Findings 1, 2, 5, 6, 7 and 10 (the connection and write path) have their tests with
the attacks of the robustness suite (tests/robustness/test_attacks.py).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import ClientFactory, ProcessFactory, ServerFactory
from tests.peering.helpers import WAIT, wait_health
from tests.support import scaled
from tests.wsclient import http_get, is_delivery, is_type

pytestmark = [pytest.mark.timeout(scaled(90))]


def nested(depth: int) -> Any:
    """``depth`` arrays, one inside the other: ``[[[...]]]``."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


# -- finding 3: one nesting limit, at parse time ----------------------------------------

MAX_DEPTH = 254
"""What orjson.dumps can encode (dwsps.messages.MAX_DEPTH; tests/test_messages.py ties them)."""


async def test_finding3_too_deep_is_invalid_message_and_the_deepest_accepted_delivers(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await make_server()
    sub = await open_client(srv.url)
    await sub.subscribe("deep")
    pub = await open_client(srv.url)
    # The request object is one level; the message may take the rest.
    for depth in (MAX_DEPTH, 300, 1023, 1100):
        # Written by hand: the test client's own encoder stops at 254 levels too.
        frame = b'{"type":"publish","topic":"deep","message":' + b"[" * depth + b"]" * depth
        await pub.send_text(frame + b"}")
        reply = await pub.next_message(is_type("error"))
        assert reply["error"] == "invalid_message", (depth, reply)
        assert str(MAX_DEPTH) in reply["detail"]
    deepest = nested(MAX_DEPTH - 1)
    ack = await pub.request({"type": "publish", "topic": "deep", "message": deepest})
    assert ack["type"] == "ack", ack
    delivery = await sub.next_message(is_delivery("deep"))
    assert delivery["message"] == deepest
    # Nothing was refused by the encoder: both still connected, no internal error.
    await pub.sync()
    assert not pub.closed.done()
    assert not sub.closed.done()
    assert srv.stats.errors_by_code == {"invalid_message": 4}


# -- finding 4: identity only from peers -------------------------------------------------


@pytest.mark.parametrize("tokens", [False, True], ids=["open", "peer-tokens"])
async def test_finding4_a_client_cannot_forge_a_peers_identity(
    tokens: bool, serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    b = await serve_process(*(("--accept-peer-token", "s3cret") if tokens else ()))
    a_args = ["--peer", b.url] + (["--peer-token", f"{b.url}=s3cret"] if tokens else [])
    a = await serve_process(*a_args)
    a_doc = await wait_health(a.url, lambda d: d["peers"][0]["state"] == "up", what="a -> b up")
    sub = await open_client(b.url)
    await sub.subscribe("t")
    pub_a = await open_client(a.url)
    await pub_a.publish("t", "before")
    await sub.next_message(is_delivery("t"), within=WAIT)

    attacker = await open_client(b.url)
    forged = {"origin": a_doc["server_id"], "seq": 2**64 - 1}
    # An ordinary publish carrying a peer's identity: taken as organic, identity replaced.
    ack = await attacker.publish("t", "forged", **forged)
    assert ack["type"] == "ack"
    assert (await sub.next_message(is_delivery("t")))["message"] == "forged"
    if tokens:
        # Claiming to be a peer without the token is refused outright.
        reply = await attacker.request(
            {"type": "publish", "topic": "t", "message": "x", "fromPeerServer": True, **forged}
        )
        assert reply["error"] == "forbidden", reply

    # a's later publishes still reach b's subscriber: nothing was taken as a duplicate.
    for n in range(3):
        await pub_a.publish("t", f"after-{n}")
    got = [(await sub.next_message(is_delivery("t"), within=WAIT))["message"] for _ in range(3)]
    assert got == ["after-0", "after-1", "after-2"]
    b_doc = await wait_health(b.url, lambda d: True)
    assert b_doc["stats"]["duplicates_dropped"] == 0


# -- finding 8: --peer-token URL=TOKEN with a query string -------------------------------


async def test_finding8_peer_token_for_a_url_with_a_query_string(
    serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    b = await serve_process("--accept-peer-token", "tok-1")
    url = f"{b.url}/?region=eu&zone=a"
    a = await serve_process("--peer", url, "--peer-token", f"{url}=tok-1")
    doc = await wait_health(a.url, lambda d: d["peers"][0]["state"] == "up", what="link up")
    assert doc["peers"][0]["authenticated"] is True
    assert doc["peers"][0]["url"] == url
    sub = await open_client(b.url)
    await sub.subscribe("q")
    pub = await open_client(a.url)
    await pub.publish("q", "through")
    delivery = await sub.next_message(is_delivery("q"), within=WAIT)
    # b requires the token for fromPeerServer: it arrived, so the token was sent.
    assert (delivery["message"], delivery["fromPeerServer"]) == ("through", True)
    assert (await wait_health(b.url, lambda d: True))["stats"]["errors_sent"] == 0


# -- finding 9: no credentials in /health, /metrics or the log; restricted endpoints -----

SECRETS = ("hunter2", "s3cret-q", "tok-in-user")


async def test_finding9_credentials_never_shown(
    serve_process: ProcessFactory, open_client: ClientFactory
) -> None:
    b = await serve_process("--accept-peer-token", "s3cret-q")
    host = b.url.removeprefix("ws://")
    peers = [
        f"ws://admin:hunter2@{host}/?peer_token=s3cret-q",
        f"ws://tok-in-user@{host}/x",
    ]
    a = await serve_process(*(arg for url in peers for arg in ("--peer", url)))
    doc = await wait_health(
        a.url, lambda d: all(p["state"] == "up" for p in d["peers"]), what="links up"
    )
    pub = await open_client(a.url)
    await pub.publish("t", 1)
    shown = [orjson.dumps(doc).decode(), (await http_get(a.url, "/metrics"))[1].decode()]
    await a.stop()
    shown.append(a.log())
    for text in shown:
        for secret in SECRETS:
            assert secret not in text, (secret, text)
    assert "admin:***@" in shown[0]


async def test_finding9_status_key_restricts_health_details_and_metrics(
    serve_process: ProcessFactory,
) -> None:
    a = await serve_process("--status-key", "st-key", "--api-key", "api-key")
    # Probes stay open.
    assert (await http_get(a.url, "/health/live"))[0] == 200
    assert (await http_get(a.url, "/health/ready"))[0] == 200
    # Without the key: the status only, no id, no counters; /metrics refused.
    status, body = await http_get(a.url, "/health")
    assert (status, orjson.loads(body)) == (200, {"status": "ok"})
    assert (await http_get(a.url, "/metrics"))[0] == 401
    wrong = {"Authorization": "Bearer nope"}
    assert orjson.loads((await http_get(a.url, "/health", wrong))[1]) == {"status": "ok"}
    assert (await http_get(a.url, "/metrics", wrong))[0] == 401
    # The status key, and the API key (which may do more), see everything.
    for key in ("st-key", "api-key"):
        auth = {"Authorization": f"Bearer {key}"}
        status, body = await http_get(a.url, "/health", auth)
        assert status == 200
        assert "server_id" in orjson.loads(body)
        status, body = await http_get(a.url, "/metrics", auth)
        assert status == 200
        assert b"dwsps_connections" in body
    # The status key is not an API key.
    status, _ = await http_get(a.url, "/api/topics", {"Authorization": "Bearer st-key"})
    assert status == 401
