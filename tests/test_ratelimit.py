"""The rate limiter against a real redis-server, and its in-process twin against the same table.

Time in the Redis tests: GCRA only compares a bucket's stored arrival time (TAT) with now, so moving every
stored TAT back by d is what d seconds passing would do. That lets both limiters run the same timed
scenarios without sleeps; the Redis clock still moves by the milliseconds the test takes, which the
scenarios leave room for (their intervals are seconds long).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv6Address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from redis.asyncio import Redis

from apigw.config.model import Config, FailureMode, LimitKey, Policy, RedisConfig
from apigw.http.errors import GatewayError
from apigw.observability.metrics import Metrics
from apigw.policy.ratelimit import (
    Decision,
    Limiter,
    LimitRule,
    MemoryLimiter,
    RedisLimiter,
    build_limiter,
    count,
    limit_key,
)
from apigw.redis.batch import BATCH_LUA, RedisBatch
from apigw.testkit.redis import RedisServer
from tests.test_redislink import RawRedis

IP = "ip:10.0.0.1"


def rule(requests: int, period: float, burst: int = 0, name: str = "p") -> LimitRule:
    return LimitRule.from_policy(Policy(name=name, requests=requests, period=period, burst=burst))


def client(server: RedisServer, timeout: float = 1.0) -> Redis:
    """redis-py, to look at and change what the limiter keeps in Redis."""
    return Redis.from_url(server.url, socket_timeout=timeout, socket_connect_timeout=timeout)


@pytest.fixture
async def make_batch() -> AsyncIterator[Callable[..., RedisBatch]]:
    """RedisBatch on a server, bounded by `timeout`; closed after the test."""
    made: list[RedisBatch] = []

    def make(server: RedisServer, timeout: float, **kwargs: Any) -> RedisBatch:
        made.append(RedisBatch(RedisConfig(url=server.url, timeout=timeout, connect_timeout=timeout, pool_size=8),
                               **kwargs))
        return made[-1]

    yield make
    for batch in made:
        await batch.aclose()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class Harness:
    """A limiter and a way to let time pass for it."""

    def __init__(self, limiter: Limiter, metrics: Metrics, advance: Callable[[float], Awaitable[None]]):
        self.limiter = limiter
        self.metrics = metrics
        self.advance = advance

    async def burst(self, limit_rule: LimitRule, times: int, key: str = IP) -> list[Decision]:
        """`times` decisions, each counted as the pipeline counts it once the response is out."""
        decisions = [await self.limiter.check(limit_rule, key) for _ in range(times)]
        for decision in decisions:
            count(self.metrics, decision)
        return decisions


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = client(redis_server)
    yield r
    await r.aclose()


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        now = [1_000.0]

        async def tick(seconds: float) -> None:
            now[0] += seconds

        metrics = Metrics()
        yield Harness(MemoryLimiter(lambda: now[0]), metrics, tick)
        return
    with RedisServer() as server:
        r = client(server)

        async def shift(seconds: float) -> None:
            async for bucket in r.scan_iter("ratelimit:*"):
                tat = int(await r.get(bucket))
                await r.set(bucket, tat - round(seconds * 1_000_000), keepttl=True)

        metrics = Metrics()
        batch = RedisBatch(RedisConfig(url=server.url, timeout=2.0))
        yield Harness(RedisLimiter(batch, metrics, FailureMode.fail_open), metrics, shift)
        await batch.aclose()
        await r.aclose()


# (policy: requests, period, burst), then steps: (seconds to let pass, checks, how many are allowed)
SCENARIOS = {
    "the limit at once, then denied": ((5, 3600, 0), [(0, 8, 5)]),
    "burst on top, then the steady rate": ((3, 3600, 2), [(0, 7, 5), (1800, 3, 1), (1200, 3, 1), (6000, 9, 5)]),
    "no second allowance at a fixed-window edge": ((10, 60, 0), [(59, 12, 10), (2, 10, 0), (5, 10, 1)]),
    "one per interval once spent": ((4, 8, 0), [(0, 5, 4), (1, 1, 0), (1, 1, 1), (1, 1, 0), (1, 1, 1), (9, 5, 4)]),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_allowance_over_time(harness: Harness, scenario: str) -> None:
    (requests, period, burst), steps = SCENARIOS[scenario]
    limit_rule = rule(requests, period, burst)
    for seconds, checks, allowed in steps:
        await harness.advance(seconds)
        decisions = await harness.burst(limit_rule, checks)
        assert [d.allowed for d in decisions] == [True] * allowed + [False] * (checks - allowed)


async def test_no_window_holds_more_than_the_burst_plus_the_steady_rate(harness: Harness) -> None:
    """Clients hammering for 3 periods: at most `limit` pass within one interval, and within any span w at
    most limit - 1 + ceil(w / interval): no edge where a fixed window would let a second `limit` through."""
    limit_rule = rule(requests=4, period=8, burst=1)  # limit 5, one every 2 s
    passed: list[float] = []
    for step in range(48):
        t = step * 0.5
        passed += [t for d in await harness.burst(limit_rule, 3) if d.allowed]
        await harness.advance(0.5)
    assert len(passed) == 5 + 11  # the burst, then one every 2 s from t=2 to t=22
    for span in (0.5, 1.5, 2, 7.5, 8, 16):
        most = max(sum(1 for p in passed if start <= p < start + span) for start in passed)
        assert most <= 5 - 1 + math.ceil(span / 2)


async def test_headers_of_allowed_and_denied_decisions(harness: Harness) -> None:
    decisions = await harness.burst(rule(requests=5, period=3600), 6)  # one request every 720 s
    assert decisions[0].headers() == {"RateLimit-Limit": "5", "RateLimit-Remaining": "4", "RateLimit-Reset": "720"}
    assert decisions[1].headers()["RateLimit-Remaining"] == "3"
    assert decisions[4].headers() == {"RateLimit-Limit": "5", "RateLimit-Remaining": "0", "RateLimit-Reset": "3600"}
    denied = decisions[5]
    assert not denied.allowed and denied.remaining == 0
    assert 719 < denied.retry_after <= 720
    assert denied.headers() == {
        "RateLimit-Limit": "5", "RateLimit-Remaining": "0", "RateLimit-Reset": "3600", "Retry-After": "720",
    }
    error = denied.error()
    assert (error.status, error.error_type, error.headers["Retry-After"]) == (429, "limit_exceeded", "720")


async def test_retry_after_is_at_least_one_second(harness: Harness) -> None:
    limit_rule = rule(requests=2, period=1)  # one every 500 ms
    denied = (await harness.burst(limit_rule, 3))[-1]
    assert not denied.allowed and 0 < denied.retry_after <= 0.5
    assert denied.headers()["Retry-After"] == "1"


async def test_keys_and_policies_have_their_own_budgets(harness: Harness) -> None:
    first, second = rule(2, 3600, name="first"), rule(2, 3600, name="second")
    assert [d.allowed for d in await harness.burst(first, 3)] == [True, True, False]
    assert [d.allowed for d in await harness.burst(first, 3, key="ip:10.0.0.2")] == [True, True, False]
    assert [d.allowed for d in await harness.burst(second, 3)] == [True, True, False]


async def test_a_policy_loosened_by_a_reload_applies_to_buckets_spent_under_the_old_one(harness: Harness) -> None:
    """The on-call engineer raises a policy (same name) from 1 an hour to 100 a minute: a client spent
    under the old one must wait at most the new interval (0.6 s), not the rest of the old hour. Under one
    policy a bucket's TAT never runs more than `capacity` ahead of now, so the new policy's bound holds."""
    strict, loose = rule(requests=1, period=3600), rule(requests=100, period=60)
    assert [d.allowed for d in await harness.burst(strict, 2)] == [True, False]
    denied = (await harness.burst(loose, 1))[0]
    assert not denied.allowed
    assert denied.retry_after <= 0.6 and denied.reset_after <= 60
    assert denied.headers()["Retry-After"] == "1"
    await harness.advance(1)
    assert (await harness.burst(loose, 1))[0].allowed


async def test_buckets_live_under_ratelimit_and_expire_when_full(redis: Redis, redis_server: RedisServer, make_batch) -> None:
    limiter = RedisLimiter(make_batch(redis_server, 2.0), Metrics(), FailureMode.fail_open)
    limit_rule = rule(requests=5, period=3600)
    await limiter.check(limit_rule, IP)
    assert [k async for k in redis.scan_iter("*")] == [b"ratelimit:p:ip:10.0.0.1"]
    assert 719_000 < await redis.pttl("ratelimit:p:ip:10.0.0.1") <= 720_000
    for _ in range(5):
        await limiter.check(limit_rule, IP)
    assert 3_599_000 < await redis.pttl("ratelimit:p:ip:10.0.0.1") <= 3_600_000


async def test_a_hostile_key_cannot_bloat_redis(redis: Redis, redis_server: RedisServer, make_batch) -> None:
    limiter = RedisLimiter(make_batch(redis_server, 2.0), Metrics(), FailureMode.fail_open)
    limit_rule = rule(requests=1, period=3600)
    hostile = "claim:" + "x" * 100_000
    assert (await limiter.check(limit_rule, hostile)).allowed
    assert not (await limiter.check(limit_rule, hostile)).allowed
    assert (await limiter.check(limit_rule, "claim:\udcff \n*\r\n")).allowed
    keys = [k async for k in redis.scan_iter("ratelimit:*")]
    assert len(keys) == 2 and all(len(k) <= len("ratelimit:p:#") + 32 for k in keys)


async def test_the_runbooks_scan_and_del_resets_the_limits(redis: Redis, redis_server: RedisServer, make_batch) -> None:
    limiter = RedisLimiter(make_batch(redis_server, 2.0), Metrics(), FailureMode.fail_open)
    limit_rule = rule(requests=3, period=3600)
    for key in (IP, "ip:10.0.0.2"):
        assert [d.allowed for d in [await limiter.check(limit_rule, key) for _ in range(4)]][-1] is False
    await redis.set("other", "kept")
    # redis-cli --scan --pattern "ratelimit:*" | xargs redis-cli DEL
    await redis.delete(*[k async for k in redis.scan_iter(match="ratelimit:*")])
    decision = await limiter.check(limit_rule, IP)
    assert decision.allowed and decision.remaining == 2
    assert await redis.get("other") == b"kept"


async def test_two_replicas_together_allow_the_limit(redis_server: RedisServer, make_batch) -> None:
    """Two clients (as two gateway replicas would hold) race 800 checks on one bucket."""
    metrics = Metrics()
    limiters = [RedisLimiter(make_batch(redis_server, 5.0), metrics, FailureMode.fail_closed) for _ in range(2)]
    limit_rule = rule(requests=300, period=3600)  # a refill every 12 s: none during the test
    decisions = await asyncio.gather(*[limiters[i % 2].check(limit_rule, IP) for i in range(800)])
    for decision in decisions:
        count(metrics, decision)
    allowed = sum(d.allowed for d in decisions)
    assert abs(allowed - 300) <= max(1, 300 // 100)
    assert sample(metrics, "gateway_ratelimit_requests_total", policy="p", decision="allowed") == allowed
    assert sample(metrics, "gateway_ratelimit_requests_total", policy="p", decision="limited") == 800 - allowed


async def test_decisions_are_counted_and_timed(harness: Harness) -> None:
    await harness.burst(rule(requests=2, period=3600), 3)
    metrics = harness.metrics
    assert sample(metrics, "gateway_ratelimit_requests_total", policy="p", decision="allowed") == 2
    assert sample(metrics, "gateway_ratelimit_requests_total", policy="p", decision="limited") == 1
    assert sample(metrics, "gateway_ratelimit_duration_seconds_count") == 3


async def test_a_slow_round_trip_is_logged_with_its_duration(
    redis_server: RedisServer, make_batch, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisLimiter(make_batch(redis_server, 2.0, slow=0.0), Metrics(), FailureMode.fail_open)
    with caplog.at_level(logging.WARNING, logger="apigw.ratelimit"):
        await limiter.check(rule(requests=2, period=3600), IP)
    [record] = caplog.records
    assert "ratelimit" in record.getMessage() and "duration" in record.getMessage()
    assert record.fields["checks"] == 1 and isinstance(record.fields["duration_ms"], float)  # type: ignore[attr-defined]


# --- faults: a real redis-server stopped, paused (SIGSTOP) and restarted ------------------------


async def checks_during(
    server: RedisServer, fault: str, failure_mode: FailureMode, caplog: pytest.LogCaptureFixture
) -> tuple[list[Decision | GatewayError], Metrics]:
    """Three decisions while Redis suffers `fault`, each bounded by 5 s (a hang fails the test)."""
    batch = RedisBatch(RedisConfig(url=server.url, timeout=0.25, connect_timeout=0.25))
    metrics = Metrics()
    limiter = RedisLimiter(batch, metrics, failure_mode)
    limit_rule = rule(requests=5, period=3600)
    assert (await limiter.check(limit_rule, IP)).allowed
    getattr(server, fault)()
    outcomes: list[Decision | GatewayError] = []
    with caplog.at_level(logging.ERROR, logger="apigw.ratelimit"):
        for _ in range(3):
            try:
                decision = await asyncio.wait_for(limiter.check(limit_rule, IP), 5)
                count(metrics, decision)  # as the pipeline does
                outcomes.append(decision)
            except GatewayError as error:
                outcomes.append(error)
    if fault == "pause":
        server.resume()
    await batch.aclose()
    return outcomes, metrics


@pytest.mark.parametrize("fault", ["stop", "pause"])
async def test_fail_open_lets_requests_through_and_counts_errors(
    redis_server: RedisServer, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes, metrics = await checks_during(redis_server, fault, FailureMode.fail_open, caplog)
    for decision in outcomes:
        assert isinstance(decision, Decision)
        assert decision.allowed and decision.degraded and decision.headers() == {}
    assert sample(metrics, "gateway_ratelimit_errors_total") == 3
    assert sample(metrics, "gateway_redis_errors_total", operation="ratelimit") == 3
    assert sample(metrics, "gateway_ratelimit_requests_total", policy="p", decision="error") == 3
    records = [r for r in caplog.records if r.name == "apigw.ratelimit"]
    assert len(records) == 3
    for record in records:
        assert "ratelimit" in record.getMessage() and "error" in record.getMessage()
        assert record.fields["failure_mode"] == "fail_open"  # type: ignore[attr-defined]


@pytest.mark.parametrize("fault", ["stop", "pause"])
async def test_fail_closed_answers_503(redis_server: RedisServer, fault: str, caplog: pytest.LogCaptureFixture) -> None:
    outcomes, metrics = await checks_during(redis_server, fault, FailureMode.fail_closed, caplog)
    for error in outcomes:
        assert isinstance(error, GatewayError)
        assert (error.status, error.error_type) == (503, "ratelimit_unavailable")
    assert sample(metrics, "gateway_ratelimit_errors_total") == 3
    assert sample(metrics, "gateway_ratelimit_requests_total", policy="p", decision="error") == 3
    assert len([r for r in caplog.records if r.name == "apigw.ratelimit"]) == 3


async def test_recovers_after_a_pause_without_a_new_client(redis_server: RedisServer, make_batch) -> None:
    limiter = RedisLimiter(make_batch(redis_server, 0.25), Metrics(), FailureMode.fail_closed)
    limit_rule = rule(requests=5, period=3600)
    assert (await limiter.check(limit_rule, IP)).allowed
    redis_server.pause()
    with pytest.raises(GatewayError):
        await asyncio.wait_for(limiter.check(limit_rule, IP), 5)
    redis_server.resume()
    decision = await limiter.check(limit_rule, IP)
    assert decision.allowed and not decision.degraded


async def test_recovers_after_a_restart_and_reloads_the_script(redis_server: RedisServer, make_batch) -> None:
    """A restart drops every pooled connection and the script cache; no decision fails for it."""
    r = client(redis_server, timeout=0.25)
    limiter = RedisLimiter(make_batch(redis_server, 0.25), Metrics(), FailureMode.fail_closed)
    limit_rule = rule(requests=5, period=3600)
    await asyncio.gather(*[limiter.check(limit_rule, IP) for _ in range(6)])  # several pooled connections
    redis_server.restart()
    decisions = await asyncio.gather(*[limiter.check(limit_rule, IP) for _ in range(6)])
    assert sorted(d.allowed for d in decisions) == [False] + [True] * 5  # state went with the restart
    assert await r.script_exists(hashlib.sha1(BATCH_LUA.encode()).hexdigest()) == [True]
    await r.aclose()


async def test_stopped_then_started_again(redis_server: RedisServer, make_batch) -> None:
    limiter = RedisLimiter(make_batch(redis_server, 0.25), Metrics(), FailureMode.fail_open)
    limit_rule = rule(requests=5, period=3600)
    redis_server.stop()
    assert (await asyncio.wait_for(limiter.check(limit_rule, IP), 5)).degraded
    redis_server.start()
    decision = await limiter.check(limit_rule, IP)
    assert decision.allowed and not decision.degraded and decision.remaining == 4


# --- keys, wiring, in-process state ---------------------------------------------------------------


def test_limit_key_by_client_ip_header_or_claim() -> None:
    headers = CIMultiDict({"X-Api-Key": "secret-key-1"})
    by_ip, by_claim = LimitKey(), LimitKey(type="claim", name="sub")
    by_header = LimitKey(type="header", name="x-api-key")
    assert limit_key(by_ip, "10.0.0.1", headers, {"sub": "alice"}) == "ip:10.0.0.1"
    header_key = limit_key(by_header, "10.0.0.1", headers, None)
    assert header_key.startswith("header:") and "secret" not in header_key
    assert header_key != limit_key(by_header, "10.0.0.1", CIMultiDict({"X-Api-Key": "secret-key-2"}), None)
    assert limit_key(by_claim, "10.0.0.1", headers, {"sub": "alice"}) == "claim:alice"


@pytest.mark.parametrize("claims", [None, {}, {"sub": ""}, {"sub": None}])
def test_a_missing_header_or_claim_spends_the_client_ips_budget(claims: dict[str, object] | None) -> None:
    assert limit_key(LimitKey(type="header", name="x-api-key"), "10.0.0.9", CIMultiDict(), None) == "ip:10.0.0.9"
    assert limit_key(LimitKey(type="claim", name="sub"), "10.0.0.9", CIMultiDict(), claims) == "ip:10.0.0.9"


def test_an_ipv6_client_rotating_addresses_inside_its_64_spends_one_budget() -> None:
    """An IPv6 host is given a /64 (2^64 addresses it may use at will, SLAAC privacy addresses rotate by
    themselves): one bucket per address lets one host through any client_ip policy, and a million distinct
    addresses are a million buckets in Redis or in the in-process limiter."""
    by_ip = LimitKey()
    first = limit_key(by_ip, "2001:db8:1:2::1", CIMultiDict(), None)
    assert first == limit_key(by_ip, "2001:db8:1:2:a1b2:c3d4:e5f6:789", CIMultiDict(), None)
    assert first != limit_key(by_ip, "2001:db8:1:3::1", CIMultiDict(), None)
    assert limit_key(by_ip, "::ffff:10.0.0.1", CIMultiDict(), None) == "ip:10.0.0.1"  # not every mapped IPv4's ::/64


def test_bucket_keys_stay_readable_unless_long_or_odd() -> None:
    """Redis keys are read by people (the runbook's `redis-cli KEYS "ratelimit:*"`); a hostile value is hashed."""
    p = rule(1, 1)
    assert p.bucket("ip:10.0.0.1") == p.prefix + "ip:10.0.0.1"
    assert p.bucket("ip:2001:db8:1:2::/64") == p.prefix + "ip:2001:db8:1:2::/64"
    for odd in ("claim:" + "a" * 80, "claim:a b", "claim:a\r\nb", "claim:ü"):
        hashed = p.bucket(odd)
        assert hashed.startswith(p.prefix + "#") and len(hashed) < len(p.prefix) + 70, odd


@given(st.one_of(st.text(min_size=1), st.integers(), st.floats(allow_nan=False), st.booleans(),
                 st.lists(st.text(), max_size=3)), st.one_of(st.text(min_size=1), st.integers(), st.booleans()))
def test_two_claim_values_share_a_budget_only_when_equal_and_of_one_type(a: object, b: object) -> None:
    """A claim key of `"1"` and `1`, or `true` and `"True"`, must not spend one budget: a token issuer may
    use both for different subjects."""
    by_claim = LimitKey(type="claim", name="sub")
    key_a, key_b = (limit_key(by_claim, "10.0.0.1", CIMultiDict(), {"sub": v}) for v in (a, b))
    assert (key_a == key_b) == (type(a) is type(b) and a == b)


@given(st.ip_addresses(v=6), st.ip_addresses(v=6))
def test_two_ipv6_clients_share_a_budget_exactly_when_they_share_a_64(a: IPv6Address, b: IPv6Address) -> None:
    mapped = a.ipv4_mapped is not None or b.ipv4_mapped is not None
    same_64 = int(a) >> 64 == int(b) >> 64
    key_a, key_b = (limit_key(LimitKey(), str(ip), CIMultiDict(), None) for ip in (a, b))
    assert (key_a == key_b) == (a == b if mapped else same_64)


async def test_build_limiter_follows_the_config(redis: Redis, redis_server: RedisServer, make_batch) -> None:
    metrics = Metrics()
    assert build_limiter(Config.model_validate({"ratelimit": {"enabled": False}}), metrics, make_batch(redis_server, 1.0)) is None
    assert isinstance(build_limiter(Config(), metrics, None), MemoryLimiter)
    with_redis = Config.model_validate({"redis": {}, "ratelimit": {"failure_mode": "fail_closed"}})
    assert isinstance(build_limiter(with_redis, metrics, make_batch(redis_server, 1.0)), RedisLimiter)
    with pytest.raises(ValueError, match="config.redis"):
        build_limiter(with_redis, metrics, None)


async def test_memory_limiter_forgets_full_buckets() -> None:
    now = [0.0]
    limiter = MemoryLimiter(lambda: now[0])
    limit_rule = rule(requests=1, period=1)
    for i in range(5000):
        await limiter.check(limit_rule, f"ip:10.0.{i // 256}.{i % 256}")
    now[0] = 2.0
    for i in range(5000):
        await limiter.check(limit_rule, f"claim:user{i}")
    assert len(limiter._tats) < 10_000  # the first 5000, full again, were swept


async def test_memory_limiter_keeps_at_most_its_cap_the_last_set_first(caplog: pytest.LogCaptureFixture) -> None:
    """A client minting keys (header values, IPv6 networks) must not grow the in-process limiter without
    bound: past its cap the buckets set longest ago are forgotten (they start full), the busy ones kept."""
    limiter = MemoryLimiter(lambda: 0.0, most=2048)
    one_an_hour = rule(requests=1, period=3600)
    assert (await limiter.check(one_an_hour, "ip:busy")).allowed
    for i in range(10_000):
        await limiter.check(one_an_hour, f"header:minted{i}")
        if i % 100 == 0:
            assert not (await limiter.check(one_an_hour, "ip:busy")).allowed  # set again: among the last
        assert len(limiter._tats) <= 2048
    assert (await limiter.check(one_an_hour, "header:minted0")).allowed  # forgotten: full again
    assert not (await limiter.check(one_an_hour, "header:minted9999")).allowed
    assert "live buckets, keeping the 1024 last set" in caplog.text


@pytest.mark.parametrize("mode", [FailureMode.fail_open, FailureMode.fail_closed])
async def test_an_answer_with_a_nil_inside_follows_the_failure_mode(mode: FailureMode) -> None:
    """A Redis (or a proxy) that answers the script with a nil where a number is due: a counted error and
    the configured failure mode, not a TypeError (a 500) out of the decision's arithmetic."""
    async with RawRedis([b"*3\r\n:1\r\n$-1\r\n:0\r\n"]) as raw:
        batch = RedisBatch(RedisConfig(url=raw.url, timeout=1.0, connect_timeout=1.0))
        metrics = Metrics()
        try:
            outcome: Decision | GatewayError = await RedisLimiter(batch, metrics, mode).check(rule(5, 60), IP)
        except GatewayError as error:
            outcome = error
        if mode is FailureMode.fail_open:
            assert isinstance(outcome, Decision) and outcome.degraded
        else:
            assert isinstance(outcome, GatewayError) and outcome.error_type == "ratelimit_unavailable"
        assert sample(metrics, "gateway_ratelimit_errors_total") == 1
        await batch.aclose()
