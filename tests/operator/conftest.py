from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.config import kube_config

from apigw_operator.cluster import Target
from tests.operator.kube import CM, CONFIG_YAML, NS, GatewayPod


@pytest.fixture
def cluster(kmock: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """KMock as the API server: the CRD kinds, the gateway's ConfigMap, Deployment and two ready pods."""
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
    kmock.objects["v1/configmaps", NS, CM] = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CM, "namespace": NS},
        "data": {"config.yaml": CONFIG_YAML, "routes.yaml": ""},
    }
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
        kmock.objects["v1/pods", NS, name] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": "api-gateway"}},
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }
    return kmock


@pytest.fixture
async def pods() -> AsyncIterator[dict[str, GatewayPod]]:
    found = {"api-gateway-a": GatewayPod(), "api-gateway-b": GatewayPod()}
    for pod in found.values():
        await pod.start()
    yield found
    for pod in found.values():
        await pod.stop()
