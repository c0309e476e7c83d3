"""Upstream clusters: one per backend service, kept whole across reloads while its settings stay."""

from __future__ import annotations

import logging

import pytest
import yaml

from apigw.config.errors import ConfigError
from apigw.config.loader import parse_documents
from apigw.config.model import BreakerSettings
from apigw.observability.metrics import Metrics
from apigw.pipeline.state import Shared, build_state
from apigw.policy.breaker import State
from apigw.testkit import route
from apigw.testkit.clock import FakeClock
from apigw.upstream.cluster import Clusters, cluster_settings


def config(*routes: dict, **settings: object):
    return parse_documents({"config.yaml": yaml.safe_dump({"routes": list(routes), **settings})})


def gauge(metrics: Metrics, service: str) -> float | None:
    return metrics.registry.get_sample_value("gateway_circuit_breaker_state", {"backend_service": service})


def open_breaker(clusters: Clusters, service: str) -> None:
    breaker = clusters[service].breaker
    for _ in range(breaker.settings.consecutive_failures):
        with breaker.admit() as admission:
            admission.record(False)
    assert breaker.state is State.OPEN


USERS = route("a", "http://users:8080", service="users", match={"path_prefix": "/a"})
ORDERS = route("b", "http://orders:8080", service="orders", match={"path_prefix": "/b"})


def test_unchanged_clusters_are_kept_whole_and_removed_ones_retired(clock: FakeClock, metrics: Metrics) -> None:
    clusters = Clusters(metrics, clock)
    assert clusters.update(cluster_settings(config(USERS, ORDERS))) == []
    users, orders = clusters["users"], clusters["orders"]
    open_breaker(clusters, "users")

    billing = route("c", "http://billing:8080", service="billing", match={"path_prefix": "/c"})
    retired = clusters.update(cluster_settings(config(USERS, billing)))  # equal settings, new objects
    assert retired == [orders]
    assert clusters["users"] is users
    assert users.breaker.state is State.OPEN
    assert (gauge(metrics, "users"), gauge(metrics, "billing"), gauge(metrics, "orders")) == (1, 0, None)
    with pytest.raises(KeyError):
        clusters["orders"]
    open_breaker_of_retired = orders.breaker
    for _ in range(5):  # a request still holding the dropped cluster does not bring its series back
        with open_breaker_of_retired.admit() as admission:
            admission.record(False)
    assert gauge(metrics, "orders") is None


@pytest.mark.parametrize("change", [
    {"connect_timeout": "1s"}, {"retries": {"max_retries": 3}},
    {"circuit_breaker": {"consecutive_failures": 9}}, {"url": "http://users-v2:8080"},
])
def test_a_cluster_whose_settings_change_is_replaced_whole(
    clock: FakeClock, metrics: Metrics, caplog: pytest.LogCaptureFixture, change: dict
) -> None:
    caplog.set_level(logging.INFO, logger="apigw.upstream")
    clusters = Clusters(metrics, clock)
    clusters.update(cluster_settings(config(USERS)))
    old = clusters["users"]
    open_breaker(clusters, "users")
    changed = {**USERS, "backend": {**USERS["backend"], **change}}
    assert clusters.update(cluster_settings(config(changed))) == [old]
    new = clusters["users"]
    assert new is not old and new.pool is not old.pool and new.retry_budget is not old.retry_budget
    assert new.breaker.state is State.CLOSED
    assert gauge(metrics, "users") == 0
    assert [(r.getMessage(), r.fields["previous_state"]) for r in caplog.records if r.name == "apigw.upstream"] == [
        ("circuit breaker for backend users closed: its settings changed", "open")
    ]
    clock.advance(30)
    with old.breaker.admit() as admission:  # the replaced cluster no longer speaks for the service
        admission.record(False)
    assert gauge(metrics, "users") == 0


def test_each_cluster_gets_its_backends_breaker_or_the_global_one() -> None:
    orders = {**ORDERS, "backend": {**ORDERS["backend"], "circuit_breaker": {"consecutive_failures": 2, "window": "1m"}}}
    disabled = route("c", "http://old:8080", service="old", enabled=False, match={"path_prefix": "/c"})
    settings = cluster_settings(config(USERS, orders, disabled, circuit_breaker={"consecutive_failures": 7}))
    assert {service: s.breaker for service, s in settings.items()} == {
        "users": BreakerSettings(consecutive_failures=7),
        "orders": BreakerSettings(consecutive_failures=2, window=60),
    }


def test_a_reload_keeps_the_cluster_of_routes_that_share_an_unchanged_backend(clock: FakeClock, metrics: Metrics) -> None:
    shared = Shared(metrics, clock)
    first = build_state(config(USERS, {**USERS, "name": "a2", "match": {"path_prefix": "/a2"}}), shared)
    second = build_state(config(USERS, ORDERS), shared)
    assert first.router.match("", "/a", "GET").cluster is first.router.match("", "/a2", "GET").cluster
    assert second.router.match("", "/a", "GET").cluster is first.router.match("", "/a", "GET").cluster
    assert shared.retired == []


def test_routes_sharing_a_backend_may_wait_for_answers_differently(clock: FakeClock, metrics: Metrics) -> None:
    slow = {**USERS, "name": "a2", "match": {"path_prefix": "/a2"}, "backend": {**USERS["backend"], "timeout": "9s"}}
    state = build_state(config(USERS, slow), Shared(metrics, clock))
    quick, patient = state.router.match("", "/a", "GET"), state.router.match("", "/a2", "GET")
    assert quick.cluster is patient.cluster
    assert (quick.timeout, patient.timeout) == (30, 9)


@pytest.mark.parametrize(("setting", "value"), [("connect_timeout", "9s"), ("retries", {"max_retries": 0})])
def test_routes_sharing_a_backend_must_agree_on_its_cluster(setting: str, value: object) -> None:
    other = {**USERS, "name": "a2", "match": {"path_prefix": "/a2"}, "backend": {**USERS["backend"], setting: value}}
    with pytest.raises(ConfigError) as caught:
        config(USERS, other)
    [error] = caught.value.errors
    assert error.startswith("config.yaml:")
    assert error.split(": ", 1)[1] == (
        f"routes[1].backend.{setting}: backend service 'users' has other {setting} settings in "
        "config.yaml routes[0]; routes sharing a backend must give the same"
    )
