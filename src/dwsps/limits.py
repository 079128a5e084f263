"""Limits: request rates, connection counts and allowed origins (pure: time is an argument).

Rules (PROTOCOL.md, Limits):

* **Requests**: each connection has a token bucket (``rate`` per second,
  ``burst`` at once). A request that finds the bucket empty is refused with
  ``rate_limited`` and not carried out.
* **Persistent abuse**: refusals are counted in a second bucket of
  *strikes*. Each refusal takes a strike; strikes come back at
  ``abuse_limit / abuse_window`` per second up to ``abuse_limit``. A refusal
  that finds no strike left closes the connection with 1008. So a client
  refused at most ``abuse_limit`` times in every ``abuse_window`` seconds is
  never closed, and one refused faster than that for long enough is.
* **Connections**: over the server-wide maximum an upgrade gets HTTP 503,
  over the per-IP maximum HTTP 429 (0 means unlimited). IPv4-mapped IPv6
  addresses count as their IPv4 address.
* **Origin**: with a list of allowed origins, an upgrade whose ``Origin``
  header is present and not listed gets HTTP 403; requests without ``Origin``
  (non-browser clients) pass. Origins compare as ``scheme://host[:port]``,
  case-insensitively, default ports dropped. An entry ``*`` allows every
  origin; ``scheme://*.example.com`` allows every subdomain of
  ``example.com`` (not ``example.com`` itself).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final
from urllib.parse import urlsplit

# Refills are elapsed * rate in floats, which can land a hair under a whole
# token at an exact boundary; this keeps conforming traffic conforming.
_ALMOST_ONE: Final = 1.0 - 1e-9


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        _check_bucket(rate, burst, "rate", "burst")
        self.rate = float(rate)
        self.burst = float(burst)  # float, so a full bucket's tokens stay a float
        self.tokens = float(burst)
        self.stamp = -math.inf

    def take(self, now: float) -> bool:
        """Take one token at time ``now`` (seconds, monotonic); False when there is none."""
        # Runs once per request of a rate-limited connection: comparisons, not min()/max().
        tokens = self.tokens
        elapsed = now - self.stamp
        if elapsed > 0:
            # A clock that steps back adds nothing and waits until it passes the stamp again.
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
            self.stamp = now
        if tokens >= _ALMOST_ONE:
            self.tokens = tokens - 1.0 if tokens > 1.0 else 0.0
            return True
        self.tokens = tokens
        return False


def _check_bucket(rate: float, burst: int, rate_name: str, burst_name: str) -> None:
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"{rate_name} must be a positive number")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"{burst_name} must be an integer >= 1")


class Verdict(Enum):
    """What to do with one request."""

    ALLOW = "allow"
    """Carry it out."""
    REFUSE = "refuse"
    """Reply ``rate_limited``; do not carry it out."""
    CLOSE = "close"
    """Refuse it and close the connection with 1008: the client keeps exceeding the limit."""


_ALLOW: Final = Verdict.ALLOW  # a module global is quicker to reach than the Enum's member


@dataclass(frozen=True, slots=True)
class RateLimit:
    """The request limit of every connection (one shared instance)."""

    rate: float
    """Requests per second."""
    burst: int
    """Requests at once (also what a reconnecting client's resubscriptions need)."""
    abuse_limit: int = 50
    """Refusals a connection may collect before it is closed (see the module docstring)."""
    abuse_window: float = 10.0
    """Seconds over which ``abuse_limit`` refusals are forgiven."""

    def __post_init__(self) -> None:
        _check_bucket(self.rate, self.burst, "rate", "burst")
        _check_bucket(self.abuse_window, self.abuse_limit, "abuse_window", "abuse_limit")


class RequestLimiter:
    """One connection's request limit: a token bucket plus the persistent-abuse rule."""

    __slots__ = ("_bucket", "_limit", "_strikes")

    def __init__(self, limit: RateLimit) -> None:
        self._limit = limit
        self._bucket = TokenBucket(limit.rate, limit.burst)
        # Most connections are never refused: their strike bucket is never made.
        self._strikes: TokenBucket | None = None

    def check(self, now: float) -> Verdict:
        """The verdict for one request arriving at ``now`` (monotonic seconds)."""
        if self._bucket.take(now):
            return _ALLOW
        strikes = self._strikes
        if strikes is None:
            limit = self._limit
            strikes = self._strikes = TokenBucket(
                limit.abuse_limit / limit.abuse_window, limit.abuse_limit
            )
        return Verdict.REFUSE if strikes.take(now) else Verdict.CLOSE


class ConnectionLimiter:
    """Counts open connections, server-wide and per client IP; 0 means unlimited.

    Call :meth:`admit` at the upgrade and :meth:`release` exactly once for
    every admitted connection when it closes.
    """

    __slots__ = ("_per_ip", "max_per_ip", "max_total", "total")

    def __init__(self, max_total: int = 0, max_per_ip: int = 0) -> None:
        if max_total < 0 or max_per_ip < 0:
            raise ValueError("connection limits must be >= 0 (0 = unlimited)")
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        """Connections admitted and not yet released."""
        # Only held when there is a per-IP cap; an entry is deleted when it drops to zero.
        self._per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> int | None:
        """Count a new connection from ``ip`` and return None, or refuse it with an HTTP status.

        503 when the server is full, 429 when ``ip`` holds its maximum.
        """
        if self.max_total and self.total >= self.max_total:
            return 503
        if self.max_per_ip:
            key = _ip_key(ip)
            held = self._per_ip.get(key, 0)
            if held >= self.max_per_ip:
                return 429
            self._per_ip[key] = held + 1
        self.total += 1
        return None

    def release(self, ip: str) -> None:
        """Uncount a connection that :meth:`admit` admitted."""
        if self.total <= 0:
            raise ValueError("release() without a matching admit()")
        if self.max_per_ip:
            key = _ip_key(ip)
            held = self._per_ip.get(key, 0)
            if held <= 0:
                raise ValueError(f"release() without a matching admit() for {ip!r}")
            if held == 1:
                del self._per_ip[key]
            else:
                self._per_ip[key] = held - 1
        self.total -= 1

    def count(self, ip: str) -> int:
        """Open connections from ``ip`` (0 when per-IP counting is off)."""
        return self._per_ip.get(_ip_key(ip), 0)

    def ips(self) -> int:
        """Distinct IPs holding connections (0 when per-IP counting is off)."""
        return len(self._per_ip)


def _ip_key(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # not an IP (a Unix socket, a test double): count it as given
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


# -- origins ----------------------------------------------------------------------

_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _split_origin(origin: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of a serialized origin, or None when it is not one."""
    if not origin or any(c.isspace() for c in origin):
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if (
        not parts.scheme
        or not host
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or parts.password is not None
        or "?" in origin
        or "#" in origin
    ):
        return None
    scheme = parts.scheme.lower()
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    return scheme, host, port


class OriginPolicy:
    """The allowed origins, parsed once; :meth:`allows` answers per upgrade request."""

    __slots__ = ("_any", "_exact", "_suffixes")

    def __init__(self, allowed: Iterable[str]) -> None:
        self._any = False
        self._exact: set[tuple[str, str, int | None]] = set()
        self._suffixes: list[tuple[str, str, int | None]] = []
        for entry in allowed:
            if entry == "*":
                self._any = True
                continue
            parsed = _split_origin(entry)
            if parsed is None:
                raise ValueError(f"not an origin (scheme://host[:port]): {entry!r}")
            scheme, host, port = parsed
            if host.startswith("*."):
                if "*" in host[2:] or not host[2:]:
                    raise ValueError(f"a wildcard origin is scheme://*.domain: {entry!r}")
                self._suffixes.append((scheme, host[1:], port))
            elif "*" in host:
                raise ValueError(f"a wildcard origin is scheme://*.domain: {entry!r}")
            else:
                self._exact.add(parsed)
        self._any = self._any or not (self._exact or self._suffixes)

    def allows(self, origin: str | None) -> bool:
        """True unless ``origin`` (the header, None when absent) is present and not allowed."""
        if origin is None or self._any:
            return True
        parsed = _split_origin(origin)
        if parsed is None:
            return False
        if parsed in self._exact:
            return True
        scheme, host, port = parsed
        return any(
            scheme == s and port == p and host.endswith(suffix) for s, suffix, p in self._suffixes
        )


def origin_allowed(origin: str | None, allowed: Collection[str]) -> bool:
    """One-off form of :class:`OriginPolicy`: no list, or no ``Origin`` header, allows."""
    return OriginPolicy(allowed).allows(origin)
