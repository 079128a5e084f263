"""Topics: validation and the subscription trie (pure: no I/O).

A topic is levels joined by ``.``. A subscription ``S`` matches a published
topic ``P`` when the levels of ``S`` are a prefix of the levels of ``P``; a
subscription level that is exactly ``*`` matches any one level.

The trie has one node per subscription prefix. Matching walks the published
topic's levels once (plus one side branch per ``*`` child), so its cost grows
with topic depth and the number of matching subscriptions, never with the
number of subscribers or connections.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from dwsps.errors import TopicError

WILDCARD = "*"

# Whitespace and control characters (C0, DEL, C1, Unicode spaces and separators).
_BAD_CHAR = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029\u200b\ufeff]")


@dataclass(frozen=True, slots=True)
class TopicLimits:
    """Size limits for topics (both configurable on the server)."""

    max_length: int = 256
    max_levels: int = 32


DEFAULT_LIMITS = TopicLimits()


def validate(topic: object, *, subscription: bool, limits: TopicLimits = DEFAULT_LIMITS) -> str:
    """Return ``topic`` if valid, else raise :class:`TopicError`.

    ``subscription`` allows ``*`` levels; a published topic may not have them.
    """
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, not {_json_type(topic)}")
    if not topic:
        raise TopicError("topic is empty")
    if len(topic) > limits.max_length:
        raise TopicError(f"topic is longer than {limits.max_length} characters")
    if _BAD_CHAR.search(topic):
        raise TopicError(f"whitespace or control character in {topic!r}")
    if topic.count(".") >= limits.max_levels:
        raise TopicError(f"topic has more than {limits.max_levels} levels")
    # Split only when a level may be bad (this runs for every publish).
    if (
        topic[0] == "."
        or topic[-1] == "."
        or ".." in topic
        or (not subscription and WILDCARD in topic)
    ):
        for level in topic.split("."):
            if not level:
                raise TopicError(f"empty level in {topic!r}")
            if level == WILDCARD and not subscription:
                raise TopicError(f"'*' level in published topic {topic!r}")
    return topic


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


S = TypeVar("S")


class _Node(Generic[S]):
    """One subscription prefix: its children and who subscribed to exactly it."""

    __slots__ = ("children", "subscribers", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.children: dict[str, _Node[S]] | None = None
        # A dict keeps subscribe order, which keeps fan-out order deterministic.
        self.subscribers: dict[S, None] = {}


class SubscriptionTrie(Generic[S]):
    """Maps subscription topics to subscribers; finds the matches of a published topic."""

    __slots__ = ("_count", "_root", "version")

    def __init__(self) -> None:
        self._root: _Node[S] = _Node("")
        self._count = 0
        self.version = 0
        """Bumped by every change: lets callers tell whether what they matched still holds."""

    def __len__(self) -> int:
        """Number of (topic, subscriber) pairs held."""
        return self._count

    def add(self, topic: str, subscriber: S) -> bool:
        """Subscribe; return False if that pair was already held (idempotent)."""
        node = self._root
        for level in topic.split("."):
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(level)
            if child is None:
                child = children[level] = _Node(
                    level if node is self._root else f"{node.topic}.{level}"
                )
            node = child
        if subscriber in node.subscribers:
            return False
        node.subscribers[subscriber] = None
        self._count += 1
        self.version += 1
        return True

    def remove(self, topic: str, subscriber: S) -> bool:
        """Unsubscribe; return False if the pair was not held. Prunes empty nodes."""
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for level in topic.split("."):
            children = node.children
            if children is None or level not in children:
                return False
            path.append((node, level))
            node = children[level]
        if subscriber not in node.subscribers:
            return False
        del node.subscribers[subscriber]
        self._count -= 1
        self.version += 1
        for parent, level in reversed(path):
            child = parent.children[level] if parent.children else None
            if child is None or child.subscribers or child.children:
                break
            assert parent.children is not None
            del parent.children[level]
            if not parent.children:
                parent.children = None
        return True

    def match(self, topic: str) -> list[tuple[str, dict[S, None]]]:
        """Return ``(context, subscribers)`` for every subscription matching ``topic``.

        ``topic`` must be a valid published topic. Contexts come out in trie
        order, shallower first along each branch; each subscriber dict is the
        live set (do not mutate it while iterating).
        """
        out: list[tuple[str, dict[S, None]]] = []
        levels = topic.split(".")
        children = self._root.children
        if children is None:
            return out
        # Fast path: no wildcard child anywhere along the way needs no stack.
        stack: list[tuple[_Node[S], int]] = []
        node_children: dict[str, _Node[S]] | None = children
        depth = 0
        n = len(levels)
        while True:
            if node_children is None or depth == n:
                if not stack:
                    return out
                node, depth = stack.pop()
                if node.subscribers:
                    out.append((node.topic, node.subscribers))
                node_children = node.children
                continue
            wild = node_children.get(WILDCARD)
            if wild is not None:
                stack.append((wild, depth + 1))
            nxt = node_children.get(levels[depth])
            depth += 1
            if nxt is None:
                node_children = None
                continue
            if nxt.subscribers:
                out.append((nxt.topic, nxt.subscribers))
            node_children = nxt.children

    def topics(self) -> Iterator[str]:
        """Every subscription topic that has at least one subscriber."""
        for topic, _ in self.counts():
            yield topic

    def counts(self) -> Iterator[tuple[str, int]]:
        """``(subscription topic, number of subscribers)`` for every topic held."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.subscribers:
                yield node.topic, len(node.subscribers)
            if node.children:
                stack.extend(node.children.values())


def matches(subscription: str, topic: str) -> bool:
    """Reference matcher for one subscription (used by clients and tests)."""
    sub_levels = subscription.split(".")
    pub_levels = topic.split(".")
    if len(sub_levels) > len(pub_levels):
        return False
    return all(s in (WILDCARD, p) for s, p in zip(sub_levels, pub_levels, strict=False))
