"""What only a real API server decides: which namespaces the operator may watch, and the 1 MiB ConfigMap limit
(routes past it go to the shard ConfigMaps; past every shard, nothing is written)."""

from __future__ import annotations

import re
import urllib.request

from apigw.testkit.redis import free_port
from apigw.testkit.tokens import SigningKey
from apigw_operator.cluster import Target
from apigw_operator.reconciler import CONFIGMAP_LIMIT
from apigw_operator.render import render
from apigw_operator.shards import shard_key, split
from tests.cluster.controlplane import ControlPlane
from tests.cluster.objects import (
    conditions,
    config_annotation,
    create,
    gatewayroute,
    namespace,
    requests_by,
    route_names,
    routes_yaml,
    served,
    summary,
)
from tests.cluster.parts import CM_PATH, NS, wait_for


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


def bulky(name: str, ns: str) -> dict:
    """A route of about 400 KB: two fill a ConfigMap."""
    return gatewayroute(name, ns, f"/{name}", auth={"required": True, "scopes": ["s" * 1000] * 400})


def bulky_config(tmp_path) -> tuple[int, str]:
    """The gateway's port and a config.yaml for routes with `auth` (a key file) and no Redis."""
    port = free_port()
    key = SigningKey().write_public_pem(tmp_path / "jwt.pem")
    return port, (f"listen:\n  port: {port}\n  metrics_port: {free_port()}\nratelimit:\n  enabled: false\n"
                  f"auth:\n  keys:\n  - file: {key}\n")


def served_from_shards(cluster: ControlPlane, routes: list[dict], pod, port: int, operator) -> None:
    """Every route Programmed, the pod serving the config in force, and no write refused as too large."""
    for route in routes:
        wait_for(lambda route=route: summary(cluster, route).get("Programmed") == ("True", "Programmed"), timeout=60,
                 what=f"{route['metadata']['name']} served from the shards")
    assert served(pod.ip, port) == config_annotation(cluster)
    refusals = [r for r in requests_by(cluster, operator.credential) if r.get("responseStatus", {}).get("code") == 422]
    assert refusals == [], "each ConfigMap is under the API server's limit"


def test_routes_over_1mib_are_split_over_the_shards_and_served(cluster: ControlPlane, operators, gateway_pods, tmp_path) -> None:
    ns = namespace(cluster, "huge")
    port, config_yaml = bulky_config(tmp_path)
    cluster.api.merge(CM_PATH, {"data": {"config.yaml": config_yaml}})
    pods = gateway_pods(1, port)
    routes = [bulky(f"bulky-{i}", ns) for i in range(3)]
    for route in routes:
        create(cluster, route)
    operator = operators()
    index = wait_for(lambda: routes_yaml(cluster).get("shards"), what="routes.yaml names its shards")
    assert sorted(index) == ["routes-001.yaml", "routes-002.yaml", "routes-003.yaml"], "one per shard: half a ConfigMap each"
    served_from_shards(cluster, routes, pods[0], port, operator)


def test_configmap_over_1mib_is_not_written_and_reported(cluster: ControlPlane, operators) -> None:
    ns = namespace(cluster, "big")
    small = gatewayroute("small", ns, "/small")
    create(cluster, small)
    first = operators("first")
    wait_for(lambda: route_names(cluster) == ["big.small"], what="the small route rendered")
    first.stop()
    # Each CR is well under the API server's per-object limit; together they overflow the ConfigMap.
    bulky_routes = [bulky(f"bulky-{i}", ns) for i in range(3)]
    for route in bulky_routes:
        create(cluster, route)
    operator = operators("second", "--route-shards", "1")  # they need three

    def reported() -> dict:
        found = conditions(cluster, bulky_routes[-1]).get("Programmed", {})
        return found if found.get("reason") == "ConfigTooLarge" else {}
    refused = wait_for(reported, what="Programmed says the config is too large")
    assert re.search(r"would make ConfigMap api-gateway/api-gateway-config \d+ bytes, over its limit of 1048576", refused["message"])
    assert summary(cluster, bulky_routes[-1])["Accepted"] == ("True", "Accepted")
    assert summary(cluster, small)["Programmed"] == ("False", "Pending"), "in the config in force: not blamed"
    assert route_names(cluster) == ["big.small"]  # the last good routes.yaml stays in force
    assert operator.log_text().count("over its limit of 1048576") == 1, "logged once, not on every pass"
    with urllib.request.urlopen(f"http://{operator.metrics}/metrics", timeout=5) as response:
        scraped = response.read().decode()
    size = float(re.search(r"^apigw_operator_config_bytes (\S+)$", scraped, re.MULTILINE).group(1))
    assert size > 1048576 and "apigw_operator_config_limit_bytes 1.048576e+06" in scraped
    refusals = [r for r in requests_by(cluster, operator.credential) if r.get("responseStatus", {}).get("code") == 422]
    assert refusals == [], "the size is checked before writing: the API server refuses nothing"


def test_shards_filled_whole_by_an_earlier_version_are_rewritten_in_place(
    cluster: ControlPlane, operators, gateway_pods, tmp_path
) -> None:
    """An earlier operator filled whole shard ConfigMaps (here two bulky routes in the first); this one keeps
    half of each for the next version, which does not fit beside such a shard: that shard is rewritten in
    place, once, and the API server refuses nothing."""
    ns = namespace(cluster, "upgraded")
    port, config_yaml = bulky_config(tmp_path)
    routes = [create(cluster, bulky(f"bulky-{i}", ns)) for i in range(3)]
    earlier = split(*render(routes, [], config_yaml).items, room=1000, shard_room=CONFIGMAP_LIMIT - len(shard_key(1)),
                    shards=3, in_force={})
    assert earlier is not None and sorted(earlier) == ["routes-001.yaml", "routes-002.yaml", "routes.yaml"]
    cluster.api.merge(CM_PATH, {"data": {"config.yaml": config_yaml, "routes.yaml": earlier["routes.yaml"]}})
    for number in (1, 2):
        cluster.api.merge(f"/api/v1/namespaces/{NS}/configmaps/{Target().shard(number)}",
                          {"data": {shard_key(number): earlier[shard_key(number)]}})
    pods = gateway_pods(1, port)
    operator = operators()
    wait_for(lambda: sorted(routes_yaml(cluster).get("shards") or {}) == ["routes-001.yaml", "routes-003.yaml",
                                                                         "routes-502.yaml"],
             what="one route a shard: the first rewritten in place, the second beside the one in force")
    served_from_shards(cluster, routes, pods[0], port, operator)
    assert "rewriting routes-001.yaml in place, once" in operator.log_text()
