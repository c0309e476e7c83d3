"""The plain-number metric families export exactly what prometheus-client's own metrics would, alone
and, with workers, merged from the multiprocess files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess

from apigw.observability.metrics import LATENCY_BUCKETS
from apigw.observability.tally import CounterFamily, HistogramFamily

ROUTES = st.sampled_from(["users", "orders", "-"])
DURATIONS = st.sampled_from(LATENCY_BUCKETS) | st.floats(0, 60, allow_nan=False)
"""Bounds themselves included: `le` is inclusive."""


def samples(metrics: list) -> list[tuple]:
    return sorted((s.name, sorted(s.labels.items()), s.value) for m in metrics for s in m.samples
                  if not s.name.endswith("_created"))


@given(st.lists(st.tuples(ROUTES, DURATIONS)))
def test_a_histogram_exports_what_prometheus_clients_own_does(observations: list[tuple[str, float]]) -> None:
    ours = HistogramFamily("h_seconds", "Time", ("route",), buckets=LATENCY_BUCKETS)
    registry = CollectorRegistry()
    theirs = Histogram("h_seconds", "Time", ["route"], buckets=LATENCY_BUCKETS, registry=registry)
    for route, duration in observations:
        ours.labels(route).observe(duration)
        theirs.labels(route).observe(duration)
    assert samples([ours.collect()]) == samples(registry.collect())


@given(st.lists(st.tuples(ROUTES, st.sampled_from([200, "200", 404]), st.integers(1, 3))))
def test_a_counter_exports_what_prometheus_clients_own_does(counts: list[tuple[str, int | str, int]]) -> None:
    """Label values are exported as strings: 200 and "200" are one series."""
    ours = CounterFamily("c", "Requests", ("route", "status_code"))
    registry = CollectorRegistry()
    theirs = Counter("c", "Requests", ["route", "status_code"], registry=registry)
    for route, status, amount in counts:
        ours.labels(route, status).inc(amount)
        theirs.labels(route=route, status_code=status).inc(amount)
    assert samples([ours.collect()]) == samples(registry.collect())


WORKER = """
import sys
from apigw.observability.metrics import Metrics
metrics = Metrics()
for amount in map(int, sys.argv[1:]):
    for _ in range(amount):
        metrics.http_requests.labels("users", "GET", 200).inc()
        metrics.http_duration.labels("users").observe(0.002)
    metrics.tally.fold()
"""


def test_workers_files_merge_to_the_sum_of_their_counts(tmp_path: Path) -> None:
    """Each worker folds what changed since its last fold (not the whole count again)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for amounts in (["3", "0", "2"], ["4"]):
        subprocess.run([sys.executable, "-c", WORKER, *amounts], env=env, check=True, timeout=60)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    value = registry.get_sample_value
    assert value("gateway_http_requests_total", {"route": "users", "method": "GET", "status_code": "200"}) == 9
    assert value("gateway_http_request_duration_seconds_bucket", {"route": "users", "le": "0.001"}) == 0
    assert value("gateway_http_request_duration_seconds_bucket", {"route": "users", "le": "0.0025"}) == 9
    assert value("gateway_http_request_duration_seconds_count", {"route": "users"}) == 9
    assert abs(value("gateway_http_request_duration_seconds_sum", {"route": "users"}) - 9 * 0.002) < 1e-12
