"""Latency of traffic while a large config reloads: a real gateway with 5,000 routes, steady load.

    python bench/reload_latency.py [--routes 5000] [--rate 200] [--reloads 5] [--trigger sighup|file]
    python bench/reload_latency.py --dataplane /other/checkout/dataplane   # the same against other code

Open-loop load: requests are sent at a fixed rate whatever the gateway does, each timed from when it was
due (not from when it was sent), so a stall shows in every request it delays instead of one per
connection. Each request goes to another of the routes. After warm-up and a stretch without reloads, the
config is rewritten (by rename, one backend timeout changed so the config hash changes) and reloaded,
`--reloads` times back to back; a reload lasts from the trigger to the moment `/_health/ready` serves the
new `config_hash`. Requests overlapping a reload count as "during reloads", the others as "no reload".
The gateway runs alone on core 1; this script (the client) and the backend share core 0. It prints
figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from harness import LOAD_CORE, PROXY_CORE, ROOT, env, pin, require

from apigw.testkit.process import BackendProcess, GatewayProcess, ports

WARMUP = 2.0
READY_POLL = 0.01


def config(routes: int, port: int, metrics_port: int, backend_url: str, version: int) -> dict[str, object]:
    return {
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
        "logging": {"access_log": False},
        "routes": [
            {"name": f"r{i}", "match": {"path_prefix": f"/r{i}/", "methods": ["GET"]},
             "backend": {"service": f"svc{i % 50}", "url": backend_url, "timeout": f"{5 + version * (i == 0)}s"}}
            for i in range(routes)
        ],
    }


def render(document: dict[str, object]) -> bytes:
    return yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False).encode()


def write(path: Path, text: bytes) -> None:
    """Replace the file by rename (a reload never sees it half-written); rendered beforehand, since
    rendering 5,000 routes would stall this client's own event loop and count against the gateway."""
    staged = path.with_suffix(".new")
    staged.write_bytes(text)
    staged.rename(path)


class Load:
    """Requests due at a fixed rate, each recorded as (due, done, status)."""

    def __init__(self, url: str, routes: int, rate: float):
        self.url, self.routes, self.rate = url, routes, rate
        self.results: list[tuple[float, float, int]] = []

    async def run(self, session: aiohttp.ClientSession, until: asyncio.Event, limit: int) -> None:
        tasks = set()
        start = time.monotonic()
        for n in range(limit):
            if until.is_set():
                break
            due = start + n / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one(session, due, n * 7919 % self.routes))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, due: float, route: int) -> None:
        try:
            async with session.get(f"{self.url}/r{route}/x") as response:
                await response.read()
                status = response.status
        except aiohttp.ClientError:
            status = 0
        self.results.append((due, time.monotonic(), status))


async def config_hash(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/_health/ready") as response:
        return (await response.json())["config_hash"]


async def reload_until_served(
    session: aiohttp.ClientSession, gateway: GatewayProcess, trigger: str, before: str
) -> tuple[float, float]:
    """Trigger one reload (the new file is already in place); its window, until the new hash is served."""
    start = time.monotonic()
    if trigger == "sighup":
        gateway.signal(signal.SIGHUP)
    while await config_hash(session, gateway.url) == before:
        await asyncio.sleep(READY_POLL)
    return start, time.monotonic()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else float("nan")


def row(label: str, results: list[tuple[float, float, int]]) -> tuple[str, float]:
    latencies = [(done - due) * 1000 for due, done, _ in results]
    bad = sum(1 for *_, status in results if status != 200)
    p99 = percentile(latencies, 99)
    text = (f"{label:<16} {len(results):>8} {percentile(latencies, 50):>8.1f} {p99:>8.1f} "
            f"{max(latencies, default=float('nan')):>8.1f} {bad:>8}")
    return text, p99


async def measure(args: argparse.Namespace, tmp: Path, backend_url: str) -> None:
    port, metrics_port = ports()
    path = tmp / "gateway.yaml"
    versions = [render(config(args.routes, port, metrics_port, backend_url, v)) for v in range(args.reloads + 1)]
    write(path, versions[0])
    env = {"PYTHONPATH": str(Path(args.dataplane).resolve())}
    gateway = GatewayProcess(path, port, metrics_port, env=env)
    gateway.start(wait=False)
    try:
        pin(gateway.process.pid, PROXY_CORE)  # type: ignore[union-attr]
        gateway.wait_ready(timeout=120)
        load = Load(gateway.url, args.routes, args.rate)
        windows: list[tuple[float, float]] = []
        stop = asyncio.Event()
        limit = int(args.rate * (WARMUP + args.baseline + args.reloads * 30))
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session, aiohttp.ClientSession() as control:
            running = asyncio.create_task(load.run(session, stop, limit))
            await asyncio.sleep(WARMUP + args.baseline)
            for text in versions[1:]:
                before = await config_hash(control, gateway.url)
                write(path, text)
                windows.append(await reload_until_served(control, gateway, args.trigger, before))
            await asyncio.sleep(0.5)
            stop.set()
            await running
    finally:
        gateway.stop()
    reloads = [line for line in gateway.log_lines() if "reload_ms" in line]

    started = min(due for due, _, _ in load.results)
    measured = [r for r in load.results if r[0] >= started + WARMUP]
    during = [r for r in measured if any(r[0] < end and r[1] > start for start, end in windows)]
    quiet = [r for r in measured if r[1] < windows[0][0]]

    load_avg = os.getloadavg()
    print(f"{args.routes} routes, {args.rate:g} req/s open loop, {args.reloads} reloads by {args.trigger}, "
          f"dataplane {args.dataplane}; load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    print(f"{'':<16} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'non-200':>8}")
    quiet_row, quiet_p99 = row("no reload", quiet)
    during_row, during_p99 = row("during reloads", during)
    print(quiet_row)
    print(during_row)
    print(f"p99 during reloads minus p99 without: {during_p99 - quiet_p99:+.1f} ms (issue 13's bound: +50 ms)")
    spans = sorted(end - start for start, end in windows)
    print(f"reload, trigger to new config_hash served: min {spans[0]:.2f} s, median {spans[len(spans) // 2]:.2f} s, "
          f"max {spans[-1]:.2f} s")
    if args.timeline:
        print("timeline: second since the first request, requests due in it, their p99 ms, R = a reload ran")
        for second in range(int(max(due for due, _, _ in load.results) - started) + 1):
            bucket = [r for r in load.results if second <= r[0] - started < second + 1]
            lo, hi = started + second, started + second + 1
            mark = "R" if any(lo < end and hi > start for start, end in windows) else ""
            print(f"  {second:>4} {len(bucket):>5} {row('', bucket)[1]:>8.1f} {mark}")
    if reloads:
        took = sorted(line["reload_ms"] for line in reloads)
        held = sorted(line["loop_held_ms"] for line in reloads)
        print(f"reload inside the gateway (its log's reload_ms: read, parse, validate in the worker process, "
              f"unpickle, build, swap): median {took[len(took) // 2]:.0f} ms, max {took[-1]:.0f} ms")
        print(f"longest the reload held the event loop at once (loop_held_ms: a part unpickled, or the "
              f"state built): median {held[len(held) // 2]:.0f} ms, max {held[-1]:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100, help="requests per second")
    parser.add_argument("--baseline", type=float, default=10, help="seconds of load before the first reload")
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--trigger", choices=["sighup", "file"], default="sighup",
                        help="file: the rewrite alone, picked up by the gateway's file watcher")
    parser.add_argument("--timeline", action="store_true", help="also p99 for each second of the run")
    parser.add_argument("--dataplane", default=str(ROOT / "dataplane"), help="the apigw source root to run")
    args = parser.parse_args()
    require("taskset")
    os.sched_setaffinity(0, {LOAD_CORE})
    os.environ["PYTHONPATH"] = env()["PYTHONPATH"]  # the backend runs the test kit from this checkout
    with tempfile.TemporaryDirectory(prefix="apigw-reload-") as name:
        backend_port = ports()[0]
        with BackendProcess(backend_port, ["taskset", "-c", str(LOAD_CORE), sys.executable, "-m",
                                           "apigw.testkit.backend", str(backend_port)]) as backend:
            asyncio.run(measure(args, Path(name), backend.url))


if __name__ == "__main__":
    main()
