"""GCRA lives twice: in the Redis batch script (`apigw/redis/batch.lua`) and in process
(`apigw.policy.ratelimit.gcra`, for configs without Redis). Both must decide the same, step by step.

The script runs on a real Redis; only its clock is swapped for one the test sets (Redis's `TIME` cannot
be set), the rest of the script is the shipped text.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from apigw.config.model import Policy
from apigw.policy.ratelimit import LimitRule, gcra
from apigw.redis.batch import BATCH_LUA
from apigw.testkit.redis import RedisServer

REDIS_CLOCK = "local clock = redis.call('TIME')\nlocal now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])\n"
TEST_CLOCK = "local now = tonumber(ARGV[#ARGV])\n"
START = 1_800_000_000_000_000
"""Microseconds since the epoch around 2027: the size of the numbers Redis's clock gives."""


@pytest.fixture(scope="module")
def script() -> Iterator[redis.client.Script]:
    assert REDIS_CLOCK in BATCH_LUA, "the batch script reads Redis's clock differently: update this test"
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        yield client.register_script(BATCH_LUA.replace(REDIS_CLOCK, TEST_CLOCK))
        client.close()


@settings(max_examples=60, deadline=None)
@given(
    requests=st.integers(1, 20), period=st.integers(10, 120), burst=st.integers(0, 5),
    steps=st.lists(st.integers(0, 30_000_000), min_size=1, max_size=25),
)
def test_the_script_and_the_in_process_limiter_decide_alike(
    script: redis.client.Script, requests: int, period: int, burst: int, steps: list[int]
) -> None:
    """Steps are microseconds between requests; periods of 10 s and more keep Redis's own key expiry
    (real time) out of the way of the test's clock."""
    rule = LimitRule.from_policy(Policy(name="p", requests=requests, period=period, burst=burst))
    key = f"parity:{requests}:{period}:{burst}:{len(steps)}:{sum(steps)}"
    script.registered_client.delete(key)
    now, tat = START, None
    for step in steps:
        now += step
        allowed, tat_after, retry_in = gcra(rule, tat, now)
        tat = tat_after
        in_redis = script(keys=[key], args=["L", rule.interval, rule.capacity, now])
        assert in_redis == [int(allowed), tat_after - now, retry_in]


@settings(max_examples=40, deadline=None)
@given(
    policies=st.lists(st.tuples(st.integers(1, 20), st.integers(10, 7200), st.integers(0, 5)), min_size=2, max_size=3),
    steps=st.lists(st.tuples(st.integers(0, 30_000_000), st.integers(0, 2)), min_size=1, max_size=25),
)
def test_they_decide_alike_when_a_reload_changes_the_policy(
    script: redis.client.Script, policies: list[tuple[int, int, int]], steps: list[tuple[int, int]]
) -> None:
    """One bucket under policies of one name that reloads change back and forth (stricter, looser): the
    TAT a stricter one left behind is bounded alike by both, and stored alike, denials included."""
    rules = [LimitRule.from_policy(Policy(name="p", requests=r, period=p, burst=b)) for r, p, b in policies]
    key = f"parity-reload:{policies}:{steps}"
    script.registered_client.delete(key)
    now, tat = START, None
    for step, which in steps:
        rule = rules[which % len(rules)]
        now += step
        allowed, tat, retry_in = gcra(rule, tat, now)
        in_redis = script(keys=[key], args=["L", rule.interval, rule.capacity, now])
        assert in_redis == [int(allowed), tat - now, retry_in]
