"""The hot path's Redis connections against a real redis-server: bounded pool, URL credentials and
database, no late reply answering the wrong command, recovery after a restart, a node that cannot
serve (READONLY, MASTERDOWN, LOADING) or speaks garbage left behind, rediss:// and unix sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import hiredis
import pytest
import redis.asyncio
import uvloop
from hypothesis import example, given
from hypothesis import strategies as st
from redis.exceptions import BusyLoadingError, InvalidResponse, MasterDownError, ReadOnlyError

from apigw.redis.link import RedisLink, pack
from apigw.redis.resp import Connection
from apigw.testkit.certs import write_self_signed
from apigw.testkit.redis import RedisServer, free_port


def link_for(url: str, pool_size: int = 50, timeout: float = 1.0) -> RedisLink:
    return RedisLink(url, pool_size=pool_size, timeout=timeout, connect_timeout=1.0)


async def link_connections(server: RedisServer) -> int:
    """Client connections Redis sees, besides the one asking."""
    async with redis.asyncio.Redis.from_url(server.url) as client:
        return len(await client.client_list()) - 1


async def test_concurrent_calls_share_at_most_pool_size_connections(redis_server: RedisServer) -> None:
    link = link_for(redis_server.url, pool_size=3)
    replies = await asyncio.gather(*[link.send(pack(["ECHO", f"m{i}"])) for i in range(20)])
    assert replies == [f"m{i}".encode() for i in range(20)]  # each caller its own reply
    assert await link_connections(redis_server) == 3
    await link.aclose()


async def test_url_password_and_database_are_used(redis_server: RedisServer) -> None:
    async with redis.asyncio.Redis.from_url(redis_server.url) as admin:
        await admin.config_set("requirepass", "s3cret")
    link = link_for(f"redis://:s3cret@127.0.0.1:{redis_server.port}/2")
    assert await link.send(pack(["SET", "k", "v"])) == b"OK"
    async with redis.asyncio.Redis.from_url(f"redis://:s3cret@127.0.0.1:{redis_server.port}/2") as db2:
        assert await db2.get("k") == b"v"
    await link.aclose()

    wrong = link_for(f"redis://:nope@127.0.0.1:{redis_server.port}/0")
    with pytest.raises(ConnectionError, match="set-up") as caught:
        await wrong.send(pack(["PING"]))
    assert "nope" not in str(caught.value)
    await wrong.aclose()


async def test_an_error_reply_is_raised_and_the_connection_stays_usable(redis_server: RedisServer) -> None:
    link = link_for(redis_server.url, pool_size=1)
    with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
        await link.send(pack(["NOSUCHCOMMAND"]))
    assert await link.send(pack(["PING"])) == b"PONG"
    await link.aclose()


async def test_a_late_reply_never_answers_the_next_command(redis_server: RedisServer) -> None:
    link = link_for(redis_server.url, pool_size=1)
    assert await link.send(pack(["PING"])) == b"PONG"
    redis_server.pause()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await link.send(pack(["ECHO", "late"]))
    redis_server.resume()
    assert await link.send(pack(["ECHO", "now"])) == b"now"
    await link.aclose()


async def test_pooled_connections_killed_by_a_restart_are_replaced(redis_server: RedisServer) -> None:
    link = link_for(redis_server.url, pool_size=2)
    await asyncio.gather(link.send(pack(["PING"])), link.send(pack(["PING"])))
    redis_server.restart()
    assert await asyncio.gather(link.send(pack(["PING"])), link.send(pack(["PING"]))) == [b"PONG", b"PONG"]
    await link.aclose()


async def test_a_stopped_redis_is_a_connection_error_then_recovers(redis_server: RedisServer) -> None:
    link = link_for(redis_server.url)
    redis_server.stop()
    with pytest.raises(OSError):
        await link.send(pack(["PING"]))
    redis_server.start()
    assert await link.send(pack(["PING"])) == b"PONG"
    await link.aclose()


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_reply_waiting_in_the_socket_at_the_deadline_is_taken(redis_server: RedisServer, new_loop) -> None:
    """The event loop is busy past the deadline inside an I/O callback (as in a burst of requests)
    while Redis answers in time: the reply and the due timer meet in the same loop turn."""

    async def scenario() -> object:
        loop = asyncio.get_running_loop()
        link = link_for(redis_server.url, timeout=0.05)
        await link.send(pack(["PING"]))  # connected
        calls = []

        def burst() -> None:  # an I/O callback that sends the command, then keeps the loop 4 timeouts long
            busy.recv(1)
            calls.append(link.send(pack(["ECHO", "in time"])))
            time.sleep(0.2)

        busy, trigger = socket.socketpair()
        loop.add_reader(busy, burst)
        trigger.send(b"x")
        try:
            while not calls:
                await asyncio.sleep(0.01)
            return await calls[0]
        finally:
            loop.remove_reader(busy)
            busy.close()
            trigger.close()
            await link.aclose()

    loop = new_loop()
    try:
        assert loop.run_until_complete(scenario()) == b"in time"
    finally:
        loop.close()


async def test_a_late_reply_times_out(redis_server: RedisServer) -> None:
    link = link_for(redis_server.url, timeout=0.05)
    await link.send(pack(["PING"]))
    redis_server.pause()
    try:
        with pytest.raises(TimeoutError):
            await link.send(pack(["PING"]))
    finally:
        redis_server.resume()
    await link.aclose()


async def test_a_full_pool_serves_callers_in_the_order_they_came(redis_server: RedisServer) -> None:
    link = link_for(redis_server.url, pool_size=1)
    await link.send(pack(["PING"]))  # the one connection
    done: list[str] = []

    async def call(name: str) -> None:
        await link.send(pack(["ECHO", name]))
        done.append(name)

    async def first(sent: Awaitable[object]) -> None:
        await sent
        done.append("a")
        await call("d")  # asked in the very step that freed the connection, while b and c wait

    a = asyncio.ensure_future(first(link.send(pack(["ECHO", "a"]))))  # takes the connection
    queued = [asyncio.ensure_future(call(name)) for name in ("b", "c")]
    await asyncio.gather(a, *queued)
    assert done == ["a", "b", "c", "d"]
    await link.aclose()


async def test_an_old_master_answering_readonly_is_left_for_fresh_connections(redis_server: RedisServer) -> None:
    """A failover made the node a replica: the connection that heard READONLY and its idle siblings
    are closed, so the next call connects afresh (to wherever the address leads now)."""
    link = link_for(redis_server.url, pool_size=3)
    ids = await asyncio.gather(*[link.send(pack(["CLIENT", "ID"])) for _ in range(3)])
    assert await link_connections(redis_server) == 3
    with RedisServer() as new_master:
        async with redis.asyncio.Redis.from_url(redis_server.url) as admin:
            await admin.replicaof("127.0.0.1", new_master.port)
            while (await admin.info("replication")).get("master_link_status") != "up":
                await asyncio.sleep(0.02)
            with pytest.raises(ReadOnlyError, match="READONLY"):
                await link.send(pack(["SET", "k", "v"]))
            assert not {int(c["id"]) for c in await admin.client_list()} & set(ids)
            assert await link.send(pack(["CLIENT", "ID"])) > max(ids)  # a fresh connection
            await admin.replicaof("NO", "ONE")
    assert await link.send(pack(["SET", "k", "v"])) == b"OK"
    await link.aclose()


async def test_a_replica_cut_from_its_master_answering_masterdown_is_left(redis_server: RedisServer) -> None:
    link = link_for(redis_server.url, pool_size=2)
    await asyncio.gather(link.send(pack(["PING"])), link.send(pack(["PING"])))
    async with redis.asyncio.Redis.from_url(redis_server.url) as admin:
        await admin.config_set("replica-serve-stale-data", "no")
        await admin.replicaof("127.0.0.1", free_port())  # a master nobody runs
    with pytest.raises(MasterDownError, match="MASTERDOWN"):
        await link.send(pack(["GET", "k"]))
    assert await link_connections(redis_server) == 0
    await link.aclose()


CLOSE = object()
"""A step of a RawRedis answer: hang up."""

Answer = bytes | list[bytes | float | object]
"""What RawRedis does for one command: exact bytes, or steps: bytes to write, seconds to wait, CLOSE."""


class RawRedis:
    """A loopback server answering each command, whatever it is, with the next of `answers`, or with what
    `answers(connection index, command)` gives (see Answer); it records the commands each connection sent
    and when each connection ended (`closed`)."""

    def __init__(self, answers: list[Answer] | Callable[[int, list[bytes]], Answer]):
        self.answers = answers
        self.connections: list[list[list[bytes]]] = []
        self.closed: list[asyncio.Event] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._serving: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._serving:  # an answer still waiting out its steps
            task.cancel()
        await asyncio.gather(*self._serving)
        for writer in self._writers:
            writer.close()
            await writer.wait_closed()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        index = len(self.connections)
        commands: list[list[bytes]] = []
        self.connections.append(commands)
        self._writers.append(writer)
        closed = asyncio.Event()
        self.closed.append(closed)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    commands.append(command)
                    answer = self.answers(index, command) if callable(self.answers) else self.answers.pop(0)
                    for step in [answer] if isinstance(answer, bytes) else answer:
                        if step is CLOSE:
                            writer.close()
                            return
                        if isinstance(step, float):
                            await asyncio.sleep(step)
                        else:
                            writer.write(step)  # type: ignore[arg-type]
        except (asyncio.CancelledError, ConnectionError):
            return  # the test is over, or the client hung up while an answer waited
        finally:
            closed.set()
            self._serving.discard(task)


async def test_a_loading_node_is_left_for_a_fresh_connection() -> None:
    async with RawRedis([b"+PONG\r\n", b"-LOADING Redis is loading the dataset in memory\r\n", b"+PONG\r\n"]) as raw:
        link = link_for(raw.url, pool_size=1)
        assert await link.send(pack(["PING"])) == b"PONG"
        with pytest.raises(BusyLoadingError, match="LOADING"):
            await link.send(pack(["PING"]))
        await asyncio.wait_for(raw.closed[0].wait(), 5)
        assert await link.send(pack(["PING"])) == b"PONG"
        assert [len(commands) for commands in raw.connections] == [2, 1]
        await link.aclose()


async def test_an_invalid_reply_closes_the_connection_and_is_not_resent() -> None:
    """The command may have run: resending it (as after a connection lost while idle) could count a
    request twice."""
    async with RawRedis([b"+PONG\r\n", b"?what\r\n", b"$2\r\nok\r\n"]) as raw:
        link = link_for(raw.url, pool_size=1)
        assert await link.send(pack(["PING"])) == b"PONG"
        with pytest.raises(InvalidResponse, match="invalid reply"):
            await link.send(pack(["ECHO", "once"]))
        await asyncio.wait_for(raw.closed[0].wait(), 5)
        assert raw.connections == [[[b"PING"], [b"ECHO", b"once"]]]
        assert await link.send(pack(["ECHO", "ok"])) == b"ok"
        assert len(raw.connections) == 2
        await link.aclose()


@pytest.mark.parametrize("cut", [b"*3\r\n:1\r\n", b"$4\r\nda"], ids=["array", "bulk"])
async def test_a_reply_cut_short_is_not_resent(cut: bytes) -> None:
    """A pooled connection lost in the middle of a reply: the command ran, so sending it again (as after
    a connection that died while idle) would run it twice, a rate limit step counted twice."""
    async with RawRedis([b"+PONG\r\n", [cut, 0.05, CLOSE], b"$4\r\ndone\r\n"]) as raw:
        link = link_for(raw.url, pool_size=1)
        assert await link.send(pack(["PING"])) == b"PONG"
        with pytest.raises(InvalidResponse, match="middle of a reply"):
            await link.send(pack(["INCR", "k"]))
        assert raw.connections == [[[b"PING"], [b"INCR", b"k"]]]
        await link.aclose()


@pytest.mark.parametrize("extra", [
    [b"$1\r\na\r\n$5\r\nstale\r\n"],  # two replies to one command, in one read
    [b"$1\r\na\r\n$5\r\nst"],  # the start of a second one
    [b"$1\r\na\r\n", 0.05, b"$5\r\nst"],  # the start of one nobody asked for, read while idle
], ids=["coalesced", "coalesced-partial", "idle-partial"])
async def test_bytes_beyond_the_reply_never_answer_the_next_command(extra: list[bytes | float]) -> None:
    """A peer (a broken proxy) that sends more than the one reply asked for: what is left in the parser
    would be taken as the next command's reply. The connection is left instead, and the command that heard
    more than its reply fails, since which reply was its own cannot be known."""
    def answer(connection: int, command: list[bytes]) -> Answer:
        if connection > 0:
            return b"$1\r\nc\r\n"
        return extra if command == [b"ECHO", b"a"] else b"ale\r\n$1\r\nc\r\n"  # ends the extra, then answers

    async with RawRedis(answer) as raw:
        link = link_for(raw.url, pool_size=1)
        first = (await asyncio.gather(link.send(pack(["ECHO", "a"])), return_exceptions=True))[0]
        await asyncio.sleep(0.1)  # the idle bytes are read
        assert await link.send(pack(["ECHO", "c"])) == b"c"
        assert [len(commands) for commands in raw.connections] == [1, 1]
        assert first == b"a" if len(extra) == 3 else isinstance(first, InvalidResponse)
        await link.aclose()


class Wire:
    """The transport under a Connection: whether it was closed."""

    closed = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True


BATCH_REPLY = b"*4\r\n:1\r\n:12345678901\r\n:0\r\n:-7\r\n"


@contextmanager
def script_call_sent() -> Iterator[tuple[Connection, Wire, asyncio.Future[object], list[object]]]:
    """A Connection on a Wire that has sent a script call: the call's reply, and what `on_reply` heard."""
    loop = asyncio.new_event_loop()
    try:
        conn, wire, heard = Connection(loop), Wire(), []
        conn.connection_made(wire)  # type: ignore[arg-type]
        yield conn, wire, conn.send(pack(["EVALSHA", "x", "0"]), loop.time() + 60, heard.append), heard
    finally:
        loop.close()


@given(st.lists(st.integers(1, len(BATCH_REPLY) - 1), unique=True).map(sorted))
@example(list(range(1, len(BATCH_REPLY))))  # a byte at a time
def test_a_reply_split_anywhere_is_one_reply_handed_over_once(cuts: list[int]) -> None:
    with script_call_sent() as (conn, wire, reply, heard):
        for start, end in zip([0, *cuts], [*cuts, len(BATCH_REPLY)], strict=True):
            assert not reply.done()
            conn.data_received(BATCH_REPLY[start:end])
        assert reply.result() == heard[0] == [1, 12345678901, 0, -7] and len(heard) == 1
        assert not wire.closed  # ready for the next command


@given(st.integers(1, 2 * len(BATCH_REPLY) - 1))
def test_a_reply_coalesced_with_more_is_never_handed_over(cut: int) -> None:
    """More than one reply to one command, in two reads cut anywhere: the connection is left. The first
    reply reaches the caller only when a read held it alone (the bytes after it then came unasked)."""
    stream = BATCH_REPLY + b"*1\r\n:0\r\n" + BATCH_REPLY
    with script_call_sent() as (conn, wire, reply, heard):
        conn.data_received(stream[:cut])
        if not wire.closed:
            conn.data_received(stream[cut:])
        if cut == len(BATCH_REPLY):
            assert heard == [reply.result()]
        else:
            assert isinstance(reply.exception(), InvalidResponse) and not heard
        assert wire.closed


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    """A server certificate for 127.0.0.1 and a client certificate, each self-signed."""
    files = {name: tmp_path / f"{name}.pem" for name in ("server", "server_key", "client", "client_key")}
    write_self_signed(files["server"], files["server_key"])
    write_self_signed(files["client"], files["client_key"], name="gateway")
    return files


@pytest.fixture
def tls_server(certs: dict[str, Path]) -> AsyncIterator[tuple[RedisServer, int]]:
    """redis-server with TLS on a second port; it asks for a client certificate issued by `client`."""
    port = free_port()
    args = ["--tls-port", str(port), "--tls-cert-file", str(certs["server"]), "--tls-key-file",
            str(certs["server_key"]), "--tls-ca-cert-file", str(certs["client"]), "--tls-auth-clients", "optional"]
    with RedisServer(args=args) as server:
        yield server, port


async def test_rediss_verifies_the_server_certificate(certs: dict[str, Path], tls_server) -> None:
    server, port = tls_server
    trusted = link_for(f"rediss://127.0.0.1:{port}/1?ssl_ca_certs={certs['server']}")
    assert await trusted.send(pack(["SET", "k", "over tls"])) == b"OK"
    async with redis.asyncio.Redis.from_url(f"redis://127.0.0.1:{server.port}/1") as plain:
        assert await plain.get("k") == b"over tls"  # the URL's database, over TLS
        tls_clients = [c for c in await plain.client_list() if c["laddr"].endswith(f":{port}")]
    assert len(tls_clients) == 1
    await trusted.aclose()

    unknown = link_for(f"rediss://127.0.0.1:{port}/0")  # the system's CAs do not know this certificate
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        await unknown.send(pack(["PING"]))
    await unknown.aclose()

    unchecked = link_for(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none")
    assert await unchecked.send(pack(["PING"])) == b"PONG"
    await unchecked.aclose()


async def test_rediss_presents_the_client_certificate(certs: dict[str, Path], tls_server) -> None:
    server, port = tls_server
    async with redis.asyncio.Redis.from_url(server.url) as admin:
        await admin.config_set("tls-auth-clients", "yes")
    base = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs['server']}"
    with_cert = link_for(f"{base}&ssl_certfile={certs['client']}&ssl_keyfile={certs['client_key']}")
    assert await with_cert.send(pack(["PING"])) == b"PONG"
    await with_cert.aclose()

    without = link_for(base)
    with pytest.raises(OSError):
        await without.send(pack(["PING"]))
    await without.aclose()


async def test_unix_socket_with_database(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    with RedisServer(args=["--unixsocket", str(path), "--unixsocketperm", "700"]) as server:
        link = link_for(f"unix://{path}?db=3", pool_size=2)
        replies = await asyncio.gather(link.send(pack(["SET", "k", "by socket"])), link.send(pack(["PING"])))
        assert replies == [b"OK", b"PONG"]
        async with redis.asyncio.Redis.from_url(f"redis://127.0.0.1:{server.port}/3") as tcp:
            assert await tcp.get("k") == b"by socket"
            assert sum(1 for c in await tcp.client_list() if c["addr"].startswith("/")) == 2
        await link.aclose()
