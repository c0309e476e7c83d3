"""The operator's own Prometheus metrics, served on their own port (`--metrics`, default :9091/metrics).

One registry per operator (no process-wide globals); the reconciler and the Kubernetes calls update it.
kopf's own watch requests are not counted here: they are kopf's, and cost one stream per kind.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONDITIONS = ("Accepted", "ResolvedRefs", "Programmed")


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.passes = Counter(
            "apigw_operator_reconcile_passes", "Reconcile passes by result (ok: completed; error: aborted).",
            ["result"], registry=registry,
        )
        self.duration = Histogram(
            "apigw_operator_reconcile_duration_seconds", "Time a reconcile pass took, rendering included.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry,
        )
        self.crs = Gauge(
            "apigw_operator_crs", "CRs by kind and by the status of each condition, as last written.",
            ["kind", "condition", "status"], registry=registry,
        )
        self.config_bytes = Gauge(
            "apigw_operator_config_bytes",
            "Size of the data of the gateway ConfigMap and its route shards with the rendered routes.",
            registry=registry,
        )
        self.config_limit = Gauge(
            "apigw_operator_config_limit_bytes",
            "The most the rendered routes may take: the API server's limit per ConfigMap, or half of it (the other "
            "half takes the next version of a shard) times the route shards.",
            registry=registry,
        )
        self.programmed = Gauge(
            "apigw_operator_config_programmed",
            "1 when the rendered config is in the ConfigMap and every ready gateway pod serves it, else 0.",
            registry=registry,
        )
        self.requests = Counter(
            "apigw_operator_api_requests", "Kubernetes API requests by verb and result (ok or the HTTP status).",
            ["verb", "result"], registry=registry,
        )
        self.leader = Gauge(
            "apigw_operator_leader", "1 while this replica holds the Lease and writes, else 0.", registry=registry,
        )

    def count_crs(self, counts: dict[tuple[str, str, str], int]) -> None:
        """Replace the CR counts: (kind, condition, status) -> how many."""
        self.crs.clear()
        for (kind, condition, status), count in counts.items():
            self.crs.labels(kind, condition, status).set(count)


async def serve(metrics: Metrics, host: str, port: int) -> web.AppRunner:
    """Start `GET /metrics`; the caller cleans the runner up."""

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
