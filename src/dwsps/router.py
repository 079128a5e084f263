"""Routing: subscriptions, message identity and the fan-out plan (pure: no I/O).

The router is the one place that knows who is subscribed to what and who gets
which frame. It is generic over the subscriber handle (the server passes its
connections; tests pass strings) and is driven with plain values:

Subscriptions
    :meth:`Router.subscribe` / :meth:`Router.unsubscribe` / :meth:`Router.drop`
    keep the topic trie and each subscriber's own set together, and report the
    upstream interest changes (first-level channel keys going 0↔1, see
    :mod:`dwsps.interest`) to the listener given at construction.

Identity
    :meth:`Router.admit` gives every organic publish this server's identity
    (``origin`` = server id, ``seq`` = next number) and tells apart, for one
    that already carries an identity, the first arrival from a copy (a peer
    link's resend, or peering and a backplane both bringing it) and from our
    own publish coming back.

The fan-out plan
    :meth:`Router.match` lists ``(context, subscribers)`` for a published
    topic. The caller encodes one frame per context and hands it to
    :meth:`Router.batch`. Consecutive frames for the same subscriber set are
    gathered into one :class:`Batch` whose frames are joined once and shared
    by every member, so a delivery in the usual fan-out costs nothing per
    subscriber. The rules that keep every subscriber's frames in order:

    1. A batch holds frames for one subscriber set, as it was when the batch
       opened (``members`` is that set until a subscription changes while the
       batch is open, which copies it first; any subscription change also
       bumps the trie's version, and the next frame then opens a new batch).
       Closed batches are queued at once, so only the open one needs the copy:
       publishes do not pay for a snapshot of every subscriber set they reach.
    2. A frame for another set closes the open batch first.
    3. Before anything else is queued for a member of the open batch (an ack,
       an error), :meth:`Router.release` closes it.
    4. The caller closes it at the end of the loop turn (:meth:`Router.close_batch`).

    A closed batch is returned to the caller, who queues ``batch.data()`` on
    each of ``batch.members`` right away.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from enum import Enum
from typing import Generic, TypeVar

from dwsps.dedup import Deduplicator
from dwsps.errors import PermissionDenied, SubscriptionLimitError
from dwsps.interest import InterestCounter
from dwsps.messages import Publish
from dwsps.permissions import UNRESTRICTED, PermissionChecker
from dwsps.topics import SubscriptionTrie

C = TypeVar("C", bound=Hashable)

InterestListener = Callable[[str, bool], None]
"""Called with ``(channel key, wanted)`` when upstream interest in a key starts or ends."""


class Admission(Enum):
    """What :meth:`Router.admit` decided about a publish."""

    NEW = "new"
    """Deliver it (and forward it where it goes)."""
    DUPLICATE = "duplicate"
    """Its identity was seen before: drop it."""
    OWN = "own"
    """This server's own publish coming back (a backplane echo): drop it."""


class Batch(Generic[C]):
    """Frames for one subscriber set, sent as one buffer to each member."""

    __slots__ = ("frames", "members", "subscribers", "version")

    def __init__(self, subscribers: dict[C, None], frame: bytes, version: int) -> None:
        self.subscribers = subscribers
        self.members = subscribers  # copied by Router._freeze before the set changes
        self.frames = [frame]
        self.version = version

    def data(self) -> bytes:
        """The frames, joined."""
        frames = self.frames
        return frames[0] if len(frames) == 1 else b"".join(frames)


class Router(Generic[C]):
    """Subscriptions, identity and the fan-out plan of one server (see the module docstring)."""

    __slots__ = (
        "_dedup",
        "_interest",
        "_seq",
        "_subs",
        "_trie",
        "max_subscriptions",
        "max_subscriptions_total",
        "open_batch",
        "server_id",
    )

    def __init__(
        self,
        server_id: str,
        *,
        max_subscriptions: int = 1000,
        max_subscriptions_total: int = 0,
        on_interest: InterestListener | None = None,
        dedup: Deduplicator | None = None,
    ) -> None:
        self.server_id = server_id
        self.max_subscriptions = max_subscriptions
        self.max_subscriptions_total = max_subscriptions_total
        """Subscriptions held by all subscribers together, at most (0: no limit)."""
        self._trie: SubscriptionTrie[C] = SubscriptionTrie()
        # A subscriber's topics: the topic itself while it holds one (most hold one:
        # an empty set is 216 bytes per connection), a set from the second on.
        self._subs: dict[C, str | set[str]] = {}
        listener = on_interest or _ignore
        self._interest = InterestCounter(
            lambda key: listener(key, True), lambda key: listener(key, False)
        )
        self._seq = 0
        self._dedup = dedup or Deduplicator()
        self.open_batch: Batch[C] | None = None
        """The batch being filled (read-only outside: change it through the methods below)."""

    # -- subscriptions ------------------------------------------------------

    def subscribe(
        self, subscriber: C, topic: str, permissions: PermissionChecker = UNRESTRICTED
    ) -> bool:
        """Hold ``topic`` for ``subscriber``; False if it already was (idempotent).

        Raises :class:`PermissionDenied` when ``permissions`` do not cover
        ``topic``, :class:`SubscriptionLimitError` when the subscriber holds
        ``max_subscriptions`` already, or everyone ``max_subscriptions_total``.
        """
        if not permissions.may_subscribe(topic):
            raise PermissionDenied(f"not permitted to subscribe to {topic!r}")
        subs = self._subs.get(subscriber)
        if subs is not None and (subs == topic or (not isinstance(subs, str) and topic in subs)):
            return False
        total = self.max_subscriptions_total
        if total and len(self._trie) >= total:
            raise SubscriptionLimitError(total, "on this server")
        if subs is None:
            if self.max_subscriptions < 1:
                raise SubscriptionLimitError(self.max_subscriptions)
            self._subs[subscriber] = topic
        else:
            held = {subs} if isinstance(subs, str) else subs
            if len(held) >= self.max_subscriptions:
                raise SubscriptionLimitError(self.max_subscriptions)
            held.add(topic)
            self._subs[subscriber] = held
        self._freeze()
        self._trie.add(topic, subscriber)
        self._interest.add(topic)
        return True

    def unsubscribe(self, subscriber: C, topic: str) -> bool:
        """Release ``topic`` for ``subscriber``; False if it was not held (idempotent)."""
        subs = self._subs.get(subscriber)
        if subs is None:
            return False
        if isinstance(subs, str):
            if subs != topic:
                return False
            del self._subs[subscriber]
        else:
            if topic not in subs:
                return False
            subs.discard(topic)
            if not subs:
                del self._subs[subscriber]
        self._freeze()
        self._trie.remove(topic, subscriber)
        self._interest.remove(topic)
        return True

    def _freeze(self) -> None:
        """A subscription is about to change: the open batch keeps its members as they are."""
        batch = self.open_batch
        if batch is not None and batch.members is batch.subscribers:
            batch.members = batch.subscribers.copy()

    def _held(self, subscriber: C) -> tuple[str, ...] | set[str]:
        subs = self._subs.get(subscriber)
        if subs is None:
            return ()
        return (subs,) if isinstance(subs, str) else subs

    def drop(self, subscriber: C) -> list[str]:
        """Release everything ``subscriber`` holds (it went away); return those topics."""
        held = self._held(subscriber)
        self._subs.pop(subscriber, None)
        if held:
            self._freeze()
        for topic in held:
            self._trie.remove(topic, subscriber)
            self._interest.remove(topic)
        return sorted(held)

    def revoke(self, subscriber: C, permissions: PermissionChecker) -> list[str]:
        """Release what ``subscriber`` holds that ``permissions`` no longer cover; return it."""
        gone = [t for t in self._held(subscriber) if not permissions.may_subscribe(t)]
        for topic in gone:
            self.unsubscribe(subscriber, topic)
        return sorted(gone)

    def authorize_publish(self, permissions: PermissionChecker, topic: str) -> None:
        """Raise :class:`PermissionDenied` unless ``permissions`` cover publishing to ``topic``."""
        if not permissions.may_publish(topic):
            raise PermissionDenied(f"not permitted to publish to {topic!r}")

    def subscriptions(self, subscriber: C) -> frozenset[str]:
        """The topics ``subscriber`` holds."""
        return frozenset(self._held(subscriber))

    def subscriber_count(self) -> int:
        """Subscribers holding at least one subscription."""
        return len(self._subs)

    def __len__(self) -> int:
        """(topic, subscriber) pairs held."""
        return len(self._trie)

    def topics(self) -> list[str]:
        """Every topic some subscriber holds."""
        return list(self._trie.topics())

    def topic_counts(self) -> dict[str, int]:
        """Subscribers per subscription topic, sorted by topic."""
        return dict(sorted(self._trie.counts()))

    def interest(self) -> list[str]:
        """The channel keys with local interest, sorted."""
        return sorted(self._interest)

    def wants(self, key: str) -> bool:
        """Whether some local subscription needs channel ``key`` (or every channel)."""
        return key in self._interest

    # -- identity -----------------------------------------------------------

    def admit(self, pub: Publish) -> Admission:
        """Stamp an organic publish with this server's identity, or check the one it carries.

        A publish from a peer without identity fields (an original server)
        cannot be checked and is admitted as it is.
        """
        if pub.origin is None:
            if not pub.from_peer:
                self._seq += 1
                pub.origin, pub.seq = self.server_id, self._seq
            return Admission.NEW
        if pub.origin == self.server_id:
            return Admission.OWN
        if pub.seq is not None and not self._dedup.first_time(pub.origin, pub.seq):
            return Admission.DUPLICATE
        return Admission.NEW

    def forget_origin(self, origin: str) -> None:
        """Drop what the duplicate filter knows about ``origin``."""
        self._dedup.forget(origin)

    # -- the fan-out plan ---------------------------------------------------

    def match(self, topic: str) -> list[tuple[str, dict[C, None]]]:
        """``(context, subscribers)`` for every subscription matching ``topic``."""
        return self._trie.match(topic)

    def has_subscribers(self, topic: str) -> bool:
        """Whether any subscription matches ``topic``."""
        return bool(self._trie.match(topic))

    def batch(self, subscribers: dict[C, None], frame: bytes) -> Batch[C] | None:
        """Plan ``frame`` for ``subscribers`` (one context's set from :meth:`match`).

        Returns the batch this closed, if any: queue it before anything else.
        """
        version = self._trie.version
        batch = self.open_batch
        if batch is not None and batch.subscribers is subscribers and batch.version == version:
            batch.frames.append(frame)
            return None
        self.open_batch = Batch(subscribers, frame, version)
        return batch

    def release(self, member: C) -> Batch[C] | None:
        """Close the open batch if ``member`` is in it (something else is queued for it)."""
        batch = self.open_batch
        if batch is not None and member in batch.members:
            self.open_batch = None
            return batch
        return None

    def close_batch(self) -> Batch[C] | None:
        """Close the open batch (the end of the loop turn); return it, or None."""
        batch, self.open_batch = self.open_batch, None
        return batch


def _ignore(key: str, wanted: bool) -> None:
    pass
