"""JWT auth through the gateway: status codes, headers, forwarded claims, logs, rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_sync
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apigw.testkit.backend import Backend
from apigw.testkit.process import BackendProcess, GatewayProcess, http_status, json_answer, ports, wait_until
from apigw.testkit.redis import RedisServer
from apigw.testkit.tokens import SigningKey
from tests.conftest import access_lines, gateway_of
from tests.test_auth import JSON_VALUES


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
    await assert_refused(client, backend, resp, error_type)


async def assert_refused(client, backend, resp, error_type: str) -> None:
    """A 401 of the gateway's own: JSON body, Bearer challenge, not forwarded, logged and counted by cause."""
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert set(await resp.json()) == {"error", "request_id"}
    assert backend.seen == []
    line = access_lines(client)[-1]
    assert "auth_status=failure" in line["msg"]
    assert line["auth_status"] == "failure"
    assert line["error_type"] == error_type
    value = gateway_of(client).metrics.registry.get_sample_value
    assert value("gateway_auth_attempts_total", {"result": "failure", "error_type": error_type}) == 1


BAD_TOKENS = {
    "no exp (required by default)": (lambda key: key.token(ttl=None, scope="users:read"), "missing_claim"),
    "crit header": (lambda key: key.signed({"exp": _soon(), "scope": "users:read"}, {"crit": ["exp"]}), "malformed"),
    "crit b64 (PyJWT understands it, the gateway does not)": (
        lambda key: key.signed({"exp": _soon(), "scope": "users:read"}, {"crit": ["b64"], "b64": True}), "malformed"),
    "jti a number": (lambda key: key.signed({"exp": _soon(), "jti": 7, "scope": "users:read"}), "malformed"),
    "sub a list": (lambda key: key.signed({"exp": _soon(), "sub": ["alice"], "scope": "users:read"}), "malformed"),
    "iss a number": (lambda key: key.signed({"exp": _soon(), "iss": 1, "scope": "users:read"}), "malformed"),
    "exp a string": (lambda key: key.signed({"exp": str(_soon()), "scope": "users:read"}), "malformed"),
    "exp a boolean": (lambda key: key.signed({"exp": True, "scope": "users:read"}), "malformed"),
    "iat null": (lambda key: key.signed({"exp": _soon(), "iat": None, "scope": "users:read"}), "malformed"),
    "aud a number": (lambda key: key.signed({"exp": _soon(), "aud": 5, "scope": "users:read"}), "malformed"),
    "scope a number": (lambda key: key.signed({"exp": _soon(), "scope": 1}), "malformed"),
    "scope a list with a number": (lambda key: key.signed({"exp": _soon(), "scope": ["users:read", 1]}), "malformed"),
    "forwarded sub with CR LF": (
        lambda key: key.token(sub="alice\r\nX-Admin: true", scope="users:read"), "malformed"),
    "forwarded sub with a NUL": (lambda key: key.token(sub="alice\x00", scope="users:read"), "malformed"),
}


def _soon() -> int:
    return int(time.time()) + 300


@pytest.mark.parametrize("case", BAD_TOKENS)
async def test_tokens_lacking_a_required_claim_or_with_crit_or_mistyped_claims_are_401(
    gateway_client, backend, key, tmp_path, case
) -> None:
    make, error_type = BAD_TOKENS[case]
    client = await gateway_client(auth_config(tmp_path, backend.url))
    resp = await client.get("/users/1", headers={"Authorization": f"Bearer {make(key)}"})
    await assert_refused(client, backend, resp, error_type)
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_required_claims_set_in_the_config(gateway_client, backend, key, tmp_path) -> None:
    client = await gateway_client(auth_config(tmp_path, backend.url, required_claims=["sub", "tenant"]))
    without_exp = key.token(ttl=None, tenant="t1", scope="users:read")
    assert (await client.get("/users/1", headers={"Authorization": f"Bearer {without_exp}"})).status == 200
    resp = await client.get("/users/1", headers={"Authorization": f"Bearer {key.token(scope='users:read')}"})
    assert resp.headers["WWW-Authenticate"] == (
        'Bearer error="invalid_token", error_description="the token lacks the required claim tenant"')
    backend.seen.clear()
    await assert_refused(client, backend, resp, "missing_claim")


async def test_forwarded_claims_reach_the_backend_as_exact_printable_bytes(gateway_client, key, tmp_path) -> None:
    """A backend reading raw bytes: each forwarded claim is one header line of printable ASCII (JSON for
    what is not plain ASCII text), and a client's own copy of the header is gone."""
    async with RecordingBackend() as recorder:
        config = auth_config(tmp_path, recorder.url)
        config["auth"]["forward_claims"] |= {"name": "X-Name", "roles": "X-Roles"}
        client = await gateway_client(config)
        token = key.token(sub="alice", name="Zoë \"the\" admin", roles=["a", "b\\c"], scope="users:read")
        resp = await client.get("/users/1", headers={"Authorization": f"Bearer {token}", "X-Name": "forged"})
        assert resp.status == 200
    [request] = recorder.requests
    lines = request.split(b"\r\n")
    for name, value in [(b"x-user-id", b"alice"), (b"x-name", rb'"Zo\u00eb \"the\" admin"'), (b"x-roles", rb'["a","b\\c"]')]:
        assert [line for line in lines if line.lower().startswith(name + b":")] == [name.title() + b": " + value]
    assert all(0x20 <= byte < 0x7F for line in lines for byte in line)


class RecordingBackend:
    """A backend on a raw socket: records each request's head as received, answers 200."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append((await reader.readuntil(b"\r\n\r\n"))[:-4])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> RecordingBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


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
    from apigw.config.loader import parse_documents
    from apigw.pipeline.state import build_state

    config = auth_config(tmp_path, backend.url)
    client = await gateway_client(config)
    gateway = gateway_of(client)
    token = key.token(scope="users:read")
    assert (await client.get("/users/1", headers={"Authorization": f"Bearer {token}"})).status == 200
    misses = gateway.state.auth.cache.misses
    config["routes"].append({"name": "more", "match": {"path": "/more"}, "backend": {"service": "users", "url": backend.url}})
    gateway.state = build_state(parse_documents({"config.yaml": yaml.safe_dump(config)}), gateway.shared)
    assert (await client.get("/users/1", headers={"Authorization": f"Bearer {token}"})).status == 200
    assert gateway.state.auth.cache.misses == misses


async def _raw_exchanges(port: int, requests: list[bytes]) -> list[bytes]:
    """Each request in turn on one keep-alive connection; each response read whole (by Content-Length)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    responses = []
    try:
        async with asyncio.timeout(10):
            for request in requests:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                responses.append(head + await reader.readexactly(length))
    finally:
        writer.close()
        await writer.wait_closed()
    return responses


async def test_a_flood_of_one_forged_token_is_verified_once(gateway_client, backend, key, tmp_path) -> None:
    """Exact bytes on one connection: the same forged token 20 times, each a 401 bad_signature, counted and
    logged every time, never forwarded; its signature checked only the first time."""
    client = await gateway_client(auth_config(tmp_path, backend.url))
    header, payload, _ = key.token(scope="users:read").split(".")
    forged = f"{header}.{payload}.{key.token().split('.')[2]}"
    request = f"GET /users/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {forged}\r\n\r\n".encode()
    responses = await _raw_exchanges(client.server.port, [request] * 20)
    assert [response.split(b" ", 2)[1] for response in responses] == [b"401"] * 20
    assert all(b'error="invalid_token", error_description="the token\'s signature is invalid"' in r for r in responses)
    assert backend.seen == []
    auth = gateway_of(client).state.auth
    assert (auth.refused.misses, auth.refused.hits) == (1, 19)
    value = gateway_of(client).metrics.registry.get_sample_value
    assert value("gateway_auth_attempts_total", {"result": "failure", "error_type": "bad_signature"}) == 20
    assert [line["error_type"] for line in access_lines(client)] == ["bad_signature"] * 20


@pytest.mark.parametrize("token", [
    b"\xff\xfe.\xe9.AA", "é".encode() * 3, b"a.b.c\x80", b"e30.e30.\xc3\xa9",
], ids=["bytes not UTF-8", "UTF-8", "a high byte at the end", "a UTF-8 signature"])
async def test_a_token_of_non_ascii_bytes_is_401_malformed(gateway_client, backend, key, tmp_path, token) -> None:
    client = await gateway_client(auth_config(tmp_path, backend.url))
    request = b"GET /users/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    [response] = await _raw_exchanges(client.server.port, [request])
    assert response.split(b" ", 2)[1] == b"401", response
    assert backend.seen == []
    assert access_lines(client)[-1]["error_type"] == "malformed"


@pytest.mark.parametrize("second", ["Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.", "{good}"], ids=["forged", "same"])
async def test_two_authorization_headers_are_401_and_never_reach_the_backend(gateway_client, backend, key, tmp_path, second) -> None:
    """Exact bytes: a valid token followed by a second Authorization header. The gateway checked the first;
    a backend reading the last (or joining them) would see the other, so neither is forwarded."""
    client = await gateway_client(auth_config(tmp_path, backend.url))
    good = f"Bearer {key.token(scope='users:read')}"
    request = (f"GET /users/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: {good}\r\n"
               f"Authorization: {second.format(good=good)}\r\n\r\n").encode()
    [response] = await _raw_exchanges(client.server.port, [request])
    assert response.split(b" ", 2)[1] == b"401", response
    assert b'error_description="more than one Authorization header"' in response
    assert backend.seen == []
    assert access_lines(client)[-1]["error_type"] == "malformed"


async def test_revocation_and_rate_limit_share_one_redis_round_trip(
    gateway_client, backend, key, tmp_path, redis_server: RedisServer
) -> None:
    config = auth_config(tmp_path, backend.url)
    config.update(redis={"url": redis_server.url}, policies=[{"name": "p", "requests": 2, "period": "1h"}])
    config["routes"][0]["ratelimit"] = "p"
    client = await gateway_client(config)
    batch = gateway_of(client).shared.redis
    headers = {"Authorization": f"Bearer {key.token(jti='t-2', scope='users:read')}"}
    statuses = []
    for expected_trips in (1, 2, 3):
        statuses.append((await client.get("/users/1", headers=headers)).status)
        assert batch.round_trips == expected_trips
    assert statuses == [200, 200, 429]
    redis_sync.Redis.from_url(redis_server.url).set("revoked:t-2", 1, ex=300)
    assert (await client.get("/users/1", headers=headers)).status == 401  # revoked wins over limited


def _audience_warnings(gateway: GatewayProcess) -> list[dict]:
    return [line for line in gateway.log_lines() if line["msg"].startswith("auth.audience is not set")]


def test_keys_without_an_audience_are_warned_about_at_start_and_on_a_reload_that_changes_auth(tmp_path: Path) -> None:
    key = SigningKey("ec")
    key.write_public_pem(tmp_path / "jwt-public-key.pem")
    port, metrics_port = ports()
    path = tmp_path / "gw.yaml"
    config = auth_config(tmp_path, "http://127.0.0.1:9")
    config["listen"] = {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port}
    path.write_text(yaml.safe_dump(config))

    def reload(change: Callable[[dict], None]) -> None:
        before = gateway.ready()["config_hash"]
        change(config)
        path.write_text(yaml.safe_dump(config))
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: gateway.ready()["config_hash"] != before, what="reload")

    token = key.token(scope="users:read")
    with GatewayProcess(path, port, metrics_port) as gateway:
        [warning] = _audience_warnings(gateway)
        assert (warning["level"], warning["logger"]) == ("warning", "apigw.auth")
        assert "error" not in json.dumps(warning).lower()  # not picked up by the runbook's `grep -i error`
        reload(lambda c: c["routes"].append({"name": "more", "backend": {"service": "more", "url": "http://127.0.0.1:9"},
                                              "match": {"path": "/more"}}))
        assert len(_audience_warnings(gateway)) == 1  # routes changed, auth did not: no repeat
        reload(lambda c: c["auth"].update(audience="users-api"))
        reload(lambda c: c["routes"].pop())
        assert len(_audience_warnings(gateway)) == 1
        reload(lambda c: c["auth"].pop("audience"))
        # within 10 s of the first, flood control holds it back until the interval ends, then writes it
        wait_until(lambda: len(_audience_warnings(gateway)) == 2, timeout=20, what="the second warning")
        assert _audience_warnings(gateway)[1].get("repeated") == 1
        assert http_status(f"{gateway.url}/users/1", {"Authorization": f"Bearer {token}"}) == 502  # no backend on :9
        wait_until(lambda: any(line.get("status_code") == 502 for line in gateway.log_lines()), what="access line")
        assert token not in gateway.log_text()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SigningKey]]:
    """A real gateway process (auth, forwarding `sub` and `name`) before a real echo backend process."""
    tmp_path = tmp_path_factory.mktemp("served")
    key = SigningKey("ed25519")
    key.write_public_pem(tmp_path / "jwt-public-key.pem")
    port, metrics_port = ports()
    with BackendProcess() as backend:
        config = auth_config(tmp_path, backend.url)
        config["auth"]["forward_claims"] |= {"name": "X-Name"}
        config["listen"] = {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port}
        (tmp_path / "gw.yaml").write_text(yaml.safe_dump(config))
        with GatewayProcess(tmp_path / "gw.yaml", port, metrics_port) as gateway:
            yield gateway.url, key


def _get(url: str, token: str) -> tuple[int, dict]:
    return json_answer(url, {"Authorization": f"Bearer {token}"})


REGISTERED = ("iss", "sub", "jti", "exp", "nbf", "iat", "aud", "scope", "scp", "name")


@given(claims=st.dictionaries(st.sampled_from(REGISTERED), JSON_VALUES, max_size=4))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_claims_get_a_200_or_a_401_and_forward_only_printable_ascii(served, claims) -> None:
    """Through a real gateway process: whatever a signed token claims, the answer is a 200 or the gateway's own
    401 (never a 500), and on a 200 the forwarded headers the backend got are printable ASCII."""
    url, key = served
    payload = {"exp": int(time.time()) + 300, "scope": "users:read", **claims}
    status, body = _get(f"{url}/users/1", key.signed(payload))
    assert status in (200, 401, 403), body
    if status == 200:
        for header in ("X-User-Id", "X-Name"):
            value = body["headers"].get(header, "")
            assert value.isascii() and value.isprintable(), value
    else:
        assert set(body) == {"error", "request_id"}


@pytest.mark.parametrize(("mode", "status"), [("fail_open", 200), ("fail_closed", 503)])
def test_redis_down_for_revocation_checks_is_logged_once_per_kind(tmp_path: Path, key: SigningKey, mode: str,
                                                                 status: int) -> None:
    """A real gateway whose only use of Redis is the revocation check: when Redis goes down, on-call sees it
    in the log ("Increased error logs about Redis"), not only in gateway_redis_errors_total: one error line
    saying what failed and what `failure_mode` did, the repeats counted rather than written, no token."""
    port, metrics_port = ports()
    with RedisServer() as redis_server, BackendProcess() as backend:
        config = auth_config(tmp_path, backend.url, revocation={"failure_mode": mode})
        config.update(redis={"url": redis_server.url, "timeout": "500ms"},
                      listen={"address": "127.0.0.1", "port": port, "metrics_port": metrics_port})
        (tmp_path / "gw.yaml").write_text(yaml.safe_dump(config))
        with GatewayProcess(tmp_path / "gw.yaml", port, metrics_port) as gateway:
            token = key.token(scope="users:read", jti="jti-secret-1")
            headers = {"Authorization": f"Bearer {token}"}
            assert http_status(f"{gateway.url}/users/1", headers) == 200
            redis_server.stop()
            assert [http_status(f"{gateway.url}/users/1", headers) for _ in range(5)] == [status] * 5
            wait_until(lambda: "gateway_redis_errors_total{operation=\"revocation\"} 5.0" in gateway.metrics(),
                       what="five revocation errors counted")
            def redis_errors() -> list[dict]:
                return [line for line in gateway.log_lines() if line["level"] == "error" and "Redis" in line["msg"]]

            wait_until(lambda: len([line for line in gateway.log_lines() if line["logger"] == "apigw.access"]) == 6,
                       timeout=5, what="the six requests' access lines")
            wait_until(redis_errors, timeout=5, what="an error line about Redis")
            [error] = redis_errors()
            assert "revocation" in error["msg"] and error["failure_mode"] == mode and error["error"], error
            # The runbook's "Check auth error types" still counts the requests' error types only.
            auth_errors = [line for line in gateway.log_text().splitlines() if re.search("auth.*error", line, re.IGNORECASE)]
            assert [json.loads(line).get("error_type") for line in auth_errors] == (
                ["revocation_unavailable"] * 5 if mode == "fail_closed" else [])
            assert token not in gateway.log_text() and "jti-secret-1" not in gateway.log_text()
