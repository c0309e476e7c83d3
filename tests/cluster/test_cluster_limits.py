"""What only a real API server decides: which namespaces the operator may watch, and the 1 MiB ConfigMap limit."""

from __future__ import annotations

import re
import urllib.request

from tests.cluster.controlplane import ControlPlane
from tests.cluster.objects import conditions, create, gatewayroute, namespace, requests_by, route_names, summary
from tests.cluster.parts import wait_for


def test_namespace_mode_renders_only_its_namespaces(cluster: ControlPlane, operators) -> None:
    mine, other = namespace(cluster, "team-a"), namespace(cluster, "team-b")
    outside = gatewayroute("outside", other, "/outside")
    create(cluster, outside)
    operators("operator", "--namespace", mine)
    create(cluster, gatewayroute("first", mine, "/first"))
    wait_for(lambda: route_names(cluster) == ["team-a.first"], what="team-a's route rendered")
    create(cluster, gatewayroute("second", mine, "/second"))  # a later pass, still blind to team-b
    wait_for(lambda: route_names(cluster) == ["team-a.first", "team-a.second"], what="team-a's second route")
    assert conditions(cluster, outside) == {}


def test_configmap_over_1mib_is_not_written_and_reported(cluster: ControlPlane, operators) -> None:
    ns = namespace(cluster, "big")
    small = gatewayroute("small", ns, "/small")
    create(cluster, small)
    first = operators("first")
    wait_for(lambda: route_names(cluster) == ["big.small"], what="the small route rendered")
    first.stop()
    # Each CR is well under the API server's per-object limit; together they overflow the ConfigMap.
    bulky = [gatewayroute(f"bulky-{i}", ns, f"/bulky-{i}", auth={"required": True, "scopes": ["s" * 1000] * 400})
             for i in range(3)]
    for route in bulky:
        create(cluster, route)
    operator = operators("second")

    def reported() -> dict:
        found = conditions(cluster, bulky[-1]).get("Programmed", {})
        return found if found.get("reason") == "ConfigTooLarge" else {}
    refused = wait_for(reported, what="Programmed says the config is too large")
    assert re.search(r"would make ConfigMap api-gateway/api-gateway-config \d+ bytes, over its limit of 1048576", refused["message"])
    assert summary(cluster, bulky[-1])["Accepted"] == ("True", "Accepted")
    assert summary(cluster, small)["Programmed"] == ("False", "Pending"), "in the config in force: not blamed"
    assert route_names(cluster) == ["big.small"]  # the last good routes.yaml stays in force
    assert operator.log_text().count("1048576") == 1, "logged once, not on every pass"
    with urllib.request.urlopen(f"http://{operator.metrics}/metrics", timeout=5) as response:
        scraped = response.read().decode()
    size = float(re.search(r"^apigw_operator_config_bytes (\S+)$", scraped, re.MULTILINE).group(1))
    assert size > 1048576 and "apigw_operator_config_limit_bytes 1.048576e+06" in scraped
    refusals = [r for r in requests_by(cluster, operator.credential) if r.get("responseStatus", {}).get("code") == 422]
    assert refusals == [], "the size is checked before writing: the API server refuses nothing"
