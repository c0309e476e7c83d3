"""Forwarding one request to a backend and streaming the answer back.

Bodies stream in both directions (a 100 MB upload or download is never held in memory), hop-by-hop
headers are dropped, and the backend learns who called through X-Forwarded-* and X-Request-ID.
Each backend service has one keep-alive connection pool (`Upstream`), kept across config reloads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from apigw.config import Backend
from apigw.errors import GatewayError

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade"}
)
NOT_FORWARDED = HOP_BY_HOP | {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
SMALL_BODY = 64 * 1024
"""Responses up to this size with a known length are read whole and sent in one write."""
CHUNK = 64 * 1024


class _ForwardRequest(aiohttp.ClientRequest):
    """Sends exactly the headers the gateway chose: none of aiohttp's own (an Accept-Encoding the client
    never sent would bring it compressed bytes) and no guessed Content-Type. Does what
    `skip_auto_headers` does without rebuilding its dict on every request."""

    _NOTHING_AUTOMATIC: CIMultiDict[None] = CIMultiDict({"Content-Type": None})

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = self._NOTHING_AUTOMATIC


class Upstream:
    """One backend service: its base URL and its keep-alive connection pool (created on first use)."""

    def __init__(self, backend: Backend):
        self.service = backend.service
        self.url = URL(str(backend.url))
        self.base_path = self.url.path.rstrip("/")
        self.host_header = self.url.raw_authority
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=30),
                auto_decompress=False,
                request_class=_ForwardRequest,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(slots=True)
class Forwarded:
    """How long the backend took, for metrics and the access log."""

    duration: float = 0.0
    """Seconds until the backend's response headers (or its failure), of the last attempt."""


class _BodyLimit:
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


def request_body(request: web.Request, max_body: int) -> _BodyLimit | None:
    """The body to stream to the backend, or None; 413 at once when the declared length is over the limit."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length > max_body:
        raise too_large(max_body)
    return _BodyLimit(request.content, max_body)


async def send(
    request: web.Request, upstream: Upstream, path: str, headers: list[tuple[str, str]],
    timeout: aiohttp.ClientTimeout, body: _BodyLimit | None, result: Forwarded,
) -> aiohttp.ClientResponse:
    """Send the request to `upstream` at `path`; return once the response headers are in.

    Raises GatewayError (502/504/413) when no response comes; `result` records what happened either way.
    """
    url = upstream.url.with_path(upstream.base_path + path, encoded=False).with_query(request.rel_url.raw_query_string)
    started = time.perf_counter()
    try:
        backend = await upstream.session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False, timeout=timeout,
            compress=None, chunked=None,
        )
    except Exception as exc:
        result.duration = time.perf_counter() - started
        if body is not None and body.exceeded:
            raise too_large(body.limit) from None
        if isinstance(exc, GatewayError):
            raise
        raise _backend_error(upstream.service, exc) from None
    result.duration = time.perf_counter() - started
    return backend


async def relay(
    request: web.Request, backend: aiohttp.ClientResponse, extra_headers: Mapping[str, str], service: str
) -> web.StreamResponse:
    """Stream the backend's response to the client, adding `extra_headers`.

    Before the response begins, a backend failure is a GatewayError (502/504); after, StreamAborted.
    """
    try:
        return await _relay(request, backend, extra_headers, service)
    finally:
        backend.release()


async def _relay(
    request: web.Request, backend: aiohttp.ClientResponse, extra_headers: Mapping[str, str], service: str
) -> web.StreamResponse:
    bodiless = request.method == "HEAD" or backend.status in (204, 304)
    drop = HOP_BY_HOP if bodiless else _RESPONSE_DROP  # a HEAD answer keeps the length of the body it omits
    headers = CIMultiDict((k, v) for k, v in backend.headers.items() if k.lower() not in drop)
    headers.update(extra_headers)
    length = backend.content_length
    if not bodiless and length is not None and length <= SMALL_BODY:
        try:
            body = await backend.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _backend_error(service, exc) from None
        return web.Response(status=backend.status, reason=backend.reason, headers=headers, body=body)
    response = web.StreamResponse(status=backend.status, reason=backend.reason, headers=headers)
    if length is not None and not bodiless:
        response.content_length = length
    try:
        await response.prepare(request)
        while not bodiless:
            try:
                chunk = await backend.content.read(CHUNK)
            except (aiohttp.ClientError, asyncio.TimeoutError):
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


def _backend_error(service: str, exc: Exception) -> GatewayError:
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return GatewayError(504, "backend_timeout", f"backend {service} did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return GatewayError(502, "backend_unreachable", f"backend {service} refused the connection")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)):
        return GatewayError(502, "backend_reset", f"backend {service} closed the connection")
    return GatewayError(502, "backend_error", f"backend {service} failed: {type(exc).__name__}")
