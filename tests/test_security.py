"""Authentication, permissions and limits over real sockets (PROTOCOL.md, "Extensions").

Every row of the Authentication, Permissions and Limits sections against
in-process servers: each refusal status with its one-line reason, tokens in
the header and in ``?token=``, each permission rule including the ``*``
subtleties, identities in events and introspection, expiry and refresh,
rate limits, connection caps, Origin, ``fromPeerServer`` and peer links with
tokens, RS256/ES256 keys made here, the async ``authenticate`` hook, and a
hypothesis fuzz of token strings against a server that must keep serving.

Pure rules are tested by value in test_auth.py, test_permissions.py and
test_limits.py; here each path is checked end to end. Nothing sleeps to wait:
every wait is for an event (a reply, a close, a connection) with a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from dwsps import Client, Server
from dwsps.auth import Identity, UpgradeRequest, mint_token
from dwsps.errors import AuthError, ConnectionClosed, ForbiddenError, UnauthorizedError
from dwsps.metrics import render
from dwsps.permissions import Permissions
from tests.conftest import ClientFactory, ProcessFactory, ServerFactory
from tests.support import eventually, scaled
from tests.wsclient import (
    DEFAULT_TIMEOUT,
    SYNC_TOPIC,
    HandshakeError,
    RawClient,
    http_get,
    is_delivery,
    reply_to,
)

SECRET = "dwsps-test-secret-" + "0123456789abcdef" * 3  # 66 bytes: HS256, HS384 and HS512
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256!"
AUDIENCE = "dwsps-test"
ISSUER = "https://issuer.test/"
API_KEY = "api-key-for-the-security-tests"
WAIT = scaled(10.0)

REASONS = {
    "missing token",
    "token too long",
    "malformed token",
    "algorithm not allowed",
    "bad signature",
    "token expired",
    "token not yet valid",
    "invalid audience",
    "invalid issuer",
    "invalid subject",
    "invalid dwsps claim",
    "invalid token",
    "missing claim",
}
"""Every 401 reason docs/security.md lists (and PyJWT's catch-all for other claims)."""


def mint(
    sub: str | None = "alice",
    *,
    ttl: float | None = 60,
    subscribe: tuple[str, ...] | None = None,
    publish: tuple[str, ...] | None = None,
    secret: str = SECRET,
    **kwargs: Any,
) -> str:
    """An HS256 token; ``subscribe``/``publish`` make the ``dwsps`` claim."""
    permissions = None
    if subscribe is not None or publish is not None:
        permissions = Permissions(subscribe or (), publish or ())
    return mint_token(secret, sub=sub, ttl=ttl, permissions=permissions, **kwargs)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """A token signed by hand (for headers PyJWT would not write)."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


async def refusal(
    url: str,
    *,
    token: str | None = None,
    where: str = "header",
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> HandshakeError:
    """The refusal of an upgrade that must fail (the test fails if it opens)."""
    path, fields = _placed(token, where, headers)
    try:
        client = await RawClient.connect(url, path=path, headers=fields, source=source)
    except HandshakeError as err:
        return err
    await client.dispose()
    raise AssertionError(f"the upgrade to {url}{path} was accepted")


def _placed(
    token: str | None, where: str, headers: dict[str, str] | None
) -> tuple[str, dict[str, str]]:
    fields = dict(headers or {})
    path = "/"
    if token is not None and where == "header":
        fields.update(bearer(token))
    elif token is not None:
        path = f"/?token={quote(token, safe='')}"
    return path, fields


async def connect(
    open_client: ClientFactory, url: str, token: str | None, where: str = "header", **kw: Any
) -> RawClient:
    path, fields = _placed(token, where, kw.pop("headers", None))
    return await open_client(url, path=path, headers=fields, **kw)


def assert_refused(err: HandshakeError, status: int, reason: str) -> None:
    """A refusal is the status, one plain-text line, and nothing else of the server."""
    assert err.status == status, err
    assert err.reason == reason, err
    assert err.body == reason.encode() + b"\n", err
    assert (err.header("content-type") or "").startswith("text/plain"), err
    assert err.header("server") is None, err
    assert err.header("sec-websocket-accept") is None, err


async def jwt_server(make_server: ServerFactory, **overrides: Any) -> Server:
    overrides.setdefault("auth_jwt_secret", SECRET)
    overrides.setdefault("heartbeat_interval", 0)
    return await make_server(**overrides)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- authentication: each 401 ------------------------------------------------------


def _alg_none() -> str:
    claims = {"sub": "mallory", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 60}
    return f"{b64(orjson.dumps({'alg': 'none', 'typ': 'JWT'}))}.{b64(orjson.dumps(claims))}."


def _tampered() -> str:
    head, payload, sig = mint(sub="alice", audience=AUDIENCE, issuer=ISSUER).split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "admin"
    return f"{head}.{b64(orjson.dumps(claims))}.{sig}"


def _signed_by(key: rsa.RSAPrivateKey) -> str:
    return mint_token(
        private_pem(key), sub="x", ttl=60, algorithm="RS256", audience=AUDIENCE, issuer=ISSUER
    )


REFUSED_TOKENS: list[tuple[str, Any, str]] = [
    ("missing", lambda _k: None, "missing token"),
    ("malformed", lambda _k: "not-a-jwt", "malformed token"),
    ("three junk segments", lambda _k: "a.b.c", "malformed token"),
    (
        "bad signature",
        lambda _k: mint(secret=OTHER_SECRET, audience=AUDIENCE, issuer=ISSUER),
        "bad signature",
    ),
    ("tampered payload", lambda _k: _tampered(), "bad signature"),
    (
        "expired",
        lambda _k: mint(ttl=None, expires_at=time.time() - 5, audience=AUDIENCE, issuer=ISSUER),
        "token expired",
    ),
    (
        "nbf ahead",
        lambda _k: hs256(
            {"alg": "HS256"},
            {"sub": "a", "aud": AUDIENCE, "iss": ISSUER, "nbf": int(time.time()) + 600},
            SECRET.encode(),
        ),
        "token not yet valid",
    ),
    ("wrong aud", lambda _k: mint(audience="elsewhere", issuer=ISSUER), "invalid audience"),
    ("no aud", lambda _k: mint(issuer=ISSUER), "invalid audience"),
    ("wrong iss", lambda _k: mint(audience=AUDIENCE, issuer="https://evil/"), "invalid issuer"),
    ("alg none", lambda _k: _alg_none(), "algorithm not allowed"),
    (
        "unconfigured HS384",
        lambda _k: mint(algorithm="HS384", audience=AUDIENCE, issuer=ISSUER),
        "algorithm not allowed",
    ),
    ("unconfigured RS256", _signed_by, "algorithm not allowed"),
    ("too long", lambda _k: "e" * 9000, "token too long"),
    (
        "bad dwsps claim",
        lambda _k: hs256(
            {"alg": "HS256"},
            {"aud": AUDIENCE, "iss": ISSUER, "dwsps": {"subscribe": "news"}},
            SECRET.encode(),
        ),
        "invalid dwsps claim",
    ),
]


@pytest.mark.parametrize("where", ["header", "query"])
@pytest.mark.parametrize(
    ("case", "make", "reason"), REFUSED_TOKENS, ids=[c[0] for c in REFUSED_TOKENS]
)
async def test_each_bad_token_gets_401_with_its_reason(
    make_server: ServerFactory,
    open_client: ClientFactory,
    rsa_key: rsa.RSAPrivateKey,
    where: str,
    case: str,
    make: Any,
    reason: str,
) -> None:
    srv = await jwt_server(
        make_server,
        auth_jwt_audience=AUDIENCE,
        auth_jwt_issuer=ISSUER,
        auth_jwt_algorithms=["HS256"],
    )
    err = await refusal(srv.url, token=make(rsa_key), where=where)
    assert_refused(err, 401, reason)
    # Nothing of the refused client stays; a good token in the same place gets in.
    assert srv.connections == {}
    assert srv.hub.admission.total == 0
    good = await connect(open_client, srv.url, mint(audience=AUDIENCE, issuer=ISSUER), where)
    await good.subscribe("news")
    assert [c.user for c in srv.connections.values()] == ["alice"]


async def test_header_wins_over_query_and_other_schemes_are_ignored(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server)
    # A good header and a bad query token: the header is the one checked.
    path = f"/?token={quote(mint(secret=OTHER_SECRET))}"
    ok = await open_client(srv.url, path=path, headers=bearer(mint(sub="from-header")))
    await ok.sync()
    assert [c.user for c in srv.connections.values()] == ["from-header"]
    # A bad header and a good query token: refused by the header.
    err = await refusal(
        srv.url, token=mint(sub="q"), where="query", headers=bearer(mint(secret=OTHER_SECRET))
    )
    assert_refused(err, 401, "bad signature")
    # Basic auth is not a token; the query token is used then.
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    via_query = await connect(open_client, srv.url, mint(sub="q"), "query", headers=basic)
    await via_query.sync()
    assert sorted(str(c.user) for c in srv.connections.values()) == ["from-header", "q"]
    # The scheme is case-insensitive.
    lower = await open_client(srv.url, headers={"authorization": f"bEaReR {mint(sub='lc')}"})
    await lower.sync()
    assert "lc" in {c.user for c in srv.connections.values()}


async def test_refused_upgrades_hold_no_connection_slot(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server, max_connections=1)
    for _ in range(5):
        assert_refused(await refusal(srv.url, token="junk"), 401, "malformed token")
    client = await connect(open_client, srv.url, mint())
    await client.subscribe("news")
    assert_refused(await refusal(srv.url, token=mint()), 503, "server at its connection limit")


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_public_key_tokens_made_here(
    make_server: ServerFactory,
    open_client: ClientFactory,
    tmp_path: Any,
    rsa_key: rsa.RSAPrivateKey,
    alg: str,
) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    other: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if alg == "RS256":
        key, other = rsa_key, rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key, other = (
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
        )
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(key))
    srv = await make_server(auth_jwt_public_key=str(pem), heartbeat_interval=0)

    token = mint_token(
        private_pem(key), sub="svc", ttl=60, algorithm=alg, permissions=Permissions(("a",), ())
    )
    client = await connect(open_client, srv.url, token)
    await client.subscribe("a.b")
    reply = await client.request({"type": "publish", "topic": "a.b", "message": 1})
    assert reply["error"] == "forbidden"  # the dwsps claim holds no publish pattern
    assert [c.user for c in srv.connections.values()] == ["svc"]

    forged = mint_token(private_pem(other), sub="svc", ttl=60, algorithm=alg)
    assert_refused(await refusal(srv.url, token=forged), 401, "bad signature")
    head, payload, sig = token.split(".")
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    assert_refused(
        await refusal(srv.url, token=f"{head}.{payload}.{flipped}"), 401, "bad signature"
    )
    # Key confusion: an HS256 token whose "secret" is the server's public key.
    confused = hs256({"alg": "HS256"}, {"sub": "mallory"}, public_pem(key))
    assert_refused(await refusal(srv.url, token=confused), 401, "algorithm not allowed")
    assert_refused(await refusal(srv.url, token=mint()), 401, "algorithm not allowed")


# -- fuzz: the handshake never breaks ----------------------------------------------


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[Server]:
    """A JWT server on its own thread and loop, so that a sync hypothesis test can hammer it."""
    loop = asyncio.new_event_loop()
    box: list[Server] = []
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            srv = Server(host="127.0.0.1", port=0, auth_jwt_secret=SECRET, heartbeat_interval=0)
            loop.run_until_complete(srv.start())
            box.append(srv)
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(srv.close())
            loop.close()

    thread = threading.Thread(target=run, name="fuzzed-server", daemon=True)
    thread.start()
    assert started.wait(WAIT), "the fuzzed server did not start"
    if failure:
        raise failure[0]
    try:
        yield box[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        assert not thread.is_alive(), "the fuzzed server did not stop"


def blocking_upgrade(srv: Server, target: bytes, headers: list[bytes]) -> tuple[int, bytes]:
    """One upgrade request on a plain blocking socket: (status, body)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=DEFAULT_TIMEOUT) as sock:
        lines = [
            b"GET " + target + b" HTTP/1.1",
            b"Host: 127.0.0.1",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
            *headers,
        ]
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed without an answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, body


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
GOOD = mint(sub="fuzz", ttl=None)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
TOKENS = st.one_of(
    st.text(max_size=200),
    st.lists(st.text(alphabet=B64URL, max_size=60), min_size=1, max_size=5).map(".".join),
    # One character of a valid token changed, a valid token cut short, or grown.
    st.tuples(st.integers(0, len(GOOD) - 1), st.sampled_from(B64URL + ".=")).map(
        lambda t: GOOD[: t[0]] + t[1] + GOOD[t[0] + 1 :]
    ),
    st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n]),
    st.text(alphabet=B64URL, max_size=20).map(lambda s: GOOD + s),
    # Well-formed segments around odd JSON: headers and claims of any shape (huge ints too).
    st.tuples(JSONISH, JSONISH, st.text(alphabet=B64URL, max_size=50)).map(
        lambda t: f"{b64(json.dumps(t[0]).encode())}.{b64(json.dumps(t[1]).encode())}.{t[2]}"
    ),
    st.integers(8190, 9000).map(lambda n: "x" * n),
)


def _same_as_good(token: str) -> bool:
    """Whether ``token`` decodes to the very bytes of GOOD (base64 has spellings that do)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        return False
    try:
        decoded = [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in parts]
    except ValueError:
        return False
    return decoded == [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in GOOD.split(".")]


def test_fuzzed_tokens_never_break_the_handshake(threaded_server: Server) -> None:
    srv = threaded_server
    statuses: set[int] = set()

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(TOKENS, st.sampled_from(["header", "query", "raw-query"]))
    def one(token: str, where: str) -> None:
        headers: list[bytes] = []
        target = b"/"
        if where == "header":
            # A header value cannot hold a line break (that is request smuggling, not a token).
            value = token.replace("\r", "").replace("\n", "")
            headers.append(b"Authorization: Bearer " + value.encode("utf-8"))
        elif where == "query":
            target = b"/?token=" + quote(token, safe="").encode()
        else:
            target = b"/?token=" + token.encode("utf-8")
        status, body = blocking_upgrade(srv, target, headers)
        statuses.add(status)
        if status == 101:
            # Only the good token itself, however its base64 is spelled, gets in.
            assert where == "header" or "token=" in target.decode(errors="replace")
            assert _same_as_good(token), token
            return
        # 401 with a known reason; 400/431 when the HTTP request itself is broken or too big.
        assert status in (400, 401, 431), (status, body)
        if status == 401:
            assert body.decode().rstrip("\n") in REASONS, body

    one()
    assert 401 in statuses
    # The server still serves a good client, and holds nothing of the fuzz.
    status, _ = blocking_upgrade(srv, b"/", [b"Authorization: Bearer " + GOOD.encode()])
    assert status == 101
    assert srv.stats.errors_by_code.get("internal_error", 0) == 0
    deadline = time.monotonic() + WAIT
    while srv.hub.admission.total and time.monotonic() < deadline:
        time.sleep(0.02)  # another thread's state: polled, there is no event to await here
    assert srv.hub.admission.total == 0


# -- identity ------------------------------------------------------------------------


async def test_the_sub_is_the_user_in_events_and_introspection(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(
        make_server, api_key=API_KEY, allow_anonymous=True, anonymous_subscribe=["public"]
    )
    seen: list[tuple[str, ...]] = []
    srv.on("connect", lambda cid: seen.append(("connect", str(srv.user(cid)))))
    srv.on("subscribe", lambda topic, cid: seen.append(("subscribe", topic, str(srv.user(cid)))))
    srv.on("publish", lambda topic, cid: seen.append(("publish", topic, str(srv.user(cid)))))
    gone: asyncio.Queue[str | None] = asyncio.Queue()
    srv.on("disconnect", lambda cid: gone.put_nowait(srv.user(cid)))

    alice = await connect(open_client, srv.url, mint(sub="alice"))
    await alice.subscribe("news")
    await alice.publish("news.uk", "hi")
    anon = await open_client(srv.url)
    await anon.subscribe("public")
    nobody = await connect(open_client, srv.url, mint(sub=None))
    await nobody.sync()

    assert seen[:3] == [
        ("connect", "alice"),
        ("subscribe", "news", "alice"),
        ("publish", "news.uk", "alice"),
    ]
    assert ("subscribe", "public", "None") in seen
    status, body = await http_get(srv.url, "/api/connections", bearer(API_KEY))
    assert status == 200
    rows = orjson.loads(body)["connections"]
    users = {row["user"]: row for row in rows}
    assert set(users) == {"alice", None}
    assert users["alice"]["subscriptions"] == ["news"]
    assert len(rows) == 3
    await alice.close()
    assert await asyncio.wait_for(gone.get(), WAIT) == "alice"
    assert srv.user("no-such-client") is None


# -- permissions ---------------------------------------------------------------------


async def expect_forbidden(client: RawClient, kind: str, topic: str) -> None:
    reply = await client.request({"type": kind, "topic": topic, "message": 1})
    assert reply["type"] == "error", (kind, topic, reply)
    assert reply["error"] == "forbidden", reply
    assert reply["action"] == kind


async def expect_ack(client: RawClient, kind: str, topic: str) -> None:
    reply = await client.request({"type": kind, "topic": topic, "message": 1})
    assert reply["type"] == "ack", (kind, topic, reply)


@pytest.mark.parametrize(
    ("subscribe", "publish", "allowed", "denied"),
    [
        # PROTOCOL.md: "news permits news, news.uk and news.*; it does not permit * or n".
        (
            ("news",),
            ("news.*",),
            [
                ("subscribe", "news"),
                ("subscribe", "news.uk"),
                ("subscribe", "news.*"),
                ("publish", "news.uk"),
                ("publish", "news.uk.london"),
            ],
            [
                ("subscribe", "*"),
                ("subscribe", "n"),
                ("subscribe", "newsroom"),
                ("subscribe", "*.uk"),
                ("publish", "news"),
                ("publish", "sport"),
            ],
        ),
        # a.* covers a.b and a.*, but not a itself (its publishes are not a.<x>), nor *.
        (
            ("a.*",),
            ("a",),
            [
                ("subscribe", "a.b"),
                ("subscribe", "a.*"),
                ("subscribe", "a.*.c"),
                ("publish", "a"),
                ("publish", "a.b.c"),
            ],
            [("subscribe", "a"), ("subscribe", "*"), ("subscribe", "*.b"), ("publish", "ab")],
        ),
        # Only the narrower subscription: chat.*.msg permits chat.room1.msg, never chat.*.
        (
            ("chat.*.msg",),
            (),
            [
                ("subscribe", "chat.room1.msg"),
                ("subscribe", "chat.*.msg"),
                ("subscribe", "chat.*.msg.x"),
            ],
            [
                ("subscribe", "chat.*"),
                ("subscribe", "chat.room1"),
                ("subscribe", "chat"),
                ("publish", "chat.room1.msg"),
            ],
        ),
        # * permits everything of its kind, including a subscription to *.
        (
            ("*",),
            ("*",),
            [("subscribe", "*"), ("subscribe", "x.*.y"), ("publish", "anything.at.all")],
            [],
        ),
        # A dwsps claim without a kind grants nothing of it.
        ((), ("p",), [("publish", "p.q")], [("subscribe", "p"), ("subscribe", "*")]),
    ],
    ids=["news", "a-star", "narrower-only", "star", "publish-only"],
)
async def test_permission_cases(
    make_server: ServerFactory,
    open_client: ClientFactory,
    subscribe: tuple[str, ...],
    publish: tuple[str, ...],
    allowed: list[tuple[str, str]],
    denied: list[tuple[str, str]],
) -> None:
    srv = await jwt_server(make_server)
    client = await connect(open_client, srv.url, mint(subscribe=subscribe, publish=publish))
    for kind, topic in allowed:
        await expect_ack(client, kind, topic)
    for kind, topic in denied:
        await expect_forbidden(client, kind, topic)
    # Refusals change nothing and keep the connection; unsubscribing is always allowed.
    await expect_ack(client, "unsubscribe", "never.permitted")
    held = {t for k, t in allowed if k == "subscribe"}
    assert set(srv.hub.router.subscriptions(next(iter(srv.connections.values())))) == held
    assert srv.stats.errors_by_code["forbidden"] == len(denied)


async def test_a_permitted_subscription_receives_only_inside_its_pattern(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server)
    reader = await connect(open_client, srv.url, mint(subscribe=("chat.*.msg",)))
    await reader.subscribe("chat.room1.msg", "chat.*.msg")
    writer = await connect(open_client, srv.url, mint())  # no claim: the defaults, everything
    for topic in ("chat.room1", "chat.room1.typing", "chat.room2.msg", "chat.room1.msg.edit"):
        await writer.publish(topic, topic)
    await reader.sync()
    got = sorted((d["context"], d["topic"]) for d in reader.deliveries)
    assert got == [
        ("chat.*.msg", "chat.room1.msg.edit"),
        ("chat.*.msg", "chat.room2.msg"),
        ("chat.room1.msg", "chat.room1.msg.edit"),
    ]


async def test_default_and_anonymous_permissions(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(
        make_server,
        auth_default_subscribe=["news"],
        auth_default_publish=[],
        allow_anonymous=True,
        anonymous_subscribe=["public"],
    )
    member = await connect(open_client, srv.url, mint())  # no dwsps claim
    await expect_ack(member, "subscribe", "news.uk")
    await expect_forbidden(member, "subscribe", "public")
    await expect_forbidden(member, "publish", "news")
    anonymous = await open_client(srv.url)
    await expect_ack(anonymous, "subscribe", "public.notices")
    await expect_forbidden(anonymous, "publish", "public")
    await expect_forbidden(anonymous, "subscribe", "news")
    # A token that is presented must be good, anonymous access or not.
    assert_refused(await refusal(srv.url, token=mint(secret=OTHER_SECRET)), 401, "bad signature")


async def test_from_peer_server_is_forbidden_to_clients_when_auth_is_on(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server, allow_anonymous=True, anonymous_publish=["news"])
    reader = await connect(open_client, srv.url, mint())
    await reader.subscribe("news")
    for client in (await connect(open_client, srv.url, mint()), await open_client(srv.url)):
        reply = await client.request(
            {"type": "publish", "topic": "news", "message": "fake", "fromPeerServer": True}
        )
        assert reply["error"] == "forbidden", reply
        assert "fromPeerServer" in reply["detail"]
        await client.publish("news", "real")  # the connection stays, ordinary publishes work
    await reader.sync()
    assert reader.messages() == ["real", "real"]


# -- peers with tokens -------------------------------------------------------------


async def test_peers_present_tokens_to_a_server_that_requires_them(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    b = await jwt_server(make_server, accept_peer_tokens=["peer-s3cret"])
    a = await make_server(peers=[b.url], peer_tokens={b.url: "peer-s3cret"})
    wrong = await make_server(peers=[b.url], peer_tokens={b.url: "not-the-peer-token"})
    # A valid client JWT gets a peer link in as a client, but not its fromPeerServer publishes.
    pretender = await make_server(peers=[b.url], peer_tokens={b.url: mint(sub="pretender")})
    reader = await connect(open_client, b.url, mint(sub="reader"))
    await reader.subscribe("news")

    await eventually(lambda: a.peer_status()[0]["state"] == "up", "a's link to b")
    assert a.peer_status()[0]["authenticated"] is True
    a.publish("news.uk", "via a")
    delivery = await reader.next_message(is_delivery("news.uk"), within=WAIT)
    assert delivery["message"] == "via a"
    assert delivery["fromPeerServer"] is True
    assert a.peer_status()[0]["rejected"] == 0

    await eventually(
        lambda: "401" in str(wrong.peer_status()[0]["last_error"]), "the refused link's error"
    )
    assert wrong.peer_status()[0]["state"] != "up"
    assert "not-the-peer-token" not in orjson.dumps(wrong.peer_status()).decode()

    await eventually(lambda: pretender.peer_status()[0]["state"] == "up", "the pretender's link")
    pretender.publish("news.fake", "forged")
    # Refused as forbidden; the link holds the publish and retries (a credentials problem).
    await eventually(
        lambda: "forbidden" in str(pretender.peer_status()[0]["last_error"]), "the refusal"
    )
    assert b.stats.errors_by_code["forbidden"] >= 1
    assert pretender.peer_status()[0]["outbox"] == 1
    await reader.sync()
    assert reader.messages() == ["via a"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_peer_token_scheme_is_case_insensitive(
    make_server: ServerFactory, open_client: ClientFactory, scheme: str
) -> None:
    # RFC 7235: the auth scheme is case-insensitive, as it is for client tokens.
    srv = await make_server(accept_peer_tokens=["peer-s3cret"])
    forged = {"type": "publish", "topic": "t", "message": "m", "fromPeerServer": True}
    peer = await open_client(srv.url, headers={"Authorization": f"{scheme} peer-s3cret"})
    assert (await peer.request(forged))["type"] == "ack"
    other = await open_client(srv.url, headers={"Authorization": "Basic peer-s3cret"})
    assert (await other.request(forged))["error"] == "forbidden"


# -- expiry and refresh ------------------------------------------------------------


@pytest.mark.parametrize("heartbeat", [0, 0.25], ids=["timer-at-once", "armed-by-heartbeat"])
async def test_expiry_closes_at_exp_and_a_refresh_extends_the_life(
    make_server: ServerFactory, open_client: ClientFactory, heartbeat: float
) -> None:
    srv = await jwt_server(make_server, heartbeat_interval=heartbeat)
    unsubscribed: list[str] = []
    srv.on("unsubscribe", lambda topic, _cid: unsubscribed.append(topic))
    exp = int(time.time()) + 2  # one to two seconds away
    short = mint(sub="short", ttl=None, expires_at=exp, subscribe=("a",), publish=("a",))
    expiring = await connect(open_client, srv.url, short)
    renewed = await connect(open_client, srv.url, short)
    await expiring.sync()
    if heartbeat and exp - time.time() > 2 * heartbeat:
        # Not due within two heartbeats: no timer yet (they cost memory per connection).
        assert all(c.expiry is None for c in srv.connections.values())
    await renewed.subscribe("a", "a.b")
    everyone = await connect(open_client, srv.url, mint(sub="writer"))

    fresh = mint(sub="renewed", ttl=3600, subscribe=("b",), publish=("b",))
    ack = await renewed.request({"type": "auth", "token": fresh, "id": "re"})
    assert ack == {"type": "ack", "action": "auth", "timestamp": ack["timestamp"], "id": "re"}
    # The new permissions apply at once, to what is held too.
    assert sorted(t for t in unsubscribed if t != SYNC_TOPIC) == ["a", "a.b"]
    await expect_forbidden(renewed, "subscribe", "a")
    await expect_ack(renewed, "subscribe", "b")
    await everyone.publish("a", "to a")
    await everyone.publish("b", "to b")

    code = await expiring.wait_closed(within=WAIT)
    closed_at = time.time()
    assert (code, expiring.close_reason) == (1008, "token expired")
    assert closed_at >= exp - 0.05, "closed before the token's exp"
    assert closed_at < exp + scaled(2.0)
    # The renewed connection outlived the first token, with its new identity.
    await renewed.sync()
    assert renewed.messages() == ["to b"]
    assert {c.user for c in srv.connections.values()} == {"renewed", "writer"}


async def test_leeway_keeps_a_just_expired_token_alive_until_exp_plus_leeway(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server, auth_jwt_leeway=30)
    token = mint(ttl=None, expires_at=time.time() - 5)
    client = await connect(open_client, srv.url, token)
    await client.subscribe("news")  # not closed at once: the leeway still covers it
    (conn,) = srv.connections.values()
    assert conn.expiry is not None
    remaining = conn.expiry.when() - asyncio.get_running_loop().time()
    assert scaled(0) < remaining <= 26
    assert_refused(
        await refusal(srv.url, token=mint(ttl=None, expires_at=time.time() - 40)),
        401,
        "token expired",
    )


@pytest.mark.parametrize(
    ("token", "detail"),
    [
        ("garbage", "malformed token"),
        (mint(ttl=None, expires_at=1000), "token expired"),
        (mint(secret=OTHER_SECRET), "bad signature"),
    ],
    ids=["malformed", "expired", "bad-signature"],
)
async def test_a_bad_refresh_is_unauthorized_and_closes_1008(
    make_server: ServerFactory, open_client: ClientFactory, token: str, detail: str
) -> None:
    srv = await jwt_server(make_server)
    client = await connect(open_client, srv.url, mint())
    await client.subscribe("news")
    reply = await client.request({"type": "auth", "token": token, "id": 9})
    assert reply["error"] == "unauthorized"
    assert reply["detail"] == detail
    assert (reply["action"], reply["id"]) == ("auth", 9)
    assert await client.wait_closed(within=WAIT) == 1008
    assert client.close_reason == "unauthorized"
    await eventually(lambda: not srv.connections, "the connection to go")
    assert srv.subscription_topics() == []


# -- the Python client -------------------------------------------------------------


async def test_client_token_refresh_and_reconnect_with_the_latest_token(
    make_server: ServerFactory,
) -> None:
    srv = await jwt_server(make_server)
    users: asyncio.Queue[str | None] = asyncio.Queue()
    srv.on("connect", lambda cid: users.put_nowait(srv.user(cid)))
    client = Client(srv.url, token=mint(sub="alice-1"), backoff_initial=0.01, backoff_max=0.05)
    reconnected = asyncio.Event()
    client.on("reconnect", reconnected.set)
    async with client:
        assert await asyncio.wait_for(users.get(), WAIT) == "alice-1"
        assert client.user == "alice-1"
        await client.subscribe("news")

        second = mint(sub="alice-2", subscribe=("news",), publish=("news",))
        ack = await client.refresh_token(second)
        assert (ack["type"], ack["action"]) == ("ack", "auth")
        assert (client.token, client.user) == (second, "alice-2")
        assert [c.user for c in srv.connections.values()] == ["alice-2"]
        with pytest.raises(ForbiddenError):
            await client.publish("sport", 1)

        # The server drops the connection: the reconnection presents the latest token.
        for conn in list(srv.connections.values()):
            conn.abort()
        assert await asyncio.wait_for(users.get(), WAIT) == "alice-2"
        await asyncio.wait_for(reconnected.wait(), WAIT)
        assert client.subscriptions == ("news",)
        await client.publish("news", "after")

        with pytest.raises(UnauthorizedError) as info:
            await client.refresh_token(mint(secret=OTHER_SECRET))
        assert info.value.detail == "bad signature"
        await asyncio.wait_for(client.wait_closed(), WAIT)
        assert (client.close_code, client.close_reason) == (1008, "unauthorized")


async def test_client_token_provider_renews_before_exp_without_reconnecting(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server)
    issued: list[str] = []

    async def provider() -> str:
        issued.append(mint(sub=f"p-{len(issued) + 1}", ttl=3))
        return issued[-1]

    drops: list[int] = []
    client = Client(srv.url, token_provider=provider, backoff_initial=0.01, backoff_max=0.05)
    client.on("disconnect", lambda code, _reason: drops.append(code))
    writer = await connect(open_client, srv.url, mint(sub="writer"))
    async with client:
        got: asyncio.Queue[object] = asyncio.Queue()
        await client.subscribe("news", lambda msg: got.put_nowait(msg["message"]))
        assert client.user == "p-1"
        # Renewed ahead of exp (at most a fifth of the 3 s early), twice, on one connection.
        await eventually(lambda: len(issued) >= 3, "two renewals", timeout=WAIT)
        await eventually(
            lambda: any(c.user == f"p-{len(issued)}" for c in srv.connections.values()),
            "the server to hold the latest token",
        )
        await writer.publish("news", "still here")
        assert await asyncio.wait_for(got.get(), WAIT) == "still here"
        assert drops == []
        assert client.token == issued[-1]


async def test_client_token_provider_reconnects_when_the_token_expired(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server, history=["news:100"])
    calls = 0
    expired = asyncio.Event()

    def provider() -> str:  # sync providers work too
        nonlocal calls
        calls += 1
        if calls == 1:
            return mint(sub="short", ttl=2)
        if not expired.is_set():
            raise RuntimeError("identity service down")  # the renewal ahead of exp fails
        return mint(sub="fresh", ttl=3600)

    client = Client(srv.url, token_provider=provider, backoff_initial=0.01, backoff_max=0.05)
    closes: list[tuple[int, str]] = []
    client.on("disconnect", lambda code, reason: (closes.append((code, reason)), expired.set()))
    recoveries: list[bool] = []
    client.on("recovery", lambda _topic, ok, _reply: recoveries.append(ok))
    reconnected = asyncio.Event()
    client.on("reconnect", reconnected.set)
    writer = await connect(open_client, srv.url, mint(sub="writer"))
    async with client:
        got: list[object] = []
        await client.subscribe("news", lambda msg: got.append(msg["message"]))
        await writer.publish("news", 1)
        await asyncio.wait_for(reconnected.wait(), WAIT)
        assert closes == [(1008, "token expired")]
        assert client.close_code is None
        assert client.user == "fresh"
        assert recoveries == [True]
        await writer.publish("news", 2)
        await eventually(lambda: got == [1, 2], "both deliveries, once each")


async def test_client_token_provider_replaces_a_refused_token_on_connect(
    make_server: ServerFactory,
) -> None:
    srv = await jwt_server(make_server)
    stale = mint(ttl=None, expires_at=1000)
    async with Client(srv.url, token=stale, token_provider=lambda: mint(sub="new")) as client:
        assert client.user == "new"
        await client.subscribe("news")
    with pytest.raises(ConnectionClosed, match="token provider failed"):
        await Client(srv.url, token=stale, token_provider=lambda: 1 / 0).connect()


async def test_client_reports_refusals_with_the_reason_and_masks_url_tokens(
    make_server: ServerFactory,
) -> None:
    srv = await jwt_server(make_server)
    with pytest.raises(ConnectionClosed, match="HTTP 401: missing token"):
        await Client(srv.url, reconnect=False).connect()
    leaked = "eyJhbGciOiJub3RhIn0.secret-bits.sig"
    with pytest.raises(ConnectionClosed) as info:
        await Client(f"{srv.url}/?token={leaked}", reconnect=False).connect()
    assert "HTTP 401: algorithm not allowed" in str(info.value)
    assert "secret-bits" not in str(info.value)
    # A token in the URL works for the client too (as for an original client).
    async with Client(f"{srv.url}/?token={mint(sub='url')}") as client:
        await client.subscribe("news")
        assert [c.user for c in srv.connections.values()] == ["url"]
    with pytest.raises(TypeError):
        Client(srv.url, token=b"bytes")  # type: ignore[arg-type]


# -- rate limits -------------------------------------------------------------------


async def test_rate_limit_refuses_over_the_rate_and_never_drops_silently(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server, rate_limit=2, rate_burst=5)
    reader = await connect(open_client, srv.url, mint())
    await reader.subscribe("r")
    flood = await connect(open_client, srv.url, mint())
    sent = 30
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(sent):
        await flood.send_json({"type": "publish", "topic": "r", "message": i, "id": i})
    replies = [await flood.next_message(reply_to(i)) for i in range(sent)]
    elapsed = loop.time() - started
    acked = [r for r in replies if r["type"] == "ack"]
    limited = [r for r in replies if r.get("error") == "rate_limited"]
    assert len(acked) + len(limited) == sent
    assert 5 <= len(acked) <= 5 + 2 * elapsed + 1  # the burst, plus what 2/s refilled
    assert all(r["action"] == "publish" for r in limited)
    assert srv.stats.rate_limited == len(limited)
    # Only acked publishes were carried out.
    await reader.sync()
    assert reader.messages() == [r["id"] for r in acked]
    assert not flood.closed.done()  # 25 refusals are not abuse yet


async def test_persistent_abuse_is_closed_1008(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server, rate_limit=1, rate_burst=1)
    flood = await connect(open_client, srv.url, mint())
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(200):
        await flood.send_json({"type": "subscribe", "topic": f"t{i}", "id": i})
    assert await flood.wait_closed(within=WAIT) == 1008
    elapsed = loop.time() - started
    assert flood.close_reason == "rate limit exceeded"
    replies = flood.take_all()
    assert all(r["type"] == "ack" or r["error"] == "rate_limited" for r in replies), replies
    limited = sum(1 for r in replies if r["type"] == "error")
    assert 51 <= limited <= 51 + 5 * elapsed + 1  # 50 strikes (5/s back), then the close
    assert srv.stats.rate_limited == limited


# -- connection caps and origins ---------------------------------------------------


async def test_global_connection_cap_is_503(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server, max_connections=2)
    first = await connect(open_client, srv.url, mint())
    await connect(open_client, srv.url, mint())
    assert_refused(await refusal(srv.url, token=mint()), 503, "server at its connection limit")
    assert_refused(
        await refusal(srv.url, token=mint(), source="127.0.0.2"),
        503,
        "server at its connection limit",
    )
    await first.close()
    await eventually(lambda: srv.hub.admission.total == 1, "the slot to be released")
    again = await connect(open_client, srv.url, mint())
    await again.subscribe("news")


async def test_per_ip_connection_cap_is_429(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server, max_connections_per_ip=1)
    first = await connect(open_client, srv.url, mint())
    assert_refused(
        await refusal(srv.url, token=mint()), 429, "too many connections from your address"
    )
    # Another address has its own allowance.
    other = await connect(open_client, srv.url, mint(), source="127.0.0.2")
    await other.subscribe("news")
    await first.close()
    await eventually(lambda: srv.hub.admission.count("127.0.0.1") == 0, "the release")
    await connect(open_client, srv.url, mint())


async def test_origin_allow_list_is_403(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    srv = await jwt_server(make_server, allowed_origins=["https://app.example"])
    # The Origin check comes first: no token is even looked at.
    err = await refusal(srv.url, headers={"Origin": "https://evil.example"})
    assert_refused(err, 403, "origin not allowed")
    err = await refusal(srv.url, token=mint(), headers={"Origin": "null"})
    assert_refused(err, 403, "origin not allowed")
    ok = await connect(open_client, srv.url, mint(), headers={"Origin": "https://APP.example:443"})
    await ok.sync()
    no_origin = await connect(open_client, srv.url, mint())  # not a browser: not affected
    await no_origin.sync()


async def test_refused_upgrades_are_counted_by_status_and_not_logged_above_debug(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await jwt_server(make_server, allowed_origins=["https://app.example"])
    with caplog.at_level(logging.INFO):
        assert_refused(await refusal(srv.url), 401, "missing token")
        assert_refused(await refusal(srv.url, token="junk"), 401, "malformed token")
        err = await refusal(srv.url, headers={"Origin": "https://evil.example"})
        assert_refused(err, 403, "origin not allowed")
    assert srv.stats.upgrades_refused == {"401": 2, "403": 1}
    families = {f.name: f for f in text_string_to_metric_families(render(srv).decode())}
    by_status = {s.labels["status"]: s.value for s in families["dwsps_upgrades_refused"].samples}
    assert by_status == {"401": 2.0, "403": 1.0, "429": 0.0, "503": 0.0}
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


async def test_handshake_timeout_still_applies_with_auth_on(make_server: ServerFactory) -> None:
    srv = await jwt_server(make_server, handshake_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # never finished
        answer = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b"request timeout\n")
    assert srv.hub.admission.total == 0


# -- the embedding hook ------------------------------------------------------------


async def test_the_authenticate_hook_accepts_rejects_raises_and_may_be_slow(
    make_server: ServerFactory, open_client: ClientFactory
) -> None:
    seen: list[UpgradeRequest] = []
    gate = asyncio.Event()

    async def authenticate(request: UpgradeRequest) -> Identity:
        seen.append(request)
        mode = request.headers.get("X-Mode", "")
        if mode == "reject":
            raise AuthError("unknown session")
        if mode == "raise":
            raise RuntimeError("session store down")
        if mode == "slow":
            await gate.wait()
        if mode == "hang":
            await asyncio.Event().wait()
        if mode == "none":
            return None  # type: ignore[return-value]
        return Identity(request.headers.get("X-User"), Permissions(("news",), ()))

    srv = await make_server(authenticate=authenticate, handshake_timeout=scaled(1.0))
    carol = await open_client(srv.url, path="/chat?room=1", headers={"X-User": "carol"})
    await expect_ack(carol, "subscribe", "news.uk")
    await expect_forbidden(carol, "publish", "news")
    assert (seen[0].path, seen[0].query, seen[0].remote) == ("/chat", "room=1", "127.0.0.1")
    assert seen[0].headers.get("x-user") == "carol"
    assert [c.user for c in srv.connections.values()] == ["carol"]

    assert_refused(await refusal(srv.url, headers={"X-Mode": "reject"}), 401, "unknown session")
    assert_refused(await refusal(srv.url, headers={"X-Mode": "raise"}), 500, "internal error")
    assert_refused(await refusal(srv.url, headers={"X-Mode": "none"}), 500, "internal error")

    # A slow hook holds up only its own client.
    slow = asyncio.create_task(open_client(srv.url, headers={"X-Mode": "slow", "X-User": "slow"}))
    await eventually(lambda: any(r.headers.get("X-Mode") == "slow" for r in seen), "the slow hook")
    quick = await open_client(srv.url, headers={"X-User": "quick"})
    await expect_ack(quick, "subscribe", "news")
    assert not slow.done()
    gate.set()
    slow_client = await asyncio.wait_for(slow, WAIT)
    await expect_ack(slow_client, "subscribe", "news")

    # A hook that never answers is cut off at the handshake timeout.
    assert_refused(
        await refusal(srv.url, headers={"X-Mode": "hang"}), 503, "authentication timed out"
    )
    assert {c.user for c in srv.connections.values()} == {"carol", "quick", "slow"}
    assert srv.hub.admission.total == 3  # nothing leaked from the refusals


# -- the same settings on a real dwsps serve ---------------------------------------


async def test_dwsps_serve_takes_every_security_flag(
    serve_process: ProcessFactory, open_client: ClientFactory, tmp_path: Any
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(key))
    by_secret, by_key = await asyncio.gather(
        serve_process(
            *("--auth-jwt-secret", SECRET, "--auth-jwt-audience", AUDIENCE),
            *("--auth-jwt-issuer", ISSUER, "--auth-jwt-leeway", "5s"),
            *("--allow-anonymous", "--anonymous-subscribe", "public"),
            *("--allowed-origin", "https://app.example", "--rate-limit", "50"),
            *("--rate-burst", "20", "--max-connections", "3", "--max-connections-per-ip", "2"),
        ),
        serve_process("--auth-jwt-public-key", str(pem), "--heartbeat-interval", "0"),
    )
    url = by_secret.url
    member = await connect(open_client, url, mint(audience=AUDIENCE, issuer=ISSUER), "query")
    await member.subscribe("news")
    assert_refused(await refusal(url, token=mint(issuer=ISSUER)), 401, "invalid audience")
    anonymous = await open_client(url)
    await expect_ack(anonymous, "subscribe", "public")
    await expect_forbidden(anonymous, "subscribe", "news")
    assert_refused(
        await refusal(url, headers={"Origin": "https://evil.example"}), 403, "origin not allowed"
    )
    assert_refused(await refusal(url), 429, "too many connections from your address")
    await connect(open_client, url, None, source="127.0.0.2")
    assert_refused(await refusal(url, source="127.0.0.3"), 503, "server at its connection limit")

    token = mint_token(private_pem(key), sub="ec", ttl=60, algorithm="ES256")
    ec_client = await connect(open_client, by_key.url, token)
    await ec_client.subscribe("news")
    assert_refused(await refusal(by_key.url, token=mint()), 401, "algorithm not allowed")
