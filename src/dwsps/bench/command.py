"""``dwsps bench``: the command line, the table and the JSON file.

Like ``nats bench``: point it at a server, pick a scenario, read the table.
The scenarios live in :mod:`dwsps.bench.scenarios`.

The load comes from this one Python process. It parses and checks every
delivery, which costs a few microseconds each, so it tops out at a few
hundred thousand deliveries per second: far below what the server can send.
``clientCpu`` near 1.0 means the client, not the server, set the figure. For
the server's limit use the C load generator (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson
from picows import WSError

from dwsps import loop
from dwsps.bench.client import probe
from dwsps.bench.scenarios import RUNNERS, SCENARIOS, Params
from dwsps.errors import TokenSourceError
from dwsps.redact import redact
from dwsps.tokens import add_token_options, token_from_args

_DEFAULT_SUBS = {"fanout": 100, "peered": 100, "latency": 100, "connections": 1000}
_FAILURES = (OSError, TimeoutError, WSError, RuntimeError)
"""What a scenario raises when the server is unreachable or misbehaves, not a bug of ours."""


def _pids(text: str) -> list[int]:
    try:
        pids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants PID[,PID...], got {text!r}") from None
    if any(pid <= 0 for pid in pids):
        raise argparse.ArgumentTypeError(f"wants positive process ids, got {text!r}")
    return pids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``dwsps bench`` options on ``parser``."""
    parser.description = (
        "Measure a running dwsps server. Every delivery is checked for loss and order. "
        "One Python process cannot receive millions of frames per second: when "
        "clientCpu is near 1.0 the client was the limit, not the server."
    )
    parser.add_argument(
        "scenario",
        nargs="?",
        default="fanout",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help=f"{', '.join(SCENARIOS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--url",
        metavar="URL",
        default="ws://127.0.0.1:8000",
        help="server the subscribers use (default: %(default)s)",
    )
    parser.add_argument(
        "--pub-url",
        metavar="URL",
        help="server the publisher uses (peered: server A; default: --url)",
    )
    parser.add_argument(
        "--subs",
        metavar="N",
        type=int,
        help="subscribers, or idle connections for the connections scenario (default:"
        f" {_DEFAULT_SUBS['fanout']}; connections: {_DEFAULT_SUBS['connections']})",
    )
    parser.add_argument(
        "--topic",
        metavar="TOPIC",
        default="bench",
        help="subscription topic; publishes go to TOPIC.x (default: %(default)s)",
    )
    parser.add_argument(
        "--payload",
        metavar="BYTES",
        type=int,
        default=100,
        help="approx. message size in bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--inflight",
        metavar="N",
        type=int,
        default=200,
        help="fanout: max publishes outstanding (default: %(default)s)",
    )
    parser.add_argument(
        "--flow",
        choices=("e2e", "ack"),
        default="e2e",
        help="fanout: a publish completes when every subscriber has it (e2e) or on its ack"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        metavar="SECONDS",
        type=float,
        default=1.0,
        help="seconds before measuring (default: %(default)s)",
    )
    parser.add_argument(
        "--duration",
        metavar="SECONDS",
        type=float,
        default=5.0,
        help="seconds measured (default: %(default)s)",
    )
    parser.add_argument(
        "--rate",
        metavar="PER_SEC",
        type=float,
        default=500.0,
        help="latency: publishes per second (default: %(default)s)",
    )
    parser.add_argument(
        "--drain",
        metavar="SECONDS",
        type=float,
        default=5.0,
        help="max seconds to wait for stragglers (default: %(default)s)",
    )
    parser.add_argument(
        "--settle",
        metavar="SECONDS",
        type=float,
        default=1.0,
        help="connections: wait before reading RSS (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=int,
        default=100,
        help="connections opened at once (default: %(default)s)",
    )
    parser.add_argument(
        "--server-pid",
        type=_pids,
        default=[],
        metavar="PID[,PID]",
        help="the server process(es): CPU use and memory from /proc (same host)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_token_options(parser)


def params_from_args(args: argparse.Namespace) -> Params:
    """Turn parsed options into scenario :class:`Params`."""
    scenario: str = args.scenario
    return Params(
        scenario=scenario,
        url=args.url,
        pub_url=args.pub_url,
        subs=args.subs if args.subs is not None else _DEFAULT_SUBS[scenario],
        topic=args.topic,
        payload=args.payload,
        inflight=args.inflight,
        flow=args.flow,
        warmup=args.warmup,
        duration=args.duration,
        rate=args.rate,
        drain=args.drain,
        settle=args.settle,
        concurrency=args.concurrency,
        server_pids=list(args.server_pid),
        progress=not args.quiet,
        token=token_from_args(args),
    )


def _fail(message: str) -> int:
    print(f"dwsps bench: {message}", file=sys.stderr, flush=True)
    return 1


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def run(args: argparse.Namespace) -> int:
    """Run ``dwsps bench``; print the table; return 0, or 1 if anything was lost or reordered."""
    if args.scenario == "peered" and not args.pub_url:
        print(
            "dwsps bench: peered needs --pub-url (server A) and --url (its peer B)", file=sys.stderr
        )
        return 2
    try:
        params = params_from_args(args)
    except TokenSourceError as exc:
        return _fail(str(exc))
    result = loop.run(_measure(params))
    if isinstance(result, str):
        return _fail(result)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.write(format_table(result))
    return 0 if is_clean(result) else 1


async def _measure(params: Params) -> dict[str, Any] | str:
    """The scenario's result, or why there is none."""
    # One connection per server first: an unreachable server is one line, not
    # a failure per subscriber and then a traceback.
    for url in dict.fromkeys([params.url, params.pub_url or params.url]):
        try:
            await probe(url, params.setup_timeout, params.token)
        except _FAILURES as exc:
            return f"cannot connect to {redact(url)}: {_reason(exc)}"
    try:
        return await RUNNERS[params.scenario](params)
    except _FAILURES as exc:
        return f"{params.scenario} failed: {_reason(exc)}"


def is_clean(result: dict[str, Any]) -> bool:
    """No loss, reordering, closed subscriber or failed connection."""
    keys = ("lost", "outOfOrder", "subsClosed", "subsFailed", "failed")
    return not any(result.get(k) for k in keys)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "-"
    if value is None:
        return "-"
    return str(value)


_ROWS: dict[str, list[tuple[str, str]]] = {
    "fanout": [
        ("deliveriesPerSec", "deliveries/s"),
        ("publishesPerSec", "publishes/s"),
        ("deliveriesPerPublish", "deliveries per publish"),
        ("totalPublished", "published"),
        ("totalDelivered", "delivered"),
        ("drainStoppedBy", "drain"),
    ],
    "latency": [
        ("achievedPublishRate", "publishes/s"),
        ("p50ms", "p50 ms"),
        ("p90ms", "p90 ms"),
        ("p99ms", "p99 ms"),
        ("maxms", "max ms"),
        ("totalPublished", "published"),
        ("totalDelivered", "delivered"),
    ],
    "connections": [
        ("connections", "connections"),
        ("kbPerConnection", "server KB per connection"),
        ("serverRssBeforeKB", "server RSS before (KB)"),
        ("serverRssAfterKB", "server RSS after (KB)"),
        ("connectsPerSec", "connects/s"),
        ("liveConnections", "passed the liveness check"),
    ],
}
_COMMON = [
    ("lost", "lost"),
    ("outOfOrder", "out of order / repeated"),
    ("subsClosed", "subscribers closed by server"),
    ("serverCpu", "server CPU (cores)"),
    ("clientCpu", "client CPU (cores)"),
]


def format_table(result: dict[str, Any]) -> str:
    """The result as a two-column text table."""
    scenario = result["scenario"]
    rows = [("scenario", scenario), ("url", result["url"])]
    if result.get("pubUrl") != result["url"]:
        rows.append(("publisher url", result["pubUrl"]))
    if scenario != "connections":
        rows.append(("subscribers", _fmt(result.get("subscribers"))))
    for key, label in _ROWS["fanout" if scenario == "peered" else scenario] + _COMMON:
        if key in result:
            rows.append((label, _fmt(result[key])))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    client = result.get("clientCpu")
    if isinstance(client, float) and client >= 0.9:
        lines.append("note: the client used a whole core; the server may be capable of more")
    if not is_clean(result):
        lines.append("LOSS OR DISORDER: see the JSON (errors, closeCodes, failureSample)")
    return "\n".join(lines) + "\n"
