"""The operator running for real (kopf's own entry point) against KMock, asserting the requests it sends."""

from __future__ import annotations

from typing import Any

import yaml

from apigw.config.loader import parse_documents
from apigw.config.model import config_hash
from apigw.testkit.redis import free_port
from apigw_operator.cluster import Target
from apigw_operator.handlers import Options
from apigw_operator.render import render, text_hash
from tests.operator.kube import (
    CM,
    CONFIG_YAML,
    NS,
    GatewayPod,
    configmap,
    cr,
    eventually,
    gateway_pod,
    operator,
    route,
)

ROUTES = "gateway.apigw.io/v1alpha1/gatewayroutes"
POLICIES = "gateway.apigw.io/v1alpha1/ratelimitpolicies"
API = "/apis/gateway.apigw.io/v1alpha1/namespaces/shop"
CM_PATH = f"/api/v1/namespaces/{NS}/configmaps/{CM}"
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
POLICY = cr("RateLimitPolicy", "per-client", {"requests": 100, "period": "1m"})


def options(pods: dict[str, GatewayPod]) -> Options:
    """Each stand-in pod at its own URL, whatever port the operator would ask."""
    return Options(resync_interval=0.2, leader_election=False, pod_url=lambda pod, ip, port: pods[pod].url)


def writes(kmock: Any, path: str | None = None) -> list[tuple[str, str, Any]]:
    found = [(r.method.value, r.url.path, r.data) for r in kmock if r.method.value in WRITES]
    return [w for w in found if path is None or w[1] == path]


def data(kmock: Any) -> dict[str, str]:
    return kmock.objects["v1/configmaps", NS, CM].get("data") or {}


def status(kmock: Any, name: str, resource: str = ROUTES) -> dict[str, dict[str, Any]]:
    found = (kmock.objects[resource, "shop", name].get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in found}


def summary(kmock: Any, name: str, resource: str = ROUTES) -> dict[str, tuple[str, str]]:
    return {t: (c["status"], c["reason"]) for t, c in status(kmock, name, resource).items()}


def passes(kmock: Any) -> int:
    return sum(1 for r in kmock if r.method.value == "GET" and r.url.path == CM_PATH)


async def settle(kmock: Any, count: int = 2, timeout: float = 20.0) -> None:
    """Let `count` more full passes run."""
    start = passes(kmock)
    await eventually(lambda: passes(kmock) >= start + count, timeout)


def volume(kmock: Any) -> dict[str, str]:
    """The gateway's config volume: the ConfigMap and its route shards projected into one directory."""
    found = dict(data(kmock))
    for number in range(1, Target.route_shards + 1):
        found.update(kmock.objects["v1/configmaps", NS, Target().shard(number)].get("data") or {})
    return found


def sync_pods(kmock: Any, pods: dict[str, GatewayPod]) -> None:
    """The kubelet updated the volume and the pods reloaded it."""
    for pod in pods.values():
        pod.load(volume(kmock))


async def test_create_writes_routes_yaml_only_and_reports_programmed(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects[ROUTES, "shop", "orders"] = route("orders", "/orders", ratelimit="per-client")
    cluster.objects[POLICIES, "shop", "per-client"] = POLICY
    expected = render([route("orders", "/orders", ratelimit="per-client")], [POLICY], CONFIG_YAML)
    async with operator(options(pods)):
        await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("False", "Pending"))
        assert writes(cluster, CM_PATH)[0] == (
            "PATCH", CM_PATH,
            {
                "metadata": {"annotations": {
                    "gateway.apigw.io/routes-hash": text_hash(expected.routes_yaml),
                    "gateway.apigw.io/config-hash": expected.config_hash,
                }},
                "data": {"routes.yaml": expected.routes_yaml},
            },
        )
        assert data(cluster)["config.yaml"] == CONFIG_YAML
        assert yaml.safe_load(data(cluster)["routes.yaml"]) == {
            "routes": [{
                "name": "shop.orders", "match": {"path_prefix": "/orders"},
                "backend": {"service": "orders", "url": "http://orders.shop:8080"}, "ratelimit": "shop.per-client",
            }],
            "policies": [{"name": "shop.per-client", "requests": 100, "period": "1m"}],
        }
        assert summary(cluster, "orders") == {
            "Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs"), "Programmed": ("False", "Pending"),
        }
        served = config_hash(parse_documents(data(cluster)))
        assert cluster.objects["v1/configmaps", NS, CM]["metadata"]["annotations"]["gateway.apigw.io/config-hash"] == served
        assert status(cluster, "orders")["Programmed"]["message"] == "0/2 pods serve its current spec"

        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("True", "Programmed"))
        assert status(cluster, "orders")["Programmed"]["message"] == "2/2 pods serve its current spec"
        # the policy's status is written just after the route's, in the same pass
        await eventually(lambda: summary(cluster, "per-client", POLICIES).get("Programmed") == ("True", "Programmed"))

        def orders_events() -> set[tuple[str, str]]:  # kopf posts events from a queue of its own, a little later
            events = [body for _, path, body in writes(cluster) if path.endswith("/events")]
            return {(e["type"], e["reason"]) for e in events if e["involvedObject"]["name"] == "orders"}

        await eventually(lambda: orders_events() >= {("Normal", "Accepted"), ("Warning", "Pending"), ("Normal", "Programmed")})

    crs = [w for w in writes(cluster) if w[1].startswith(API)]
    assert crs and all(path.endswith("/status") for _, path, _ in crs), "CRs are written through /status only"
    orders = [body for _, path, body in crs if path == f"{API}/gatewayroutes/orders/status"]
    assert set(orders[-1]) == {"status"}
    assert [c["observedGeneration"] for c in orders[-1]["status"]["conditions"]] == [1, 1, 1]
    assert not writes(cluster, f"/apis/apps/v1/namespaces/{NS}/deployments/api-gateway")


async def test_update_and_delete_rewrite_routes_yaml(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects[ROUTES, "shop", "orders"] = route("orders", "/orders")
    cluster.objects[ROUTES, "shop", "cart"] = route("cart", "/cart", created="2025-01-02T00:00:00Z")
    async with operator(options(pods)):
        await eventually(lambda: "shop.cart" in data(cluster).get("routes.yaml", ""))
        await cluster.patch(f"{API}/gatewayroutes/orders", json={"spec": {"match": {"path_prefix": "/v2/orders"}}})
        await eventually(lambda: "/v2/orders" in data(cluster)["routes.yaml"])
        last = writes(cluster, CM_PATH)[-1][2]
        assert set(last) == {"metadata", "data"} and set(last["data"]) == {"routes.yaml"}

        await cluster.delete(f"{API}/gatewayroutes/cart")
        await eventually(lambda: "shop.cart" not in data(cluster)["routes.yaml"])
        assert [r["name"] for r in yaml.safe_load(data(cluster)["routes.yaml"])["routes"]] == ["shop.orders"]
        assert data(cluster)["config.yaml"] == CONFIG_YAML


async def test_invalid_spec_is_excluded_and_reported(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects[ROUTES, "shop", "orders"] = route("orders", "/orders")
    bad = route("bad", "no-slash")
    bad["spec"]["backend"]["url"] = "not a url"
    cluster.objects[ROUTES, "shop", "bad"] = bad
    async with operator(options(pods)):
        await eventually(lambda: summary(cluster, "bad").get("Accepted") == ("False", "Invalid"))
        message = status(cluster, "bad")["Accepted"]["message"]
        assert "spec.match.path_prefix: must start with /" in message and "spec.backend.url:" in message
        assert summary(cluster, "bad")["Programmed"] == ("False", "NotAccepted")
        assert [r["name"] for r in yaml.safe_load(data(cluster)["routes.yaml"])["routes"]] == ["shop.orders"]


async def test_dangling_reference_then_policy_created_then_deleted_then_route_deleted(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects[ROUTES, "shop", "orders"] = route("orders", "/orders", ratelimit="per-client")
    async with operator(options(pods)):
        await eventually(lambda: summary(cluster, "orders").get("ResolvedRefs") == ("False", "PolicyNotFound"))
        assert status(cluster, "orders")["ResolvedRefs"]["message"] == "RateLimitPolicy 'per-client' not found in namespace 'shop'"
        assert yaml.safe_load(data(cluster)["routes.yaml"])["routes"] == []

        await cluster.post(f"{API}/ratelimitpolicies", json=POLICY)
        await eventually(lambda: summary(cluster, "orders").get("ResolvedRefs") == ("True", "ResolvedRefs"))
        assert "ratelimit: shop.per-client" in data(cluster)["routes.yaml"]

        await eventually(lambda: (cluster.objects[ROUTES, "shop", "orders"].get("status") or {}).get("lastAccepted"))
        await cluster.delete(f"{API}/ratelimitpolicies/per-client")
        await eventually(lambda: summary(cluster, "orders").get("ResolvedRefs") == ("False", "PolicyNotFound"))
        # No hijack: the route keeps its last accepted version, with the policy as it was then.
        kept = yaml.safe_load(data(cluster)["routes.yaml"])
        assert [(r["name"], r["ratelimit"]) for r in kept["routes"]] == [("shop.orders", "shop.per-client")]
        assert kept["policies"] == [{"name": "shop.per-client", "requests": 100, "period": "1m"}]
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("True", "Programmed"))
        assert status(cluster, "orders")["Programmed"]["message"] == "2/2 pods serve its last accepted version (generation 1)"

        await cluster.delete(f"{API}/gatewayroutes/orders")  # deleted by its owner: really removed
        await eventually(lambda: yaml.safe_load(data(cluster)["routes.yaml"]) == {"routes": [], "policies": []})


async def test_conflict_older_route_wins(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects[ROUTES, "shop", "old"] = route("old", "/orders", created="2025-01-01T00:00:00Z")
    cluster.objects[ROUTES, "shop", "new"] = route("new", "/orders", created="2025-03-01T00:00:00Z")
    async with operator(options(pods)):
        await eventually(lambda: summary(cluster, "new").get("Accepted") == ("False", "Conflicted"))
        assert "same host, path and method as route 'shop.old'" in status(cluster, "new")["Accepted"]["message"]
        await eventually(lambda: summary(cluster, "old").get("Accepted") == ("True", "Accepted"))
        assert [r["name"] for r in yaml.safe_load(data(cluster)["routes.yaml"])["routes"]] == ["shop.old"]


async def test_noop_resync_sends_no_write(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects[ROUTES, "shop", "orders"] = route("orders", "/orders", ratelimit="per-client")
    cluster.objects[POLICIES, "shop", "per-client"] = POLICY
    async with operator(options(pods)):
        await eventually(lambda: "shop.orders" in data(cluster).get("routes.yaml", ""))
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("True", "Programmed"))
        await settle(cluster)
        before = writes(cluster)
        await settle(cluster, 5)
        assert writes(cluster) == before


async def test_restart_settings_roll_the_deployment_and_nothing_else_does(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    deployment = f"/apis/apps/v1/namespaces/{NS}/deployments/api-gateway"
    async with operator(options(pods)):
        await eventually(lambda: (cluster.objects["v1/configmaps", NS, CM]["metadata"].get("annotations") or {}).get("gateway.apigw.io/restart-hash"))
        first = cluster.objects["v1/configmaps", NS, CM]["metadata"]["annotations"]["gateway.apigw.io/restart-hash"]

        hand_edit = CONFIG_YAML.replace("fail_closed", "fail_open")  # the runbook's edit: applied live
        await cluster.patch(CM_PATH, json={"data": {"config.yaml": hand_edit}})
        await settle(cluster, 3)
        assert not writes(cluster, deployment)
        assert data(cluster)["config.yaml"] == hand_edit

        await cluster.patch(CM_PATH, json={"data": {"config.yaml": hand_edit.replace("8080", "8081")}})
        await eventually(lambda: writes(cluster, deployment))
        new = render([], [], hand_edit.replace("8080", "8081")).restart_hash
        assert new != first
        assert writes(cluster, deployment) == [
            ("PATCH", deployment, {"spec": {"template": {"metadata": {"annotations": {"gateway.apigw.io/restart-hash": new}}}}})
        ]
        await settle(cluster, 3)
        assert len(writes(cluster, deployment)) == 1


async def test_broken_config_yaml_keeps_last_good_routes_and_pod_rejection_shows(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    cluster.objects[ROUTES, "shop", "orders"] = route("orders", "/orders")
    async with operator(options(pods)):
        await eventually(lambda: "shop.orders" in data(cluster).get("routes.yaml", ""))
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("True", "Programmed"))
        good = data(cluster)["routes.yaml"]

        await cluster.patch(CM_PATH, json={"data": {"config.yaml": "listen:\n  port: http\n"}})
        await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("False", "ConfigInvalid"))
        assert "config.yaml:2: listen.port" in status(cluster, "orders")["Programmed"]["message"]
        assert data(cluster)["routes.yaml"] == good

        pods["api-gateway-b"].load(data(cluster))  # the pod rejects the broken file and keeps its config
        await cluster.patch(CM_PATH, json={"data": {"config.yaml": CONFIG_YAML}})
        await cluster.post(f"{API}/gatewayroutes", json=route("cart", "/cart", created="2025-02-01T00:00:00Z"))
        await eventually(lambda: summary(cluster, "cart").get("Programmed") == ("False", "Rejected"))
        assert status(cluster, "cart")["Programmed"]["message"].startswith("0/2 pods serve its current spec ")
        assert "api-gateway-b: config.yaml:2: listen.port" in status(cluster, "cart")["Programmed"]["message"]


async def test_a_route_whose_backend_tls_files_the_pods_cannot_use_is_reported_and_blocks_no_other(
    cluster: Any, pods: dict[str, GatewayPod], tmp_path: Any
) -> None:
    """The operator cannot see the pods' files: the CR is Accepted and written; the pods load the config, hold
    that backend unavailable and say so on their health endpoint, and the CR's Programmed says it. Once the
    file is there (the pods reload it), the CR is Programmed."""
    from apigw.testkit.certs import write_self_signed

    ca_file = tmp_path / "ca.pem"
    evil = route("evil", "/evil")
    evil["spec"]["backend"] = {"service": "evil", "url": "https://evil.shop:443", "tls": {"ca_file": str(ca_file)}}
    cluster.objects[ROUTES, "shop", "orders"] = route("orders", "/orders")
    cluster.objects[ROUTES, "shop", "evil"] = evil
    async with operator(options(pods)):
        await eventually(lambda: "shop.evil" in data(cluster).get("routes.yaml", ""))
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, "evil").get("Programmed") == ("False", "BackendTLSUnusable"))
        message = status(cluster, "evil")["Programmed"]["message"]
        assert message.startswith("2/2 pods serve its current spec; 2 hold its backend unavailable"), message
        assert f"backend evil: cannot use the TLS files: ca_file {ca_file}: No such file or directory" in message
        assert summary(cluster, "evil")["Accepted"] == ("True", "Accepted")
        await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("True", "Programmed"))  # same pass

        write_self_signed(ca_file, tmp_path / "ca.key", name="evil.shop")
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, "evil").get("Programmed") == ("True", "Programmed"))


async def test_pods_are_asked_on_the_metrics_port_config_yaml_names(cluster: Any) -> None:
    """The operator's own pod URLs: the pod's IP and `listen.metrics_port`, whose `/_health/ready` carries
    `last_reload_error`. Nothing listens on the traffic port here: every answer comes from the metrics port."""
    metrics_port = free_port()
    config_yaml = f"listen:\n  port: {free_port()}\n  metrics_port: {metrics_port}\n"
    cluster.objects["v1/configmaps", NS, CM] = configmap(config_yaml)
    pods = {"api-gateway-a": GatewayPod(), "api-gateway-b": GatewayPod()}
    for (name, pod), ip in zip(pods.items(), ("127.0.0.2", "127.0.0.3"), strict=True):
        cluster.objects["v1/pods", NS, name] = gateway_pod(name, ip)
        await pod.start(ip, metrics_port)
    cluster.objects[ROUTES, "shop", "orders"] = route("orders", "/orders")
    try:
        async with operator(Options(resync_interval=0.2, leader_election=False)):
            await eventually(lambda: "shop.orders" in data(cluster).get("routes.yaml", ""))
            sync_pods(cluster, pods)
            await eventually(lambda: summary(cluster, "orders").get("Programmed") == ("True", "Programmed"))
            assert status(cluster, "orders")["Programmed"]["message"] == "2/2 pods serve its current spec"

            await cluster.post(f"{API}/gatewayroutes", json=route("cart", "/cart", created="2025-02-01T00:00:00Z"))
            await eventually(lambda: "shop.cart" in data(cluster)["routes.yaml"])
            pods["api-gateway-a"].load(data(cluster))
            pods["api-gateway-b"].last_reload_error = "/etc/gateway/routes.yaml:9: routes[1].backend.url: bad"
            await eventually(lambda: summary(cluster, "cart").get("Programmed") == ("False", "Rejected"))
            assert status(cluster, "cart")["Programmed"]["message"] == (
                "1/2 pods serve its current spec (api-gateway-b: /etc/gateway/routes.yaml:9: routes[1].backend.url: bad)")
    finally:
        for pod in pods.values():
            await pod.stop()
