"""Prometheus metrics for one server, read from its counters at scrape time.

The server already counts what matters (:class:`~dwsps.hub.ServerStats`, the
peer links' and the backplane's ``status()``); :class:`ServerCollector` turns
those numbers into metric families only when Prometheus scrapes, so the
publish path pays nothing for metrics. Each :class:`Metrics` has its own
:class:`~prometheus_client.CollectorRegistry` (never the global one, so two
servers in one process do not mix) with this server's collector plus the
process and platform collectors of ``prometheus_client``.

Wiring ``GET /metrics`` is one line in the server::

    self.http.add("/metrics", Metrics(self).response)

Every metric is listed, with its type, labels and meaning, in
``docs/operations.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sized
from importlib import metadata
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client import generate_latest as _exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from dwsps.build import kind as build_kind
from dwsps.errors import ErrorCode
from dwsps.history import HistoryStore
from dwsps.http import HttpRequest, HttpResponse

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The content type of :meth:`Metrics.render`'s output (Prometheus text format 0.0.4)."""


def _version() -> str:
    # Not dwsps.__version__: the package imports the server, which imports this module.
    try:
        return metadata.version("dwsps")
    except metadata.PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


VERSION: Final = _version()
"""The installed dwsps version (the ``version`` label of ``dwsps_info``)."""
BUILD: Final = build_kind()
"""``mypyc``, ``pure`` or ``partial`` (the ``build`` label of ``dwsps_info``; dwsps.build)."""

PEER_STATES: Final = ("connecting", "up", "down", "closed")
"""Every state a peer link can be in (``dwsps.links.peering.LinkState``)."""
BACKPLANE_STATES: Final = ("connecting", "up", "down", "closed")
"""Every state the built-in backplane engines report."""


class Counters(Protocol):
    """The server counters the collector reads (:class:`~dwsps.hub.ServerStats`)."""

    @property
    def connections_total(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def publishes(self) -> int: ...
    @property
    def deliveries(self) -> int: ...
    @property
    def errors_by_code(self) -> Mapping[str, int]: ...
    @property
    def upgrades_refused(self) -> Mapping[str, int]: ...
    @property
    def slow_consumers(self) -> int: ...
    @property
    def heartbeat_timeouts(self) -> int: ...
    @property
    def invalid_closes(self) -> int: ...
    @property
    def duplicates_dropped(self) -> int: ...
    @property
    def recoveries_attempted(self) -> int: ...
    @property
    def recoveries_ok(self) -> int: ...
    @property
    def recoveries_failed(self) -> int: ...
    @property
    def recoveries_cut_off(self) -> int: ...
    @property
    def replayed(self) -> int: ...
    @property
    def history_requests(self) -> int: ...
    @property
    def framing_errors(self) -> int: ...
    @property
    def amplification_closes(self) -> int: ...


class _Routes(Protocol):
    @property
    def router(self) -> Sized: ...
    @property
    def history(self) -> HistoryStore | None: ...
    @property
    def buffered_bytes(self) -> int: ...
    @property
    def dozing(self) -> int: ...


class _StatusLink(Protocol):
    @property
    def healthy(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...


class Observed(Protocol):
    """What the collector needs from a :class:`~dwsps.server.Server`."""

    @property
    def server_id(self) -> str: ...
    @property
    def stats(self) -> Counters: ...
    @property
    def connections(self) -> Sized: ...
    @property
    def hub(self) -> _Routes: ...
    @property
    def backplane(self) -> _StatusLink | None: ...
    def peer_status(self) -> list[dict[str, Any]]: ...


# (metric name without _total, ServerStats field, help)
_SERVER_COUNTERS: Final = (
    ("dwsps_connections_opened", "connections_total", "WebSocket connections accepted"),
    ("dwsps_requests", "requests", "client messages received (valid or not)"),
    (
        "dwsps_publishes",
        "publishes",
        "publishes accepted on this server (its clients, peers connecting to it, the"
        " embedding code)",
    ),
    (
        "dwsps_deliveries",
        "deliveries",
        "deliveries to local subscribers (one per matching subscription)",
    ),
    (
        "dwsps_slow_consumers",
        "slow_consumers",
        "connections closed with 1013 for not reading fast enough",
    ),
    (
        "dwsps_heartbeat_timeouts",
        "heartbeat_timeouts",
        "connections dropped for not answering a ping",
    ),
    (
        "dwsps_invalid_closes",
        "invalid_closes",
        "connections closed with 1008 after too many invalid requests",
    ),
    (
        "dwsps_duplicates_dropped",
        "duplicates_dropped",
        "publishes dropped as copies of one already delivered (peer resends, backplane echoes)",
    ),
    (
        "dwsps_framing_errors",
        "framing_errors",
        "connections failed for breaking WebSocket framing (RFC 6455)",
    ),
    (
        "dwsps_amplification_closes",
        "amplification_closes",
        "connections closed with 1008 for more subscriptions matching one publish than allowed",
    ),
    (
        "dwsps_history_recoveries_attempted",
        "recoveries_attempted",
        "subscribes with recover answered; each ends as one of ok, failed, cut_off",
    ),
    (
        "dwsps_history_recoveries_ok",
        "recoveries_ok",
        "recoveries answered recovered: true whose whole replay was sent",
    ),
    (
        "dwsps_history_recoveries_failed",
        "recoveries_failed",
        "recoveries answered recovered: false (history lost), or overloaded (history unavailable)",
    ),
    (
        "dwsps_history_recoveries_cut_off",
        "recoveries_cut_off",
        "recoveries answered recovered: true whose replay did not finish (the client fell"
        " behind the history, closed, or replaced the subscription)",
    ),
    ("dwsps_history_replayed", "replayed", "publications replayed to recovering subscribers"),
    ("dwsps_history_requests", "history_requests", "history requests received"),
)

# (metric name, HistoryStats field, help): gauges, then counters (without _total)
_HISTORY_GAUGES: Final = (
    ("dwsps_history_streams", "streams", "history streams held in memory"),
    ("dwsps_history_publications", "publications", "publications kept in history"),
    ("dwsps_history_bytes", "bytes", "bytes accounted for history (bound: history_max_bytes)"),
)
_HISTORY_COUNTERS: Final = (
    ("dwsps_history_published", "published", "publications appended to history streams"),
    ("dwsps_history_trimmed_by_size", "trimmed_by_size", "publications dropped by a stream's size"),
    ("dwsps_history_expired_by_age", "expired_by_age", "publications dropped by a stream's age"),
    (
        "dwsps_history_trimmed_by_bytes",
        "trimmed_by_bytes",
        "publications dropped from the stream just published to, to stay under the byte cap",
    ),
    (
        "dwsps_history_evicted_streams",
        "evicted_streams",
        "whole streams evicted (least recently published first) to stay under the byte cap",
    ),
)

# (metric name without _total, status key, help) for each peer link
_PEER_COUNTERS: Final = (
    ("dwsps_peer_connects", "connects", "connections established to the peer"),
    ("dwsps_peer_queued", "queued", "publishes queued for the peer"),
    ("dwsps_peer_sent", "sent", "publishes written to the peer for the first time"),
    ("dwsps_peer_resent", "resent", "publishes written again after a reconnect"),
    ("dwsps_peer_confirmed", "confirmed", "publishes the peer acknowledged"),
    ("dwsps_peer_rejected", "rejected", "publishes the peer refused with an error"),
    (
        "dwsps_peer_dropped",
        "dropped",
        "publishes evicted from the full outbox before being written: lost for this peer",
    ),
    (
        "dwsps_peer_forgotten",
        "forgotten",
        "publishes evicted from the full outbox after being written, before a confirmation",
    ),
)
_PEER_GAUGES: Final = (
    ("dwsps_peer_outbox_messages", "outbox", "publishes held until the peer confirms them"),
    ("dwsps_peer_outbox_bytes", "outbox_bytes", "bytes held until the peer confirms them"),
    ("dwsps_peer_in_flight", "in_flight", "publishes written and not yet confirmed"),
)

# Backplane: the link's counters and the engine's (present for the engines that keep them).
_BACKPLANE_COUNTERS: Final = (
    ("dwsps_backplane_forwarded", "forwarded", "publishes this server put on the backplane"),
    ("dwsps_backplane_delivered", "delivered", "publishes from other servers delivered here"),
    (
        "dwsps_backplane_duplicates",
        "duplicates",
        "backplane publishes dropped as copies already delivered",
    ),
    (
        "dwsps_backplane_gaps",
        "gaps",
        "publishes from other servers that never arrived and could not be repaired",
    ),
    (
        "dwsps_backplane_repaired",
        "repaired",
        "history publications missed in the live feed and restored from the shared stream",
    ),
    (
        "dwsps_backplane_epochs_reset",
        "epochs_reset",
        "shared history streams seen in a new epoch (their history was lost)",
    ),
    ("dwsps_backplane_invalid", "invalid", "backplane messages that were not dwsps envelopes"),
    ("dwsps_backplane_published", "published", "envelopes the engine confirmed sent"),
    ("dwsps_backplane_received", "received", "envelopes the engine received"),
    (
        "dwsps_backplane_dropped",
        "dropped",
        "envelopes evicted from the full outbox while the backplane was away",
    ),
    ("dwsps_backplane_resent", "resent", "envelopes sent again after a reconnect"),
    ("dwsps_backplane_sessions", "sessions", "connections established to the engine"),
)
_BACKPLANE_GAUGES: Final = (
    ("dwsps_backplane_outbox_messages", "outbox", "envelopes waiting to be sent"),
    ("dwsps_backplane_outbox_bytes", "outbox_bytes", "bytes waiting to be sent"),
)


class ServerCollector(Collector):
    """Metric families read from one server's counters on every :meth:`collect`."""

    def __init__(self, server: Observed) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """The server's metrics as they are now."""
        server = self.server
        info = GaugeMetricFamily(
            "dwsps_info",
            "this server: its id, dwsps version and build",
            labels=["server_id", "version", "build"],
        )
        info.add_metric([server.server_id, VERSION, BUILD], 1)
        yield info
        yield GaugeMetricFamily(
            "dwsps_connections", "open client connections", value=len(server.connections)
        )
        yield GaugeMetricFamily(
            "dwsps_connections_dozing",
            "connections idle long enough to have given their WebSocket parser back",
            value=server.hub.dozing,
        )
        yield GaugeMetricFamily(
            "dwsps_subscriptions",
            "subscriptions held by local clients",
            value=len(server.hub.router),
        )
        yield GaugeMetricFamily(
            "dwsps_buffered_bytes",
            "data held for connections: backlogs, stalled transports, partial messages",
            value=server.hub.buffered_bytes,
        )
        stats = server.stats
        for name, field, help_text in _SERVER_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(stats, field))
        yield _errors(stats.errors_by_code)
        yield _refused(stats.upgrades_refused)
        yield from _peers(server.peer_status())
        history = server.hub.history
        if history is not None:
            kept = history.stats()
            for name, field, help_text in _HISTORY_GAUGES:
                yield GaugeMetricFamily(name, help_text, value=getattr(kept, field))
            for name, field, help_text in _HISTORY_COUNTERS:
                yield CounterMetricFamily(name, help_text, value=getattr(kept, field))
        backplane = server.backplane
        if backplane is not None:
            yield from _backplane(backplane.status(), backplane.healthy)


def _errors(by_code: Mapping[str, int]) -> Metric:
    errors = CounterMetricFamily(
        "dwsps_errors", "error replies sent to clients, by error code", labels=["code"]
    )
    # Every known code from the start, so rate() works on the first error of a kind.
    for code in [*ErrorCode, *sorted(set(by_code) - set(ErrorCode))]:
        errors.add_metric([str(code)], by_code.get(code, 0))
    return errors


_REFUSAL_STATUSES: Final = ("401", "403", "429", "503")


def _refused(by_status: Mapping[str, int]) -> Metric:
    refused = CounterMetricFamily(
        "dwsps_upgrades_refused",
        "WebSocket upgrades refused at admission, by HTTP status",
        labels=["status"],
    )
    for status in [*_REFUSAL_STATUSES, *sorted(set(by_status) - set(_REFUSAL_STATUSES))]:
        refused.add_metric([status], by_status.get(status, 0))
    return refused


def _state_family(
    name: str,
    help_text: str,
    labels: list[str],
    rows: list[tuple[list[str], str]],
    known: tuple[str, ...],
) -> Metric:
    """One 1/0 sample per (labels, state): 1 for the current state."""
    family = GaugeMetricFamily(name, help_text, labels=[*labels, "state"])
    for values, current in rows:
        for state in known if current in known else (*known, current):
            family.add_metric([*values, state], 1 if state == current else 0)
    return family


def _peers(links: list[dict[str, Any]]) -> Iterator[Metric]:
    if not links:
        return
    rows = [([link["url"]], str(link["state"])) for link in links]
    yield _state_family(
        "dwsps_peer_state", "peer link state: 1 for the current one", ["url"], rows, PEER_STATES
    )
    for name, key, help_text in _PEER_COUNTERS:
        counter = CounterMetricFamily(name, help_text, labels=["url"])
        for link in links:
            counter.add_metric([link["url"]], link[key])
        yield counter
    for name, key, help_text in _PEER_GAUGES:
        gauge = GaugeMetricFamily(name, help_text, labels=["url"])
        for link in links:
            gauge.add_metric([link["url"]], link[key])
        yield gauge


def _backplane(status: dict[str, Any], healthy: bool) -> Iterator[Metric]:
    url = [str(status.get("url", ""))]
    yield _state_family(
        "dwsps_backplane_state",
        "backplane engine state: 1 for the current one",
        ["url"],
        [(url, str(status.get("state", "")))],
        BACKPLANE_STATES,
    )
    up = GaugeMetricFamily(
        "dwsps_backplane_healthy",
        "1 while publishes leave and subscriptions are in place",
        labels=["url"],
    )
    up.add_metric(url, 1 if healthy else 0)
    yield up
    for name, key, help_text in _BACKPLANE_COUNTERS:
        if key in status:
            counter = CounterMetricFamily(name, help_text, labels=["url"])
            counter.add_metric(url, status[key])
            yield counter
    for name, key, help_text in _BACKPLANE_GAUGES:
        if key in status:
            gauge = GaugeMetricFamily(name, help_text, labels=["url"])
            gauge.add_metric(url, status[key])
            yield gauge
    if "servers" in status:
        servers = GaugeMetricFamily(
            "dwsps_backplane_servers",
            "servers of the group this server knows of (itself included; 0 until the first resync)",
            labels=["url"],
        )
        servers.add_metric(url, len(status["servers"]))
        yield servers


class Metrics:
    """One server's metrics registry: its collector, plus process and platform metrics."""

    def __init__(self, server: Observed) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(server))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def render(self) -> bytes:
        """Every metric now, in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return _exposition(self.registry)

    def response(self, request: HttpRequest) -> HttpResponse:
        """The answer to ``GET /metrics`` (an :data:`~dwsps.http.Handler`)."""
        return HttpResponse(200, self.render(), CONTENT_TYPE)


class WorkerMetrics:
    """``GET /metrics`` on any worker of ``dwsps serve --workers N``: every worker's metrics.

    A scrape reaches one worker (the kernel picks), so each worker writes its
    own rendering to ``DIRECTORY/metrics-SLOT.prom`` every ``interval`` and
    answers with its live metrics plus the other workers' latest files (at
    most ``interval`` old; files older than :data:`STALE_AFTER` are from a
    worker that is gone). Every sample gets a ``worker`` label: per-worker
    series, which Prometheus sums with ``sum without (worker)``.
    """

    STALE_AFTER: Final = 5.0

    def __init__(self, metrics: Metrics, slot: int, directory: str) -> None:
        self.metrics = metrics
        self.slot = slot
        self.directory = directory

    def _path(self, slot: int | str) -> str:
        return os.path.join(self.directory, f"metrics-{slot}.prom")

    def snapshot(self) -> None:
        """Write this worker's metrics for the others to serve."""
        path = self._path(self.slot)
        with open(path + ".tmp", "wb") as fh:
            fh.write(self.metrics.render())
        os.replace(path + ".tmp", path)

    async def run(self, interval: float = 1.0) -> None:
        """Write a snapshot every ``interval`` seconds until cancelled."""
        while True:
            self.snapshot()
            await asyncio.sleep(interval)

    def render(self) -> bytes:
        """Every live worker's metrics, labelled ``worker``, in the text format."""
        texts = {str(self.slot): self.metrics.render().decode()}
        now = time.time()
        for name in os.listdir(self.directory):
            slot = name.removeprefix("metrics-").removesuffix(".prom")
            if not name.endswith(".prom") or slot == str(self.slot) or not slot.isdigit():
                continue
            with contextlib.suppress(OSError):
                path = os.path.join(self.directory, name)
                if now - os.path.getmtime(path) <= self.STALE_AFTER:
                    with open(path, encoding="utf-8") as fh:
                        texts[slot] = fh.read()
        return _exposition(_Merged(texts))

    def response(self, request: HttpRequest) -> HttpResponse:
        """The answer to ``GET /metrics`` (an :data:`~dwsps.http.Handler`)."""
        return HttpResponse(200, self.render(), CONTENT_TYPE)


class _Merged(CollectorRegistry):
    """The families of several workers' renderings, one family per name."""

    def __init__(self, texts: Mapping[str, str]) -> None:
        super().__init__(auto_describe=False)
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for slot in sorted(self.texts, key=int):
            for family in text_string_to_metric_families(self.texts[slot]):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    labels = {**sample.labels, "worker": slot}
                    merged.samples.append(type(sample)(sample.name, labels, *sample[2:]))
        yield from families.values()


def render(server: Observed) -> bytes:
    """``server``'s metrics in the Prometheus text format, from a fresh :class:`Metrics`.

    A server that is scraped repeatedly should keep one :class:`Metrics` instead.
    """
    return Metrics(server).render()
