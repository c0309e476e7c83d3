"""Thousands of CRs (preloaded into KMock, not POSTed): a restart writes nothing, one edit costs O(1) writes."""

from __future__ import annotations

from typing import Any

from apigw_operator.render import ROUTE, Condition, Ref, render, text_hash
from apigw_operator.status import conditions
from tests.operator.kube import CM, CONFIG_YAML, NS, GatewayPod, eventually, operator, route
from tests.operator.test_operator_kmock import API, CM_PATH, ROUTES, data, options, settle, summary, sync_pods, writes

COUNT = 2000


def preload(kmock: Any, pods: dict[str, GatewayPod]) -> None:
    """What a running operator left behind: routes.yaml, the statuses, and pods serving it."""
    bodies = [route(f"r{i}", f"/r{i}") for i in range(COUNT)]
    rendering = render(bodies, [], CONFIG_YAML)
    kmock.objects["v1/configmaps", NS, CM] = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": CM, "namespace": NS, "annotations": {
            "gateway.apigw.io/routes-hash": text_hash(rendering.routes_yaml),
            "gateway.apigw.io/config-hash": rendering.config_hash,
            "gateway.apigw.io/restart-hash": rendering.restart_hash,
        }},
        "data": {"config.yaml": CONFIG_YAML, "routes.yaml": rendering.routes_yaml},
    }
    for pod in pods.values():
        pod.load({"config.yaml": CONFIG_YAML, "routes.yaml": rendering.routes_yaml})
    for body in bodies:
        verdict = rendering.verdicts[Ref(ROUTE, "shop", body["metadata"]["name"])]
        served = Condition("Programmed", True, "Programmed", f"{len(pods)}/{len(pods)} pods serve its current spec")
        body["status"] = {
            "conditions": conditions([verdict.accepted, verdict.resolved_refs, served], [], 1, "2025-01-01T00:00:00Z"),
            "lastAccepted": verdict.last_accepted,
        }
        kmock.objects[ROUTES, "shop", body["metadata"]["name"]] = body


async def test_restart_at_scale_writes_nothing_and_one_edit_writes_one_status(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    preload(cluster, pods)
    async with operator(options(pods)):
        await settle(cluster, 3, timeout=120)
        assert writes(cluster) == [], "a restart over an unchanged cluster writes nothing"

        await cluster.patch(f"{API}/gatewayroutes/r7", json={"spec": {"match": {"path_prefix": "/v2/r7"}}})
        await eventually(lambda: "/v2/r7" in data(cluster)["routes.yaml"], timeout=60)
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, "r7")["Programmed"] == ("True", "Programmed"), timeout=60)
        await settle(cluster, 3, timeout=120)
    sent = [(path, body) for _, path, body in writes(cluster) if not path.endswith("/gatewayroutes/r7")]
    statuses = [path for path, _ in sent if path.endswith("/status")]
    assert set(statuses) <= {f"{API}/gatewayroutes/r7/status"}, "only the edited CR's status"
    # Pending then Programmed; none when the pods reloaded before the pass asked them (its old status
    # already said Programmed, and it is served as it is now).
    assert len(statuses) <= 2, statuses
    assert [path for path, _ in sent if path == CM_PATH] == [CM_PATH]
    assert len(sent) <= 5, sent  # the ConfigMap, <= 2 statuses, <= 2 Events
