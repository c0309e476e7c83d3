"""Which failures are retried, and the budget that bounds retries, driven by a fake clock."""

from __future__ import annotations

import pytest

from apigw.config.errors import ConfigError
from apigw.config.loader import parse_documents
from apigw.config.model import RetrySettings
from apigw.policy.retry import (
    BUDGET_WINDOW,
    CONNECT_FAILED,
    RetryBudget,
    should_retry,
)
from apigw.testkit.clock import FakeClock


def granted(budget: RetryBudget, asked: int) -> int:
    return sum(budget.can_retry() for _ in range(asked))


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_idempotent_requests_are_retried_after_a_failed_connection(method: str) -> None:
    assert should_retry(method, 0, CONNECT_FAILED, RetrySettings())


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_other_methods_are_never_retried(method: str) -> None:
    settings = RetrySettings(max_retries=3, on_statuses=[503])
    assert not should_retry(method, 0, CONNECT_FAILED, settings)
    assert not should_retry(method, 0, 503, settings)


def test_retries_stop_at_max_retries() -> None:
    settings = RetrySettings(max_retries=2)
    assert [should_retry("GET", done, CONNECT_FAILED, settings) for done in range(4)] == [True, True, False, False]
    assert not should_retry("GET", 0, CONNECT_FAILED, RetrySettings(max_retries=0))


def test_only_configured_statuses_are_retried() -> None:
    assert not should_retry("GET", 0, 503, RetrySettings())
    settings = RetrySettings(on_statuses=[502, 503])
    assert should_retry("GET", 0, 503, settings)
    assert not should_retry("GET", 0, 500, settings)
    assert not should_retry("GET", 0, 200, settings)


def test_timeouts_and_other_failures_are_not_retried() -> None:
    assert not should_retry("GET", 0, "timeout", RetrySettings(max_retries=3, on_statuses=[504]))


def test_budget_allows_the_minimum_each_second_without_traffic() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=3, clock=clock)
    assert granted(budget, 10) == 3
    clock.now += 0.5
    assert granted(budget, 10) == 0
    clock.now += 0.5
    assert granted(budget, 10) == 3


def test_budget_allows_the_ratio_of_requests_plus_the_minimum() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=3, clock=clock)
    for _ in range(100):
        budget.record_request()
    assert granted(budget, 100) == 20 + 3
    clock.now += 1
    assert granted(budget, 100) == 3  # the 20 of the ratio were spent in this window already


def test_a_failing_backend_sees_a_bounded_share_of_retries() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0, clock=clock)
    retries = 0
    for _ in range(600):  # 60 s at 10 requests per second, every attempt retried if the budget allows
        for _ in range(10):
            budget.record_request()
            retries += granted(budget, 3)
        clock.now += 1
    assert 0.15 * 6000 <= retries <= 0.2 * 6000


def test_budget_recovers_once_spent_retries_leave_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert granted(budget, 10) == 5
    clock.now += BUDGET_WINDOW / 2
    for _ in range(10):
        budget.record_request()
    assert granted(budget, 10) == 5  # 20 requests, 5 retries already in the window
    clock.now += BUDGET_WINDOW / 2 + 1
    assert granted(budget, 10) == 0  # the first 10 requests and 5 retries left; 10 and 5 remain
    clock.now += BUDGET_WINDOW
    assert granted(budget, 1) == 0  # no requests left to retry against
    for _ in range(4):
        budget.record_request()
    assert granted(budget, 10) == 2


def test_retry_settings_are_validated_where_they_are_written() -> None:
    text = """
routes:
  - name: a
    backend:
      service: users
      url: "http://users:8080"
      retries: {on_statuses: [503, 200]}
"""
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": text})
    assert caught.value.errors == [
        "config.yaml:7: routes[0].backend.retries.on_statuses[1]: Input should be greater than or equal to 400 (got 200)"
    ]


def test_routes_sharing_a_backend_must_agree_on_its_retries() -> None:
    text = """
routes:
  - name: a
    match: {path_prefix: /a}
    backend: {service: users, url: "http://users:8080", retries: {max_retries: 2}}
  - name: b
    match: {path_prefix: /b}
    backend: {service: users, url: "http://users:8080"}
"""
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": text})
    assert caught.value.errors == [
        "config.yaml:8: routes[1].backend.retries: backend service 'users' has other retries "
        "settings in config.yaml routes[0]; routes sharing a backend must give the same"
    ]
