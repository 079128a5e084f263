"""Checks a :class:`~dwsps.config.ServerConfig` can be served before anything starts.

:func:`check_startup` turns the mistakes that would otherwise surface late or
obscurely (a TLS file reported as "cannot listen … No such file", a peer URL
retried forever, a backplane that fails on first use) into one
:class:`~dwsps.errors.ConfigError` line that names the setting, as its
``ServerConfig`` field and its ``dwsps serve`` flag::

    tls_cert (--tls-cert): cannot read certs/server.pem: No such file or directory

It reads files and builds (without starting) the backplane engine, so it does
I/O; it never connects anywhere.
"""

from __future__ import annotations

import ssl
from typing import Final, NoReturn
from urllib.parse import urlsplit

from dwsps.config import BY_NAME, ServerConfig
from dwsps.errors import ConfigError, HistoryConfigError
from dwsps.history import history_store
from dwsps.links.backplane import BackplaneOptions, create_backplane
from dwsps.redact import redact

PEER_SCHEMES: Final = ("ws", "wss")
_MAX_PEM: Final = 1024 * 1024
"""More than any certificate chain: a bigger file is not what the setting wants."""


def check_startup(config: ServerConfig) -> None:
    """Raise :class:`ConfigError` (one line naming the setting) if ``config`` cannot be served."""
    if config.workers < 1:
        _fail("workers", f"must be at least 1, got {config.workers}")
    _check_tls(config.tls_cert, config.tls_key)
    for url in config.peers:
        _check_peer(url)
    _check_backplane(config)
    _check_history(config)


def setting_name(name: str) -> str:
    """``tls_cert (--tls-cert)``: a setting as the file, the environment and the flags know it."""
    return f"{name} ({BY_NAME[name].flag})"


def _fail(name: str, problem: str) -> NoReturn:
    raise ConfigError(f"{setting_name(name)}: {problem}")


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
