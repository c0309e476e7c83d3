"""The kopf side: watches that index the CRs and nudge the worker, and the worker's start and stop.

kopf watches both CR kinds and keeps every CR in an in-memory index (no LIST per pass); every event
(create, update, delete, resume) only wakes the worker, which renders from the index and writes what
differs. kopf itself writes nothing to the CRs. Namespaces are indexed too (name -> labels), for the
ownership rules of config.yaml that select namespaces by label; a label change also wakes the worker.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
from kubernetes_asyncio import client, config

from apigw_operator.admission import HANDLER_IDS, Admission, Webhook
from apigw_operator.cluster import Cluster, Target
from apigw_operator.crds import GROUP, POLICIES, ROUTES, VERSION
from apigw_operator.leadership import Leadership
from apigw_operator.metrics import Metrics, serve
from apigw_operator.reconciler import CONFIGMAP_LIMIT, PodUrl, Reconciler, Worker, pod_url
from apigw_operator.render import POLICY, ROUTE


@dataclass(frozen=True)
class Options:
    target: Target = Target()
    namespaces: tuple[str, ...] = ()
    """Namespaces whose CRs are rendered; empty means all."""
    resync_interval: float = 10.0
    leader_election: bool = True
    lease_name: str = "apigw-operator"
    pod_url: PodUrl = field(default=pod_url)
    metrics: tuple[str, int] | None = None
    """(host, port) of `GET /metrics`; None serves none."""
    configmap_limit: int = CONFIGMAP_LIMIT
    """routes.yaml is not written when the ConfigMap would exceed this many bytes."""
    webhook: Webhook | None = None
    """Serve the validating admission webhook (apigw_operator.admission); None serves none."""


async def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    return client.ApiClient()


_KEPT_METADATA = ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion")


def _kept(body: kopf.Body) -> dict[str, Any]:
    """What a pass reads of a CR (not managedFields, annotations, ...): 5,000 of them stay in memory."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta},
        "spec": body.get("spec"), "status": body.get("status"),
    }


def _bodies(index: kopf.Index) -> list[dict[str, Any]]:
    return [body for store in index.values() for body in store]


def build_registry(options: Options) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    running: dict[str, Any] = {}

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.index(GROUP, VERSION, ROUTES, id="route_bodies", registry=registry)
    def route_bodies(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
        return {(namespace, name): _kept(body)}

    @kopf.index(GROUP, VERSION, POLICIES, id="policy_bodies", registry=registry)
    def policy_bodies(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
        return {(namespace, name): _kept(body)}

    @kopf.index("", "v1", "namespaces", id="namespace_labels", registry=registry)
    def namespace_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
        return {name: dict(labels)}

    @kopf.on.startup(registry=registry)
    async def start(route_bodies: kopf.Index, policy_bodies: kopf.Index, namespace_labels: kopf.Index, **_: Any) -> None:
        api = running["api"] = await _api_client()
        session = running["session"] = aiohttp.ClientSession()  # registered at once: cleanup closes it
        metrics = Metrics()
        if options.metrics is not None:
            running["metrics"] = await serve(metrics, *options.metrics)
        cluster = Cluster(api, options.target, options.namespaces, metrics)

        def snapshot() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            return _bodies(route_bodies), _bodies(policy_bodies)

        def namespaces() -> dict[str, dict[str, str]]:
            return {name: labels for name, store in namespace_labels.items() for labels in store}

        def leading() -> bool:
            return leadership is None or leadership.leading

        reconciler = Reconciler(
            cluster, session, lambda: datetime.now(UTC), snapshot, options.pod_url,
            limit=options.configmap_limit, leading=leading, namespaces=namespaces,
        )
        leadership = None
        if options.leader_election:
            identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"
            leadership = Leadership(api, options.target.namespace, options.lease_name, identity, lambda: worker.lead())
        indexed = running["indexed"] = asyncio.Event()
        running["admission"] = Admission(
            cluster, snapshot, indexed, options.configmap_limit, options.namespaces, labels=namespaces
        )
        worker = Worker(reconciler, options.resync_interval, leading, indexed)
        tasks = [asyncio.create_task(worker.run(), name="apigw-worker")]
        if leadership is not None:
            tasks.append(asyncio.create_task(leadership.campaign(), name="apigw-leadership"))
        running.update(worker=worker, tasks=tasks, leadership=leadership)

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        for task in running.get("tasks", []):
            task.cancel()
        await asyncio.gather(*running.get("tasks", []), return_exceptions=True)
        if running.get("leadership") is not None:  # no pass runs any more: hand the Lease over
            await running["leadership"].release()
        if "session" in running:
            await running["session"].close()
        if "metrics" in running:
            await running["metrics"].cleanup()
        if "api" in running:
            await running["api"].close()

    @kopf.on.event(GROUP, VERSION, ROUTES, registry=registry)
    @kopf.on.event(GROUP, VERSION, POLICIES, registry=registry)
    @kopf.on.event("", "v1", "namespaces", registry=registry)
    async def changed(**_: Any) -> None:
        running["indexed"].set()
        running["worker"].nudge()

    if options.webhook is not None:
        kinds = {ROUTES: ROUTE, POLICIES: POLICY}

        @kopf.on.validate(GROUP, VERSION, ROUTES, id=HANDLER_IDS[ROUTES], operations=["CREATE", "UPDATE"], registry=registry)
        @kopf.on.validate(GROUP, VERSION, POLICIES, id=HANDLER_IDS[POLICIES], operations=["CREATE", "UPDATE"], registry=registry)
        async def validate(body: kopf.Body, old: kopf.Body | None, resource: kopf.Resource, warnings: list[str], **_: Any) -> None:
            decision = await running["admission"].review(kinds[resource.plural], body, old)
            warnings.extend(decision.warnings)
            if not decision.allowed:
                raise kopf.AdmissionError(decision.message, code=decision.code)

    return registry
