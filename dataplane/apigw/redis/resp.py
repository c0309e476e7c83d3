"""RESP over one socket: a command written, its reply parsed by hiredis; the building block of the
connection pool (`link`) and the sentinel client (`sentinel`). A library: plain parameters only."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import InvalidResponse


async def connect(
    host: str, port: int, *, path: str | None, ssl_context: ssl.SSLContext | None, handshake: list[bytes],
    timeout: float, connection: type[Connection] | None = None,
) -> Connection:
    """A connection to `host:port` (or the unix socket at `path`) that has run `handshake` (AUTH, SELECT, ...),
    all within `timeout` seconds; an error reply to the handshake is a ConnectionError."""
    loop = asyncio.get_running_loop()
    factory = connection or Connection
    async with asyncio.timeout(timeout):
        if path:
            _, conn = await loop.create_unix_connection(lambda: factory(loop), path)
        else:
            _, conn = await loop.create_connection(lambda: factory(loop), host, port, ssl=ssl_context)
        try:
            for command in handshake:
                reply = await conn.send(command, loop.time() + timeout)
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionError(f"Redis refused the connection's set-up: {reply}")
        except BaseException:
            conn.close()
            raise
    return conn


class Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        """Kept: `asyncio.get_running_loop()` is a getpid() system call on Python 3.11."""
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reader = hiredis.Reader()
        self._reply: asyncio.Future[Any] | None = None
        self._on_reply: Callable[[Any], None] | None = None
        self._replying = False
        """Part of the awaited reply came: the command ran, and must not be sent again."""
        self.address: tuple[str, int] | None = None
        """The node's address as the sentinels named it (None without sentinels)."""
        self.generation = 0
        """The pool's generation this connection belongs to (see RedisLink)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(
        self, command: bytes, deadline: float, on_reply: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """Write `command` now; the future of its reply fails at `deadline` (the caller is not cancelled:
        see RedisLink). `on_reply(reply)`, when given, is called with the reply as soon as it is read, a
        loop turn before whoever awaits the future runs; it must not raise."""
        loop = self.loop
        reply = loop.create_future()
        if self.closed or self.transport is None:
            reply.set_exception(ConnectionError("the Redis connection is closed"))
            return reply
        self._reply, self._on_reply, self._replying = reply, on_reply, False
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
            self.loop.call_later(0.001, self._overdue, reply, False)
            return
        reply.set_exception(TimeoutError("no reply from Redis in time"))

    def data_received(self, data: bytes) -> None:
        if self._reply is None or self._reply.done():  # even a part of one: the next command would take it
            self._fail(ConnectionError("Redis sent a reply nobody asked for"))
            return
        self._reader.feed(data)
        try:
            reply = self._reader.gets()
        except hiredis.ProtocolError as exc:
            self._fail(InvalidResponse(f"Redis sent an invalid reply: {exc}"))  # never resent: it may have run
            return
        if reply is False:
            self._replying = True
            return
        if self._reader.has_data():  # more than one reply to one command: which is its own is unknown
            self._fail(InvalidResponse("Redis sent more than the one reply asked for"))
            return
        if self._on_reply is not None:
            self._on_reply(reply)
        self._reply.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._replying:  # not a ConnectionError: RedisLink would send the command again
            self._fail(InvalidResponse("Redis closed the connection in the middle of a reply"))
        else:
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


def ssl_context(params: dict[str, Any]) -> ssl.SSLContext:
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


class Subscription(Connection):
    """A connection that also takes messages nobody asked for (SUBSCRIBE's pushes): each goes to
    `messages`, and None follows when the connection is lost."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.messages: asyncio.Queue[Any] = asyncio.Queue()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(InvalidResponse(f"Redis sent an invalid reply: {exc}"))
                return
            if reply is False:
                return
            if self._reply is not None and not self._reply.done():
                self._reply.set_result(reply)
            else:
                self.messages.put_nowait(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.messages.put_nowait(None)
