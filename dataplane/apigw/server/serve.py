"""Listeners and lifecycle: traffic on 8080 (and 8443 with TLS), metrics on 9090, signals, drain.

SIGTERM: report not-ready, keep serving for `drain_delay` so load balancers notice, stop accepting,
let in-flight requests finish within `drain_timeout`, exit 0. SIGHUP: reload the config.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from apigw.config.errors import ConfigError, ConfigIncomplete
from apigw.observability.logs import flush_repeats
from apigw.observability.metrics import Metrics, metrics_app
from apigw.pipeline.handler import handle
from apigw.pipeline.state import Gateway
from apigw.policy.ratelimit import check_shared_limits
from apigw.server.connection import GatewayRunner, TrafficRunner
from apigw.server.debug import debug_app
from apigw.server.health import TRAFFIC_HEALTH, StatusFile, with_details
from apigw.server.last_good import LastGood, start_config
from apigw.server.reload import Reloader
from apigw.server.tls import ServerTLS, TLSSite
from apigw.server.workers import METRICS_DIR_ENV, WORKER_ENV, supervise

log = logging.getLogger("apigw.server")

BACKLOG = 4096
"""Connections the kernel queues before they are accepted (capped by net.core.somaxconn). aiohttp's
128 drops SYNs when a thousand clients connect at once, and each dropped one waits a second or more."""

GC_YOUNG_THRESHOLD = 10_000
"""Allocations between two passes of the cyclic collector over young objects (Python's default: 700). A
request allocates a few dozen tracked objects, nearly all freed by reference counting before any pass;
at 700 a pass ran every ~20 requests and examined those in flight. At 10,000 the gateway's CPU per
request fell by about 4% with every feature on or off (`bench/compare.py`, two rounds each); the garbage
a pass finds waits at most that many allocations longer."""

DRAIN_CUT = 0.5
"""Seconds a request still running at the end of the drain has to finish once told to stop, before it is
cancelled (aiohttp's shutdown timeout; the drain's own wait is `listen.drain_timeout`: `TrafficRunner`)."""


class Traffic:
    """The traffic port's one handler: the health answers at their paths, the pipeline for the rest."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def __call__(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        if request.method in HEALTH_METHODS:
            health = TRAFFIC_HEALTH.get(request.rel_url.path_safe)  # the path aiohttp's router would match
            if health is not None:
                return _answered(health(self.gateway))
        return handle(request, self.gateway)


async def _answered(response: web.StreamResponse) -> web.StreamResponse:
    return response


HEALTH_METHODS = frozenset({"GET", "HEAD"})
"""Methods the health paths answer; any other goes to the pipeline, as every other path."""


def traffic_runner(gateway: Gateway, shutdown_timeout: float, handler_cancellation: bool = False) -> TrafficRunner:
    return TrafficRunner(Traffic(gateway), gateway, shutdown_timeout=shutdown_timeout,
                         handler_cancellation=handler_cancellation)


async def serve(config_path: Path, workers: int | None = None, debug_port: int | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT; the exit status is the return value.

    `workers` (else `listen.workers`) above 1 runs a supervisor of that many worker processes instead.
    `debug_port` serves the debug listener on 127.0.0.1 (single process only: with workers, use py-spy).
    """
    worker = os.environ.get(WORKER_ENV) == "1"
    last_good = LastGood(Path(os.environ[METRICS_DIR_ENV])) if worker else None
    try:
        checked, rejected = start_config(config_path, last_good)
        config = checked.config
        count = workers or config.listen.workers
        if count > 1 and not worker:
            check_shared_limits(config)
            return await supervise(config_path, config, count)
        logging.getLogger().setLevel(config.logging.level)
        metrics = Metrics()
        gateway = Gateway.create(config, metrics, one_of_workers=worker)
        tls = ServerTLS(config.listen.tls, metrics) if config.listen.tls else None
    except ConfigError as exc:
        log.error("config %s is invalid: %d error(s)", config_path, len(exc.errors), extra={"fields": {"errors": exc.errors}})
        return 1
    if rejected is None:
        if last_good is not None:
            last_good.keep(checked.texts)
    elif not isinstance(rejected, ConfigIncomplete):  # shards mid-update are no error: the reload waits for them
        metrics.config_reloads.labels("failure").inc()
        gateway.last_reload_error = "; ".join(rejected.errors)
    listen = config.listen
    runner = traffic_runner(gateway, DRAIN_CUT)
    await runner.setup()
    runners: list[web.BaseRunner] = [runner]
    sites = [web.TCPSite(runner, listen.address, listen.port, backlog=BACKLOG, reuse_port=worker)]
    side_apps = [] if worker else [(with_details(metrics_app(metrics.registry), gateway), listen.address, listen.metrics_port)]
    if debug_port is not None and not worker:  # workers: the supervisor serves metrics; py-spy for debugging
        side_apps.append((debug_app(), "127.0.0.1", debug_port))
    for app, address, port in side_apps:
        side_runner = GatewayRunner(app, gateway, shutdown_timeout=1)
        await side_runner.setup()
        runners.append(side_runner)
        sites.append(web.TCPSite(side_runner, address, port))
    if tls is not None:
        sites.append(TLSSite(
            runner, listen.address, listen.tls_port, ssl_context=tls.context, backlog=BACKLOG, reuse_port=worker,
            handshake_timeout=listen.request_head_timeout,
        ))
    try:
        for site in sites:
            await site.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        for each in runners:
            await each.cleanup()
        return 1

    reloader = Reloader(gateway, config_path, tls, last_good)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP")
    background = [asyncio.create_task(reloader.watch())]
    if worker:  # the supervisor answers the metrics port's health from this file
        background.append(asyncio.create_task(StatusFile(Path(os.environ[METRICS_DIR_ENV]), gateway).keep_current()))
    sampler = asyncio.create_task(metrics.sample())
    gc.freeze()  # what start-up built lives as long as the process: the collector need not scan it again
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    log.info(
        "gateway serving %d routes on %s:%d (metrics :%d), config %s", len(config.routes), listen.address,
        listen.port, listen.metrics_port, gateway.state.config_hash,
        extra={"fields": {"config_hash": gateway.state.config_hash}},
    )
    await stop.wait()

    try:
        await drain(gateway, runners, background)
        sampler.cancel()  # after the drain: its last fold carries the drained requests' counts (with workers)
        await reloader.close()
    finally:
        gateway.access_log.flush()  # the drained requests' lines, even if a step of the stop failed
        flush_repeats()  # and the counts of the warnings the flood control held back
    log.info("stopped")
    return 0


async def drain(gateway: Gateway, runners: list[web.BaseRunner], background: list[asyncio.Task[None]]) -> None:
    """Not ready, then the in-flight requests finished (each runner waits up to its shutdown timeout)."""
    gateway.draining = True
    listen = gateway.state.config.listen
    log.info("draining: not ready, finishing in-flight requests (up to %ss)", listen.drain_delay + listen.drain_timeout)
    await asyncio.sleep(listen.drain_delay)
    for task in background:
        task.cancel()
    for each in runners:
        await each.cleanup()


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed: a faster event loop for the same code."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
