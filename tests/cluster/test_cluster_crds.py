"""The CRDs on a real API server: the shipped examples, printer columns, and what happens to unknown fields."""

from __future__ import annotations

import yaml

from tests.cluster.controlplane import ROOT, ControlPlane
from tests.cluster.objects import (
    conditions,
    create,
    gatewayroute,
    namespace,
    ratelimitpolicy,
    route_names,
    summary,
    table,
)
from tests.cluster.parts import wait_for

EXAMPLES = sorted((ROOT / "crds/examples").glob("*.yaml"))


def test_examples_apply_and_print_their_columns(cluster: ControlPlane, operators) -> None:
    namespace(cluster, "shop")
    operators()
    applied = cluster.kubectl("apply", "-f", str(ROOT / "crds/examples")).stdout
    assert all(f"{yaml.safe_load(p.read_text())['metadata']['name']} created" in applied for p in EXAMPLES), applied
    orders = yaml.safe_load((ROOT / "crds/examples/gatewayroute-orders.yaml").read_text())
    wait_for(lambda: summary(cluster, orders).get("Accepted") == ("True", "Accepted"), what="orders accepted")

    routes = cluster.kubectl("get", "gatewayroutes", "-n", "shop").stdout
    assert routes.splitlines()[0].split() == ["NAME", "HOST", "PREFIX", "BACKEND", "ACCEPTED", "PROGRAMMED", "AGE"]
    row = table(routes)["orders"]
    assert (row["HOST"], row["PREFIX"], row["BACKEND"]) == ("api.example.com", "/orders", "http://orders.shop.svc.cluster.local:8080")
    assert (row["ACCEPTED"], row["PROGRAMMED"]) == ("True", "False")  # no gateway pods here: Pending
    wide = table(cluster.kubectl("get", "gwr", "-n", "shop", "-o", "wide").stdout)
    assert wide["status-page"]["PATH"] == "/status" and wide["status-page"]["PREFIX"] == ""

    policies = cluster.kubectl("get", "ratelimitpolicies", "-n", "shop").stdout
    assert policies.splitlines()[0].split() == ["NAME", "REQUESTS", "PERIOD", "KEY", "ACCEPTED", "PROGRAMMED", "AGE"]
    assert {k: table(policies)["per-user"][k] for k in ("REQUESTS", "PERIOD", "KEY")} == {"REQUESTS": "1000", "PERIOD": "1h", "KEY": "claim"}
    everything = cluster.kubectl("get", "apigw", "-n", "shop", "-o", "name").stdout.split()
    assert sorted(everything) == sorted(
        f"{'gatewayroute' if 'gatewayroute' in p.name else 'ratelimitpolicy'}.gateway.apigw.io/"
        f"{yaml.safe_load(p.read_text())['metadata']['name']}" for p in EXAMPLES
    )
    assert route_names(cluster) == ["shop.orders", "shop.status-page"]


def test_unknown_field_is_refused_by_kubectl_and_pruned_for_other_clients(cluster: ControlPlane, operators) -> None:
    namespace(cluster, "typo")
    create(cluster, ratelimitpolicy("per-client", "typo"))
    typo = gatewayroute("orders", "typo", "/orders", ratelimt="per-client")

    refused = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(typo), check=False)
    assert refused.returncode == 1 and 'unknown field "spec.ratelimt"' in refused.stderr, refused.stderr

    warnings: list[str] = []  # a client that asks for no field validation: the server warns and prunes
    cluster.api.request("POST", "/apis/gateway.apigw.io/v1alpha1/namespaces/typo/gatewayroutes", typo, warnings=warnings)
    assert any(w.startswith('299 ') and 'unknown field' in w and 'spec.ratelimt' in w for w in warnings), warnings
    stored = cluster.kubectl("get", "gatewayroute", "orders", "-n", "typo", "-o", "yaml").stdout
    assert "ratelimt" not in stored

    operators()
    wait_for(lambda: summary(cluster, typo).get("Accepted") == ("True", "Accepted"), what="the pruned route accepted")
    refs = conditions(cluster, typo)["ResolvedRefs"]
    assert refs["status"] == "True" and "not rate limited" in refs["message"], refs
    assert "not rate limited" in cluster.kubectl("describe", "gatewayroute", "orders", "-n", "typo").stdout


def test_crds_are_structural_and_server_side_appliable(cluster: ControlPlane) -> None:
    crds = sorted((ROOT / "crds").glob("*.yaml"))
    for path in crds:
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        found = cluster.api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")["status"]["conditions"]
        assert {c["type"]: c["status"] for c in found} == {"Established": "True", "NamesAccepted": "True"}, found
    reapplied = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds")).stdout
    assert reapplied.count("serverside-applied") == len(crds)  # as GitOps tools apply them
