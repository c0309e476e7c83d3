"""The operator's RBAC in `manifests/operator/rbac.yaml` against the requests the operator really sends.

The operator runs for real against KMock (leader election on, so the Lease calls are seen too) through
create, update, status, event, restart-setting and delete; every API request it sends is turned into
the (apiGroup, resource, verb, name) RBAC would check, and must be allowed by the manifests' rules.
Conversely, every rule must be used by some request: nothing granted that is never called.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from kmock import Request

from apigw_operator.cluster import Target
from apigw_operator.handlers import Options
from tests.operator.kube import CM, NS, GatewayPod, cr, eventually, operator, route

ROOT = Path(__file__).resolve().parents[2]
ROUTES = "gateway.apigw.io/v1alpha1/gatewayroutes"
POLICIES = "gateway.apigw.io/v1alpha1/ratelimitpolicies"
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/apigw-operator"
VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
# /api/v1/... or /apis/<group>/<version>/..., then [namespaces/<ns>/]<resource>[/<name>[/<subresource>]]
RESOURCE_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<namespace>[^/]+))?"
    r"/(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)


def rbac_rules() -> dict[str, list[dict[str, Any]]]:
    """`cluster` (ClusterRole) and `namespace` (Role in api-gateway) rules of the operator's manifests."""
    docs = list(yaml.safe_load_all((ROOT / "manifests/operator/rbac.yaml").read_text()))
    return {
        "cluster": next(d for d in docs if d["kind"] == "ClusterRole")["rules"],
        "namespace": next(d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == NS)["rules"],
    }


def attributes(method: str, path: str, query: str) -> tuple[str, str, str, str | None, str | None] | None:
    """(group, resource[/sub], verb, name, namespace) as the API server authorizes the request; None for
    discovery (non-resource URLs every authenticated user may read)."""
    found = RESOURCE_PATH.match(path)
    if not found:
        return None
    name, sub = found["name"], found["sub"]
    if method == "GET":
        verb = "get" if name else ("watch" if "watch=true" in query or "watch=1" in query else "list")
    else:
        verb = VERBS[method]
    resource = found["resource"] + (f"/{sub}" if sub else "")
    return found["group"] or "", resource, verb, name, found["namespace"]


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str | None]]:
    """Each rule spelled out as (group, resource, verb, name or None for any name)."""
    return {
        (group, resource, verb, name)
        for rule in rules for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]
        for name in rule.get("resourceNames", [None])
    }


def allowed(granted: set[tuple[str, str, str, str | None]], group: str, resource: str, verb: str,
            name: str | None) -> tuple[str, str, str, str | None] | None:
    """The grant that lets this request through, if any."""
    for grant in ((group, resource, verb, None), (group, resource, verb, name)):
        if grant in granted:
            return grant
    return None


def serve_lease_updates(cluster: Any) -> None:
    """Answer the Lease's PUT as an API server does: the Lease sent replaces the one stored. KMock answers
    404, so every renewal failed and the operator stopped leading (and writing) its renew deadline (10 s)
    after it took the Lease: on a loaded machine, before the test had seen what it waits for."""
    def replace(request: Request) -> dict[str, Any]:
        cluster.objects["coordination.k8s.io/v1/leases", NS, request.name] = request.data
        return request.data
    cluster[f"put {LEASE}"] << replace


async def test_every_request_is_allowed_and_every_rule_is_used(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    serve_lease_updates(cluster)
    options = Options(resync_interval=0.2, leader_election=True, pod_url=lambda pod, ip, port: pods[pod].url)
    cluster.objects[POLICIES, "shop", "per-client"] = cr("RateLimitPolicy", "per-client", {"requests": 5, "period": "1m"})
    cluster.objects[ROUTES, "shop", "orders"] = route("orders", "/orders", ratelimit="per-client")
    async with operator(options):
        def written() -> bool:
            return "orders" in (cluster.objects["v1/configmaps", NS, CM].get("data") or {}).get("routes.yaml", "")
        await eventually(written)
        for pod in pods.values():  # the pods reload: Programmed turns True (another status patch and Event)
            pod.load(cluster.objects["v1/configmaps", NS, CM]["data"])
        config = cluster.objects["v1/configmaps", NS, CM]
        config["data"] = {**config["data"], "config.yaml": config["data"]["config.yaml"].replace("8080", "8081")}

        def rolled() -> bool:
            annotations = cluster.objects["apps/v1/deployments", NS, "api-gateway"]["spec"]["template"]["metadata"]
            return "gateway.apigw.io/restart-hash" in (annotations.get("annotations") or {})
        await eventually(rolled)
        before = {r.id for r in cluster}
        await cluster.delete("/apis/gateway.apigw.io/v1alpha1/namespaces/shop/gatewayroutes/orders")  # the watch sees it
        own = {r.id for r in cluster if r.method.value == "DELETE"} - before

        def emptied() -> bool:
            return "orders" not in cluster.objects["v1/configmaps", NS, CM]["data"].get("routes.yaml", "")
        await eventually(emptied)

        def renewed() -> bool:  # the Lease renewal
            return any(r.method.value == "PUT" and r.url.path == LEASE for r in cluster)
        await eventually(renewed)

    # Routes past one ConfigMap fill the shard ConfigMaps (patch); past them all, those in force are read (get).
    sharded = replace(options, configmap_limit=700, leader_election=False)  # the Lease's calls are seen above
    for i in range(2 * Target.route_shards):  # two fill a shard (half of 700 bytes)
        cluster.objects[ROUTES, "shop", f"r{i:02d}"] = route(f"r{i:02d}", f"/r{i:02d}")
    async with operator(sharded):
        last = f"routes-{Target.route_shards:03d}.yaml"
        await eventually(lambda: last in cluster.objects["v1/configmaps", NS, CM]["data"]["routes.yaml"])
    cluster.objects[ROUTES, "shop", "late"] = route("late", "/late")
    async with operator(sharded):
        def refused() -> bool:
            late = cluster.objects[ROUTES, "shop", "late"].get("status") or {}
            return any(c["reason"] == "ConfigTooLarge" for c in late.get("conditions") or [])
        await eventually(refused)

    rules = rbac_rules()
    cluster_wide, in_gateway_namespace = grants(rules["cluster"]), grants(rules["namespace"])
    used = set()
    denied = []
    for request in cluster:
        if request.id in own:  # the test's own delete
            continue
        found = attributes(request.method.value, request.url.path, request.url.query_string)
        if found is None:
            continue
        group, resource, verb, name, namespace = found
        grant = allowed(cluster_wide, group, resource, verb, name)
        if grant is None and namespace == NS:
            grant = allowed(in_gateway_namespace, group, resource, verb, name)
        if grant is None:
            denied.append(f"{request.method.value} {request.url.path}?{request.url.query_string} -> {found}")
        used.add(grant)
    assert not denied, "requests the RBAC would refuse:\n" + "\n".join(denied)
    assert (cluster_wide | in_gateway_namespace) - used == set(), "granted, never needed"
