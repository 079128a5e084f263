"""Permission patterns: parsing, the two matching rules, checkers and their cache (pure)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwsps.errors import PermissionsError
from dwsps.permissions import (
    DEFAULT_CACHE_SIZE,
    UNRESTRICTED,
    PermissionChecker,
    Permissions,
    checker_for,
    parse_permissions,
)
from dwsps.topics import TopicLimits, matches

# -- parsing ------------------------------------------------------------------


def test_parse_full_claim() -> None:
    perms = parse_permissions({"subscribe": ["news", "chat.*"], "publish": ["chat.*.msg"]})
    assert perms == Permissions(subscribe=("news", "chat.*"), publish=("chat.*.msg",))


def test_missing_key_grants_nothing_of_that_kind() -> None:
    assert parse_permissions({"subscribe": ["news"]}) == Permissions(("news",), ())
    assert parse_permissions({"publish": ["news"]}) == Permissions((), ("news",))
    assert parse_permissions({}) == Permissions.nothing()


def test_unknown_keys_are_ignored_and_duplicates_dropped() -> None:
    perms = parse_permissions({"subscribe": ["a", "b", "a"], "presence": ["x"]})
    assert perms == Permissions(("a", "b"), ())


def test_to_claim_round_trips() -> None:
    perms = Permissions(("news", "chat.*"), ("chat.*.msg",))
    assert parse_permissions(perms.to_claim()) == perms
    assert Permissions.everything().to_claim() == {"subscribe": ["*"], "publish": ["*"]}


@pytest.mark.parametrize(
    ("claim", "fragment"),
    [
        (None, "must be an object"),
        (["news"], "must be an object"),
        ("news", "must be an object"),
        ({"subscribe": "news"}, "'subscribe' must be an array"),
        ({"publish": {"news": 1}}, "'publish' must be an array"),
        ({"publish": None}, "'publish' must be an array"),
        ({"subscribe": [1]}, "bad 'subscribe' pattern: topic must be a string, not number"),
        ({"subscribe": ["news..uk"]}, "bad 'subscribe' pattern: empty level"),
        ({"publish": [""]}, "bad 'publish' pattern: topic is empty"),
        ({"publish": ["a b"]}, "whitespace"),
    ],
)
def test_bad_claims_raise_with_a_clear_message(claim: object, fragment: str) -> None:
    with pytest.raises(PermissionsError, match=fragment):
        parse_permissions(claim)


def test_pattern_limits_are_the_topic_limits() -> None:
    with pytest.raises(PermissionsError, match="longer than 8"):
        parse_permissions({"publish": ["x" * 9]}, limits=TopicLimits(max_length=8))
    assert parse_permissions({"publish": ["x" * 8]}, limits=TopicLimits(max_length=8))


def test_permissions_error_is_a_value_error() -> None:
    assert issubclass(PermissionsError, ValueError)


def test_everything_and_nothing() -> None:
    assert Permissions.everything() == Permissions(("*",), ("*",))
    assert Permissions.everything().is_everything
    assert Permissions.nothing() == Permissions((), ())
    assert not Permissions.nothing().is_everything
    assert not Permissions(("*",), ()).is_everything


# -- the rules, by the examples of PROTOCOL.md ----------------------------------


def check(subscribe: tuple[str, ...] = (), publish: tuple[str, ...] = ()) -> PermissionChecker:
    return PermissionChecker(Permissions(subscribe, publish))


@pytest.mark.parametrize(
    "subscription", ["news", "news.uk", "news.*", "news.uk.london", "news.*.x"]
)
def test_subscribe_pattern_news_permits(subscription: str) -> None:
    assert check(subscribe=("news",)).may_subscribe(subscription)


@pytest.mark.parametrize("subscription", ["*", "n", "newsroom", "*.uk", "sport", "news2"])
def test_subscribe_pattern_news_does_not_permit(subscription: str) -> None:
    assert not check(subscribe=("news",)).may_subscribe(subscription)


@pytest.mark.parametrize(
    ("pattern", "subscription", "permitted"),
    [
        ("*", "*", True),
        ("*", "anything.at.all", True),
        ("news.*", "news.uk", True),
        ("news.*", "news.*", True),
        ("news.*", "news.*.weather", True),
        ("news.*", "news", False),  # `news` matches `news` itself, which `news.*` does not
        ("news.*", "*", False),
        ("news.*", "*.uk", False),
        ("news.uk", "news.*", False),  # `*` in S is covered only by `*` in P
        ("*.weather", "news.weather", True),
        ("*.weather", "*.weather", True),
        ("*.weather", "news.*", False),
        ("news.*.weather", "news.uk.weather.today", True),
        ("news.*.weather", "news.uk", False),
    ],
)
def test_subscribe_rule_with_wildcards(pattern: str, subscription: str, permitted: bool) -> None:
    assert check(subscribe=(pattern,)).may_subscribe(subscription) is permitted


@pytest.mark.parametrize(
    ("pattern", "topic", "permitted"),
    [
        ("news", "news", True),
        ("news", "news.uk", True),
        ("news", "news.uk.london", True),
        ("news", "newsroom", False),
        ("news", "news2.uk", False),
        ("news", "sport", False),
        ("news.*", "news", False),
        ("news.*", "news.uk", True),
        ("news.*", "news.uk.london", True),
        ("news.*.weather", "news.uk.weather", True),
        ("news.*.weather", "news.fr.weather.today", True),
        ("news.*.weather", "news.uk.sport", False),
        ("*", "anything", True),
        ("*.x", "a.x.b", True),
        ("*.x", "a.y", False),
    ],
)
def test_publish_rule(pattern: str, topic: str, permitted: bool) -> None:
    assert check(publish=(pattern,)).may_publish(topic) is permitted


def test_kinds_are_independent() -> None:
    checker = check(subscribe=("news",), publish=("chat",))
    assert checker.may_subscribe("news.uk")
    assert not checker.may_publish("news.uk")
    assert checker.may_publish("chat.room")
    assert not checker.may_subscribe("chat.room")


def test_any_pattern_of_several_suffices() -> None:
    checker = check(publish=("a", "b.*", "c.*.d"))
    assert checker.may_publish("a.z")
    assert checker.may_publish("b.z")
    assert checker.may_publish("c.z.d")
    assert not checker.may_publish("c.z.e")
    assert not checker.may_publish("d")


def test_nothing_permits_nothing() -> None:
    checker = checker_for(Permissions.nothing())
    assert not checker.may_subscribe("news")
    assert not checker.may_subscribe("*")
    assert not checker.may_publish("news")


def test_everything_permits_everything() -> None:
    checker = checker_for(Permissions.everything())
    assert checker.may_subscribe("*")
    assert checker.may_subscribe("a.*.b")
    assert checker.may_publish("a.b.c")


# -- properties -----------------------------------------------------------------

# Small alphabets so that patterns, subscriptions and topics collide often.
LEVEL = st.sampled_from(["a", "b", "c"])
PATTERN_LEVEL = st.sampled_from(["a", "b", "c", "*"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map(".".join)
SUBSCRIPTION = st.lists(PATTERN_LEVEL, min_size=1, max_size=5).map(".".join)
PATTERNS = st.lists(SUBSCRIPTION, max_size=4).map(tuple)
# Every topic over the alphabet up to the maximum depth: the whole space to check against.
ALL_TOPICS = [
    ".".join(levels) for n in range(1, 6) for levels in itertools.product("abc", repeat=n)
]


@settings(max_examples=400, deadline=None)
@given(PATTERNS, SUBSCRIPTION)
def test_a_permitted_subscription_never_receives_outside_the_patterns(
    patterns: tuple[str, ...], subscription: str
) -> None:
    if not check(subscribe=patterns).may_subscribe(subscription):
        return
    for topic in ALL_TOPICS:
        if matches(subscription, topic):
            assert any(matches(p, topic) for p in patterns), (subscription, topic)


@settings(max_examples=400, deadline=None)
@given(SUBSCRIPTION, SUBSCRIPTION)
def test_the_subscribe_rule_is_exact(pattern: str, subscription: str) -> None:
    """Refused means: some topic the subscription matches lies outside the pattern."""
    if check(subscribe=(pattern,)).may_subscribe(subscription):
        return
    # "z" is outside the alphabet, so no literal pattern level equals it.
    witness = ".".join("z" if level == "*" else level for level in subscription.split("."))
    assert matches(subscription, witness)
    assert not matches(pattern, witness)


@settings(max_examples=400, deadline=None)
@given(PATTERNS, TOPIC)
def test_publish_is_the_subscription_rule(patterns: tuple[str, ...], topic: str) -> None:
    assert check(publish=patterns).may_publish(topic) is any(matches(p, topic) for p in patterns)


@settings(max_examples=200, deadline=None)
@given(PATTERNS, st.lists(st.one_of(TOPIC, SUBSCRIPTION), max_size=40))
def test_cached_answers_equal_fresh_answers(patterns: tuple[str, ...], topics: list[str]) -> None:
    cached = PermissionChecker(Permissions(patterns, patterns), cache_size=4)
    for topic in topics + topics:
        fresh = PermissionChecker(Permissions(patterns, patterns), cache_size=0)
        assert cached.may_subscribe(topic) is fresh.may_subscribe(topic)
        if "*" not in topic.split("."):
            assert cached.may_publish(topic) is fresh.may_publish(topic)
        assert cached.cached() <= 4


# -- checkers: sharing and the bounded cache ----------------------------------------


def test_unrestricted_connections_share_one_checker() -> None:
    assert checker_for(Permissions.everything()) is UNRESTRICTED
    assert checker_for(Permissions(("*",), ("*",))) is UNRESTRICTED
    assert UNRESTRICTED.may_publish("x")
    UNRESTRICTED.may_subscribe("a.*")
    assert UNRESTRICTED.cached() == 0


def test_literal_only_permissions_share_a_checker_and_cache_nothing() -> None:
    a = checker_for(Permissions(("news",), ("news.uk",)))
    b = checker_for(Permissions(("news",), ("news.uk",)))
    assert a is b
    assert checker_for(Permissions.nothing()) is checker_for(Permissions((), ()))
    for i in range(50):
        a.may_publish(f"news.uk.{i}")
    assert a.cached() == 0


def test_wildcard_permissions_get_their_own_checker() -> None:
    perms = Permissions(("chat.*",), ("chat.*",))
    a, b = checker_for(perms), checker_for(perms)
    assert a is not b
    assert a.permissions == perms


def test_cache_is_bounded_when_a_client_cycles_topics() -> None:
    checker = checker_for(Permissions(("room.*",), ("room.*.msg",)), cache_size=16)
    for i in range(1000):
        assert checker.may_publish(f"room.{i}.msg")
        assert not checker.may_publish(f"room.{i}.other")
        assert checker.may_subscribe(f"room.{i}")
        assert checker.cached() <= 16
    assert checker.cached() == 16


def test_default_cache_bound() -> None:
    checker = checker_for(Permissions((), ("*.x",)))
    for i in range(DEFAULT_CACHE_SIZE * 3):
        checker.may_publish(f"t{i}.x")
    assert checker.cached() == DEFAULT_CACHE_SIZE


def test_one_cache_entry_holds_both_answers() -> None:
    checker = checker_for(Permissions(("a.*",), ("*.b",)), cache_size=8)
    assert checker.may_subscribe("a.b")
    assert checker.may_publish("a.b")
    assert checker.cached() == 1
    assert not checker.may_subscribe("c.b")
    assert checker.may_publish("c.b")
    assert checker.cached() == 2


def test_negative_cache_size_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        PermissionChecker(Permissions.nothing(), cache_size=-1)
