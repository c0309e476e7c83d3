"""Redis Sentinel against real processes (a master, a replica, three `redis-server --sentinel`): the link
finds the master, follows `+switch-master` with no traffic at all, moves to the promoted replica after the
master is SIGKILLed, never asks a sentinel per call, and authenticates to password-protected sentinels.
The config side: `redis+sentinel://` URLs parsed into what the link takes, Redis Cluster refused."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import hiredis
import pytest
import redis
import yaml

from apigw.config.errors import ConfigError
from apigw.config.loader import GLOBAL_FILE, parse_documents
from apigw.config.model import RedisConfig
from apigw.observability.metrics import Metrics
from apigw.redis.batch import RedisBatch
from apigw.redis.link import RedisLink, pack
from apigw.testkit.certs import write_self_signed
from apigw.testkit.redis import RedisServer, SentinelGroup, SentinelServer, free_port
from tests.test_redislink import Answer, RawRedis


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    """Shared by the tests that leave the master where it is; the failover tests start their own."""
    with SentinelGroup() as group:
        yield group


class Moves:
    """What the link told `on_master`."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def __call__(self, address: str, previous: str | None) -> None:
        self.seen.append((address, previous))


def link_for(group: SentinelGroup, moves: Moves | None = None, password: str | None = None,
             name: str | None = None) -> RedisLink:
    settings = RedisConfig(url=group.url.replace(f"/{group.name}/", f"/{name or group.name}/"),
                           sentinel_password=password)
    target = settings.sentinel()
    assert target is not None
    return RedisLink(target.url, pool_size=4, timeout=0.5, connect_timeout=0.5, sentinels=target.sentinels,
                     master_name=target.master_name, sentinel_password=password, on_master=moves)


async def eventually(predicate, timeout: float = 30, what: str = "condition") -> float:
    """Seconds until `predicate()` is true (polled every 10 ms), bounded."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def sentinel_connections(group: SentinelGroup) -> int:
    return sum(group.ask(s, "INFO", "stats")["total_connections_received"] for s in group.sentinels)


async def test_the_link_uses_the_master_the_sentinels_name(group: SentinelGroup) -> None:
    moves = Moves()
    link = link_for(group, moves)
    assert await link.send(pack(["SET", "where", "master"])) == b"OK"
    assert redis.Redis(port=group.master.port).get("where") == b"master"
    assert moves.seen == [(f"127.0.0.1:{group.master.port}", None)]
    await link.aclose()


async def test_calls_never_ask_a_sentinel_once_the_master_is_known(group: SentinelGroup) -> None:
    link = link_for(group)
    await asyncio.gather(*[link.send(pack(["PING"])) for _ in range(4)])  # pool open, subscription up
    await asyncio.sleep(0.2)
    before = sentinel_connections(group)
    for _ in range(200):
        assert await link.send(pack(["INCR", "calls"])) >= 1
    assert sentinel_connections(group) == before + len(group.sentinels)  # only the INFO calls' own
    await link.aclose()


async def test_an_unknown_master_name_fails_with_what_each_sentinel_said(group: SentinelGroup) -> None:
    link = link_for(group, name="nosuchmaster")
    with pytest.raises(ConnectionError, match="knows no master named 'nosuchmaster'") as caught:
        await link.send(pack(["PING"]))
    assert str(caught.value).count("knows no master") == 3
    await link.aclose()


async def test_password_protected_sentinels() -> None:
    with SentinelGroup(count=1, password="s3ntinel") as group:
        link = link_for(group, password="s3ntinel")
        assert await link.send(pack(["PING"])) == b"PONG"
        await link.aclose()

        wrong = link_for(group, password="nope")
        with pytest.raises(ConnectionError, match="no sentinel named the Redis master") as caught:
            await wrong.send(pack(["PING"]))
        assert "nope" not in str(caught.value)
        await wrong.aclose()


async def test_switch_master_is_followed_without_any_traffic() -> None:
    """A manual failover (SENTINEL FAILOVER): the subscription moves the link, no call has to fail first;
    the connections to the old master are not used again."""
    with SentinelGroup() as group:
        moves = Moves()
        link = link_for(group, moves)
        assert await link.send(pack(["SET", "k", "before"])) == b"OK"
        await asyncio.sleep(0.2)  # the subscription is up
        group.ask(group.sentinels[0], "SENTINEL", "FAILOVER", group.name)
        await eventually(lambda: len(moves.seen) == 2, what="the link moving to the new master")
        new = f"127.0.0.1:{group.replica.port}"
        assert moves.seen[1] == (new, f"127.0.0.1:{group.master.port}")
        await eventually(lambda: redis.Redis(port=group.replica.port).role()[0] == b"master", what="promotion")
        assert await link.send(pack(["SET", "k", "after"])) == b"OK"  # no READONLY from the old master
        assert redis.Redis(port=group.replica.port).get("k") == b"after"
        await link.aclose()


async def test_a_killed_master_is_replaced_by_the_promoted_replica() -> None:
    with SentinelGroup() as group:
        moves = Moves()
        link = link_for(group, moves)
        assert await link.send(pack(["SET", "k", "before"])) == b"OK"
        group.master.process.send_signal(signal.SIGKILL)
        group.master.process.wait()
        failures = 0

        async def written() -> bool:
            nonlocal failures
            try:
                return await link.send(pack(["SET", "k", "after"])) == b"OK"
            except (ConnectionError, TimeoutError, redis.exceptions.RedisError):
                failures += 1
                return False

        started = time.monotonic()
        while not await written():
            assert time.monotonic() - started < 30, "no write reached the promoted replica within 30 s"
            await asyncio.sleep(0.01)
        assert failures > 0  # the outage was seen, and each failure was bounded (the loop went on)
        assert redis.Redis(port=group.replica.port).get("k") == b"after"
        assert moves.seen[-1] == (f"127.0.0.1:{group.replica.port}", f"127.0.0.1:{group.master.port}")
        await link.aclose()


@pytest.mark.parametrize("how", ["SENTINEL FAILOVER", "SIGKILL"])
async def test_batches_asked_through_a_failover_get_their_own_answers_or_an_error(how: str) -> None:
    """Ticks of checks go on while the master moves (a manual failover, or the master killed): each check
    gets its own answer (the revocation list, replicated, says a is revoked and b is not; a fresh bucket
    allows) or an error, every tick is over within its bound, and the ticks after the move are answered."""
    with SentinelGroup() as group:
        master = redis.Redis(port=group.master.port)
        master.set("revoked:a", 1)
        assert master.wait(1, 5000) == 1  # on the replica too
        moves = Moves()
        batch = RedisBatch(RedisConfig(url=group.url, timeout=0.3, connect_timeout=0.3, pool_size=4), max_checks=2,
                           on_master=moves)
        want = [1, 0]
        answered_after_move = failed = 0
        tick = 0
        await asyncio.sleep(0.2)  # the subscription is up
        if how == "SIGKILL":
            group.master.process.send_signal(signal.SIGKILL)
        else:
            group.ask(group.sentinels[0], "SENTINEL", "FAILOVER", group.name)
        started = time.monotonic()
        while answered_after_move < 5:
            assert time.monotonic() - started < 30, "no answers from the promoted replica within 30 s"
            tick += 1
            asked = [batch.revoked("revoked:a"), batch.revoked("revoked:b"), batch.limit(f"ratelimit:p:{tick}", 10, 20)]
            answers = await asyncio.wait_for(asyncio.gather(*asked, return_exceptions=True), 2)
            for answer, expected in zip(answers[:2], want, strict=True):
                assert answer == expected or isinstance(answer, OSError | redis.exceptions.RedisError | TimeoutError)
            assert answers[2][0] == 1 if isinstance(answers[2], tuple) else isinstance(answers[2], Exception)
            if any(isinstance(answer, Exception) for answer in answers):
                failed += 1
            elif len(moves.seen) == 2:  # the move seen: the answers come from the new master
                answered_after_move += 1
            await asyncio.sleep(0.02)
        assert moves.seen[1] == (f"127.0.0.1:{group.replica.port}", f"127.0.0.1:{group.master.port}")
        if how == "SIGKILL":
            assert failed > 0  # the outage was seen, and answered, not waited out
        await batch.aclose()


@pytest.mark.parametrize("named", [
    b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\nport\r\n",  # a port that is not a number
    b"*2\r\n*0\r\n$4\r\n6379\r\n",  # a host that is not a string
], ids=["port", "host"])
async def test_a_sentinel_naming_the_master_in_garbage_is_a_connection_error(named: bytes) -> None:
    """A broken sentinel (or something else on its port): each call fails with an error its caller
    handles (fail_open, fail_closed, counted), not a ValueError that the request path turns into a 500."""

    def answer(connection: int, command: list[bytes]) -> bytes:
        if command[0] == b"SUBSCRIBE":
            return b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n"
        return named

    async with RawRedis(answer) as raw:
        port = int(raw.url.rsplit(":", 1)[1].partition("/")[0])
        link = RedisLink("redis://127.0.0.1:6379/0", pool_size=2, timeout=0.5, connect_timeout=0.5,
                         sentinels=[("127.0.0.1", port)], master_name="mymaster")
        for _ in range(2):
            with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
                await asyncio.wait_for(link.send(pack(["PING"])), 5)
        await link.aclose()


async def test_a_switch_message_in_garbage_is_skipped_and_the_next_one_followed() -> None:
    """A `+switch-master` message whose payload is not text (a broken sentinel): skipped, and the watch
    goes on to follow the next switch."""
    subscribed = b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n"
    garbage = b"*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n:5\r\n"
    switch = b"mymaster 127.0.0.1 1 127.0.0.2 2"
    switched = b"*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n$%d\r\n%s\r\n" % (len(switch), switch)

    def answer(connection: int, command: list[bytes]) -> Answer:
        if command[0] == b"SUBSCRIBE":
            return [subscribed + garbage, 0.3, switched]  # the switch once the master was asked for
        return b"*2\r\n$9\r\n127.0.0.1\r\n$1\r\n1\r\n"

    async with RawRedis(answer) as raw:
        moves = Moves()
        port = int(raw.url.rsplit(":", 1)[1].partition("/")[0])
        link = RedisLink("redis://127.0.0.1:6379/0", pool_size=2, timeout=0.5, connect_timeout=0.5,
                         sentinels=[("127.0.0.1", port)], master_name="mymaster", on_master=moves)
        with pytest.raises(OSError):
            await link.send(pack(["PING"]))  # nothing listens at 127.0.0.1:1; the watch has begun
        await eventually(lambda: ("127.0.0.2:2", "127.0.0.1:1") in moves.seen, timeout=5, what="the switch")
        await link.aclose()


# --- the config side -----------------------------------------------------------------------------


def test_sentinel_url_parts() -> None:
    settings = RedisConfig(url="rediss+sentinel://app:pw@10.0.0.1:26380, s2 ,[::1]:26381/cache/3?ssl_cert_reqs=none",
                           sentinel_password="x")
    target = settings.sentinel()
    assert target is not None
    assert target.sentinels == (("10.0.0.1", 26380), ("s2", 26379), ("::1", 26381))
    assert target.master_name == "cache"
    assert target.url == "rediss://app:pw@10.0.0.1:26380/3?ssl_cert_reqs=none"
    assert RedisConfig(url="redis://r:6379/0").sentinel() is None


@pytest.mark.parametrize("url", ["redis-cluster://r:6379", "redis+cluster://a:1,b:2", "rediss-cluster://r"])
def test_redis_cluster_is_refused_with_the_reason(url: str) -> None:
    with pytest.raises(ValueError, match="Redis Cluster is not supported: .*hash slot.*redis\\+sentinel://"):
        RedisConfig(url=url)


# --- what a sentinel cannot tell in time: READONLY and ROLE --------------------------------------


class StaticSentinel:
    """A sentinel that names `self.master` and never announces a switch: the link must find out by itself."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.asked = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        try:
            while data := await reader.read(4096):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    if command[0].upper() == b"SUBSCRIBE":
                        writer.write(b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n")
                    else:
                        self.asked += 1
                        port = str(self.master).encode()
                        writer.write(b"*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%s\r\n" % (len(port), port))
        finally:
            writer.close()


async def test_readonly_and_role_make_the_link_ask_again(redis_server: RedisServer) -> None:
    with RedisServer(args=["--replicaof", "127.0.0.1", str(redis_server.port)]) as other:
        sentinel = StaticSentinel(redis_server.port)
        server = await asyncio.start_server(sentinel.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        moves = Moves()
        link = RedisLink(redis_server.url, pool_size=1, timeout=1.0, connect_timeout=1.0,
                         sentinels=[("127.0.0.1", port)], master_name="m", on_master=moves)
        assert await link.send(pack(["SET", "k", "1"])) == b"OK"
        assert sentinel.asked == 1

        # The two swap roles behind the sentinel's back; it still names the old master.
        redis.Redis(port=other.port).replicaof("NO", "ONE")
        redis.Redis(port=redis_server.port).replicaof("127.0.0.1", other.port)
        with pytest.raises(redis.exceptions.ReadOnlyError):
            await link.send(pack(["SET", "k", "2"]))  # the pooled connection to the old master
        with pytest.raises(ConnectionError, match=f"127.0.0.1:{redis_server.port}.* is not the master now"):
            await link.send(pack(["SET", "k", "2"]))  # asked again; ROLE says the node named is a replica
        assert sentinel.asked == 2

        sentinel.master = other.port  # the sentinels catch up
        assert await link.send(pack(["SET", "k", "3"])) == b"OK"
        assert redis.Redis(port=other.port).get("k") == b"3"
        assert sentinel.asked == 3
        assert moves.seen[-1] == (f"127.0.0.1:{other.port}", f"127.0.0.1:{redis_server.port}")
        await link.aclose()
        server.close()
        await asyncio.sleep(0.1)  # the handlers see the link's connections close


async def test_tls_to_the_sentinel_and_to_the_master(tmp_path: Path) -> None:
    """rediss+sentinel://: the sentinel and the master it names are both reached over TLS, verified
    against the URL's CA (one self-signed certificate for 127.0.0.1 serves both here)."""
    cert, key = tmp_path / "server.pem", tmp_path / "server_key.pem"
    write_self_signed(cert, key)
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
           "--tls-auth-clients", "no"]
    master_tls, sentinel_tls = free_port(), free_port()
    with RedisServer(args=["--tls-port", str(master_tls), *tls]) as master:
        sentinel = SentinelServer(master_tls, quorum=1, config=[
            f"tls-port {sentinel_tls}", "tls-replication yes", "tls-auth-clients no",
            f"tls-cert-file {cert}", f"tls-key-file {key}", f"tls-ca-cert-file {cert}",
        ])
        with sentinel:
            url = f"rediss+sentinel://127.0.0.1:{sentinel_tls}/mymaster/0?ssl_ca_certs={cert}"
            target = RedisConfig(url=url).sentinel()
            assert target is not None
            link = RedisLink(target.url, pool_size=1, timeout=1.0, connect_timeout=1.0, sentinels=target.sentinels,
                             master_name=target.master_name)
            assert await link.send(pack(["SET", "k", "over tls"])) == b"OK"
            assert redis.Redis(port=master.port).get("k") == b"over tls"
            await link.aclose()

            untrusted = RedisLink(target.url.partition("?")[0], pool_size=1, timeout=1.0, connect_timeout=1.0,
                                  sentinels=target.sentinels, master_name=target.master_name)
            with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.send(pack(["PING"]))  # the sentinel's certificate is not trusted
            await untrusted.aclose()


@pytest.mark.parametrize("url", [
    "redis+sentinel://app:hunter2@s1:26379,s2:99999/cache/0",
    "redis+sentinel://app:hunter2@s1:26379/",
    "redis-cluster://app:hunter2@r:6379",
])
def test_a_bad_sentinel_url_error_never_shows_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_documents({GLOBAL_FILE: yaml.safe_dump({"redis": {"url": url}})})
    assert caught.value.errors and all("redis.url" in error for error in caught.value.errors)
    assert not any("hunter2" in error for error in caught.value.errors), caught.value.errors


def test_master_metrics_follow_the_link() -> None:
    """A plain URL reports its own address at once; a move sets the old address to 0 and counts a failover."""
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    RedisLink("redis://10.1.2.3:6380/0", pool_size=1, timeout=1, connect_timeout=1,
              on_master=metrics.redis_master_moved)
    assert value("gateway_redis_master_info", {"address": "10.1.2.3:6380"}) == 1
    assert value("gateway_redis_failovers_total") == 0
    metrics.redis_master_moved("10.1.2.4:6379", "10.1.2.3:6380")
    assert value("gateway_redis_master_info", {"address": "10.1.2.3:6380"}) == 0
    assert value("gateway_redis_master_info", {"address": "10.1.2.4:6379"}) == 1
    assert value("gateway_redis_failovers_total") == 1
