"""Bounded writes and aggregated Events, with a fake clock (no timing is asserted)."""

from __future__ import annotations

import asyncio

from apigw_operator.throttle import Once, Throttle


async def test_throttle_bounds_concurrency_and_runs_every_call() -> None:
    running, most, done = 0, 0, []

    async def call(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        running -= 1
        done.append(i)
        return i

    throttle = Throttle(rate=1e9, burst=100, concurrency=3)
    results = await asyncio.gather(*(throttle.run(lambda i=i: call(i)) for i in range(20)))
    assert results == list(range(20)) and sorted(done) == list(range(20))
    assert most == 3


async def test_throttle_waits_for_tokens_beyond_the_burst() -> None:
    now = [0.0]
    throttle = Throttle(rate=10, burst=2, concurrency=10, clock=lambda: now[0])
    started = []

    async def call(i: int) -> None:
        started.append(i)

    tasks = [asyncio.create_task(throttle.run(lambda i=i: call(i))) for i in range(4)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert started == [0, 1], "the burst, then no token until the clock moves"
    now[0] = 0.2  # two tokens' worth of time
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert started == [0, 1, 2, 3]


def test_once_lets_a_key_through_once_per_window() -> None:
    now = [0.0]
    once = Once(window=600, clock=lambda: now[0])
    assert once(("uid-a", "Pending")) and once(("uid-b", "Pending")) and once(("uid-a", "Programmed"))
    assert not once(("uid-a", "Pending"))
    now[0] = 599
    assert not once(("uid-a", "Pending"))
    now[0] = 601
    assert once(("uid-a", "Pending"))
    assert once.suppressed == 2
