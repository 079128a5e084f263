"""The Redis backplane: dwsps servers sharing one Redis act as one service.

URL: ``redis://[[user]:password@]host[:port][/db][?options]`` or ``rediss://``
for TLS. Options of our own (removed before the URL reaches redis-py, which
gets the rest): ``prefix`` (channel and key prefix, default ``dwsps``: servers
with different prefixes on one Redis are separate services),
``health_interval`` (seconds between liveness pings, default 1),
``resync_timeout`` (default 5), ``max_backoff`` (default 2).

Channels and keys
    One Redis pub/sub channel per first topic level: a publish to
    ``news.uk.london`` goes to channel ``{prefix}:news``. A server subscribes
    (``SUBSCRIBE``) to ``{prefix}:news`` while some local subscription starts
    with ``news``, and pattern-subscribes (``PSUBSCRIBE {prefix}:*``) while
    some local subscription starts with ``*``. With the pattern in place Redis
    sends a message on a subscribed channel twice (``message`` and
    ``pmessage``); the reader tracks the pattern's state from the
    confirmations in the same stream and drops the ``message`` copy, so that
    is exact. The sorted set ``{prefix}:servers`` (in the URL's db) holds the
    ids of servers whose subscriptions are in place (presence, below).

Connections
    Two per server: one in subscribe mode, read by one task; one for
    ``PUBLISH`` (pipelined in batches) and presence. A ping on the subscribe
    connection every ``health_interval`` detects a silent Redis.

Failure
    Any error on either connection ends the session: both connections are
    dropped, the state becomes ``down`` (logged, ``on_state(False, reason)``),
    and the supervisor reconnects with exponential backoff and full jitter
    (:mod:`dwsps.backoff`, 0.1 s doubling up to ``max_backoff``), forever. A
    new session subscribes again to everything local clients need. Publishes
    made meanwhile wait in the outbox (:mod:`dwsps.outbox`, bounded by
    messages and bytes; the oldest are dropped beyond that, counted and
    logged). A batch that was written but not confirmed when the connection
    broke is sent again: receivers drop the copies by (origin, seq).

Presence and resync
    Redis pub/sub keeps nothing for a subscriber that is not connected, so
    after Redis restarts, a server that flushed its outbox the moment it got
    back would lose everything its peers had not re-subscribed for yet. Each
    server therefore records itself in ``{prefix}:servers`` (score: expiry by
    Redis's clock) once its subscriptions are confirmed, refreshed every
    ``health_interval``. After a reconnect a server publishes nothing until
    every server it saw before the outage is back in that set, or until
    ``resync_timeout`` has passed (then it logs who is missing and goes on;
    what they miss shows up in their gap counters).

History streams (:class:`~dwsps.links.engine.SharedHistory`)
    Per stream two keys, the stream name as hash tag (one Cluster slot):
    ``{prefix}:hm:{<stream>}``, a hash with ``epoch`` and ``offset``, and
    ``{prefix}:hs:{<stream>}``, a Redis stream whose entry ids *are* the
    offsets (``42-0`` is offset 42; fields ``e``, the kept envelope, and
    ``r``, Redis's clock in ms when it was appended). One Lua script
    (``EVALSHA``, loaded once per session) creates the meta when absent (or
    fences a lost tail: a new epoch), takes the offset, ``XADD`` with
    ``MAXLEN ~ size``, refreshes both keys' TTL and ``PUBLISH`` the
    envelope with its position line: one atomic step, so all servers agree on
    offsets and a stream's order is its channel's. Appends travel in the same
    outbox and pipelined batches as plain publishes (a publish and an append
    of one server keep their order). Reads (``XRANGE``/``XREVRANGE`` by
    offset, in a second script that also creates an absent stream) share the
    publish connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.exceptions import RedisError, ResponseError

from dwsps.backoff import Backoff
from dwsps.errors import ConfigError
from dwsps.interest import ALL
from dwsps.links.engine import (
    Backplane,
    BackplaneOptions,
    KeptEntry,
    SharedHistory,
    Sink,
    StateListener,
    StreamRead,
)
from dwsps.outbox import Outbox
from dwsps.redact import redact

log = logging.getLogger("dwsps.backplane")

BATCH_MESSAGES = 512
BATCH_BYTES = 1024 * 1024
CONNECT_TIMEOUT = 2.0
STARTUP_WAIT = 2.0
"""How long ``start()`` waits for the first connection before returning anyway."""
DROP_LOG_INTERVAL = 5.0

# Refresh this server's presence entry (when ready) and return the live entries.
# Scores are expiry times on Redis's clock, so server clocks do not matter.
_PRESENCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# KEYS: meta, log. ARGV: new epoch, size, ttl ms, envelope, channel, known epoch,
# known offset. Returns {epoch, offset}. Ids are offsets, so XRANGE by offset is exact.
_APPEND = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local offset = 0
if epoch then
  offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
  if epoch == ARGV[6] and offset < tonumber(ARGV[7]) then
    -- Offsets up to ARGV[7] were handed out in this epoch and Redis lost
    -- them (a restart from an old snapshot): never reuse them.
    epoch = false
  end
end
if not epoch then
  epoch = ARGV[1]
  offset = 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], offset .. '-0', 'e', ARGV[4], 'r', now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[5], '@' .. epoch .. ' ' .. offset .. '\\n' .. ARGV[4])
return {epoch, offset}
"""

# KEYS: meta, log. ARGV: new epoch, after, limit, newest (1/0), ttl ms.
# Returns {epoch, offset, now ms, entries}; an absent stream is created empty.
_READ = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
local offset = redis.call('HGET', KEYS[1], 'offset') or '0'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries = {}
local limit = tonumber(ARGV[3])
if limit > 0 then
  local low = '(' .. ARGV[2] .. '-0'
  if ARGV[4] == '1' then
    entries = redis.call('XREVRANGE', KEYS[2], '+', low, 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], low, '+', 'COUNT', limit)
  end
end
return {epoch, offset, now, entries}
"""

_APPEND_SHA = hashlib.sha1(_APPEND.encode()).hexdigest().encode()
_READ_SHA = hashlib.sha1(_READ.encode()).hexdigest().encode()


class _Append:
    """An append waiting in the outbox: its script call and the caller's future."""

    __slots__ = ("args", "future")

    def __init__(self, args: tuple[bytes | int | str, ...], future: asyncio.Future[Any]) -> None:
        self.args = args
        self.future = future


_OWN_OPTIONS = ("prefix", "health_interval", "resync_timeout", "max_backoff")


class _SessionLost(ConnectionError):
    """The current Redis session cannot go on (the reason is the message)."""


class RedisBackplane(Backplane, SharedHistory):
    """A backplane on one Redis server (see the module docstring)."""

    def __init__(self, url: str, options: BackplaneOptions) -> None:
        parts = urlsplit(url)
        ours: dict[str, str] = {}
        rest: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            (ours.__setitem__(name, value) if name in _OWN_OPTIONS else rest.append((name, value)))
        self.url = redact(url)
        self._connect_kwargs: dict[str, Any] = dict(
            parse_url(parts._replace(query=urlencode(rest)).geturl())
        )
        self.server_id = options.server_id
        self.prefix = ours.get("prefix", "dwsps")
        if not self.prefix or any(c in self.prefix for c in "*?[]\\"):
            raise ConfigError(f"backplane prefix {self.prefix!r} is empty or has glob characters")
        self.health_interval = float(ours.get("health_interval", 1.0))
        self.resync_timeout = float(ours.get("resync_timeout", 5.0))
        self.max_backoff = float(ours.get("max_backoff", 2.0))
        self.max_messages = options.buffer_messages
        self.max_bytes = options.buffer_bytes
        # (channel, payload) envelopes until Redis confirms their PUBLISH, and
        # history appends until Redis answers their script.
        self._outbox: Outbox[tuple[bytes, bytes] | _Append] = Outbox(
            self.max_messages, self.max_bytes
        )
        self._scripts_loaded = False
        self._channel_prefix = (self.prefix + ":").encode()
        self._pattern = self._channel_prefix + b"*"
        self._presence_key = f"{self.prefix}:servers"
        try:
            self._connection()  # not connected: only checks the options
        except TypeError as exc:
            raise ConfigError(f"backplane URL {self.url}: unusable option ({exc})") from None

        self._want: set[str] = set()
        self._sink: Sink | None = None
        self._on_state: StateListener | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake_sender = asyncio.Event()
        self._idle = asyncio.Event()
        self._wake_subscriber = asyncio.Event()
        self._ready_event = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._closing = False

        self.state = "connecting"
        self.reason = "not connected yet"
        self._known_servers: set[str] = set()
        # Per session: what was asked of Redis, what it confirmed.
        self._sent: set[str] = set()
        self._confirmed: set[str] = set()
        self._pattern_on = False
        self._unconfirmed = 0
        self._ready = False
        self._last_read = 0.0
        self._pub_lock = asyncio.Lock()
        self._pub_conn: AbstractConnection | None = None

        self.received = 0
        self.sessions = 0
        self._drop_log_at = 0.0

    # -- the Backplane interface -----------------------------------------

    async def start(self, sink: Sink, on_state: StateListener) -> None:
        self._sink = sink
        self._on_state = on_state
        self._task = asyncio.get_running_loop().create_task(self._supervise())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), STARTUP_WAIT)

    async def close(self) -> None:
        if self._task is None:
            return
        self._closing = True
        if self._ready and self._outbox:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.state = "closed"

    def publish(self, key: str, payload: bytes) -> None:
        if self._outbox.add((self._channel_prefix + key.encode(), payload), len(payload)):
            self._log_drops()
        self._idle.clear()
        self._wake_sender.set()

    def append(
        self,
        key: str,
        stream: str,
        size: int,
        ttl: float,
        payload: bytes,
        new_epoch: str,
        known: tuple[str, int] | None,
    ) -> asyncio.Future[tuple[str, int]]:
        future: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        meta, log_key = self._history_keys(stream)
        args = (
            b"EVALSHA",
            _APPEND_SHA,
            2,
            meta,
            log_key,
            new_epoch,
            size,
            max(1, int(ttl * 1000)),
            payload,
            self._channel_prefix + key.encode(),
            known[0] if known else "",
            known[1] if known else 0,
        )
        if self._outbox.add(_Append(args, future), len(payload) + 64):
            self._log_drops()
        self._idle.clear()
        self._wake_sender.set()
        return future

    async def read(
        self,
        stream: str,
        after: int,
        limit: int,
        *,
        new_epoch: str,
        ttl: float,
        newest: bool = False,
    ) -> StreamRead:
        if not self._ready:
            raise ConnectionError(f"backplane {self.state}: {self.reason}")
        meta, log_key = self._history_keys(stream)
        pub = self._pub_conn
        assert pub is not None
        try:
            async with self._pub_lock:
                await self._load_scripts(pub)
                await pub.send_command(
                    "EVALSHA",
                    _READ_SHA,
                    2,
                    meta,
                    log_key,
                    new_epoch,
                    max(0, after),
                    max(0, limit),
                    1 if newest else 0,
                    max(1, int(ttl * 1000)),
                    check_health=False,
                )
                reply = await pub.read_response(timeout=CONNECT_TIMEOUT * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            raise ConnectionError(f"history read failed: {_describe(exc)}") from None
        return _parse_read(reply)

    def _history_keys(self, stream: str) -> tuple[str, str]:
        return f"{self.prefix}:hm:{{{stream}}}", f"{self.prefix}:hs:{{{stream}}}"

    async def _load_scripts(self, pub: AbstractConnection) -> None:
        """Load the history scripts once per session (the caller holds the lock)."""
        if self._scripts_loaded:
            return
        for script in (_APPEND, _READ):
            await pub.send_command("SCRIPT", "LOAD", script, check_health=False)
            await pub.read_response(timeout=CONNECT_TIMEOUT * 2)
        self._scripts_loaded = True

    def subscribe(self, key: str) -> None:
        self._want.add(key)
        self._wake_subscriber.set()

    def unsubscribe(self, key: str) -> None:
        self._want.discard(key)
        self._wake_subscriber.set()

    @property
    def healthy(self) -> bool:
        return self.state == "up"

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "healthy": self.healthy,
            "reason": self.reason,
            "prefix": self.prefix,
            "keys": sorted(self._want),
            "subscribed": sorted(self._confirmed),
            "outbox": len(self._outbox),
            "outbox_bytes": self._outbox.size,
            "published": self._outbox.stats.confirmed,
            "received": self.received,
            "dropped": self.dropped,
            "resent": self._outbox.stats.resent,
            "sessions": self.sessions,
            "servers": sorted(self._known_servers | {self.server_id}) if self._ready else [],
        }

    # -- outbox -----------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Envelopes the outbox bound evicted before Redis confirmed them."""
        stats = self._outbox.stats
        return stats.dropped + stats.forgotten

    def _log_drops(self) -> None:
        now = asyncio.get_running_loop().time()
        if now >= self._drop_log_at:
            log.warning(
                "backplane outbox full (%d messages, %d bytes max) while %s: "
                "%d oldest publishes dropped so far",
                self.max_messages,
                self.max_bytes,
                self.state,
                self.dropped,
            )
            self._drop_log_at = now + DROP_LOG_INTERVAL

    # -- session supervision ------------------------------------------------

    def _connection(self) -> AbstractConnection:
        kwargs = dict(self._connect_kwargs)
        cls: type[AbstractConnection] = kwargs.pop("connection_class", Connection)
        kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
        kwargs.setdefault("socket_keepalive", True)
        kwargs.setdefault("client_name", f"dwsps-{self.server_id}")
        # RESP2: pub/sub messages are plain replies on the subscribe connection
        # (redis-py would route RESP3 pushes to a handler of its own).
        kwargs["protocol"] = 2
        return cls(**kwargs)

    async def _supervise(self) -> None:
        backoff = Backoff(0.1, max(0.1, self.max_backoff))
        while True:
            sub, pub = self._connection(), self._connection()
            try:
                for conn in (sub, pub):
                    await asyncio.wait_for(
                        conn.connect_check_health(check_health=False, retry_socket_connect=False),
                        CONNECT_TIMEOUT * 2,
                    )
                backoff.reset()
                await self._session(sub, pub)
                reason = "session ended"
            except asyncio.CancelledError:
                await self._goodbye(pub)
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                reason = _describe(exc)
            except Exception as exc:  # never let the supervisor die
                log.exception("backplane session failed unexpectedly")
                reason = _describe(exc)
            finally:
                for conn in (sub, pub):
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
            self._set_down(reason)
            self._first_attempt.set()
            await asyncio.sleep(backoff.next_delay())

    def _set_up(self) -> None:
        was = self.state
        self.state, self.reason = "up", "connected"
        self._first_attempt.set()
        if was != "up":
            log.info("backplane %s up (session %d)", self.url, self.sessions)
            if self._on_state is not None:
                self._on_state(True, "connected")

    def _set_down(self, reason: str) -> None:
        was = self.state
        self._ready = False
        self._ready_event.clear()
        self._confirmed = set()
        self.reason = reason
        if was in ("up", "connecting"):
            self.state = "down"
            log.warning(
                "backplane %s down: %s; reconnecting (%d publishes waiting)",
                self.url,
                reason,
                len(self._outbox),
            )
            if self._on_state is not None:
                self._on_state(False, reason)
        else:
            log.debug("backplane %s still down: %s", self.url, reason)

    async def _session(self, sub: AbstractConnection, pub: AbstractConnection) -> None:
        self.sessions += 1
        self._sent = set()
        self._confirmed = set()
        self._pattern_on = False
        self._unconfirmed = 0
        self._ready = False
        self._ready_event.clear()
        self._last_read = asyncio.get_running_loop().time()
        self._pub_lock = asyncio.Lock()
        self._pub_conn = pub
        self._scripts_loaded = False
        known_before = set(self._known_servers)
        tasks = [
            asyncio.create_task(self._read(sub)),
            asyncio.create_task(self._subscriptions(sub)),
            asyncio.create_task(self._heartbeat(sub, pub)),
            asyncio.create_task(self._send(pub, known_before)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended the session
            raise _SessionLost("a backplane task stopped")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _goodbye(self, pub: AbstractConnection) -> None:
        """Leave the presence set on a graceful close (best effort)."""
        if not self._ready:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):
                async with self._pub_lock:
                    await pub.send_command("ZREM", self._presence_key, self.server_id)
                    await pub.read_response()

    # -- the subscribe connection -----------------------------------------

    async def _read(self, sub: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        sink = self._sink
        assert sink is not None
        while True:
            reply = await sub.read_response(timeout=math.inf)
            self._last_read = loop.time()
            if not isinstance(reply, list) or not reply:
                continue  # PONG outside subscribe mode
            kind = reply[0]
            if kind == b"message":
                if self._pattern_on:
                    continue  # the pmessage copy is the one delivered
                payload = reply[2]
            elif kind == b"pmessage":
                payload = reply[3]
            else:
                if kind == b"subscribe":
                    self._confirmed.add(reply[1][len(self._channel_prefix) :].decode())
                elif kind == b"unsubscribe":
                    self._confirmed.discard(reply[1][len(self._channel_prefix) :].decode())
                elif kind == b"psubscribe":
                    self._pattern_on = True
                    self._confirmed.add(ALL)
                elif kind == b"punsubscribe":
                    self._pattern_on = False
                    self._confirmed.discard(ALL)
                if kind != b"pong":
                    self._unconfirmed -= 1
                    self._check_ready()
                continue
            self.received += 1
            try:
                sink(payload)
            except Exception:
                log.exception("backplane sink raised; envelope dropped")

    def _check_ready(self) -> None:
        if not self._ready and self._unconfirmed <= 0 and self._sent == self._want:
            self._ready = True
            self._ready_event.set()
            self._set_up()

    async def _subscriptions(self, sub: AbstractConnection) -> None:
        """Keep Redis's view of this server's channels equal to ``_want``."""
        while True:
            self._wake_subscriber.clear()
            want = set(self._want)
            add, remove = want - self._sent, self._sent - want
            channels = [self._channel_prefix + k.encode() for k in add if k != ALL]
            if channels:
                self._unconfirmed += len(channels)
                await sub.send_command("SUBSCRIBE", *channels, check_health=False)
            if ALL in add:
                self._unconfirmed += 1
                await sub.send_command("PSUBSCRIBE", self._pattern, check_health=False)
            channels = [self._channel_prefix + k.encode() for k in remove if k != ALL]
            if channels:
                self._unconfirmed += len(channels)
                await sub.send_command("UNSUBSCRIBE", *channels, check_health=False)
            if ALL in remove:
                self._unconfirmed += 1
                await sub.send_command("PUNSUBSCRIBE", self._pattern, check_health=False)
            self._sent = want
            self._check_ready()
            await self._wake_subscriber.wait()

    async def _heartbeat(self, sub: AbstractConnection, pub: AbstractConnection) -> None:
        """Ping the subscribe connection; keep this server's presence entry fresh."""
        loop = asyncio.get_running_loop()
        interval = self.health_interval
        ttl_ms = int(max(3.0, 3 * interval) * 1000)
        while True:
            silent = loop.time() - self._last_read
            if silent > 3 * interval + CONNECT_TIMEOUT:
                raise _SessionLost(f"no reply from Redis for {silent:.1f}s")
            await sub.send_command("PING", check_health=False)
            members = await self._presence(pub, ttl_ms)
            if self._ready:
                self._known_servers = members - {self.server_id}
            if self._ready:
                await asyncio.sleep(interval)
            else:
                # Register at once when the subscriptions become ready.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready_event.wait(), interval)

    async def _presence(self, pub: AbstractConnection, ttl_ms: int) -> set[str]:
        me = self.server_id if self._ready else ""
        async with self._pub_lock:
            await pub.send_command(
                "EVAL", _PRESENCE, 1, self._presence_key, me, ttl_ms, check_health=False
            )
            reply = await pub.read_response(timeout=CONNECT_TIMEOUT * 2)
        if not isinstance(reply, list):
            raise _SessionLost("no reply to the presence script")
        return {m.decode() if isinstance(m, bytes) else str(m) for m in reply}

    # -- the publish connection -------------------------------------------

    async def _resync(self, pub: AbstractConnection, known: set[str]) -> None:
        """After a reconnect, wait until the servers seen before are subscribed again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.resync_timeout
        ttl_ms = int(max(3.0, 3 * self.health_interval) * 1000)
        while True:
            missing = known - await self._presence(pub, ttl_ms)
            if not missing:
                return
            if loop.time() >= deadline:
                log.warning(
                    "backplane resync: %d server(s) not back after %.1fs (%s); "
                    "publishing anyway, they may miss messages",
                    len(missing),
                    self.resync_timeout,
                    ", ".join(sorted(missing)),
                )
                return
            await asyncio.sleep(0.05)

    async def _send(self, pub: AbstractConnection, known: set[str]) -> None:
        await self._ready_event.wait()
        if known:
            await self._resync(pub, known)
        outbox = self._outbox
        # What a broken session left written but unconfirmed goes out again
        # (receivers drop copies by origin and seq).
        outbox.rewind()
        while True:
            if not outbox.unsent:
                self._idle.set()
                self._wake_sender.clear()
                await self._wake_sender.wait()
                continue
            batch = outbox.take_unsent(BATCH_MESSAGES, BATCH_BYTES)
            commands: list[tuple[Any, ...]] = []
            for item in batch:
                if type(item) is _Append:
                    # A withdrawn append (its caller gave up) goes as a no-op, so
                    # the replies still pair up with the outbox entries.
                    commands.append(item.args if not item.future.done() else (b"PING",))
                else:
                    commands.append((b"PUBLISH", *cast(tuple[bytes, bytes], item)))
            async with self._pub_lock:
                if not self._scripts_loaded and any(type(i) is _Append for i in batch):
                    await self._load_scripts(pub)
                await pub.send_packed_command(pub.pack_commands(commands), check_health=False)
                for item in batch:
                    try:
                        reply = await pub.read_response(timeout=CONNECT_TIMEOUT * 2)
                    except ResponseError as exc:
                        reply = exc
                    if reply is None:
                        raise _SessionLost("PUBLISH not confirmed in time")
                    outbox.confirm()
                    if type(item) is _Append:
                        _settle(item.future, reply)


def _settle(future: asyncio.Future[Any], reply: Any) -> None:
    """Complete an append's future with the script's reply."""
    if future.done():
        return
    if isinstance(reply, list) and len(reply) == 2:
        epoch, offset = reply
        future.set_result((epoch.decode() if isinstance(epoch, bytes) else str(epoch), int(offset)))
    else:
        future.set_exception(ConnectionError(f"history append refused by Redis: {reply}"))


def _parse_read(reply: Any) -> StreamRead:
    """The read script's reply as a :class:`StreamRead`."""
    if not isinstance(reply, list) or len(reply) != 4:
        raise ConnectionError(f"unexpected reply to the history read: {reply!r}")
    epoch, offset, now, raw = reply
    now_ms = int(now)
    entries: list[KeptEntry] = []
    for entry_id, values in raw:
        fields = dict(zip(values[::2], values[1::2], strict=True))
        entries.append(
            KeptEntry(
                int(entry_id.split(b"-", 1)[0]),
                fields[b"e"],
                max(0.0, (now_ms - int(fields.get(b"r", now_ms))) / 1000.0),
            )
        )
    return StreamRead(
        epoch.decode() if isinstance(epoch, bytes) else str(epoch), int(offset), entries
    )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."
