"""The ``dwsps`` command: ``serve``, ``pub``, ``sub``, ``stat``, ``bench`` and ``token``.

``dwsps serve`` builds its :class:`~dwsps.config.ServerConfig` from defaults <
``--config`` TOML file < ``DWSPS_<FIELD>`` environment variables < options
(one per setting, generated from the dataclass: see :mod:`dwsps.config`),
checks it (:func:`~dwsps.startup.check_startup`: one line naming the bad
setting, exit 1), prints ``dwsps listening on ws://HOST:PORT`` once it accepts
connections, and shuts down gracefully (clients get 1001) on SIGTERM or
SIGINT, exiting 0. It logs to stderr as text or, with ``--log-format json``,
one JSON object per line (:mod:`dwsps.logs`).

``dwsps pub`` publishes one message (an argument, or stdin with ``-``) or, with
``--lines``, each line of stdin as it arrives. ``dwsps sub`` prints deliveries
and says on stderr when it lost the connection, when it is back, and when
messages published meanwhile could not be recovered (history).
``dwsps stat`` is :mod:`dwsps.stat`. ``pub`` and ``sub`` (and ``bench``) present a
token from ``--token``, ``--token-file`` or ``$DWSPS_TOKEN``; ``dwsps token``
signs one for testing (both in :mod:`dwsps.tokens`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any, Final

import orjson

from dwsps import __version__, build, tokens
from dwsps import stat as stat_command
from dwsps.bench import command as bench_command
from dwsps.client import NO_RECONNECT_CODES, Client
from dwsps.config import add_flags, flag_values, load_config, setting_source, sources_help
from dwsps.errors import (
    AckTimeout,
    CloseCode,
    ConfigError,
    ConnectionLost,
    DwspsError,
    LineTooLong,
    RequestError,
    SettingError,
    TokenSourceError,
)
from dwsps.logs import LOG_FORMATS, configure
from dwsps.loop import run
from dwsps.server import Server
from dwsps.startup import check_startup
from dwsps.stdin import StdinLines
from dwsps.workers import Supervisor, Worker

DEFAULT_URL = "ws://127.0.0.1:8000"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_LIMIT_IN_REASON: Final = re.compile(r"(?:>|limit)\s*(\d+)")
"""The server's size limit in a 1009 close reason ("... 389 > 100" from picows)."""

log = logging.getLogger("dwsps.cli")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dwsps`` command."""
    parser = argparse.ArgumentParser(
        prog="dwsps", description="Distributed publish/subscribe over WebSockets."
    )
    parser.add_argument(
        "--version", action="version", version=f"dwsps {__version__} ({build.describe()})"
    )
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
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("DWSPS_LOG_FORMAT", "text").lower(),
        help="text, or json: one JSON object per line for log shippers"
        " (default: text, or $DWSPS_LOG_FORMAT)",
    )
    serve.set_defaults(func=_serve)

    pub = sub.add_parser(
        "pub",
        help="publish a message, or each line of stdin",
        description="Publish MESSAGE to TOPIC and print the server's ack as JSON. With"
        " --lines, publish each line of stdin as it arrives (tail -f app.log | dwsps pub"
        " logs --lines) and report a summary on stderr at the end.",
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument(
        "message",
        metavar="MESSAGE",
        nargs="?",
        help="JSON if it parses, else a string; - reads the message from stdin",
    )
    pub.add_argument(
        "--lines",
        action="store_true",
        help="publish each line of stdin (JSON if it parses, else a string; blank lines"
        " are skipped) until end of input or a signal",
    )
    _client_options(pub)
    pub.set_defaults(func=_pub)

    subp = sub.add_parser(
        "sub",
        help="print deliveries",
        description="Subscribe to TOPICs and print one JSON delivery per line until"
        " interrupted. Lines on stderr say when every subscription is in place, when the"
        " connection was lost and when it is back.",
    )
    subp.add_argument("topics", metavar="TOPIC", nargs="+")
    subp.add_argument("--count", type=int, metavar="N", help="exit after N deliveries")
    _client_options(subp)
    subp.set_defaults(func=_sub)

    stat = sub.add_parser(
        "stat",
        help="watch a server's connections, subscriptions and rates",
        description="A live view of the server at URL from its /health endpoint:"
        " connections, subscriptions, publishes/s, deliveries/s and errors/s, redrawn in"
        " place on a terminal, one line per sample otherwise.",
    )
    stat_command.add_arguments(stat)
    stat.set_defaults(func=stat_command.run)

    bench = sub.add_parser("bench", help="run a load scenario")
    bench_command.add_arguments(bench)
    bench.set_defaults(func=bench_command.run)

    token = sub.add_parser("token", help="sign a JWT for testing")
    tokens.add_arguments(token)
    token.set_defaults(func=tokens.run)
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
    tokens.add_token_options(parser)


def _client(args: argparse.Namespace, command: str, **options: Any) -> Client | None:
    """The command's client with the token it presents, or None (said on stderr)."""
    try:
        token = tokens.token_from_args(args)
    except TokenSourceError as exc:
        _say(command, str(exc))
        return None
    provider = tokens.token_file_provider(args)
    return Client(
        args.url, request_timeout=args.timeout, token=token, token_provider=provider, **options
    )


def main(argv: list[str] | None = None) -> int:
    """Run the ``dwsps`` command line; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = list(argv if argv is not None else sys.argv[1:])
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return func(args)


def _on_stop_signals(callback: Callable[[signal.Signals], object]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(sig, callback, sig)


def _fail(command: str, err: object) -> int:
    _say(command, str(err))
    return 1


# -- serve ------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    # A bad $DWSPS_LOG_LEVEL or $DWSPS_LOG_FORMAT bypasses choices.
    if args.log_level not in LOG_LEVELS:
        return _fail("serve", f"log level must be one of {', '.join(LOG_LEVELS)}")
    if args.log_format not in LOG_FORMATS:
        return _fail("serve", f"log format must be one of {', '.join(LOG_FORMATS)}")
    flags = flag_values(args)
    try:
        worker = Worker.from_env()
    except ValueError as exc:
        return _fail("serve", exc)
    configure(args.log_level, args.log_format)
    if args.log_level != "debug":
        # picows logs every connection at INFO: too chatty for a server's log.
        logging.getLogger("picows").setLevel(logging.WARNING)
    try:
        config = load_config(args.config, overrides=flags)
        check_startup(config)
        server = None if config.workers > 1 and worker is None else Server(config, worker=worker)
    except ConfigError as exc:
        return _fail("serve", _where(exc, args.config, flags))
    if server is None:
        return run(Supervisor(_serve_args(args.argv), config, config.workers).run())
    return run(_serve_async(server, worker, lambda exc: _where(exc, args.config, flags)))


def _where(exc: ConfigError, path: str | None, flags: dict[str, Any]) -> str:
    """``exc``, naming the TOML file or the variable when its setting came from there."""
    if not isinstance(exc, SettingError):
        return str(exc)
    source = setting_source(exc.setting, path, overrides=flags)
    return str(exc) if source is None else f"{source}: {exc.problem}"


def _serve_args(argv: list[str]) -> list[str]:
    """What followed ``serve`` on the command line (repeated for every worker)."""
    return argv[argv.index("serve") + 1 :]


async def _serve_async(
    server: Server, worker: Worker | None, describe: Callable[[ConfigError], str]
) -> int:
    try:
        await server.start()  # cleans up after itself when it fails
    except ConfigError as exc:  # what check_startup cannot know before starting: the port
        return _fail("serve", describe(exc))
    stop = asyncio.Event()
    signals: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        signals.append(sig)
        stop.set()

    _on_stop_signals(on_signal)
    if worker is not None:
        _stop_with_supervisor(lambda: on_signal(signal.SIGHUP))
    try:
        print(f"dwsps listening on {server.url}", flush=True)
        await stop.wait()
        log.info(
            "%s: shutting down, closing %d connection(s)", signals[0].name, len(server.connections)
        )
    finally:
        await server.close()
    log.info("dwsps server %s stopped", server.server_id)
    return 0


def _stop_with_supervisor(stop: Callable[[], None]) -> None:
    """A worker stops when its supervisor's end of the stdin pipe closes (it died)."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            log.warning("the supervisor is gone: stopping")
            stop()

    os.set_blocking(0, False)
    loop.add_reader(0, readable)


# -- pub and sub ------------------------------------------------------------


def _parse_message(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text.decode(errors="replace") if isinstance(text, bytes) else text


def _json_line(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _too_large(code: int | None, reason: str) -> str | None:
    """What a 1009 close means for the publisher, or None for another close."""
    if code != CloseCode.MESSAGE_TOO_BIG:
        return None
    found = _LIMIT_IN_REASON.search(reason)
    limit = f"limit {found.group(1)} bytes" if found else "larger than the server accepts"
    return f"message too large ({limit})"


def _report_connection(client: Client, command: str) -> Callable[[], None]:
    """Say on stderr when ``client`` loses its connection and when it is back.

    Returns the function that silences it (call it before closing on purpose).
    """
    quiet: list[bool] = []

    def lost(code: int, reason: str) -> None:
        if quiet:
            return
        text = f"lost the connection to {client.display_url} ({f'{code} {reason}'.strip()})"
        if client.reconnect and code not in NO_RECONNECT_CODES:
            text += "; reconnecting"
        _say(command, text)

    def back() -> None:
        if not quiet:
            _say(command, f"reconnected to {client.display_url}")

    def recovery(topic: str, recovered: bool, reply: dict[str, Any]) -> None:
        if not recovered and not quiet:
            _say(
                command,
                f"messages published to {topic} while disconnected could not be recovered"
                " (the server's history of it was lost or no longer reaches back)",
            )

    client.on("disconnect", lost)
    client.on("reconnect", back)
    client.on("recovery", recovery)
    return lambda: quiet.append(True)


def _say(command: str, text: str) -> None:
    print(f"dwsps {command}: {text}", file=sys.stderr, flush=True)


def _pub(args: argparse.Namespace) -> int:
    # Usage errors (exit 2), which argparse cannot express for an optional MESSAGE.
    if args.lines:
        if args.message is not None:
            _say("pub", "--lines reads the messages from stdin: give no MESSAGE")
            return 2
        return run(_pub_lines(args))
    if args.message is None:
        _say("pub", "give a MESSAGE, - to read it from stdin, or --lines")
        return 2
    message = args.message
    if message == "-":
        message = sys.stdin.buffer.read().removesuffix(b"\n").removesuffix(b"\r")
    return run(_pub_async(args, _parse_message(message)))


async def _pub_async(args: argparse.Namespace, message: Any) -> int:
    client = _client(args, "pub", reconnect=False, queue_size=0)
    if client is None:
        return 1
    try:
        async with client:
            ack = await client.publish(args.topic, message)
    except RequestError as exc:
        return _fail("pub", _json_line(exc.reply))
    except ConnectionLost as exc:
        return _fail("pub", _too_large(client.close_code, client.close_reason) or exc)
    except DwspsError as exc:
        return _fail("pub", exc)
    print(_json_line(ack), flush=True)
    return 0


async def _pub_lines(args: argparse.Namespace) -> int:
    client = _client(args, "pub", queue_size=0)
    if client is None:
        return 1
    last_close: list[tuple[int, str]] = []
    client.on("disconnect", lambda code, reason: last_close.append((code, reason)))
    quiet = _report_connection(client, "pub")
    published = failed = 0
    error = False
    async with StdinLines() as lines:
        _on_stop_signals(lambda sig: lines.stop())
        try:
            async with client:
                while True:
                    try:
                        line = await lines.next()
                    except LineTooLong as exc:
                        failed += 1
                        _say("pub", str(exc))
                        continue
                    if line is None:
                        break
                    if not line.strip():
                        continue
                    problem = await _publish_line(client, args.topic, line, last_close)
                    if problem is None:
                        published += 1
                    else:
                        failed += 1
                        _say("pub", f"line {lines.number}: {problem}")
                quiet()
        except DwspsError as exc:  # could not connect, or closed for good (e.g. 1008)
            _say("pub", str(exc))
            error = True
    summary = f"published {published} line(s) to {args.topic}"
    _say("pub", summary + (f", {failed} failed" if failed else ""))
    return 1 if failed or error else 0


async def _publish_line(
    client: Client, topic: str, line: bytes, last_close: list[tuple[int, str]]
) -> str | None:
    """Publish one line: None once acked, else what went wrong.

    Raises ConnectionClosed when the client is closed for good (e.g. 1008).
    """
    try:
        await client.publish(topic, _parse_message(line))
    except RequestError as exc:
        return _json_line(exc.reply)
    except ConnectionLost as exc:
        return (_too_large(*last_close[-1]) if last_close else None) or str(exc)
    except AckTimeout as exc:
        return str(exc)
    return None


def _sub(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        return _fail("sub", "--count must be at least 1")
    return run(_sub_async(args))


async def _sub_async(args: argparse.Namespace) -> int:
    client = _client(args, "sub")
    if client is None:
        return 1
    quiet = _report_connection(client, "sub")
    received = 0
    stopping: list[asyncio.Task[None]] = []

    def stop(sig: signal.Signals) -> None:
        # Closing ends the async-for below, so a signal means a clean exit.
        if not stopping:
            quiet()
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
                    quiet()
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
