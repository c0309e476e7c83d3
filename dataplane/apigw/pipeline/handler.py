"""The request pipeline, top to bottom: match a route, authenticate, rate limit, check the breaker,
proxy, then count and log. Every gateway-made error is a `GatewayError` turned into JSON here.

A request is counted (every metric of its path: requests, auth success, its rate limit decision, the
backend's answer) and logged after its response has gone out, at the loop's next turn: work done before
the response goes out costs a loaded gateway about three times its own time (`bench/features.py`).
Failures along the way are counted where they happen.

The token's revocation check and the rate limit step are asked together, so that they share one Redis
round trip: a request whose token turns out revoked (or short of scopes) has spent a rate limit slot.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from random import random

from aiohttp import HttpVersion10, HttpVersion11, web

from apigw.config.model import LoggingConfig
from apigw.http.errors import GatewayError
from apigw.http.target import BadTarget, Target, parse_target
from apigw.observability.logs import Access
from apigw.observability.metrics import Metrics
from apigw.pipeline import proxy
from apigw.pipeline.routing import Router
from apigw.pipeline.state import CompiledRoute, Gateway, GatewayState
from apigw.policy import ratelimit
from apigw.policy.breaker import Admission
from apigw.policy.ratelimit import Decision, limit_key
from apigw.policy.retry import CONNECT_FAILED, should_retry
from apigw.upstream.client import Response
from apigw.upstream.cluster import Cluster

log = logging.getLogger("apigw.pipeline")

SUPPORTED_VERSIONS = frozenset({HttpVersion10, HttpVersion11})
NOT_PROXIED = frozenset({"CONNECT", "TRACE"})
"""The gateway tunnels nothing (CONNECT) and reflects nothing (TRACE: a request's headers, tokens included)."""
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
"""The `method` label's values; any other method counts as OTHER, so clients cannot mint series."""
UNROUTED = "-"
"""The `route` of a request that matched no route or was refused before routing (no route's name can be
`-`: names start with a letter or digit)."""
BACKEND_FAILURE_STATUSES = frozenset({502, 503, 504})
"""Backend answers that count against its circuit breaker (with timeouts, refused connections, and
answers that fail inside their body)."""
NOT_THE_BACKENDS_FAILURE = frozenset({"upstream_overflow", "backend_denied"})
"""Gateway errors of a request that reached no backend: the pool is full, or every address of the
backend's host is in `ownership.denied_backend_networks`. Neither counts against the breaker nor is
retried: an open breaker would answer 503 `circuit_open` and hide a configuration problem behind it."""


@dataclass(slots=True)
class Exchange:
    """One request on its way through the pipeline: what the steps after the first need, and what its
    access line and counts say at the end."""

    request: web.BaseRequest
    started: float
    client_ip: str
    trusted: bool
    """The peer is one of `listen.trusted_proxies`."""
    request_id: str
    raw_path: str
    """The path as the client sent it, for the log (`_logged_path`)."""
    route: CompiledRoute | None = None
    auth_status: str = "none"
    """none, failure, or success (counted by `_record`)."""
    decision: Decision | None = None
    """The rate limit decision, allowed or not (counted by `_record`)."""
    error_type: str | None = None
    body: proxy.BodyLimit | None = None
    forwarded: proxy.Forwarded = field(default_factory=proxy.Forwarded)
    admission: Admission | None = None
    """The circuit breaker's admission of the latest attempt. The answer the client is given is judged
    once its body is through (a 200 head says nothing of a body cut short); if the client leaves or the
    gateway fails first, it is released unjudged."""

    def backend_failed(self, error_type: str) -> None:
        """The backend failed inside the answer being relayed: counted as that failure, not as its status,
        and against its breaker."""
        self.forwarded.answered = error_type
        if self.admission is not None:
            self.admission.record(False)


async def handle(request: web.BaseRequest, gateway: Gateway) -> web.StreamResponse:
    """Every proxied request, start to end. The state is read once: a reload during the request
    changes nothing for it."""
    state = gateway.state
    peer = request.remote or ""
    trusted = state.edge.is_trusted(peer)
    ex = Exchange(
        request, time.perf_counter(), state.edge.client_ip(peer, request.headers) if trusted else peer, trusted,
        _request_id(request, trusted or state.edge.keep_any_request_id), _logged_path(request.raw_path),
    )
    response = None
    gateway.metrics.inflight.inc()
    state.usage.inflight += 1
    try:
        _check_head(request, state.config.limits.max_request_head_size)
        target = _target(request)
        route = ex.route = _route(state.router, target, request.method)
        claims = None
        if route.auth is not None and (route.auth.required or "Authorization" in request.headers):
            ex.auth_status = "failure"
            claims = state.auth.verify_request(request.headers.getall("Authorization", []))
        limited = None
        if route.limit is not None and state.limiter is not None:
            key = limit_key(route.limit.key, ex.client_ip, request.headers, claims)
            limited = state.limiter.check(route.limit, key)  # asked now: one Redis round trip with the next step
        if claims is not None:
            await state.auth.admit(claims, route.auth.scopes)  # type: ignore[union-attr]
            ex.auth_status = "success"
        response_headers = {"X-Request-ID": ex.request_id}
        if limited is not None:
            decision = ex.decision = await limited
            if not decision.allowed:
                raise decision.error()
            response_headers.update(decision.headers())
        forwarded_claims = state.auth.forward_headers(claims).items() if claims else ()
        headers = proxy.request_headers(
            request, route.cluster, ex.request_id, target, trusted, state.edge, forwarded_claims
        )
        ex.body = proxy.request_body(
            request, route.max_body, state.config.listen.request_body_timeout, route.request_timeout
        )
        backend_target = proxy.backend_target(route.cluster, route.backend_path(target.path), target.query)
        backend, admission = await _call_backend(ex, route, backend_target, headers, gateway.metrics)
        response = await proxy.relay(request, backend, response_headers, route.cluster.service)
        admission.record(True)  # the whole answer came through (a failure status was recorded at its head)
    except GatewayError as exc:
        ex.error_type = exc.error_type
        if ex.forwarded.answered is not None:  # from `relay`: the backend failed inside its body
            ex.backend_failed(exc.error_type)
        response = error_response(exc, ex.request_id)
        if exc.status == 408 or isinstance(exc, FaultyFraming) or (
            proxy.awaits_continue(request) and (ex.body is None or not ex.body.invited)
        ):  # a body stalled, or never invited (none is coming), or framed in a way another party may not share
            await _answer_and_close(request, response)
    except proxy.StreamAborted as exc:
        ex.error_type = exc.error_type
        if exc.error_type.startswith("backend_"):
            ex.backend_failed(exc.error_type)
        response = exc.response
        if request.transport is not None:
            request.transport.abort()
    except asyncio.CancelledError:  # the client left (aiohttp's handler_cancellation) or the drain ran out
        ex.error_type = "drain_timeout" if gateway.draining else "client_disconnected"
        raise
    except Exception as exc:  # a bug of ours: still a JSON answer, a log line and a count, never a traceback
        ex.error_type = "internal_error"
        log.error("request %s failed: %s: %s", ex.request_id, type(exc).__name__, exc,
                  extra={"fields": {"request_id": ex.request_id, "error_type": ex.error_type}})
        response = error_response(GatewayError(500, ex.error_type, "internal gateway error"), ex.request_id)
    finally:
        if ex.admission is not None:
            ex.admission.release()  # harmless once judged
        gateway.metrics.inflight.dec()
        state.usage.inflight -= 1
        request.task.get_loop().call_soon(_record, gateway, state, ex, response, time.perf_counter())  # see the module
    return response


def _record(
    gateway: Gateway, state: GatewayState, ex: Exchange, response: web.StreamResponse | None, ended: float
) -> None:
    """Count the request and write its access line, once its response is out; a request without a
    response (its handler was cancelled) counts as 499, nginx's "client closed request". `state`: the
    one the request was handled with; `ended`: when the handler was done."""
    duration = ended - ex.started
    route_name = ex.route.name if ex.route else UNROUTED
    status = response.status if response is not None else 499
    metrics = gateway.metrics
    if ex.auth_status == "success":
        state.auth.count_success()
    if ex.decision is not None:
        ratelimit.count(metrics, ex.decision)
    forwarded = ex.forwarded
    if forwarded.answered is not None:
        metrics.backend_requests.labels(forwarded.service, forwarded.answered).inc()
        metrics.backend_duration.labels(forwarded.service).observe(forwarded.duration)
    metrics.http_duration.labels(route_name).observe(duration)
    method = ex.request.method
    metrics.http_requests.labels(route_name, method if method in KNOWN_METHODS else "OTHER", status).inc()
    if logged(state.config.logging, status, ex.error_type):  # before building the line it decides on
        gateway.access_log.write(Access(
            method, ex.raw_path, route_name, status, ex.client_ip, ex.request_id, auth_status=ex.auth_status,
            error_type=ex.error_type, duration=duration, backend_service=ex.forwarded.service,
            backend_duration=ex.forwarded.duration,
        ))


def count(gateway: Gateway, access: Access) -> None:
    """A request answered outside the pipeline: in `gateway_http_requests_total`, and its access line."""
    method = access.method if access.method in KNOWN_METHODS else "OTHER"
    gateway.metrics.http_requests.labels(access.route, method, access.status).inc()
    if logged(gateway.state.config.logging, access.status, access.error_type):
        gateway.access_log.write(access)


def logged(settings: LoggingConfig, status: int, error_type: str | None) -> bool:
    """Whether a request's access line is written: every error (a status of 400 or more, or an error the
    gateway saw, such as a response cut short), and of the rest `access_log_sample`'s share."""
    if not settings.access_log:
        return False
    sample = settings.access_log_sample
    return sample == 1.0 or status >= 400 or error_type is not None or random() < sample


async def _call_backend(
    ex: Exchange, route: CompiledRoute, target: str, headers: list[tuple[str, str]], metrics: Metrics
) -> tuple[Response, Admission]:
    """Send through the cluster's circuit breaker, retrying what is safe to retry within its budget and
    the route's `request_timeout`; each attempt also within `attempt_timeout`. Returns the answer and its
    breaker admission, not yet judged if its status is not a failure: `handle` judges it by its body."""
    request, body, forwarded = ex.request, ex.body, ex.forwarded
    cluster = route.cluster
    forwarded.service = cluster.service
    cluster.retry_budget.record_request()
    service = cluster.service
    loop = request.task.get_loop()  # not asyncio.get_running_loop(): on Python 3.11 that is a getpid() call
    request_deadline = loop.time() + route.request_timeout
    retries = 0
    while True:
        deadline = request_deadline
        if route.attempt_timeout is not None:
            deadline = min(deadline, loop.time() + route.attempt_timeout)
        admission = ex.admission = cluster.breaker.admit()  # released by `handle` if nothing judges it
        try:
            backend = await proxy.send(request, cluster, target, headers, (route.timeout, deadline), body, forwarded)
        except GatewayError as exc:
            metrics.backend_requests.labels(service, exc.error_type).inc()
            metrics.backend_duration.labels(service).observe(forwarded.duration)
            if exc.status < 500 or exc.error_type in NOT_THE_BACKENDS_FAILURE:
                raise
            admission.record(False)
            outcome = CONNECT_FAILED if exc.error_type == "backend_unreachable" else exc.error_type
            if _may_retry(request, cluster, retries, outcome, request_deadline):
                retries += 1
                continue
            raise
        failed = backend.status in BACKEND_FAILURE_STATUSES
        if body is None and _may_retry(request, cluster, retries, backend.status, request_deadline):
            admission.record(not failed)  # its body is dropped unread: the head is all there is to judge
            metrics.backend_requests.labels(service, backend.status).inc()
            metrics.backend_duration.labels(service).observe(forwarded.duration)
            backend.release()
            retries += 1
            continue
        if failed:
            admission.record(False)
        forwarded.answered = backend.status  # counted with the request, once its response is out
        return backend, admission


def _may_retry(request: web.BaseRequest, cluster: Cluster, retries: int, outcome: int | str, deadline: float) -> bool:
    return (should_retry(request.method, retries, outcome, cluster.retries)
            and asyncio.get_running_loop().time() < deadline and cluster.retry_budget.can_retry())


def error_response(error: GatewayError, request_id: str) -> web.Response:
    headers = {**error.headers, "X-Request-ID": request_id}
    return web.Response(status=error.status, body=error_body(error, request_id), content_type="application/json",
                        headers=headers)


def error_body(error: GatewayError, request_id: str) -> bytes:
    """The JSON every answer of the gateway's own carries."""
    return json.dumps({"error": error.message, "request_id": request_id}).encode()


async def _answer_and_close(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Send `response` and close, instead of aiohttp's lingering read of the unread body (up to 10 s)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()


class FaultyFraming(GatewayError):
    """A request body framed in a way not every HTTP/1.x party reads alike: answered, and nothing more is
    read on that connection (RFC 9112 6.1)."""

    def __init__(self, message: str):
        super().__init__(400, "bad_request", message)


def _check_head(request: web.BaseRequest, max_size: int) -> None:
    """The request head within the size backends must accept, its framing one that every HTTP/1.x party
    reads alike, and no expectation but 100-continue (which the body's first read answers, once the
    request has passed every check)."""
    size = len(request.method) + len(request.raw_path) + sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
    if size > max_size:
        raise GatewayError(431, "headers_too_large", f"request line and headers are larger than {max_size} bytes")
    if request.version == HttpVersion10 and "Transfer-Encoding" in request.headers:
        raise FaultyFraming("an HTTP/1.0 request cannot carry Transfer-Encoding (a proxy may frame its body otherwise)")
    expect = request.headers.get("Expect")
    if expect is not None and expect.lower() != "100-continue":
        raise GatewayError(417, "expectation_failed", "the only expectation the gateway meets is 100-continue")


def _target(request: web.BaseRequest) -> Target:
    """What the request asks for, in the one meaning the router and the backend share."""
    if request.version not in SUPPORTED_VERSIONS:
        major, minor = request.version
        raise GatewayError(505, "unsupported_version", f"HTTP/{major}.{minor} is not supported (HTTP/1.0 and 1.1 are)")
    if request.method in NOT_PROXIED:
        raise GatewayError(405, "method_not_allowed", f"the gateway does not pass on {request.method} requests")
    raw = request.raw_path
    if raw == "*" and request.method == "OPTIONS":  # asks about the server: no route is about that
        return Target("", "*", "")
    try:
        return parse_target(raw, request.headers.get("Host"))
    except BadTarget as exc:
        raise GatewayError(400, exc.error_type, str(exc)) from None


def _route(router: Router[CompiledRoute], target: Target, method: str) -> CompiledRoute:
    """The route for `target`, refusing a path whose route Tomcat, Jetty or Spring would see differently
    (they cut `;parameters` from segments before matching)."""
    route = router.match(target.host, target.path, method)
    bare = target.without_parameters()
    if bare is not None and router.match(target.host, bare, method) is not route:
        raise GatewayError(400, "bad_path", "path parameters (;) would change which route the path takes")
    if route is None:
        raise GatewayError(404, "no_route", f"no route for {method} {target.path}")
    return route


def _logged_path(raw_path: str) -> str:
    """The target as the client sent it, for the log, without what may be a secret: the query (API keys
    travel there) and, in an absolute-form target (refused, but sent all the same), the user information."""
    path = raw_path.partition("#")[0].partition("?")[0]
    if "@" in path and "://" in path:
        scheme, _, rest = path.partition("://")
        authority, slash, tail = rest.partition("/")
        if "@" in authority:
            path = f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{tail}"
    return path


def _request_id(request: web.BaseRequest, keep_given: bool) -> str:
    """The caller's X-Request-ID when `keep_given` and it is sane, else a new one, unique per process
    start and count: an untrusted client must not choose the id other systems file its request under."""
    given = request.headers.get("X-Request-ID") if keep_given else None
    if given and len(given) <= 128 and given.isprintable() and given.isascii():
        return given
    return new_request_id()


def new_request_id() -> str:
    """Unique per process start and count."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count()
