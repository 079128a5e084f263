"""History and recovery: streams, offsets, epochs, bounded rings (pure: no I/O).

The rules (PROTOCOL.md, "History and recovery"):

- History is kept for topics matching a configured :class:`HistoryPattern`.
  The *stream* of a published topic ``T`` is the first ``n`` levels of ``T``,
  where ``n`` is the number of levels of the FIRST pattern (in configured
  order) that matches ``T`` by the subscription rule.
- Each publish to a stream takes its next *offset*, 1, 2, 3, ... with no gaps,
  within an *epoch*: a string that changes whenever the stream's history was
  lost (the server restarted, the stream was evicted to stay under the byte
  cap). A pair (epoch, offset) therefore never names two publications.
- A stream keeps at most ``size`` publications, none older than ``max_age``
  seconds, and all streams together at most ``max_bytes`` (whole streams are
  evicted least recently published first).
- Recovery from (epoch, offset) succeeds when the epoch is the stream's and the
  ring still reaches back to offset + 1; it yields every later publication the
  subscription matches, in offset order. Otherwise nothing is replayed.

A stream that was never published (or was evicted) has no state at all; it
reports the store's *current epoch* and offset 0. The first publish creates it
with exactly that epoch, so a client told (epoch, 0) before the first publish
recovers everything later. Each eviction starts a new current epoch, so a
stream recreated after eviction never reuses an epoch whose offsets are gone.

Time is injected (``now``: monotonic seconds) and expiry by age is lazy: on
publish and read of a stream, and in :meth:`HistoryStore.expire` for a sweep.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from dwsps.errors import HistoryConfigError, HistoryError, TopicError
from dwsps.topics import DEFAULT_LIMITS, WILDCARD, TopicLimits, matches, validate

PUBLICATION_OVERHEAD = 336
"""Bytes accounted per kept publication on top of ``len(topic) + len(message)``.

Measured on 64-bit CPython 3.11 with ``sys.getsizeof``: the slotted
:class:`Publication` (96), the headers of its topic str (49) and message bytes
(33), its timestamp str (73), offset int (28) and receipt float (24), and its
deque slot (8): 311, rounded up. The stream name and epoch are shared strings
and ``from_peer`` a shared bool, so they cost nothing per publication.
A non-ASCII topic is counted per character (it is at most 256 characters).
"""

STREAM_OVERHEAD = 1024
"""Bytes accounted per stream on top of ``len(name)``: the :class:`Stream`
object, its empty deque (760), its name str header and its entry in the store.
Counting it lets the byte cap bound the number of streams too."""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""The default server-wide byte cap for all history together."""

_CACHE_SIZE = 4096
_SHAPE_ONLY = TopicLimits(max_length=1 << 62, max_levels=1 << 62)

_AGE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def new_epoch() -> str:
    """A fresh random epoch (48 bits, 12 hex digits)."""
    return secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class HistoryPattern:
    """Which topics keep history, and how much: ``size`` messages, ``max_age`` seconds."""

    pattern: str
    size: int
    max_age: float | None = None
    levels: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The server's topic limits are checked where they are known
        # (parse_history_pattern); here only the shape of a pattern.
        try:
            validate(self.pattern, subscription=True, limits=_SHAPE_ONLY)
        except TopicError as exc:
            raise HistoryConfigError(f"history pattern {self.pattern!r}: {exc}") from None
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise HistoryConfigError(
                f"history pattern {self.pattern!r}: size must be an integer >= 1, got {self.size!r}"
            )
        age = self.max_age
        if age is not None and (
            isinstance(age, bool) or not isinstance(age, int | float) or not 0 < age < float("inf")
        ):
            raise HistoryConfigError(
                f"history pattern {self.pattern!r}: max_age must be a positive number of "
                f"seconds, got {age!r}"
            )
        object.__setattr__(self, "levels", tuple(self.pattern.split(".")))


SHARED_TTL_NO_AGE = 7 * 86400.0
"""Seconds an idle shared stream without an age limit lives in the engine."""


def shared_ttl(pattern: HistoryPattern) -> float:
    """How long an idle stream of ``pattern`` lives in a shared engine (seconds).

    Longer than the age limit (at least an hour more, or twice it), so the
    stream's position outlives its last publication: a client that was up to
    date still recovers (nothing to replay) instead of meeting a new epoch.
    """
    age = pattern.max_age
    if age is None:
        return SHARED_TTL_NO_AGE
    return max(2 * age, age + 3600.0)


def parse_history_pattern(text: str, limits: TopicLimits = DEFAULT_LIMITS) -> HistoryPattern:
    """Parse ``PATTERN:SIZE[:AGE]``, e.g. ``chat.*:1000:10m`` (AGE: s, m, h, d or seconds).

    A pattern never contains ``:``, so the split is unambiguous.
    """
    parts = [part.strip() for part in text.strip().split(":")]
    if len(parts) not in (2, 3):
        raise HistoryConfigError(
            f"history pattern {text!r}: expected PATTERN:SIZE or PATTERN:SIZE:AGE "
            "(for example 'chat.*:1000:10m')"
        )
    pattern, size_text = parts[0], parts[1]
    try:
        validate(pattern, subscription=True, limits=limits)
    except TopicError as exc:
        raise HistoryConfigError(f"history pattern {text!r}: pattern {exc}") from None
    if not size_text.isascii() or not size_text.isdigit() or int(size_text) < 1:
        raise HistoryConfigError(
            f"history pattern {text!r}: size {size_text!r} is not a whole number >= 1"
        )
    max_age: float | None = None
    if len(parts) == 3:
        match = _AGE.fullmatch(parts[2])
        if match is None or float(match[1]) <= 0:
            raise HistoryConfigError(
                f"history pattern {text!r}: age {parts[2]!r} is not a positive duration "
                "(seconds, or a number with s, m, h or d)"
            )
        max_age = float(match[1]) * _UNIT_SECONDS[match[2]]
    return HistoryPattern(pattern, int(size_text), max_age)


def _covers(outer: Sequence[str], inner: Sequence[str]) -> bool:
    """True when every topic ``inner`` can match is matched by ``outer`` (the subscribe rule)."""
    if len(outer) > len(inner):
        return False
    # Plain loops, not all(): these run per subscribe, and a generator costs more.
    for o, i in zip(outer, inner, strict=False):  # noqa: SIM110
        if o != i and o != WILDCARD:
            return False
    return True


def _intersects(pattern: Sequence[str], sub: Sequence[str]) -> bool:
    """True when some published topic is matched by both (levels compared where both exist)."""
    for p, s in zip(pattern, sub, strict=False):
        if p != s and p != WILDCARD and s != WILDCARD:
            return False
    return True


_MISSING = object()


class HistoryPatterns:
    """The configured patterns in order, and the stream rule built on them."""

    __slots__ = ("_cache", "_cache_size", "_rules", "patterns")

    def __init__(self, patterns: Iterable[HistoryPattern], cache_size: int = _CACHE_SIZE) -> None:
        self.patterns: tuple[HistoryPattern, ...] = tuple(patterns)
        for i, later in enumerate(self.patterns):
            for earlier in self.patterns[:i]:
                if _covers(earlier.levels, later.levels):
                    raise HistoryConfigError(
                        f"history pattern {later.pattern!r} is never used: {earlier.pattern!r} "
                        "comes first and matches every topic it does (list the more specific "
                        "pattern first)"
                    )
        # Per pattern: its depth and its literal levels by position, so a miss
        # costs one split and a few string compares.
        self._rules: tuple[tuple[int, tuple[tuple[int, str], ...], HistoryPattern], ...] = tuple(
            (
                len(p.levels),
                tuple((i, level) for i, level in enumerate(p.levels) if level != WILDCARD),
                p,
            )
            for p in self.patterns
        )
        self._cache_size = cache_size
        self._cache: dict[str, tuple[str, HistoryPattern] | None] = {}

    def stream_of(self, topic: str) -> tuple[str, HistoryPattern] | None:
        """The stream of the published ``topic`` and the pattern that put it there, if any."""
        found = self._cache.get(topic, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        levels = topic.split(".")
        depth = len(levels)
        found = None
        for n, literals, pattern in self._rules:
            if n > depth:
                continue
            for i, literal in literals:
                if levels[i] != literal:
                    break
            else:
                found = (topic if n == depth else ".".join(levels[:n]), pattern)
                break
        cache = self._cache
        if len(cache) >= self._cache_size:
            # Clearing beats evicting one by one: O(1) amortised, and the
            # topics still in use are back after one miss each.
            cache.clear()
        cache[topic] = found
        return found

    def stream_of_subscription(self, subscription: str) -> str | None:
        """The one stream holding every topic ``subscription`` can match, else None.

        Walk the patterns in order. The first pattern that matches *every*
        topic of the subscription decides, unless an earlier pattern matches
        *some* of them: those then lie in the earlier pattern's streams, and the
        rest (e.g. one with a fresh level wherever the earlier has a literal,
        or one shorter than it) do not, so no single stream holds them all. The
        deciding pattern puts them all in one stream only when the subscription
        has no ``*`` within that pattern's levels.
        """
        sub = subscription.split(".")
        for pattern in self.patterns:
            plevels = pattern.levels
            if _covers(plevels, sub):
                head = sub[: len(plevels)]
                return None if WILDCARD in head else ".".join(head)
            if _intersects(plevels, sub):
                return None
        return None


@dataclass(slots=True)
class Publication:
    """One kept publish, enough to rebuild its delivery (read-only by contract).

    ``message`` is the message as encoded JSON bytes, kept as they came, never
    re-encoded. ``received`` is the monotonic receipt time used for expiry.
    Not frozen on purpose: a frozen dataclass costs ~2 µs more per publish.
    """

    stream: str
    epoch: str
    offset: int
    topic: str
    timestamp: str
    message: bytes
    from_peer: bool
    received: float

    @property
    def size(self) -> int:
        """Bytes accounted for this publication (see :data:`PUBLICATION_OVERHEAD`)."""
        return len(self.topic) + len(self.message) + PUBLICATION_OVERHEAD


@dataclass(slots=True)
class HistoryStats:
    """Totals over the streams of one store; :meth:`HistoryStore.stats` returns a copy."""

    streams: int = 0
    publications: int = 0
    """Publications kept now."""
    bytes: int = 0
    """Bytes accounted now (streams and what they keep)."""
    published: int = 0
    """Publications appended since the store started."""
    trimmed_by_size: int = 0
    expired_by_age: int = 0
    trimmed_by_bytes: int = 0
    """Dropped from the stream just published to, to stay under the byte cap."""
    evicted_streams: int = 0
    """Whole streams dropped, least recently published first, to stay under the byte cap."""


class Stream:
    """One stream: its epoch, last offset and bounded ring of recent publications.

    It is accounted in ``stats`` from its creation until :meth:`discard`.
    """

    __slots__ = ("_ring", "bytes", "epoch", "max_age", "name", "offset", "size", "stats")

    def __init__(
        self,
        name: str,
        epoch: str,
        size: int,
        max_age: float | None = None,
        stats: HistoryStats | None = None,
    ) -> None:
        self.name = name
        self.epoch = epoch
        self.size = size
        self.max_age = max_age
        self.offset = 0
        """The last offset assigned (0 before the first publish)."""
        self.bytes = STREAM_OVERHEAD + len(name)
        """Bytes accounted for the stream and what it keeps."""
        self.stats = stats if stats is not None else HistoryStats()
        self.stats.streams += 1
        self.stats.bytes += self.bytes
        self._ring: deque[Publication] = deque()

    def __len__(self) -> int:
        """Number of publications kept."""
        return len(self._ring)

    @property
    def first(self) -> int:
        """Offset of the oldest kept publication (``offset + 1`` when none is kept)."""
        return self._ring[0].offset if self._ring else self.offset + 1

    def append(
        self, topic: str, timestamp: str, message: bytes, from_peer: bool, now: float
    ) -> Publication:
        """Take the next offset for a publish and keep it, dropping what falls out."""
        offset = self.offset = self.offset + 1
        pub = Publication(self.name, self.epoch, offset, topic, timestamp, message, from_peer, now)
        ring = self._ring
        stats = self.stats
        stats.published += 1
        max_age = self.max_age
        if max_age is not None and ring and ring[0].received < now - max_age:
            self.expire(now)
        delta = len(topic) + len(message) + PUBLICATION_OVERHEAD
        if len(ring) >= self.size:
            old = ring.popleft()
            delta -= len(old.topic) + len(old.message) + PUBLICATION_OVERHEAD
            stats.trimmed_by_size += 1
        else:
            stats.publications += 1
        ring.append(pub)
        self.bytes += delta
        stats.bytes += delta
        return pub

    def _drop_oldest(self) -> None:
        size = self._ring.popleft().size
        self.bytes -= size
        self.stats.bytes -= size
        self.stats.publications -= 1

    def expire(self, now: float) -> int:
        """Drop publications older than ``max_age`` at ``now``; return how many."""
        if self.max_age is None:
            return 0
        ring = self._ring
        cutoff = now - self.max_age
        dropped = 0
        while ring and ring[0].received < cutoff:
            self._drop_oldest()
            dropped += 1
        self.stats.expired_by_age += dropped
        return dropped

    def trim_oldest(self) -> bool:
        """Drop the oldest kept publication to save bytes; False when none is kept."""
        if not self._ring:
            return False
        self._drop_oldest()
        self.stats.trimmed_by_bytes += 1
        return True

    def discard(self) -> None:
        """Drop everything and stop being accounted in ``stats``."""
        stats = self.stats
        stats.streams -= 1
        stats.bytes -= self.bytes
        stats.publications -= len(self._ring)
        self._ring.clear()
        self.bytes = 0

    def since(self, offset: int) -> list[Publication] | None:
        """Every kept publication after ``offset``, or None when some of them are gone.

        ``offset == self.offset`` gives ``[]``: nothing was missed. An offset
        this stream never reached (or a negative one) gives None.
        """
        if offset < 0 or offset > self.offset or offset + 1 < self.first:
            return None
        ring = self._ring
        # Kept offsets are consecutive, so the answer is the last ``count`` entries;
        # indexing a deque near its right end is cheap, and recovery wants the newest.
        count = self.offset - offset
        return [ring[i] for i in range(len(ring) - count, len(ring))]

    def latest(
        self, limit: int, since: int | None = None, subscription: str | None = None
    ) -> list[Publication]:
        """At most ``limit`` of the newest kept publications, oldest first.

        Only those after offset ``since`` when given, and only those whose topic
        ``subscription`` matches when given.
        """
        out: list[Publication] = []
        if limit <= 0:
            return out
        low = 0 if since is None else since
        for pub in reversed(self._ring):
            if pub.offset <= low:
                break
            if subscription is None or matches(subscription, pub.topic):
                out.append(pub)
                if len(out) >= limit:
                    break
        out.reverse()
        return out


@dataclass(frozen=True, slots=True)
class Recovery:
    """The answer to a ``recover``: the ack's fields and what to replay before live."""

    recovered: bool
    stream: str
    epoch: str
    offset: int
    """The stream's current offset: everything up to it is replayed or was received."""
    publications: list[Publication]

    def includes(self, epoch: str, offset: int) -> bool:
        """True when a delivery at (epoch, offset) of this stream is covered by this answer.

        Live deliveries of the stream for which this holds are duplicates at the
        seam and must not be sent (false whenever nothing was recovered).
        """
        return self.recovered and epoch == self.epoch and offset <= self.offset


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """The answer to a ``history`` request."""

    stream: str
    epoch: str
    offset: int
    publications: list[Publication]
    since_ignored: bool
    """True when ``since`` named another epoch: its offset means nothing in this
    one, so ``publications`` are simply the latest."""


def history_store(
    patterns: Iterable[str],
    max_bytes: int = DEFAULT_MAX_BYTES,
    limits: TopicLimits = DEFAULT_LIMITS,
) -> HistoryStore | None:
    """The store for configured ``PATTERN:SIZE[:AGE]`` texts; None when there are none.

    Raises :class:`HistoryConfigError` for a bad pattern, order or byte cap.
    """
    parsed = [parse_history_pattern(text, limits) for text in patterns]
    if not parsed:
        return None
    return HistoryStore(parsed, max_bytes)


class HistoryStore:
    """All streams of one server, bounded by patterns and a server-wide byte cap."""

    __slots__ = ("_epoch", "_epoch_factory", "_stats", "_streams", "max_bytes", "patterns")

    def __init__(
        self,
        patterns: Iterable[HistoryPattern] | HistoryPatterns,
        max_bytes: int = DEFAULT_MAX_BYTES,
        epoch_factory: Callable[[], str] = new_epoch,
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise HistoryConfigError(
                f"history max_bytes must be an integer >= 1, got {max_bytes!r}"
            )
        self.patterns = (
            patterns if isinstance(patterns, HistoryPatterns) else HistoryPatterns(patterns)
        )
        self.max_bytes = max_bytes
        self._epoch_factory = epoch_factory
        self._epoch = epoch_factory()
        # Least recently published first: the eviction order.
        self._streams: OrderedDict[str, Stream] = OrderedDict()
        self._stats = HistoryStats()

    @property
    def epoch(self) -> str:
        """The epoch a stream created now gets (and a stream without state reports)."""
        return self._epoch

    def stream(self, name: str) -> Stream | None:
        """The stream named ``name``, if it has state."""
        return self._streams.get(name)

    def publish(
        self, topic: str, timestamp: str, message: bytes, from_peer: bool, now: float
    ) -> Publication | None:
        """Keep a publish to the valid topic ``topic``; None when it has no history.

        The returned publication carries the ``stream``, ``offset`` and ``epoch``
        for the deliveries and the ack.
        """
        found = self.patterns.stream_of(topic)
        if found is None:
            return None
        return self.append(found, topic, timestamp, message, from_peer, now)

    def append(
        self,
        found: tuple[str, HistoryPattern],
        topic: str,
        timestamp: str,
        message: bytes,
        from_peer: bool,
        now: float,
    ) -> Publication:
        """:meth:`publish` for a topic whose ``patterns.stream_of`` the caller has already."""
        name, pattern = found
        streams = self._streams
        stream = streams.get(name)
        if stream is None:
            stream = streams[name] = Stream(
                name, self._epoch, pattern.size, pattern.max_age, self._stats
            )
        else:
            streams.move_to_end(name)
        pub = stream.append(topic, timestamp, message, from_peer, now)
        if self._stats.bytes > self.max_bytes:
            self._shrink(stream)
        return pub

    def _shrink(self, current: Stream) -> None:
        """Get under the byte cap: evict the least recently published other streams first."""
        streams = self._streams
        stats = self._stats
        evicted = False
        while stats.bytes > self.max_bytes:
            oldest = next(iter(streams.values()))
            if oldest is current:
                break
            del streams[oldest.name]
            oldest.discard()
            stats.evicted_streams += 1
            evicted = True
        if evicted:
            # The evicted streams' offsets are gone: a stream created from now on
            # (one of them again, or any stream that reported the old epoch as
            # "no state") must not claim an epoch a client may hold offsets of.
            self._epoch = self._epoch_factory()
        while stats.bytes > self.max_bytes and current.trim_oldest():
            pass

    def _read(self, name: str, now: float) -> Stream | None:
        stream = self._streams.get(name)
        if stream is not None:
            stream.expire(now)
        return stream

    def expire(self, now: float) -> int:
        """Drop what has aged out of every stream (a periodic sweep); return how many."""
        return sum(stream.expire(now) for stream in self._streams.values())

    def stream_of_request(self, subscription: str) -> str:
        """The stream a ``recover`` or ``history`` of ``subscription`` reads; else HistoryError."""
        return self._stream_of_request(subscription)

    def _stream_of_request(self, subscription: str) -> str:
        name = self.patterns.stream_of_subscription(subscription)
        if name is None:
            sub = subscription.split(".")
            if not any(_intersects(p.levels, sub) for p in self.patterns.patterns):
                raise HistoryError(f"no history is kept for {subscription!r}")
            raise HistoryError(f"{subscription!r} does not lie inside one history stream")
        return name

    def position(self, stream: str) -> tuple[str, int]:
        """The (epoch, offset) of ``stream``: (:attr:`epoch`, 0) when it has no state."""
        found = self._streams.get(stream)
        if found is None:
            return self._epoch, 0
        return found.epoch, found.offset

    def locate(self, subscription: str) -> tuple[str, str, int] | None:
        """(stream, epoch, offset) for a subscription inside one stream, else None.

        For the ack of a plain subscribe, so a client that receives nothing
        before it disconnects still knows where to recover from.
        """
        name = self.patterns.stream_of_subscription(subscription)
        if name is None:
            return None
        return (name, *self.position(name))

    def recover(self, subscription: str, epoch: str, offset: int, now: float) -> Recovery:
        """What a subscribe with ``recover: {epoch, offset}`` gets.

        Raises :class:`HistoryError` (``invalid_message``) when ``subscription``
        does not lie inside one stream. The answer holds until the next publish:
        take it in the same step as adding the subscription, so every later
        publish is delivered live and none is both.
        """
        name = self._stream_of_request(subscription)
        stream = self._read(name, now)
        if stream is None:
            current = self._epoch
            return Recovery(epoch == current and offset == 0, name, current, 0, [])
        pubs = stream.since(offset) if epoch == stream.epoch else None
        if pubs is None:
            return Recovery(False, name, stream.epoch, stream.offset, [])
        if subscription != name:
            pubs = [pub for pub in pubs if matches(subscription, pub.topic)]
        return Recovery(True, name, stream.epoch, stream.offset, pubs)

    def history(
        self,
        topic: str,
        limit: int,
        *,
        now: float,
        since: tuple[str, int] | None = None,
    ) -> HistoryPage:
        """What a ``history`` request gets: at most ``limit`` latest publications, oldest first.

        ``topic`` is read like a subscription (only publications it matches) and
        must lie inside one stream, else :class:`HistoryError`. With ``since``
        of the stream's epoch, only publications after its offset.
        """
        name = self._stream_of_request(topic)
        stream = self._read(name, now)
        epoch = self._epoch if stream is None else stream.epoch
        ignored = since is not None and since[0] != epoch
        if stream is None:
            return HistoryPage(name, epoch, 0, [], ignored)
        after = since[1] if since is not None and not ignored else None
        pubs = stream.latest(limit, after, None if topic == name else topic)
        return HistoryPage(name, epoch, stream.offset, pubs, ignored)

    def stats(self) -> HistoryStats:
        """A copy of the totals, for metrics."""
        return replace(self._stats)
