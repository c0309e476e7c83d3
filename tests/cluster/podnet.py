"""`podnet.py IP gateway-args...`: run `gateway` as inside a pod's own network namespace.

In a pod, `listen.address: 0.0.0.0` means the pod's IP. Here all pods share the host's loopback, so the
wildcard becomes the pod's 127.0.0.x address: every pod serves the same ConfigMap on the same ports, as
real pods do, and the operator reaches each at its `status.podIP`. Nothing else of the gateway changes.
"""

from __future__ import annotations

import sys
from typing import Any

from aiohttp import web


def main() -> int:
    ip, args = sys.argv[1], sys.argv[2:]
    bind = web.TCPSite.__init__

    def pod_address(site: web.TCPSite, runner: Any, host: str | None = None, *rest: Any, **kwargs: Any) -> None:
        bind(site, runner, ip if host in (None, "0.0.0.0") else host, *rest, **kwargs)

    web.TCPSite.__init__ = pod_address  # type: ignore[method-assign]
    from apigw.cli import main as gateway

    return gateway(args)


if __name__ == "__main__":
    sys.exit(main())
