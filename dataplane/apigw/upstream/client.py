"""The HTTP/1.1 client the proxy talks to backends with: keep-alive pools, bodies streamed both ways,
one timer per wait.

Why not aiohttp's ClientSession: per request it builds a URL, a ClientRequest, a ClientResponse, a
timeout context, trace hooks and cookie handling, which in `bench/compare.py` was about two thirds of a
bare aiohttp proxy's CPU per request. A proxy needs none of it: the request head is one string, the
response is parsed by llhttp (Node's parser, through httptools), and bytes pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, Sequence
from ipaddress import ip_address
from typing import Any

import httptools
from yarl import URL

from apigw.http.networks import IPNetwork, denied_network

MAX_HEAD = 64 * 1024
"""Largest response head (status line and headers) taken from a backend."""
MAX_TRAILERS = 100
"""Most trailer fields after a chunked body (they are not kept: the proxy does not forward trailers)."""
MAX_TRAILER_SIZE = 16 * 1024
"""Largest trailer section, counted as the head is; also the most bytes a backend may send between two
body bytes (chunk-size lines and extensions, a trailer field that never ends)."""
PAUSE_AT = 256 * 1024
"""Response bytes buffered for a slower client before the backend is asked to wait."""
KEEPALIVE = 60.0
"""Seconds an idle connection is kept for reuse."""
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods resent, when they carry no body, on another connection when a reused one turns out closed."""
LENGTH_EXPECTED = frozenset({"POST", "PUT", "PATCH"})
"""Methods sent with `Content-Length: 0` when they carry no body (some servers answer 411 otherwise)."""

log = logging.getLogger("apigw.upstream")


class BackendError(Exception):
    """No usable response. `kind`: `unreachable` (no connection), `timeout`, `reset` (the backend
    closed the connection), `invalid` (it sent something that is not HTTP/1.1, or over a bound),
    `overflow` (the pool's connection and waiting limits are reached: nothing was sent) or `denied`
    (every address of the backend's host lies in a denied network: nothing was sent)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class Pool:
    """Keep-alive connections to one backend, the most recently used first, at most `max_connections`
    of them open; beyond, up to `max_pending` requests wait for one (first come, first served), and
    more are refused at once (BackendError `overflow`): a slow backend cannot make the gateway open
    connections or queue requests without bound."""

    def __init__(
        self, url: URL, *, max_connections: int = 1024, max_pending: int = 1024,
        ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None, service: str = "",
        denied_networks: Sequence[IPNetwork] = (),
    ):
        self.service = service
        """The backend's service, for the logs."""
        self.host = url.raw_host or ""
        self.port = url.port
        self.ssl = ssl_context or (ssl.create_default_context() if url.scheme == "https" else None)
        self.server_hostname = server_hostname if self.ssl is not None else None
        """The name the backend's certificate is checked against (and sent as SNI): the URL's host if None."""
        self.denied_networks = tuple(denied_networks)
        """Networks a new connection may not reach, the host resolved first (see `_open_allowed`)."""
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.open = 0
        """Connections open or opening."""
        self._pending: deque[asyncio.Future[_Connection | None]] = deque()
        self._idle: deque[_Connection] = deque()
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: AsyncIterable[bytes] | None,
        length: int | None, timeout: float, connect_timeout: float, deadline: float | None = None,
    ) -> Response:
        """Send a request and return once the response's status and headers are in.

        `headers` must not frame the body: this sets Content-Length from `length`, or chunked
        Transfer-Encoding for a body of unknown length. `timeout` bounds each wait for the backend, and
        `deadline` (event-loop time) the whole exchange, the response's body included.
        """
        head = _head(method, target, headers, body is not None, length)
        while True:
            conn, reused = await self._acquire(connect_timeout)
            try:
                return await conn.exchange(method, head, body, length is None, timeout, deadline)
            except BackendError as exc:
                stale = reused and conn.silent and exc.kind == "reset"
                if not (stale and body is None and method in REPLAYABLE):
                    raise

    async def _acquire(self, connect_timeout: float) -> tuple[_Connection, bool]:
        """An idle connection (True), a new one (False), or, at `max_connections`, the next one freed."""
        conn = self._reusable()
        if conn is not None:
            return conn, True
        if self.open < self.max_connections:
            return await self._connect(connect_timeout), False
        if len(self._pending) >= self.max_pending:
            raise BackendError("overflow", f"{self.open} connections busy and {len(self._pending)} requests waiting")
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._pending.append(waiter)
        try:
            async with asyncio.timeout(connect_timeout):
                handed = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._hand_back(waiter.result())  # handed over just as this request gave up: pass it on
            else:
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._pending.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise BackendError("overflow", f"no connection free within {connect_timeout:g} s") from None
            raise
        if handed is None:  # a connection closed: its place is this request's to open
            return await self._connect(connect_timeout), False
        return handed, True

    def _hand_back(self, conn: _Connection | None) -> None:
        if conn is None:
            self._slot_freed()
        else:
            self._put(conn)

    async def aclose(self) -> None:
        """Close the idle connections now, the busy ones when their response is done."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        while self._idle:
            self._idle.pop().close()

    def _reusable(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.loop.time() - conn.idle_since < KEEPALIVE:
                return conn
            conn.close()
        return None

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        self.open += 1
        conn = _Connection(self, loop)
        try:
            async with asyncio.timeout(timeout):
                if self.denied_networks:
                    await self._open_allowed(conn, loop)
                else:
                    await loop.create_connection(
                        lambda: conn, self.host, self.port, ssl=self.ssl, server_hostname=self.server_hostname,
                    )
        except BaseException as exc:
            if conn.transport is None:  # else it was made, and its connection_lost frees the slot
                self._slot_freed()
            if isinstance(exc, TimeoutError):
                raise BackendError("timeout", f"no connection within {timeout:g} s") from None
            if isinstance(exc, ssl.SSLError):  # a certificate refused: only this line tells it from a backend down
                log.warning("backend %s: TLS handshake with %s:%s failed: %s", self.service, self.host, self.port, exc,
                            extra={"fields": {"backend_service": self.service}})
            if isinstance(exc, OSError):  # ssl.SSLError is one
                raise BackendError("unreachable", str(exc)) from None
            raise
        return conn

    async def _open_allowed(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        """What `create_connection` does for a host name (resolve, try each address in turn, then TLS),
        with the addresses in `denied_networks` dropped after resolving: what is checked is what is
        connected to, whatever the DNS answers next. TLS still checks (and sends as SNI) the host's name."""
        infos = _literal(self.host, self.port) or await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        allowed, refused = [], []
        for info in infos:
            address = ip_address(info[4][0])
            network = denied_network(address, self.denied_networks)
            if network is None:
                allowed.append(info)
            else:
                refused.append(f"{address} in {network}")
        if not allowed:
            detail = f"{self.host} resolves only to addresses in denied networks ({', '.join(refused)})"
            log.error("backend %s: %s, which ownership.denied_backend_networks in config.yaml keeps routes from "
                      "routes.yaml from reaching", self.service, detail,
                      extra={"fields": {"backend_service": self.service, "error_type": "backend_denied",
                                        "error": detail}})
            raise BackendError("denied", detail)
        sock = await _connected_socket(loop, allowed)
        await loop.create_connection(
            lambda: conn, sock=sock, ssl=self.ssl,
            server_hostname=(self.server_hostname or self.host) if self.ssl is not None else None,
        )

    def _slot_freed(self) -> None:
        """A connection closed (or never opened): a waiting request may open one in its place."""
        self.open -= 1
        while self._pending:
            waiter = self._pending.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        while self._pending:  # a request waiting for a connection gets this one at once
            waiter = self._pending.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        loop = conn.loop
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(KEEPALIVE, self._close_expired)

    def _close_expired(self) -> None:
        """Close connections idle for KEEPALIVE seconds, oldest first; look again while any are left."""
        now = asyncio.get_running_loop().time()
        while self._idle and now - self._idle[0].idle_since >= KEEPALIVE:
            self._idle.popleft().close()
        self._sweep = None
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(
                KEEPALIVE - (now - self._idle[0].idle_since), self._close_expired
            )

    def _forget(self, conn: _Connection) -> None:
        """An idle connection the backend closed."""
        try:
            self._idle.remove(conn)
        except ValueError:
            pass


class _Connection(asyncio.Protocol):
    """One connection to a backend; carries one exchange at a time."""

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop):
        self.pool = pool
        self.loop = loop
        """The event loop it runs on, kept: `asyncio.get_running_loop()` calls getpid() on Python 3.11
        (a system call, about a microsecond here), and the hot path would ask several times per request."""
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.silent = True
        """Nothing received yet during the current exchange."""
        self.idle_since = 0.0
        self.upload: asyncio.Task[None] | None = None
        """The request body on its way, alongside the response (a backend may answer before reading it all)."""
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.silent = False
        if self.response is None:
            self.close()  # bytes nobody asked for: the connection's state is unknown
            return
        self.response.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response.lost()
        else:
            self.pool._forget(self)
        self.pool._slot_freed()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(
        self, method: str, head: bytes, body: AsyncIterable[bytes] | None, chunked: bool, timeout: float,
        deadline: float | None = None,
    ) -> Response:
        if self.closed or self.transport is None:  # the backend closed it before a byte was sent
            raise BackendError("reset", "the backend closed the connection")
        response = self.response = Response(self, method, timeout, deadline)
        self.silent = True
        try:
            self.transport.write(head)
            if body is not None:
                self.upload = asyncio.ensure_future(self._send_body(body, chunked, timeout))
                self.upload.add_done_callback(lambda _: response.wake())
            while not response.status:
                if response.error is not None:
                    raise response.error
                if self.upload is not None and self.upload.done() and self.upload.exception():
                    raise self.upload.exception()  # type: ignore[misc]  # e.g. the client's body over the limit
                # while the body is still coming from the client, its pace is not the backend's fault
                await response.wait(timed=self.upload is None or self.upload.done())
        except BaseException:
            self.response = None
            self.close()
            self.uploaded()
            raise
        return response

    def uploaded(self) -> bool:
        """The request body (if any) went out whole; else the upload stops and False."""
        upload, self.upload = self.upload, None
        if upload is None:
            return True
        if not upload.done():
            upload.cancel()
            return False
        return not upload.cancelled() and upload.exception() is None

    async def _send_body(self, body: AsyncIterable[bytes], chunked: bool, timeout: float) -> None:
        assert self.transport is not None
        async for chunk in body:
            if self.closed:
                raise BackendError("reset", "the backend closed the connection during the upload")
            if chunk:
                self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n") if chunked else (chunk,))
            if self._paused:
                await self._drain(timeout)
        if chunked and not self.closed:
            self.transport.write(b"0\r\n\r\n")

    async def _drain(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._drained = loop.create_future()
        timer = loop.call_later(timeout, _expire, self._drained, "the backend stopped reading the body")
        try:
            await self._drained
        finally:
            timer.cancel()
            self._drained = None


class Response:
    """A backend's response: status, reason and headers at once, the body as it comes. The body is
    chunked only when `chunked` is the last transfer coding (as llhttp frames it); other codings run
    to the connection's close, and that connection is not reused.

    Always `release()` it: that returns the connection to the pool when the body was read to the end
    and both sides allow keep-alive, and closes it otherwise.
    """

    # Class defaults: only a chunked body with framing or trailers to count sets them on the instance.
    _framing = 0
    """Bytes fed, in reads that brought no body bytes, since the last body bytes."""
    _trailers = 0
    _trailer_size = 0

    def __init__(self, conn: _Connection, method: str, timeout: float, deadline: float | None = None):
        self.status = 0
        """0 until the final (non-1xx) status line and headers are in."""
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.keep_alive = False
        self.error: BackendError | None = None
        self.complete = False
        self._conn: _Connection | None = conn
        self._loop = conn.loop
        self._timeout = timeout
        self.deadline = deadline
        """Event-loop time by which the whole exchange, the response's body included, must be over (None: no bound)."""
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = method == "HEAD"
        self._until_eof = False
        self._chunked = False
        self._reason = b""
        self._head_size = 0
        """The sizes of the headers parsed."""
        self._fed = 0
        """Bytes fed while the head is not complete (a head of one endless header has no parsed size)."""
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The whole body (meant for small ones: it is held in memory)."""
        parts = []
        while chunk := await self.chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def chunk(self) -> bytes:
        """The body bytes received so far and not yet taken (waiting for some); b"" at the end."""
        while not self._body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self.wait()
        data = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            if self._conn is not None and self._conn.transport is not None:
                self._conn.transport.resume_reading()
        return data

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.response = None
        self._parser = None  # type: ignore[assignment]  # it refers back to this response: no cycle left for the GC
        uploaded = conn.uploaded()
        if uploaded and self.complete and self.keep_alive and not self._paused and not conn.closed:
            conn.pool._put(conn)
        else:
            conn.close()

    async def wait(self, timed: bool = True) -> None:
        """Until the backend sends more or fails, or `wake()`; BackendError `timeout` after the timeout."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        timer = None
        if timed:
            delay, why = self._timeout, f"no answer within {self._timeout:g} s"
            if self.deadline is not None and self.deadline - loop.time() < delay:
                delay, why = max(0.0, self.deadline - loop.time()), "the response outlasted its deadline"
            timer = loop.call_later(delay, _expire, waiter, why)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def feed(self, data: bytes) -> None:
        if self.complete:
            self.keep_alive = False  # bytes after the response: the connection cannot be trusted
            return
        buffered = self._buffered
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _AfterEnd):
                self.keep_alive = False
            else:
                cause = exc.__context__ if isinstance(exc.__context__, BackendError) else None
                self._fail(cause or BackendError("invalid", f"invalid HTTP response: {exc}"))
        if not self.status:
            self._fed += len(data)
            if self._fed > MAX_HEAD:  # counted here too: llhttp hands a header over only once it ends
                self._fail(BackendError("invalid", f"response head larger than {MAX_HEAD} bytes"))
        elif self._chunked and not self.complete:
            if self._buffered == buffered:  # as for the head: a trailer is handed over only once it ends
                self._framing += len(data)
                if self._framing > MAX_TRAILER_SIZE:
                    self._fail(BackendError("invalid", f"over {MAX_TRAILER_SIZE} bytes of chunk framing or trailers"))
            elif self._framing:
                self._framing = 0
        self.wake()

    def _fail(self, error: BackendError) -> None:
        self.error = error
        self.keep_alive = False
        if self._conn is not None:
            self._conn.close()

    def lost(self) -> None:
        """The connection closed: the end of a body that runs to the end of the connection, else a failure."""
        if not self.complete and self.error is None:
            if self.status and self._until_eof:
                self.complete = True
            else:
                self.error = BackendError("reset", "the backend closed the connection")
        self.keep_alive = False
        self.wake()

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        if self.status:
            raise _AfterEnd  # a second message in the same read: stop before it overwrites this one
        self.headers, self._reason, self._head_size = [], b"", 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:  # a trailer field
            self._trailers += 1
            self._trailer_size += len(name) + len(value) + 4
            if self._trailers > MAX_TRAILERS or self._trailer_size > MAX_TRAILER_SIZE:
                raise BackendError("invalid", f"response trailers over {MAX_TRAILERS} fields or {MAX_TRAILER_SIZE} bytes")
            return
        self._head_size += len(name) + len(value) + 4
        self.headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self._head_size > MAX_HEAD:
            raise BackendError("invalid", f"response head larger than {MAX_HEAD} bytes")
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                raise BackendError("invalid", "the backend switched protocols")
            return  # an interim answer (100 Continue): the real one follows
        length, chunked = None, False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = int(value)
            elif lowered == "transfer-encoding":  # llhttp refuses Content-Length with it, and an empty one
                chunked = _chunked_last(value)  # the last Transfer-Encoding field has the last coding
        self.status = status
        self.reason = self._reason.decode("latin-1")
        self.content_length = length
        self._chunked = chunked
        self._until_eof = length is None and not chunked and status not in (204, 304)
        self.keep_alive = self._parser.should_keep_alive() and not self._head_only and not self._until_eof
        if self._head_only:
            self.complete = True  # llhttp cannot be told the body is left out; this connection is not reused

    def on_body(self, chunk: bytes) -> None:
        if self.complete:
            return
        self._body.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= PAUSE_AT and not self._paused and self._conn is not None and self._conn.transport:
            self._paused = True
            self._conn.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.status:
            self.complete = True


class _AfterEnd(Exception):
    """Raised inside llhttp to stop it at the end of the response."""


def _chunked_last(value: str) -> bool:
    """Whether `chunked` is the last coding of a Transfer-Encoding value, as llhttp decides (it allows
    spaces after it, not tabs)."""
    return value.rpartition(",")[2].lstrip(" \t").rstrip(" ").lower() == "chunked"


def _literal(host: str, port: int | None) -> list[tuple[Any, ...]] | None:
    """getaddrinfo's answer for a host that is an IP address, without its trip to a worker thread."""
    try:
        ip = ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


async def _connected_socket(loop: asyncio.AbstractEventLoop, infos: list[tuple[Any, ...]]) -> socket.socket:
    """A TCP connection to the first of `infos` (getaddrinfo's answers) that accepts one, tried in order."""
    errors = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            errors.append(exc)
        except BaseException:
            sock.close()
            raise
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(exc) for exc in errors)}")


def _expire(waiter: asyncio.Future[None], detail: str) -> None:
    if not waiter.done():
        waiter.set_exception(BackendError("timeout", detail))


def _head(method: str, target: str, headers: list[tuple[str, str]], has_body: bool, length: int | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if has_body:
        lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    elif method in LENGTH_EXPECTED:
        lines.append("Content-Length: 0")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")
