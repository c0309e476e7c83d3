"""Keeping the operator quiet on the API server: bounded write rate and concurrency, aggregated Events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class Throttle:
    """At most `rate` calls started per second (bursts up to `burst`), at most `concurrency` at once."""

    def __init__(self, rate: float, burst: int, concurrency: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._slots = asyncio.Semaphore(concurrency)
        self._turn = asyncio.Lock()

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        async with self._slots:
            async with self._turn:  # first come, first served: one waiter for tokens at a time
                await self._token()
            return await call()

    async def _token(self) -> None:
        while True:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self.rate)


class Once:
    """Lets the same key through once per `window` seconds: one Event per object and reason, however
    often a condition flaps (what the API server's own event aggregation would count as a series)."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self._clock = clock
        self._seen: dict[Hashable, float] = {}
        self.suppressed = 0

    def __call__(self, key: Hashable) -> bool:
        now = self._clock()
        if len(self._seen) > 10_000:  # forget what is past its window
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.window}
        last = self._seen.get(key)
        if last is not None and now - last < self.window:
            self.suppressed += 1
            return False
        self._seen[key] = now
        return True
