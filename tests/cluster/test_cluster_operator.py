"""The operator process against a real API server, with the shipped RBAC: CR life cycle, status and Events."""

from __future__ import annotations

import json

from tests.cluster.controlplane import ControlPlane
from tests.cluster.objects import (
    conditions,
    create,
    gatewayroute,
    model_refused,
    namespace,
    path_of,
    ratelimitpolicy,
    route_names,
    routes_yaml,
    summary,
    writes_by,
)
from tests.cluster.parts import wait_for

ACCEPTED = {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs"), "Programmed": ("False", "Pending")}


def generations(plane: ControlPlane, body: dict) -> tuple[int, set[int]]:
    """(metadata.generation, every condition's observedGeneration)."""
    found = plane.api.get(path_of(body))
    return found["metadata"]["generation"], {c.get("observedGeneration") for c in found["status"]["conditions"]}


def test_create_update_invalid_dangling_delete(cluster: ControlPlane, operators) -> None:
    ns = namespace(cluster, "life")
    operator = operators()
    policy, orders = ratelimitpolicy("per-client", ns), gatewayroute("orders", ns, "/orders", ratelimit="per-client")
    create(cluster, policy)
    create(cluster, orders)
    wait_for(lambda: summary(cluster, orders) == ACCEPTED, what="orders accepted, pending pods")
    wait_for(lambda: summary(cluster, policy) == ACCEPTED, what="the policy's status, written in the same pass")
    rendered = routes_yaml(cluster)
    assert [(r["name"], r["ratelimit"]) for r in rendered["routes"]] == [("life.orders", "life.per-client")]
    assert [p["name"] for p in rendered["policies"]] == ["life.per-client"]
    assert generations(cluster, orders) == (1, {1})

    # A spec change bumps the generation (the real server's doing) and the conditions follow it.
    cluster.kubectl("patch", "gatewayroute", "orders", "-n", ns, "--type", "merge", "-p", '{"spec":{"match":{"path_prefix":"/v2/orders"}}}')
    wait_for(lambda: generations(cluster, orders) == (2, {2}), what="observedGeneration 2")
    assert routes_yaml(cluster)["routes"][0]["match"]["path_prefix"] == "/v2/orders"
    cluster.kubectl("label", "gatewayroute", "orders", "-n", ns, "team=shop")  # metadata only: no new generation
    assert generations(cluster, orders) == (2, {2})

    # Passes the CRD schema and its CEL rules, fails the data plane's model (a timeout of 0.0 s):
    # excluded and told why; the others stay.
    encoded = model_refused(gatewayroute("encoded", ns, "/encoded"))
    dangling = gatewayroute("dangling", ns, "/dangling", ratelimit="missing")
    create(cluster, encoded)
    create(cluster, dangling)
    wait_for(lambda: summary(cluster, encoded).get("Accepted") == ("False", "Invalid"), what="encoded rejected")
    assert "spec.backend.timeout" in conditions(cluster, encoded)["Accepted"]["message"]
    wait_for(lambda: summary(cluster, dangling).get("ResolvedRefs") == ("False", "PolicyNotFound"), what="dangling reference")
    assert "'missing' not found" in conditions(cluster, dangling)["ResolvedRefs"]["message"]
    assert route_names(cluster) == ["life.orders"]
    assert summary(cluster, orders) == ACCEPTED

    cluster.kubectl("delete", "gatewayroute", "orders", "-n", ns)
    wait_for(lambda: route_names(cluster) == [], what="orders gone from routes.yaml")

    events = json.loads(cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    seen = {(e["involvedObject"]["name"], e["reason"], e["type"]) for e in events}
    assert {("orders", "Accepted", "Normal"), ("encoded", "Invalid", "Warning"), ("dangling", "PolicyNotFound", "Warning")} <= seen
    printed = cluster.kubectl("get", "events", "-n", ns).stdout
    assert "gatewayroute/dangling" in printed and "PolicyNotFound" in printed

    # Every write to a CR went through /status; the main resource was never written by the operator.
    cr_writes = [e for e in writes_by(cluster, operator.credential) if e["objectRef"].get("apiGroup") == "gateway.apigw.io"]
    assert cr_writes and {(e["verb"], e["objectRef"].get("subresource")) for e in cr_writes} == {("patch", "status")}


def test_status_is_written_only_through_the_subresource(cluster: ControlPlane, operators) -> None:
    ns = namespace(cluster, "subresource")
    route = gatewayroute("orders", ns, "/orders")
    route["status"] = {"conditions": [{"type": "Accepted", "status": "True", "reason": "Forged", "message": "by hand",
                                       "lastTransitionTime": "2025-01-01T00:00:00Z"}]}
    created = create(cluster, route)
    assert "status" not in created  # dropped on create: status belongs to the subresource
    operators()
    wait_for(lambda: summary(cluster, route) == ACCEPTED, what="status from the operator")
    before = conditions(cluster, route)
    patched = cluster.kubectl("patch", "gatewayroute", "orders", "-n", ns, "--type", "merge",
                              "-p", '{"status": {"conditions": []}}')
    assert "no change" in patched.stdout
    assert conditions(cluster, route) == before
