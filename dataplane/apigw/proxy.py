"""Forwarding one request to a backend and streaming the answer back.

Bodies stream in both directions (a 100 MB upload or download is never held in memory), hop-by-hop
headers are dropped, and the backend learns who called through X-Forwarded-* and X-Request-ID.
Each backend service has one keep-alive connection pool (`Upstream`), kept across config reloads.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from apigw.client import BackendError, Pool, Response
from apigw.config import Backend
from apigw.errors import GatewayError

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade"}
)
NOT_FORWARDED = HOP_BY_HOP | {"content-length", "host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
SMALL_BODY = 64 * 1024
"""Responses up to this size with a known length are read whole and sent in one write."""
CHUNK = 64 * 1024


class Upstream:
    """One backend service: where its requests go, and its keep-alive connection pool."""

    def __init__(self, backend: Backend):
        url = URL(str(backend.url))
        self.service = backend.service
        self.base_path = url.raw_path.rstrip("/")
        self.host_header = url.raw_authority
        self.pool = Pool(url)

    async def aclose(self) -> None:
        await self.pool.aclose()


@dataclass(slots=True)
class Forwarded:
    """How long the backend took, for metrics and the access log."""

    duration: float = 0.0
    """Seconds until the backend's response headers (or its failure), of the last attempt."""


class BodyLimit:
    """Streams the request body through, stopping once it passes `limit` bytes."""

    def __init__(self, stream: web.StreamReader, limit: int):
        self.stream, self.limit, self.seen, self.exceeded = stream, limit, 0, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream.iter_chunked(CHUNK):
            self.seen += len(chunk)
            if self.seen > self.limit:
                self.exceeded = True
                raise too_large(self.limit)
            yield chunk


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, "body_too_large", f"request body is larger than {limit} bytes")


def not_forwarded(strip: Iterable[str]) -> frozenset[str]:
    """Client headers never passed on (lower-case): hop-by-hop ones, those the gateway sets itself, and
    `strip` (headers the gateway fills from verified claims). Computed once per config."""
    return NOT_FORWARDED | {name.lower() for name in strip}


def request_headers(
    request: web.Request, upstream: Upstream, request_id: str, client_ip: str,
    drop: frozenset[str], extra: Iterable[tuple[str, str]],
) -> list[tuple[str, str]]:
    """The headers the backend receives: the client's minus `drop` (see `not_forwarded`), plus ours."""
    incoming = request.headers
    connection = incoming.get("Connection")
    if connection:
        drop = drop | {token.strip().lower() for token in connection.split(",")}
    headers = [(k, v) for k, v in incoming.items() if k.lower() not in drop]
    prior = incoming.get("X-Forwarded-For")
    headers += (
        ("Host", upstream.host_header),
        ("X-Forwarded-For", f"{prior}, {client_ip}" if prior else client_ip),
        ("X-Forwarded-Proto", request.scheme),
        ("X-Request-ID", request_id),
    )
    host = incoming.get("Host")
    if host:
        headers.append(("X-Forwarded-Host", host))
    headers.extend(extra)
    return headers


def request_body(request: web.Request, max_body: int) -> BodyLimit | None:
    """The body to stream to the backend, or None; 413 at once when the declared length is over the limit."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length > max_body:
        raise too_large(max_body)
    return BodyLimit(request.content, max_body)


def target(upstream: Upstream, path: str, query: str) -> str:
    """The request target on the backend: its base path, `path` (decoded by routing) re-encoded, the
    client's query as it came."""
    if _NEEDS_QUOTING(path):
        path = quote(path, safe=_PATH_SAFE, errors="surrogateescape")  # a raw non-UTF-8 byte goes on as %XX
    path = upstream.base_path + path
    return f"{path}?{query}" if query else path


_PATH_SAFE = "/!$&'()*+,;=:@~"
_NEEDS_QUOTING = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/]").search


async def send(
    request: web.Request, upstream: Upstream, target: str, headers: list[tuple[str, str]],
    timeouts: tuple[float, float], body: BodyLimit | None, result: Forwarded,
) -> Response:
    """Send the request to `upstream`; return once the response headers are in.

    `timeouts` are (per wait for the backend, to connect). Raises GatewayError (502/504/413) when no
    response comes; `result` records what happened either way.
    """
    started = time.perf_counter()
    timeout, connect_timeout = timeouts
    try:
        backend = await upstream.pool.request(
            request.method, target, headers, body, request.content_length, timeout, connect_timeout
        )
    except Exception as exc:
        result.duration = time.perf_counter() - started
        if body is not None and body.exceeded:
            raise too_large(body.limit) from None
        if isinstance(exc, GatewayError):
            raise
        if isinstance(exc, _CLIENT_BODY_ERRORS):  # the client left or garbled its body: not the backend's fault
            raise GatewayError(400, "client_body_aborted", "the request body ended before it was complete") from None
        raise _backend_error(upstream.service, exc) from None
    result.duration = time.perf_counter() - started
    return backend


async def relay(
    request: web.Request, backend: Response, extra_headers: Mapping[str, str], service: str
) -> web.StreamResponse:
    """Stream the backend's response to the client, adding `extra_headers`.

    Before the response begins, a backend failure is a GatewayError (502/504); after, StreamAborted.
    """
    try:
        return await _relay(request, backend, extra_headers, service)
    finally:
        backend.release()


async def _relay(
    request: web.Request, backend: Response, extra_headers: Mapping[str, str], service: str
) -> web.StreamResponse:
    bodiless = request.method == "HEAD" or backend.status in (204, 304)
    drop = HOP_BY_HOP if bodiless else _RESPONSE_DROP  # a HEAD answer keeps the length of the body it omits
    headers = CIMultiDict([(k, v) for k, v in backend.headers if k.lower() not in drop])
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
            except BackendError:
                raise StreamAborted(response, "backend_stream_aborted") from None
            if not chunk:
                break
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:  # the client went away (aiohttp's ClientConnectionResetError is one)
        raise StreamAborted(response, "client_disconnected") from None
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
}


def _backend_error(service: str, exc: Exception) -> GatewayError:
    if isinstance(exc, BackendError):
        status, error_type, what = _BACKEND_ERRORS[exc.kind]
        return GatewayError(status, error_type, f"backend {service} {what}")
    return GatewayError(502, "backend_error", f"backend {service} failed: {type(exc).__name__}")
