"""The runbook's kubectl commands that make sense without nodes, run verbatim against the control plane.

`kubectl` is the built binary on PATH with the admin kubeconfig; logs, exec, top and port-forward need
a kubelet and stay with tests/test_runbook.py (which runs them against local processes).
"""

from __future__ import annotations

import os
import re
import subprocess

from apigw.testkit.redis import free_port
from tests.cluster.conftest import DEPLOYMENT_PATH
from tests.cluster.controlplane import ROOT, ControlPlane
from tests.cluster.objects import conditions, config_annotation, create, gatewayroute, served, table
from tests.cluster.parts import CM_PATH, NS, wait_for
from tests.test_runbook import runbook_commands


def run(plane: ControlPlane, command: str, editor: str | None = None) -> str:
    quoted = command in runbook_commands() or f"`{command}`" in (ROOT / "RUNBOOK.md").read_text()
    assert quoted, f"not in RUNBOOK.md: {command}"
    env = {**os.environ, "PATH": f"{plane.bin}{os.pathsep}{os.environ['PATH']}", "KUBECONFIG": str(plane.admin_kubeconfig)}
    if editor:
        env["KUBE_EDITOR"] = editor
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    return done.stdout


def test_runbook_kubectl_commands(cluster: ControlPlane, operators, gateway_pods, tmp_path) -> None:
    port = free_port()
    config_yaml = (
        f"listen:\n  port: {port}\n  metrics_port: {free_port()}\n"
        f"redis:\n  url: redis://127.0.0.1:{free_port()}/0\n  pool_size: 20\n"
        "ratelimit:\n  failure_mode: fail_closed\n"
    )
    cluster.api.merge(CM_PATH, {"data": {"config.yaml": config_yaml}})
    pods = gateway_pods(2, port)
    operators()
    route = gatewayroute("status", NS, "/status")
    create(cluster, route)
    wait_for(lambda: conditions(cluster, route).get("Programmed", {}).get("status") == "True", what="Programmed")
    programmed = conditions(cluster, route)["Programmed"]["message"]

    listed = run(cluster, "kubectl get pods -l app=api-gateway -n api-gateway")
    assert {name: (row["READY"], row["STATUS"]) for name, row in table(listed).items()} == {
        pod.name: ("1/1", "Running") for pod in pods
    }, listed
    described = run(cluster, "kubectl describe pods -l app=api-gateway -n api-gateway")
    assert all(re.search(rf"^IP:\s+{re.escape(pod.ip)}$", described, re.MULTILINE) for pod in pods), described
    events = run(cluster, "kubectl get events -n api-gateway --sort-by='.lastTimestamp' | tail -20")
    assert "gatewayroute/status" in events and "Programmed" in events, events
    assert "api-gateway" in run(cluster, "kubectl get deployment api-gateway -n api-gateway")
    pool = run(cluster, "kubectl get configmap api-gateway-config -n api-gateway -o yaml | grep -A5 pool_size")
    assert "pool_size: 20" in pool

    # "switch to fail-open mode": edited by hand, kept by the operator, served by the pods, no roll.
    editor = tmp_path / "set-fail-open"
    editor.write_text('#!/bin/sh\nsed -i "s/failure_mode: fail_closed/failure_mode: fail_open/" "$1"\n')
    editor.chmod(0o755)
    generation = cluster.api.get(DEPLOYMENT_PATH)["metadata"]["generation"]
    before = config_annotation(cluster)
    run(cluster, "kubectl edit configmap api-gateway-config -n api-gateway", editor=str(editor))
    wait_for(lambda: config_annotation(cluster) not in (before, None), what="the operator saw the edit")
    wait_for(lambda: all(served(pod.ip, port) == config_annotation(cluster) for pod in pods), what="pods serve the edit")
    assert conditions(cluster, route)["Programmed"]["message"] == programmed, "the route itself did not change"
    assert "failure_mode: fail_open" in cluster.api.get(CM_PATH)["data"]["config.yaml"]
    assert cluster.api.get(DEPLOYMENT_PATH)["metadata"]["generation"] == generation

    run(cluster, "kubectl rollout restart deployment/api-gateway -n api-gateway")
    template = cluster.api.get(DEPLOYMENT_PATH)["spec"]["template"]["metadata"]
    assert "kubectl.kubernetes.io/restartedAt" in template["annotations"]
    run(cluster, "kubectl rollout history deployment/api-gateway -n api-gateway")
    run(cluster, "kubectl scale deployment api-gateway --replicas=10 -n api-gateway")
    assert cluster.api.get(DEPLOYMENT_PATH)["spec"]["replicas"] == 10
