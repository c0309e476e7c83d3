"""`gateway --workers N`: N gateway processes sharing the traffic port (SO_REUSEPORT), one supervisor.

Python serves one core per process; workers use the others. The supervisor starts the workers with
prometheus-client's multiprocess mode on, serves the merged `/metrics` (with `process_*` summed over
itself and its workers, so CPU and memory alerts see the whole pod) and the metrics port's
`/_health/ready` (from the status files the workers keep in the same directory: `apigw.server.health`),
forwards SIGHUP, restarts a worker that dies, and on SIGTERM lets every worker drain and exits 0 once
they all did. A worker that keeps dying is started again less and less often (`Slot`), each exit logged
and the slot reported down by the health, so a pod short of a worker says so. A worker started while
the config files are invalid serves the last config that loaded (`apigw.server.last_good`).
Each worker keeps its own breakers and in-process state; Redis-backed limits are shared as always.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from apigw.config.model import Config
from apigw.observability.metrics import metrics_app
from apigw.server.health import WorkersHealth, status_path, utc

log = logging.getLogger("apigw.workers")

WORKER_ENV = "APIGW_WORKER"
"""Set in a worker's environment: serve traffic on a shared port, leave /metrics to the supervisor."""
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""The directory of the workers' metric files, status files and last good config."""
RESTART_DELAY = 1.0
"""Seconds before a worker that died is started again, doubled at each exit in a row up to RESTART_DELAY_MAX."""
RESTART_DELAY_MAX = 30.0
STEADY_RUN = 60.0
"""A worker that ran this long before it died starts a new count of exits in a row."""


@dataclass
class Slot:
    """A worker's place: what its exits in a row tell the log and the health while it is down."""

    number: int
    exits: int = 0
    """Exits in a row, each of a worker that ran less than `STEADY_RUN` (the first one whatever it ran)."""
    last_pid: int = 0
    last_exit: str = ""
    since: float = 0.0
    """When the first exit in a row was (wall clock)."""
    restart_at: float | None = None
    """When the next start is, while the slot waits for it (wall clock)."""

    def exited(self, pid: int, code: int, ran: float) -> float:
        """Count the exit of the worker `pid`; the seconds to wait before starting it again."""
        if self.exits == 0 or ran >= STEADY_RUN:
            self.exits, self.since = 0, time.time()
        self.exits += 1
        self.last_pid, self.last_exit = pid, _exit(code)
        delay = min(RESTART_DELAY * 2 ** (self.exits - 1), RESTART_DELAY_MAX)
        self.restart_at = time.time() + delay
        return delay

    def down(self) -> dict[str, Any] | None:
        """The health's entry for the slot while it waits to start its worker again, else None."""
        if self.restart_at is None:
            return None
        return {"worker": self.number, "pid": self.last_pid, "status": "restarting", "last_exit": self.last_exit,
                "exits_in_a_row": self.exits, "since": utc(self.since), "next_start": utc(self.restart_at)}


def _exit(code: int) -> str:
    try:
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    except ValueError:
        return f"killed by signal {-code}"


class _Workers(Collector):
    """`process_*` for the pod: the supervisor and its workers added up. CPU time counts each process's
    waited-for children too (a worker's reload parsers; the supervisor's exited workers), so that a worker
    that dies leaves its seconds in the counter instead of taking them out of it."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        cpu = rss = fds = 0.0
        for pid in [os.getpid(), *self.pids]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu += sum(int(ticks) for ticks in stat[11:15]) / self._ticks  # utime stime cutime cstime
                rss += int(stat[21]) * self._page
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError, ValueError):
                continue
        yield CounterMetricFamily("process_cpu_seconds", "CPU time of the supervisor and its workers", value=cpu)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of all workers", value=rss)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors of all workers", value=fds)


async def supervise(config_path: Path, config: Config, count: int) -> int:
    with tempfile.TemporaryDirectory(prefix="apigw-metrics-") as metrics_dir:
        env = {**os.environ, METRICS_DIR_ENV: metrics_dir, WORKER_ENV: "1"}
        command = [sys.executable, "-m", "apigw", "--config", str(config_path)]
        pids: list[int] = []
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        registry.register(_Workers(pids))
        stopping = asyncio.Event()
        processes: dict[int, asyncio.subprocess.Process] = {}
        slots = [Slot(number) for number in range(count)]

        app = metrics_app(registry)
        health = WorkersHealth(
            Path(metrics_dir), lambda: [p.pid for p in processes.values() if p.returncode is None],
            lambda: [down for slot in slots if (down := slot.down()) is not None], stopping.is_set,
        )
        app.router.add_get("/_health/ready", health.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.listen.address, config.listen.metrics_port).start()
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            await runner.cleanup()
            return 1

        def broadcast(sig: signal.Signals) -> None:
            for process in processes.values():
                if process.returncode is None:
                    process.send_signal(sig)

        def stop() -> None:
            stopping.set()
            broadcast(signal.SIGTERM)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, stop)
        loop.add_signal_handler(signal.SIGHUP, broadcast, signal.SIGHUP)

        async def keep_running(slot: Slot) -> int:
            code = 0
            while not stopping.is_set():
                slot.restart_at = None
                process = await asyncio.create_subprocess_exec(*command, env=env)
                started = time.monotonic()
                processes[slot.number] = process
                pids[:] = [p.pid for p in processes.values()]
                if stopping.is_set():  # the stop came while it was being started: `broadcast` did not see it
                    process.send_signal(signal.SIGTERM)
                code = await process.wait()
                multiprocess.mark_process_dead(process.pid, metrics_dir)
                status_path(Path(metrics_dir), process.pid).unlink(missing_ok=True)
                if stopping.is_set():  # ended by the stop's SIGTERM while still starting: stopped as asked
                    return 0 if code == -signal.SIGTERM else code
                ran = time.monotonic() - started
                delay = slot.exited(process.pid, code, ran)
                in_a_row = f", {slot.exits} times in a row since {utc(slot.since)}" if slot.exits > 1 else ""
                log.error(  # formatted here, so the flood control writes each: the back-off spaces them out
                    f"worker {slot.number} (pid {process.pid}) {slot.last_exit} after {ran:.1f} s{in_a_row}; "
                    f"starting it again in {delay:.0f} s",
                    extra={"fields": {"worker": slot.number, "pid": process.pid, "exit_code": code, "ran_s": round(ran, 1),
                                      "exits_in_a_row": slot.exits, "restart_in_s": delay}},
                )
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                except TimeoutError:
                    pass
            return code

        log.info("supervising %d workers on port %d (metrics :%d)", count, config.listen.port,
                 config.listen.metrics_port)
        codes = await asyncio.gather(*(keep_running(slot) for slot in slots))
        await runner.cleanup()
        log.info("all workers stopped", extra={"fields": {"exit_codes": codes}})
        return 0 if all(code == 0 for code in codes) else 1
