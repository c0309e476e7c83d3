"""JWT auth through the gateway: status codes, headers, forwarded claims, logs, rotation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import redis as redis_sync
import yaml

from apigw.state import GATEWAY
from apigw.testkit.backend import Backend
from apigw.testkit.process import GatewayProcess, http_status, ports
from apigw.testkit.redis import RedisServer
from apigw.testkit.tokens import SigningKey
from tests.conftest import access_lines


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    signing = SigningKey("rsa")
    signing.write_public_pem(tmp_path / "jwt-public-key.pem")
    return signing


def auth_config(tmp_path: Path, url: str, **extra: object) -> dict:
    return {
        "auth": {"keys": [{"file": str(tmp_path / "jwt-public-key.pem")}],
                 "forward_claims": {"sub": "X-User-Id"}, **extra},
        "routes": [
            {"name": "users", "match": {"path_prefix": "/users"}, "backend": {"service": "users", "url": url},
             "auth": {"scopes": ["users:read"]}},
            {"name": "public", "backend": {"service": "users", "url": url}},
        ],
    }


async def test_valid_token_is_forwarded_with_claims_and_no_spoofing(gateway_client, backend, key, tmp_path) -> None:
    client = await gateway_client(auth_config(tmp_path, backend.url))
    token = key.token(sub="alice", scope="users:read other")
    resp = await client.get("/users/1", headers={"Authorization": f"Bearer {token}", "X-User-Id": "mallory"})
    assert resp.status == 200
    sent = (await resp.json())["headers"]
    assert sent["X-User-Id"] == "alice"
    assert sent["Authorization"] == f"Bearer {token}"
    public = await client.get("/other", headers={"X-User-Id": "mallory"})
    assert "X-User-Id" not in (await public.json())["headers"]


@pytest.mark.parametrize("header, error_type", [
    (None, "missing_token"),
    ("Basic dXNlcjpwYXNz", "malformed"),
    ("Bearer not.a.jwt", "malformed"),
])
async def test_bad_credentials_are_401(gateway_client, backend, key, tmp_path, header, error_type) -> None:
    client = await gateway_client(auth_config(tmp_path, backend.url))
    resp = await client.get("/users/1", headers={"Authorization": header} if header else {})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert set(await resp.json()) == {"error", "request_id"}
    assert backend.seen == []
    line = access_lines(client)[-1]
    assert "auth_status=failure" in line["msg"]
    assert line["auth_status"] == "failure"
    assert line["error_type"] == error_type
    value = client.app[GATEWAY].metrics.registry.get_sample_value
    assert value("gateway_auth_attempts_total", {"result": "failure", "error_type": error_type}) == 1


async def test_expired_token_and_missing_scope(gateway_client, backend, key, tmp_path) -> None:
    client = await gateway_client(auth_config(tmp_path, backend.url))
    expired = await client.get("/users/1", headers={"Authorization": f"Bearer {key.token(ttl=-120, scope='users:read')}"})
    assert expired.status == 401
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
    no_scope = await client.get("/users/1", headers={"Authorization": f"Bearer {key.token(scope='other')}"})
    assert no_scope.status == 403
    assert "insufficient_scope" in no_scope.headers["WWW-Authenticate"]


async def test_token_never_reaches_the_logs(gateway_client, backend, key, tmp_path, caplog) -> None:
    client = await gateway_client(auth_config(tmp_path, backend.url))
    caplog.set_level(logging.DEBUG)
    good = key.token(scope="users:read")
    bad = key.token(ttl=-100)
    await client.get("/users/1", headers={"Authorization": f"Bearer {good}"})
    await client.get("/users/1?access_token=secret123", headers={"Authorization": f"Bearer {bad}"})
    text = "\n".join(r.getMessage() + json.dumps(getattr(r, "fields", {}), default=str) for r in caplog.records)
    text += json.dumps(access_lines(client))
    assert "/users/1" in text
    for secret in (good, bad, good.split(".")[2], "secret123"):
        assert secret not in text


async def test_revoked_token_is_rejected(gateway_client, backend, key, tmp_path, redis_server: RedisServer) -> None:
    config = auth_config(tmp_path, backend.url)
    config["redis"] = {"url": redis_server.url}
    client = await gateway_client(config)
    token = key.token(jti="t-1", scope="users:read")
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/users/1", headers=headers)).status == 200
    redis_sync.Redis.from_url(redis_server.url).set("revoked:t-1", 1, ex=300)
    resp = await client.get("/users/1", headers=headers)
    assert resp.status == 401
    assert "revoked" in resp.headers["WWW-Authenticate"]


def test_key_rotation_by_replacing_the_secret_file(tmp_path: Path) -> None:
    """The runbook's `kubectl create secret ... jwt-public-key.pem` rotation: no restart needed."""
    import asyncio

    old, new = SigningKey("rsa"), SigningKey("ec")
    key_file = tmp_path / "jwt-public-key.pem"
    old.write_public_pem(key_file)
    port, metrics_port = ports()

    async def scenario() -> None:
        async with Backend() as backend:
            config = auth_config(tmp_path, backend.url)
            config["listen"] = {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port}
            (tmp_path / "gw.yaml").write_text(yaml.safe_dump(config))
            with GatewayProcess(tmp_path / "gw.yaml", port, metrics_port) as gateway:
                assert await asyncio.to_thread(_status_with, gateway.url, new.token(scope="users:read")) == 401
                staged = tmp_path / "new.pem"
                staged.write_bytes(new.public_pem)
                staged.rename(key_file)
                for _ in range(100):
                    if await asyncio.to_thread(_status_with, gateway.url, new.token(scope="users:read")) == 200:
                        break
                    await asyncio.sleep(0.1)
                assert await asyncio.to_thread(_status_with, gateway.url, new.token(scope="users:read")) == 200
                assert await asyncio.to_thread(_status_with, gateway.url, old.token(scope="users:read")) == 401

    asyncio.run(scenario())


def _status_with(base: str, token: str) -> int:
    return http_status(f"{base}/users/1", {"Authorization": f"Bearer {token}"})


async def test_verified_tokens_stay_cached_across_a_reload_of_routes(gateway_client, backend, key, tmp_path) -> None:
    """An operator routes.yaml update must not send every client back through signature checks."""
    from apigw.loader import parse_documents
    from apigw.state import build_state

    config = auth_config(tmp_path, backend.url)
    client = await gateway_client(config)
    gateway = client.app[GATEWAY]
    token = key.token(scope="users:read")
    assert (await client.get("/users/1", headers={"Authorization": f"Bearer {token}"})).status == 200
    misses = gateway.state.auth.cache.misses
    config["routes"].append({"name": "more", "match": {"path": "/more"}, "backend": {"service": "users", "url": backend.url}})
    gateway.state = build_state(parse_documents({"config.yaml": yaml.safe_dump(config)}), gateway.shared)
    assert (await client.get("/users/1", headers={"Authorization": f"Bearer {token}"})).status == 200
    assert gateway.state.auth.cache.misses == misses


async def test_revocation_and_rate_limit_share_one_redis_round_trip(
    gateway_client, backend, key, tmp_path, redis_server: RedisServer
) -> None:
    config = auth_config(tmp_path, backend.url)
    config.update(redis={"url": redis_server.url}, policies=[{"name": "p", "requests": 2, "period": "1h"}])
    config["routes"][0]["ratelimit"] = "p"
    client = await gateway_client(config)
    batch = client.app[GATEWAY].shared.redis
    headers = {"Authorization": f"Bearer {key.token(jti='t-2', scope='users:read')}"}
    statuses = []
    for expected_trips in (1, 2, 3):
        statuses.append((await client.get("/users/1", headers=headers)).status)
        assert batch.round_trips == expected_trips
    assert statuses == [200, 200, 429]
    redis_sync.Redis.from_url(redis_server.url).set("revoked:t-2", 1, ex=300)
    assert (await client.get("/users/1", headers=headers)).status == 401  # revoked wins over limited
