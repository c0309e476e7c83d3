"""Every Prometheus metric the gateway exports. Names and labels are fixed by DESIGN.md and the runbook.

One `Metrics` object per process, on its own registry (no module globals). Counters and histograms,
counted per request, are plain numbers in `Tally` families, read when `/metrics` is (see `tally`);
gauges that are set now and then are prometheus-client's own. With `--workers N`, prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the supervisor) shares the values through files,
and each gauge says how the workers' values combine.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

from apigw.observability.tally import CounterFamily, GaugeFamily, HistogramFamily, Tally

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        disable_created_metrics()  # the *_created series only double what operators must scroll through
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.tally = t = Tally()
        self.http_requests = t.add(CounterFamily(
            "gateway_http_requests", "Requests answered, by route", ("route", "method", "status_code")
        ))
        self.http_duration = t.add(HistogramFamily(
            "gateway_http_request_duration_seconds", "Time from request to response, by route", ("route",),
            buckets=LATENCY_BUCKETS,
        ))
        self.backend_requests = t.add(CounterFamily(
            "gateway_backend_requests", "Requests sent to backends, by outcome", ("backend_service", "status_code")
        ))
        self.backend_duration = t.add(HistogramFamily(
            "gateway_backend_duration_seconds", "Time until a backend's response headers", ("backend_service",),
            buckets=LATENCY_BUCKETS,
        ))
        self.auth_attempts = t.add(CounterFamily(
            "gateway_auth_attempts", "Token checks, by result and error type", ("result", "error_type")
        ))
        self.ratelimit_requests = t.add(CounterFamily(
            "gateway_ratelimit_requests", "Rate limit decisions", ("policy", "decision")
        ))
        self.ratelimit_errors = t.add(CounterFamily(
            "gateway_ratelimit_errors", "Rate limit checks that failed (Redis error or timeout)"
        ))
        self.ratelimit_duration = t.add(HistogramFamily(
            "gateway_ratelimit_duration_seconds", "Time of one rate limit decision", buckets=FAST_BUCKETS
        ))
        self.redis_errors = t.add(CounterFamily("gateway_redis_errors", "Redis calls that failed", ("operation",)))
        self.redis_master = Gauge(
            "gateway_redis_master_info", "The Redis (master) address in use: 1; 0 for one used before", ["address"],
            registry=r, multiprocess_mode="livemax",  # with workers: 1 while any worker uses it
        )
        self.redis_failovers = t.add(CounterFamily(
            "gateway_redis_failovers", "Moves of the Redis master seen (Sentinel +switch-master or re-discovery)"
        ))
        self._redis_master_address: str | None = None
        self.breaker_state = Gauge(
            "gateway_circuit_breaker_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            ["backend_service"], registry=r, multiprocess_mode="livemax",  # with workers: the highest value
        )
        self.config_reloads = t.add(CounterFamily("gateway_config_reloads", "Config reloads, by result", ("result",)))
        for result in ("success", "failure"):  # at 0 before the first: rate() and increase() take a
            self.config_reloads.labels(result)  # series' first sample as its start, so one reload would not show
        self.inflight = t.add(GaugeFamily("gateway_inflight_requests", "Requests being handled now"))
        self.tls_expiry = Gauge(
            "gateway_tls_certificate_expiry_timestamp_seconds", "Expiry (notAfter) of the served TLS certificate",
            registry=r, multiprocess_mode="livemin",
        )
        self.asyncio_tasks = Gauge(
            "gateway_asyncio_tasks", "asyncio tasks alive (the runbook's go_goroutines)", registry=r,
            multiprocess_mode="livesum",
        )
        r.register(t)

    def redis_master_moved(self, address: str, previous: str | None) -> None:
        """The Redis link now uses `address`; `previous` is the master it used before (None at start)."""
        if previous is not None:
            self.redis_failovers.inc()
        if self._redis_master_address not in (None, address):
            self.redis_master.labels(self._redis_master_address).set(0)
        self._redis_master_address = address
        self.redis_master.labels(address).set(1)

    async def sample(self, every: float = 1.0) -> None:
        """Keep `gateway_asyncio_tasks` current and, with workers, the shared files (see `tally`); a
        last time when cancelled, at the end of the worker's drain."""
        try:
            while True:
                self.asyncio_tasks.set(len(asyncio.all_tasks()))
                self.tally.fold()
                await asyncio.sleep(every)
        finally:
            self.tally.fold()


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """`GET /metrics` in the Prometheus text format, on the metrics listener."""

    async def serve_metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    return app
