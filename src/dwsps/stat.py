"""``dwsps stat``: a live view of a server, from successive ``GET /health`` polls.

The health document has the server's counters; rates are the difference of
two polls over the time between them, so nothing on the server keeps rates.
The ``/health`` URL is derived from the server's WebSocket URL (``ws://`` →
``http://``, ``wss://`` → ``https://``, same host and port).

On a terminal the view is redrawn in place every ``--interval``; otherwise
(a pipe, a file) each sample is one line of ``key=value`` pairs, and
``--once`` measures over one interval, prints one sample and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TextIO
from urllib.parse import urlsplit, urlunsplit

import orjson

from dwsps.redact import redact

DEFAULT_URL: Final = "ws://127.0.0.1:8000"
RATED: Final = ("publishes", "deliveries", "errors_sent", "connections_total")
"""Counters shown as per-second rates."""
_HTTP_SCHEMES: Final = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
_MAX_BODY: Final = 16 * 1024 * 1024

HOME: Final = "\x1b[H"
CLEAR_LINE: Final = "\x1b[K"
CLEAR_BELOW: Final = "\x1b[J"
CLEAR_SCREEN: Final = "\x1b[2J"


def health_url(url: str) -> str:
    """The ``/health`` URL of the server at ``url`` (ws, wss, http or https)."""
    parts = urlsplit(url)
    scheme = _HTTP_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"not a ws://, wss://, http:// or https:// URL: {url}")
    return urlunsplit((scheme, parts.netloc, "/health", "", ""))


@dataclass(frozen=True, slots=True)
class Sample:
    """One poll of ``/health``."""

    at: float
    """``time.monotonic()`` when the answer arrived."""
    server_id: str
    status: str
    connections: int
    subscriptions: int
    counters: Mapping[str, int]
    peers: tuple[tuple[str, str], ...]
    """(url, state) per peer link."""
    backplane: tuple[str, str] | None
    """(url, state) of the backplane, if the server has one."""


def parse_health(doc: Mapping[str, Any], at: float) -> Sample:
    """A :class:`Sample` from a health document; ValueError if it is not one."""
    try:
        stats = doc["stats"]
        counters = {k: v for k, v in stats.items() if isinstance(v, int)}
        peers = tuple((str(p["url"]), str(p["state"])) for p in doc.get("peers", []))
        plane = doc.get("backplane")
        backplane = None if plane is None else (str(plane["url"]), str(plane["state"]))
        return Sample(
            at,
            str(doc["server_id"]),
            str(doc["status"]),
            int(doc["connections"]),
            int(doc["subscriptions"]),
            counters,
            peers,
            backplane,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a dwsps /health document (missing {exc})") from None


def rates(previous: Sample | None, current: Sample) -> dict[str, float | None]:
    """Per-second rates of the :data:`RATED` counters; None where unknown.

    Unknown: on the first sample, after the server restarted (a new server id,
    or a counter that went down) and when no time passed.
    """
    out: dict[str, float | None] = dict.fromkeys(RATED)
    if previous is None or previous.server_id != current.server_id:
        return out
    elapsed = current.at - previous.at
    if elapsed <= 0:
        return out
    for key in RATED:
        before, now = previous.counters.get(key), current.counters.get(key)
        if before is not None and now is not None and now >= before:
            out[key] = (now - before) / elapsed
    return out


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_line(sample: Sample, rate: Mapping[str, float | None], when: datetime) -> str:
    """One sample as ``key=value`` pairs on one line (for pipes and files)."""
    c = sample.counters
    fields = [
        when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        f"status={sample.status}",
        f"connections={sample.connections}",
        f"subscriptions={sample.subscriptions}",
        f"publishes={c.get('publishes', 0)}",
        f"publishes/s={_rate(rate['publishes'])}",
        f"deliveries={c.get('deliveries', 0)}",
        f"deliveries/s={_rate(rate['deliveries'])}",
        f"errors={c.get('errors_sent', 0)}",
        f"errors/s={_rate(rate['errors_sent'])}",
    ]
    if sample.peers:
        up = sum(state == "up" for _, state in sample.peers)
        fields.append(f"peers_up={up}/{len(sample.peers)}")
    if sample.backplane is not None:
        fields.append(f"backplane={sample.backplane[1]}")
    return " ".join(fields)


def format_block(
    url: str, sample: Sample, rate: Mapping[str, float | None], when: datetime
) -> list[str]:
    """One sample as the lines of the terminal view."""
    c = sample.counters
    lines = [
        f"dwsps {url}  server {sample.server_id}  {sample.status}"
        f"  {when.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        "",
        f"  connections     {sample.connections:>12,}"
        f"   opened {_rate(rate['connections_total'])}/s",
        f"  subscriptions   {sample.subscriptions:>12,}",
        f"  publishes/s     {_rate(rate['publishes']):>12}   total {c.get('publishes', 0):,}",
        f"  deliveries/s    {_rate(rate['deliveries']):>12}   total {c.get('deliveries', 0):,}",
        f"  errors/s        {_rate(rate['errors_sent']):>12}   total {c.get('errors_sent', 0):,}",
    ]
    for peer_url, state in sample.peers:
        lines.append(f"  peer            {state:>12}   {peer_url}")
    if sample.backplane is not None:
        plane_url, state = sample.backplane
        lines.append(f"  backplane       {state:>12}   {plane_url}")
    return lines


def fetch(url: str, timeout: float, key: str = "") -> dict[str, Any]:
    """The health document at ``url``: also on 503, which a degraded server answers.

    ``key`` is sent as ``Authorization: Bearer`` (a server with a status key
    shows its details only then)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as answer:
            body = answer.read(_MAX_BODY)
    except urllib.error.HTTPError as exc:
        if exc.code != 503:
            raise OSError(f"HTTP {exc.code} {exc.reason}") from None
        body = exc.read(_MAX_BODY)
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("the answer is not JSON: is this a dwsps server?") from None
    if not isinstance(doc, dict):
        raise ValueError("the answer is not a JSON object: is this a dwsps server?")
    if "stats" not in doc and "status" in doc:
        raise ValueError(
            "the server shows only its status: give its status key with --key or $DWSPS_STATUS_KEY"
        )
    return doc


def poll(url: str, timeout: float, key: str = "") -> Sample:
    """Fetch and parse one sample (OSError, ValueError)."""
    doc = fetch(url, timeout, key)
    return parse_health(doc, time.monotonic())


# -- the command ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dwsps stat`` options."""
    parser.add_argument(
        "url",
        metavar="URL",
        nargs="?",
        default=os.environ.get("DWSPS_URL", DEFAULT_URL),
        help=f"the server's WebSocket URL (default: {DEFAULT_URL}, or $DWSPS_URL)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between two polls (default: %(default)s)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="measure over one interval, print one sample and exit",
    )
    parser.add_argument(
        "--key",
        default=os.environ.get("DWSPS_STATUS_KEY", ""),
        metavar="KEY",
        help="the server's status key (or API key), if it has one (default: $DWSPS_STATUS_KEY)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="HTTP timeout of one poll (default: %(default)s)",
    )


def _fail(err: object) -> int:
    print(f"dwsps stat: {err}", file=sys.stderr, flush=True)
    return 1


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``dwsps stat``; return the exit code."""
    stream = out or sys.stdout
    if not args.interval > 0 or not args.timeout > 0:
        return _fail("--interval and --timeout must be positive")
    try:
        url = health_url(args.url)
    except ValueError as exc:
        return _fail(exc)
    try:
        if args.once:
            return _once(args, url, stream)
        _watch(args, url, stream)
    except KeyboardInterrupt:
        stream.write("\n")
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); not an error for us.
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    return 0


def _once(args: argparse.Namespace, url: str, stream: TextIO) -> int:
    try:
        first = poll(url, args.timeout, args.key)
        time.sleep(args.interval)
        sample = poll(url, args.timeout, args.key)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read {redact(url)}: {exc}")
    rate = rates(first, sample)
    now = datetime.now(UTC)
    if stream.isatty():
        stream.write("\n".join(format_block(redact(args.url), sample, rate, now)) + "\n")
    else:
        stream.write(format_line(sample, rate, now) + "\n")
    stream.flush()
    return 0


def _watch(args: argparse.Namespace, url: str, stream: TextIO) -> None:
    tty = stream.isatty()
    if tty:
        stream.write(CLEAR_SCREEN)
    previous: Sample | None = None
    while True:
        started = time.monotonic()
        now = datetime.now(UTC)
        try:
            sample = poll(url, args.timeout, args.key)
        except (OSError, ValueError) as exc:
            previous = None  # no rate across an outage: the server may have restarted
            lines = [f"{now:%Y-%m-%dT%H:%M:%SZ} cannot read {redact(url)}: {exc}"]
        else:
            rate = rates(previous, sample)
            previous = sample
            if tty:
                lines = format_block(redact(args.url), sample, rate, now)
            else:
                lines = [format_line(sample, rate, now)]
        if tty:
            stream.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW)
        else:
            stream.write(lines[0] + "\n")
        stream.flush()
        time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
