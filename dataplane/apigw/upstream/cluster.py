"""Upstream clusters: one object per backend service, owning everything the gateway keeps for it.

A cluster (Envoy's word) is where a service's requests go and what guards them: its keep-alive
connection pool, circuit breaker, retry budget, connect timeout and retry rules. (How long to wait for
an answer is the route's: one service may serve quick and slow paths.) A reload keeps a cluster
whole, with its connections and breaker state, while the service's settings are unchanged, and
replaces it whole when they change; a replaced or dropped cluster's pool closes once the requests
begun on it are done.

A backend whose TLS files cannot be used fails the whole load when people own it (a route of
config.yaml uses it). When only routes of the operator's files use it (rendered from tenants' CRs, which
may name any path), it is held unavailable instead, as Envoy Gateway leaves out a route whose references
do not resolve: one tenant's mistake must not stop every pod from loading every other change. Its
requests are refused at once (503 `backend_tls_unusable`), the load logs it, `/_health/ready` lists it,
and the operator reports it on the CR; its files are watched, and once they can be used a reload
brings it back.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from apigw.config.errors import ConfigError
from apigw.config.model import BackendTLS, BreakerSettings, Config, RetrySettings
from apigw.http.errors import GatewayError
from apigw.http.networks import IPNetwork
from apigw.observability.metrics import Metrics
from apigw.policy.breaker import Admission, CircuitBreaker, State
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
    unusable: str | None = None
    """Why the backend is held unavailable (its TLS files cannot be used): then its requests are refused."""
    denied_networks: tuple[IPNetwork, ...] = ()
    """The networks its connections may not reach: `ownership.denied_backend_networks` for a service of
    routes.yaml only (config.yaml's are trusted)."""


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
            service=settings.service, denied_networks=settings.denied_networks,
        )
        self.connect_timeout = settings.connect_timeout
        self.retries = settings.retries
        self.retry_budget = RetryBudget(settings.retries.budget_ratio, settings.retries.min_retries_per_second, clock)
        self.breaker: CircuitBreaker | Held = (
            Held(settings.service) if settings.unusable is not None
            else CircuitBreaker(settings.service, settings.breaker, clock, metrics.breaker_state)
        )

    async def aclose(self) -> None:
        await self.pool.aclose()


class Held:
    """In place of the circuit breaker of a backend held unavailable: it refuses every request at once, as
    an open breaker does, so that nothing is ever sent without the TLS settings it was given (its pool has
    no context of theirs). It exports no breaker state: the backend is not failing, its settings are."""

    state = State.CLOSED
    """No open breaker to announce closed when it is replaced (`_replaced`)."""

    def __init__(self, service: str):
        self.service = service

    def admit(self) -> Admission:
        raise GatewayError(503, "backend_tls_unusable", f"backend {self.service} is unavailable: the gateway cannot "
                           "use its TLS files")

    def retire(self) -> None:
        pass


def cluster_settings(config: Config) -> dict[str, ClusterSettings]:
    """The settings of each backend service of an enabled route (the loader made sure routes sharing a
    service agree on them); the breaker is the backend's own or the global one. TLS files are read here,
    before anything changes. One that cannot be used fails the whole load (ConfigError, naming every such
    backend) when a route of config.yaml uses the backend; else the backend is held unavailable, its
    settings saying why (`unusable`). `gateway -validate-config` refuses both (`config_check`)."""
    found, errors = read_backends(config)
    if errors:
        raise ConfigError(errors)
    return found


def read_backends(config: Config) -> tuple[dict[str, ClusterSettings], list[str]]:
    """`cluster_settings`, with the errors that fail the load returned rather than raised."""
    people_owned = {r.backend.service for r in config.routes if r.enabled and not config.operator_owned(r)}
    found: dict[str, ClusterSettings] = {}
    errors: list[str] = []
    for index, route in enumerate(config.routes):
        backend = route.backend
        if not route.enabled or backend.service in found:
            continue
        context, digest, unusable = None, "", None
        if backend.tls is not None:
            try:
                context, digest = _tls(backend.tls)
            except _Unusable as exc:
                if backend.service in people_owned:
                    errors.append(f"routes[{index}].backend.tls: {exc}")
                    continue
                unusable = str(exc)
        found[backend.service] = ClusterSettings(
            backend.service, str(backend.url), backend.connect_timeout, backend.max_connections,
            backend.max_pending, backend.retries, backend.circuit_breaker or config.circuit_breaker,
            backend.tls, digest, context, unusable,
            denied_networks=() if backend.service in people_owned else tuple(config.ownership.denied_backend_networks),
        )
    return found, errors


class _Unusable(Exception):
    """A backend's TLS file cannot be used: which, where, and why (never what it holds)."""


def _tls(settings: BackendTLS) -> tuple[ssl.SSLContext, str]:
    """The client context for an https backend, and a digest of the files it was made from."""
    digest = hashlib.sha256()
    for name in ("ca_file", "cert_file", "key_file"):
        file = getattr(settings, name)
        if file is not None:
            try:
                digest.update(file.read_bytes())
            except (OSError, ValueError) as exc:
                raise _Unusable(f"cannot use the TLS files: {name} {file}: {_reason(exc)}") from None
    try:
        context = ssl.create_default_context(cafile=settings.ca_file)
    except (OSError, ValueError) as exc:
        raise _Unusable(f"cannot use the TLS files: ca_file {settings.ca_file}: {_reason(exc)}") from None
    if settings.cert_file is not None:
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file)
        except (OSError, ValueError) as exc:
            raise _Unusable(f"cannot use the TLS files: cert_file {settings.cert_file} with key_file "
                            f"{settings.key_file}: {_reason(exc)}") from None
    return context, digest.hexdigest()


def _reason(exc: Exception) -> str:
    """Why, in a few words: OpenSSL's reason (`NO_CERTIFICATE_OR_CRL_FOUND`, `KEY_VALUES_MISMATCH`) or the
    system's (`No such file or directory`), without the C source line."""
    if isinstance(exc, ssl.SSLError):
        text = re.sub(r" \(_ssl\.c:\d+\)$", "", exc.strerror or str(exc))
        return text if exc.reason else f"not PEM that OpenSSL can read ({text})"
    return getattr(exc, "strerror", None) or str(exc)


@dataclass(frozen=True)
class HeldBackend:
    """A backend held unavailable, as the logs and `/_health/ready` tell it."""

    service: str
    routes: tuple[str, ...]
    error: str

    def report(self) -> dict[str, Any]:
        return {"backend_service": self.service, "routes": list(self.routes), "error": self.error}


def held_backends(config: Config, settings: Mapping[str, ClusterSettings]) -> tuple[HeldBackend, ...]:
    """The backends `cluster_settings` held unavailable, each with the enabled routes that use it."""
    held = {service: s.unusable for service, s in settings.items() if s.unusable is not None}
    routes: dict[str, list[str]] = {service: [] for service in held}
    for route in config.routes:
        if route.enabled and route.backend.service in routes:
            routes[route.backend.service].append(route.name)
    return tuple(HeldBackend(service, tuple(routes[service]), error) for service, error in held.items())


def log_held(held: tuple[HeldBackend, ...]) -> None:
    """At each load: what is held unavailable, for whom, and why (file and reason, never its contents)."""
    for backend in held:
        log.error(
            "backend %s held unavailable, its routes (%s) answer 503 backend_tls_unusable until its TLS files "
            "can be used: %s", backend.service, ", ".join(backend.routes), backend.error,
            extra={"fields": {"backend_service": backend.service, "routes": list(backend.routes),
                              "error": backend.error}},
        )


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
                retired.append(cluster)
            exported = isinstance(cluster.breaker, CircuitBreaker)
            if exported and (service not in clusters or isinstance(clusters[service].breaker, Held)):
                self._metrics.breaker_state.remove(service)  # a backend gone or held has no breaker state
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
