"""Requests aiohttp's HTTP parser refuses, answered and recorded as the gateway's own, and the `Server`
header of every response.

aiohttp answers what it cannot parse (bad header bytes, an over-long request line or header, broken
chunked framing, a control byte in the target, an invalid method or version) before any application
code runs: middlewares and `on_response_prepare` never see it (aiohttp issues #3287, #6463). Its answer
is text/plain echoing the offending bytes under a `Server: Python/x aiohttp/y` banner, with no request
id, no access line and no count, and it logs the raw bytes to `aiohttp.server` (a whole token, for a
bad `Authorization` header). The one place that answer is made is the connection handler's
`handle_error`; `TrafficRunner` and `GatewayRunner` serve with a handler whose `handle_error` answers like the
pipeline: the JSON error with a fresh `X-Request-ID`, one access line and a count under route `-`, and
nothing of the request's bytes in the answer or the logs.

aiohttp offers no supported hook for any of this; what is used of its internals (RequestHandler's
`handle_error`, `data_received`, `_messages`, `_current_request`, `_ErrInfo`; Response's
`_prepare_headers`) is exercised against the installed aiohttp by tests/test_parser_errors.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, HttpProcessingError, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from multidict import CIMultiDict

from apigw.http.errors import GatewayError
from apigw.observability.logs import Access
from apigw.pipeline.handler import UNROUTED, count, error_body, error_response, new_request_id
from apigw.pipeline.state import Gateway

log = logging.getLogger("apigw.server")

MAX_REQUEST_LINE = 16384
"""Bytes of `METHOD target HTTP/1.1` the parser accepts; longer is 414 `uri_too_long`."""
MAX_HEADER_FIELD = 8190
"""Bytes of one header (name and value) the parser accepts; longer is 431 `headers_too_large`. It must
differ from MAX_REQUEST_LINE: aiohttp's LineTooLong says which line only by the limit it quotes."""
MAX_HEADERS = 128
"""Header fields per request; more is 431 `headers_too_large`."""

DRAIN_POLL = 0.05
"""Seconds between two looks at the requests in flight while draining."""

TOO_MANY_HEADERS = "Too many headers received"
"""aiohttp's message for more than MAX_HEADERS fields (a plain BadHttpMessage otherwise)."""


def refusal(status: int, exc: BaseException | None) -> GatewayError:
    """What the client is told about a request aiohttp could not take: a fixed message per kind, never
    the bytes the parser quotes."""
    if isinstance(exc, LineTooLong):
        if exc.args[1] == MAX_REQUEST_LINE:
            return GatewayError(414, "uri_too_long", f"request line longer than {MAX_REQUEST_LINE} bytes")
        return GatewayError(431, "headers_too_large", f"a request header is longer than {MAX_HEADER_FIELD} bytes")
    if isinstance(exc, HttpProcessingError) and exc.message == TOO_MANY_HEADERS:
        return GatewayError(431, "headers_too_large", f"more than {MAX_HEADERS} request headers")
    if isinstance(exc, BadHttpMethod):
        return GatewayError(400, "bad_method", "invalid request method")
    if isinstance(exc, (BadStatusLine, InvalidURLError)):
        return GatewayError(400, "bad_request_line", "invalid request line")
    if isinstance(exc, HttpProcessingError):
        return GatewayError(400, "bad_request", "malformed request")
    if status == 504:
        return GatewayError(504, "timeout", "request handling timed out")
    return GatewayError(500, "internal_error", "internal gateway error")


def no_banner(headers: CIMultiDict[str], name: str | None) -> None:
    """Replace aiohttp's `Python/x aiohttp/y` banner by the configured `listen.server_header` (none: no
    Server header). Any other Server header (a backend's own) stays as it is."""
    if headers.get(hdrs.SERVER) == SERVER_SOFTWARE:
        if name:
            headers[hdrs.SERVER] = name
        else:
            del headers[hdrs.SERVER]


class _Refusal(web.Response):
    """The refusal's response. aiohttp adds its banner while preparing the headers, and no signal runs
    for a request it could not parse, so the banner is replaced right after."""

    def __init__(self, error: GatewayError, request_id: str, server_name: str | None):
        response = error_response(error, request_id)
        super().__init__(status=response.status, body=response.body, headers=response.headers)
        self._server_name = server_name

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        no_banner(self.headers, self._server_name)


class _Handler(RequestHandler):
    """aiohttp's connection handler, with the gateway's answer to what it refuses, and its deadlines: a
    connection with no request under way closes after `listen.idle_timeout` (aiohttp's keep-alive timer),
    and a request head must arrive whole within `listen.request_head_timeout` of its first byte."""

    def __init__(self, manager: web.Server, *, gateway: Gateway, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self.gateway = gateway
        listen = gateway.state.config.listen
        self._keepalive_timeout = listen.idle_timeout
        self._head_timeout = listen.request_head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        """aiohttp's parser queues broken framing in a request's body (a bad chunk size) as the refusal of
        a next request, and the request whose body it was waits for the rest until the client leaves.
        That request gets the error instead (the pipeline answers 400 `client_body_aborted`), once."""
        super().data_received(data)
        queued = self._messages
        if queued and isinstance(queued[-1][0], _ErrInfo):
            request = self._current_request
            if request is not None and not request.content.is_eof():
                request.content.set_exception(queued.pop()[0].exc)
        if self._messages or self._current_request is not None:  # a whole head is in
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif self._head_timer is None and self._awaiting_head():  # the first bytes of the next head
            self._arm_head_timer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The first head is due within the head timeout of the connection's start, so that a client
        that connects and sends nothing holds the connection no longer either."""
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._head_timeout, self._head_too_slow)

    def _awaiting_head(self) -> bool:
        """Between requests: aiohttp waits for its parser's next message."""
        return self._waiter is not None and not self._waiter.done()

    def _head_too_slow(self) -> None:
        """408 and close: a client trickling its head (slowloris) holds no connection for longer."""
        self._head_timer = None
        if not self._awaiting_head() or self.transport is None:
            return
        error = GatewayError(408, "request_head_timeout", f"the request head took longer than {self._head_timeout:g}s")
        request_id = new_request_id()
        body = error_body(error, request_id)
        server = self.gateway.state.config.listen.server_header
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"X-Request-ID: %s\r\n%sConnection: close\r\n\r\n%s"
            % (len(body), request_id.encode(), f"Server: {server}\r\n".encode() if server else b"", body)
        )
        peer = self.transport.get_extra_info("peername")
        count(self.gateway, Access("-", "-", UNROUTED, 408, peer[0] if peer else "", request_id,
                                    error_type=error.error_type))
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """Not for the client's broken framing, already answered (aiohttp still tries to drain the body)."""
        if not isinstance(kwargs.get("exc_info"), HttpProcessingError):
            super().log_exception(*args, **kwargs)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response has begun: all that is left is closing the connection
            raise ConnectionError("response already started")
        error = refusal(status, exc)
        if error.status >= 500:  # the type only: an exception's text may quote the request
            log.error("request failed outside the pipeline: %s", type(exc).__name__)
        request_id = new_request_id()
        response = _Refusal(error, request_id, self.gateway.state.config.listen.server_header)
        response.force_close()
        count(self.gateway, Access(
            "-", "-", UNROUTED, error.status, request.remote or "", request_id, error_type=error.error_type
        ))
        return response


class _Server(web.Server):
    """`web.Server`, making `_Handler`s (with `handler_kwargs`) for its connections."""

    def __init__(self, *args: Any, handler_kwargs: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.handler_kwargs = handler_kwargs

    def __call__(self) -> RequestHandler:
        return _Handler(self, **self.handler_kwargs)


def _handler_kwargs(loop: asyncio.AbstractEventLoop, gateway: Gateway) -> dict[str, Any]:
    """What every connection's `_Handler` is made with: the parser limits above, no aiohttp access log."""
    return {"loop": loop, "gateway": gateway, "access_log": None, "max_line_size": MAX_REQUEST_LINE,
            "max_field_size": MAX_HEADER_FIELD, "max_headers": MAX_HEADERS}


CLIENT_MAX_SIZE = 1024**2
"""Bytes of body `request.read()` takes (aiohttp's `client_max_size`); the pipeline streams bodies instead."""


class _Request(web.BaseRequest):
    """A traffic port request: the Server header policy applied to each response as it is prepared (an
    Application's `on_response_prepare`), and the connection closed after a request that asked to upgrade
    it. The gateway upgrades none (Upgrade is hop-by-hop), but aiohttp's parser takes what follows such a
    request for the upgraded stream: a request pipelined behind it would wait unanswered for the idle
    timeout, where a close makes the client send it again at once."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        handler = cast(_Handler, self.protocol)
        no_banner(response.headers, handler.gateway.state.config.listen.server_header)
        if "Upgrade" in self.headers:  # aiohttp wrote the Connection header before this hook: say it again
            response.force_close()
            response.headers["Connection"] = "close"


class TrafficRunner(web.BaseRunner):
    """Serves the traffic port on aiohttp's low-level server: each request goes straight to `handler`,
    without an Application's router, middlewares and signals, which cost per request and decided nothing
    for the one catch-all route. aiohttp answers no `Expect: 100-continue` here: the pipeline invites the
    body itself once the request passed route, auth and rate limit. The backend pools close with it."""

    def __init__(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], gateway: Gateway, *,
        shutdown_timeout: float, handler_cancellation: bool = False,
    ):
        super().__init__(shutdown_timeout=shutdown_timeout)
        self.handler = handler
        self.gateway = gateway
        self.handler_cancellation = handler_cancellation

    async def shutdown(self) -> None:
        """The drain's wait (on SIGTERM, `gateway.draining`), once aiohttp has stopped accepting and closed
        the idle connections: the requests in flight get `listen.drain_timeout` of the config in force.
        aiohttp's shutdown that follows waits up to `shutdown_timeout` for each request left, then as long
        again once it told the request to stop, then cancels it: short (`serve.DRAIN_CUT`), it cuts them
        promptly: the drain ends within drain_timeout and a second, not twice drain_timeout."""
        if not self.gateway.draining:
            return
        deadline = time.monotonic() + self.gateway.state.config.listen.drain_timeout
        while self.gateway.metrics.inflight.labels().value > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL)

    async def _make_server(self) -> web.Server:
        loop = asyncio.get_running_loop()

        def request(*args: Any) -> _Request:  # message, payload, protocol, writer, task
            return _Request(*args, loop, client_max_size=CLIENT_MAX_SIZE)

        return _Server(self.handler, request_factory=request, loop=loop, handler_cancellation=self.handler_cancellation,
                       handler_kwargs=_handler_kwargs(loop, self.gateway))

    async def _cleanup_server(self) -> None:
        await self.gateway.shared.close()


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` for the side listeners' apps (metrics, debug), their connections served by
    `_Handler` as the traffic port's are, with the Server header policy on every response the app makes."""

    def __init__(self, app: web.Application, gateway: Gateway, shutdown_timeout: float):
        app.on_response_prepare.append(self._server_header)
        super().__init__(app, access_log=None, shutdown_timeout=shutdown_timeout)
        self.gateway = gateway

    async def _server_header(self, request: web.Request, response: web.StreamResponse) -> None:
        no_banner(response.headers, self.gateway.state.config.listen.server_header)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the app's start-up; gives its handler and request factory
        loop = asyncio.get_running_loop()
        return _Server(server.request_handler, request_factory=server.request_factory, loop=loop,
                       handler_kwargs=_handler_kwargs(loop, self.gateway))
