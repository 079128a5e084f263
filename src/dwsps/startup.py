"""Checks a :class:`~dwsps.config.ServerConfig` can be served before anything starts.

:func:`check_startup` turns the mistakes that would otherwise surface late or
obscurely (a TLS file reported as "cannot listen … No such file", a peer URL
retried forever, a backplane that fails on first use) into one
:class:`~dwsps.errors.ConfigError` line that names the setting, as its
``ServerConfig`` field and its ``dwsps serve`` flag::

    tls_cert (--tls-cert): cannot read certs/server.pem: No such file or directory

It reads files and builds (without starting) the backplane engine, so it does
I/O; it never connects anywhere. The errors are :class:`SettingError`: the
command line says where a bad value came from (a flag, the environment, the
TOML file). :func:`read_key` and :func:`jwt_verifier` are how the server
itself turns the key settings into keys, so it fails the same way.
"""

from __future__ import annotations

import math
import ssl
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

from dwsps.auth import JwtVerifier
from dwsps.config import BY_NAME, ServerConfig
from dwsps.errors import (
    AuthConfigError,
    ConfigError,
    HistoryConfigError,
    SettingError,
    TopicError,
)
from dwsps.history import history_store
from dwsps.links.backplane import BackplaneOptions, create_backplane
from dwsps.permissions import Permissions
from dwsps.redact import redact
from dwsps.topics import TopicLimits, validate

PEER_SCHEMES: Final = ("ws", "wss")
_MAX_PEM: Final = 1024 * 1024
"""More than any certificate chain: a bigger file is not what the setting wants."""
_KEYS: Final = ("api_key", "status_key", "auth_jwt_secret")
"""Settings that may instead be read from the file in ``<name>_file``."""
_PERMISSIONS: Final = (
    "auth_default_subscribe",
    "auth_default_publish",
    "anonymous_subscribe",
    "anonymous_publish",
)


def check_startup(config: ServerConfig) -> None:
    """Raise :class:`ConfigError` (one line naming the setting) if ``config`` cannot be served."""
    if config.workers < 1:
        _fail("workers", f"must be at least 1, got {config.workers}")
    _check_tls(config.tls_cert, config.tls_key)
    for url in config.peers:
        _check_peer(url)
    _check_backplane(config)
    _check_history(config)
    _check_auth(config)


def setting_name(name: str) -> str:
    """``tls_cert (--tls-cert)``: a setting as the file, the environment and the flags know it."""
    return f"{name} ({BY_NAME[name].flag})"


def setting_error(name: str, problem: str) -> SettingError:
    """A :class:`SettingError` whose message names the setting as every source knows it."""
    return SettingError(name, problem, setting_name(name))


def _fail(name: str, problem: str) -> NoReturn:
    raise setting_error(name, problem)


# -- TLS ---------------------------------------------------------------------------------


def _read_pem(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(_MAX_PEM + 1)
    except OSError as exc:
        _fail(name, f"cannot read {path}: {exc.strerror or exc}")


def _encrypted_key() -> NoReturn:
    # Called by OpenSSL instead of prompting on the terminal for a passphrase.
    _fail("tls_key", "the private key is encrypted; give an unencrypted PEM key")


def _check_tls(cert: str, key: str) -> None:
    if not cert:
        if key:
            _fail("tls_key", f"is set but {setting_name('tls_cert')} is not")
        return
    cert_pem = _read_pem("tls_cert", cert)
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        _fail("tls_cert", f"{cert} holds no PEM certificate")
    if key:
        if b"PRIVATE KEY-----" not in _read_pem("tls_key", key):
            _fail("tls_key", f"{key} holds no PEM private key")
    elif b"PRIVATE KEY-----" not in cert_pem:
        _fail("tls_cert", f"{cert} holds no private key; give it with {BY_NAME['tls_key'].flag}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key or None, password=_encrypted_key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            _fail("tls_key", f"{key or cert} is not the private key of the certificate in {cert}")
        _fail("tls_cert", f"cannot load {cert}{f' with {key}' if key else ''}: {exc}")


# -- peers -------------------------------------------------------------------------------


def _check_peer(url: str) -> None:
    shown = redact(url)
    parts = urlsplit(url)
    if parts.scheme.lower() not in PEER_SCHEMES:
        _fail("peers", f"{shown} is not a ws:// or wss:// URL")
    if not parts.hostname:
        _fail("peers", f"{shown} has no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        _fail("peers", f"{shown} has a bad port (want 1-65535)")


# -- backplane ---------------------------------------------------------------------------


def _check_backplane(config: ServerConfig) -> None:
    url = config.backplane
    options = BackplaneOptions(
        "startup-check", config.backplane_buffer_messages, config.backplane_buffer_bytes
    )
    try:
        # Built, never started: engines check their URL and options without connecting.
        create_backplane(url, options)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "redis":
            raise
        scheme = urlsplit(url).scheme
        _fail("backplane", f"{scheme}:// needs the redis package: pip install 'dwsps[redis]'")
    except ConfigError as exc:
        _fail("backplane", str(exc).removeprefix("backplane: "))
    except ValueError as exc:
        _fail("backplane", f"{redact(url)}: {exc}")


# -- history -----------------------------------------------------------------------------


def _check_history(config: ServerConfig) -> None:
    if config.history_max_bytes < 1:
        _fail("history_max_bytes", f"must be at least 1, got {config.history_max_bytes}")
    if not 0 < config.history_publish_timeout < float("inf"):
        _fail(
            "history_publish_timeout",
            f"must be a positive number of seconds, got {config.history_publish_timeout}",
        )
    try:
        history_store(config.history, config.history_max_bytes, config.topic_limits)
    except HistoryConfigError as exc:
        _fail("history", str(exc).removeprefix("history "))


# -- keys and authentication ---------------------------------------------------------------


def _check_auth(config: ServerConfig) -> None:
    for name in _KEYS[:2]:
        read_key(config, name)
    for name in _PERMISSIONS:
        permissions_setting(config, name)
    jwt_verifier(config)


def read_key(config: ServerConfig, name: str) -> str:
    """The key setting ``name`` (``api_key``, ``status_key``, ``auth_jwt_secret``) as given
    or, when ``<name>_file`` is set, read from that file (a trailing newline dropped)."""
    assert name in _KEYS
    path: str = getattr(config, f"{name}_file")
    if not path:
        value: str = getattr(config, name)
        return value
    key = _read_text(f"{name}_file", path).rstrip("\r\n")
    if not key:
        # Taken as "no key", an empty file would switch the API or the token check off.
        _fail(f"{name}_file", f"{path} is empty")
    return key


def jwt_verifier(config: ServerConfig) -> JwtVerifier | None:
    """The verifier of the ``auth_jwt_*`` settings (None without a key); reads the key files."""
    secret_setting = "auth_jwt_secret_file" if config.auth_jwt_secret_file else "auth_jwt_secret"
    secret = read_key(config, "auth_jwt_secret") or None
    path = config.auth_jwt_public_key
    pem = _read_text("auth_jwt_public_key", path) if path else None
    if secret is None and pem is None:
        return None
    # Each key alone first, so that an error names the setting it is about.
    if secret is not None:
        _verifier(secret_setting, secret=secret)
    if pem is not None:
        _verifier("auth_jwt_public_key", public_key_pem=pem)
    if not 0 <= config.auth_jwt_leeway < math.inf:
        _fail(
            "auth_jwt_leeway",
            f"must be a finite number of seconds >= 0, got {config.auth_jwt_leeway}",
        )
    return _verifier(
        "auth_jwt_algorithms",
        secret=secret,
        public_key_pem=pem,
        algorithms=tuple(config.auth_jwt_algorithms) or None,
        audience=config.auth_jwt_audience or None,
        issuer=config.auth_jwt_issuer or None,
        leeway=config.auth_jwt_leeway,
        default_permissions=Permissions(
            permissions_setting(config, "auth_default_subscribe"),
            permissions_setting(config, "auth_default_publish"),
        ),
        limits=config.topic_limits,
    )


def permissions_setting(config: ServerConfig, name: str) -> tuple[str, ...]:
    """The topic patterns of permission setting ``name`` (e.g. ``anonymous_publish``), checked."""
    assert name in _PERMISSIONS
    patterns: list[str] = getattr(config, name)
    limits: TopicLimits = config.topic_limits
    for pattern in patterns:
        try:
            validate(pattern, subscription=True, limits=limits)
        except TopicError as exc:
            text = str(exc)
            _fail(name, text if repr(pattern) in text else f"{pattern!r}: {text}")
    return tuple(patterns)


def _verifier(name: str, **options: Any) -> JwtVerifier:
    try:
        return JwtVerifier(**options)
    except AuthConfigError as exc:
        _fail(name, str(exc))


def _read_text(name: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(_MAX_PEM + 1)
    except OSError as exc:
        _fail(name, f"cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        _fail(name, f"{path} is not UTF-8 text")
