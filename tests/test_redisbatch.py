"""The per-tick batch: concurrent checks share one round trip, each gets its own answer or the error;
a tick with more checks than a batch holds sends several script calls at once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from redis.exceptions import ReadOnlyError, RedisError, ResponseError

from apigw.config.model import RedisConfig
from apigw.redis import resp
from apigw.redis.batch import BATCH_LUA, MAX_CHECKS, RedisBatch
from apigw.testkit.redis import RedisServer
from tests.test_redislink import CLOSE, RawRedis


@pytest.fixture
async def client(redis_server: RedisServer):
    r = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)  # checks, is not checked
    yield r
    await r.aclose()


async def test_checks_of_one_tick_share_one_round_trip(client, redis_server: RedisServer) -> None:
    await client.set("revoked:a", 1)
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=2.0, connect_timeout=2.0))
    interval, capacity = 1_000_000, 2_000_000  # 1 per second, 2 at once
    answers = await asyncio.gather(
        batch.limit("ratelimit:p:x", interval, capacity),
        batch.revoked("revoked:a"),
        batch.limit("ratelimit:p:x", interval, capacity),
        batch.revoked("revoked:b"),
        batch.limit("ratelimit:p:x", interval, capacity),
    )
    assert batch.round_trips == 1
    assert [answers[0][0], answers[2][0], answers[4][0]] == [1, 1, 0]  # in order: the third is over
    assert answers[1] == 1 and answers[3] == 0
    assert answers[4][2] > 0  # how long until the next one may pass
    assert 0 < await client.pttl("ratelimit:p:x") <= 2000

    await batch.revoked("revoked:a")
    assert batch.round_trips == 2  # a later tick is another round trip
    await batch.aclose()


async def test_a_check_is_answered_in_the_loop_turn_that_reads_its_reply(
    client: redis.asyncio.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a turn later, after the round trip's own task: at half load each turn a request waits is a queue
    of other requests' work (`bench/compare.py`'s latency note)."""
    loop = asyncio.get_running_loop()
    turn = 0

    def count() -> None:
        nonlocal turn
        turn += 1
        ticking[0] = loop.call_soon(count)

    ticking = [loop.call_soon(count)]
    read_in: list[int] = []
    answered_in: list[int] = []
    data_received = resp.Connection.data_received

    def reading(self: resp.Connection, data: bytes) -> None:
        read_in.append(turn)
        data_received(self, data)

    monkeypatch.setattr(resp.Connection, "data_received", reading)
    await client.script_load(BATCH_LUA)  # no NOSCRIPT and EVAL again: one reply
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=2.0, connect_timeout=2.0))
    try:
        for _ in ("a new connection", "a pooled one"):
            read_in.clear()
            answered_in.clear()
            check = batch.revoked("revoked:a")
            check.add_done_callback(lambda _: answered_in.append(turn))  # callbacks run a turn after the result
            assert await check == 0
            assert answered_in == [read_in[-1] + 1]
    finally:
        ticking[0].cancel()
        await batch.aclose()


async def test_a_failed_batch_fails_every_check_in_it(client, redis_server: RedisServer) -> None:
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=0.5, connect_timeout=0.5))
    redis_server.stop()
    results = await asyncio.wait_for(
        asyncio.gather(batch.revoked("revoked:a"), batch.limit("k", 1, 1), return_exceptions=True), 5
    )
    assert all(isinstance(r, Exception) for r in results)
    redis_server.start()
    assert await batch.revoked("revoked:a") == 0
    await batch.aclose()


@pytest.mark.parametrize("hours", [300000000000, 3000000000000000])
async def test_a_policy_with_a_period_of_ages_fails_no_other_check_of_its_tick(redis_server: RedisServer, hours: int) -> None:
    """A check of one tenant's policy of ages (2 per `hours`) in the same script call as another's check:
    a bucket's expiry past what Redis takes (or written as 1e+17) failed the whole script, so every check
    of the tick (503 in fail_closed) for as long as that tenant sent requests. The model refuses such
    policies now (more than 100 years to refill); the script still fails no other check for one."""
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=2.0, connect_timeout=2.0))
    interval = hours * 3600 * 1_000_000 // 2
    answers = await asyncio.gather(
        batch.limit("ratelimit:shop.ok:a", 1_000_000, 2_000_000),
        batch.limit("ratelimit:other.ages:b", interval, 2 * interval),
        return_exceptions=True,
    )
    assert batch.round_trips == 1
    assert [a if isinstance(a, Exception) else a[0] for a in answers] == [1, 1]
    await batch.aclose()


@pytest.mark.parametrize("answer", [
    b":1\r\n", b"*1\r\n:0\r\n", b"$2\r\nno\r\n",
    b"*4\r\n$-1\r\n:1\r\n:0\r\n:0\r\n",  # nil for the revocation check: it would read as "not revoked"
    b"*4\r\n:0\r\n:1\r\n-ERR oops\r\n:0\r\n",  # an error past a limit's first place: not a check's error
    b"*4\r\n:0\r\n:1\r\n$-1\r\n:0\r\n",  # nil for a limit's wait: the limiter's arithmetic would raise (a 500)
], ids=["number", "short", "string", "nil-inside", "error-misplaced", "nil-in-limit"])
async def test_an_answer_that_is_not_the_numbers_asked_for_fails_every_check(answer: bytes) -> None:
    """A Redis (or a proxy before it) that answers the script with something else: each check fails with an
    error that says so, none hangs."""
    async with RawRedis([answer]) as raw:
        batch = RedisBatch(RedisConfig(url=raw.url, timeout=2.0, connect_timeout=2.0))
        results = await asyncio.wait_for(
            asyncio.gather(batch.revoked("revoked:a"), batch.limit("k", 1, 1), return_exceptions=True), 5
        )
        assert [type(r) for r in results] == [ConnectionError, ConnectionError]
        assert "not the numbers asked for" in str(results[0])
        assert raw.connections[0][0][0] == b"EVALSHA"
        await batch.aclose()


async def test_an_error_in_a_checks_place_fails_that_check_alone() -> None:
    """The script's marker for a check whose own command failed: the error in its (first) place."""
    async with RawRedis([b"*4\r\n-WRONGTYPE bad key\r\n:1\r\n:7\r\n:0\r\n"]) as raw:
        batch = RedisBatch(RedisConfig(url=raw.url, timeout=2.0, connect_timeout=2.0))
        revoked, limit = await asyncio.wait_for(
            asyncio.gather(batch.revoked("revoked:a"), batch.limit("k", 1, 1), return_exceptions=True), 5
        )
        assert isinstance(revoked, ResponseError) and str(revoked) == "WRONGTYPE bad key"
        assert limit == (1, 7, 0)
        await batch.aclose()


async def test_a_bucket_of_the_wrong_type_fails_its_own_check_only(client, redis_server: RedisServer) -> None:
    """Something wrote a hash where a bucket lives: its GET fails in the script. That used to fail the whole
    script call, so every check of the tick, every tenant's (503 for all in fail_closed, no limit in fail_open)."""
    await client.hset("ratelimit:p:ip:1.2.3.4", "a", "b")
    await client.hset("revoked:h", "a", "b")  # EXISTS takes any type: revoked
    await client.set("revoked:a", 1)
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=2.0, connect_timeout=2.0))
    interval, capacity = 1_000_000, 1_000_000  # 1 per second, 1 at once
    answers = await asyncio.gather(
        batch.limit("ratelimit:p:ip:5.6.7.8", interval, capacity),
        batch.limit("ratelimit:p:ip:1.2.3.4", interval, capacity),
        batch.revoked("revoked:a"),
        batch.revoked("revoked:h"),
        batch.limit("ratelimit:p:ip:5.6.7.8", interval, capacity),
        batch.revoked("revoked:b"),
        return_exceptions=True,
    )
    assert batch.round_trips == 1
    bad = answers.pop(1)
    assert isinstance(bad, ResponseError) and str(bad).startswith("WRONGTYPE"), bad
    assert [a if isinstance(a, int | Exception) else a[0] for a in answers] == [1, 1, 1, 0, 0]
    assert await client.hgetall("ratelimit:p:ip:1.2.3.4") == {b"a": b"b"}  # left as it was

    assert await batch.limit("ratelimit:p:ip:9.9.9.9", interval, capacity) == (1, interval, 0)  # the next batch
    await batch.aclose()


async def test_writes_refused_for_memory_fail_the_limits_not_the_revocation_checks(
    client, redis_server: RedisServer,
) -> None:
    """Out of memory (maxmemory, no eviction) Redis refuses the buckets' writes; reads still work."""
    await client.set("revoked:a", 1)
    await client.config_set("maxmemory", "1")
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=2.0, connect_timeout=2.0))
    answers = await asyncio.gather(
        batch.revoked("revoked:a"), batch.limit("ratelimit:p:x", 1_000_000, 1_000_000), batch.revoked("revoked:b"),
        return_exceptions=True,
    )
    await client.config_set("maxmemory", "0")
    assert answers[0] == 1 and answers[2] == 0
    assert isinstance(answers[1], RedisError) and "OOM" in str(answers[1]), answers[1]
    await batch.aclose()


async def test_a_replica_still_fails_the_whole_batch_so_the_link_leaves_it(redis_server: RedisServer) -> None:
    """READONLY is about the node, not one key (an old master after a failover): the script call fails as
    a whole, so `RedisLink` closes the connection and looks for the master again."""
    with RedisServer(args=["--replicaof", "127.0.0.1", str(redis_server.port)]) as replica:
        batch = RedisBatch(RedisConfig(url=replica.url, timeout=2.0, connect_timeout=2.0))
        answers = await asyncio.gather(
            batch.revoked("revoked:a"), batch.limit("ratelimit:p:x", 1_000_000, 1_000_000), return_exceptions=True
        )
        assert [type(a) for a in answers] == [ReadOnlyError, ReadOnlyError]
        assert batch.link._open == 0  # closed, not pooled
        await batch.aclose()


async def test_a_resend_and_the_eval_after_noscript_keep_the_batch_deadline() -> None:
    """A pooled connection that dies near the deadline is resent on a fresh one, which answers NOSCRIPT
    late: each step would get a whole `redis.timeout` of its own, the checks almost three. They fail at the
    batch's deadline instead, before EVAL is sent."""
    timeout = 0.3
    async with RawRedis([
        b"+PONG\r\n",
        [0.9 * timeout, CLOSE],  # hung, then gone
        [0.9 * timeout, b"-NOSCRIPT No matching script. Please use EVAL.\r\n"],
        b"*1\r\n:0\r\n",
    ]) as raw:
        batch = RedisBatch(RedisConfig(url=raw.url, timeout=timeout, connect_timeout=timeout, pool_size=1))
        assert await batch.link.send(resp.pack(["PING"])) == b"PONG"  # pooled
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batch.revoked("revoked:a"), 5)
        sent = [command[0] for commands in raw.connections for command in commands]
        assert sent == [b"PING", b"EVALSHA", b"EVALSHA"]  # the resend; no EVAL
        await batch.aclose()


async def test_keys_that_are_not_utf8_are_checked_not_dropped(redis_server: RedisServer) -> None:
    """A signed token may carry a `jti` with a lone surrogate; its check must answer, not hang."""
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=2.0, connect_timeout=2.0))
    assert await asyncio.wait_for(batch.revoked("revoked:\udcff"), 5) == 0
    await batch.aclose()


async def test_a_tick_over_the_cap_is_split_into_script_calls_sent_in_the_same_tick(
    client: redis.asyncio.Redis, redis_server: RedisServer,
) -> None:
    await client.script_load(BATCH_LUA)
    await client.set("revoked:a", 1)
    await client.config_set("slowlog-log-slower-than", 0)  # the slow log records every call and its arguments
    await client.slowlog_reset()
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=2.0, connect_timeout=2.0), max_checks=3)
    interval, capacity = 1_000_000, 2_000_000  # 1 per second, 2 at once
    asked = [batch.limit("ratelimit:p:x", interval, capacity) if i % 2 else batch.revoked(f"revoked:{'ab'[i % 4 // 2]}")
             for i in range(7)]
    assert batch.round_trips == 2  # two full batches went out before the tick ended
    answers = await asyncio.gather(*asked)
    assert batch.round_trips == 3
    assert answers[0::2] == [1, 0, 1, 0]  # revoked:a, revoked:b, revoked:a, revoked:b
    assert sorted(allowed for allowed, _, _ in answers[1::2]) == [0, 1, 1]  # 2 at once: the third is over
    calls = [entry["command"].split() for entry in await client.slowlog_get(100)]
    assert sorted(int(words[2]) for words in calls if words[0] == b"EVALSHA") == [1, 3, 3]  # checks per call
    await batch.aclose()


async def test_the_default_cap_splits_a_large_tick(redis_server: RedisServer) -> None:
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=2.0, connect_timeout=2.0))
    answers = await asyncio.gather(*[batch.revoked(f"revoked:{i}") for i in range(2 * MAX_CHECKS + 1)])
    assert answers == [0] * (2 * MAX_CHECKS + 1)
    assert batch.round_trips == 3
    await batch.aclose()


async def test_a_batch_answered_after_its_timeout_never_answers_the_next(
    client: redis.asyncio.Redis, redis_server: RedisServer,
) -> None:
    """Redis hangs (SIGSTOP) with a script call in its socket, then wakes and runs it: the checks of that
    call failed at their deadline, and the next tick's checks, on the same pool, get their own answers."""
    await client.script_load(BATCH_LUA)
    await client.set("revoked:a", 1)
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=0.2, connect_timeout=0.5, pool_size=1))
    assert await batch.revoked("revoked:b") == 0  # a pooled connection
    redis_server.pause()
    try:
        late = await asyncio.wait_for(asyncio.gather(
            batch.revoked("revoked:a"), batch.limit("ratelimit:p:x", 1_000_000, 2_000_000), return_exceptions=True,
        ), 5)
    finally:
        redis_server.resume()
    assert [type(r) for r in late] == [TimeoutError, TimeoutError]
    assert await asyncio.wait_for(asyncio.gather(batch.revoked("revoked:b"), batch.revoked("revoked:a")), 5) == [0, 1]
    await batch.aclose()


async def test_checks_in_flight_across_a_restart_get_their_answer_or_an_error(redis_server: RedisServer) -> None:
    """Redis is stopped with a script call in its socket and started again on the same port, without the
    keys or the cached script: the checks in flight get an answer or an error, and the checks after the
    restart their own answers (NOSCRIPT, then EVAL, on fresh connections)."""
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=0.5, connect_timeout=0.5, pool_size=2))

    async def revoke(key: str) -> None:
        async with redis.asyncio.Redis.from_url(redis_server.url) as admin:
            await admin.set(key, 1)

    await revoke("revoked:a")
    assert await asyncio.gather(batch.revoked("revoked:a"), batch.revoked("revoked:b")) == [1, 0]
    redis_server.pause()
    in_flight = asyncio.gather(batch.revoked("revoked:a"), batch.revoked("revoked:b"), return_exceptions=True)
    await asyncio.sleep(0.05)  # written
    redis_server.stop()
    redis_server.start()
    assert all(r == want or isinstance(r, OSError | RedisError | TimeoutError)
               for r, want in zip(await asyncio.wait_for(in_flight, 5), [1, 0], strict=True))
    await revoke("revoked:b")
    answers = await asyncio.wait_for(asyncio.gather(batch.revoked("revoked:a"), batch.revoked("revoked:b")), 5)
    assert answers == [0, 1]  # the restart lost revoked:a (no persistence here); revoked:b is new
    await batch.aclose()


async def test_more_batches_than_connections_wait_their_turn_within_the_timeout(
    client: redis.asyncio.Redis, redis_server: RedisServer,
) -> None:
    """A tick of 9 checks, 4 a batch, on one connection: three script calls queue for it. Each check gets
    its own answer; with Redis hung, each fails by its deadline, none waits for ever; after, all is well."""
    await client.mset({f"revoked:{i}": 1 for i in range(0, 9, 3)})
    batch = RedisBatch(RedisConfig(url=redis_server.url, timeout=0.3, connect_timeout=0.5, pool_size=1), max_checks=4)
    want = [int(i % 3 == 0) for i in range(9)]
    assert await asyncio.wait_for(asyncio.gather(*[batch.revoked(f"revoked:{i}") for i in range(9)]), 5) == want
    redis_server.pause()
    try:
        hung = await asyncio.wait_for(
            asyncio.gather(*[batch.revoked(f"revoked:{i}") for i in range(9)], return_exceptions=True), 5
        )
    finally:
        redis_server.resume()
    assert {type(r) for r in hung} == {TimeoutError}
    assert await asyncio.wait_for(asyncio.gather(*[batch.revoked(f"revoked:{i}") for i in range(9)]), 5) == want
    await batch.aclose()


async def test_a_batch_retired_by_a_reload_answers_what_was_asked_then_leaves_no_connection(
    client: redis.asyncio.Redis, redis_server: RedisServer,
) -> None:
    """A reload closes the old batch while checks asked of it are gathered, not yet sent: they are still
    answered, and the connection it opened for them is closed once they are."""
    await client.set("revoked:a", 1)
    old = RedisBatch(RedisConfig(url=redis_server.url, timeout=1.0, connect_timeout=1.0))
    asked = [old.revoked("revoked:a"), old.revoked("revoked:b"), old.limit("ratelimit:p:x", 1_000_000, 2_000_000)]
    closing = asyncio.ensure_future(old.aclose())
    answers = await asyncio.wait_for(asyncio.gather(*asked), 5)
    assert answers[:2] == [1, 0] and answers[2][0] == 1
    await closing
    await asyncio.sleep(0.05)
    assert len(await client.client_list()) == 1  # the test's own
