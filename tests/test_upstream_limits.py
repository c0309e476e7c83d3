"""Limits and deadlines of an upstream cluster, through the real traffic app to real loopback backends:
connection and waiting limits (503 `upstream_overflow`), a deadline per attempt and per request that a
trickling backend cannot outlast, and HTTPS backends checked against a CA, by name, with a client
certificate."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from apigw.testkit import route
from apigw.testkit.backend import Backend, echo_app
from apigw.testkit.certs import write_self_signed
from apigw.testkit.raw import Handler, raw_server
from tests.conftest import access_lines, gateway_of


def overflow_count(client, service: str) -> float | None:
    return gateway_of(client).metrics.registry.get_sample_value(
        "gateway_backend_requests_total", {"backend_service": service, "status_code": "upstream_overflow"})


async def test_beyond_max_connections_and_max_pending_requests_get_503_at_once(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [
        {"name": "slow", "backend": {"service": "slow", "url": backend.url, "max_connections": 1, "max_pending": 1}},
    ]})
    first = asyncio.ensure_future(client.get("/slow?s=0.5"))
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(client.get("/slow?s=0.1"))  # waits for the first's connection
    await asyncio.sleep(0.1)
    started = time.monotonic()
    third = await client.get("/slow?s=0.1")
    assert third.status == 503 and time.monotonic() - started < 0.4  # refused at once, not queued
    assert (await third.json())["error"] == "backend slow has no connection free (max_connections and max_pending reached)"
    assert [(await first).status, (await second).status] == [200, 200]
    assert overflow_count(client, "slow") == 1
    assert [line["error_type"] for line in access_lines(client) if line["status_code"] == 503] == ["upstream_overflow"]
    breaker = gateway_of(client).metrics.registry.get_sample_value(
        "gateway_circuit_breaker_state", {"backend_service": "slow"})
    assert breaker == 0  # an overflow is the gateway's limit, not the backend's failure


async def test_a_waiting_request_gives_up_after_connect_timeout(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [{"name": "slow", "backend": {
        "service": "slow", "url": backend.url, "max_connections": 1, "max_pending": 5, "connect_timeout": "200ms"}}]})
    first = asyncio.ensure_future(client.get("/slow?s=1"))
    await asyncio.sleep(0.1)
    waiting = await client.get("/slow?s=0")
    assert waiting.status == 503 and (await waiting.json())["request_id"]
    assert (await first).status == 200
    assert (await client.get("/slow?s=0")).status == 200  # the connection is free again


def trickling(head_first: bool) -> Handler:
    """Sends one byte every 100 ms, until the gateway hangs up: its head first (then body bytes), or
    the head itself."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
        await reader.readuntil(b"\r\n\r\n")
        if head_first:
            writer.write(head)
            head = b""
        for byte in range(10_000):
            writer.write(head[byte:byte + 1] if byte < len(head) else b"x")
            await writer.drain()
            await asyncio.sleep(0.1)

    return answer


@pytest.mark.parametrize(("head_first", "status", "error_type"), [
    (False, 504, "backend_timeout"),  # trickling its head: a 504, as for a silent backend
    (True, 200, "backend_timeout"),   # trickling its body: the response is cut, never presented as whole
])
async def test_a_trickling_backend_cannot_outlast_the_attempt_deadline(
    gateway_client, head_first: bool, status: int, error_type: str
) -> None:
    async with raw_server(trickling(head_first)) as url:
        client = await gateway_client({"routes": [{"name": "drip", "backend": {
            "service": "drip", "url": url, "timeout": "5s", "attempt_timeout": "700ms"}}]})
        started = time.monotonic()
        resp = await client.get("/x")
        assert resp.status == status
        if status == 200:
            with pytest.raises(Exception):  # noqa: B017 - aiohttp's payload error when the gateway cuts the stream
                await resp.read()
        took = time.monotonic() - started
        for _ in range(50):
            if access_lines(client):
                break
            await asyncio.sleep(0.05)
    assert took < 4  # the idle timeout (5 s) never fires: every wait saw a byte
    assert access_lines(client)[-1]["error_type"] == error_type


async def test_retries_stop_at_the_request_deadline(gateway_client) -> None:
    calls = 0

    async def slow_503(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        while True:
            await reader.readuntil(b"\r\n\r\n")
            calls += 1
            await asyncio.sleep(0.3)
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async with raw_server(slow_503) as url:
        client = await gateway_client({"routes": [{"name": "flaky", "backend": {
            "service": "flaky", "url": url, "request_timeout": "800ms",
            "retries": {"max_retries": 10, "on_statuses": [503], "min_retries_per_second": 100}}}]})
        resp = await client.get("/x")
    assert resp.status in (503, 504)
    assert 2 <= calls <= 4  # ~0.3 s each within 0.8 s: never the 11 attempts max_retries allows


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("server", "server_key", "client", "client_key")}
    write_self_signed(files["server"], files["server_key"], name="users.internal")
    write_self_signed(files["client"], files["client_key"], name="gateway")
    return files


@contextlib.asynccontextmanager
async def https_backend(pki: dict[str, Path], require_client_cert: bool) -> AsyncIterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server"], pki["server_key"])
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki["client"])
    runner = web.AppRunner(echo_app("tls-echo"), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_an_https_backend_is_checked_by_ca_and_name_and_shown_a_client_certificate(
    gateway_client, pki: dict[str, Path]
) -> None:
    async with https_backend(pki, require_client_cert=True) as url:
        tls = {"ca_file": str(pki["server"]), "server_name": "users.internal",
               "cert_file": str(pki["client"]), "key_file": str(pki["client_key"])}
        client = await gateway_client({"routes": [
            {"name": "good", "match": {"path_prefix": "/good"}, "backend": {"service": "good", "url": url, "tls": tls}},
            {"name": "no-cert", "match": {"path_prefix": "/no-cert"},
             "backend": {"service": "no-cert", "url": url, "tls": {k: tls[k] for k in ("ca_file", "server_name")}}},
            {"name": "wrong-name", "match": {"path_prefix": "/wrong-name"},
             "backend": {"service": "wrong-name", "url": url, "tls": {**tls, "server_name": "orders.internal"}}},
            {"name": "system-cas", "match": {"path_prefix": "/system-cas"},
             "backend": {"service": "system-cas", "url": url}},
        ]})
        good = await client.get("/good/x")
        assert good.status == 200 and (await good.json())["server"] == "tls-echo"
        for path in ("/no-cert/x", "/wrong-name/x", "/system-cas/x"):
            resp = await client.get(path)
            assert resp.status == 502, path  # refused before any request went out


async def test_a_backend_certificate_refused_is_logged_with_why(
    gateway_client, pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A backend whose certificate is refused (expired here, or for another name) is a 502 like a backend
    that is down, and the logs must say it was its certificate, and why: else on-call, finding the
    backend's pods healthy and answering, has nothing to go on."""
    write_self_signed(pki["server"], pki["server_key"], days=-1, name="users.internal")
    async with https_backend(pki, require_client_cert=False) as url:
        tls = {"ca_file": str(pki["server"]), "server_name": "users.internal"}
        client = await gateway_client({"routes": [
            {"name": "expired", "backend": {"service": "users", "url": url, "tls": tls}}]})
        resp = await client.get("/x")
    assert resp.status == 502 and access_lines(client)[-1]["error_type"] == "backend_unreachable"
    refusals = [record for record in caplog.records if record.levelname == "WARNING" and "certificate" in record.getMessage()]
    assert refusals, [record.getMessage() for record in caplog.records]
    assert "users" in refusals[0].getMessage() and "certificate has expired" in refusals[0].getMessage()


async def test_renewed_backend_tls_files_are_loaded_without_a_config_change(
    aiohttp_client, traffic_server, pki: dict[str, Path], tmp_path: Path
) -> None:
    """cert-manager renews a backend's CA bundle and the gateway's client certificate in their Secret volume,
    and nothing else changes: the files are watched as the listener's are, or the gateway keeps the old ones
    until some config change (an outage, once the old client certificate expires)."""
    import yaml

    from apigw.config.loader import load_config
    from apigw.observability.metrics import Metrics
    from apigw.pipeline.state import Gateway
    from apigw.server.reload import Reloader

    ca_file = tmp_path / "ca.pem"
    write_self_signed(ca_file, tmp_path / "other.key", name="users.internal")  # not the backend's certificate
    async with https_backend(pki, require_client_cert=False) as url:
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump({"routes": [{"name": "users", "backend": {
            "service": "users", "url": url, "tls": {"ca_file": str(ca_file), "server_name": "users.internal"}}}]}))
        gateway = Gateway.create(load_config(path), Metrics())
        client = await aiohttp_client(await traffic_server(gateway))
        reloader = Reloader(gateway, path, None, None, interval=0.1)
        watch = asyncio.create_task(reloader.watch())
        try:
            assert (await client.get("/x")).status == 502
            ca_file.write_bytes(pki["server"].read_bytes())  # the renewed bundle
            deadline = time.monotonic() + 10  # the settle time of a file written in place, and then some
            while (status := (await client.get("/x")).status) != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert status == 200
        finally:
            watch.cancel()
            await reloader.close()


async def test_unusable_tls_files_are_a_located_config_error(tmp_path: Path, pki: dict[str, Path]) -> None:
    import yaml

    from apigw.config.errors import ConfigError
    from apigw.config.loader import parse_documents
    from apigw.observability.metrics import Metrics
    from apigw.pipeline.state import Gateway

    config = {"routes": [route("a", "https://users.internal:8443")]}
    config["routes"][0]["backend"]["tls"] = {"ca_file": str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigError) as caught:
        Gateway.create(parse_documents({"config.yaml": yaml.safe_dump(config)}), Metrics())
    assert caught.value.errors[0].startswith("routes[0].backend.tls: cannot use the TLS files:")


def configmap_volume(directory: Path, people: list[dict], tenants: list[dict], shard: list[dict] | None = None) -> Path:
    """The gateway's config directory: `people`'s routes in config.yaml, the operator's in routes.yaml, and
    `shard` (if any) in the shard file routes.yaml names. The backends listen on 127.0.0.1: config.yaml lets
    the operator's routes reach loopback."""
    import yaml

    from apigw.config.model import shard_hash
    from apigw.testkit import loopback_allowed

    directory.mkdir(exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"routes": people}) + yaml.safe_dump({"ownership": loopback_allowed()}))
    routes: dict = {"routes": tenants}
    if shard is not None:
        text = yaml.safe_dump({"routes": shard})
        (directory / "routes-001.yaml").write_text(text)
        routes["shards"] = {"routes-001.yaml": shard_hash(text)}
    (directory / "routes.yaml").write_text(yaml.safe_dump(routes))
    return directory


def tls_route(name: str, url: str, ca_file: Path) -> dict:
    return {"name": name, "match": {"path_prefix": f"/{name}"},
            "backend": {"service": name, "url": url, "tls": {"ca_file": str(ca_file), "server_name": "users.internal"}}}


@pytest.mark.parametrize("where", ["routes.yaml", "routes-001.yaml"])
async def test_an_operator_routes_backend_whose_tls_files_cannot_be_used_is_held_unavailable(
    aiohttp_client, traffic_server, pki: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """routes.yaml is rendered from tenants' CRs: one naming a CA file the pods do not have must not make the
    pods refuse the whole config (every other tenant's change would wait for it). The rest loads; that backend
    answers 503 `backend_tls_unusable`, logged at load with its route, file and why, and listed by health."""
    from apigw.config.loader import load_config
    from apigw.observability.logs import AccessLog
    from apigw.observability.metrics import Metrics
    from apigw.pipeline.state import Gateway
    from apigw.server.health import details

    missing = tmp_path / "missing-ca.pem"
    async with https_backend(pki, require_client_cert=False) as url:
        good, broken = tls_route("good", url, pki["server"]), tls_route("broken", url, missing)
        tenants, shard = ([good, broken], None) if where == "routes.yaml" else ([good], [broken])
        volume = configmap_volume(tmp_path / "volume", [], tenants, shard)
        with caplog.at_level("ERROR"):
            gateway = Gateway.create(load_config(volume), Metrics())
        gateway.access_log = AccessLog(io.StringIO())
        client = await aiohttp_client(await traffic_server(gateway))
        ok = await client.get("/good/x")
        assert ok.status == 200 and (await ok.json())["server"] == "tls-echo"
        held = await client.get("/broken/x")
        assert held.status == 503
        body = await held.json()
        assert body["error"] == "backend broken is unavailable: the gateway cannot use its TLS files"
        assert str(missing) not in body["error"]  # the file's place is for the logs, not for clients
        assert access_lines(client)[-1]["error_type"] == "backend_tls_unusable"
    [listed] = details(gateway)["unavailable_backends"]
    assert listed["backend_service"] == "broken" and listed["routes"] == ["broken"]
    assert listed["error"] == f"cannot use the TLS files: ca_file {missing}: No such file or directory"
    assert details(gateway)["status"] == "ready" and details(gateway)["last_reload_error"] is None
    [logged] = [r for r in caplog.records if r.levelname == "ERROR" and "broken" in r.getMessage()]
    assert str(missing) in logged.getMessage() and "No such file or directory" in logged.getMessage()
    assert "backend_tls_unusable" in logged.getMessage()


def test_a_backend_that_config_yaml_uses_still_fails_the_whole_load(tmp_path: Path, pki: dict[str, Path]) -> None:
    """config.yaml is people's: its backends keep the all-or-nothing rule (a mistake there is caught at once,
    as before), also when routes.yaml's routes share the backend."""
    from apigw.config.errors import ConfigError
    from apigw.config.loader import load_config
    from apigw.upstream.cluster import cluster_settings

    broken = tls_route("broken", "https://users.internal:8443", tmp_path / "missing-ca.pem")
    sharing = {**broken, "name": "tenant", "match": {"path_prefix": "/tenant"}}
    for people, tenants in (([broken], []), ([broken], [sharing])):
        with pytest.raises(ConfigError) as caught:
            cluster_settings(load_config(configmap_volume(tmp_path / f"v{len(tenants)}", people, tenants)))
        assert "missing-ca.pem" in caught.value.errors[0]


def test_validate_config_still_fails_on_an_operator_routes_unusable_tls_file(tmp_path: Path) -> None:
    """`gateway -validate-config` is a check tool: whoever owns the file, an unusable one is an error, each
    at the line of its route's `backend.tls`, all in one run."""
    import subprocess
    import sys

    people = [tls_route("mine", "https://m:8443", tmp_path / "mine.pem")]
    tenants = [tls_route("broken", "https://b:8443", tmp_path / "missing.pem")]
    volume = configmap_volume(tmp_path / "volume", people, tenants)
    result = subprocess.run([sys.executable, "-m", "apigw", "-validate-config", "--config", str(volume)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stdout
    unusable = "routes[0].backend.tls: cannot use the TLS files: ca_file"
    assert result.stderr.splitlines() == [
        f"{volume}/: 2 error(s)",
        f"  {volume}/config.yaml:5: {unusable} {tmp_path}/mine.pem: No such file or directory",
        f"  {volume}/routes.yaml:5: {unusable} {tmp_path}/missing.pem: No such file or directory",
    ]
