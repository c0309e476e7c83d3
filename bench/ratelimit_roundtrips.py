"""Rate limit decisions per second, and Redis round trips per decision, against a real redis-server.

    PYTHONPATH=dataplane python bench/ratelimit_roundtrips.py [--decisions 20000] [--concurrency 50]

Round trips: the commands Redis received from clients, per decision, seen with MONITOR in a separate
run (MONITOR slows Redis down). `INFO commandstats` cannot tell them apart from the TIME/GET/SET the Lua
script calls inside Redis, so it only gives the EVALSHA count, printed as a cross-check.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from apigw.config.model import FailureMode, Policy, RedisConfig
from apigw.observability.metrics import Metrics
from apigw.policy.ratelimit import Limiter, LimitRule, MemoryLimiter, RedisLimiter
from apigw.redis.batch import RedisBatch
from apigw.testkit.redis import RedisServer


async def evalsha_calls(redis: Redis) -> int:
    return (await redis.info("commandstats")).get("cmdstat_evalsha", {"calls": 0})["calls"]


HANDSHAKE = ("HELLO", "CLIENT SETINFO")
"""What a new pooled connection sends once: not part of any decision."""


async def client_commands(redis: Redis, decide: Callable[[], Awaitable[object]]) -> int:
    """How many commands clients sent Redis while `decide` ran (not those a script called inside Redis)."""
    end = "bench-end"
    async with redis.monitor() as monitor:
        await decide()
        await redis.echo(end)
        count = 0
        while (command := await monitor.next_command())["command"] != f"ECHO {end}":
            count += command["client_type"] != "lua" and not command["command"].startswith(HANDSHAKE)
    return count


async def run(limiter: Limiter, rule: LimitRule, decisions: int, concurrency: int) -> tuple[float, int]:
    """Decisions/s over `concurrency` workers, each its own client key; and how many were allowed."""
    allowed = 0

    async def worker(index: int) -> None:
        nonlocal allowed
        key = f"ip:10.0.{index // 256}.{index % 256}"
        for _ in range(decisions // concurrency):
            allowed += (await limiter.check(rule, key)).allowed

    started = time.perf_counter()
    await asyncio.gather(*[worker(i) for i in range(concurrency)])
    return decisions / (time.perf_counter() - started), allowed


async def main(decisions: int, concurrency: int) -> None:
    logging.getLogger("apigw.ratelimit").setLevel(logging.ERROR)  # a loaded 2-core box logs slow round trips
    rule = LimitRule.from_policy(Policy(name="bench", requests=100, period=1))
    decisions -= decisions % concurrency
    with RedisServer() as server:
        redis = Redis.from_url(server.url)  # to count commands
        batch = RedisBatch(RedisConfig(url=server.url, pool_size=concurrency, timeout=1.0))
        limiter = RedisLimiter(batch, Metrics(), FailureMode.fail_closed)
        await limiter.check(rule, "warm-up")  # loads the script once, as the first request after a restart does
        before = await evalsha_calls(redis)
        rate, allowed = await run(limiter, rule, decisions, concurrency)
        evalsha = await evalsha_calls(redis) - before
        sample = 1000 - 1000 % concurrency
        commands = await client_commands(redis, lambda: run(limiter, rule, sample, concurrency))
        await redis.aclose()
        await batch.aclose()
    print(f"redis:  {rate:10.0f} decisions/s  ({decisions} decisions, {concurrency} concurrent, {allowed} allowed)")
    print(f"        {commands / sample:.3f} round trips/decision (MONITOR, {sample} decisions), "
          f"{evalsha / decisions:.3f} EVALSHA/decision (INFO commandstats)")
    memory = MemoryLimiter(time.monotonic)
    rate, allowed = await run(memory, rule, decisions, concurrency)
    print(f"memory: {rate:10.0f} decisions/s  ({allowed} allowed)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.decisions, args.concurrency))
