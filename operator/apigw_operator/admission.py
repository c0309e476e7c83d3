"""The validating admission webhook: refuse at `kubectl apply` what the status would report after it.

A candidate GatewayRoute or RateLimitPolicy is judged by rendering the world the operator's index
holds with the candidate inserted (CREATE) or replaced (UPDATE), with render's own `Renderer`: if the
rendering would not accept it, the request is refused with the message its status would carry. So
every rule render knows (the config model, conflicts, ownership) is refused at apply time by the same
code that writes the status. Two refusals need the world as it is too (rendered only when needed): an
edit that would push out a CR the gateway serves now, and a change that would make the ConfigMap
overflow.

The webhook fails open (`failurePolicy: Ignore`, and every "cannot judge" here is an admission with a
warning): a down, slow or starting operator never blocks a change, and the status stays the backstop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes_asyncio.client.rest import ApiException

from apigw.config.loader import GLOBAL_FILE, ROUTES_FILE
from apigw_operator.cluster import Cluster, Target, api_message
from apigw_operator.crds import POLICIES, ROUTES
from apigw_operator.reconciler import Snapshot, route_files, too_large, wait_set
from apigw_operator.render import POLICY, ROUTE, Condition, Labels, Ref, Renderer, Rendering, Verdict, ref_of

logger = logging.getLogger(__name__)

PATH = "/validate"
HANDLER_IDS = {ROUTES: ROUTES, POLICIES: POLICIES}
"""kopf serves each handler at `PATH/<its id>`: the paths of the ValidatingWebhookConfiguration."""
NEWEST = "9999-12-31T23:59:59Z"
"""The creationTimestamp of a candidate the API server has not stamped: it is the newest CR."""
FORBIDDEN, INVALID = 403, 422
"""Not 409: clients (kubectl apply among them) retry a Conflict, and a refusal here does not go away."""


@dataclass(frozen=True)
class Webhook:
    """Where the webhook listens, and the certificate it serves (cert-manager's Secret, mounted)."""

    host: str
    port: int
    cert_file: str
    key_file: str


def server(webhook: Webhook) -> kopf.WebhookServer:
    """kopf's HTTPS server; it re-reads the files every minute and serves a renewed certificate."""
    return kopf.WebhookServer(
        addr=webhook.host, port=webhook.port, path=PATH, certfile=webhook.cert_file, pkeyfile=webhook.key_file,
    )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    message: str = ""
    code: int = 200
    warnings: tuple[str, ...] = ()


def admitted(*warnings: str) -> Decision:
    return Decision(True, warnings=warnings)


def unchecked(why: str) -> Decision:
    return admitted(f"not checked by apigw-operator ({why}): see the status once the operator has rendered it")


def decide(
    renderer: Renderer,
    kind: str,
    candidate: Mapping[str, Any],
    routes: Sequence[Mapping[str, Any]],
    policies: Sequence[Mapping[str, Any]],
    configmap: Mapping[str, Any] | None,
    target: Target,
    limit: int,
    labels: Labels | None = None,
) -> Decision:
    """Would the operator accept `candidate` (a CR as the API server is about to store it) among the CRs
    it holds, with config.yaml from `configmap` and the namespaces' `labels` (for the ownership rules)?
    No I/O: the caller runs it in a worker thread."""
    if configmap is None:
        return unchecked(f"ConfigMap {target.namespace}/{target.configmap} not found")
    config_yaml = (configmap.get("data") or {}).get(GLOBAL_FILE, "")
    ref = ref_of(kind, candidate)
    after = renderer.render(*_with(ref, _stamped(candidate), routes, policies), config_yaml, labels)
    if after.unjudged:
        return unchecked(f"config.yaml in ConfigMap {target.namespace}/{target.configmap} is invalid: {after.errors[0]}")
    verdict = after.verdicts[ref]
    if verdict.accepted.status is False:
        return Decision(False, verdict.accepted.message, FORBIDDEN if verdict.accepted.reason == "NotAllowed" else INVALID)
    before: list[Rendering] = []

    def now() -> Rendering:
        """The world as it is, without the candidate's change."""
        if not before:
            before.append(renderer.render(routes, policies, config_yaml, labels))
        return before[0]

    stored = {ref_of(k, b): b for k, bodies in ((ROUTE, routes), (POLICY, policies)) for b in bodies}
    for other, judged in after.verdicts.items():
        if other == ref or judged.included or not _maybe_accepted(stored.get(other)):
            continue
        if now().verdicts.get(other) is not None and now().verdicts[other].included:
            why = _first_false(judged)
            message = f"{other.kind} {other.namespace}/{other.name} is in the gateway config now and would be pushed out: {why.message}"
            return Decision(False, message, INVALID)
    if verdict.included and after.config_hash is not None:
        if route_files(configmap, after, target, limit) is None and (
            route_files(configmap, now(), target, limit) is not None or len(after.routes_yaml) > len(now().routes_yaml)
        ):
            return Decision(False, f"{too_large(configmap, after, target, limit)}: remove or shrink routes first", INVALID)
    if verdict.resolved_refs.status is False:
        return admitted(f"admitted, but not served until this is resolved: {verdict.resolved_refs.message}")
    return admitted()


def _with(
    ref: Ref, candidate: Mapping[str, Any], routes: Sequence[Mapping[str, Any]], policies: Sequence[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(routes, policies) with the candidate in place of the CR of its name, or added."""
    mine = routes if ref.kind == ROUTE else policies
    replaced = [b for b in mine if ref_of(ref.kind, b) != ref] + [candidate]
    return (replaced, list(policies)) if ref.kind == ROUTE else (list(routes), replaced)


def _stamped(candidate: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = candidate["metadata"]
    if meta.get("creationTimestamp"):
        return candidate
    return {**candidate, "metadata": {**meta, "creationTimestamp": NEWEST}}


def _maybe_accepted(body: Mapping[str, Any] | None) -> bool:
    """Not known to be excluded now by its status: only those are worth rendering the world as it is for."""
    for c in ((body or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Accepted":
            return c.get("status") != "False"
    return True


def _first_false(verdict: Verdict) -> Condition:
    return verdict.accepted if verdict.accepted.status is False else verdict.resolved_refs


class Admission:
    """The webhook's state in the operator: its own `Renderer` (renders one at a time, in a worker
    thread), the index (both replicas keep one: a follower answers as well as the leader), and the
    ConfigMap's config.yaml, read at each review."""

    def __init__(
        self, cluster: Cluster, crs: Snapshot, indexed: asyncio.Event, limit: int, namespaces: Sequence[str] = (),
        wait: float = 5.0, labels: Callable[[], Labels] = dict,
    ):
        self.cluster = cluster
        self.crs = crs
        self.indexed = indexed
        """Set once the index holds every CR: before that a conflict could be missed."""
        self.limit = limit
        self.namespaces = namespaces
        """The namespaces this operator renders (none: all)."""
        self.labels = labels
        """Every namespace's labels, from the operator's index."""
        self.wait = wait
        self._renderer = Renderer()
        self._lock = asyncio.Lock()

    async def review(self, kind: str, body: Mapping[str, Any], old: Mapping[str, Any] | None) -> Decision:
        meta = body["metadata"]
        if self.namespaces and meta.get("namespace") not in self.namespaces:
            return admitted()  # not this operator's to render
        if old is not None and old.get("spec") == body.get("spec"):
            return admitted()  # labels, finalizers, ...: nothing the operator judges changed
        if not await wait_set(self.indexed, self.wait):
            return unchecked("the operator is still listing the CRs")
        try:
            configmap = await self.cluster.read_configmap()
        except ApiException as exc:
            return unchecked(f"reading the ConfigMap failed: {api_message(exc)}")
        try:
            async with self._lock:
                routes, policies = self.crs()
                t, limit, labels = self.cluster.target, self.limit, self.labels()
                return await asyncio.to_thread(
                    decide, self._renderer, kind, body, routes, policies, configmap, t, limit, labels
                )
        except Exception:  # a bug here must not block changes: the status still judges them
            logger.exception("admission review of %s %s/%s failed", kind, meta.get("namespace"), meta.get("name"))
            return unchecked("the operator failed to judge it; its log says why")
