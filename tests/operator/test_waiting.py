"""`wait_set`, the operator's wait for an event with a timeout: a cancellation is never lost.

On Python 3.11, `asyncio.wait_for` returns normally when its task is cancelled just after the awaited
event was set, and a loop around it runs on: the operator's worker then ignored its stop and kopf's
shutdown hung (seen in the KMock tests as an operator not stopping within 30 s).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from apigw_operator.reconciler import wait_set


async def stops_when_cancelled_as_the_event_is_set(wait: Callable[[asyncio.Event], Awaitable[object]]) -> bool:
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait(event)
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    event.set()
    await asyncio.sleep(0)  # the wait is done, its task not resumed yet: the cancellation comes now
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=1)
    return bool(done) and task.cancelled()


async def test_a_cancellation_as_the_event_is_set_stops_the_loop() -> None:
    assert await stops_when_cancelled_as_the_event_is_set(lambda event: wait_set(event, 10))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for keeps cancellations from Python 3.12")
async def test_asyncio_wait_for_loses_it_on_this_python_which_is_why_wait_set_exists() -> None:
    async def wait_for(event: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(event.wait(), 10)
        except TimeoutError:
            pass

    assert not await stops_when_cancelled_as_the_event_is_set(wait_for)


async def test_it_says_whether_the_event_was_set_or_the_time_ran_out() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 10) is True
