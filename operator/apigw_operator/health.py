"""Asking the gateway pods which config they serve, for `Programmed`: `GET /_health/ready` on each pod's
metrics port, whose body has the details (the traffic port's has only the status and the hash).

A pod's problem is its `last_reload_error` (the pod rejected the config: `Rejected`), else its
`problem` (with `--workers`: workers that serve different configs or are not ready yet), else why it
could not be asked. Apart from those, the routes whose backend it holds unavailable (it serves the
config, but cannot use the backend's TLS files): `held`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(frozen=True)
class PodReport:
    pod: str
    config_hash: str | None
    problem: str | None = None
    """The pod's `last_reload_error`, its `problem`, or why it could not be asked."""
    rejected: bool = False
    """True when the problem is the pod's own failed reload (not a failed request)."""
    held: Mapping[str, str] = field(default_factory=dict)
    """Route name -> why the pod holds its backend unavailable (`backend <service>: <the gateway's error>`)."""


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
    return PodReport(pod, body.get("config_hash"), error or body.get("problem"), rejected=error is not None,
                     held=_held(body.get("unavailable_backends")))


def _held(backends: Any) -> dict[str, str]:
    """`unavailable_backends` by route; what is not as the gateway writes it is passed over."""
    held = {}
    for backend in backends if isinstance(backends, list) else []:
        if isinstance(backend, dict) and isinstance(backend.get("routes"), list):
            why = f"backend {backend.get('backend_service')}: {backend.get('error')}"
            held.update({route: why for route in backend["routes"] if isinstance(route, str)})
    return held
