"""Forwarding one request to a backend and streaming the answer back.

Bodies stream in both directions (a 100 MB upload or download is never held in memory), hop-by-hop
headers are dropped, and the backend learns who called through X-Forwarded-* and X-Request-ID.
Where a request goes, and with what timeouts, is its upstream cluster's (`apigw.upstream.cluster`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address, ip_address

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from apigw.config.model import ListenConfig
from apigw.http.errors import GatewayError
from apigw.http.headers import HOP_BY_HOP, NOT_FORWARDED
from apigw.http.target import Target
from apigw.upstream.client import BackendError, Response
from apigw.upstream.cluster import Cluster

CALLER_IDENTITY = frozenset(
    {"forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "x-cluster-client-ip", "x-original-forwarded-for"}
)
"""With every `X-Forwarded-*`: what backends read to learn who called and how; believed from trusted
proxies only."""
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
SMALL_BODY = 64 * 1024
"""Responses up to this size with a known length are read whole and sent in one write."""


@dataclass(slots=True)
class Forwarded:
    """Whether and how the request went to its backend, for metrics and the access log."""

    service: str | None = None
    """The backend service, once the request reached it or its circuit breaker: a request refused
    before (no route, auth, rate limit, a bad request) names no backend."""
    duration: float = 0.0
    """Seconds until the backend's response headers (or its failure), of the last attempt."""
    answered: int | None = None
    """The status of the backend answer the client is given (attempts before it are counted at once)."""


class BodyLimit:
    """Streams the request body through, stopping once it passes `limit` bytes, the client keeps the
    next piece waiting longer than `idle_timeout`, or the body is still coming at `deadline` (event-loop
    time): a client trickling its body holds a backend connection no longer than the request may last.
    A client that sent `Expect: 100-continue` is invited to send the body only now, when the backend
    asks for it: every check before has passed."""

    def __init__(self, request: web.BaseRequest, limit: int, idle_timeout: float, deadline: float):
        self.request, self.limit, self.idle_timeout, self.deadline = request, limit, idle_timeout, deadline
        self.seen = 0
        self.failure: GatewayError | None = None
        """Why the body was cut short by the gateway (too large, too slow), once it was."""
        self.invited = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        request = self.request
        if awaits_continue(request):
            await request.writer.write(CONTINUE)
        self.invited = True
        stream = request.content
        loop = request.task.get_loop()
        while True:
            try:
                async with asyncio.timeout_at(min(loop.time() + self.idle_timeout, self.deadline)):
                    chunk = await stream.readany()
            except TimeoutError:
                self.failure = GatewayError(408, "client_body_timeout", "the request body stopped arriving"
                                            if loop.time() < self.deadline else "the request body came too slowly")
                raise self.failure from None
            if not chunk:
                return
            self.seen += len(chunk)
            if self.seen > self.limit:
                self.failure = too_large(self.limit)
                raise self.failure
            yield chunk


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def awaits_continue(request: web.BaseRequest) -> bool:
    """The client holds its body back until invited (`Expect: 100-continue`)."""
    return request.version >= HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, "body_too_large", f"request body is larger than {limit} bytes")


class Edge:
    """Who the gateway believes: trusted proxies' forwarding headers, and which client headers go on.
    Built once per config."""

    def __init__(self, listen: ListenConfig, claim_headers: Iterable[str]):
        self.trusted_networks = tuple(listen.trusted_proxies)
        self.reject_underscores = listen.headers_with_underscores == "reject"
        self.keep_any_request_id = listen.trust_client_request_id
        self.drop_from_trusted = NOT_FORWARDED | {name.lower() for name in claim_headers}
        self.drop_from_untrusted = self.drop_from_trusted | CALLER_IDENTITY
        self._trusted = lru_cache(maxsize=1024)(self._is_trusted)

    def is_trusted(self, peer: str) -> bool:
        return bool(self.trusted_networks) and self._trusted(peer)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = _unmapped(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_networks)

    def client_ip(self, trusted_peer: str, headers: CIMultiDictProxy[str]) -> str:
        """Behind trusted proxies (the peer is one), the rightmost X-Forwarded-For entry that is not one
        of them; an entry that is no IP address ends the walk at the proxy that sent it."""
        client = trusted_peer
        hops = ",".join(headers.getall("X-Forwarded-For", ())).split(",")
        for hop in reversed(hops):
            hop = hop.strip()
            try:
                client = str(_unmapped(hop))
            except ValueError:
                return client
            if not self.is_trusted(client):
                return client
        return client


def _unmapped(address: str) -> IPv4Address | IPv6Address:
    """`address` as an IP address, an IPv4-mapped one (`::ffff:a.b.c.d`, a dual-stack socket's IPv4 peer) as
    its IPv4 address: one client, one rate limit bucket, and `trusted_proxies` in IPv4 match it."""
    ip = ip_address(address)
    return getattr(ip, "ipv4_mapped", None) or ip


def request_headers(
    request: web.BaseRequest, cluster: Cluster, request_id: str, target: Target, trusted: bool, edge: Edge,
    extra: Iterable[tuple[str, str]],
) -> list[tuple[str, str]]:
    """The headers the backend receives: the client's end-to-end headers (less those `edge` drops, and
    those named in Connection), plus ours. Header names with `_` are dropped or refused."""
    incoming = request.headers
    drop = edge.drop_from_trusted if trusted else edge.drop_from_untrusted
    connection = incoming.getall("Connection", ())
    if connection:
        drop = drop | {token.strip().lower() for value in connection for token in value.split(",")}
    headers = []
    for name, value in incoming.items():
        lower = name.lower()
        if lower in drop or (not trusted and lower.startswith("x-forwarded-")):
            continue
        if "_" in name:
            if edge.reject_underscores:
                raise GatewayError(400, "bad_header", f"header name {name!r} has an underscore")
            continue
        headers.append((name, value))
    peer = request.remote or ""
    prior = incoming.getall("X-Forwarded-For", ()) if trusted else ()
    headers += (
        ("Host", cluster.host_header),
        ("X-Forwarded-For", ", ".join((*prior, peer))),
        ("X-Request-ID", request_id),
    )
    if not (trusted and "X-Forwarded-Proto" in incoming):
        headers.append(("X-Forwarded-Proto", request.scheme))
    if target.host and not (trusted and "X-Forwarded-Host" in incoming):
        headers.append(("X-Forwarded-Host", target.host))
    headers.extend(extra)
    return headers


def request_body(
    request: web.BaseRequest, max_body: int, idle_timeout: float, request_timeout: float
) -> BodyLimit | None:
    """The body to stream to the backend, or None; 413 at once when the declared length is over the limit.
    It must be in whole within `request_timeout` from now."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length > max_body:
        raise too_large(max_body)
    return BodyLimit(request, max_body, idle_timeout, request.task.get_loop().time() + request_timeout)


def backend_target(cluster: Cluster, path: str, query: str) -> str:
    """The request target on the backend: its base path, then `path` (in normal form, the one routed),
    then the client's query as it came."""
    path = cluster.base_path + path
    return f"{path}?{query}" if query else path


async def send(
    request: web.BaseRequest, cluster: Cluster, target: str, headers: list[tuple[str, str]],
    waits: tuple[float, float], body: BodyLimit | None, result: Forwarded,
) -> Response:
    """Send the request to `cluster`; return once the response headers are in. `waits` are the longest
    wait for the backend (for the headers, and for each chunk of the body later) and the attempt's
    deadline in event-loop time (its body included).

    Raises GatewayError (502/503/504/413) when no response comes; `result` records what happened either way.
    """
    started = time.perf_counter()
    timeout, deadline = waits
    try:
        backend = await cluster.pool.request(
            request.method, target, headers, body, request.content_length, timeout, cluster.connect_timeout, deadline
        )
    except Exception as exc:
        result.duration = time.perf_counter() - started
        if body is not None and body.failure is not None:
            raise body.failure from None
        if isinstance(exc, GatewayError):
            raise
        if isinstance(exc, _CLIENT_BODY_ERRORS):  # the client left or garbled its body: not the backend's fault
            raise GatewayError(400, "client_body_aborted", "the request body ended before it was complete") from None
        raise _backend_error(cluster.service, exc) from None
    result.duration = time.perf_counter() - started
    return backend


async def relay(
    request: web.BaseRequest, backend: Response, extra_headers: Mapping[str, str], service: str
) -> web.StreamResponse:
    """Stream the backend's response to the client, adding `extra_headers`.

    Before the response begins, a backend failure is a GatewayError (502/504); after, StreamAborted.
    """
    try:
        return await _relay(request, backend, extra_headers, service)
    finally:
        backend.release()


async def _relay(
    request: web.BaseRequest, backend: Response, extra_headers: Mapping[str, str], service: str
) -> web.StreamResponse:
    bodiless = request.method == "HEAD" or backend.status in (204, 304)
    drop = HOP_BY_HOP if bodiless else _RESPONSE_DROP  # a HEAD answer keeps the length of the body it omits
    kept, named = [], set()
    for name, value in backend.headers:
        lower = name.lower()
        if lower == "connection":
            named.update(token.strip().lower() for token in value.split(","))
        elif lower == "transfer-encoding" and value.strip().lower() != "chunked":
            # e.g. gzip: the client would get bytes nothing says are gzip
            raise GatewayError(502, "backend_invalid_response",
                               f"backend {service} sent a transfer coding the gateway does not pass on")
        if lower not in drop:
            kept.append((name, value))
    headers = CIMultiDict([(k, v) for k, v in kept if k.lower() not in named] if named else kept)
    headers.update(extra_headers)
    length = backend.content_length
    if not bodiless and length is not None and length <= SMALL_BODY:
        try:
            body = await backend.read()
        except BackendError as exc:
            raise _backend_error(service, exc) from None
        return web.Response(status=backend.status, reason=backend.reason, headers=headers, body=body)
    response = web.StreamResponse(status=backend.status, reason=backend.reason, headers=headers)
    if length is not None and not bodiless:
        response.content_length = length
    try:
        await response.prepare(request)
        while not bodiless:
            try:
                chunk = await backend.chunk()
            except BackendError as exc:
                raise StreamAborted(response, "backend_timeout" if exc.kind == "timeout" else "backend_stream_aborted") from None
            if not chunk:
                break
            async with asyncio.timeout_at(backend.deadline):  # a client that stops reading holds the backend
                await response.write(chunk)
        await response.write_eof()
    except ConnectionError:  # the client went away: ConnectionResetError (aiohttp's ClientConnectionResetError),
        # or the plain ConnectionError("Connection lost") that wakes a write paused for a client not reading
        raise StreamAborted(response, "client_disconnected") from None
    except TimeoutError:  # the client read too slowly for the request's deadline
        raise StreamAborted(response, "client_timeout") from None
    return response


class StreamAborted(Exception):
    """The response had begun when the backend or the client failed: the client's connection must be
    cut, never a truncated body presented as complete. `error_type` says which side failed."""

    def __init__(self, response: web.StreamResponse, error_type: str):
        super().__init__(error_type)
        self.response = response
        self.error_type = error_type


_CLIENT_BODY_ERRORS = (ConnectionResetError, HttpProcessingError)
"""What reading the client's request body raises when the client goes away or breaks the framing."""

_BACKEND_ERRORS = {
    "timeout": (504, "backend_timeout", "did not answer in time"),
    "unreachable": (502, "backend_unreachable", "refused the connection"),
    "reset": (502, "backend_reset", "closed the connection"),
    "invalid": (502, "backend_invalid_response", "sent an invalid HTTP response"),
    "overflow": (503, "upstream_overflow", "has no connection free (max_connections and max_pending reached)"),
    "denied": (502, "backend_denied", "is at an address routes from routes.yaml may not reach "
               "(ownership.denied_backend_networks in config.yaml)"),
}


def _backend_error(service: str, exc: Exception) -> GatewayError:
    if isinstance(exc, BackendError):
        status, error_type, what = _BACKEND_ERRORS[exc.kind]
        return GatewayError(status, error_type, f"backend {service} {what}")
    return GatewayError(502, "backend_error", f"backend {service} failed: {type(exc).__name__}")
