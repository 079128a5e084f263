"""Fill a :class:`~dwsps.config.ServerConfig` from a TOML file and the environment.

Precedence, lowest first: the dataclass defaults < the TOML file <
``DWSPS_<FIELD>`` environment variables < explicit overrides (the CLI options).

TOML: top-level keys are the field names of :class:`ServerConfig`
(``max_frame_size`` or ``max-frame-size``)::

    port = 9000
    peers = ["ws://10.0.0.2:8000"]
    heartbeat_interval = 5.0
    [peer_tokens]
    "ws://10.0.0.2:8000" = "s3cret"

Environment: ``DWSPS_`` plus the field name in upper case, e.g. ``DWSPS_PORT=9000``.
Lists are comma-separated (``DWSPS_PEERS=ws://a:8000,ws://b:8000``); mappings
are comma-separated ``KEY=VALUE`` pairs split at the first ``=``
(``DWSPS_PEER_TOKENS=ws://a:8000=tok``). Other ``DWSPS_*`` variables (e.g.
for tests) are ignored. Wrong types and unknown TOML keys raise
:class:`ConfigError` with the offending source and key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from dwsps.config import ServerConfig
from dwsps.errors import ConfigError

ENV_PREFIX: Final = "DWSPS_"


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(ServerConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ServerConfig)}


FIELD_TYPES: Final[dict[str, Any]] = _field_types()
"""ServerConfig field name -> its type (``int``, ``list[str]``, ...)."""


def _type_name(tp: Any) -> str:
    return str(tp) if typing.get_origin(tp) is not None else str(tp.__name__)


def check_value(name: str, value: Any, source: str) -> Any:
    """Return ``value`` if it fits field ``name`` (ints widen to floats), else raise."""
    tp = FIELD_TYPES[name]
    origin = typing.get_origin(tp)
    where = f"{source}: {name}"
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ConfigError(f"{where} must not be negative, got {value}")
            if name == "port" and value > 65535:
                raise ConfigError(f"{where} must be a port number (0-65535), got {value}")
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value < 0:
                raise ConfigError(f"{where} must not be negative, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    elif origin is dict:
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value)
        raise ConfigError(f"{where} must be a table of strings, got {value!r}")
    else:  # pragma: no cover - a new field type needs a rule here
        raise ConfigError(f"{where}: unsupported field type {tp!r}")
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file into checked ServerConfig field values."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    source = Path(path).name
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            known = ", ".join(sorted(FIELD_TYPES))
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {known}")
        values[name] = check_value(name, value, source)
    return values


def _parse_env(name: str, text: str, var: str) -> Any:
    tp = FIELD_TYPES[name]
    origin = typing.get_origin(tp)
    try:
        value: Any
        if tp is bool:
            lowered = text.strip().lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(text)
            value = lowered in ("1", "true", "yes", "on")
        elif tp is int:
            value = int(text.strip())
        elif tp is float:
            value = float(text.strip())
        elif origin is list:
            value = [part.strip() for part in text.split(",") if part.strip()]
        elif origin is dict:
            value = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, sep, val = part.partition("=")
                if not sep or not key:
                    raise ValueError(f"{part!r} is not KEY=VALUE")
                value[key] = val
        else:
            value = text
    except ValueError as exc:
        raise ConfigError(
            f"environment {var}: cannot read {text!r} as {_type_name(tp)}: {exc}"
        ) from None
    return check_value(name, value, f"environment {var}")


def load_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Checked ServerConfig field values from ``DWSPS_<FIELD>`` variables."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in FIELD_TYPES:
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _parse_env(name, env[var], var)
    return values


def build_config(
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
        if name not in FIELD_TYPES:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = check_value(name, value, "option")
    return ServerConfig(**values)
