"""Rate limiting with GCRA, shared by all replicas through one Lua script in Redis, or kept in-process.

GCRA (generic cell rate algorithm) keeps one number per bucket: its theoretical arrival time (TAT), the
moment the bucket would be full again. A policy of `requests` per `period` plus `burst` lets
`requests + burst` requests through at once, then one every `period / requests`. There are no windows,
so no window edge where a second full allowance opens: within any span of w seconds at most
`limit - 1 + ceil(w / interval)` requests pass (`limit` = requests + burst), and never more than `limit`
within one interval.

Times are integer microseconds: Redis `TIME` gives them, and they stay exact in Lua's doubles. The Redis
limiter reads the Redis server's clock, so replicas with skewed clocks agree.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from redis.exceptions import RedisError

from apigw.config.errors import ConfigError
from apigw.config.model import Config, FailureMode, LimitKey, Policy
from apigw.http.errors import GatewayError
from apigw.observability.metrics import Metrics
from apigw.redis.batch import RedisBatch

log = logging.getLogger("apigw.ratelimit")


_MICROS = 1_000_000
_READABLE_KEY = re.compile(r"[A-Za-z0-9._:@/-]{1,80}").fullmatch
"""Keys kept as they are in Redis, for people to read: IPv4, IPv6 networks, plain claim values."""

@dataclass(slots=True)
class Decision:
    """One rate limit decision, in the terms of the `RateLimit-*` headers. Not frozen: a frozen
    dataclass sets each field through `object.__setattr__`, three times the cost of making one, per request."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    """Seconds until the full budget is back."""
    retry_after: float = 0.0
    """Seconds until a request would be allowed; 0 when allowed."""
    degraded: bool = False
    """The limiter failed and `fail_open` let the request through: nothing is known about the budget."""
    policy: str = ""
    elapsed: float = 0.0
    """Seconds from asking to the decision: `gateway_ratelimit_duration_seconds`."""

    @property
    def outcome(self) -> str:
        """The `decision` label: allowed, limited, or error (let through by `fail_open`)."""
        return "error" if self.degraded else "allowed" if self.allowed else "limited"

    def headers(self) -> dict[str, str]:
        """`RateLimit-Limit/-Remaining/-Reset` (IETF draft, integer seconds), and `Retry-After` when denied."""
        if self.degraded:
            return {}
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_after)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers

    def error(self) -> GatewayError:
        """The 429 answer to a denied request."""
        retry = max(1, math.ceil(self.retry_after))
        return GatewayError(429, "limit_exceeded", f"rate limit exceeded, retry in {retry} s", self.headers())


@dataclass(frozen=True, slots=True)
class LimitRule:
    """A policy's constants, computed once at config load: the hot path only reads them."""

    policy: str
    key: LimitKey
    limit: int
    """Requests allowed at once: `requests + burst`."""
    interval: int
    """Microseconds between requests at the steady rate, `period / requests`."""
    capacity: int
    """`limit * interval`: how far ahead of now a bucket's TAT may run."""
    prefix: str

    @classmethod
    def from_policy(cls, policy: Policy) -> LimitRule:
        limit = policy.requests + policy.burst
        interval = max(1, round(policy.period * _MICROS / policy.requests))
        return cls(policy.name, policy.key, limit, interval, limit * interval, f"ratelimit:{policy.name}:")

    def bucket(self, key: str) -> str:
        """The Redis key of a bucket. A long or odd key is hashed, so a hostile value cannot bloat Redis."""
        if _READABLE_KEY(key):
            return self.prefix + key
        return self.prefix + "#" + _digest(key)

    def decision(self, allowed: bool, full_in: int, retry_in: int, elapsed: float) -> Decision:
        remaining = max(0, (self.capacity - full_in) // self.interval)
        return Decision(
            allowed, self.limit, remaining, full_in / _MICROS, retry_in / _MICROS, False, self.policy, elapsed
        )  # positional: this runs once per request


def gcra(rule: LimitRule, tat: int | None, now: int) -> tuple[bool, int, int]:
    """One decision, as the Lua script makes it: (allowed, the bucket's new TAT, microseconds to wait)."""
    if tat is None or tat < now:
        tat = now
    elif tat > now + rule.capacity:  # spent under a stricter policy of the same name: the new one bounds it
        tat = now + rule.capacity
    allow_at = tat + rule.interval - rule.capacity
    if now < allow_at:
        return False, tat, allow_at - now
    return True, tat + rule.interval, 0


def limit_key(
    key: LimitKey, client_ip: str, headers: CIMultiDictProxy[str] | CIMultiDict[str], claims: Mapping[str, Any] | None
) -> str:
    """Whose budget a request spends: its client IP, a header's value, or a JWT claim.

    Without the header or claim a request spends its client IP's budget: one shared bucket for all such
    requests would let a single client starve the others. An IPv6 client's budget is its /64's: a host is
    given a whole /64 and may use any address in it (privacy addresses rotate by themselves), so one
    bucket per address would let one host mint budgets and fill Redis with keys. Header values are hashed because they may be
    credentials (API keys) and Redis keys are read by people. More than one copy of the header is refused:
    a backend reading another copy than the first would serve a key whose budget was never spent.
    """
    if key.type == "header":
        values = headers.getall(key.name, ())  # type: ignore[arg-type]
        if len(values) > 1:
            raise GatewayError(400, "bad_header", f"more than one {key.name} header (the rate limit key)")
        if values and values[0]:
            return "header:" + _digest(values[0])
    elif key.type == "claim" and claims:
        value = claims.get(key.name)  # type: ignore[arg-type]
        if isinstance(value, str):
            if value:
                return f"claim:{value}"
        elif value is not None:  # typed: the number 1 and the string "1" are two subjects, not one budget
            return "claim=" + json.dumps(value, sort_keys=True, separators=(",", ":"))
    return f"ip:{_client_network(client_ip) if ':' in client_ip else client_ip}"


def _client_network(address: str) -> str:
    """An IPv6 address's /64 (`2001:db8:1:2::/64`); an IPv4-mapped one is its IPv4 address."""
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


def count(metrics: Metrics, decision: Decision) -> None:
    """Count and time a decision the request was given. The pipeline calls this once the response has
    gone out: work done before costs a loaded gateway about three times its own (`bench/features.py`)."""
    metrics.ratelimit_duration.observe(decision.elapsed)
    metrics.ratelimit_requests.labels(decision.policy, decision.outcome).inc()


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Limiter(Protocol):
    def check(self, rule: LimitRule, key: str) -> Awaitable[Decision]:
        """Asks at once (a Redis step joins the batch being gathered, with the request's revocation check);
        the decision comes when awaited. Dropping it unawaited (the request failed meanwhile) is fine.
        The caller counts the decision (`count`); a failure `fail_closed` turns into 503 is counted here."""
        ...


class _Pending:
    """A Redis decision asked of the batch; awaiting it gives the Decision. Not a coroutine (no coroutine
    object per request), so dropping it unawaited (the request failed meanwhile) leaves no 'never
    awaited' warning behind."""

    __slots__ = ("_limiter", "_rule", "_started", "_step")

    def __init__(self, limiter: RedisLimiter, rule: LimitRule, step: Awaitable[tuple[int, int, int]], started: float):
        self._limiter, self._rule, self._step, self._started = limiter, rule, step, started

    def __await__(self) -> Generator[Any, None, Decision]:
        limiter, rule = self._limiter, self._rule
        try:
            allowed, full_in, retry_in = yield from self._step.__await__()  # type: ignore[attr-defined]
        except (RedisError, OSError, TimeoutError) as error:
            return limiter.failed(rule, error, time.perf_counter() - self._started)
        return rule.decision(allowed == 1, full_in, retry_in, time.perf_counter() - self._started)


class _Deferred:
    """An awaitable whose coroutine is only made when awaited, so dropping it leaves no 'never awaited'
    coroutine behind."""

    __slots__ = ("_args", "_make")

    def __init__(self, make: Callable[..., Coroutine[Any, Any, Decision]], *args: Any):
        self._make, self._args = make, args

    def __await__(self) -> Generator[Any, None, Decision]:
        return self._make(*self._args).__await__()


class RedisLimiter:
    """GCRA in Redis, as one step of the tick's batch script (`apigw.redis.batch`): decisions of concurrent
    requests share a round trip. A slow Redis is logged by the batch that waited for it, once per round
    trip, not once per decision."""

    def __init__(self, batch: RedisBatch, metrics: Metrics, failure_mode: FailureMode):
        self._batch = batch
        self._metrics = metrics
        self._failure_mode = failure_mode
        metrics.redis_errors.labels(operation="ratelimit")  # at 0 before the first error, as the revocation check's

    def check(self, rule: LimitRule, key: str) -> Awaitable[Decision]:
        step = self._batch.limit(rule.bucket(key), rule.interval, rule.capacity)
        return _Pending(self, rule, step, time.perf_counter())

    def failed(self, rule: LimitRule, error: Exception, elapsed: float) -> Decision:
        """Count and log the error, then let the request through or answer 503, as `failure_mode` says."""
        self._metrics.ratelimit_errors.inc()
        self._metrics.redis_errors.labels(operation="ratelimit").inc()
        reason = self._batch.describe(error)
        log.error(
            "ratelimit error: %s; %s", reason, self._failure_mode.value,
            extra={"fields": {"policy": rule.policy, "error": reason, "failure_mode": self._failure_mode.value}},
        )
        decision = Decision(True, rule.limit, 0, 0.0, degraded=True, policy=rule.policy, elapsed=elapsed)
        if self._failure_mode is FailureMode.fail_closed:
            count(self._metrics, decision)  # no decision reaches the caller to count
            raise GatewayError(503, "ratelimit_unavailable", "rate limiter unavailable") from error
        return decision


MEMORY_BUCKETS = 1_000_000
"""The most buckets the in-process limiter keeps (about 150 MB): clients minting keys (header values,
IPv6 networks) cannot grow it past that; the least recently set buckets go first, and start full again."""


class MemoryLimiter:
    """The same GCRA with in-process state: per replica, for `gateway demo` and configs without Redis."""

    def __init__(self, clock: Callable[[], float], most: int = MEMORY_BUCKETS):
        self._clock = clock
        self._tats: dict[str, int] = {}
        self._sweep_at = 1024
        self._most = most

    def check(self, rule: LimitRule, key: str) -> Awaitable[Decision]:
        return _Deferred(self._decide, rule, key)

    async def _decide(self, rule: LimitRule, key: str) -> Decision:
        started = time.perf_counter()
        now = round(self._clock() * _MICROS)
        bucket = rule.bucket(key)
        allowed, tat, retry_in = gcra(rule, self._tats.pop(bucket, None), now)
        self._tats[bucket] = tat  # popped and set again: the dict's order is the order buckets were last set
        if len(self._tats) >= self._sweep_at:
            self._sweep(now)
        return rule.decision(allowed, tat - now, retry_in, time.perf_counter() - started)

    def _sweep(self, now: int) -> None:
        """Forget full buckets (TAT passed), as Redis expires them, then the least recently set beyond the
        cap; amortised over the inserts since the last sweep."""
        live = [(bucket, tat) for bucket, tat in self._tats.items() if tat > now]
        if len(live) > self._most // 2:
            log.warning("in-process rate limiter: %d live buckets, keeping the %d last set (the rest start full)",
                        len(live), self._most // 2)
            live = live[-(self._most // 2):]
        self._tats = dict(live)
        self._sweep_at = min(self._most, max(1024, 2 * len(self._tats)))


def check_shared_limits(config: Config) -> None:
    """For one of several worker processes: refuse in-process limits, which each worker would keep for
    itself, so that together they would let the policy through once per worker."""
    if config.ratelimit.enabled and config.redis is None:
        limited = [route.name for route in config.routes if route.ratelimit is not None]
        if limited:
            named = ", ".join(limited[:3]) + (" ..." if len(limited) > 3 else "")
            raise ConfigError([(
                f"routes: {named} name a rate limit policy, but with --workers (listen.workers) above 1 and no "
                "redis each worker would keep its own budget and let the policy through once per worker: "
                "configure redis, or run one worker"
            )])


def build_limiter(config: Config, metrics: Metrics, batch: RedisBatch | None) -> Limiter | None:
    """The limiter a config asks for: none when `ratelimit.enabled` is false, Redis-backed when `redis` is
    configured (pass the batch built on its client), else in-process."""
    if not config.ratelimit.enabled:
        return None
    for policy in config.policies:  # each decision at 0 before the first, so that rate() sees a storm's start
        for outcome in ("allowed", "limited", "error") if config.redis else ("allowed", "limited"):
            metrics.ratelimit_requests.labels(policy.name, outcome)
    if config.redis is None:
        return MemoryLimiter(time.monotonic)
    if batch is None:
        raise ValueError("config.redis is set: pass the RedisBatch built on its client")
    return RedisLimiter(batch, metrics, config.ratelimit.failure_mode)
