from __future__ import annotations

import inspect
import io
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import BaseTestServer, TestClient
from aiohttp.web import BaseRunner

from apigw.config.loader import parse_documents
from apigw.observability.logs import AccessLog
from apigw.observability.metrics import Metrics
from apigw.pipeline.state import Gateway
from apigw.server.serve import traffic_runner
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


class TrafficTestServer(BaseTestServer):
    """aiohttp's test server around the gateway's traffic port, as `serve` runs it (`traffic_runner`)."""

    def __init__(self, gateway: Gateway):
        super().__init__(host="127.0.0.1")
        self.gateway = gateway

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        """Without the `handler_cancellation=True` aiohttp's test server asks for: `serve` leaves it off, so a
        client that leaves shows here as it does in production (a failed write, not a cancelled handler)."""
        return traffic_runner(self.gateway, shutdown_timeout=1)


@pytest.fixture
async def traffic_server() -> AsyncIterator[Callable[[Gateway], Awaitable[TrafficTestServer]]]:
    """Factory: the traffic port of `gateway`, started on a loopback port; closed after the test."""
    servers = []

    async def start(gateway: Gateway) -> TrafficTestServer:
        server = TrafficTestServer(gateway)
        servers.append(server)
        await server.start_server()
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def gateway_client(aiohttp_client, traffic_server):
    """Factory: an in-process gateway (the real traffic port) for a config dict, and an HTTP client to it."""

    async def make(config: dict[str, Any]) -> TestClient:
        gateway = Gateway.create(parse_documents({"config.yaml": yaml.safe_dump(config)}), Metrics())
        gateway.access_log = AccessLog(io.StringIO())  # read by `access_lines`
        return await aiohttp_client(await traffic_server(gateway))

    return make


def gateway_of(client: TestClient) -> Gateway:
    """The gateway behind a `gateway_client`."""
    return client.server.gateway



def access_lines(client: TestClient) -> list[dict[str, Any]]:
    """The access log lines an in-process gateway (`gateway_client`) wrote, parsed (those it still keeps
    for its next write included)."""
    access_log = gateway_of(client).access_log
    access_log.flush()
    return [json.loads(line) for line in access_log.stream.getvalue().splitlines()]


FIXED_PORTS = (8080, 9090)
"""The gateway's default ports: no test may talk to them (whatever listens there is not the test's)."""


class Tripwire:
    """Listens on 127.0.0.1 at the fixed ports and records the first line of every connection made by
    this test run (this process or one it started): on a shared machine, others' traffic is not ours."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.sockets: list[socket.socket] = []

    def arm(self) -> None:
        for port in FIXED_PORTS:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken by something of the developer's: nothing to trip on that port
                sock.close()
                continue
            sock.listen(16)
            self.sockets.append(sock)
            threading.Thread(target=self._accept, args=(sock, port), daemon=True).start()

    def _accept(self, sock: socket.socket, port: int) -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            ours = _opened_by_this_run(peer[1], port)
            with conn:
                conn.settimeout(1)
                try:
                    first = conn.recv(200).split(b"\r\n", 1)[0].decode("latin-1")
                except OSError:
                    first = ""
            if ours:
                self.seen.append(f":{port} {first or '(nothing sent)'}")

    def disarm(self) -> None:
        for sock in self.sockets:
            sock.close()


def _opened_by_this_run(client_port: int, server_port: int) -> bool:
    """Whether the client end (127.0.0.1:client_port -> :server_port) belongs to this process or one of
    its descendants, found through /proc (Linux)."""
    wanted = f"0100007F:{client_port:04X} 0100007F:{server_port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return True
    inodes = {f"socket:[{line.split()[9]}]" for line in lines if " ".join(line.split()[1:3]) == wanted}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return _descends_from(int(proc.name), os.getpid())
        except OSError:
            continue
    return False


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


@pytest.fixture(scope="session")
def tripwire() -> Iterator[Tripwire]:
    wire = Tripwire()
    wire.arm()
    yield wire
    wire.disarm()


@pytest.fixture(autouse=True)
def no_fixed_ports(tripwire: Tripwire) -> Iterator[None]:
    """Fails the test during which anything connected to 127.0.0.1:8080 or :9090."""
    before = len(tripwire.seen)
    yield
    time.sleep(0) if len(tripwire.seen) == before else time.sleep(0.2)
    stray = tripwire.seen[before:]
    assert not stray, f"this test connected to a fixed port it did not start: {stray}"
