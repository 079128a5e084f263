"""Gap repair for shared history streams: deliver each offset once, in order (pure: no I/O).

A server receives a shared stream's publications live, each with the
(epoch, offset) the engine gave it. Pub/sub is at most once: a publication
can be missed while the engine restarts or the connection drops. Because the
engine also keeps every publication in the stream, a miss is repairable.
A :class:`GapTracker` holds, per stream, the last (epoch, offset) delivered:

- the next offset (``last + 1``) is delivered at once; an offset at or below
  ``last`` is a copy and is dropped;
- a jump starts a *repair*: later arrivals of that stream are held (at most
  ``max_held``; beyond that they are dropped, since the read fetches them
  again), and the caller reads the stream after ``last`` (:class:`Repair`)
  and hands each page to :meth:`GapTracker.fill`, which returns what to
  deliver, in order, and whether to read more;
- what the read shows is gone (trimmed, or lost with the engine) is counted
  in ``gaps``: the only losses left. What it restored is counted in
  ``repaired``;
- another epoch (the engine lost the stream and started afresh) resets the
  stream to offset 0 of that epoch, so its new publications are delivered
  from offset 1 (counted in ``resets``);
- :meth:`GapTracker.resync` (a new engine session: anything may have been
  missed meanwhile) repairs every tracked stream from its last offset.

Items are whatever the caller delivers (the server passes publishes).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_MAX_HELD = 10_000
DEFAULT_MAX_STREAMS = 65_536


@dataclass(frozen=True, slots=True)
class Repair:
    """Read ``stream`` after offset ``after`` (of ``epoch``) and :meth:`~GapTracker.fill`."""

    stream: str
    epoch: str
    after: int


class _State(Generic[T]):
    __slots__ = ("epoch", "held", "last", "overflow")

    def __init__(self, epoch: str, last: int) -> None:
        self.epoch = epoch
        self.last = last
        self.held: list[tuple[str, int, T]] | None = None
        """Arrivals during a repair (None: not repairing)."""
        self.overflow = False


class GapTracker(Generic[T]):
    """Per stream: the last delivered position, and what a repair holds (see the module)."""

    __slots__ = ("_max_held", "_max_streams", "_streams", "gaps", "repaired", "resets")

    def __init__(
        self, max_held: int = DEFAULT_MAX_HELD, max_streams: int = DEFAULT_MAX_STREAMS
    ) -> None:
        self._max_held = max(1, max_held)
        self._max_streams = max(1, max_streams)
        self._streams: OrderedDict[str, _State[T]] = OrderedDict()
        self.gaps = 0
        """Publications that could not be repaired (gone from the stream)."""
        self.repaired = 0
        """Publications missed live and delivered from the stream."""
        self.resets = 0
        """Times a stream's epoch changed under us (its earlier history was lost)."""

    def __len__(self) -> int:
        return len(self._streams)

    def position(self, stream: str) -> tuple[str, int] | None:
        """The last (epoch, offset) delivered of ``stream``, if it is tracked."""
        st = self._streams.get(stream)
        return None if st is None else (st.epoch, st.last)

    def repairing(self, stream: str) -> bool:
        """Whether arrivals of ``stream`` are being held for a repair."""
        st = self._streams.get(stream)
        return st is not None and st.held is not None

    def arrive(
        self, stream: str, epoch: str, offset: int, item: T
    ) -> tuple[list[T], Repair | None]:
        """A live arrival: what to deliver now, and the repair to start (if one must)."""
        streams = self._streams
        st = streams.get(stream)
        if st is None:
            if len(streams) >= self._max_streams:
                self._evict()
            streams[stream] = _State(epoch, offset)
            return [item], None
        streams.move_to_end(stream)
        held = st.held
        if held is not None:
            if len(held) < self._max_held:
                held.append((epoch, offset, item))
            else:
                st.overflow = True  # the read brings it back
            return [], None
        if epoch != st.epoch:
            self.resets += 1
            st.epoch, st.last = epoch, 0
        if offset <= st.last:
            return [], None
        if offset == st.last + 1:
            st.last = offset
            return [item], None
        st.held = [(epoch, offset, item)]
        return [], Repair(stream, st.epoch, st.last)

    def fill(
        self, stream: str, epoch: str, head: int, entries: Iterable[tuple[int, T]], more: bool
    ) -> tuple[list[T], Repair | None]:
        """A page of the repair's read: what to deliver, and the next read (None: done).

        ``epoch`` and ``head`` are the stream's position when it was read;
        ``entries`` its (offset, item) pairs after the repair's ``after``, oldest
        first; ``more`` says the page was full (there may be more to read).
        """
        st = self._streams.get(stream)
        if st is None:
            return [], None
        if st.held is None:
            st.held = []
        out: list[T] = []
        if epoch != st.epoch:
            # The stream was lost and started again: what we had is not comparable.
            self.resets += 1
            st.epoch, st.last = epoch, 0
            return out, Repair(stream, epoch, 0)
        # What arrived live meanwhile fills holes the read shows (it may have
        # been trimmed from the stream since).
        live = sorted((o, i) for e, o, i in st.held if e == st.epoch and o > st.last)
        k = 0
        for offset, item in entries:
            if offset <= st.last:
                continue
            while k < len(live) and live[k][0] < offset:
                o, held_item = live[k]
                k += 1
                if o <= st.last:
                    continue
                self.gaps += o - st.last - 1
                st.last = o
                out.append(held_item)
            if offset > st.last + 1:
                self.gaps += offset - st.last - 1
            st.last = offset
            out.append(item)
            self.repaired += 1
        if more:
            return out, Repair(stream, epoch, st.last)
        # The read saw everything the stream had up to ``head``: what it lacked
        # there is gone, unless it arrived live meanwhile (held).
        held, st.held = st.held, None
        for i, (e, offset, item) in enumerate(held):
            if e != st.epoch:
                self.resets += 1
                st.epoch, st.last, head = e, 0, 0
            if offset <= st.last:
                continue
            if offset <= head:
                self.gaps += offset - st.last - 1
            else:
                if st.last < head:
                    self.gaps += head - st.last
                    st.last = head
                if offset > st.last + 1:
                    # Published after the read and missed live: read again.
                    st.held = held[i:]
                    return out, Repair(stream, st.epoch, st.last)
            st.last = offset
            out.append(item)
        if st.last < head:
            self.gaps += head - st.last
            st.last = head
        if st.overflow:
            st.overflow = False
            st.held = []
            return out, Repair(stream, st.epoch, st.last)
        return out, None

    def abandon(self, stream: str) -> list[T]:
        """A repair that cannot go on (the engine is gone): stop holding, return what was held.

        The stream stays tracked at its last offset, so :meth:`resync` repairs
        it from there when the engine is back; what is returned is not
        delivered (the resync brings it from the stream, in order).
        """
        st = self._streams.get(stream)
        if st is None or st.held is None:
            return []
        held, st.held = st.held, None
        st.overflow = False
        return [item for _, _, item in held]

    def resync(self) -> list[Repair]:
        """A new engine session: repair every tracked stream that is not repairing already."""
        out: list[Repair] = []
        for name, st in self._streams.items():
            if st.held is None:
                st.held = []
                out.append(Repair(name, st.epoch, st.last))
        return out

    def forget(self, streams: Iterable[str]) -> None:
        """Stop tracking ``streams`` (local interest in them ended)."""
        for name in streams:
            self._streams.pop(name, None)

    def streams(self) -> list[str]:
        """The tracked streams (least recently active first)."""
        return list(self._streams)

    def _evict(self) -> None:
        for name, st in self._streams.items():
            if st.held is None:
                del self._streams[name]
                return
