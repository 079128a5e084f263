"""ServerConfig from defaults < TOML file < DWSPS_* environment < flags, by value (no sockets)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dwsps.cli import build_parser, main
from dwsps.config import (
    SETTINGS,
    ServerConfig,
    Setting,
    add_flags,
    flag_values,
    load_config,
    load_env,
    load_toml,
    parse_duration,
    parse_size,
    split_pair,
)
from dwsps.errors import ConfigError

QUERY_URL = "ws://h:8000/?a=b"
"""A peer URL with a query string: its own '=' must not take the token."""


def write(tmp_path: Path, text: str, name: str = "dwsps.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def serve_flags(*argv: str) -> dict[str, Any]:
    """The settings that ``dwsps serve ARGV`` gives as flags."""
    return flag_values(build_parser().parse_args(["serve", *argv]))


# -- defaults and TOML ----------------------------------------------------------


def test_defaults_without_sources() -> None:
    assert load_config(environ={}) == ServerConfig()


def test_list_defaults_are_not_shared() -> None:
    a, b = ServerConfig(), ServerConfig()
    a.peers.append("ws://x:1")
    a.peer_tokens["ws://x:1"] = "t"
    assert b.peers == []
    assert b.peer_tokens == {}


def test_toml_values_and_kebab_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
port = 9001
max-frame-size = 2048
heartbeat_interval = 3          # an int where a float is wanted is fine
peers = ["ws://a:1", "ws://b:2"]
max_outbound_buffer = "2MiB"    # sizes and durations may be strings with a unit
close_timeout = "500ms"
[peer_tokens]
"ws://a:1" = "tok"
"ws://h:8000/?a=b" = "x=y"      # the table form takes a token with '='
""",
    )
    config = load_config(path, environ={})
    assert config.port == 9001
    assert config.max_frame_size == 2048
    assert config.heartbeat_interval == 3.0
    assert isinstance(config.heartbeat_interval, float)
    assert config.peers == ["ws://a:1", "ws://b:2"]
    assert config.max_outbound_buffer == 2 * 1024 * 1024
    assert config.close_timeout == 0.5
    assert config.peer_tokens == {"ws://a:1": "tok", QUERY_URL: "x=y"}
    assert config.host == "127.0.0.1"  # untouched fields keep their defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1", "unknown key 'prot'; known keys: host, port, peers"),
        ('port = "80"', "port: must be an integer, got '80'"),
        ("port = true", "port: must be an integer, got True"),
        ("port = 70000", "port: must be at most 65535, got 70000"),
        ("max-subscriptions = -1", "max-subscriptions: must not be negative"),
        ("heartbeat_interval = nan", "heartbeat_interval: must be a finite number"),
        ('heartbeat_interval = "soon"', "cannot read 'soon' as seconds"),
        ('max_frame_size = "1 parsec"', "cannot read '1 parsec' as a size"),
        ('peers = "ws://a:1"', "peers: must be a list of strings"),
        ("peers = [1]", "peers: must be a list of strings"),
        ("peer_tokens = 3", "peer_tokens: must be a table"),
        ('[peer_tokens]\n"ws://a:1" = ""', "peer_tokens: must be a table of non-empty"),
        ("port = 1\nport = 2", "invalid TOML"),
        ("port = 1\n'port' = 2", "invalid TOML"),
        ("max_frame_size = 1\nmax-frame-size = 2", "'max_frame_size' is given twice"),
        ("max-frame_size = 1", "unknown key 'max-frame_size'"),
        ("port = ", "invalid TOML"),
    ],
)
def test_toml_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "conf").mkdir()
    path = write(tmp_path, text, "conf/dwsps.toml")
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_file_errors_show_the_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "prot = 1\n")
    monkeypatch.chdir(tmp_path.parent)
    relative = f"{tmp_path.name}/dwsps.toml"
    with pytest.raises(ConfigError, match=f"^{relative}: unknown key"):
        load_toml(relative)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read config file {tmp_path}/absent.toml"):
        load_toml(tmp_path / "absent.toml")


# -- environment ----------------------------------------------------------------


def test_environment_parsing() -> None:
    env = {
        "DWSPS_PORT": "9002",
        "DWSPS_PEERS": "ws://a:1, ws://b:2,",
        "DWSPS_PEER_TOKENS": f"{QUERY_URL}=tok, ws://b:2=z",
        "DWSPS_ACCEPT_PEER_TOKENS": "t1,t2",
        "DWSPS_HEARTBEAT_INTERVAL": "0.5",
        "DWSPS_MAX_FRAME_SIZE": "512KiB",
        "DWSPS_PEER_RECONNECT_MAX": "1m",
        "DWSPS_BACKPLANE": "redis://localhost:6379",
        "DWSPS_TEST_TIME_SCALE": "3",  # not a setting: ignored
        "PORT": "1",
    }
    assert load_env(env) == {
        "port": 9002,
        "peers": ["ws://a:1", "ws://b:2"],
        "peer_tokens": {QUERY_URL: "tok", "ws://b:2": "z"},
        "accept_peer_tokens": ["t1", "t2"],
        "heartbeat_interval": 0.5,
        "max_frame_size": 512 * 1024,
        "peer_reconnect_max": 60.0,
        "backplane": "redis://localhost:6379",
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DWSPS_PORT": "eighty"}, "environment DWSPS_PORT: cannot read 'eighty' as an integer"),
        ({"DWSPS_PORT": "-5"}, "environment DWSPS_PORT: must not be negative, got -5"),
        ({"DWSPS_HEARTBEAT_INTERVAL": "soon"}, "DWSPS_HEARTBEAT_INTERVAL: cannot read 'soon'"),
        ({"DWSPS_MAX_FRAME_SIZE": "1.5MiB"}, "DWSPS_MAX_FRAME_SIZE: cannot read '1.5MiB'"),
        ({"DWSPS_PEER_TOKENS": "ws://a:1"}, "DWSPS_PEER_TOKENS: wants KEY=VALUE"),
        ({"DWSPS_PEER_TOKENS": "ws://a:1="}, "DWSPS_PEER_TOKENS: wants KEY=VALUE"),
    ],
)
def test_environment_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_env(env)


# -- precedence and overrides ---------------------------------------------------


def test_precedence_toml_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "port = 1\nmax_topic_length = 10\nmax_topic_levels = 2\npeers = ['ws://toml:1']\n",
    )
    env = {"DWSPS_PORT": "2", "DWSPS_MAX_TOPIC_LENGTH": "20", "DWSPS_PEERS": "ws://env:1"}
    config = load_config(path, environ=env, overrides={"port": 3, "peers": ["ws://cli:1"]})
    assert config.port == 3  # option > env > file
    assert config.peers == ["ws://cli:1"]  # a list is replaced, not merged
    assert config.max_topic_length == 20  # env > file
    assert config.max_topic_levels == 2  # file > default
    assert config.max_subscriptions == ServerConfig().max_subscriptions


def test_overrides_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        load_config(environ={}, overrides={"nope": 1})
    with pytest.raises(ConfigError, match="setting port: must not be negative"):
        load_config(environ={}, overrides={"port": -1})


# -- human sizes and durations ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("1048576", 1048576), ("1MiB", 1048576), ("512 kib", 524288),
     ("2GB", 2_000_000_000), ("3KB", 3000), ("7B", 7), (" 1GiB ", 1 << 30)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2.5", 2.5), ("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), (".5", 0.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.5MiB", "1M", "1 parsec", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="as a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["", "s", "-1", "1d", "nan", "inf", "1e3"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="as seconds"):
        parse_duration(text)


# -- URL=TOKEN pairs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("ws://a:1=tok", ("ws://a:1", "tok")),
        (f"{QUERY_URL}=tok", (QUERY_URL, "tok")),
        ("ws://h/?a=b&c=d=tok", ("ws://h/?a=b&c=d", "tok")),
    ],
)
def test_pairs_split_at_the_last_equals(text: str, pair: tuple[str, str]) -> None:
    assert split_pair(text) == pair


@given(
    url=st.text(st.characters(exclude_characters=","), min_size=1).filter(str.strip),
    token=st.text(st.characters(exclude_characters="=,"), min_size=1).filter(str.strip),
)
def test_any_url_keeps_its_token(url: str, token: str) -> None:
    assert split_pair(f"{url}={token}") == (url.strip(), token.strip())
    pairs = load_env({"DWSPS_PEER_TOKENS": f"{url}={token}"})["peer_tokens"]
    assert pairs == {url.strip(): token.strip()}


def test_peer_token_flag_with_a_query_string() -> None:
    flags = serve_flags("--peer-token", f"{QUERY_URL}=tok", "--peer-token", "ws://b:2=z")
    assert flags == {"peer_tokens": {QUERY_URL: "tok", "ws://b:2": "z"}}


@pytest.mark.parametrize("bad", ["no-equals-sign", "ws://a:1=", "=tok"])
def test_peer_token_flag_rejects(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        serve_flags("--peer-token", bad)
    assert info.value.code == 2
    assert "argument --peer-token: wants KEY=VALUE" in capsys.readouterr().err


def test_a_token_ending_in_equals_is_sent_to_the_toml_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        serve_flags("--peer-token", "ws://a:1/?x=1=dG9rZW4=")
    assert "a VALUE that contains '=' must be given in the TOML file" in capsys.readouterr().err


# -- every setting: a flag, a variable and a TOML key that agree ---------------


def sample(s: Setting) -> tuple[Any, str, list[str], list[str]]:
    """A non-default value of ``s`` and its TOML text, env text and flag arguments."""
    if s.kind == "bool":
        value = not s.default
        flag = s.flag if value else "--no-" + s.flag[2:]
        return value, json.dumps(value), [str(value).lower()], [flag]
    if s.kind in ("int", "float"):
        value = s.default + 1
        return value, str(value), [str(value)], [s.flag, str(value)]
    if s.kind == "str":
        value = s.default + "x"
        return value, json.dumps(value), [value], [s.flag, value]
    if s.kind == "list":
        items = ["ws://a:1", "ws://b:2"]
        return (
            items,
            json.dumps(items),
            [",".join(items)],
            [arg for item in items for arg in (s.flag, item)],
        )
    pairs = {QUERY_URL: "tok", "ws://b:2": "z"}
    table = "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in pairs.items()) + "}"
    texts = [f"{k}={v}" for k, v in pairs.items()]
    return pairs, table, [",".join(texts)], [arg for t in texts for arg in (s.flag, t)]


def test_every_field_is_a_setting() -> None:
    assert [s.name for s in SETTINGS] == [f.name for f in dataclasses.fields(ServerConfig)]
    assert len({s.flag for s in SETTINGS}) == len(SETTINGS)
    assert {s.kind for s in SETTINGS} <= {"bool", "int", "float", "str", "list", "dict"}  # sample()


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s.name)
def test_flag_env_and_toml_give_the_same_value(s: Setting, tmp_path: Path) -> None:
    value, toml_text, (env_text,), argv = sample(s)
    assert value != s.default
    snake, kebab = s.toml_keys
    assert snake == s.name
    from_toml = load_config(write(tmp_path, f"{snake} = {toml_text}\n"), environ={})
    from_kebab = load_config(write(tmp_path, f"{kebab} = {toml_text}\n", "k.toml"), environ={})
    from_env = load_config(environ={s.env: env_text})
    from_flag = load_config(environ={}, overrides=serve_flags(*argv))
    for config in (from_toml, from_kebab, from_env, from_flag):
        assert getattr(config, s.name) == value
        assert dataclasses.replace(config, **{s.name: s.default}) == ServerConfig()


SWITCH = Setting(
    name="tcp_nodelay",
    kind="bool",
    default=True,
    help="set TCP_NODELAY",
    metavar=None,
    flag="--tcp-nodelay",
    parse=None,
    maximum=None,
)
"""ServerConfig has no bool yet: a stand-in to check that one would work everywhere."""


def test_a_bool_setting_gets_a_switch() -> None:
    parser = argparse.ArgumentParser(prog="x")
    add_flags(parser, [SWITCH])
    values = [flag_values(parser.parse_args(argv), [SWITCH]) for argv in ([], ["--no-tcp-nodelay"])]
    assert values == [{}, {"tcp_nodelay": False}]
    text = " ".join(parser.format_help().split())
    assert "--tcp-nodelay, --no-tcp-nodelay set TCP_NODELAY (default: true)" in text
    assert SWITCH.from_text("off") is False
    assert SWITCH.from_text("YES") is True
    with pytest.raises(ValueError, match="true or false"):
        SWITCH.from_text("maybe")
    with pytest.raises(ValueError, match="must be true or false"):
        SWITCH.check(1)


def test_flags_not_given_leave_no_override() -> None:
    assert serve_flags() == {}
    assert serve_flags("--port", "0") == {"port": 0}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "eighty"], "argument --port: cannot read 'eighty' as an integer"),
        (["--port", "70000"], "argument --port: must be at most 65535"),
        (["--max-frame-size", "-1"], "argument --max-frame-size: cannot read '-1' as a size"),
        (["--heartbeat-interval", "-1"], "argument --heartbeat-interval: cannot read '-1'"),
    ],
)
def test_bad_flag_values_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        serve_flags(*argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_human_forms_on_flags() -> None:
    config = load_config(
        environ={}, overrides=serve_flags("--max-frame-size", "2MiB", "--close-timeout", "250ms")
    )
    assert (config.max_frame_size, config.close_timeout) == (2 * 1024 * 1024, 0.25)


# -- --help ---------------------------------------------------------------------


def serve_help() -> str:
    parser = argparse.ArgumentParser(prog="x")
    add_flags(parser)
    return " ".join(parser.format_help().split())


def test_help_shows_each_setting_with_its_default_once() -> None:
    text = serve_help()
    assert text.count("default:") == len(SETTINGS)
    for s in SETTINGS:
        repeatable = "repeatable, " if s.kind in ("list", "dict") else ""
        flag = f"{s.flag}, --no-{s.flag[2:]}" if s.kind == "bool" else f"{s.flag} {s.metavar}"
        entry = f"{flag} {s.help} ({repeatable}default: {s.shown_default()})"
        assert text.count(entry) == 1, entry


def test_help_defaults_are_the_dataclass_defaults() -> None:
    text = serve_help()
    assert "--max-frame-size BYTES" in text
    assert "(default: 1048576)" in text
    assert "(default: 10.0)" in text  # heartbeat_interval
    assert "--peer URL forward organic publishes" in text
    assert "(repeatable, default: none)" in text


def test_serve_help_epilog_names_the_environment_and_the_renamed_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "DWSPS_MAX_FRAME_SIZE" in text
    assert "--peer is peers, --peer-token is peer_tokens, --accept-peer-token is" in text
    assert "split at its last '='" in text
