"""Circuit breaker state machine, driven by a fake clock: no sleeps, every transition checked."""

from __future__ import annotations

import asyncio
import logging

import pytest

from apigw.config.errors import ConfigError
from apigw.config.loader import parse_documents
from apigw.config.model import BreakerSettings
from apigw.http.errors import GatewayError
from apigw.observability.metrics import Metrics
from apigw.policy.breaker import CircuitBreaker, State
from apigw.testkit.clock import FakeClock


def gauge(metrics: Metrics, service: str = "users") -> float | None:
    return metrics.registry.get_sample_value("gateway_circuit_breaker_state", {"backend_service": service})


def settings(**changes: object) -> BreakerSettings:
    base = {"consecutive_failures": 3, "error_ratio": 0.5, "window": 10, "min_requests": 10, "open_duration": 30,
            "half_open_probes": 1}
    return BreakerSettings.model_validate(base | changes)


def make(clock: FakeClock, metrics: Metrics, **changes: object) -> CircuitBreaker:
    return CircuitBreaker("users", settings(**changes), clock, metrics.breaker_state)


def outcomes(breaker: CircuitBreaker, *results: bool) -> None:
    for success in results:
        with breaker.admit() as admission:
            admission.record(success)


def open_breaker(breaker: CircuitBreaker) -> None:
    outcomes(breaker, *[False] * breaker.settings.consecutive_failures)
    assert breaker.state is State.OPEN


def rejection(breaker: CircuitBreaker) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        breaker.admit()
    return caught.value


def test_consecutive_failures_open_it_and_a_success_resets_the_count(clock, metrics) -> None:
    breaker = make(clock, metrics, consecutive_failures=3, min_requests=100)
    outcomes(breaker, False, False, True, False, False)
    assert breaker.state is State.CLOSED
    assert gauge(metrics) == 0
    outcomes(breaker, False)
    assert breaker.state is State.OPEN
    assert gauge(metrics) == 1


def test_open_answers_503_at_once_with_retry_after(clock, metrics) -> None:
    breaker = make(clock, metrics, open_duration=30)
    open_breaker(breaker)
    error = rejection(breaker)
    assert (error.status, error.error_type) == (503, "circuit_open")
    assert error.message == "backend users is unavailable (circuit open)"
    assert error.headers == {"Retry-After": "30"}
    clock.advance(10.5)
    assert rejection(breaker).headers == {"Retry-After": "20"}


def test_error_ratio_opens_only_once_min_requests_were_seen(clock, metrics) -> None:
    breaker = make(clock, metrics, consecutive_failures=100, error_ratio=0.5, min_requests=10)
    outcomes(breaker, True, False, True, False, True, False, True, False, False)  # 5 of 9 failed
    assert breaker.state is State.CLOSED
    outcomes(breaker, False)  # 6 of 10
    assert breaker.state is State.OPEN


def test_a_low_error_ratio_keeps_it_closed(clock, metrics) -> None:
    breaker = make(clock, metrics, consecutive_failures=100, error_ratio=0.5, min_requests=10)
    outcomes(breaker, *[True, True, False] * 20)
    assert breaker.state is State.CLOSED


def test_old_failures_age_out_of_the_window(clock, metrics) -> None:
    breaker = make(clock, metrics, consecutive_failures=100, error_ratio=0.5, window=10, min_requests=4)
    outcomes(breaker, False, False, False)
    clock.advance(11)
    outcomes(breaker, False, True, True, True)  # counting the old ones, 4 of 7 would have failed
    assert breaker.state is State.CLOSED
    outcomes(breaker, False, False)  # 3 of 6 in the window
    assert breaker.state is State.OPEN


def test_failures_spread_over_the_window_still_count(clock, metrics) -> None:
    breaker = make(clock, metrics, consecutive_failures=100, error_ratio=0.5, window=10, min_requests=4)
    for success in (False, True, True, False):  # 2 of 4 failed, 9 s apart
        outcomes(breaker, success)
        clock.advance(3)
    assert breaker.state is State.OPEN


def test_after_open_duration_it_lets_exactly_half_open_probes_through(clock, metrics) -> None:
    breaker = make(clock, metrics, open_duration=30, half_open_probes=2)
    open_breaker(breaker)
    clock.advance(29.9)
    rejection(breaker)
    clock.advance(0.1)
    first, second = breaker.admit(), breaker.admit()
    assert breaker.state is State.HALF_OPEN
    assert gauge(metrics) == 2
    assert rejection(breaker).headers == {"Retry-After": "1"}
    first.record(True)
    third = breaker.admit()  # the first probe's slot is free again
    rejection(breaker)
    second.record(True)
    assert breaker.state is State.CLOSED  # two probes succeeded
    assert gauge(metrics) == 0
    third.record(True)  # admitted while half-open: no effect on the closed breaker
    assert breaker.state is State.CLOSED


def test_a_successful_probe_closes_it_with_fresh_counts(clock, metrics) -> None:
    breaker = make(clock, metrics, consecutive_failures=3)
    open_breaker(breaker)
    clock.advance(30)
    outcomes(breaker, True)
    assert breaker.state is State.CLOSED
    outcomes(breaker, False, False)  # the failures that opened it are forgotten
    assert breaker.state is State.CLOSED


def test_a_failed_probe_opens_it_again_for_open_duration(clock, metrics) -> None:
    breaker = make(clock, metrics, open_duration=30, half_open_probes=2)
    open_breaker(breaker)
    clock.advance(30)
    first, second = breaker.admit(), breaker.admit()
    first.record(True)
    second.record(False)
    assert breaker.state is State.OPEN
    assert gauge(metrics) == 1
    assert rejection(breaker).headers == {"Retry-After": "30"}


async def test_a_cancelled_probe_frees_its_slot(clock, metrics) -> None:
    breaker = make(clock, metrics)
    open_breaker(breaker)
    clock.advance(30)
    started = asyncio.Event()

    async def probe() -> None:
        with breaker.admit() as admission:
            started.set()
            await asyncio.sleep(3600)
            admission.record(True)

    task = asyncio.create_task(probe())
    await started.wait()
    rejection(breaker)  # the one probe slot is taken
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is State.HALF_OPEN  # a cancelled probe says nothing about the backend
    outcomes(breaker, True)
    assert breaker.state is State.CLOSED


def test_an_admission_reports_once(clock, metrics) -> None:
    breaker = make(clock, metrics, consecutive_failures=3)
    admission = breaker.admit()
    admission.record(False)
    admission.record(False)
    admission.release()
    outcomes(breaker, False)
    assert breaker.state is State.CLOSED  # two failures, not three
    outcomes(breaker, False)
    assert breaker.state is State.OPEN
    clock.advance(30)
    probe = breaker.admit()
    probe.release()
    probe.release()
    again = breaker.admit()  # one slot, released once: exactly one probe fits
    rejection(breaker)
    again.record(True)
    assert breaker.state is State.CLOSED


def test_outcomes_of_requests_admitted_before_a_transition_are_ignored(clock, metrics) -> None:
    breaker = make(clock, metrics, consecutive_failures=3)
    slow = breaker.admit()
    open_breaker(breaker)
    clock.advance(30)
    probe = breaker.admit()
    slow.record(True)  # admitted while closed: it cannot close the half-open breaker
    assert breaker.state is State.HALF_OPEN
    probe.record(True)
    assert breaker.state is State.CLOSED


def test_every_transition_is_logged_and_exported(clock, metrics, caplog) -> None:
    caplog.set_level(logging.INFO, logger="apigw.breaker")
    breaker = make(clock, metrics, consecutive_failures=5, open_duration=30)
    seen = []

    def step(*results: bool) -> None:
        outcomes(breaker, *results)
        seen.append(gauge(metrics))

    step(*[False] * 5)
    clock.advance(30)
    probe = breaker.admit()
    seen.append(gauge(metrics))
    probe.record(False)
    seen.append(gauge(metrics))
    clock.advance(30)
    step(True)
    assert seen == [1, 2, 1, 0]
    lines = [(r.levelname, r.getMessage(), r.fields) for r in caplog.records if r.name == "apigw.breaker"]
    users = "circuit breaker for backend users"
    assert lines == [
        ("WARNING", f"{users} opened after 5 consecutive failures; failing fast for 30s",
         {"backend_service": "users", "state": "open", "previous_state": "closed"}),
        ("INFO", f"{users} half-open after 30s open; letting 1 probe request through",
         {"backend_service": "users", "state": "half-open", "previous_state": "open"}),
        ("WARNING", f"{users} opened again after a failed probe request; failing fast for 30s",
         {"backend_service": "users", "state": "open", "previous_state": "half-open"}),
        ("INFO", f"{users} half-open after 30s open; letting 1 probe request through",
         {"backend_service": "users", "state": "half-open", "previous_state": "open"}),
        ("INFO", f"{users} closed after 1 successful probe request",
         {"backend_service": "users", "state": "closed", "previous_state": "half-open"}),
    ]


def test_the_ratio_transition_says_what_it_saw(clock, metrics, caplog) -> None:
    breaker = make(clock, metrics, consecutive_failures=100, error_ratio=0.5, window=10, min_requests=4)
    outcomes(breaker, True, False, True, False)
    assert [r.getMessage() for r in caplog.records] == [
        "circuit breaker for backend users opened after 2 of 4 requests failed in the last 10s "
        "(error ratio 0.50, limit 0.5); failing fast for 30s"
    ]


def test_routes_sharing_a_backend_must_agree_on_its_breaker() -> None:
    text = """
routes:
  - {name: a, match: {path_prefix: /a}, backend: {service: users, url: "http://users:8080"}}
  - name: b
    match: {path_prefix: /b}
    backend: {service: users, url: "http://users:8080", circuit_breaker: {consecutive_failures: 2}}
"""
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": text})
    assert caught.value.errors == [
        "config.yaml:6: routes[1].backend.circuit_breaker: backend service 'users' has other circuit_breaker "
        "settings in config.yaml routes[0]; routes sharing a backend must give the same"
    ]
