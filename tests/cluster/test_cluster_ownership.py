"""Ownership by namespace labels and the last accepted version on a real API server, across an operator restart."""

from __future__ import annotations

import json

from tests.cluster.controlplane import ControlPlane
from tests.cluster.objects import (
    ZERO,
    conditions,
    create,
    gatewayroute,
    namespace,
    path_of,
    route_names,
    routes_yaml,
    summary,
)
from tests.cluster.parts import CM_PATH, wait_for

OWNERSHIP = """
ownership:
  routes:
    - namespaces: {labels: {team: orders}}
      hostnames: [orders.example.com]
"""


def last_accepted(plane: ControlPlane, body: dict) -> dict | None:
    return (plane.api.get(path_of(body)).get("status") or {}).get("lastAccepted")


def test_labels_decide_and_a_broken_route_keeps_its_last_accepted_version(cluster: ControlPlane, operators) -> None:
    config_yaml = cluster.api.get(CM_PATH)["data"]["config.yaml"] + OWNERSHIP
    cluster.api.merge(CM_PATH, {"data": {"config.yaml": config_yaml}})
    orders_ns, other_ns = namespace(cluster, "orders-team"), namespace(cluster, "other-team")
    cluster.kubectl("label", "namespace", orders_ns, "team=orders")
    match = {"host": "orders.example.com", "path_prefix": "/orders"}
    orders = gatewayroute("orders", orders_ns, "/orders", match=match, rewrite_prefix="/v1")
    grab = gatewayroute("grab", other_ns, "/orders", match=match)
    create(cluster, orders)
    create(cluster, grab)
    operator = operators()
    wait_for(lambda: summary(cluster, grab).get("Accepted") == ("False", "NotAllowed"), what="other-team refused")
    assert "namespace 'other-team' may attach no routes" in conditions(cluster, grab)["Accepted"]["message"]
    wait_for(lambda: (last_accepted(cluster, orders) or {}).get("spec", {}).get("rewrite_prefix") == "/v1", what="kept")
    assert route_names(cluster) == ["orders-team.orders"]

    # A valid edit that removes a field: the kept copy loses it too (the merge patch says so).
    cluster.kubectl("patch", "gatewayroute", "orders", "-n", orders_ns, "--type", "json",
                    "-p", json.dumps([{"op": "remove", "path": "/spec/rewrite_prefix"}]))
    wait_for(lambda: (last_accepted(cluster, orders) or {}).get("generation") == 2, what="generation 2 kept")
    assert "rewrite_prefix" not in last_accepted(cluster, orders)["spec"]
    served = routes_yaml(cluster)

    # The owner breaks it while no operator runs (a path the CRD lets through and the model refuses).
    operator.stop()
    cluster.kubectl("patch", "gatewayroute", "orders", "-n", orders_ns, "--type", "merge",
                    "-p", json.dumps({"spec": {"backend": {"timeout": ZERO}}}))
    cluster.kubectl("label", "namespace", other_ns, "team=orders")  # now other-team may claim the host too
    operators("restarted")
    wait_for(lambda: summary(cluster, orders).get("Accepted") == ("False", "Invalid"), what="orders invalid")
    wait_for(lambda: summary(cluster, grab).get("Accepted") == ("False", "Conflicted"), what="grab loses to the kept version")
    assert routes_yaml(cluster) == served, "the last accepted version stays, from the CR's own status"
    found = conditions(cluster, orders)
    assert (found["Accepted"]["observedGeneration"], last_accepted(cluster, orders)["generation"]) == (3, 2)
    assert "its last accepted version" in conditions(cluster, grab)["Accepted"]["message"]
