"""Upstream clusters: one object per backend service, owning everything the gateway keeps for it.

A cluster (Envoy's word) is where a service's requests go and what guards them: its keep-alive
connection pool, circuit breaker, retry budget, connect timeout and retry rules. (How long to wait for
an answer is the route's: one service may serve quick and slow paths.) A reload keeps a cluster
whole, with its connections and breaker state, while the service's settings are unchanged, and
replaces it whole when they change; a replaced or dropped cluster's pool closes once the requests
begun on it are done.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from yarl import URL

from apigw.config.errors import ConfigError
from apigw.config.model import BackendTLS, BreakerSettings, Config, RetrySettings
from apigw.observability.metrics import Metrics
from apigw.policy.breaker import CircuitBreaker, State
from apigw.policy.retry import RetryBudget
from apigw.upstream.client import Pool

log = logging.getLogger("apigw.upstream")


@dataclass(frozen=True)
class ClusterSettings:
    """Everything that defines a cluster: a change of any of it (the TLS files' contents included)
    makes a new one."""

    service: str
    url: str
    connect_timeout: float
    max_connections: int
    max_pending: int
    retries: RetrySettings
    breaker: BreakerSettings
    tls: BackendTLS | None = None
    tls_digest: str = ""
    """A digest of the TLS files' contents: renewed files make a new cluster, with a new context."""
    ssl: ssl.SSLContext | None = field(default=None, compare=False)


class Cluster:
    def __init__(self, settings: ClusterSettings, metrics: Metrics, clock: Callable[[], float]):
        url = URL(settings.url)
        self.settings = settings
        self.service = settings.service
        self.base_path = url.raw_path.rstrip("/")
        """The backend URL's own path, put before every request's path."""
        self.host_header = url.raw_authority
        self.pool = Pool(
            url, max_connections=settings.max_connections, max_pending=settings.max_pending,
            ssl_context=settings.ssl, server_hostname=settings.tls.server_name if settings.tls else None,
            service=settings.service,
        )
        self.connect_timeout = settings.connect_timeout
        self.retries = settings.retries
        self.retry_budget = RetryBudget(settings.retries.budget_ratio, settings.retries.min_retries_per_second, clock)
        self.breaker = CircuitBreaker(settings.service, settings.breaker, clock, metrics.breaker_state)

    async def aclose(self) -> None:
        await self.pool.aclose()


def cluster_settings(config: Config) -> dict[str, ClusterSettings]:
    """The settings of each backend service of an enabled route (the loader made sure routes sharing a
    service agree on them); the breaker is the backend's own or the global one. TLS files are read here,
    before anything changes, so that one that cannot be used fails the whole load (ConfigError, naming
    every such backend; `gateway -validate-config` reads them here too)."""
    found: dict[str, ClusterSettings] = {}
    errors: list[str] = []
    for index, route in enumerate(config.routes):
        backend = route.backend
        if not route.enabled or backend.service in found:
            continue
        try:
            context, digest = _tls(backend.tls, f"routes[{index}].backend.tls") if backend.tls else (None, "")
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        found[backend.service] = ClusterSettings(
            backend.service, str(backend.url), backend.connect_timeout, backend.max_connections,
            backend.max_pending, backend.retries, backend.circuit_breaker or config.circuit_breaker,
            backend.tls, digest, context,
        )
    if errors:
        raise ConfigError(errors)
    return found


def _tls(settings: BackendTLS, where: str) -> tuple[ssl.SSLContext, str]:
    """The client context for an https backend, and a digest of the files it was made from."""
    digest = hashlib.sha256()
    try:
        for file in settings.files():
            digest.update(file.read_bytes())
        context = ssl.create_default_context(cafile=settings.ca_file)
        if settings.cert_file is not None:
            context.load_cert_chain(settings.cert_file, settings.key_file)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError([f"{where}: cannot use the TLS files: {exc}"]) from None
    return context, digest.hexdigest()


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

    def watched_files(self) -> list[Path]:
        """The backends' TLS files: a renewal makes a reload, which gives their clusters new contexts."""
        return [file for cluster in self._clusters.values() if cluster.settings.tls
                for file in cluster.settings.tls.files()]

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
