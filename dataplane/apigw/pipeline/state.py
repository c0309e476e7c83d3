"""The config compiled into ready objects, and the one reference through which requests reach it.

`build_state` turns a validated `Config` into everything the request pipeline needs, computed once:
route table, per-route limits and rewrites, and the upstream cluster of every backend. A reload builds a whole
new `GatewayState` and swaps `Gateway.state`; requests already running keep the state they started with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from apigw.config.model import Config, RedisConfig, Route, config_hash
from apigw.observability.logs import AccessLog
from apigw.observability.metrics import Metrics
from apigw.pipeline.proxy import Edge
from apigw.pipeline.routing import Router
from apigw.policy.auth import Authenticator, KeyRing, load_keys
from apigw.policy.ratelimit import Limiter, LimitRule, build_limiter, check_shared_limits
from apigw.redis.batch import RedisBatch
from apigw.upstream.cluster import Cluster, Clusters, HeldBackend, cluster_settings, held_backends, log_held


@dataclass(frozen=True, slots=True)
class AuthRule:
    required: bool
    """False: a token is checked when sent (its claims may key limits), but none is needed."""
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One route, ready for the hot path."""

    name: str
    cluster: Cluster
    timeout: float
    """Seconds to wait for the backend's response headers, and for each chunk of its body."""
    attempt_timeout: float | None
    request_timeout: float
    """Seconds: one attempt to its last byte; the whole request (see `Backend`)."""
    max_body: int
    rewrite: tuple[str, str] | None
    """(matched prefix, replacement) when the route rewrites the path."""
    limit: LimitRule | None
    """The route's rate limit policy, when it has one and rate limiting is enabled."""
    auth: AuthRule | None

    def backend_path(self, path: str) -> str:
        if self.rewrite is None:
            return path
        prefix, replacement = self.rewrite
        rest = path[len(prefix):]
        if replacement.endswith("/") and rest.startswith("/"):
            rest = rest[1:]
        return (replacement + rest) or "/"


@dataclass
class Usage:
    """Requests running on one state: its retired pools close only when this is back to 0."""

    inflight: int = 0


@dataclass(frozen=True)
class GatewayState:
    config: Config
    config_hash: str
    router: Router[CompiledRoute]
    limiter: Limiter | None
    auth: Authenticator
    edge: Edge
    held: tuple[HeldBackend, ...] = ()
    """Backends held unavailable (their TLS files cannot be used), for `/_health/ready`."""
    usage: Usage = field(default_factory=Usage)


class Shared:
    """What outlives a config: the clusters of unchanged backends, Redis, the authenticator and limiter."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic, one_of_workers: bool = False):
        self.metrics = metrics
        self.one_of_workers = one_of_workers
        """This process shares the traffic port with sibling workers (`gateway --workers N`)."""
        self.clusters = Clusters(metrics, clock)
        self.redis: RedisBatch | None = None
        self._redis_settings: RedisConfig | None = None
        self._kept: dict[str, tuple[object, Any]] = {}
        self.retired: list[Cluster | RedisBatch] = []
        """Pools replaced by a reload, to close once requests begun on the old config are done."""

    def redis_for(self, settings: RedisConfig | None) -> RedisBatch | None:
        """Redis (behind the per-tick batch) for `settings`; a new client only when they change."""
        if settings != self._redis_settings:
            new = RedisBatch(settings, on_master=self.metrics.redis_master_moved) if settings else None
            if self.redis is not None:
                self.retired.append(self.redis)
            self.redis, self._redis_settings = new, settings
        return self.redis

    def authenticator_for(self, config: Config, keys: KeyRing) -> Authenticator:
        """Kept while the auth settings, the keys and the Redis client stay (its token cache lives in it)."""
        return self._keep("auth", (config.auth, tuple(keys.keys), id(self.redis)),
                          lambda: Authenticator(config.auth, self.metrics, self.redis, keys, time.time))

    def limiter_for(self, config: Config) -> Limiter | None:
        """Kept while the limit settings and the Redis client stay (in-process buckets live in it)."""
        return self._keep("limiter", (config.ratelimit, config.redis, id(self.redis)),
                          lambda: build_limiter(config, self.metrics, self.redis))

    def _keep(self, slot: str, key: object, make: Callable[[], Any]) -> Any:
        """The object in `slot` if it was made for `key`, else a new one from `make`."""
        kept = self._kept.get(slot)
        if kept is None or kept[0] != key:
            kept = self._kept[slot] = (key, make())
        return kept[1]

    async def close(self) -> None:
        """Close every pool, current and retired."""
        pools, self.retired = [*self.retired, *self.clusters, self.redis], []
        for pool in pools:
            if pool is not None:
                await pool.aclose()


def build_state(config: Config, shared: Shared, digest: str | None = None) -> GatewayState:
    """Compile `config` into ready objects, reusing what `shared` holds for unchanged backends."""
    steps = build_steps(config, shared, digest)
    while True:
        try:
            next(steps)
        except StopIteration as built:
            return built.value


STEP = 500
"""Routes compiled per step of `build_steps` (about 2 ms)."""


def build_steps(config: Config, shared: Shared, digest: str | None = None) -> Generator[None, None, GatewayState]:
    """`build_state` in steps, for a caller that serves traffic in between: yields after each `STEP` routes,
    returns the state.

    Reading files (the only step that can fail) comes first, so a failure leaves `shared` untouched. A backend
    held unavailable is logged here, at each load (start-up and every reload).
    `digest` is `config_hash(config)` when the caller has it (a reload computes it off the event loop).
    """
    keys = load_keys(config.auth)
    clusters = cluster_settings(config)
    if shared.one_of_workers:
        check_shared_limits(config)
    held = held_backends(config, clusters)
    log_held(held)
    enabled = [route for route in config.routes if route.enabled]
    shared.redis_for(config.redis)
    auth = shared.authenticator_for(config, keys)
    limiter = shared.limiter_for(config)
    rules = {policy.name: LimitRule.from_policy(policy) for policy in config.policies} if limiter else {}
    shared.retired += shared.clusters.update(clusters)
    compiled: list[tuple[Route, CompiledRoute]] = []
    for start in range(0, len(enabled), STEP):
        yield
        compiled += [(route, _compile(route, shared.clusters[route.backend.service], config, limit_rule(route, rules)))
                     for route in enabled[start:start + STEP]]
    yield
    return GatewayState(
        config, digest or config_hash(config), Router(compiled), limiter, auth,
        Edge(config.listen, auth.stripped_headers), held,
    )


def limit_rule(route: Route, rules: dict[str, LimitRule]) -> LimitRule | None:
    return rules.get(route.ratelimit) if route.ratelimit else None


def _compile(route: Route, cluster: Cluster, config: Config, limit: LimitRule | None) -> CompiledRoute:
    matched = route.match.path_prefix or route.match.path
    return CompiledRoute(
        name=route.name,
        cluster=cluster,
        timeout=route.backend.timeout,
        attempt_timeout=route.backend.attempt_timeout,
        request_timeout=route.backend.request_timeout,
        max_body=int(route.max_body_size if route.max_body_size is not None else config.limits.max_body_size),
        rewrite=(matched.rstrip("/") if matched != "/" else "", route.rewrite_prefix) if route.rewrite_prefix else None,
        limit=limit,
        auth=AuthRule(route.auth.required, tuple(route.auth.scopes)) if route.auth else None,
    )


@dataclass
class Gateway:
    """The process-wide handle: the state in force, metrics, and the lifecycle flags health reports."""

    state: GatewayState
    shared: Shared
    access_log: AccessLog = field(default_factory=AccessLog)
    draining: bool = False
    last_reload_error: str | None = None

    @classmethod
    def create(cls, config: Config, metrics: Metrics, one_of_workers: bool = False) -> Gateway:
        shared = Shared(metrics, one_of_workers=one_of_workers)
        return cls(build_state(config, shared), shared)

    @property
    def metrics(self) -> Metrics:
        return self.shared.metrics


GATEWAY = web.AppKey("gateway", Gateway)
