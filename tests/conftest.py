from __future__ import annotations

import inspect
import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from apigw.loader import parse_documents
from apigw.logs import AccessLog
from apigw.metrics import Metrics
from apigw.server import traffic_app
from apigw.state import GATEWAY, Gateway
from apigw.testkit.backend import Backend
from apigw.testkit.clock import FakeClock
from apigw.testkit.redis import RedisServer


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    """looptime 0.9 gives a sync test an event loop that nobody closes; its GC warning then fails a
    later test (filterwarnings=error). Close only a loop that appeared during the sync test."""
    policy = pyfuncitem.funcargs.get("event_loop_policy")
    local = getattr(policy, "_local", None)
    before = getattr(local, "_loop", None)
    try:
        return (yield)
    finally:
        after = getattr(local, "_loop", None)
        if after is not None and after is not before and not inspect.iscoroutinefunction(pyfuncitem.obj):
            after.close()
            local._loop = before


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    """A fresh metrics registry: values asserted in a test come from that test alone."""
    return Metrics()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server per test, on its own free port."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    """A real echo backend on a loopback port."""
    async with Backend() as server:
        yield server


@pytest.fixture
def gateway_client(aiohttp_client):
    """Factory: an in-process gateway (the real traffic app) for a config dict, and an HTTP client to it."""

    async def make(config: dict[str, Any]) -> TestClient:
        gateway = Gateway.create(parse_documents({"config.yaml": yaml.safe_dump(config)}), Metrics())
        gateway.access_log = AccessLog(io.StringIO())  # read by `access_lines`
        server = TestServer(traffic_app(gateway), host="127.0.0.1")
        await server.start_server(access_log=None)  # as `serve` runs it: the pipeline logs, aiohttp does not
        client = await aiohttp_client(server)
        return client

    return make



def access_lines(client: TestClient) -> list[dict[str, Any]]:
    """The access log lines an in-process gateway (`gateway_client`) wrote, parsed."""
    return [json.loads(line) for line in client.app[GATEWAY].access_log.stream.getvalue().splitlines()]
