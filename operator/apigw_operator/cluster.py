"""Every Kubernetes API call the operator makes (kopf's watches aside), with merge PATCHes only.

Keeping them here makes the RBAC rules in manifests/operator/rbac.yaml checkable against one file
(tests/operator/test_rbac.py checks them against the requests sent).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from apigw_operator.crds import GROUP, VERSION
from apigw_operator.metrics import Metrics

T = TypeVar("T")

MERGE = "application/merge-patch+json"


def api_message(exc: ApiException) -> str:
    """The API server's own words for a refused request (its Status `message`)."""
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


@dataclass(frozen=True)
class Target:
    """Where the gateway lives: the ConfigMap the operator writes and the Deployment it rolls."""

    namespace: str = "api-gateway"
    configmap: str = "api-gateway-config"
    deployment: str = "api-gateway"
    pod_selector: str = "app=api-gateway"
    route_shards: int = 6
    """ConfigMaps `<shard_configmap>-1`... for the routes that do not fit in `configmap` (the Deployment
    projects them into the gateway's config volume; the manifests ship them empty)."""
    shard_configmap: str = "api-gateway-routes"

    def shard(self, number: int) -> str:
        """The name of the ConfigMap holding shard `number` (from 1)."""
        return f"{self.shard_configmap}-{number}"


class Cluster:
    def __init__(self, api: client.ApiClient, target: Target, namespaces: Sequence[str] = (), metrics: Metrics | None = None):
        self.target = target
        self.metrics = metrics or Metrics()
        self.namespaces = namespaces
        """Where to list CRs; empty means all namespaces."""
        self._core = client.CoreV1Api(api)
        self._apps = client.AppsV1Api(api)
        self._custom = client.CustomObjectsApi(api)
        self._api = api

    async def _counted(self, verb: str, call: Awaitable[T]) -> T:
        """Every request lands in `apigw_operator_api_requests_total{verb,result}`."""
        try:
            result = await call
        except ApiException as exc:
            self.metrics.requests.labels(verb, str(exc.status)).inc()
            raise
        self.metrics.requests.labels(verb, "ok").inc()
        return result

    async def any_crs(self, plural: str) -> bool:
        """Is there at least one such CR where the operator looks? (One item listed, not all.)"""
        if not self.namespaces:
            found = await self._counted("list", self._custom.list_cluster_custom_object(GROUP, VERSION, plural, limit=1))
            return bool(found["items"])
        for namespace in self.namespaces:
            found = await self._counted("list", self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural, limit=1))
            if found["items"]:
                return True
        return False

    async def read_configmap(self, name: str | None = None) -> dict[str, Any] | None:
        """The gateway's ConfigMap (or the one named); None when it does not exist."""
        t = self.target
        try:
            found = await self._counted("get", self._core.read_namespaced_config_map(name or t.configmap, t.namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self._api.sanitize_for_serialization(found)

    async def patch_configmap(self, patch: dict[str, Any], name: str | None = None) -> None:
        t = self.target
        await self._counted("patch", self._core.patch_namespaced_config_map(name or t.configmap, t.namespace, patch, _content_type=MERGE))

    async def annotate_pod_template(self, key: str, value: str) -> None:
        t = self.target
        patch = {"spec": {"template": {"metadata": {"annotations": {key: value}}}}}
        await self._counted("patch", self._apps.patch_namespaced_deployment(t.deployment, t.namespace, patch, _content_type=MERGE))

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._counted("patch", self._custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": status}, _content_type=MERGE
        ))

    async def post_event(self, body: dict[str, Any], event_type: str, reason: str, message: str, now: str) -> None:
        meta = body["metadata"]
        event = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "apigw-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._counted("create", self._core.create_namespaced_event(meta["namespace"], event))

    async def ready_pods(self) -> dict[str, str]:
        """Ready gateway pods: name -> pod IP."""
        t = self.target
        pods = await self._counted("list", self._core.list_namespaced_pod(t.namespace, label_selector=t.pod_selector))
        return {
            pod.metadata.name: pod.status.pod_ip
            for pod in pods.items
            if pod.status and pod.status.pod_ip and not pod.metadata.deletion_timestamp
            if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        }
