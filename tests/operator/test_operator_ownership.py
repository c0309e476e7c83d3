"""Ownership and no hijack on failure, end to end: the operator for real (kopf) against KMock."""

from __future__ import annotations

from typing import Any

import yaml

from tests.operator.kube import CM, CONFIG_YAML, NS, GatewayPod, cr, eventually, operator
from tests.operator.test_operator_faults import configmap
from tests.operator.test_operator_kmock import CM_PATH, ROUTES, data, options, status, summary, sync_pods

BY_LABEL = CONFIG_YAML + """\
ownership:
  routes:
    - namespaces: {labels: {team: shop}}
      hostnames: [shop.example.com]
      path_prefixes: [/orders]
"""
GRANT = """\
  policy_references:
    - from: {names: [shop]}
      namespace: platform
"""
NAMESPACE = "/api/v1/namespaces/shop"


def gwr(
    name: str, namespace: str = "shop", path: str = "/orders", created: str = "2025-01-01T00:00:00Z",
    host: str = "shop.example.com", **spec: Any,
) -> dict:
    body = {"match": {"host": host, "path_prefix": path}, "backend": {"service": f"{namespace}-{name}", "url": f"http://{name}:80"}, **spec}
    return cr("GatewayRoute", name, body, created=created, namespace=namespace)


def thief(kmock: Any) -> dict[str, dict[str, Any]]:
    """The conditions of GatewayRoute other/thief."""
    found = (kmock.objects[ROUTES, "other", "thief"].get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in found}


def route_names(kmock: Any) -> list[str]:
    return [r["name"] for r in (yaml.safe_load(data(kmock).get("routes.yaml") or "") or {}).get("routes") or []]


async def test_namespace_labels_and_a_policy_grant_decide_in_config_yaml(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects["v1/configmaps", NS, CM] = configmap(BY_LABEL)
    cluster.objects["v1/namespaces", None, "platform"] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "platform"}}
    cluster.objects[ROUTES, "shop", "orders"] = gwr("orders", ratelimit="platform/global")
    cluster.objects[ROUTES, "shop", "pay"] = gwr("pay", host="pay.example.com")
    cluster.objects[ROUTES, "shop", "admin"] = gwr("admin", path="/admin")
    cluster.objects["gateway.apigw.io/v1alpha1/ratelimitpolicies", "platform", "global"] = cr(
        "RateLimitPolicy", "global", {"requests": 5, "period": "1s"}, namespace="platform")
    async with operator(options(pods)):
        await eventually(lambda: summary(cluster, "orders").get("Accepted") == ("False", "NotAllowed"))
        assert status(cluster, "orders")["Accepted"]["message"] == (
            "namespace 'shop' may attach no routes: no entry of ownership.routes in config.yaml selects it")
        assert route_names(cluster) == []

        await cluster.patch(NAMESPACE, json={"metadata": {"labels": {"team": "shop"}}})  # a namespace event wakes it
        await eventually(lambda: summary(cluster, "orders").get("Accepted") == ("True", "Accepted"))
        assert summary(cluster, "orders")["ResolvedRefs"] == ("False", "RefNotPermitted")
        assert route_names(cluster) == []
        await eventually(lambda: all("ownership.routes[0]" in status(cluster, name)["Accepted"]["message"] for name in ("pay", "admin")))
        assert status(cluster, "pay")["Accepted"]["message"] == (
            "spec.match.host 'pay.example.com' is not among the hosts namespace 'shop' may claim "
            "(ownership.routes[0].hostnames: shop.example.com)")
        assert status(cluster, "admin")["Accepted"]["message"] == (
            "spec.match.path_prefix '/admin' on host 'shop.example.com' is outside the paths namespace 'shop' may "
            "claim there (ownership.routes[0].path_prefixes: /orders)")
        assert summary(cluster, "admin")["Accepted"] == ("False", "NotAllowed")

        await cluster.patch(CM_PATH, json={"data": {"config.yaml": BY_LABEL + GRANT}})
        await eventually(lambda: route_names(cluster) == ["shop.orders"])
        assert "ratelimit: platform.global" in data(cluster)["routes.yaml"]
        await eventually(lambda: summary(cluster, "orders")["ResolvedRefs"] == ("True", "ResolvedRefs"))  # same pass


async def test_a_broken_route_keeps_its_traffic_across_an_operator_restart(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects[ROUTES, "shop", "orders"] = gwr("orders")
    async with operator(options(pods)):
        await eventually(lambda: route_names(cluster) == ["shop.orders"])
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("True", "Programmed"))
        await eventually(lambda: cluster.objects[ROUTES, "shop", "orders"]["status"].get("lastAccepted"))
    good = data(cluster)["routes.yaml"]

    # While no operator runs, the owner breaks the route (KMock keeps no generation: set it as a server
    # would), and another team creates a route for the same host and path.
    await cluster.patch("/apis/gateway.apigw.io/v1alpha1/namespaces/shop/gatewayroutes/orders",
                        json={"metadata": {"generation": 2}, "spec": {"match": {"path_prefix": "orders"}}})
    await cluster.post("/apis/gateway.apigw.io/v1alpha1/namespaces/other/gatewayroutes",
                       json=gwr("thief", "other", created="2025-02-01T00:00:00Z"))
    async with operator(options(pods)):
        await eventually(lambda: summary(cluster, "orders").get("Accepted") == ("False", "Invalid"))
        await eventually(lambda: thief(cluster).get("Accepted", {}).get("reason") == "Conflicted")
        assert data(cluster)["routes.yaml"] == good, "the last accepted version, from the CR's status"
        await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("True", "Programmed"))
        conditions = status(cluster, "orders")
        assert conditions["Accepted"]["observedGeneration"] == 2
        assert conditions["Programmed"]["observedGeneration"] == 1
        assert conditions["Programmed"]["message"] == "2/2 pods serve its last accepted version (generation 1)"
        assert "same host, path and method as route 'shop.orders' (GatewayRoute shop/orders, its last accepted version)" in (
            thief(cluster)["Accepted"]["message"])
        assert conditions["Accepted"]["message"].endswith("; wins, as the older, its conflicts with GatewayRoute other/thief")

        await cluster.delete("/apis/gateway.apigw.io/v1alpha1/namespaces/shop/gatewayroutes/orders")
        await eventually(lambda: route_names(cluster) == ["other.thief"])  # deleted by its owner: really gone


async def test_a_disabled_route_shows_disabled_not_programmed(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects[ROUTES, "shop", "off"] = gwr("off", enabled=False)
    async with operator(options(pods)):
        await eventually(lambda: route_names(cluster) == ["shop.off"])
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, "off").get("Programmed") == ("False", "Disabled"))
        assert status(cluster, "off")["Programmed"]["message"] == "disabled by spec.enabled: false; 2/2 pods serve its current spec"
