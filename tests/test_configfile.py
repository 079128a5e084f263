"""ServerConfig from defaults < TOML file < DWSPS_* environment < overrides (pure: no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dwsps.config import ServerConfig
from dwsps.configfile import build_config, load_env, load_toml
from dwsps.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dwsps.toml"
    path.write_text(text)
    return path


def test_defaults_without_sources() -> None:
    assert build_config(environ={}) == ServerConfig()


def test_toml_values_and_kebab_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
port = 9001
max-frame-size = 2048
heartbeat_interval = 3          # an int where a float is wanted is fine
peers = ["ws://a:1", "ws://b:2"]
[peer_tokens]
"ws://a:1" = "tok"
""",
    )
    config = build_config(path, environ={})
    assert config.port == 9001
    assert config.max_frame_size == 2048
    assert config.heartbeat_interval == 3.0
    assert isinstance(config.heartbeat_interval, float)
    assert config.peers == ["ws://a:1", "ws://b:2"]
    assert config.peer_tokens == {"ws://a:1": "tok"}
    assert config.host == "127.0.0.1"  # untouched fields keep their defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1", "unknown key 'prot'"),
        ('port = "80"', "port must be int"),
        ("port = true", "port must be int"),
        ("port = 70000", "port number"),
        ("max_subscriptions = -1", "must not be negative"),
        ('peers = "ws://a:1"', "peers must be a list of strings"),
        ("peers = [1]", "peers must be a list of strings"),
        ("peer_tokens = 3", "peer_tokens must be a table"),
        ("port = ", "invalid TOML"),
    ],
)
def test_toml_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_toml(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_toml(tmp_path / "absent.toml")


def test_environment_parsing() -> None:
    env = {
        "DWSPS_PORT": "9002",
        "DWSPS_PEERS": "ws://a:1, ws://b:2,",
        "DWSPS_PEER_TOKENS": "ws://a:1=x=y,ws://b:2=z",
        "DWSPS_ACCEPT_PEER_TOKENS": "t1,t2",
        "DWSPS_HEARTBEAT_INTERVAL": "0.5",
        "DWSPS_BACKPLANE": "redis://localhost:6379",
        "DWSPS_TEST_TIME_SCALE": "3",  # not a setting: ignored
        "PORT": "1",
    }
    assert load_env(env) == {
        "port": 9002,
        "peers": ["ws://a:1", "ws://b:2"],
        "peer_tokens": {"ws://a:1": "x=y", "ws://b:2": "z"},
        "accept_peer_tokens": ["t1", "t2"],
        "heartbeat_interval": 0.5,
        "backplane": "redis://localhost:6379",
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DWSPS_PORT": "eighty"}, "DWSPS_PORT: cannot read 'eighty' as int"),
        ({"DWSPS_PORT": "-5"}, "DWSPS_PORT: port must not be negative"),
        ({"DWSPS_HEARTBEAT_INTERVAL": "soon"}, "DWSPS_HEARTBEAT_INTERVAL"),
        ({"DWSPS_PEER_TOKENS": "ws://a:1"}, "not KEY=VALUE"),
    ],
)
def test_environment_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_env(env)


def test_precedence_toml_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "port = 1\nmax_topic_length = 10\nmax_topic_levels = 2\npeers = ['ws://toml:1']\n",
    )
    env = {"DWSPS_PORT": "2", "DWSPS_MAX_TOPIC_LENGTH": "20", "DWSPS_PEERS": "ws://env:1"}
    config = build_config(path, environ=env, overrides={"port": 3, "peers": ["ws://cli:1"]})
    assert config.port == 3  # option > env > file
    assert config.peers == ["ws://cli:1"]  # a list is replaced, not merged
    assert config.max_topic_length == 20  # env > file
    assert config.max_topic_levels == 2  # file > default
    assert config.max_subscriptions == ServerConfig().max_subscriptions


def test_overrides_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        build_config(environ={}, overrides={"nope": 1})
    with pytest.raises(ConfigError, match="option: port"):
        build_config(environ={}, overrides={"port": -1})
