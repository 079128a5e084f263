"""The ``dwsps`` command: ``serve``, ``pub``, ``sub`` and ``bench``.

``dwsps serve`` builds its :class:`~dwsps.config.ServerConfig` from defaults <
``--config`` TOML file < ``DWSPS_<FIELD>`` environment variables < options
(one per setting, generated from the dataclass: see :mod:`dwsps.config`),
prints ``dwsps listening on ws://HOST:PORT`` once it accepts connections, and
shuts down gracefully (clients get 1001) on SIGTERM or SIGINT, exiting 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import orjson

from dwsps import __version__
from dwsps.bench import command as bench_command
from dwsps.client import Client
from dwsps.config import add_flags, flag_values, load_config, sources_help
from dwsps.errors import ConfigError, DwspsError, RequestError
from dwsps.loop import run
from dwsps.server import Server

DEFAULT_URL = "ws://127.0.0.1:8000"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dwsps`` command."""
    parser = argparse.ArgumentParser(
        prog="dwsps", description="Distributed publish/subscribe over WebSockets."
    )
    parser.add_argument("--version", action="version", version=f"dwsps {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run a dwsps server",
        description="Run a dwsps server until SIGTERM or SIGINT.",
        epilog=sources_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(serve, title="settings (also in --config and DWSPS_*, see below)")
    serve.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("DWSPS_CONFIG"),
        help="TOML settings file (default: $DWSPS_CONFIG)",
    )
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=os.environ.get("DWSPS_LOG_LEVEL", "info").lower(),
        help="what the server logs (default: info, or $DWSPS_LOG_LEVEL)",
    )
    serve.set_defaults(func=_serve)

    pub = sub.add_parser(
        "pub",
        help="publish one message",
        description="Publish MESSAGE to TOPIC and print the server's ack as JSON.",
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("message", metavar="MESSAGE", help="JSON if it parses, else a string")
    _client_options(pub)
    pub.set_defaults(func=_pub)

    subp = sub.add_parser(
        "sub",
        help="print deliveries",
        description="Subscribe to TOPICs and print one JSON delivery per line until"
        " interrupted. A line on stderr says when every subscription is in place.",
    )
    subp.add_argument("topics", metavar="TOPIC", nargs="+")
    subp.add_argument("--count", type=int, metavar="N", help="exit after N deliveries")
    _client_options(subp)
    subp.set_defaults(func=_sub)

    bench = sub.add_parser("bench", help="run a load scenario")
    bench_command.add_arguments(bench)
    bench.set_defaults(func=bench_command.run)
    return parser


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("DWSPS_URL", DEFAULT_URL),
        help=f"server URL (default: {DEFAULT_URL}, or $DWSPS_URL)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="reply timeout (default: %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the ``dwsps`` command line; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return func(args)


def _on_stop_signals(callback: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(sig, callback)


def _fail(command: str, err: object) -> int:
    print(f"dwsps {command}: {err}", file=sys.stderr, flush=True)
    return 1


# -- serve ------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    if args.log_level not in LOG_LEVELS:  # a bad $DWSPS_LOG_LEVEL bypasses choices
        return _fail("serve", f"log level must be one of {', '.join(LOG_LEVELS)}")
    try:
        config = load_config(args.config, overrides=flag_values(args))
    except ConfigError as exc:
        return _fail("serve", exc)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.log_level != "debug":
        # picows logs every connection at INFO: too chatty for a server's log.
        logging.getLogger("picows").setLevel(logging.WARNING)
    return run(_serve_async(Server(config)))


async def _serve_async(server: Server) -> int:
    try:
        await server.start()
    except OSError as exc:
        await server.close()
        return _fail("serve", f"cannot listen on {server.config.host}:{server.config.port}: {exc}")
    except ValueError as exc:  # e.g. a backplane URL it cannot use
        await server.close()
        return _fail("serve", exc)
    stop = asyncio.Event()
    _on_stop_signals(stop.set)
    try:
        print(f"dwsps listening on {server.url}", flush=True)
        await stop.wait()
    finally:
        await server.close()
    return 0


# -- pub and sub ------------------------------------------------------------


def _parse_message(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _json_line(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _pub(args: argparse.Namespace) -> int:
    return run(_pub_async(args))


async def _pub_async(args: argparse.Namespace) -> int:
    client = Client(args.url, reconnect=False, request_timeout=args.timeout, queue_size=0)
    try:
        async with client:
            ack = await client.publish(args.topic, _parse_message(args.message))
    except RequestError as exc:
        return _fail("pub", _json_line(exc.reply))
    except DwspsError as exc:
        return _fail("pub", exc)
    print(_json_line(ack), flush=True)
    return 0


def _sub(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        return _fail("sub", "--count must be at least 1")
    return run(_sub_async(args))


async def _sub_async(args: argparse.Namespace) -> int:
    client = Client(args.url, request_timeout=args.timeout)
    received = 0
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        # Closing ends the async-for below, so a signal means a clean exit.
        if not stopping:
            stopping.append(asyncio.create_task(client.close()))

    try:
        async with client:
            _on_stop_signals(stop)
            for topic in args.topics:
                await client.subscribe(topic)
            print(f"dwsps sub: subscribed to {' '.join(args.topics)}", file=sys.stderr, flush=True)
            async for delivery in client:
                sys.stdout.write(_json_line(delivery) + "\n")
                sys.stdout.flush()
                received += 1
                if args.count is not None and received >= args.count:
                    break
    except RequestError as exc:
        return _fail("sub", _json_line(exc.reply))
    except DwspsError as exc:
        if stopping:  # interrupted while subscribing
            return 0
        return _fail("sub", exc)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); not an error for us.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
