"""The admission webhook's decision at scale: 5,000 GatewayRoutes + 50 conflicting ones in the index (their
statuses as the operator wrote them), one review at a time as a replica answers them.

Prints how long each kind of review takes with a warm renderer (the first one fills it): a new route that
is admitted, one refused for a conflict, and an edit refused for pushing out a served route (the one case
that renders the world twice). The webhook's timeoutSeconds is 10; past it the API server admits.

    PYTHONPATH=dataplane:operator python bench/operator_admission.py [--routes 5000] [--conflicts 50]
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

from operator_render import CONFIG_YAML, crs

from apigw_operator.admission import decide
from apigw_operator.cluster import Target
from apigw_operator.render import ROUTE, Renderer

CONFIGMAP = {"metadata": {"name": "api-gateway-config", "namespace": "api-gateway"}, "data": {"config.yaml": CONFIG_YAML}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--routes", type=int, default=5000)
    parser.add_argument("--conflicts", type=int, default=50)
    args = parser.parse_args()
    routes = crs(args.routes, args.conflicts)
    for index, body in enumerate(routes):
        status = "True" if index < args.routes else "False"  # the newer duplicates lost: Conflicted
        body["status"] = {"conditions": [{"type": "Accepted", "status": status}]}

    def route(name: str, path: str, created: str) -> dict:
        return {"metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
                "spec": {"match": {"path_prefix": path, "methods": ["GET", "POST"]},
                         "backend": {"service": name, "url": f"http://{name}.shop:8080"}}}

    grab = copy.deepcopy(routes[1])  # older than r2, wants its path
    grab["spec"]["match"]["path_prefix"] = "/api/r2"
    cases = [
        ("first review (fills the renderer)", route("first", "/first", "2026-01-01T00:00:00Z")),
        ("new route, admitted", route("fresh", "/fresh", "2026-01-01T00:00:00Z")),
        ("new route, refused: conflict", route("late", "/api/r3", "2026-01-01T00:00:00Z")),
        ("edit, refused: pushes one out", grab),
    ]
    renderer = Renderer()
    for label, candidate in cases:
        start = time.perf_counter()
        decision = decide(renderer, ROUTE, candidate, routes, [], CONFIGMAP, Target(), 1024 * 1024)
        took = time.perf_counter() - start
        verdict = "admitted" if decision.allowed else f"refused: {decision.message[:70]}"
        print(f"{label:>34}: {took:.2f} s ({verdict})")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
