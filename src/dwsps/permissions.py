"""Permission patterns and their matching (pure: no I/O).

A connection holds two lists of patterns, written like subscription topics
(``*`` levels allowed):

* **publish**: pattern ``P`` permits publishing to topic ``T`` when ``P``
  matches ``T`` by the subscription rule (its levels are the first levels of
  ``T``, ``*`` standing for any one level).
* **subscribe**: pattern ``P`` permits subscription ``S`` when everything ``S``
  can ever match is matched by ``P``: ``P`` has at most as many levels as
  ``S`` and each level of ``P`` is ``*`` or equal to the same level of ``S``.
  A ``*`` in ``S`` is covered only by a ``*`` in ``P``, so ``news`` permits
  ``news``, ``news.uk`` and ``news.*`` but not ``*`` or ``n``.

Both rules are the same comparison level by level (a literal ``*`` level of
``S`` only equals a ``*`` of ``P``), which is why one matcher serves both.

Checks take topics that were already validated (the router validates first,
so an invalid topic is ``invalid_topic``, never ``forbidden``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Final

from dwsps.errors import PermissionsError, TopicError
from dwsps.topics import DEFAULT_LIMITS, WILDCARD, TopicLimits, validate

DEFAULT_CACHE_SIZE: Final = 128
"""Checked topics remembered per connection; bounded so cycling topics cannot grow it."""


@dataclass(frozen=True, slots=True)
class Permissions:
    """What a connection may subscribe to and publish to, as patterns."""

    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()

    EVERYTHING: ClassVar[Permissions]
    NOTHING: ClassVar[Permissions]

    @classmethod
    def everything(cls) -> Permissions:
        """Every subscription and every publish (the patterns ``*``)."""
        return cls.EVERYTHING

    @classmethod
    def nothing(cls) -> Permissions:
        """No subscription and no publish (empty pattern lists)."""
        return cls.NOTHING

    @property
    def is_everything(self) -> bool:
        """True when both lists contain ``*``, which permits anything of its kind."""
        return WILDCARD in self.subscribe and WILDCARD in self.publish

    def to_claim(self) -> dict[str, list[str]]:
        """The ``dwsps`` JWT claim (and introspection form) for these permissions."""
        return {"subscribe": list(self.subscribe), "publish": list(self.publish)}


Permissions.EVERYTHING = Permissions((WILDCARD,), (WILDCARD,))
Permissions.NOTHING = Permissions((), ())


def parse_permissions(obj: object, *, limits: TopicLimits = DEFAULT_LIMITS) -> Permissions:
    """Build :class:`Permissions` from a ``{"subscribe": [...], "publish": [...]}`` object.

    A missing key grants nothing of that kind; unknown keys are ignored so a
    newer issuer's extra claims do not lock clients out. Anything else that is
    off raises :class:`PermissionsError`.
    """
    if not isinstance(obj, Mapping):
        raise PermissionsError("permissions must be an object with 'subscribe' and 'publish'")
    return Permissions(
        subscribe=_patterns(obj, "subscribe", limits),
        publish=_patterns(obj, "publish", limits),
    )


def _patterns(obj: Mapping[object, object], key: str, limits: TopicLimits) -> tuple[str, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list | tuple):
        raise PermissionsError(f"'{key}' must be an array of topic patterns")
    out: dict[str, None] = {}
    for pattern in value:
        try:
            out[validate(pattern, subscription=True, limits=limits)] = None
        except TopicError as exc:
            raise PermissionsError(f"bad '{key}' pattern: {exc}") from None
    return tuple(out)


class _Rule:
    """One list of patterns, precompiled: literal prefixes checked by string, the rest by level."""

    __slots__ = ("_exact", "_prefixes", "everything", "wild")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.everything = WILDCARD in patterns
        literal = () if self.everything else tuple(p for p in patterns if not _has_wildcard(p))
        self._exact = frozenset(literal)
        self._prefixes = tuple(p + "." for p in literal)
        self.wild: tuple[tuple[str, ...], ...] = (
            ()
            if self.everything
            else tuple(tuple(p.split(".")) for p in patterns if _has_wildcard(p))
        )

    def __call__(self, topic: str) -> bool:
        if self.everything or topic in self._exact or topic.startswith(self._prefixes):
            return True
        if not self.wild:
            return False
        levels = topic.split(".")
        n = len(levels)
        for pattern in self.wild:
            if len(pattern) <= n and all(
                p in (WILDCARD, t) for p, t in zip(pattern, levels, strict=False)
            ):
                return True
        return False


def _has_wildcard(pattern: str) -> bool:
    return WILDCARD in pattern.split(".")


class _Rules:
    """Both compiled rules of one :class:`Permissions` value (shared by equal values)."""

    __slots__ = ("permissions", "publish", "stateless", "subscribe")

    def __init__(self, permissions: Permissions) -> None:
        self.permissions = permissions
        self.publish = _Rule(permissions.publish)
        self.subscribe = _Rule(permissions.subscribe)
        # Literal patterns cost a set lookup and a C-level prefix test: no cache pays off.
        self.stateless = not self.publish.wild and not self.subscribe.wild


# Bounded: tokens may carry any number of distinct permission sets over time.
@lru_cache(maxsize=256)
def _compile(permissions: Permissions) -> _Rules:
    return _Rules(permissions)


# Cache values: one small int per topic holds both answers (known / allowed bits).
_PUB_KNOWN, _PUB_OK, _SUB_KNOWN, _SUB_OK = 1, 2, 4, 8


class PermissionChecker:
    """Answers "may this connection publish / subscribe to T?".

    Patterns without ``*`` levels are answered directly. Patterns with ``*``
    levels cost a split and a comparison per pattern, so their answers are
    kept in a cache of at most ``cache_size`` topics (oldest evicted first).
    Get checkers from :func:`checker_for`: connections whose checks need no
    cache share one instance per permission set.
    """

    __slots__ = ("_cache", "_cache_size", "_publish", "_subscribe", "permissions")

    def __init__(self, permissions: Permissions, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        rules = _compile(permissions)
        self.permissions = rules.permissions
        self._publish = rules.publish
        self._subscribe = rules.subscribe
        self._cache_size = 0 if rules.stateless else cache_size
        # Created on first use: most connections check only a few topics, many none.
        self._cache: dict[str, int] | None = None

    def may_publish(self, topic: str) -> bool:
        """True when the connection may publish to the (valid) topic ``topic``."""
        rule = self._publish
        if rule.everything:
            return True
        if not rule.wild:
            return rule(topic)
        return self._cached(topic, rule, _PUB_KNOWN, _PUB_OK)

    def may_subscribe(self, topic: str) -> bool:
        """True when the connection may subscribe to the (valid) subscription ``topic``."""
        rule = self._subscribe
        if rule.everything:
            return True
        if not rule.wild:
            return rule(topic)
        return self._cached(topic, rule, _SUB_KNOWN, _SUB_OK)

    def cached(self) -> int:
        """How many topics the cache holds (for tests and introspection)."""
        return len(self._cache) if self._cache is not None else 0

    def _cached(self, topic: str, rule: _Rule, known: int, ok: int) -> bool:
        cache = self._cache
        if cache is None:
            if not self._cache_size:
                return rule(topic)
            cache = self._cache = {}
        bits = cache.get(topic, 0)
        if bits & known:
            return bool(bits & ok)
        allowed = rule(topic)
        if not bits and len(cache) >= self._cache_size:
            del cache[next(iter(cache))]
        cache[topic] = bits | known | (ok if allowed else 0)
        return allowed


@lru_cache(maxsize=256)
def _shared_checker(permissions: Permissions) -> PermissionChecker:
    return PermissionChecker(permissions)


UNRESTRICTED: Final = _shared_checker(Permissions.EVERYTHING)
"""The checker shared by every connection that may do everything."""


def checker_for(
    permissions: Permissions, *, cache_size: int = DEFAULT_CACHE_SIZE
) -> PermissionChecker:
    """The checker for a new connection: a shared one when it needs no cache, else its own."""
    if _compile(permissions).stateless:
        return _shared_checker(permissions)
    return PermissionChecker(permissions, cache_size=cache_size)
