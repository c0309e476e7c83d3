"""Retries of idempotent requests, and the budget that keeps them from multiplying a failing backend's load.

A request is retried only when that is safe and may help: its method is idempotent, and either the
connection failed before any byte of it was sent, or the backend answered a status the backend's
`retries.on_statuses` lists. Timeouts and connections lost mid-request are not retried: the backend may
be working on the request, and retrying piles more work on a backend that is already slow.

Each backend service has a retry budget: the retries of the last 10 seconds may reach `budget_ratio` of
the requests of those seconds, plus `min_retries_per_second` in each second so that a backend with little
traffic can be retried at all. When a backend fails everything, it sees at most `1 + budget_ratio` times
the requests (plus that minimum), never `1 + max_retries` times. How the pipeline uses it:

    budget.record_request()                      # once per client request, not per attempt
    retries = 0
    while True:
        outcome = ...                            # the status, or CONNECT_FAILED
        if should_retry(method, retries, outcome, settings) and budget.can_retry():
            retries += 1                         # the request body must be sendable again
            continue
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from apigw.config.model import RetrySettings
from apigw.policy.window import SlidingCount

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
CONNECT_FAILED = "connect_failed"
"""The outcome of an attempt whose connection failed before any byte of the request was sent."""
BUDGET_WINDOW = 10.0
"""Seconds of requests and retries that a budget weighs against each other."""


def should_retry(method: str, retries_done: int, outcome: int | str, settings: RetrySettings) -> bool:
    """Whether an attempt that ended with `outcome` (a status, `CONNECT_FAILED`, or any other failure
    kind, which is never retried) may be followed by another one, budget aside."""
    if retries_done >= settings.max_retries or method not in IDEMPOTENT:
        return False
    return outcome == CONNECT_FAILED or outcome in settings.on_statuses


class RetryBudget:
    """How many retries one backend service may still take; `can_retry` spends one when it says yes."""

    __slots__ = ("ratio", "min_per_second", "_clock", "_requests", "_retries", "_second", "_spent_this_second")

    def __init__(self, ratio: float, min_per_second: int, clock: Callable[[], float]):
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._clock = clock
        self._requests = SlidingCount(BUDGET_WINDOW)
        self._retries = SlidingCount(BUDGET_WINDOW)
        self._second = -1
        self._spent_this_second = 0
        """Retries granted from the per-second minimum in the second `_second`."""

    def record_request(self) -> None:
        self._requests.add(self._clock())

    def can_retry(self) -> bool:
        now = self._clock()
        if self._retries.total(now) >= self.ratio * self._requests.total(now):
            second = int(now)
            if second != self._second:
                self._second, self._spent_this_second = second, 0
            if self._spent_this_second >= self.min_per_second:
                return False
            self._spent_this_second += 1
        self._retries.add(now)
        return True
