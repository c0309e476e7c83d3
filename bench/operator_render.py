"""Operator render at scale: 5,000 GatewayRoutes + 50 conflicting ones, rendered the way a pass does
(in a worker thread), while a liveness endpoint on the same event loop is polled every 50 ms.

Prints the render time of a cold pass (nothing remembered), a resync (nothing changed) and a pass
after one edit, the liveness endpoint's worst answer time during each, and the peak RSS.

    PYTHONPATH=dataplane:operator python bench/operator_render.py [--routes 5000] [--conflicts 50]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import resource
import time

import aiohttp
from aiohttp import web

from apigw_operator.render import Renderer

CONFIG_YAML = "listen:\n  port: 8080\nratelimit:\n  failure_mode: fail_closed\n"


def crs(routes: int, conflicts: int) -> list[dict]:
    def body(i: int, path: str, created: str) -> dict:
        return {
            "metadata": {"name": f"r{i}", "namespace": "shop", "creationTimestamp": created},
            "spec": {"match": {"path_prefix": path, "methods": ["GET", "POST"]},
                     "backend": {"service": f"svc{i % 500}", "url": f"http://svc{i % 500}.shop:8080", "timeout": "5s"}},
        }
    found = [body(i, f"/api/r{i}", "2025-01-01T00:00:00Z") for i in range(routes)]
    found += [body(routes + i, f"/api/r{i}", "2025-02-01T00:00:00Z") for i in range(conflicts)]  # newer: excluded
    return found


async def measured(renderer: Renderer, routes: list[dict], url: str, session: aiohttp.ClientSession) -> tuple[float, float]:
    """(render seconds, worst liveness answer seconds while it ran)."""
    worst = 0.0
    done = asyncio.Event()

    async def poll() -> None:
        nonlocal worst
        while not done.is_set():
            start = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
            worst = max(worst, time.perf_counter() - start)
            await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll())
    start = time.perf_counter()
    rendering = await asyncio.to_thread(renderer.render, routes, [], CONFIG_YAML)
    took = time.perf_counter() - start
    done.set()
    await poller
    assert rendering.config_hash and not rendering.errors
    excluded = sum(not v.included for v in rendering.verdicts.values())
    print(f"    {len(rendering.verdicts)} CRs, {excluded} excluded as conflicts, routes.yaml {len(rendering.routes_yaml.encode())} bytes")
    return took, worst


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--routes", type=int, default=5000)
    parser.add_argument("--conflicts", type=int, default=50)
    args = parser.parse_args()

    app = web.Application()
    app.router.add_get("/healthz", lambda request: web.json_response({}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/healthz"

    routes = crs(args.routes, args.conflicts)
    edited = copy.deepcopy(routes)
    edited[7]["spec"]["match"]["path_prefix"] = "/api/v2/r7"
    renderer = Renderer()
    async with aiohttp.ClientSession() as session:
        for label, bodies in (("cold pass", routes), ("resync, nothing changed", routes), ("one route edited", edited)):
            took, worst = await measured(renderer, bodies, url, session)
            print(f"{label:>26}: render {took:.2f} s, liveness worst {worst * 1000:.0f} ms")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
