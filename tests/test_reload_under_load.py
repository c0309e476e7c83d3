"""Twenty reloads while clients keep sending: not one request fails."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import yaml

from apigw.testkit.backend import Backend
from apigw.testkit.process import GatewayProcess, ports


def write_config(path: Path, port: int, metrics_port: int, backend_url: str, version: int) -> None:
    routes = [{"name": "echo", "backend": {"service": "echo", "url": backend_url, "timeout": f"{5 + version}s"}}]
    if version % 2:
        routes.append({"name": f"extra-{version}", "match": {"path": f"/extra/{version}"},
                       "backend": {"service": f"extra-{version}", "url": backend_url}})
    staged = path.with_suffix(".new")  # replaced atomically, as a ConfigMap volume update is
    staged.write_text(yaml.safe_dump({
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port}, "routes": routes,
    }))
    staged.rename(path)


async def test_twenty_reloads_under_load_lose_no_request(tmp_path: Path) -> None:
    port, metrics_port = ports()
    config = tmp_path / "gw.yaml"
    async with Backend() as backend:
        write_config(config, port, metrics_port, backend.url, 0)
        gateway = GatewayProcess(config, port, metrics_port)
        await asyncio.to_thread(gateway.start)
        statuses: dict[int, int] = {}
        failures: list[str] = []
        stop = asyncio.Event()

        async def client(session: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                try:
                    async with session.post(f"{gateway.url}/load", data=b"x" * 1000) as response:
                        await response.read()
                        statuses[response.status] = statuses.get(response.status, 0) + 1
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))

        try:
            async with aiohttp.ClientSession() as session:
                clients = [asyncio.create_task(client(session)) for _ in range(16)]
                hashes = {(await asyncio.to_thread(gateway.ready))["config_hash"]}
                for version in range(1, 21):
                    write_config(config, port, metrics_port, backend.url, version)
                    gateway.signal(signal.SIGHUP)
                    for _ in range(200):  # until this version is in force (a loaded machine may take a while)
                        current = (await asyncio.to_thread(gateway.ready))["config_hash"]
                        if current not in hashes:
                            break
                        await asyncio.sleep(0.05)
                    hashes.add(current)
                stop.set()
                await asyncio.gather(*clients)
            metrics = await asyncio.to_thread(gateway.metrics)
        finally:
            await asyncio.to_thread(gateway.stop)
    assert failures == []
    assert set(statuses) == {200}, statuses
    assert sum(statuses.values()) > 200
    assert len(hashes) == 21
    assert 'gateway_config_reloads_total{result="success"}' in metrics
    assert 'gateway_config_reloads_total{result="failure"}' not in metrics
