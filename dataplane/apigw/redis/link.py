"""Connections to Redis for the hot path: a pool of plain RESP connections, one command in flight on
each, replies parsed by hiredis. A library: it takes plain parameters and knows nothing of the config.

Why not redis-py's asyncio client here: a script call through it costs ~200 us of CPU (stream
readers, its parser wrapper, retry and hook layers) where this path costs ~60 us, and the gateway
sends one command shape only. redis-py still parses the URL; of its `?options`, the TLS ones are
honoured (the config refuses the rest: `config.REDIS_URL_OPTIONS`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable
from typing import Any, NoReturn

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import BusyLoadingError, InvalidResponse, MasterDownError, ReadOnlyError, ResponseError

NOT_SERVING = {"READONLY": ReadOnlyError, "LOADING": BusyLoadingError, "MASTERDOWN": MasterDownError}
"""Error replies that say the node behind the address cannot serve us now (a replica since a failover,
loading its data, cut from its master): the connection is closed, never pooled again."""


class RedisLink:
    """Up to `pool_size` connections to the Redis at `url` (redis://, rediss:// or unix://), opened
    when needed; a caller finding them all busy waits for one. A connection that fails, times out, is
    cancelled, sends an invalid reply or answers one of NOT_SERVING is closed, so a late reply can never
    answer the next command and an old master never answers READONLY forever.

    Every call is bounded by `timeout` (seconds), and a reply that is in the socket when the deadline
    passes still counts (`_Connection._overdue`): after a CPU-bound burst longer than the timeout, calls
    that Redis answered in time would fail otherwise (and fail_closed would answer 503, Redis healthy)."""

    def __init__(self, url: str, *, pool_size: int, timeout: float, connect_timeout: float):
        params = parse_url(url)
        self._path: str | None = params.get("path")
        self._host: str = params.get("host", "127.0.0.1")
        self._port: int = params.get("port", 6379)
        self._ssl = _ssl_context(params) if params.get("connection_class") is SSLConnection else None
        self._handshake = [
            pack(["AUTH", *([params["username"]] if params.get("username") else []), params["password"]])
        ] if params.get("password") else []
        if params.get("db"):
            self._handshake.append(pack(["SELECT", params["db"]]))
        self._connect_timeout = connect_timeout
        self.timeout = timeout
        self._size = pool_size
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def send(self, command: bytes) -> Awaitable[Any]:
        """Send one packed command (see `pack`); await its reply. An error reply raises ResponseError (of
        NOT_SERVING: its redis-py subclass), a lost connection ConnectionError, an invalid reply
        InvalidResponse, no reply in time TimeoutError.

        On an idle connection the command is written before this returns, not when a task first runs
        it: the caller's tick sends it, one event-loop turn earlier."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        conn, reused = self._take_idle() if not self._waiting else (None, False)  # no cutting in line
        if conn is None:
            return self._connect_and_send(command, deadline)
        return self._finish(conn, reused, command, conn.send(command, deadline))

    async def _connect_and_send(self, command: bytes, deadline: float) -> Any:
        async with asyncio.timeout_at(deadline):
            conn, reused = await self._acquire()
        return await self._finish(conn, reused, command, conn.send(command, deadline))

    async def _finish(self, conn: _Connection, reused: bool, command: bytes, sent: Awaitable[Any]) -> Any:
        try:
            reply = await sent
        except ConnectionError:
            conn.close()
            self._release(conn)
            if not reused:
                raise
            return await self.send(command)  # a pooled connection died while idle (Redis restarted): once more
        except BaseException:
            conn.close()
            self._release(conn)
            raise
        if isinstance(reply, hiredis.ReplyError):
            self._refused(conn, str(reply))
        self._release(conn)
        return reply

    def _refused(self, conn: _Connection, message: str) -> NoReturn:
        not_serving = NOT_SERVING.get(message.partition(" ")[0])
        if not_serving is None:
            self._release(conn)
            raise ResponseError(message)
        conn.close()
        self._release(conn)
        self._close_idle()  # they lead to the same node; after a failover the address may lead to the new master
        raise not_serving(message)

    async def aclose(self) -> None:
        self._closed = True
        self._close_idle()

    def _close_idle(self) -> None:
        while self._idle:
            self._idle.pop().close()
            self._open -= 1
            self._wake_one()  # room for a new connection

    def _take_idle(self) -> tuple[_Connection | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
            self._open -= 1
            self._wake_one()  # room for a new connection
        return None, False

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A connection, and whether it served before; first come, first served."""
        turn = not self._waiting
        while True:
            if turn:
                conn, reused = self._take_idle()
                if conn is not None:
                    return conn, reused
                if self._open < self._size:
                    self._open += 1
                    try:
                        return await self._connect(), False
                    except BaseException:
                        self._open -= 1
                        self._wake_one()
                        raise
            turn = True  # once woken (`_wake_one`): a connection is free, or there is room for one
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled in the same turn: pass the turn on
                raise

    def _release(self, conn: _Connection) -> None:
        if conn.closed or self._closed:
            conn.close()
            self._open -= 1
        else:
            self._idle.append(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            if self._path:
                _, conn = await loop.create_unix_connection(_Connection, self._path)
            else:
                _, conn = await loop.create_connection(_Connection, self._host, self._port, ssl=self._ssl)
            try:
                for command in self._handshake:
                    reply = await conn.send(command, loop.time() + self._connect_timeout)
                    if isinstance(reply, hiredis.ReplyError):
                        raise ConnectionError(f"Redis refused the connection's set-up: {reply}")
            except BaseException:
                conn.close()
                raise
        return conn


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reader = hiredis.Reader()
        self._reply: asyncio.Future[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, command: bytes, deadline: float) -> asyncio.Future[Any]:
        """Write `command` now; the future of its reply fails at `deadline` (the caller is not cancelled:
        see RedisLink)."""
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        if self.closed or self.transport is None:
            reply.set_exception(ConnectionError("the Redis connection is closed"))
            return reply
        self._reply = reply
        self.transport.write(command)
        timer = loop.call_at(deadline, self._overdue, reply, True)
        reply.add_done_callback(lambda _: timer.cancel())
        return reply

    def _overdue(self, reply: asyncio.Future[Any], first: bool) -> None:
        """The deadline passed. A reply may be in the socket, unread because the loop was busy (uvloop
        runs due timers before it reads sockets): give it one loop turn (1 ms) before failing."""
        if reply.done():
            return
        if first:
            asyncio.get_running_loop().call_later(0.001, self._overdue, reply, False)
            return
        reply.set_exception(TimeoutError("no reply from Redis in time"))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            reply = self._reader.gets()
        except hiredis.ProtocolError as exc:
            self._fail(InvalidResponse(f"Redis sent an invalid reply: {exc}"))  # never resent: it may have run
            return
        if reply is False:
            return
        if self._reply is None or self._reply.done():
            self._fail(ConnectionError("Redis sent a reply nobody asked for"))
        else:
            self._reply.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("Redis closed the connection"))

    def _fail(self, error: Exception) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def pack(parts: list[Any]) -> bytes:
    """A command in RESP: an array of bulk strings (str as UTF-8, numbers in decimal)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _ssl_context(params: dict[str, Any]) -> ssl.SSLContext:
    """rediss://: the server's certificate verified against the system's CAs or `ssl_ca_certs`, and its
    host name checked, unless the URL says otherwise; a client certificate from `ssl_certfile`/`ssl_keyfile`."""
    context = ssl.create_default_context(cafile=params.get("ssl_ca_certs"))
    requirement = str(params.get("ssl_cert_reqs", "required")).lower()
    if requirement == "none" or params.get("ssl_check_hostname") is False:
        context.check_hostname = False
    if requirement == "none":
        context.verify_mode = ssl.CERT_NONE
    elif requirement == "optional":
        context.verify_mode = ssl.CERT_OPTIONAL
    if params.get("ssl_certfile"):
        context.load_cert_chain(params["ssl_certfile"], params.get("ssl_keyfile"))
    return context
