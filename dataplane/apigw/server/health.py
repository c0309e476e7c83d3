"""Health: the bare answer on the public traffic port, the details on the metrics port.

The traffic port is reachable by anyone who can send a request, so its `/_health/live` and
`/_health/ready` say the status and the `config_hash` in force, nothing more. The metrics port's
`/_health/ready` answers with the same status code (200 ready, 503 not ready or draining) and what
on-call needs: the last reload's error, the pid, Redis as the latest round trip found it, and the
backends held unavailable (`unavailable_backends`: their TLS files cannot be used; the pod stays ready,
the operator reports them on their routes' CRs).

With `--workers N`, the supervisor serves the metrics port and has no config of its own: each worker
keeps its details in a small file in the shared metrics directory (`StatusFile`), and the supervisor
answers for all of them (`WorkersHealth`): ready only when every live worker is, with each worker's
pid, hash and error, the backends any of them holds unavailable, and a `problem` when they disagree or a
worker is down waiting to be started again.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from apigw.pipeline.state import GATEWAY, Gateway
from apigw.redis.batch import RedisBatch

STATUS_EVERY = 0.25
"""Seconds between a worker's looks at its details (written only when they changed)."""


def _status(draining: bool) -> tuple[str, int]:
    return ("draining", 503) if draining else ("ready", 200)


def live(gateway: Gateway) -> web.Response:
    return web.json_response({"status": "alive"})


def ready(gateway: Gateway) -> web.Response:
    """The traffic port's readiness: status and config hash only."""
    status, code = _status(gateway.draining)
    return web.json_response({"status": status, "config_hash": gateway.state.config_hash}, status=code)


TRAFFIC_HEALTH: dict[str, Callable[[Gateway], web.Response]] = {"/_health/live": live, "/_health/ready": ready}
"""The traffic port's health answers (to GET and HEAD), by path."""


def details(gateway: Gateway) -> dict[str, Any]:
    status, _ = _status(gateway.draining)
    return {
        "status": status,
        "config_hash": gateway.state.config_hash,
        "last_reload_error": gateway.last_reload_error,
        "pid": os.getpid(),
        "redis": _redis(gateway.shared.redis),
        "unavailable_backends": [backend.report() for backend in gateway.state.held],
    }


def _redis(redis: RedisBatch | None) -> dict[str, Any] | None:
    """None without Redis; else `up`, `down` (with the error) or `unknown` (no round trip yet), and since when."""
    if redis is None:
        return None
    seen = redis.seen
    return {"state": seen.state, "error": seen.error, "since": utc(seen.since)}


def utc(timestamp: float) -> str:
    """A wall-clock time as the health bodies show it: `2026-11-30T03:04:05Z`."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def ready_details(request: web.Request) -> web.Response:
    """The metrics port's readiness of a single process: the same status code, with the details."""
    gateway = request.app[GATEWAY]
    return web.json_response(details(gateway), status=_status(gateway.draining)[1])


def with_details(app: web.Application, gateway: Gateway) -> web.Application:
    """Add `/_health/ready` with the details to the metrics app."""
    app[GATEWAY] = gateway
    app.router.add_get("/_health/ready", ready_details)
    return app


def status_path(directory: Path, pid: int) -> Path:
    return directory / f"health-{pid}.json"


class StatusFile:
    """A worker's details in `health-<pid>.json`, replaced whole (write, then rename) when they change,
    so the supervisor never reads half a file."""

    def __init__(self, directory: Path, gateway: Gateway):
        self.path = status_path(directory, os.getpid())
        self.gateway = gateway
        self._written = ""

    def write(self) -> None:
        text = json.dumps(details(self.gateway))
        if text == self._written:
            return
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, self.path)
        self._written = text

    async def keep_current(self, every: float = STATUS_EVERY) -> None:
        while True:
            self.write()
            await asyncio.sleep(every)


def read_status(directory: Path, pid: int) -> dict[str, Any] | None:
    """A worker's details, or None before it wrote them."""
    try:
        status = json.loads(status_path(directory, pid).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


class WorkersHealth:
    """The supervisor's `/_health/ready`, from the status files of its live workers. Workers serving
    different configs (for a moment at each reload: each watches the files itself) are ready all the
    same: `config_hash` is then null and `problem` says which worker serves which. A worker that died
    and waits to be started again (`down`) is listed and named in `problem`; the live workers still
    decide readiness, as they serve the pod's traffic meanwhile."""

    def __init__(self, directory: Path, live_pids: Callable[[], list[int]], down: Callable[[], list[dict[str, Any]]],
                 stopping: Callable[[], bool]):
        self.directory, self.live_pids, self.down, self.stopping = directory, live_pids, down, stopping

    def body(self) -> tuple[dict[str, Any], int]:
        workers = [read_status(self.directory, pid) or {"pid": pid, "status": "starting"} for pid in self.live_pids()]
        down = self.down()
        problems = [f"worker pid {w['pid']} is {w['status']}" for w in workers if w["status"] != "ready"]
        problems += [f"worker {d['worker']} is down ({d['last_exit']}, {d['exits_in_a_row']} time(s) in a row since "
                     f"{d['since']}), next start at {d['next_start']}" for d in down]
        hashes = {w["config_hash"] for w in workers if "config_hash" in w}
        if len(hashes) > 1:
            serving = ", ".join(f"pid {w['pid']} {w['config_hash']}" for w in workers if "config_hash" in w)
            problems.append(f"workers serve different configs: {serving}")
        if not workers:
            problems.append("no worker is running")
        errors = list(dict.fromkeys(w["last_reload_error"] for w in workers if w.get("last_reload_error")))
        held = {json.dumps(b, sort_keys=True): b for w in workers for b in w.get("unavailable_backends") or []}
        if self.stopping():
            status, code = _status(True)
        elif workers and all(w["status"] == "ready" for w in workers):
            status, code = "ready", 200
        else:
            status, code = "not ready", 503
        return {
            "status": status,
            "config_hash": hashes.pop() if len(hashes) == 1 else None,
            "last_reload_error": "; ".join(errors) or None,
            "problem": "; ".join(problems) or None,
            "unavailable_backends": list(held.values()),
            "pid": os.getpid(),
            "workers": workers + down,
        }, code

    async def handle(self, request: web.Request) -> web.Response:
        body, code = self.body()
        return web.json_response(body, status=code)
