"""Rate limiting through the gateway: headers, 429s, Redis failures, and two replicas sharing one limit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import redis.asyncio
import yaml

from apigw.testkit.backend import Backend
from apigw.testkit.process import GatewayProcess, ports
from apigw.testkit.redis import RedisServer
from tests.conftest import gateway_of


def limited(url: str, redis_url: str | None, requests: int = 5, **ratelimit: object) -> dict:
    config = {
        "ratelimit": ratelimit,
        "policies": [{"name": "standard", "requests": requests, "period": "1m"}],
        "routes": [{"name": "users", "backend": {"service": "users", "url": url}, "ratelimit": "standard"}],
    }
    if redis_url:
        config["redis"] = {"url": redis_url, "timeout": "200ms"}
    return config


async def test_limit_then_429_with_headers(gateway_client, backend: Backend, redis_server: RedisServer) -> None:
    client = await gateway_client(limited(backend.url, redis_server.url, requests=3))
    first = await client.get("/a")
    assert first.status == 200
    assert first.headers["RateLimit-Limit"] == "3"
    assert first.headers["RateLimit-Remaining"] == "2"
    statuses = [(await client.get("/a")).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    denied = await client.get("/a")
    assert denied.status == 429
    assert int(denied.headers["Retry-After"]) >= 1
    assert denied.headers["RateLimit-Remaining"] == "0"
    assert (await denied.json())["error"].startswith("rate limit exceeded")
    value = gateway_of(client).metrics.registry.get_sample_value
    assert value("gateway_ratelimit_requests_total", {"policy": "standard", "decision": "limited"}) == 2


async def test_mix_of_200_and_429_as_the_runbook_expects(gateway_client, backend: Backend, redis_server) -> None:
    client = await gateway_client(limited(backend.url, redis_server.url, requests=40))
    statuses = [(await client.get("/api/v1/test")).status for _ in range(100)]
    assert statuses.count(200) == 40 and statuses.count(429) == 60


async def test_disabled_limits_nothing(gateway_client, backend: Backend, redis_server: RedisServer) -> None:
    client = await gateway_client(limited(backend.url, redis_server.url, requests=1, enabled=False))
    assert [(await client.get("/a")).status for _ in range(5)] == [200] * 5


async def test_in_process_limiter_without_redis(gateway_client, backend: Backend) -> None:
    client = await gateway_client(limited(backend.url, None, requests=2))
    assert [(await client.get("/a")).status for _ in range(3)] == [200, 200, 429]


async def test_redis_down_fail_open_and_fail_closed(gateway_client, backend: Backend, redis_server: RedisServer) -> None:
    open_client = await gateway_client(limited(backend.url, redis_server.url, failure_mode="fail_open"))
    closed_client = await gateway_client(limited(backend.url, redis_server.url, failure_mode="fail_closed"))
    redis_server.stop()
    resp = await asyncio.wait_for(open_client.get("/a"), 5)
    assert resp.status == 200
    assert "RateLimit-Limit" not in resp.headers
    resp = await asyncio.wait_for(closed_client.get("/a"), 5)
    assert resp.status == 503
    assert (await resp.json())["error"] == "rate limiter unavailable"
    value = gateway_of(closed_client).metrics.registry.get_sample_value
    assert value("gateway_ratelimit_errors_total") == 1
    redis_server.start()
    assert (await closed_client.get("/a")).status == 200


async def test_a_bucket_of_the_wrong_type_fails_only_its_own_requests(
    gateway_client, backend: Backend, redis_server: RedisServer,
) -> None:
    """A hash where one policy's bucket lives (written by someone else) fails that bucket's checks, as its
    failure mode says; the requests of other buckets, in the same script calls, are limited as usual."""
    config = limited(backend.url, redis_server.url, requests=2, failure_mode="fail_closed")
    config["policies"].append({"name": "broken", "requests": 2, "period": "1m"})
    config["routes"].insert(0, {"name": "orders", "match": {"path_prefix": "/orders"},
                                "backend": {"service": "orders", "url": backend.url}, "ratelimit": "broken"})
    client = await gateway_client(config)
    assert (await client.get("/orders")).status == 200
    async with redis.asyncio.Redis.from_url(redis_server.url) as admin:
        [bucket] = [key async for key in admin.scan_iter("ratelimit:*broken*")]
        await admin.delete(bucket)
        await admin.hset(bucket, "a", "b")
    orders, users = await asyncio.gather(
        asyncio.gather(*(client.get("/orders") for _ in range(2))), asyncio.gather(*(client.get("/users") for _ in range(3)))
    )
    assert [r.status for r in orders] == [503, 503]
    assert sorted(r.status for r in users) == [200, 200, 429]  # the one over the limit: whichever came third
    assert (await orders[0].json())["error"] == "rate limiter unavailable"
    value = gateway_of(client).metrics.registry.get_sample_value
    assert value("gateway_ratelimit_errors_total") == 2
    assert value("gateway_redis_errors_total", {"operation": "ratelimit"}) == 2


async def test_redis_paused_answers_within_the_timeout(gateway_client, backend: Backend, redis_server) -> None:
    client = await gateway_client(limited(backend.url, redis_server.url, failure_mode="fail_closed"))
    assert (await client.get("/a")).status == 200
    redis_server.pause()
    try:
        resp = await asyncio.wait_for(client.get("/a"), 5)
        assert resp.status == 503
    finally:
        redis_server.resume()


async def test_two_gateway_processes_share_one_limit(tmp_path: Path, backend: Backend, redis_server) -> None:
    """Two replicas, concurrent clients: allowed requests stay within 1% (or 1) of the limit."""
    limit = 300
    gateways = []
    for i in range(2):
        port, metrics_port = ports()
        config = {"listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
                  "logging": {"access_log": False},
                  **limited(backend.url, redis_server.url, requests=limit)}
        config["policies"][0]["period"] = "1h"
        path = tmp_path / f"gw{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        gateways.append(GatewayProcess(path, port, metrics_port))
    for gateway in gateways:
        await asyncio.to_thread(gateway.start)
    try:
        counts = {200: 0, 429: 0}

        async def hammer(session: aiohttp.ClientSession, url: str) -> None:
            for _ in range(40):
                async with session.get(url + "/x") as response:
                    counts[response.status] = counts.get(response.status, 0) + 1

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(hammer(session, gateways[i % 2].url) for i in range(20)))
    finally:
        for gateway in gateways:
            await asyncio.to_thread(gateway.stop)
    assert counts[200] + counts[429] == 800
    assert abs(counts[200] - limit) <= max(1, limit // 100), counts


async def test_a_second_copy_of_the_key_header_does_not_buy_a_fresh_budget(gateway_client, backend: Backend) -> None:
    """A policy keyed by `X-Api-Key`: a client sending junk first and its real key second must not spend the
    junk's fresh bucket while a backend reading the last copy serves the real key (as two Authorization
    headers are refused: a backend reading another copy would see what the gateway never checked)."""
    config = limited(backend.url, None, requests=1)
    config["policies"][0]["key"] = {"type": "header", "name": "X-Api-Key"}
    client = await gateway_client(config)
    statuses = [
        (await client.get("/a", headers=[("X-Api-Key", f"junk-{i}"), ("X-Api-Key", "real")])).status for i in range(3)
    ]
    assert statuses.count(200) <= 1, statuses
    assert len(backend.seen) <= 1
