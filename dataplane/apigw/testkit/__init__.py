"""Real parts for tests and benchmarks: a Redis process, backend servers, signed tokens.

It ships with the code so that tests, `bench/` and users' own tests start the same real things.
"""

from typing import Any


def route(name: str, url: str, **extra: Any) -> dict[str, Any]:
    """A route for a config dict: backend service named after the route unless `service=` says otherwise."""
    return {"name": name, "backend": {"service": extra.pop("service", name), "url": url}, **extra}
