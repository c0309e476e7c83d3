"""Upstream clusters: one object per backend service, owning everything the gateway keeps for it.

A cluster (Envoy's word) is where a service's requests go and what guards them: its keep-alive
connection pool, circuit breaker, retry budget, connect timeout and retry rules. (How long to wait for
an answer is the route's: one service may serve quick and slow paths.) A reload keeps a cluster
whole, with its connections and breaker state, while the service's settings are unchanged, and
replaces it whole when they change; a replaced or dropped cluster's pool closes once the requests
begun on it are done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from yarl import URL

from apigw.config.model import Backend, BreakerSettings, Config, RetrySettings
from apigw.observability.metrics import Metrics
from apigw.policy.breaker import CircuitBreaker, State
from apigw.policy.retry import RetryBudget
from apigw.upstream.client import Pool

log = logging.getLogger("apigw.upstream")


@dataclass(frozen=True)
class ClusterSettings:
    """Everything that defines a cluster: a change of any of it makes a new one."""

    service: str
    url: str
    connect_timeout: float
    retries: RetrySettings
    breaker: BreakerSettings

    @classmethod
    def of(cls, backend: Backend, default_breaker: BreakerSettings) -> ClusterSettings:
        return cls(backend.service, str(backend.url), backend.connect_timeout, backend.retries,
                   backend.circuit_breaker or default_breaker)


class Cluster:
    def __init__(self, settings: ClusterSettings, metrics: Metrics, clock: Callable[[], float]):
        url = URL(settings.url)
        self.settings = settings
        self.service = settings.service
        self.base_path = url.raw_path.rstrip("/")
        """The backend URL's own path, put before every request's path."""
        self.host_header = url.raw_authority
        self.pool = Pool(url)
        self.connect_timeout = settings.connect_timeout
        self.retries = settings.retries
        self.retry_budget = RetryBudget(settings.retries.budget_ratio, settings.retries.min_retries_per_second, clock)
        self.breaker = CircuitBreaker(settings.service, settings.breaker, clock, metrics.breaker_state)

    async def aclose(self) -> None:
        await self.pool.aclose()


def cluster_settings(config: Config) -> dict[str, ClusterSettings]:
    """The settings of each backend service of an enabled route (the loader made sure routes sharing a
    service agree on them); the breaker is the backend's own or the global one."""
    return {
        route.backend.service: ClusterSettings.of(route.backend, config.circuit_breaker)
        for route in config.routes
        if route.enabled
    }


class Clusters:
    """The cluster of every backend service in force."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float]):
        self._metrics = metrics
        self._clock = clock
        self._clusters: dict[str, Cluster] = {}

    def __getitem__(self, service: str) -> Cluster:
        return self._clusters[service]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._clusters.values())

    def update(self, settings_by_service: Mapping[str, ClusterSettings]) -> list[Cluster]:
        """Keep the clusters whose settings are unchanged (same object, same state), make new ones for
        new services and changed settings; return those replaced or dropped, for the caller to close
        once no request uses them."""
        clusters: dict[str, Cluster] = {}
        retired = []
        for service, settings in settings_by_service.items():
            cluster = self._clusters.get(service)
            if cluster is None or cluster.settings != settings:
                if cluster is not None:
                    retired.append(_replaced(cluster))
                cluster = Cluster(settings, self._metrics, self._clock)
            clusters[service] = cluster
        for service, cluster in self._clusters.items():
            if service not in clusters:
                cluster.breaker.retire()
                self._metrics.breaker_state.remove(service)
                retired.append(cluster)
        self._clusters = clusters
        return retired


def _replaced(cluster: Cluster) -> Cluster:
    breaker = cluster.breaker
    breaker.retire()
    if breaker.state is not State.CLOSED:
        log.info(
            "circuit breaker for backend %s closed: its settings changed", breaker.service,
            extra={"fields": {"backend_service": breaker.service, "state": State.CLOSED.label,
                              "previous_state": breaker.state.label}},
        )
    return cluster
