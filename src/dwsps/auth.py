"""Client authentication: JWT verification (PyJWT), identities, and the embedding hook.

No I/O and no asyncio: the server calls :meth:`Authenticator.authenticate`
synchronously during the upgrade (a signature check takes microseconds to a
fraction of a millisecond) and awaits only an embedding application's hook.

Rules (PROTOCOL.md, Authentication):

* A token comes from ``Authorization: Bearer <token>`` or the query
  parameter ``token``; the header wins when both are present.
* Only the algorithms the configured keys allow are accepted: HS256/384/512
  with a shared secret; RS*/PS* with an RSA public key, ES256 or ES384 with
  an EC key on that curve, EdDSA with an Ed25519/Ed448 key. ``alg: none`` is
  never accepted. Each algorithm is bound to the one key of its family, so an
  HS256 token can never be checked against a public key (key confusion).
* ``exp`` and ``nbf`` are enforced with a leeway. ``iss`` is checked when an
  issuer is configured. ``aud`` is checked when an audience is configured; a
  token that names an audience is refused when none is configured (RFC 7519,
  section 4.1.3: a token meant for another service is not for us).
* Failures raise :class:`~dwsps.errors.AuthError` with a short, fixed reason
  (``"token expired"``, ``"bad signature"``, ...) and nothing else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from multidict import CIMultiDict, CIMultiDictProxy

from dwsps.errors import AuthConfigError, AuthError, PermissionsError
from dwsps.permissions import Permissions, parse_permissions
from dwsps.topics import DEFAULT_LIMITS, TopicLimits

MAX_TOKEN_LENGTH: Final = 8192
"""Longer tokens are refused before any parsing (a JWT of a few claims is well under 1 KiB)."""

HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS: Final = {"secp256r1": "ES256", "secp384r1": "ES384"}
EDDSA: Final = "EdDSA"
SUPPORTED_ALGORITHMS: Final = (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *EC_ALGORITHMS.values(), EDDSA)

# RFC 7518, section 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA_MIN_BITS: Final = 2048

_JWS: Final = jwt.PyJWS()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is and what it may do, fixed at the upgrade (or an ``auth`` request)."""

    user: str | None
    """The token's ``sub`` claim; None for anonymous clients and tokens without one."""
    permissions: Permissions
    expires_at: float | None = None
    """When the identity stops being valid (epoch seconds): the token's ``exp`` plus
    the verifier's leeway, so a token accepted within the leeway is not closed at
    once. None when it never expires."""
    anonymous: bool = False
    """True when the client presented no token."""


UNAUTHENTICATED: Final = Identity(None, Permissions.EVERYTHING, None, anonymous=True)
"""Every client of a server without authentication: may do everything (the embedded default)."""


class JwtVerifier:
    """Verifies JWTs against a shared secret and/or a PEM public key.

    ``algorithms`` defaults to everything the keys allow: HS256/384/512 for a
    secret (those its length permits), RS*/PS* for an RSA key, ES256 or ES384
    for an EC key on P-256 or P-384, EdDSA for an Ed25519/Ed448 key. A PEM
    certificate is accepted in place of a public key. Tokens without a
    ``dwsps`` claim get ``default_permissions``.
    """

    __slots__ = (
        "_algorithms",
        "_audience",
        "_issuer",
        "_jwt",
        "_keys",
        "_leeway",
        "_limits",
        "_single_key",
        "default_permissions",
    )

    def __init__(
        self,
        *,
        secret: str | bytes | None = None,
        public_key_pem: str | bytes | None = None,
        algorithms: Iterable[str] | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        default_permissions: Permissions = Permissions.EVERYTHING,
        limits: TopicLimits = DEFAULT_LIMITS,
    ) -> None:
        if secret is None and public_key_pem is None:
            raise AuthConfigError("JWT verification needs a secret or a public key")
        if not math.isfinite(leeway) or leeway < 0:
            raise AuthConfigError("JWT leeway must be a finite number of seconds >= 0")
        for name, value in (("audience", audience), ("issuer", issuer)):
            if value is not None and not value:
                raise AuthConfigError(f"JWT {name} must not be empty")
        keys: dict[str, Any] = {}
        if secret is not None:
            keys.update(_secret_keys(secret))
        if public_key_pem is not None:
            keys.update(_public_keys(public_key_pem))
        if algorithms is not None:
            keys = _restrict(keys, tuple(algorithms), secret)
        self._keys = keys
        self._algorithms = list(keys)
        # One key for every algorithm (the usual case: a secret, or one public key):
        # PyJWT checks alg against the list itself, and the token is parsed once.
        distinct = {id(key) for key in keys.values()}
        self._single_key: Any = next(iter(keys.values())) if len(distinct) == 1 else None
        self._audience = audience
        self._issuer = issuer
        self._leeway = float(leeway)
        self._limits = limits
        self.default_permissions = default_permissions
        # exp/nbf are checked here against an injectable clock; iat is not a rule of ours.
        self._jwt = jwt.PyJWT(
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False}
        )

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms this verifier accepts."""
        return tuple(self._keys)

    def verify(self, token: str, now: float | None = None) -> Identity:
        """Check ``token`` and return the identity it proves, or raise :class:`AuthError`."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("token too long")
        if not token.isascii():
            raise AuthError("malformed token")
        key = self._single_key
        algorithms = self._algorithms
        if key is None:
            # A secret and a public key: the token's alg picks the key of its family.
            try:
                header = _JWS.get_unverified_header(token)
            except jwt.PyJWTError as exc:
                raise AuthError(_reason(exc)) from None
            alg = header.get("alg")
            if not isinstance(alg, str) or alg not in self._keys:
                raise AuthError("algorithm not allowed")
            key = self._keys[alg]
            algorithms = [alg]
        try:
            claims = self._jwt.decode(
                token, key, algorithms=algorithms, audience=self._audience, issuer=self._issuer
            )
        except jwt.PyJWTError as exc:
            raise AuthError(_reason(exc)) from None
        if now is None:
            now = time.time()
        expires_at = _numeric_date(claims, "exp")
        if expires_at is not None and expires_at <= now - self._leeway:
            raise AuthError("token expired")
        not_before = _numeric_date(claims, "nbf")
        if not_before is not None and not_before > now + self._leeway:
            raise AuthError("token not yet valid")
        if "dwsps" in claims:
            try:
                permissions = parse_permissions(claims["dwsps"], limits=self._limits)
            except PermissionsError:
                raise AuthError("invalid dwsps claim") from None
        else:
            permissions = self.default_permissions
        user = claims.get("sub")  # PyJWT has checked it is a string when present
        if expires_at is not None:
            expires_at += self._leeway
        return Identity(user, permissions, expires_at, anonymous=False)


def _secret_keys(secret: str | bytes) -> dict[str, bytes]:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    keys = {alg: raw for alg, size in _HMAC_MIN_BYTES.items() if len(raw) >= size}
    if not keys:
        raise AuthConfigError(
            f"the JWT secret is {len(raw)} bytes; at least 32 are needed (RFC 7518, 3.2)"
        )
    try:
        # PyJWT refuses secrets that look like public keys (PEM, SSH, JWK): key confusion.
        _JWS.get_algorithm_by_name("HS256").prepare_key(raw)
    except jwt.PyJWTError:
        raise AuthConfigError(
            "the JWT secret looks like a public key; use a random secret"
        ) from None
    return keys


def _public_keys(pem: str | bytes) -> dict[str, Any]:
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AuthConfigError("the JWT public key is not a PEM public key or certificate") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _RSA_MIN_BITS:
            raise AuthConfigError(
                f"the JWT RSA key has {key.key_size} bits; at least {_RSA_MIN_BITS} are needed"
            )
        return dict.fromkeys(RSA_ALGORITHMS, key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise AuthConfigError(
                f"the JWT EC key is on {key.curve.name}; P-256 (ES256) or P-384 (ES384) is needed"
            )
        return {alg: key}
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return {EDDSA: key}
    raise AuthConfigError("the JWT public key must be an RSA, EC or Ed25519/Ed448 key")


def _restrict(
    keys: dict[str, Any], algorithms: tuple[str, ...], secret: str | bytes | None
) -> dict[str, Any]:
    if not algorithms:
        raise AuthConfigError("the list of JWT algorithms is empty")
    out: dict[str, Any] = {}
    for alg in algorithms:
        if alg.lower() == "none":
            raise AuthConfigError("the JWT algorithm 'none' is never allowed")
        if alg not in SUPPORTED_ALGORITHMS:
            raise AuthConfigError(
                f"unknown JWT algorithm {alg!r}; supported: {', '.join(SUPPORTED_ALGORITHMS)}"
            )
        if alg not in keys:
            if alg in HMAC_ALGORITHMS and secret is not None:
                raise AuthConfigError(
                    f"the JWT secret is too short for {alg}: "
                    f"{_HMAC_MIN_BYTES[alg]} bytes are needed"
                )
            raise AuthConfigError(f"no configured key can verify {alg} tokens")
        out[alg] = keys[alg]
    return out


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError("malformed token")
    try:
        result = float(value)
    except OverflowError:
        raise AuthError("malformed token") from None
    if not math.isfinite(result):
        raise AuthError("malformed token")
    return result


def _reason(exc: jwt.PyJWTError) -> str:
    """The client-facing reason for a PyJWT failure (subclasses before their bases)."""
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "invalid audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "invalid issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return {"aud": "invalid audience", "iss": "invalid issuer"}.get(exc.claim, "missing claim")
    if isinstance(exc, jwt.exceptions.InvalidSubjectError):
        return "invalid subject"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token"
    return "invalid token"


# -- the upgrade request -----------------------------------------------------------


def _case_insensitive(headers: Mapping[str, str]) -> CIMultiDictProxy[str]:
    if isinstance(headers, CIMultiDictProxy):
        return headers
    if isinstance(headers, CIMultiDict):
        return CIMultiDictProxy(headers)
    return CIMultiDictProxy(CIMultiDict(headers))


def bearer_token(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` value, or "" for another scheme.

    The scheme is case-insensitive (RFC 7235 section 2.1): ``bearer`` and ``BEARER`` too.
    """
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def token_from_request(headers: Mapping[str, str], query: str) -> str | None:
    """The token an upgrade request presents, or None.

    ``Authorization: Bearer <token>`` (scheme case-insensitive) comes first;
    other schemes are ignored. Else the first ``token`` query parameter,
    percent-decoded. An empty token counts as none; one longer than
    :data:`MAX_TOKEN_LENGTH` raises :class:`AuthError` ``"token too long"``.
    """
    token = bearer_token(_case_insensitive(headers).get("Authorization") or "")
    if not token and "token=" in query:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == "token":
                token = value
                break
    if not token:
        return None
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthError("token too long")
    return token


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """What an embedding :data:`Authenticate` hook sees of a WebSocket upgrade request."""

    path: str
    """The request path without the query string."""
    query: str
    """The raw query string (without ``?``), still percent-encoded."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Request headers; lookups are case-insensitive."""
    remote: str = ""
    """The peer's IP address."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", _case_insensitive(self.headers))

    @property
    def token(self) -> str | None:
        """The token presented (see :func:`token_from_request`)."""
        return token_from_request(self.headers, self.query)


Authenticate = Callable[[UpgradeRequest], Awaitable[Identity]]
"""An embedding application's hook: return the identity, or raise AuthError to refuse (401)."""


class Authenticator:
    """Decides who an upgrade request is; one per server.

    * No verifier and no hook: no token is needed and everyone may do
      everything (:data:`UNAUTHENTICATED`); a presented token is ignored.
    * A verifier: a valid token is required. With ``allow_anonymous``, a
      request without any token is let in with ``anonymous_permissions``
      (nothing by default); a token that is presented must still be valid.
    * A hook: it alone decides at the upgrade, and must be awaited
      (:meth:`authenticate_async`). A verifier configured alongside still
      checks tokens sent later in ``auth`` requests (:meth:`refresh`).
    """

    __slots__ = ("_anonymous", "allow_anonymous", "hook", "verifier")

    def __init__(
        self,
        verifier: JwtVerifier | None = None,
        *,
        allow_anonymous: bool = False,
        anonymous_permissions: Permissions = Permissions.NOTHING,
        hook: Authenticate | None = None,
    ) -> None:
        self.verifier = verifier
        self.allow_anonymous = allow_anonymous
        self.hook = hook
        # One shared instance: identities are immutable, and there may be 10k clients.
        self._anonymous = Identity(None, anonymous_permissions, None, anonymous=True)

    @property
    def enabled(self) -> bool:
        """True when some authentication is configured (a verifier or a hook)."""
        return self.verifier is not None or self.hook is not None

    @property
    def required(self) -> bool:
        """True when a request without a token is refused by the built-in rules."""
        return self.verifier is not None and not self.allow_anonymous

    def authenticate(self, request: UpgradeRequest, now: float | None = None) -> Identity:
        """The identity of ``request`` by the built-in rules, or raise :class:`AuthError`.

        Synchronous; raises :class:`RuntimeError` when a hook is configured
        (use :meth:`authenticate_async` then).
        """
        if self.hook is not None:
            raise RuntimeError("an authenticate hook is configured: await authenticate_async()")
        verifier = self.verifier
        if verifier is None:
            return UNAUTHENTICATED
        token = request.token
        if token is None:
            if self.allow_anonymous:
                return self._anonymous
            raise AuthError("missing token")
        return verifier.verify(token, now)

    async def authenticate_async(self, request: UpgradeRequest) -> Identity:
        """The identity of ``request``: the hook's answer when one is configured."""
        if self.hook is None:
            return self.authenticate(request)
        return await self.hook(request)

    def refresh(self, token: str, now: float | None = None) -> Identity:
        """The identity a token sent in an ``auth`` request proves, or raise :class:`AuthError`.

        Without a verifier or hook, tokens are not checked and the identity
        stays :data:`UNAUTHENTICATED`.
        """
        if self.verifier is not None:
            return self.verifier.verify(token, now)
        if self.hook is not None:
            raise AuthError("token refresh not supported")
        return UNAUTHENTICATED


# -- minting (the ``dwsps token`` command and tests) ----------------------------------


def mint_token(
    key: str | bytes,
    *,
    sub: str | None,
    ttl: float | None,
    permissions: Permissions | None = None,
    algorithm: str = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
    expires_at: float | None = None,
) -> str:
    """Sign a token: ``key`` is the shared secret for HS*, else a PEM private key.

    ``ttl`` (seconds) sets ``exp``; None mints a token that never expires.
    ``expires_at`` (epoch seconds) sets ``exp`` directly instead (``ttl`` must be None).
    ``permissions`` becomes the ``dwsps`` claim; None leaves it out, so the
    server's default permissions apply.
    """
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise AuthConfigError(f"unknown or refused JWT algorithm {algorithm!r}")
    if algorithm in HMAC_ALGORITHMS:
        raw = key.encode("utf-8") if isinstance(key, str) else key
        if len(raw) < _HMAC_MIN_BYTES[algorithm]:
            raise AuthConfigError(
                f"the JWT secret is {len(raw)} bytes; {algorithm} needs "
                f"{_HMAC_MIN_BYTES[algorithm]} (RFC 7518, 3.2)"
            )
    if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
        raise ValueError("ttl must be a positive number of seconds")
    if expires_at is not None and (ttl is not None or not math.isfinite(expires_at)):
        raise ValueError("give ttl or expires_at (a finite epoch time), not both")
    if now is None:
        now = time.time()
    claims: dict[str, Any] = {"iat": int(now)}
    if sub is not None:
        claims["sub"] = sub
    if ttl is not None:
        claims["exp"] = int(now + ttl)
    elif expires_at is not None:
        claims["exp"] = int(expires_at)
    if permissions is not None:
        claims["dwsps"] = permissions.to_claim()
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    try:
        return jwt.encode(claims, key, algorithm=algorithm)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise AuthConfigError(f"cannot sign with this key as {algorithm}: {exc}") from None
