"""Test helpers: the operator running for real against KMock, and stand-in gateway pods on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web

from apigw.config.errors import ConfigError, ConfigIncomplete
from apigw.config.loader import load_config
from apigw.config.model import config_hash
from apigw_operator.handlers import Options, build_registry

NS = "api-gateway"
CM = "api-gateway-config"
CONFIG_YAML = "listen:\n  port: 8080\nratelimit:\n  failure_mode: fail_closed\n"


def configmap(config_yaml: str = CONFIG_YAML) -> dict[str, Any]:
    """The gateway's ConfigMap as people apply it: config.yaml, routes.yaml left to the operator."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CM, "namespace": NS},
        "data": {"config.yaml": config_yaml, "routes.yaml": ""},
    }


def gateway_pod(name: str, ip: str = "127.0.0.1") -> dict[str, Any]:
    """A ready pod of the gateway Deployment at `ip`."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "api-gateway"}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def cr(kind: str, name: str, spec: dict[str, Any], created: str = "2025-01-01T00:00:00Z", namespace: str = "shop", generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.apigw.io/v1alpha1",
        "kind": kind,
        "metadata": {
            "name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
            "creationTimestamp": created, "generation": generation,
        },
        "spec": spec,
    }


def route(name: str, prefix: str, created: str = "2025-01-01T00:00:00Z", **extra: Any) -> dict[str, Any]:
    spec = {"match": {"path_prefix": prefix}, "backend": {"service": name, "url": f"http://{name}.shop:8080"}, **extra}
    return cr("GatewayRoute", name, spec, created=created)


class GatewayPod:
    """Answers `/_health/ready` like a gateway pod's metrics port: the hash of the config it loaded last,
    and the error of a reload it rejected (or, like a supervisor of workers, a `problem`)."""

    def __init__(self) -> None:
        self.config_hash: str | None = None
        self.last_reload_error: str | None = None
        self.problem: str | None = None
        self.unavailable_backends: list[dict[str, Any]] = []
        """The backends of the config in force it holds unavailable (their TLS files cannot be used)."""
        self.url = ""
        self._runner: web.AppRunner | None = None

    def load(self, data: dict[str, str]) -> None:
        """What a pod does when its config volume changes: load it with the gateway's loader, or keep the
        old one and say why (files mid-update only wait)."""
        from apigw.upstream.cluster import cluster_settings, held_backends  # the pod's own reading of TLS files

        with tempfile.TemporaryDirectory() as volume:
            for key, text in data.items():
                (Path(volume) / key).write_text(text)
            try:
                config = load_config(Path(volume))
                held = held_backends(config, cluster_settings(config))  # what the pod's load reads of the TLS files
                self.config_hash, self.last_reload_error = config_hash(config), None
                self.unavailable_backends = [backend.report() for backend in held]
            except ConfigIncomplete:
                pass
            except ConfigError as exc:
                self.last_reload_error = exc.errors[0].removeprefix(f"{volume}/")

    async def _ready(self, request: web.Request) -> web.Response:
        body = {"status": "ready", "config_hash": self.config_hash, "last_reload_error": self.last_reload_error,
                "pid": 1, "redis": None, "unavailable_backends": self.unavailable_backends}
        if self.problem is not None:
            body["problem"] = self.problem
        return web.json_response(body)

    async def start(self, ip: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/_health/ready", self._ready)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, ip, port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{ip}:{port}"

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def operator(options: Options) -> AsyncIterator[None]:
    """kopf's own entry point, in a task of the test's loop (KMock serves from the same loop)."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=build_registry(options), settings=settings, standalone=True, clusterwide=True,
        stop_flag=stop, ready_flag=ready,
    ))
    await ready.wait()
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll until `check()` is truthy; fail with its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met in {timeout}s: {check.__doc__ or check}")
        await asyncio.sleep(0.05)
