"""Server configuration: :class:`ServerConfig` and filling it from every source.

The dataclass is the one source of truth. Each field is declared with
:func:`setting`, whose help text and metavar this module turns into the TOML
key, the ``DWSPS_<NAME>`` environment variable and the ``dwsps serve`` flag.
Adding a setting is one line in :class:`ServerConfig`::

    max_widgets: int = setting(10, help="widgets per connection", metavar="N")

which is then ``max_widgets = 10`` (or ``max-widgets``) in TOML,
``DWSPS_MAX_WIDGETS=10`` in the environment and ``--max-widgets N`` on the
command line, with its help and default in ``dwsps serve --help``. Supported
types: ``bool`` (``--x/--no-x``), ``int``, ``float``, ``str``, ``list[str]``
and ``dict[str, str]``; a new field of any other type fails at import.

Precedence, lowest first (:func:`load_config`): the defaults < the TOML file <
the environment < explicit overrides (the flags)::

    port = 9000
    peers = ["ws://10.0.0.2:8000"]
    heartbeat_interval = 5.0
    [peer_tokens]
    "ws://10.0.0.2:8000" = "s3cret"

Text forms (flags and environment): a list is a repeated flag or a
comma-separated variable (``DWSPS_PEERS=ws://a:8000,ws://b:8000``); a mapping
is a repeated ``KEY=VALUE`` flag or comma-separated pairs, each split at the
LAST ``=`` so a URL key may carry a query string
(``DWSPS_PEER_TOKENS=ws://a:8000/?x=1=tok``); a value containing ``=`` must be
written in the TOML table. Sizes (:func:`parse_size`) also take ``512KiB``,
``1MiB``, ``2GB`` and durations (:func:`parse_duration`) ``500ms``, ``10s``,
``5m``, also as TOML strings. Other ``DWSPS_*`` variables are ignored. Bad
values and unknown TOML keys raise :class:`~dwsps.errors.ConfigError` naming
the source (the file as given, the variable) and the key.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import os
import re
import textwrap
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from dwsps.errors import ConfigError
from dwsps.topics import TopicLimits

MIB = 1024 * 1024
ENV_PREFIX: Final = "DWSPS_"
_META: Final = "dwsps"

T = TypeVar("T")
Kind = Literal["bool", "int", "float", "str", "list", "dict"]

_SIZE = re.compile(r"\s*(\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_DURATION_UNITS: Final = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """Bytes from ``1048576``, ``512KiB``, ``1MiB``, ``1GiB`` or ``2MB`` (powers of 1000)."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"cannot read {text!r} as a size (bytes, or e.g. 512KiB, 1MiB, 2GB)")
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_duration(text: str) -> float:
    """Seconds from ``2.5``, ``500ms``, ``10s``, ``5m`` or ``1h``."""
    match = _DURATION.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _DURATION_UNITS:
        raise ValueError(f"cannot read {text!r} as seconds (e.g. 2.5, 500ms, 10s, 5m)")
    return float(match.group(1)) * _DURATION_UNITS[unit]


@dataclass(frozen=True, slots=True)
class _Declared:
    help: str
    metavar: str | None
    flag: str | None
    parse: Callable[[str], Any] | None
    maximum: int | None


def setting(
    default: T,
    *,
    help: str,
    metavar: str | None = None,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    maximum: int | None = None,
) -> T:
    """Declare a :class:`ServerConfig` field with what its flag, variable and TOML key need.

    ``flag`` replaces the generated ``--kebab-name`` (e.g. a singular ``--peer``
    for a list); ``parse`` reads an ``int``/``float`` from text (flags, the
    environment, TOML strings) instead of plain ``int``/``float``; ``maximum``
    bounds an ``int``. A list or dict default is copied for each instance.
    """
    meta = {_META: _Declared(help, metavar, flag, parse, maximum)}
    if isinstance(default, list | dict):
        factory: Callable[[], T] = functools.partial(copy.copy, default)
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(slots=True)
class ServerConfig:
    """Everything a :class:`~dwsps.server.Server` can be told. Sizes are bytes, times seconds."""

    host: str = setting("127.0.0.1", help="interface to bind", metavar="HOST")
    port: int = setting(
        8000, help="port to bind, 0 for any free one", metavar="PORT", maximum=65535
    )
    peers: list[str] = setting(
        [],
        help="forward organic publishes to the server at URL",
        metavar="URL",
        flag="--peer",
    )
    peer_tokens: dict[str, str] = setting(
        {},
        help="token to present to the peer at URL, as Authorization: Bearer",
        metavar="URL=TOKEN",
        flag="--peer-token",
    )
    accept_peer_tokens: list[str] = setting(
        [],
        help="accept fromPeerServer publishes only from connections presenting TOKEN",
        metavar="TOKEN",
        flag="--accept-peer-token",
    )
    tls_cert: str = setting("", help="PEM certificate chain: serve wss://", metavar="PEM")
    tls_key: str = setting("", help="PEM private key, if not in --tls-cert", metavar="PEM")
    auth_jwt_secret: str = setting(
        "",
        help="require a JWT signed with this shared secret (HS256/384/512); prefer"
        " --auth-jwt-secret-file or DWSPS_AUTH_JWT_SECRET so it stays out of ps",
        metavar="SECRET",
    )
    auth_jwt_secret_file: str = setting(
        "", help="read the JWT secret from FILE (a trailing newline is dropped)", metavar="FILE"
    )
    auth_jwt_public_key: str = setting(
        "",
        help="require a JWT signed with the key in this PEM file (RS*/PS*, ES256/384, EdDSA)",
        metavar="FILE",
    )
    auth_jwt_algorithms: list[str] = setting(
        [],
        help="accept only these JWT algorithms (when unset: all that the keys allow)",
        metavar="ALG",
        flag="--auth-jwt-algorithm",
    )
    auth_jwt_audience: str = setting(
        "", help="require this aud claim in tokens", metavar="AUDIENCE"
    )
    auth_jwt_issuer: str = setting("", help="require this iss claim in tokens", metavar="ISSUER")
    auth_jwt_leeway: float = setting(
        0.0,
        help="clock skew allowed when checking exp and nbf",
        metavar="SECONDS",
        parse=parse_duration,
    )
    auth_default_subscribe: list[str] = setting(
        ["*"],
        help="what a token without a dwsps claim may subscribe to",
        metavar="PATTERN",
        flag="--auth-default-subscribe",
    )
    auth_default_publish: list[str] = setting(
        ["*"],
        help="what a token without a dwsps claim may publish to",
        metavar="PATTERN",
        flag="--auth-default-publish",
    )
    allow_anonymous: bool = setting(
        False, help="with a JWT key configured, let clients without a token in too"
    )
    anonymous_subscribe: list[str] = setting(
        [],
        help="what anonymous clients may subscribe to (when anonymous clients are allowed)",
        metavar="PATTERN",
        flag="--anonymous-subscribe",
    )
    anonymous_publish: list[str] = setting(
        [],
        help="what anonymous clients may publish to (when anonymous clients are allowed)",
        metavar="PATTERN",
        flag="--anonymous-publish",
    )
    allowed_origins: list[str] = setting(
        [],
        help="refuse (403) browser upgrades whose Origin is not ORIGIN (unset: any origin)",
        metavar="ORIGIN",
        flag="--allowed-origin",
    )
    rate_limit: float = setting(
        0.0, help="requests per second per connection; 0: unlimited", metavar="PER_SECOND"
    )
    rate_burst: int = setting(
        100, help="requests a connection may send at once above the rate limit", metavar="N"
    )
    max_connections: int = setting(
        0, help="connections the server accepts; over it the upgrade gets 503", metavar="N"
    )
    max_connections_per_ip: int = setting(
        0, help="connections per client address; over it the upgrade gets 429", metavar="N"
    )
    api_key: str = setting(
        "",
        help="enable the HTTP API (POST /api/publish, GET /api/topics, /api/connections)"
        " for requests with Authorization: Bearer KEY; prefer --api-key-file or DWSPS_API_KEY",
        metavar="KEY",
    )
    api_key_file: str = setting(
        "", help="read the HTTP API key from FILE (a trailing newline is dropped)", metavar="FILE"
    )
    status_key: str = setting(
        "",
        help="require Authorization: Bearer KEY (or the API key) for the details of"
        " GET /health and /health/backplane and for /metrics; without it they answer"
        " only the status, /metrics 401; /health/live and /health/ready stay open."
        " Prefer --status-key-file or DWSPS_STATUS_KEY",
        metavar="KEY",
    )
    status_key_file: str = setting(
        "", help="read the status key from FILE (a trailing newline is dropped)", metavar="FILE"
    )
    backplane: str = setting(
        "memory://", help="memory:// (this server) or redis://...", metavar="URL"
    )
    history: list[str] = setting(
        [],
        help="keep history (offsets, recovery) for topics matching PATTERN, SIZE messages"
        " per stream, none older than AGE (s, m, h, d); the first matching pattern wins,"
        " e.g. 'chat.*:1000:10m'",
        metavar="PATTERN:SIZE[:AGE]",
        flag="--history",
    )
    history_max_bytes: int = setting(
        64 * MIB,
        help="bytes all history together may hold; the least recently published streams"
        " are evicted beyond it",
        metavar="BYTES",
        parse=parse_size,
    )
    max_frame_size: int = setting(
        1 * MIB,
        help="largest incoming message (a frame, or a fragmented message in total)",
        metavar="BYTES",
        parse=parse_size,
    )
    max_topic_length: int = setting(256, help="longest topic, in characters", metavar="N")
    max_topic_levels: int = setting(32, help="most dot-separated topic levels", metavar="N")
    max_subscriptions: int = setting(
        1000, help="subscriptions per connection; more get too_many_subscriptions", metavar="N"
    )
    max_subscriptions_total: int = setting(
        1_000_000,
        help="subscriptions held by all connections together; more get"
        " too_many_subscriptions; 0: no limit",
        metavar="N",
    )
    max_deliveries_per_publish: int = setting(
        64,
        help="subscriptions of one connection that may match one publish; a publish"
        " matching more closes that connection with 1008; 0: no limit",
        metavar="N",
    )
    idle_sweep: float = setting(
        1.0,
        help="this often, connections that sent nothing since the last sweep give their"
        " WebSocket parser back (about a third of an idle connection's memory; the next"
        " input brings a fresh one); 0 disables",
        metavar="SECONDS",
        parse=parse_duration,
    )
    heartbeat_interval: float = setting(
        10.0,
        help="ping every client this often and drop one that did not answer the previous"
        " ping; 0 disables",
        metavar="SECONDS",
        parse=parse_duration,
    )
    max_outbound_buffer: int = setting(
        8 * MIB,
        help="close a connection whose unsent data passes this with 1013 (slow consumer)",
        metavar="BYTES",
        parse=parse_size,
    )
    memory_budget: int = setting(
        1024 * MIB,
        help="data the server may hold for its connections (unsent backlogs, partial"
        " messages); over it, publishes get overloaded, upgrades 503 and slow"
        " readers are closed with 1013; 0: no budget",
        metavar="BYTES",
        parse=parse_size,
    )
    fragment_timeout: float = setting(
        10.0,
        help="time a fragmented message may take from its first frame to its last (then 1008)",
        metavar="SECONDS",
        parse=parse_duration,
    )
    max_invalid_requests: int = setting(
        50,
        help="consecutive bad requests after which a connection is closed with 1008",
        metavar="N",
    )
    handshake_timeout: float = setting(
        5.0,
        help="time a WebSocket upgrade may take (clients, and peer links connecting)",
        metavar="SECONDS",
        parse=parse_duration,
    )
    listen_backlog: int = setting(
        1024,
        help="connections the kernel queues before dwsps accepts them (capped by"
        " net.core.somaxconn): room for every client reconnecting at once",
        metavar="N",
        maximum=65535,
    )
    workers: int = setting(
        1,
        help="processes serving the port together (SO_REUSEPORT), one per core: they act as"
        " one server (docs/workers.md)",
        metavar="N",
        maximum=256,
    )
    close_timeout: float = setting(
        2.0,
        help="how long a graceful shutdown waits for clients to finish the close handshake",
        metavar="SECONDS",
        parse=parse_duration,
    )
    peer_outbox_messages: int = setting(
        100_000,
        help="per peer link: publishes held until the peer confirms them (oldest dropped first)",
        metavar="N",
    )
    peer_outbox_bytes: int = setting(
        64 * MIB,
        help="per peer link: bytes held until the peer confirms them (oldest dropped first)",
        metavar="BYTES",
        parse=parse_size,
    )
    peer_reconnect_min: float = setting(
        0.1,
        help="first reconnect delay of a peer link; doubles per failed attempt (with jitter)",
        metavar="SECONDS",
        parse=parse_duration,
    )
    peer_reconnect_max: float = setting(
        5.0,
        help="longest reconnect delay of a peer link",
        metavar="SECONDS",
        parse=parse_duration,
    )
    backplane_buffer_messages: int = setting(
        100_000,
        help="publishes held while the backplane is away (oldest dropped first)",
        metavar="N",
    )
    backplane_buffer_bytes: int = setting(
        64 * MIB,
        help="bytes held while the backplane is away (oldest dropped first)",
        metavar="BYTES",
        parse=parse_size,
    )
    history_publish_timeout: float = setting(
        10.0,
        help="with history in the backplane (Redis): how long a publish to a history topic"
        " waits for its offset before the publisher gets an error",
        metavar="SECONDS",
        parse=parse_duration,
    )

    @property
    def topic_limits(self) -> TopicLimits:
        """The topic limits as the pure layer wants them."""
        return TopicLimits(self.max_topic_length, self.max_topic_levels)


# -- every setting as the sources see it ---------------------------------------

_KINDS: Final[dict[Any, Kind]] = {
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    list[str]: "list",
    dict[str, str]: "dict",
}
_KIND_TEXT: Final[dict[Kind, str]] = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list": "a list of strings",
    "dict": "a table of non-empty strings",
}
_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class Setting:
    """One :class:`ServerConfig` field with its names in every source."""

    name: str
    kind: Kind
    default: Any
    help: str
    metavar: str | None
    flag: str
    """``--max-frame-size``, or the ``flag`` given to :func:`setting`."""
    parse: Callable[[str], Any] | None
    maximum: int | None

    @property
    def env(self) -> str:
        """The environment variable, ``DWSPS_MAX_FRAME_SIZE``."""
        return ENV_PREFIX + self.name.upper()

    @property
    def toml_keys(self) -> tuple[str, str]:
        """The two spellings a TOML file may use: ``max_frame_size``, ``max-frame-size``."""
        return self.name, self.name.replace("_", "-")

    def shown_default(self) -> str:
        """The default as ``--help`` shows it."""
        if self.kind == "bool":
            return "true" if self.default else "false"
        if self.default in ("", [], {}):
            return "none"
        return str(self.default)

    def check(self, value: Any) -> Any:
        """``value`` as the field wants it (ints widen to floats), else :class:`ValueError`."""
        kind = self.kind
        if isinstance(value, str) and self.parse is not None:
            value = self.parse(value)
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind == "list":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
            )
        if not ok:
            raise ValueError(f"must be {_KIND_TEXT[kind]}, got {value!r}")
        if kind in ("int", "float"):
            return self._in_range(value)
        return copy.copy(value)  # a list or dict must not be shared with the source

    def _in_range(self, value: float) -> Any:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.maximum}, got {value}")
        return float(value) if self.kind == "float" else value

    def from_text(self, text: str) -> Any:
        """The checked value of an environment variable's text."""
        kind = self.kind
        value: Any
        if kind == "bool":
            word = text.strip().lower()
            if word not in _TRUE + _FALSE:
                raise ValueError(f"cannot read {text!r} as true or false (1/0, yes/no, on/off)")
            value = word in _TRUE
        elif kind in ("int", "float"):
            value = self.scalar_from_text(text)
        elif kind == "list":
            value = [part.strip() for part in text.split(",") if part.strip()]
        elif kind == "dict":
            parts = filter(None, (p.strip() for p in text.split(",")))
            value = dict(split_pair(part) for part in parts)
        else:
            value = text
        return self.check(value)

    def scalar_from_text(self, text: str) -> Any:
        """A number from text, by ``parse`` if the setting has one; :class:`ValueError` if not."""
        if self.parse is not None:
            return self.parse(text)
        try:
            return int(text) if self.kind == "int" else float(text)
        except ValueError:
            raise ValueError(f"cannot read {text!r} as {_KIND_TEXT[self.kind]}") from None


def split_pair(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` split at the LAST ``=`` (a URL key may have a query string)."""
    key, sep, value = text.rpartition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        hint = ""
        if text.rstrip().endswith("=") and "=" in key:
            # e.g. base64 padding: the last '=' is the value's own.
            hint = "; a VALUE that contains '=' must be given in the TOML file"
        raise ValueError(f"wants KEY=VALUE (split at the last '='), got {text!r}{hint}")
    return key, value


def _kebab_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _settings() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(ServerConfig)
    defaults = ServerConfig()
    found = []
    for f in dataclasses.fields(ServerConfig):
        declared = f.metadata.get(_META)
        if not isinstance(declared, _Declared):
            raise TypeError(f"ServerConfig.{f.name} is not declared with setting()")
        kind = _KINDS.get(hints[f.name])
        if kind is None:
            raise TypeError(f"ServerConfig.{f.name}: unsupported type {hints[f.name]!r}")
        flag = declared.flag or _kebab_flag(f.name)
        found.append(
            Setting(
                name=f.name,
                kind=kind,
                default=getattr(defaults, f.name),
                help=declared.help,
                metavar=declared.metavar,
                flag=flag,
                parse=declared.parse,
                maximum=declared.maximum,
            )
        )
    return tuple(found)


SETTINGS: Final[tuple[Setting, ...]] = _settings()
"""Every :class:`ServerConfig` field, in declaration order."""
BY_NAME: Final[dict[str, Setting]] = {s.name: s for s in SETTINGS}
_BY_TOML_KEY: Final[dict[str, Setting]] = {key: s for s in SETTINGS for key in s.toml_keys}


# -- the sources ---------------------------------------------------------------


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Checked field values from a TOML file; errors name ``path`` as given."""
    shown = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {shown}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown}: invalid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        s = _BY_TOML_KEY.get(key)
        if s is None:
            known = ", ".join(BY_NAME)
            raise ConfigError(f"{shown}: unknown key {key!r}; known keys: {known}")
        if s.name in values:
            raise ConfigError(f"{shown}: {s.name!r} is given twice, as {' and '.join(s.toml_keys)}")
        try:
            values[s.name] = s.check(value)
        except ValueError as exc:
            raise ConfigError(f"{shown}: {key}: {exc}") from None
    return values


def load_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Checked field values from ``DWSPS_<FIELD>`` variables (default: ``os.environ``)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.env in env:
            try:
                values[s.name] = s.from_text(env[s.env])
            except ValueError as exc:
                raise ConfigError(f"environment {s.env}: {exc}") from None
    return values


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Defaults < TOML file at ``path`` < environment < ``overrides`` (field -> value)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(load_toml(path))
    values.update(load_env(environ))
    for name, value in (overrides or {}).items():
        if name not in BY_NAME:
            raise ConfigError(f"unknown setting {name!r}")
        try:
            values[name] = BY_NAME[name].check(value)
        except ValueError as exc:
            raise ConfigError(f"setting {name}: {exc}") from None
    return ServerConfig(**values)


def setting_source(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> str | None:
    """Where :func:`load_config` took setting ``name`` from, as its own errors name a
    source: ``environment DWSPS_X``, ``FILE: key`` (the file as given, the key as
    written), or None for an override (a flag) or the default."""
    if overrides is not None and name in overrides:
        return None
    s = BY_NAME[name]
    if s.env in (os.environ if environ is None else environ):
        return f"environment {s.env}"
    if path is not None:
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
            for key in s.toml_keys:
                if key in data:
                    return f"{os.fspath(path)}: {key}"
    return None


# -- the command line ----------------------------------------------------------


def _flag_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert`` with its ValueError turned into argparse's usage error."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_flags(
    parser: argparse.ArgumentParser,
    settings: Iterable[Setting] = SETTINGS,
    *,
    title: str | None = None,
) -> None:
    """Declare one flag per setting on ``parser``, in a group ``title`` if given.

    A flag not given leaves no attribute (read them back with
    :func:`flag_values`), so only given flags override the file and the
    environment. A bad value is argparse's usage error naming the flag.
    """
    group = parser.add_argument_group(title) if title else parser
    for s in settings:
        repeatable = "repeatable, " if s.kind in ("list", "dict") else ""
        help_text = f"{s.help} ({repeatable}default: {s.shown_default()})".replace("%", "%%")
        common: dict[str, Any] = {"dest": s.name, "default": argparse.SUPPRESS, "help": help_text}
        if s.kind == "bool":
            group.add_argument(s.flag, action=argparse.BooleanOptionalAction, **common)
        elif s.kind == "list":
            group.add_argument(s.flag, action="append", metavar=s.metavar, **common)
        elif s.kind == "dict":
            convert = _flag_type(split_pair)
            group.add_argument(s.flag, action="append", type=convert, metavar=s.metavar, **common)
        else:
            group.add_argument(s.flag, type=_flag_type(s.from_text), metavar=s.metavar, **common)


def flag_values(args: argparse.Namespace, settings: Iterable[Setting] = SETTINGS) -> dict[str, Any]:
    """The settings given as flags (for ``load_config(overrides=...)``)."""
    given = vars(args)
    values: dict[str, Any] = {}
    for s in settings:
        if s.name in given:
            values[s.name] = dict(given[s.name]) if s.kind == "dict" else given[s.name]
    return values


def sources_help(width: int = 78) -> str:
    """How flags, TOML keys and environment variables relate, for a ``--help`` epilog."""
    renamed = [f"{s.flag} is {s.name}" for s in SETTINGS if s.flag != _kebab_flag(s.name)]
    paragraphs = [
        "Settings come from, lowest precedence first: built-in defaults, the --config TOML"
        " file, the environment, then these options. Each option --NAME-OF-SETTING sets"
        " the setting name_of_setting"
        + (f" ({', '.join(renamed)})" if renamed else "")
        + ", which is also its TOML key (max_frame_size = 2097152, or max-frame-size) and,"
        " upper-cased after DWSPS_, its environment variable (DWSPS_MAX_FRAME_SIZE=2MiB).",
        "In the environment a list is comma-separated (DWSPS_PEERS=url1,url2) and so are"
        " URL=TOKEN pairs (DWSPS_PEER_TOKENS=url1=token1,url2=token2). A pair is split at"
        " its last '=', so the URL may have a query string; a token containing '=' must go"
        " in the TOML table [peer_tokens]. A repeated option replaces the whole list from"
        " the file or the environment.",
        "BYTES also take units (512KiB, 1MiB, 1GiB; KB, MB, GB are powers of 1000) and"
        " SECONDS too (500ms, 10s, 5m, 1h), in the file as strings.",
    ]
    return "\n\n".join(textwrap.fill(p, width) for p in paragraphs) + "\n"
