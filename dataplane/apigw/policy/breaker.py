"""Circuit breakers: stop sending requests to a backend that keeps failing, and probe it before trusting it again.

One breaker per backend service. Closed, it counts outcomes and opens after `consecutive_failures`
failures in a row, or when at least `error_ratio` of the requests of the last `window` seconds failed
(once there were `min_requests` of them). Open, it answers 503 at once for `open_duration`. Then the
next request finds it half-open: up to `half_open_probes` requests go through at the same time, and it
closes once that many probes have succeeded in a row, or opens again at the first failed probe.

What counts as a failure is the caller's decision. How the pipeline calls a breaker:

    admission = breaker.admit()              # raises GatewayError(503) while open
    try:
        ... send the request, relay the answer ...
        admission.record(success)            # once the backend's outcome is known: for an answer, once
    finally:                                 # its body is through (a 200 head may end in a cut body)
        admission.release()                  # or `with breaker.admit() as admission:`

Releasing without `record` (the request was cancelled, the client went away, the gateway itself
failed) counts nothing and frees the probe slot, so a half-open breaker is never stuck waiting for a
probe that will not report. An outcome is counted only if the breaker is still in the
state that admitted the request: a slow request admitted before the breaker opened cannot close it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from enum import IntEnum
from types import TracebackType

from prometheus_client import Gauge

from apigw.config.model import BreakerSettings
from apigw.http.errors import GatewayError
from apigw.policy.window import SlidingCount

log = logging.getLogger("apigw.breaker")


class State(IntEnum):
    """The values are those of the `gateway_circuit_breaker_state` gauge."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class Admission:
    """One request let through by a breaker; reports its outcome at most once."""

    __slots__ = ("_breaker", "_generation", "_done")

    def __init__(self, breaker: CircuitBreaker, generation: int):
        self._breaker = breaker
        self._generation = generation
        self._done = False

    def record(self, success: bool) -> None:
        if not self._done:
            self._done = True
            self._breaker._record(self._generation, success)

    def release(self) -> None:
        """Count nothing and give back the probe slot, if this was a probe. Harmless after `record`."""
        if not self._done:
            self._done = True
            self._breaker._release(self._generation)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class CircuitBreaker:
    def __init__(self, service: str, settings: BreakerSettings, clock: Callable[[], float], gauge: Gauge):
        self.service = service
        self.settings = settings
        self.state = State.CLOSED
        self._clock = clock
        self._gauge = gauge.labels(backend_service=service)
        self._exporting = True
        self._generation = 0
        """Bumped on every transition, so outcomes of requests admitted in an earlier state are ignored."""
        self._consecutive = 0
        self._requests = SlidingCount(settings.window)
        self._failures = SlidingCount(settings.window)
        self._open_until = 0.0
        self._probes = 0
        """Probe requests in flight while half-open."""
        self._probe_successes = 0
        self._gauge.set(State.CLOSED)

    def admit(self) -> Admission:
        """Let a request through, or raise the 503 `circuit_open` GatewayError."""
        if self.state is not State.CLOSED:
            self._admit_probe()
        return Admission(self, self._generation)

    def retire(self) -> None:
        """Stop exporting and logging: the registry has replaced or dropped this breaker, but requests
        that hold it may still report to it."""
        self._exporting = False

    def _admit_probe(self) -> None:
        now = self._clock()
        if self.state is State.OPEN:
            if now < self._open_until:
                raise self._unavailable(self._open_until - now)
            self._enter(
                State.HALF_OPEN,
                f"half-open after {self.settings.open_duration:g}s open; "
                f"letting {_count(self.settings.half_open_probes, 'probe request')} through",
            )
        if self._probes >= self.settings.half_open_probes:
            raise self._unavailable(1.0)
        self._probes += 1

    def _unavailable(self, retry_after: float) -> GatewayError:
        return GatewayError(
            503, "circuit_open", f"backend {self.service} is unavailable (circuit open)",
            headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
        )

    def _release(self, generation: int) -> None:
        if generation == self._generation and self.state is State.HALF_OPEN:
            self._probes -= 1

    def _record(self, generation: int, success: bool) -> None:
        if generation != self._generation:
            return
        if self.state is State.HALF_OPEN:
            self._probes -= 1
            if not success:
                self._open("again after a failed probe request")
                return
            self._probe_successes += 1
            if self._probe_successes >= self.settings.half_open_probes:
                self._enter(State.CLOSED, f"closed after {_count(self._probe_successes, 'successful probe request')}")
            return
        now = self._clock()
        self._requests.add(now)
        if success:
            self._consecutive = 0
            return
        self._consecutive += 1
        self._failures.add(now)
        settings = self.settings
        if self._consecutive >= settings.consecutive_failures:
            self._open(f"after {self._consecutive} consecutive failures")
            return
        requests = self._requests.total(now)
        if requests >= settings.min_requests:
            failures = self._failures.total(now)
            if failures >= settings.error_ratio * requests:
                self._open(
                    f"after {failures} of {requests} requests failed in the last {settings.window:g}s "
                    f"(error ratio {failures / requests:.2f}, limit {settings.error_ratio:g})"
                )

    def _open(self, why: str) -> None:
        self._open_until = self._clock() + self.settings.open_duration
        self._enter(State.OPEN, f"opened {why}; failing fast for {self.settings.open_duration:g}s", logging.WARNING)

    def _enter(self, state: State, message: str, level: int = logging.INFO) -> None:
        previous = self.state
        self.state = state
        self._generation += 1
        self._probes = 0
        self._probe_successes = 0
        if state is State.CLOSED:
            self._consecutive = 0
            self._requests = SlidingCount(self.settings.window)
            self._failures = SlidingCount(self.settings.window)
        if self._exporting:
            self._gauge.set(state)
            log.log(
                level, "circuit breaker for backend %s %s", self.service, message,
                extra={"fields": {"backend_service": self.service, "state": state.label, "previous_state": previous.label}},
            )


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"
