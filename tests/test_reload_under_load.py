"""Reloads while clients keep sending: twenty of them lose no request, and a config file written slowly
in place (truncated, then filled in two halves) is never served half-written: not one 404."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Self

import aiohttp
import yaml

from apigw.server.reload import POLL_INTERVAL, SETTLE
from apigw.testkit.backend import Backend
from apigw.testkit.process import GatewayProcess, ports


def config_text(port: int, metrics_port: int, backend_url: str, version: int) -> str:
    routes = [{"name": "echo", "backend": {"service": "echo", "url": backend_url, "timeout": f"{5 + version}s"}}]
    if version % 2:
        routes.append({"name": f"extra-{version}", "match": {"path": f"/extra/{version}"},
                       "backend": {"service": f"extra-{version}", "url": backend_url}})
    return yaml.safe_dump({"listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port}, "routes": routes})


def write_config(path: Path, port: int, metrics_port: int, backend_url: str, version: int) -> None:
    staged = path.with_suffix(".new")  # replaced atomically, as a ConfigMap volume update is
    staged.write_text(config_text(port, metrics_port, backend_url, version))
    staged.rename(path)


class Load:
    """Clients sending requests to `path` without pause until stopped; every status and failure counted."""

    def __init__(self, url: str, clients: int = 16):
        self.url, self.clients = url, clients
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            try:
                async with session.post(self.url, data=b"x" * 1000) as response:
                    await response.read()
                    self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
            except aiohttp.ClientError as exc:
                self.failures.append(repr(exc))

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._client(self._session)) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()


async def served_hash(gateway: GatewayProcess) -> str:
    return (await asyncio.to_thread(gateway.ready))["config_hash"]


async def until_new_hash(gateway: GatewayProcess, seen: set[str]) -> str:
    for _ in range(200):  # until a new version is in force (a loaded machine may take a while)
        current = await served_hash(gateway)
        if current not in seen:
            return current
        await asyncio.sleep(0.05)
    raise AssertionError(f"no new config served; still {current}")


async def test_twenty_reloads_under_load_lose_no_request(tmp_path: Path) -> None:
    port, metrics_port = ports()
    config = tmp_path / "gw.yaml"
    async with Backend() as backend:
        write_config(config, port, metrics_port, backend.url, 0)
        gateway = GatewayProcess(config, port, metrics_port)
        await asyncio.to_thread(gateway.start)
        try:
            async with Load(f"{gateway.url}/load") as load:
                hashes = {await served_hash(gateway)}
                for version in range(1, 21):
                    write_config(config, port, metrics_port, backend.url, version)
                    gateway.signal(signal.SIGHUP)
                    hashes.add(await until_new_hash(gateway, hashes))
            metrics = await asyncio.to_thread(gateway.metrics)
        finally:
            await asyncio.to_thread(gateway.stop)
    assert load.failures == []
    assert set(load.statuses) == {200}, load.statuses
    assert sum(load.statuses.values()) > 200
    assert len(hashes) == 21
    assert 'gateway_config_reloads_total{result="success"}' in metrics
    assert 'gateway_config_reloads_total{result="failure"} 0.0' in metrics


def two_routes(port: int, metrics_port: int, backend_url: str, version: int) -> tuple[str, str]:
    """A config with routes `/a` and `/b`, split after route `a`: the first half is valid on its own."""
    routes = [{"name": name, "match": {"path_prefix": f"/{name}"},
               "backend": {"service": name, "url": backend_url, "timeout": f"{5 + version}s"}} for name in "ab"]
    listen = {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port}
    text = yaml.safe_dump({"listen": listen, "routes": routes}, sort_keys=False)
    cut = text.index("- name: b")
    return text[:cut], text[cut:]


async def test_a_file_written_slowly_in_place_is_never_served_half_written(tmp_path: Path) -> None:
    """Each rewrite truncates the file, pauses, writes the first half (valid YAML without the route
    under load), pauses, then writes the rest: the watcher polls in every pause."""
    pause = POLL_INTERVAL * 3  # longer than a reload takes: a change loaded at once would be the half
    assert POLL_INTERVAL < pause < SETTLE  # the watcher sees each stage; none lasts long enough to settle
    port, metrics_port = ports()
    config = tmp_path / "gw.yaml"
    async with Backend() as backend:
        config.write_text("".join(two_routes(port, metrics_port, backend.url, 0)))
        gateway = GatewayProcess(config, port, metrics_port)
        await asyncio.to_thread(gateway.start)
        try:
            async with Load(f"{gateway.url}/b") as load:
                hashes = {await served_hash(gateway)}
                for version in (1, 2):
                    first, rest = two_routes(port, metrics_port, backend.url, version)
                    assert [r["name"] for r in yaml.safe_load(first)["routes"]] == ["a"]
                    with open(config, "w") as file:  # noqa: ASYNC230 (the slow writer under test)
                        file.flush()
                        await asyncio.sleep(pause)
                        file.write(first)
                        file.flush()
                        await asyncio.sleep(pause)
                        file.write(rest)
                    hashes.add(await until_new_hash(gateway, hashes))
                await asyncio.sleep(SETTLE + POLL_INTERVAL)  # nothing else gets loaded afterwards
            reloads = [line["msg"] for line in gateway.log_lines() if line["msg"].startswith("config reloaded")]
            final = await served_hash(gateway)
        finally:
            await asyncio.to_thread(gateway.stop)
    assert load.failures == []
    assert set(load.statuses) == {200}, load.statuses  # the issue measured 686 404s here
    assert len(reloads) == 2 and all(msg.endswith(", 2 routes") for msg in reloads), reloads
    assert final in hashes and len(hashes) == 3
