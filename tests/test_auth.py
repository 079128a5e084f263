"""JWT verification, token extraction, the authenticator and minting (pure: no sockets)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from dwsps.auth import (
    MAX_TOKEN_LENGTH,
    UNAUTHENTICATED,
    Authenticator,
    Identity,
    JwtVerifier,
    UpgradeRequest,
    mint_token,
    token_from_request,
)
from dwsps.errors import AuthConfigError, AuthError, ConfigError, DwspsError
from dwsps.permissions import Permissions

NOW = 1_700_000_000.0
SECRET = "s" * 64  # long enough for HS512
OTHER_SECRET = "o" * 64

# Every reason a client may ever read: short, fixed, and revealing nothing else.
REASONS = {
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
    "missing claim",
    "invalid token",
    "missing token",
    "token refresh not supported",
}

# -- keys (generated once per module: RSA generation is slow) ------------------------


def pem_private(key: Any) -> bytes:
    return bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))


def pem_public(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def p384_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


# -- hand-made tokens, for what no well-behaved library would sign ----------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256(header: object, payload: object, secret: str | bytes = SECRET) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    signature = hmac.new(key, head.encode("ascii"), hashlib.sha256).digest()
    return head + "." + b64(signature)


def hs_verifier(**kw: Any) -> JwtVerifier:
    return JwtVerifier(secret=SECRET, **kw)


def reason(call: Callable[[], object]) -> str:
    with pytest.raises(AuthError) as info:
        call()
    assert info.value.reason in REASONS
    assert str(info.value) == info.value.reason
    return info.value.reason


# -- happy paths per algorithm --------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_tokens_verify(alg: str) -> None:
    token = mint_token(SECRET, sub="alice", ttl=60, algorithm=alg, now=NOW)
    identity = hs_verifier().verify(token, now=NOW + 1)
    assert identity == Identity("alice", Permissions.everything(), NOW + 60, anonymous=False)


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_rsa_tokens_verify(rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    token = mint_token(pem_private(rsa_key), sub="bob", ttl=60, algorithm=alg, now=NOW)
    identity = JwtVerifier(public_key_pem=pem_public(rsa_key)).verify(token, now=NOW)
    assert identity.user == "bob"


def test_ec_and_eddsa_tokens_verify(
    p256_key: ec.EllipticCurvePrivateKey,
    p384_key: ec.EllipticCurvePrivateKey,
    ed25519_key: ed25519.Ed25519PrivateKey,
) -> None:
    ed448_key = ed448.Ed448PrivateKey.generate()
    for key, alg in [(p256_key, "ES256"), (p384_key, "ES384"), (ed25519_key, "EdDSA"),
                     (ed448_key, "EdDSA")]:  # fmt: skip
        token = mint_token(pem_private(key), sub=alg, ttl=None, algorithm=alg, now=NOW)
        verifier = JwtVerifier(public_key_pem=pem_public(key).decode())
        assert verifier.algorithms == (alg,)
        assert verifier.verify(token, now=NOW) == Identity(alg, Permissions.everything())


def test_default_algorithms_follow_the_key_type(rsa_key: rsa.RSAPrivateKey) -> None:
    assert hs_verifier().algorithms == ("HS256", "HS384", "HS512")
    assert JwtVerifier(secret="x" * 32).algorithms == ("HS256",)
    assert JwtVerifier(secret="x" * 48).algorithms == ("HS256", "HS384")
    rsa_algs = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    assert JwtVerifier(public_key_pem=pem_public(rsa_key)).algorithms == rsa_algs


def test_a_certificate_serves_as_the_public_key(p256_key: ec.EllipticCurvePrivateKey) -> None:
    import datetime

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(p256_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(p256_key, hashes.SHA256())
    )
    verifier = JwtVerifier(public_key_pem=cert.public_bytes(Encoding.PEM))
    token = mint_token(pem_private(p256_key), sub="c", ttl=None, algorithm="ES256")
    assert verifier.verify(token).user == "c"


def test_secret_and_public_key_together(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier(secret=SECRET, public_key_pem=pem_public(rsa_key))
    hs = mint_token(SECRET, sub="h", ttl=None)
    rs = mint_token(pem_private(rsa_key), sub="r", ttl=None, algorithm="RS256")
    assert verifier.verify(hs).user == "h"
    assert verifier.verify(rs).user == "r"
    # HS tokens are checked against the secret only, never against the public key.
    forged = hs256({"alg": "HS256"}, {"sub": "x"}, secret=pem_public(rsa_key))
    assert reason(lambda: verifier.verify(forged)) == "bad signature"


# -- what must fail ------------------------------------------------------------------------


def test_tampered_payload_and_signature() -> None:
    token = mint_token(SECRET, sub="alice", ttl=None)
    head, payload, signature = token.split(".")
    evil = b64(json.dumps({"sub": "admin"}).encode())
    assert reason(lambda: hs_verifier().verify(f"{head}.{evil}.{signature}")) == "bad signature"
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert reason(lambda: hs_verifier().verify(f"{head}.{payload}.{flipped}")) == "bad signature"


def test_wrong_key(rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey) -> None:
    token = mint_token(OTHER_SECRET, sub="a", ttl=None)
    assert reason(lambda: hs_verifier().verify(token)) == "bad signature"
    token = mint_token(pem_private(other_rsa_key), sub="a", ttl=None, algorithm="RS256")
    verifier = JwtVerifier(public_key_pem=pem_public(rsa_key))
    assert reason(lambda: verifier.verify(token)) == "bad signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(alg: str) -> None:
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "admin"}).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}.{b64(b'x')}"):
        assert reason(partial(hs_verifier().verify, token)) == "algorithm not allowed"


def test_key_confusion_hs256_signed_with_the_public_key_fails(rsa_key: rsa.RSAPrivateKey) -> None:
    public = pem_public(rsa_key)
    forged = hs256({"alg": "HS256", "typ": "JWT"}, {"sub": "admin"}, secret=public)
    verifier = JwtVerifier(public_key_pem=public)
    assert reason(lambda: verifier.verify(forged)) == "algorithm not allowed"


def test_algorithms_not_configured_are_refused(
    rsa_key: rsa.RSAPrivateKey, p256_key: ec.EllipticCurvePrivateKey
) -> None:
    es = mint_token(pem_private(p256_key), sub="a", ttl=None, algorithm="ES256")
    verifier = JwtVerifier(public_key_pem=pem_public(rsa_key))
    assert reason(lambda: verifier.verify(es)) == "algorithm not allowed"
    only_ps = JwtVerifier(public_key_pem=pem_public(rsa_key), algorithms=["PS256"])
    rs = mint_token(pem_private(rsa_key), sub="a", ttl=None, algorithm="RS256")
    assert reason(lambda: only_ps.verify(rs)) == "algorithm not allowed"
    hs512 = mint_token(SECRET, sub="a", ttl=None, algorithm="HS512")
    assert reason(lambda: hs_verifier(algorithms=("HS256",)).verify(hs512)) == (
        "algorithm not allowed"
    )


@pytest.mark.parametrize("alg", [None, 1, ["HS256"], {"a": 1}, "", "HS257"])
def test_odd_alg_headers_are_refused(alg: object) -> None:
    header = {} if alg is None else {"alg": alg}
    assert reason(lambda: hs_verifier().verify(hs256(header, {}))) == "algorithm not allowed"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "...",
        "a.b.c.d",
        "eyJhbGciOiJIUzI1NiJ9",
        "!!!!.eyJ9.sig",
        "bnVsbA.e30.",  # header is JSON null
        "W10.e30.",  # header is []
        "jwt\u00e9.a.b",
        "\ud800.a.b",
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert reason(lambda: hs_verifier().verify(token)) == "malformed token"


@pytest.mark.parametrize("header", [{"crit": ["exp"]}, {"crit": []}, {"kid": 5}])
def test_broken_header_rules_are_invalid_tokens(header: dict[str, object]) -> None:
    token = hs256({"alg": "HS256", **header}, {})
    assert reason(lambda: hs_verifier().verify(token)) == "invalid token"


def test_an_empty_signature_is_a_bad_signature() -> None:
    assert reason(lambda: hs_verifier().verify("eyJhbGciOiJIUzI1NiJ9..")) == "bad signature"


def test_a_token_that_is_too_long_is_refused_unparsed() -> None:
    assert reason(lambda: hs_verifier().verify("a" * (MAX_TOKEN_LENGTH + 1))) == "token too long"


def test_payload_that_is_not_an_object() -> None:
    header = b64(b'{"alg":"HS256"}')
    for body in (b"[]", b"null", b"1", b"{"):
        head = header + "." + b64(body)
        sig = b64(hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest())
        assert reason(partial(hs_verifier().verify, f"{head}.{sig}")) == "malformed token"


# -- time ---------------------------------------------------------------------------------


def test_exp_is_enforced() -> None:
    token = mint_token(SECRET, sub="a", ttl=10, now=NOW)
    assert hs_verifier().verify(token, now=NOW + 9.9).expires_at == NOW + 10
    assert reason(lambda: hs_verifier().verify(token, now=NOW + 10)) == "token expired"
    assert reason(lambda: hs_verifier().verify(token, now=NOW + 1e6)) == "token expired"


def test_exp_with_leeway() -> None:
    token = mint_token(SECRET, sub="a", ttl=10, now=NOW)
    verifier = hs_verifier(leeway=5)
    assert verifier.verify(token, now=NOW + 14.9).user == "a"
    assert reason(lambda: verifier.verify(token, now=NOW + 15)) == "token expired"
    # The connection lives as long as the leeway lets the token be accepted.
    assert verifier.verify(token, now=NOW).expires_at == NOW + 15


def test_nbf_is_enforced_with_and_without_leeway() -> None:
    token = hs256({"alg": "HS256"}, {"sub": "a", "nbf": NOW + 100})
    assert reason(lambda: hs_verifier().verify(token, now=NOW + 99)) == "token not yet valid"
    assert hs_verifier().verify(token, now=NOW + 100).user == "a"
    assert hs_verifier(leeway=2).verify(token, now=NOW + 98).user == "a"
    assert reason(lambda: hs_verifier(leeway=2).verify(token, now=NOW + 97)) == (
        "token not yet valid"
    )


def test_real_clock_is_the_default() -> None:
    assert hs_verifier().verify(mint_token(SECRET, sub="a", ttl=60)).user == "a"
    old = mint_token(SECRET, sub="a", ttl=60, now=NOW)
    assert reason(lambda: hs_verifier().verify(old)) == "token expired"


def test_fractional_exp_is_accepted() -> None:
    token = hs256({"alg": "HS256"}, {"exp": NOW + 0.5})
    assert hs_verifier().verify(token, now=NOW).expires_at == NOW + 0.5


@pytest.mark.parametrize("value", ["soon", None, True, [1], {"t": 1}, 10**400])
@pytest.mark.parametrize("claim", ["exp", "nbf"])
def test_non_numeric_dates_are_malformed(claim: str, value: object) -> None:
    token = hs256({"alg": "HS256"}, {claim: value})
    assert reason(lambda: hs_verifier().verify(token, now=NOW)) == "malformed token"


def test_infinite_dates_are_malformed() -> None:
    head = b64(b'{"alg":"HS256"}') + "." + b64(b'{"exp": 1e999}')
    sig = b64(hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest())
    assert reason(lambda: hs_verifier().verify(f"{head}.{sig}", now=NOW)) == "malformed token"


def test_iat_in_the_future_is_not_a_rule() -> None:
    assert hs_verifier().verify(hs256({"alg": "HS256"}, {"iat": NOW + 1e6}), now=NOW)


# -- audience, issuer, subject ---------------------------------------------------------------


def test_audience_when_configured() -> None:
    verifier = hs_verifier(audience="dwsps")
    ok = mint_token(SECRET, sub="a", ttl=None, audience="dwsps")
    assert verifier.verify(ok).user == "a"
    assert verifier.verify(hs256({"alg": "HS256"}, {"aud": ["x", "dwsps"]})).user is None
    wrong = mint_token(SECRET, sub="a", ttl=None, audience="other")
    assert reason(lambda: verifier.verify(wrong)) == "invalid audience"
    missing = mint_token(SECRET, sub="a", ttl=None)
    assert reason(lambda: verifier.verify(missing)) == "invalid audience"
    odd = hs256({"alg": "HS256"}, {"aud": 5})
    assert reason(lambda: verifier.verify(odd)) == "invalid audience"


def test_a_token_for_some_audience_is_refused_when_none_is_configured() -> None:
    token = mint_token(SECRET, sub="a", ttl=None, audience="billing")
    assert reason(lambda: hs_verifier().verify(token)) == "invalid audience"


def test_issuer_when_configured() -> None:
    verifier = hs_verifier(issuer="https://idp.example")
    ok = mint_token(SECRET, sub="a", ttl=None, issuer="https://idp.example")
    assert verifier.verify(ok).user == "a"
    for claims in ({"iss": "https://evil.example"}, {}, {"iss": ["https://idp.example"]}):
        token = hs256({"alg": "HS256"}, claims)
        assert reason(partial(verifier.verify, token)) == "invalid issuer"
    # Not configured: any issuer is fine.
    assert hs_verifier().verify(ok).user == "a"


def test_subject_must_be_a_string() -> None:
    token = hs256({"alg": "HS256"}, {"sub": 42})
    assert reason(lambda: hs_verifier().verify(token)) == "invalid subject"


# -- the dwsps claim ---------------------------------------------------------------------------


def test_dwsps_claim_sets_permissions() -> None:
    perms = Permissions(("news",), ("news.*",))
    token = mint_token(SECRET, sub="a", ttl=None, permissions=perms)
    assert hs_verifier().verify(token).permissions == perms


def test_no_dwsps_claim_gets_the_default_permissions() -> None:
    token = mint_token(SECRET, sub="a", ttl=None)
    assert hs_verifier().verify(token).permissions == Permissions.everything()
    limited = Permissions(("public",), ())
    assert hs_verifier(default_permissions=limited).verify(token).permissions == limited


@pytest.mark.parametrize(
    "claim", [None, "all", ["news"], {"subscribe": "news"}, {"publish": ["a..b"]}, {"publish": [1]}]
)
def test_invalid_dwsps_claim(claim: object) -> None:
    token = hs256({"alg": "HS256"}, {"sub": "a", "dwsps": claim})
    assert reason(lambda: hs_verifier().verify(token)) == "invalid dwsps claim"


# -- configuration errors ----------------------------------------------------------------------


def test_configuration_errors(rsa_key: rsa.RSAPrivateKey) -> None:
    public = pem_public(rsa_key)
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "needs a secret or a public key"),
        ({"secret": "short"}, "5 bytes; at least 32"),
        ({"secret": ""}, "0 bytes; at least 32"),
        ({"secret": b"\xff" * 31}, "31 bytes"),
        ({"secret": public}, "looks like a public key"),
        ({"secret": "x" * 32, "algorithms": ["HS512"]}, "too short for HS512"),
        ({"secret": SECRET, "algorithms": ["none"]}, "'none' is never allowed"),
        ({"secret": SECRET, "algorithms": ["XS256"]}, "unknown JWT algorithm"),
        ({"secret": SECRET, "algorithms": []}, "empty"),
        ({"secret": SECRET, "algorithms": ["RS256"]}, "no configured key can verify RS256"),
        ({"public_key_pem": public, "algorithms": ["HS256"]}, "no configured key can verify"),
        ({"public_key_pem": public, "algorithms": ["ES256"]}, "no configured key can verify"),
        ({"public_key_pem": b"not a key"}, "not a PEM public key"),
        ({"public_key_pem": pem_private(rsa_key)}, "not a PEM public key"),
        ({"secret": SECRET, "leeway": -1}, "leeway"),
        ({"secret": SECRET, "leeway": float("nan")}, "leeway"),
        ({"secret": SECRET, "audience": ""}, "audience must not be empty"),
        ({"secret": SECRET, "issuer": ""}, "issuer must not be empty"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(AuthConfigError, match=fragment):
            JwtVerifier(**kwargs)


def test_weak_or_unsupported_public_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(AuthConfigError, match="1024 bits; at least 2048"):
        JwtVerifier(public_key_pem=pem_public(weak))
    p521 = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(AuthConfigError, match="secp521r1"):
        JwtVerifier(public_key_pem=pem_public(p521))


def test_auth_errors_belong_to_the_tree() -> None:
    assert issubclass(AuthError, DwspsError)
    assert AuthError("token expired").status == 401
    assert issubclass(AuthConfigError, ConfigError)
    assert issubclass(AuthConfigError, ValueError)


# -- fuzz: arbitrary input only ever raises AuthError -----------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
CLAIM_VALUE = st.one_of(JSON, st.sampled_from([NOW, NOW + 100, NOW - 100, 10**30, -(10**30)]))
CLAIMS = st.dictionaries(
    st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "iss", "jti", "dwsps", "x"]),
    CLAIM_VALUE,
    max_size=6,
)
HEADERS = st.dictionaries(
    st.sampled_from(["alg", "typ", "kid", "crit", "b64", "jku", "x"]),
    st.one_of(st.sampled_from(["HS256", "none", "RS256", "b64"]), JSON),
    max_size=4,
)
FUZZ_VERIFIERS = [hs_verifier(), hs_verifier(audience="dwsps", issuer="me", leeway=1)]


def outcome(token: str) -> None:
    for verifier in FUZZ_VERIFIERS:
        try:
            identity: Identity | str = verifier.verify(token, now=NOW)
        except AuthError as exc:
            identity = exc.reason
        assert isinstance(identity, Identity) or identity in REASONS


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_arbitrary_strings(token: str) -> None:
    outcome(token)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="ABCabc012-_=.+/", max_size=40), min_size=1, max_size=4))
def test_fuzz_dotted_segments(segments: list[str]) -> None:
    outcome(".".join(segments))


@settings(max_examples=300, deadline=None)
@given(HEADERS, CLAIMS)
def test_fuzz_validly_signed_odd_claims(
    header: dict[str, object], claims: dict[str, object]
) -> None:
    """A good signature over odd headers and claims still ends in AuthError or an identity."""
    outcome(hs256(header, claims))
    outcome(hs256({**header, "alg": "HS256"}, claims))


# -- token extraction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"Authorization": "Bearer abc"}, "", "abc"),
        ({"authorization": "bearer abc"}, "", "abc"),
        ({"AUTHORIZATION": "BEARER   abc  "}, "", "abc"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "", None),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "token=q", "q"),
        ({"Authorization": "Bearer h"}, "token=q", "h"),
        ({"Authorization": "Bearer "}, "token=q", "q"),
        ({}, "token=abc", "abc"),
        ({}, "a=1&token=abc&b=2", "abc"),
        ({}, "token=a%2Eb%2ec", "a.b.c"),
        ({}, "token=first&token=second", "first"),
        ({}, "token=", None),
        ({}, "xtoken=abc", None),
        ({}, "mytoken=abc&token=t", "t"),
        ({}, "", None),
        ({}, "token", None),
    ],
)
def test_token_from_request(headers: dict[str, str], query: str, expected: str | None) -> None:
    assert token_from_request(headers, query) == expected


def test_too_long_tokens_are_refused_in_either_place() -> None:
    long = "a" * (MAX_TOKEN_LENGTH + 1)
    with pytest.raises(AuthError, match="token too long"):
        token_from_request({"Authorization": f"Bearer {long}"}, "")
    with pytest.raises(AuthError, match="token too long"):
        token_from_request({}, f"token={long}")
    assert token_from_request({}, "token=" + "a" * MAX_TOKEN_LENGTH) == "a" * MAX_TOKEN_LENGTH


def test_upgrade_request_headers_are_case_insensitive() -> None:
    request = UpgradeRequest("/", "", {"X-Thing": "1", "authorization": "Bearer t"}, "127.0.0.1")
    assert request.headers["x-thing"] == "1"
    assert request.headers["AUTHORIZATION"] == "Bearer t"
    assert request.token == "t"
    with pytest.raises(AttributeError):
        request.path = "/x"  # type: ignore[misc]


# -- the authenticator ---------------------------------------------------------------------


def request(headers: dict[str, str] | None = None, query: str = "") -> UpgradeRequest:
    return UpgradeRequest("/", query, headers or {}, "127.0.0.1")


def bearer(token: str) -> UpgradeRequest:
    return request({"Authorization": f"Bearer {token}"})


def test_without_keys_everyone_may_do_everything() -> None:
    auth = Authenticator()
    assert not auth.enabled
    assert not auth.required
    assert auth.authenticate(request()) is UNAUTHENTICATED
    assert auth.authenticate(bearer("garbage")) is UNAUTHENTICATED
    assert UNAUTHENTICATED.permissions.is_everything
    assert UNAUTHENTICATED.anonymous
    assert auth.refresh("garbage") is UNAUTHENTICATED


def test_with_a_verifier_a_token_is_required() -> None:
    auth = Authenticator(hs_verifier())
    assert auth.enabled
    assert auth.required
    assert reason(lambda: auth.authenticate(request())) == "missing token"
    token = mint_token(SECRET, sub="alice", ttl=60, now=NOW)
    assert auth.authenticate(bearer(token), now=NOW).user == "alice"
    assert auth.authenticate(request(query=f"token={token}"), now=NOW).user == "alice"
    assert reason(lambda: auth.authenticate(bearer(token), now=NOW + 60)) == "token expired"


def test_anonymous_clients_get_the_anonymous_permissions() -> None:
    auth = Authenticator(hs_verifier(), allow_anonymous=True)
    assert auth.enabled
    assert not auth.required
    identity = auth.authenticate(request())
    assert identity == Identity(None, Permissions.nothing(), None, anonymous=True)
    assert auth.authenticate(request()) is identity  # one shared instance
    public = Permissions(("public",), ())
    auth = Authenticator(hs_verifier(), allow_anonymous=True, anonymous_permissions=public)
    assert auth.authenticate(request()).permissions == public


def test_a_bad_token_is_refused_even_when_anonymous_clients_are_allowed() -> None:
    auth = Authenticator(hs_verifier(), allow_anonymous=True)
    assert reason(lambda: auth.authenticate(bearer("garbage"))) == "malformed token"


def test_refresh_uses_the_verifier() -> None:
    auth = Authenticator(hs_verifier(), allow_anonymous=True)
    token = mint_token(SECRET, sub="bob", ttl=60, now=NOW)
    assert auth.refresh(token, now=NOW).user == "bob"
    assert reason(lambda: auth.refresh(token, now=NOW + 61)) == "token expired"


async def test_the_hook_decides_alone() -> None:
    seen: list[UpgradeRequest] = []

    async def hook(req: UpgradeRequest) -> Identity:
        seen.append(req)
        if req.headers.get("X-Api-Key") != "k":
            raise AuthError("bad api key")
        return Identity("svc", Permissions(("a",), ("a",)))

    auth = Authenticator(hook=hook)
    assert auth.enabled
    assert not auth.required
    good = request({"x-api-key": "k"})
    assert (await auth.authenticate_async(good)).user == "svc"
    with pytest.raises(AuthError, match="bad api key"):
        await auth.authenticate_async(request())
    assert seen == [good, request()]
    with pytest.raises(RuntimeError, match="authenticate_async"):
        auth.authenticate(good)
    with pytest.raises(AuthError, match="token refresh not supported"):
        auth.refresh("t")


async def test_authenticate_async_without_a_hook_is_the_sync_path() -> None:
    auth = Authenticator(hs_verifier())
    token = mint_token(SECRET, sub="alice", ttl=None)
    assert (await auth.authenticate_async(bearer(token))).user == "alice"


# -- minting -------------------------------------------------------------------------------------


def test_minted_claims() -> None:
    perms = Permissions(("news",), ("news.*",))
    token = mint_token(
        SECRET, sub="alice", ttl=3600, permissions=perms, audience="dwsps", issuer="me", now=NOW
    )
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False},
                        audience="dwsps")  # fmt: skip
    assert claims == {
        "sub": "alice",
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
        "dwsps": {"subscribe": ["news"], "publish": ["news.*"]},
        "aud": "dwsps",
        "iss": "me",
    }
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    bare = jwt.decode(mint_token(SECRET, sub=None, ttl=None, now=NOW), SECRET, algorithms=["HS256"])
    assert bare == {"iat": int(NOW)}


def test_mint_errors(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(AuthConfigError, match="refused JWT algorithm 'none'"):
        mint_token(SECRET, sub="a", ttl=None, algorithm="none")
    with pytest.raises(AuthConfigError, match="HS512 needs 64"):
        mint_token("x" * 32, sub="a", ttl=None, algorithm="HS512")
    with pytest.raises(AuthConfigError, match="cannot sign"):
        mint_token("not a pem key", sub="a", ttl=None, algorithm="RS256")
    with pytest.raises(AuthConfigError, match="cannot sign"):
        mint_token(pem_private(rsa_key), sub="a", ttl=None, algorithm="ES256")
    for ttl in (0, -5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ttl"):
            mint_token(SECRET, sub="a", ttl=ttl)
