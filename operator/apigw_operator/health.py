"""Asking the gateway pods which config they serve, for `Programmed`: `GET /_health/ready` on each pod's
metrics port, whose body has the details (the traffic port's has only the status and the hash).

A pod's problem is its `last_reload_error` (the pod rejected the config: `Rejected`), else its
`problem` (with `--workers`: workers that serve different configs or are not ready yet), else why it
could not be asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class PodReport:
    pod: str
    config_hash: str | None
    problem: str | None = None
    """The pod's `last_reload_error`, its `problem`, or why it could not be asked."""
    rejected: bool = False
    """True when the problem is the pod's own failed reload (not a failed request)."""


async def probe_pods(session: aiohttp.ClientSession, targets: Mapping[str, str], timeout: float = 2.0) -> list[PodReport]:
    """Ask every pod (name -> base URL of its metrics listener, such as `http://10.0.0.7:9090`) at once."""
    return list(await asyncio.gather(*(_probe(session, pod, url, timeout) for pod, url in sorted(targets.items()))))


async def _probe(session: aiohttp.ClientSession, pod: str, url: str, timeout: float) -> PodReport:
    try:
        async with session.get(f"{url}/_health/ready", timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return PodReport(pod, None, f"health endpoint not answering: {exc or type(exc).__name__}")
    if not isinstance(body, dict):
        return PodReport(pod, None, "health endpoint answered no JSON object")
    error = body.get("last_reload_error")
    return PodReport(pod, body.get("config_hash"), error or body.get("problem"), rejected=error is not None)
