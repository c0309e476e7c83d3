from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from kmock._internal import parsing
from kubernetes_asyncio.config import kube_config

from apigw_operator.cluster import Target
from tests.operator.kube import CM, NS, GatewayPod, configmap, gateway_pod

_parse_path = parsing.parse_path


def _parse_cluster_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads `/api/v1/namespaces[/NAME]` as a namespace prefix with nothing after it (and
    answers 500): parse it as the cluster-scoped resource it is, so the operator can watch namespaces."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _parse_path(path)


@pytest.fixture
def cluster(kmock: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """KMock as the API server: the CRD kinds, namespace shop, the gateway's ConfigMap, Deployment and
    two ready pods."""
    monkeypatch.setattr(parsing, "parse_path", _parse_cluster_path)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url)}}],
        "users": [{"name": "kmock", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated importlib call
        warnings.simplefilter("ignore", DeprecationWarning)
        kmock.resources.load_bundled()
    for plural, kind in (("gatewayroutes", "GatewayRoute"), ("ratelimitpolicies", "RateLimitPolicy")):
        kmock.resources[f"gateway.apigw.io/v1alpha1/{plural}"] = {
            "kind": kind, "singular": kind.lower(), "namespaced": True,
            "verbs": {"list", "watch", "get", "patch", "create", "delete"}, "subresources": {"status"},
        }
    for namespace in (NS, "shop"):
        kmock.objects["v1/namespaces", None, namespace] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    kmock.objects["v1/configmaps", NS, CM] = configmap()
    for number in range(1, Target.route_shards + 1):  # shipped empty by the manifests
        name = Target().shard(number)
        kmock.objects["v1/configmaps", NS, name] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS}}
    kmock.objects["apps/v1/deployments", NS, "api-gateway"] = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api-gateway", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "api-gateway"}},
            "template": {"metadata": {"labels": {"app": "api-gateway"}}},
        },
    }
    for name in ("api-gateway-a", "api-gateway-b"):
        kmock.objects["v1/pods", NS, name] = gateway_pod(name)
    return kmock


@pytest.fixture
async def pods() -> AsyncIterator[dict[str, GatewayPod]]:
    found = {"api-gateway-a": GatewayPod(), "api-gateway-b": GatewayPod()}
    for pod in found.values():
        await pod.start()
    yield found
    for pod in found.values():
        await pod.stop()
