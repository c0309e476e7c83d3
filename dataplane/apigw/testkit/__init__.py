"""Real parts for tests and benchmarks: a Redis process, backend servers, signed tokens.

It ships with the code so that tests, `bench/` and users' own tests start the same real things.
"""

from typing import Any

from apigw.config.model import DEFAULT_DENIED_BACKEND_NETWORKS


def route(name: str, url: str, **extra: Any) -> dict[str, Any]:
    """A route for a config dict: backend service named after the route unless `service=` says otherwise."""
    return {"name": name, "backend": {"service": extra.pop("service", name), "url": url}, **extra}


def loopback_allowed() -> dict[str, Any]:
    """config.yaml's `ownership` for a test whose routes.yaml (CR) backends listen on 127.0.0.1: the default
    `denied_backend_networks` less loopback."""
    return {"denied_backend_networks": [str(n) for n in DEFAULT_DENIED_BACKEND_NETWORKS if not n.is_loopback]}
