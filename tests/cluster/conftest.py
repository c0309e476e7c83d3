"""Fixtures of the cluster tier: one real control plane per session, a clean gateway namespace per test.

Without the binaries every test here skips with the command that builds them (`.ci/run` runs it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import ROOT, ControlPlane, binaries
from tests.cluster.objects import requests_by
from tests.cluster.parts import CM_PATH, LEASE_PATH, NS, GatewayPod, OperatorProcess

API = "/apis/gateway.apigw.io/v1alpha1"
DEPLOYMENT_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/api-gateway"
_timings: dict[str, float] = {}


def manifest(path: str, kind: str) -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all((ROOT / path).read_text()) if d and d["kind"] == kind)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver with the CRDs, the gateway namespace and the operator's RBAC applied."""
    found = binaries()
    if found is None:
        pytest.skip("kube-apiserver, etcd and kubectl are not built: run `bash tests/apiserver/build.sh`")
    plane = ControlPlane(found, tmp_path_factory.mktemp("k8s"))
    try:
        plane.start()
        _timings["control plane start-up (etcd + kube-apiserver ready)"] = plane.startup_seconds
        plane.kubectl("apply", "-f", str(ROOT / "crds"), "-f", str(ROOT / "manifests/namespace.yaml"),
                      "-f", str(ROOT / "manifests/operator/serviceaccount.yaml"),
                      "-f", str(ROOT / "manifests/operator/rbac.yaml"))
        plane.kubectl("wait", "--for", "condition=Established", "crd", "--all", "--timeout", "60s")
        # What the controller manager would create: every namespace's `default` ServiceAccount.
        plane.api.post(f"/api/v1/namespaces/{NS}/serviceaccounts", {"metadata": {"name": "default"}})
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def cluster(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with no CRs anywhere and the gateway's ConfigMap and Deployment as shipped."""
    api = control_plane.api
    for plural in ("gatewayroutes", "ratelimitpolicies"):
        for item in api.get(f"{API}/{plural}")["items"]:
            meta = item["metadata"]
            api.delete(f"{API}/namespaces/{meta['namespace']}/{plural}/{meta['name']}")
    for pod in api.get(f"/api/v1/namespaces/{NS}/pods")["items"]:
        api.delete(f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}?gracePeriodSeconds=0")
    api.delete(LEASE_PATH)
    configmaps = [d for d in yaml.safe_load_all((ROOT / "manifests/gateway/configmap.yaml").read_text()) if d]
    shipped = [(f"{CM_PATH.rsplit('/', 1)[0]}/{c['metadata']['name']}", c) for c in configmaps]  # with the route shards
    for path, body in (*shipped, (DEPLOYMENT_PATH, manifest("manifests/gateway/deployment.yaml", "Deployment"))):
        api.delete(path)
        api.post(path.rsplit("/", 1)[0], body)
    return control_plane


@pytest.fixture
def operators(cluster: ControlPlane) -> Iterator[Callable[..., OperatorProcess]]:
    """Factory: `operators("a", "--namespace", "x")` starts an operator replica; all stop at the end, and
    the test fails if the API server refused any of their requests (the audit log has them all)."""
    started: list[OperatorProcess] = []

    def start(name: str = "operator", *args: str) -> OperatorProcess:
        process = OperatorProcess(cluster, name, list(args)).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    refused = [
        f"{e['verb']} {e['requestURI']}: {e['responseStatus'].get('message')}"
        for process in started for e in requests_by(cluster, process.credential) if e["responseStatus"]["code"] == 403
    ]
    assert not refused, "the shipped RBAC refused the operator:\n" + "\n".join(refused)


@pytest.fixture
def gateway_pods(cluster: ControlPlane) -> Iterator[Callable[[int, int], list[GatewayPod]]]:
    """Factory: `gateway_pods(2, port)` runs two pods of the Deployment on 127.0.0.2 and 127.0.0.3."""
    started: list[GatewayPod] = []

    def start(count: int, port: int) -> list[GatewayPod]:
        template = copy.deepcopy(cluster.api.get(DEPLOYMENT_PATH)["spec"]["template"])
        for index in range(count):
            pod = GatewayPod(cluster, f"api-gateway-{len(started)}", f"127.0.0.{len(started) + 2}", template)
            started.append(pod)
            pod.start(port)
        return started

    yield start
    for pod in started:
        pod.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for what, seconds in _timings.items():
        terminalreporter.write_line(f"{what}: {seconds:.1f} s")
