"""Request rate limits, connection counts and origins (pure: time is a number)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwsps.limits import (
    ConnectionLimiter,
    OriginPolicy,
    RateLimit,
    RequestLimiter,
    TokenBucket,
    Verdict,
    origin_allowed,
)

# -- token bucket ------------------------------------------------------------------
from tests.support import compiled_refuses


def test_bucket_starts_full_and_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=2, burst=3)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(10.4)  # 0.8 of a token
    assert bucket.take(10.5)  # 1.0
    assert not bucket.take(10.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.take(100.0)
    assert not bucket.take(50.0)
    assert not bucket.take(100.5)
    assert bucket.take(101.0)


def test_exact_boundaries_with_awkward_rates_conform() -> None:
    bucket = TokenBucket(rate=1 / 3, burst=1)
    assert all(bucket.take(3.0 * i) for i in range(1000))
    bucket = TokenBucket(rate=10, burst=1)
    assert all(bucket.take(0.1 * i) for i in range(1000))


@pytest.mark.parametrize(
    ("rate", "burst", "fragment"),
    [
        (0, 1, "rate"),
        (-1, 1, "rate"),
        (float("inf"), 1, "rate"),
        (float("nan"), 1, "rate"),
        (1, 0, "burst"),
        (1, 1.5, "burst"),
        (1, True, "burst"),
    ],
)
def test_bucket_rejects_bad_settings(rate: float, burst: int, fragment: str) -> None:
    if compiled_refuses(burst, int):
        with pytest.raises(TypeError, match="int object expected"):
            TokenBucket(rate, burst)
        return
    with pytest.raises(ValueError, match=fragment):
        TokenBucket(rate, burst)


# Arrival times on a millisecond grid; gaps may be zero (requests in one read).
GAPS = st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=300)
RATES = st.sampled_from([0.5, 1.0, 3.0, 10.0, 100.0, 1 / 3])


def arrivals(gaps: list[int]) -> list[float]:
    out, t = [], 1000.0
    for gap in gaps:
        t += gap / 1000
        out.append(t)
    return out


@settings(max_examples=300, deadline=None)
@given(GAPS, RATES, st.integers(min_value=1, max_value=20))
def test_bucket_never_exceeds_burst_nor_the_rate(gaps: list[int], rate: float, burst: int) -> None:
    bucket = TokenBucket(rate, burst)
    times = arrivals(gaps)
    taken = [t for t in times if bucket.take(t)]
    assert 0 <= bucket.tokens <= burst
    # In any interval, at most burst + rate * length requests get through.
    for i, start in enumerate(taken):
        for j in range(i, len(taken)):
            assert j - i + 1 <= burst + rate * (taken[j] - start) + 1e-6


@settings(max_examples=300, deadline=None)
@given(GAPS, st.integers(min_value=1, max_value=10), st.sampled_from([0.5, 1.0, 3.0, 10.0]))
def test_traffic_within_every_window_is_never_refused(
    gaps: list[int], limit: int, window: float
) -> None:
    """At most `limit` arrivals in every half-open window of `window` seconds all conform."""
    times = arrivals(gaps)
    conforming: list[float] = []
    for t in times:
        recent = [u for u in conforming if u > t - window]
        if len(recent) < limit:
            conforming.append(t)
    bucket = TokenBucket(limit / window, limit)
    assert all(bucket.take(t) for t in conforming)


# -- request limiter -------------------------------------------------------------------


def test_request_limiter_verdicts() -> None:
    limiter = RequestLimiter(RateLimit(rate=1, burst=2, abuse_limit=3, abuse_window=30))
    verdicts = [limiter.check(5.0) for _ in range(6)]
    assert verdicts == [Verdict.ALLOW] * 2 + [Verdict.REFUSE] * 3 + [Verdict.CLOSE]


def test_refusals_are_forgiven_over_the_window() -> None:
    limiter = RequestLimiter(RateLimit(rate=1, burst=1, abuse_limit=2, abuse_window=10))
    assert limiter.check(0.0) is Verdict.ALLOW
    assert limiter.check(0.1) is Verdict.REFUSE
    assert limiter.check(0.2) is Verdict.REFUSE
    # Five seconds forgive one refusal (2 per 10 s); the bucket is full again too.
    assert limiter.check(5.2) is Verdict.ALLOW
    assert limiter.check(5.3) is Verdict.REFUSE
    assert limiter.check(5.4) is Verdict.CLOSE


def test_a_client_slightly_over_the_rate_is_refused_but_kept() -> None:
    limit = RateLimit(rate=10, burst=10, abuse_limit=5, abuse_window=10)
    limiter = RequestLimiter(limit)
    # 10.4 requests per second for a minute: about 0.4 refusals/s, under the 0.5/s forgiven.
    verdicts = [limiter.check(i / 10.4) for i in range(624)]
    assert Verdict.REFUSE in verdicts
    assert Verdict.CLOSE not in verdicts


def test_a_flood_is_closed_quickly() -> None:
    limiter = RequestLimiter(RateLimit(rate=10, burst=10))  # abuse: 50 in 10 s
    verdicts: list[Verdict] = []
    t = 0.0
    while not verdicts or verdicts[-1] is not Verdict.CLOSE:
        verdicts.append(limiter.check(t))
        t += 0.001  # 1000 requests per second
    assert t < 0.1
    assert verdicts.count(Verdict.REFUSE) == 50


@settings(max_examples=300, deadline=None)
@given(GAPS, RATES, st.integers(min_value=1, max_value=10), st.integers(1, 10))
def test_every_request_gets_exactly_one_answer(
    gaps: list[int], rate: float, burst: int, abuse_limit: int
) -> None:
    limiter = RequestLimiter(RateLimit(rate, burst, abuse_limit=abuse_limit, abuse_window=5.0))
    acked = rate_limited = sent = 0
    for t in arrivals(gaps):
        sent += 1
        verdict = limiter.check(t)
        if verdict is Verdict.ALLOW:
            acked += 1
        else:
            rate_limited += 1
        if verdict is Verdict.CLOSE:
            break
    assert acked + rate_limited == sent


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"rate": 0, "burst": 1}, "rate"),
        ({"rate": 1, "burst": 0}, "burst"),
        ({"rate": 1, "burst": 1, "abuse_limit": 0}, "abuse_limit"),
        ({"rate": 1, "burst": 1, "abuse_window": 0}, "abuse_window"),
        ({"rate": 1, "burst": 1, "abuse_window": float("inf")}, "abuse_window"),
    ],
)
def test_rate_limit_rejects_bad_settings(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        RateLimit(**kwargs)  # type: ignore[arg-type]


# -- connection limiter -------------------------------------------------------------------


def test_global_cap_gives_503() -> None:
    limiter = ConnectionLimiter(max_total=2)
    assert limiter.admit("10.0.0.1") is None
    assert limiter.admit("10.0.0.2") is None
    assert limiter.admit("10.0.0.3") == 503
    assert limiter.total == 2
    limiter.release("10.0.0.1")
    assert limiter.admit("10.0.0.3") is None


def test_per_ip_cap_gives_429() -> None:
    limiter = ConnectionLimiter(max_per_ip=2)
    assert limiter.admit("10.0.0.1") is None
    assert limiter.admit("10.0.0.1") is None
    assert limiter.admit("10.0.0.1") == 429
    assert limiter.admit("10.0.0.2") is None
    assert (limiter.count("10.0.0.1"), limiter.count("10.0.0.2"), limiter.total) == (2, 1, 3)


def test_global_cap_is_checked_first() -> None:
    limiter = ConnectionLimiter(max_total=1, max_per_ip=1)
    assert limiter.admit("a") is None
    assert limiter.admit("a") == 503
    assert limiter.count("a") == 1


def test_per_ip_entries_are_deleted_at_zero() -> None:
    limiter = ConnectionLimiter(max_per_ip=5)
    for i in range(1000):
        ip = f"10.0.{i // 256}.{i % 256}"
        assert limiter.admit(ip) is None
        limiter.release(ip)
    assert limiter.ips() == 0
    assert limiter.total == 0


def test_ipv4_mapped_ipv6_counts_as_ipv4() -> None:
    limiter = ConnectionLimiter(max_per_ip=1)
    assert limiter.admit("192.0.2.1") is None
    assert limiter.admit("::ffff:192.0.2.1") == 429
    assert limiter.admit("2001:DB8::1") is None
    assert limiter.admit("2001:db8:0::1") == 429
    limiter.release("::ffff:192.0.2.1")
    assert limiter.count("192.0.2.1") == 0


def test_unlimited_counts_only_the_total() -> None:
    limiter = ConnectionLimiter()
    for _ in range(100):
        assert limiter.admit("a") is None
    assert limiter.total == 100
    assert limiter.ips() == 0


def test_release_without_admit_is_a_bug() -> None:
    with pytest.raises(ValueError, match="without a matching admit"):
        ConnectionLimiter().release("a")
    limiter = ConnectionLimiter(max_per_ip=1)
    limiter.admit("a")
    with pytest.raises(ValueError, match="without a matching admit"):
        limiter.release("b")
    assert limiter.total == 1


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        ConnectionLimiter(max_total=-1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcd")), max_size=200))
def test_counts_match_a_model(ops: list[tuple[bool, str]]) -> None:
    limiter = ConnectionLimiter(max_total=6, max_per_ip=2)
    model: dict[str, int] = {}
    for is_admit, ip in ops:
        if is_admit:
            status = limiter.admit(ip)
            total = sum(model.values())
            expected = 503 if total >= 6 else 429 if model.get(ip, 0) >= 2 else None
            assert status == expected
            if status is None:
                model[ip] = model.get(ip, 0) + 1
        elif model.get(ip):
            limiter.release(ip)
            model[ip] -= 1
            if not model[ip]:
                del model[ip]
        assert limiter.total == sum(model.values())
        assert limiter.ips() == len(model)


# -- origins ---------------------------------------------------------------------------------

ALLOWED = ["https://app.example.com", "http://localhost:3000", "https://*.example.org"]


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # non-browser client
        ("https://app.example.com", True),
        ("HTTPS://APP.EXAMPLE.COM", True),
        ("https://app.example.com/", True),
        ("https://app.example.com:443", True),
        ("http://app.example.com", False),
        ("https://app.example.com:8443", False),
        ("https://evil.example.com", False),
        ("https://app.example.com.evil.net", False),
        ("http://localhost:3000", True),
        ("http://localhost", False),
        ("https://a.example.org", True),
        ("https://a.b.example.org", True),
        ("https://example.org", False),
        ("https://evilexample.org", False),
        ("http://a.example.org", False),
        ("null", False),
        ("", False),
        ("garbage", False),
        ("https://app.example.com/path", False),
        ("https://user@app.example.com", False),
        ("https://app.example.com?x", False),
        ("https://app.example.com extra", False),
        ("https://app.example.com:99999", False),
    ],
)
def test_origin_policy(origin: str | None, allowed: bool) -> None:
    assert origin_allowed(origin, ALLOWED) is allowed


def test_no_list_allows_everything() -> None:
    assert origin_allowed("https://anything.example", [])
    assert origin_allowed(None, ())


def test_star_allows_every_origin() -> None:
    assert OriginPolicy(["*"]).allows("https://anything.example")
    assert OriginPolicy(["https://a.example", "*"]).allows("null")


def test_configured_default_ports_and_ipv6() -> None:
    policy = OriginPolicy(["https://a.example:443", "http://[::1]:8080"])
    assert policy.allows("https://a.example")
    assert policy.allows("http://[::1]:8080")
    assert not policy.allows("http://[::1]")


@pytest.mark.parametrize(
    "entry",
    ["example.com", "https://", "https://a.com/path", "https://*", "https://a.*.com", "null", ""],
)
def test_bad_origin_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="origin"):
        OriginPolicy([entry])
