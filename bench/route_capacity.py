"""How many routes the operator can write before it reports ConfigTooLarge, measured with its own code.

Renders N copies of the example GatewayRoute (`crds/examples/gatewayroute-orders.yaml`: host, prefix,
methods, backend with timeouts, rewrite, auth scopes, a rate-limit policy and a body limit; each copy
with its own name, prefix and rewrite, over 500 backend services) beside the shipped `config.yaml`
(`manifests/gateway/configmap.yaml`), and asks the reconciler's `route_files` whether they fit, as a
pass does before it writes. Searches the largest N that fits, for each `--route-shards` given, and
prints it with the size of one rendered route and the message the CRs get one route past it.

    PYTHONPATH=dataplane:operator python bench/route_capacity.py [--shards 0 3]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from apigw_operator.cluster import Target
from apigw_operator.reconciler import CONFIGMAP_LIMIT, route_files, too_large_message
from apigw_operator.render import Renderer, Rendering

ROOT = Path(__file__).resolve().parent.parent


def example(name: str) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "crds" / "examples" / name).read_text())
    body["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    return body


ROUTE, POLICY = example("gatewayroute-orders.yaml"), example("ratelimitpolicy-per-user.yaml")
CONFIGMAP = next(d for d in yaml.safe_load_all((ROOT / "manifests" / "gateway" / "configmap.yaml").read_text())
                 if d["metadata"]["name"] == "api-gateway-config")


def routes(count: int) -> list[dict[str, Any]]:
    found = []
    for i in range(count):
        body = copy.deepcopy(ROUTE)
        body["metadata"]["name"] = f"orders-{i:05d}"
        spec = body["spec"]
        spec["match"]["path_prefix"] = f"/orders-{i:05d}"
        spec["rewrite_prefix"] = f"/v1/orders-{i:05d}"
        spec["backend"]["service"] = f"orders-{i % 500}"
        spec["backend"]["url"] = f"http://orders-{i % 500}.shop.svc.cluster.local:8080"
        found.append(body)
    return found


def rendered(count: int) -> Rendering:
    rendering = Renderer().render(routes(count), [POLICY], CONFIGMAP["data"]["config.yaml"])
    assert not rendering.errors, rendering.errors[:3]
    return rendering


def fits(count: int, target: Target) -> bool:
    return route_files(CONFIGMAP, rendered(count), target, CONFIGMAP_LIMIT) is not None


def largest(target: Target) -> int:
    """The largest route count that fits: doubled until one does not, then bisected."""
    low, high = 0, 1000
    while fits(high, target):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle, target) else (low, middle)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[0, Target.route_shards], help="--route-shards values")
    args = parser.parse_args()
    sample = rendered(1000)
    per_route = (len(rendered(2000).routes_yaml.encode()) - len(sample.routes_yaml.encode())) / 1000
    print(f"one rendered route: {per_route:.0f} bytes of routes.yaml; ConfigMap limit {CONFIGMAP_LIMIT} bytes")
    for shards in args.shards:
        target = replace(Target(), route_shards=shards)
        started = time.perf_counter()
        count = largest(target)
        files = route_files(CONFIGMAP, rendered(count), target, CONFIGMAP_LIMIT)
        assert files is not None
        print(f"\n--route-shards {shards}: {count} routes fit ({len(files) - 1} shards used), "
              f"{count + 1} do not (searched in {time.perf_counter() - started:.0f} s)")
        for key, text in files.items():
            print(f"    {key}: {len(text.encode())} bytes")
        message = too_large_message(CONFIGMAP, rendered(count + 1), target, CONFIGMAP_LIMIT)
        print(f"  the CRs past it get Programmed=False ConfigTooLarge:\n    {message}")


if __name__ == "__main__":
    main()
