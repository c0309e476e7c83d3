"""Breakers and retries through the gateway, with real backends that fail, die and come back."""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
import yaml

from apigw.testkit.backend import Backend
from apigw.testkit.process import (
    BackendProcess,
    GatewayProcess,
    http_status,
    ports,
    wait_until,
)
from apigw.testkit.redis import free_port
from tests.conftest import access_lines, gateway_of


def breaker_config(url: str, **backend: object) -> dict:
    return {
        "circuit_breaker": {"consecutive_failures": 3, "open_duration": "500ms"},
        "routes": [{"name": "users", "backend": {"service": "users", "url": url, "timeout": "300ms", **backend}}],
    }


def state_of(client, service: str = "users") -> float | None:
    metrics = gateway_of(client).metrics
    return metrics.registry.get_sample_value("gateway_circuit_breaker_state", {"backend_service": service})


async def test_breaker_opens_fails_fast_then_probes_and_closes(gateway_client, backend: Backend) -> None:
    client = await gateway_client(breaker_config(backend.url, retries={"max_retries": 0}))
    for _ in range(3):
        assert (await client.get("/status/503")).status == 503
    assert state_of(client) == 1
    seen = len(backend.seen)
    resp = await client.get("/anything")
    assert resp.status == 503
    assert (await resp.json())["error"] == "backend users is unavailable (circuit open)"
    assert int(resp.headers["Retry-After"]) >= 1
    assert len(backend.seen) == seen  # failed fast: the backend never saw it
    await asyncio.sleep(0.6)
    assert (await client.get("/fine")).status == 200  # the probe
    assert state_of(client) == 0


async def test_timeouts_count_as_failures(gateway_client, backend: Backend) -> None:
    client = await gateway_client(breaker_config(backend.url, retries={"max_retries": 0}))
    for _ in range(3):
        assert (await client.get("/hang")).status == 504
    assert state_of(client) == 1
    assert (await client.get("/fine")).status == 503


async def test_a_backend_failing_inside_every_body_opens_the_breaker(gateway_client, backend: Backend) -> None:
    """200 headers, then the backend dies: that answer is a failure of the backend's (its head is not its
    outcome), and a half-open probe is judged by its whole answer too."""
    client = await gateway_client(breaker_config(backend.url, retries={"max_retries": 0}))

    async def cut_download() -> None:
        resp = await client.get("/truncated")  # 200 streamed, then the backend closes: the client's connection is cut
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()

    assert (await client.get("/short")).status == 502  # a small body, read whole: a JSON 502
    await cut_download()
    assert state_of(client) == 0
    await cut_download()
    assert state_of(client) == 1
    seen = len(backend.seen)
    resp = await client.get("/anything")
    assert resp.status == 503
    assert (await resp.json())["error"] == "backend users is unavailable (circuit open)"
    assert len(backend.seen) == seen  # failed fast: the backend never saw it
    await asyncio.sleep(0.6)
    await cut_download()  # the probe
    assert state_of(client) == 1  # open again: its 200 head did not close it
    assert (await client.get("/anything")).status == 503


async def test_clients_leaving_mid_download_neither_open_the_breaker_nor_close_it(
    gateway_client, backend: Backend
) -> None:
    """A client that goes away inside a body says nothing about the backend, closed or half-open."""
    client = await gateway_client(breaker_config(backend.url, retries={"max_retries": 0}))

    async def leave_mid_download(done: int) -> None:
        resp = await client.get("/bytes/50000000")
        assert resp.status == 200
        await resp.content.read(65536)
        resp.close()
        for _ in range(100):
            if len(access_lines(client)) == done:
                break
            await asyncio.sleep(0.05)
        assert access_lines(client)[-1]["error_type"] == "client_disconnected"

    for done in range(1, 5):  # more than consecutive_failures
        await leave_mid_download(done)
    assert state_of(client) == 0
    for _ in range(3):
        assert (await client.get("/status/503")).status == 503
    assert state_of(client) == 1
    await asyncio.sleep(0.6)
    await leave_mid_download(8)  # the probe's client leaves: no verdict, the breaker waits for another probe
    assert state_of(client) == 2
    assert (await client.get("/fine")).status == 200
    assert state_of(client) == 0


async def test_retry_on_configured_status_hides_one_failure(gateway_client, backend: Backend) -> None:
    client = await gateway_client(breaker_config(backend.url, retries={"max_retries": 1, "on_statuses": [503]}))
    resp = await client.get("/flaky/a/1")
    assert resp.status == 200
    assert (await resp.json())["call"] == 2
    value = gateway_of(client).metrics.registry.get_sample_value
    assert value("gateway_backend_requests_total", {"backend_service": "users", "status_code": "503"}) == 1
    assert value("gateway_backend_requests_total", {"backend_service": "users", "status_code": "200"}) == 1


async def test_non_idempotent_requests_are_not_retried(gateway_client, backend: Backend) -> None:
    client = await gateway_client(breaker_config(backend.url, retries={"max_retries": 1, "on_statuses": [503]}))
    assert (await client.post("/flaky/b/1")).status == 503


async def test_breaker_survives_reload_for_unchanged_backend(gateway_client, backend: Backend) -> None:
    from apigw.config.loader import parse_documents
    from apigw.pipeline.state import build_state

    config = breaker_config(backend.url, retries={"max_retries": 0})
    client = await gateway_client(config)
    for _ in range(3):
        await client.get("/status/503")
    assert state_of(client) == 1
    gateway = gateway_of(client)
    config["routes"].append({"name": "other", "match": {"path_prefix": "/other"},
                             "backend": {"service": "other", "url": backend.url}})
    gateway.state = build_state(parse_documents({"config.yaml": yaml.safe_dump(config)}), gateway.shared)
    assert (await client.get("/x")).status == 503  # still open after the reload
    assert (await client.get("/other/x")).status == 200


def test_backend_process_killed_then_back(tmp_path: Path) -> None:
    """A real backend process dies (502s open the breaker, which then fails fast) and comes back."""
    backend = BackendProcess()
    port, metrics_port = ports()
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
        **breaker_config(backend.url, retries={"max_retries": 0}),
    }))
    backend.start()
    with GatewayProcess(config, port, metrics_port) as gateway:
        assert http_status(f"{gateway.url}/x") == 200
        backend.kill()
        assert [http_status(f"{gateway.url}/x") for _ in range(3)] == [502, 502, 502]
        assert 'gateway_circuit_breaker_state{backend_service="users"} 1.0' in gateway.metrics()
        assert http_status(f"{gateway.url}/x") == 503
        with backend:
            wait_until(lambda: http_status(f"{gateway.url}/x") == 200)
            assert 'gateway_circuit_breaker_state{backend_service="users"} 0.0' in gateway.metrics()
    transitions = [line for line in gateway.log_lines() if line["logger"] == "apigw.breaker"]
    assert [line["state"] for line in transitions][:3] == ["open", "half-open", "closed"]


def test_clients_abandoning_uploads_do_not_open_the_breaker(tmp_path: Path) -> None:
    """A client that leaves mid-upload is its own failure (400 client_body_aborted), not the backend's.
    A real gateway process: the in-process test server cancels such handlers instead."""
    port, metrics_port = ports()
    config = tmp_path / "gw.yaml"
    with BackendProcess() as backend:
        config.write_text(yaml.safe_dump({
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
            **breaker_config(backend.url),
        }))
        with GatewayProcess(config, port, metrics_port) as gateway:
            for done in range(1, 5):  # more than consecutive_failures
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
                # gone, 99,990 bytes short
                wait_until(lambda: len([x for x in gateway.log_lines() if x["logger"] == "apigw.access"]) == done)
            assert 'gateway_circuit_breaker_state{backend_service="users"} 0.0' in gateway.metrics()
            assert http_status(f"{gateway.url}/x") == 200
    errors = {line.get("error_type") for line in gateway.log_lines() if line["logger"] == "apigw.access"}
    assert errors == {"client_body_aborted", None}


def test_a_redis_outage_under_load_writes_a_line_per_interval_not_per_request(tmp_path: Path) -> None:
    """Every decision fails (fail_open: all 200) and is counted, but the error is written once, not 400 times."""
    port, metrics_port = ports()
    config = {
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
        "redis": {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": "100ms"},  # nothing listens there
        "policies": [{"name": "standard", "requests": 1000, "period": "1s"}],
    }
    with BackendProcess() as echo:
        config["routes"] = [{"name": "limited", "ratelimit": "standard", "backend": {"service": "echo", "url": echo.url}}]
        (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
        with GatewayProcess(tmp_path / "gateway.yaml", port, metrics_port) as gateway:
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda _: http_status(f"{gateway.url}/x"), range(400)))
            assert statuses == [200] * 400
            metrics = gateway.metrics()
            errors = [line for line in gateway.log_lines() if "ratelimit error" in line["msg"]]
    assert 'gateway_ratelimit_errors_total 400.0' in metrics
    assert 1 <= len(errors) <= 3  # the first, then one per 10 s interval at most
