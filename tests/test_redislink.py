"""The hot path's Redis connections against a real redis-server: bounded pool, URL credentials and
database, no late reply answering the wrong command, recovery after a restart."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable

import pytest
import redis.asyncio
import uvloop

from apigw.config import RedisConfig
from apigw.redislink import RedisLink, pack
from apigw.testkit.redis import RedisServer


def link_for(url: str, **settings: object) -> RedisLink:
    return RedisLink(RedisConfig.model_validate({"url": url, "timeout": 1.0, "connect_timeout": 1.0, **settings}))


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
