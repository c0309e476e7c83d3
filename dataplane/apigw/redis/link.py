"""Connections to Redis for the hot path: a pool of plain RESP connections, one command in flight on
each, replies parsed by hiredis. A library: it takes plain parameters and knows nothing of the config.

Why not redis-py's asyncio client here: a script call through it costs ~200 us of CPU (stream
readers, its parser wrapper, retry and hook layers) where this path costs ~60 us, and the gateway
sends one command shape only. redis-py still parses the URL; of its `?options`, the TLS ones are
honoured (the config refuses the rest: `config.REDIS_URL_OPTIONS`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import BusyLoadingError, MasterDownError, ReadOnlyError, ResponseError

from apigw.redis.resp import Connection, connect, pack, ssl_context
from apigw.redis.sentinel import Address, Sentinel

__all__ = ["NOT_SERVING", "RedisLink", "pack"]

NOT_SERVING = {"READONLY": ReadOnlyError, "LOADING": BusyLoadingError, "MASTERDOWN": MasterDownError}
"""Error replies that say the node behind the address cannot serve us now (a replica since a failover,
loading its data, cut from its master): the connection is closed, never pooled again."""


class RedisLink:
    """Up to `pool_size` connections to the Redis at `url` (redis://, rediss:// or unix://), opened
    when needed; a caller finding them all busy waits for one. A connection that fails, times out, is
    cancelled, sends an invalid reply or answers one of NOT_SERVING is closed, so a late reply can never
    answer the next command and an old master never answers READONLY forever.

    With Redis Sentinel (`sentinels`), the address comes from `Sentinel`: asked when a connection is
    opened and no master is known, followed on `+switch-master`; each new connection checks `ROLE`. A
    move of the master closes the idle connections and retires the busy ones; calls never wait on a
    sentinel once the master is known (one round trip per call, as without).

    Every call is bounded by `timeout` (seconds), and a reply that is in the socket when the deadline
    passes still counts (`Connection._overdue`): after a CPU-bound burst longer than the timeout, calls
    that Redis answered in time would fail otherwise (and fail_closed would answer 503, Redis healthy)."""

    def __init__(
        self, url: str, *, pool_size: int, timeout: float, connect_timeout: float,
        sentinels: Sequence[Address] = (), master_name: str = "", sentinel_password: str | None = None,
        on_master: Callable[[str, str | None], None] | None = None,
    ):
        """With `sentinels`, the master named `master_name` by them replaces the URL's host and port (the
        URL still gives credentials, database and TLS, TLS for the sentinels too). `on_master(address,
        previous)` learns the address in use (`host:port`), and every change of it."""
        params = parse_url(url)
        self._path: str | None = params.get("path")
        self._address: Address = (params.get("host", "127.0.0.1"), params.get("port", 6379))
        self._ssl = ssl_context(params) if params.get("connection_class") is SSLConnection else None
        self._handshake = [
            pack(["AUTH", *([params["username"]] if params.get("username") else []), params["password"]])
        ] if params.get("password") else []
        if params.get("db"):
            self._handshake.append(pack(["SELECT", params["db"]]))
        self._connect_timeout = connect_timeout
        self.timeout = timeout
        self._size = pool_size
        self._idle: list[Connection] = []
        self._open = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._generation = 0
        """Bumped when the master moves: connections of an older generation are closed, not pooled."""
        self._on_master = on_master
        self._sentinel: Sentinel | None = None
        if sentinels:
            self._sentinel = Sentinel(
                sentinels, master_name, handshake=[pack(["AUTH", sentinel_password])] if sentinel_password else [],
                ssl_context=self._ssl, timeout=connect_timeout, on_change=self._master_moved,
            )
        elif on_master is not None:
            on_master(self._path or f"{self._address[0]}:{self._address[1]}", None)

    def send(
        self, command: bytes, on_reply: Callable[[Any], None] | None = None, deadline: float | None = None,
    ) -> Awaitable[Any]:
        """Send one packed command (see `pack`); await its reply. An error reply raises ResponseError (of
        NOT_SERVING: its redis-py subclass), a lost connection ConnectionError, an invalid reply (or one cut short)
        InvalidResponse, no reply in time TimeoutError.

        On an idle connection the command is written before this returns, not when a task first runs
        it: the caller's tick sends it, one event-loop turn earlier. `on_reply`: see `Connection.send`.
        `deadline` (event-loop time): `timeout` from now unless given, by a caller that sends again for the
        same work (EVAL after NOSCRIPT) and keeps the first call's bound; a resend here keeps it too."""
        conn, reused = self._take_idle() if not self._waiting else (None, False)  # no cutting in line
        if conn is None:
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.timeout
            return self._connect_and_send(command, deadline, on_reply)
        if deadline is None:
            deadline = conn.loop.time() + self.timeout
        return self._finish(conn, reused, command, conn.send(command, deadline, on_reply), on_reply, deadline)

    async def _connect_and_send(self, command: bytes, deadline: float, on_reply: Callable[[Any], None] | None) -> Any:
        async with asyncio.timeout_at(deadline):
            conn, reused = await self._acquire()
        return await self._finish(conn, reused, command, conn.send(command, deadline, on_reply), on_reply, deadline)

    async def _finish(
        self, conn: Connection, reused: bool, command: bytes, sent: Awaitable[Any],
        on_reply: Callable[[Any], None] | None, deadline: float,
    ) -> Any:
        try:
            reply = await sent
        except ConnectionError:
            conn.close()
            self._release(conn)
            if not reused:
                raise
            return await self.send(command, on_reply, deadline)  # a pooled connection died while idle (Redis restarted)
        except BaseException:
            conn.close()
            self._release(conn)
            raise
        if isinstance(reply, hiredis.ReplyError):
            self._refused(conn, str(reply))
        self._release(conn)
        return reply

    def _refused(self, conn: Connection, message: str) -> NoReturn:
        not_serving = NOT_SERVING.get(message.partition(" ")[0])
        if not_serving is None:
            self._release(conn)
            raise ResponseError(message)
        conn.close()
        self._release(conn)
        self._close_idle()  # they lead to the same node; after a failover the address may lead to the new master
        if self._sentinel is not None:
            self._sentinel.forget(conn.address)
        raise not_serving(message)

    async def aclose(self) -> None:
        self._closed = True
        self._close_idle()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    def _master_moved(self, new: Address, previous: Address | None) -> None:
        self._generation += 1
        self._close_idle()
        if self._on_master is not None:
            self._on_master(f"{new[0]}:{new[1]}", previous and f"{previous[0]}:{previous[1]}")

    def _close_idle(self) -> None:
        while self._idle:
            self._idle.pop().close()
            self._open -= 1
            self._wake_one()  # room for a new connection

    def _take_idle(self) -> tuple[Connection | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.generation == self._generation:
                return conn, True
            conn.close()
            self._open -= 1
            self._wake_one()  # room for a new connection
        return None, False

    async def _acquire(self) -> tuple[Connection, bool]:
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

    def _release(self, conn: Connection) -> None:
        if conn.closed or self._closed or conn.generation != self._generation:
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

    async def _connect(self) -> Connection:
        if self._sentinel is None:
            return await connect(*self._address, path=self._path, ssl_context=self._ssl, handshake=self._handshake,
                                 timeout=self._connect_timeout)
        address = await self._sentinel.master()
        generation = self._generation
        try:
            conn = await connect(*address, path=None, ssl_context=self._ssl, handshake=self._handshake,
                                 timeout=self._connect_timeout)
        except (OSError, TimeoutError):
            self._sentinel.forget(address)  # dead, or not there yet: the sentinels are asked again
            raise
        try:
            role = await conn.send(pack(["ROLE"]), asyncio.get_running_loop().time() + self._connect_timeout)
        except BaseException:
            conn.close()
            raise
        if not (isinstance(role, list) and role and role[0] == b"master"):
            conn.close()
            self._sentinel.forget(address)
            raise ConnectionError(f"{address[0]}:{address[1]}, the master by the sentinels, is not the master now")
        conn.address = address
        conn.generation = generation
        return conn
