"""Gateway pods that really serve the ConfigMap: `Programmed` follows them, and restart settings roll them once."""

from __future__ import annotations

import urllib.request

import yaml

from apigw.testkit import loopback_allowed
from apigw.testkit.process import BackendProcess
from apigw.testkit.redis import free_port
from tests.cluster.conftest import DEPLOYMENT_PATH
from tests.cluster.controlplane import ControlPlane
from tests.cluster.objects import conditions, config_annotation, create, gatewayroute, namespace, route_names, served
from tests.cluster.parts import CM_PATH, wait_for

RESTART = "gateway.apigw.io/restart-hash"
LOOPBACK_ALLOWED = yaml.safe_dump({"ownership": loopback_allowed()})
"""The test's backends (the CRs') listen on 127.0.0.1."""


def test_programmed_only_when_every_pod_serves_the_config(cluster: ControlPlane, operators, gateway_pods) -> None:
    ns = namespace(cluster, "serve")
    port = free_port()
    config_yaml = f"listen:\n  port: {port}\n  metrics_port: {free_port()}\nratelimit:\n  enabled: false\n" + LOOPBACK_ALLOWED
    cluster.api.merge(CM_PATH, {"data": {"config.yaml": config_yaml}})
    with BackendProcess() as backend:
        pods = gateway_pods(2, port)
        operators()
        orders = gatewayroute("orders", ns, "/orders", backend={"service": "orders", "url": backend.url})
        create(cluster, orders)

        def programmed() -> dict:
            return conditions(cluster, orders).get("Programmed", {})
        done = wait_for(lambda: programmed().get("status") == "True" and programmed(), what="Programmed")
        config = served(pods[0].ip, port)
        assert served(pods[1].ip, port) == config and done["message"] == "2/2 pods serve its current spec"
        assert config_annotation(cluster) == config, "the ConfigMap names the config the pods should serve"
        with urllib.request.urlopen(f"http://{pods[1].ip}:{port}/orders/1", timeout=5) as response:
            assert response.status == 200  # the pod routes by the CR, to the backend

        pods[1].hold()  # its kubelet stops projecting: that pod keeps the old config
        cluster.kubectl("patch", "gatewayroute", "orders", "-n", ns, "--type", "merge", "-p", '{"spec":{"max_body_size":"2MiB"}}')
        pending = wait_for(lambda: programmed().get("message", "").startswith("1/2 ") and programmed(), what="1/2 pods")
        new = served(pods[0].ip, port)
        assert new != config and pending["message"] == "1/2 pods serve its current spec" and pending["reason"] == "Pending"
        assert served(pods[1].ip, port) == config
        pods[1].release()
        wait_for(lambda: programmed().get("message") == "2/2 pods serve its current spec", what="both pods serve the new config")
        assert config_annotation(cluster) == new
        assert programmed()["status"] == "True"


def test_restart_setting_rolls_the_deployment_once(cluster: ControlPlane, operators) -> None:
    ns = namespace(cluster, "roll")
    operators()

    def template_annotations() -> dict:
        return cluster.api.get(DEPLOYMENT_PATH)["spec"]["template"]["metadata"].get("annotations") or {}

    def after_a_pass(name: str) -> None:
        """Create a route and wait for it in routes.yaml: the operator has made a pass since."""
        create(cluster, gatewayroute(name, ns, f"/{name}"))
        wait_for(lambda: f"{ns}.{name}" in route_names(cluster), what=f"{name} rendered")

    after_a_pass("first")
    generation = cluster.api.get(DEPLOYMENT_PATH)["metadata"]["generation"]
    assert RESTART not in template_annotations()  # first sight only records the restart settings

    edit = cluster.api.get(CM_PATH)["data"]["config.yaml"].replace("level: INFO", "level: DEBUG")
    cluster.api.merge(CM_PATH, {"data": {"config.yaml": edit}})  # applied live by the pods: no roll
    after_a_pass("second")
    assert cluster.api.get(DEPLOYMENT_PATH)["metadata"]["generation"] == generation

    cluster.api.merge(CM_PATH, {"data": {"config.yaml": edit.replace("metrics_port: 9090", "metrics_port: 9091")}})
    wait_for(lambda: RESTART in template_annotations(), what="the pod template annotated")
    after_a_pass("third")
    assert cluster.api.get(DEPLOYMENT_PATH)["metadata"]["generation"] == generation + 1
    assert cluster.api.get(CM_PATH)["metadata"]["annotations"][RESTART] == template_annotations()[RESTART]
