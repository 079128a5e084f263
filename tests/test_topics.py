"""Topic validation and the subscription trie (pure: no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwsps.topics import (
    DEFAULT_LIMITS,
    SubscriptionTrie,
    TopicError,
    TopicLimits,
    matches,
    validate,
)

# -- validation ---------------------------------------------------------------

VALID = ["news", "news.uk", "news.uk.london", "a", "x" * 256, ".".join(["l"] * 32), "ñews.日本"]

INVALID = [
    ("", "empty"),
    ("news..uk", "empty level"),
    (".news", "empty level"),
    ("news.", "empty level"),
    (".", "empty level"),
    ("news uk", "whitespace"),
    ("news\tuk", "whitespace"),
    ("news\n", "whitespace"),
    (" news", "whitespace"),
    ("news\u00a0uk", "whitespace"),  # no-break space
    ("news\u2028uk", "whitespace"),  # line separator
    ("news\x00uk", "control"),
    ("news\x1buk", "control"),
    ("news\x7f", "control"),
    ("news\x85", "control"),  # C1 control
    ("x" * 257, "longer than 256"),
    (".".join(["l"] * 33), "more than 32 levels"),
]


@pytest.mark.parametrize("topic", VALID)
@pytest.mark.parametrize("subscription", [True, False])
def test_valid_topics_pass(topic: str, subscription: bool) -> None:
    assert validate(topic, subscription=subscription) == topic


@pytest.mark.parametrize(("topic", "why"), INVALID)
@pytest.mark.parametrize("subscription", [True, False])
def test_invalid_topics_rejected(topic: str, why: str, subscription: bool) -> None:
    with pytest.raises(TopicError) as info:
        validate(topic, subscription=subscription)
    # The detail says what was wrong, in words a client can act on.
    assert why.split()[0] in str(info.value) or why in str(info.value)


@pytest.mark.parametrize("value", [None, 42, 1.5, True, ["news"], {"t": "news"}])
def test_non_string_topic_rejected(value: object) -> None:
    with pytest.raises(TopicError, match="must be a string"):
        validate(value, subscription=True)


@pytest.mark.parametrize("topic", ["*", "news.*", "*.uk", "news.*.weather", "*.*.*"])
def test_wildcard_level_allowed_in_subscriptions_only(topic: str) -> None:
    assert validate(topic, subscription=True) == topic
    with pytest.raises(TopicError, match=r"'\*'"):
        validate(topic, subscription=False)


@pytest.mark.parametrize("topic", ["news*", "*news", "news.u*k", "**"])
def test_star_inside_a_level_is_an_ordinary_character(topic: str) -> None:
    # Only a level that is exactly '*' is a wildcard.
    assert validate(topic, subscription=False) == topic


def test_default_limits_are_256_characters_and_32_levels() -> None:
    assert TopicLimits(max_length=256, max_levels=32) == DEFAULT_LIMITS


def test_limits_are_configurable() -> None:
    small = TopicLimits(max_length=10, max_levels=3)
    assert validate("a.b.c", subscription=True, limits=small) == "a.b.c"
    assert validate("x" * 10, subscription=True, limits=small)
    with pytest.raises(TopicError, match="longer than 10"):
        validate("x" * 11, subscription=True, limits=small)
    with pytest.raises(TopicError, match="more than 3 levels"):
        validate("a.b.c.d", subscription=True, limits=small)
    big = TopicLimits(max_length=1000, max_levels=100)
    assert validate(".".join(["l"] * 100), subscription=False, limits=big)
    assert validate("x" * 1000, subscription=False, limits=big)


# -- the reference matcher ------------------------------------------------------


@pytest.mark.parametrize(
    ("sub", "topic", "expected"),
    [
        ("news", "news", True),
        ("news", "news.uk", True),
        ("news", "news.uk.london", True),
        ("news", "newsroom", False),
        ("news", "news2.uk", False),
        ("news", "sport", False),
        ("news.uk", "news", False),
        ("news.uk", "news.uk.london", True),
        ("news.*.weather", "news.uk.weather", True),
        ("news.*.weather", "news.fr.weather.today", True),
        ("news.*.weather", "news.uk.sport", False),
        ("news.*.weather", "news.weather", False),
        ("*", "anything", True),
        ("*", "any.thing", True),
        ("*.uk", "news.uk", True),
        ("*.uk", "news.fr", False),
    ],
)
def test_reference_matcher(sub: str, topic: str, expected: bool) -> None:
    assert matches(sub, topic) is expected


# -- the trie -------------------------------------------------------------------


def brute_match(subscription: str, topic: str) -> bool:
    """Independent of dwsps.topics: level-prefix with single-level '*'."""
    s = subscription.split(".")
    t = topic.split(".")
    return len(s) <= len(t) and all(a == "*" or a == b for a, b in zip(s, t, strict=False))


def trie_pairs(trie: SubscriptionTrie[str], topic: str) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for context, subscribers in trie.match(topic):
        for sub in subscribers:
            out.add((context, sub))
    return out


def test_match_gives_one_entry_per_matching_subscription() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.add("news", "c1")
    trie.add("news.uk", "c1")
    trie.add("news.*", "c2")
    trie.add("news.uk.london", "c3")
    trie.add("newsroom", "c4")
    result = trie.match("news.uk")
    contexts = [context for context, _ in result]
    assert sorted(contexts) == ["news", "news.*", "news.uk"]
    assert {c: list(s) for c, s in result} == {
        "news": ["c1"],
        "news.uk": ["c1"],
        "news.*": ["c2"],
    }
    assert trie.match("sport") == []
    assert trie.match("newsroom") == [("newsroom", {"c4": None})]


def test_add_and_remove_are_idempotent() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    assert trie.add("news", "c1") is True
    assert trie.add("news", "c1") is False
    assert len(trie) == 1
    assert trie_pairs(trie, "news") == {("news", "c1")}
    assert trie.remove("news", "c1") is True
    assert trie.remove("news", "c1") is False
    assert trie.remove("never.there", "c1") is False
    assert len(trie) == 0
    assert trie.match("news") == []


def test_unsubscribing_parent_leaves_child() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.add("news", "c1")
    trie.add("news.uk", "c1")
    trie.remove("news", "c1")
    assert trie_pairs(trie, "news.uk.london") == {("news.uk", "c1")}
    assert sorted(trie.topics()) == ["news.uk"]


def test_remove_prunes_empty_nodes() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.add("a.b.c.d", "c1")
    trie.add("a.b", "c2")
    trie.add("a.x.*", "c3")
    trie.remove("a.b.c.d", "c1")
    # Internal check: the branch c.d is gone, a.b (still subscribed) stays.
    node_a = trie._root.children["a"]  # type: ignore[index]
    node_b = node_a.children["b"]  # type: ignore[index]
    assert node_b.children is None
    trie.remove("a.b", "c2")
    trie.remove("a.x.*", "c3")
    assert trie._root.children is None
    assert len(trie) == 0
    assert list(trie.topics()) == []


def test_remove_of_a_prefix_node_that_is_not_subscribed_does_nothing() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.add("a.b", "c1")
    assert trie.remove("a", "c1") is False
    assert trie.remove("a.b", "c2") is False
    assert trie_pairs(trie, "a.b") == {("a.b", "c1")}


LEVELS = ["a", "b", "c"]
sub_topics = st.lists(st.sampled_from([*LEVELS, "*"]), min_size=1, max_size=4).map(".".join)
pub_topics = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=5).map(".".join)
subscribers = st.sampled_from(["s1", "s2", "s3"])


@settings(max_examples=300, deadline=None)
@given(subs=st.sets(st.tuples(sub_topics, subscribers), max_size=25), topic=pub_topics)
def test_trie_match_equals_brute_force(subs: set[tuple[str, str]], topic: str) -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    for sub, who in subs:
        trie.add(sub, who)
    expected = {(sub, who) for sub, who in subs if brute_match(sub, topic)}
    result = trie.match(topic)
    contexts = [context for context, _ in result]
    assert len(contexts) == len(set(contexts)), "a context came out twice"
    assert trie_pairs(trie, topic) == expected
    assert all(matches(sub, topic) == brute_match(sub, topic) for sub, _ in subs)


ops = st.lists(st.tuples(st.sampled_from(["add", "remove"]), sub_topics, subscribers), max_size=60)


@settings(max_examples=200, deadline=None)
@given(operations=ops, topics=st.lists(pub_topics, min_size=1, max_size=8))
def test_trie_follows_a_model_through_add_remove_sequences(
    operations: list[tuple[str, str, str]], topics: list[str]
) -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    model: set[tuple[str, str]] = set()
    for op, sub, who in operations:
        if op == "add":
            assert trie.add(sub, who) is ((sub, who) not in model)
            model.add((sub, who))
        else:
            assert trie.remove(sub, who) is ((sub, who) in model)
            model.discard((sub, who))
        assert len(trie) == len(model)
    assert sorted(trie.topics()) == sorted({sub for sub, _ in model})
    for topic in topics:
        assert trie_pairs(trie, topic) == {(s, w) for s, w in model if brute_match(s, topic)}
    # Removing everything prunes the trie back to an empty root.
    for sub, who in list(model):
        trie.remove(sub, who)
    assert trie._root.children is None
    assert len(trie) == 0
