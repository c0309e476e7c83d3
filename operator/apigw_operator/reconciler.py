"""One level-triggered pass: read all CRs and the ConfigMap, render, write only what differs.

Reads are fresh every pass (no cache to go stale), so a pass after a no-op is itself a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import aiohttp
from kubernetes_asyncio.client.rest import ApiException

from apigw.config.errors import ConfigError
from apigw.config.loader import GLOBAL_FILE, ROUTES_FILE, parse_documents
from apigw.config.model import ListenConfig
from apigw_operator.cluster import Cluster, api_message
from apigw_operator.crds import GROUP, POLICIES, ROUTES
from apigw_operator.health import PodReport, probe_pods
from apigw_operator.render import POLICY, ROUTE, Rendering, ref_of, render, text_hash
from apigw_operator.status import announcements, conditions, programmed

ROUTES_ANNOTATION = f"{GROUP}/routes-hash"
RESTART_ANNOTATION = f"{GROUP}/restart-hash"
"""On the ConfigMap: the restart settings last seen. On the pod template: what rolled the pods."""

logger = logging.getLogger(__name__)

PodUrl = Callable[[str, str, int], str]
"""(pod name, pod IP, traffic port) -> the base URL of its traffic listener."""


def pod_url(pod: str, ip: str, port: int) -> str:
    return f"http://{ip}:{port}"


def traffic_port(config_yaml: str) -> int:
    """`listen.port` of config.yaml, where the pods answer `/_health/ready`; the default if it is invalid."""
    try:
        return parse_documents({GLOBAL_FILE: config_yaml}).listen.port
    except ConfigError:
        return ListenConfig().port


class Reconciler:
    def __init__(
        self,
        cluster: Cluster,
        session: aiohttp.ClientSession,
        clock: Callable[[], datetime],
        pod_url: PodUrl = pod_url,
    ):
        self.cluster = cluster
        self.session = session
        self.clock = clock
        self.pod_url = pod_url
        self._reported: list[str] = []

    async def run_once(self) -> None:
        routes = await self.cluster.list_crs(ROUTES)
        policies = await self.cluster.list_crs(POLICIES)
        configmap = await self.cluster.read_configmap()
        if configmap is None:
            t = self.cluster.target
            logger.error("ConfigMap %s/%s not found: nothing to render into", t.namespace, t.configmap)
            return
        config_yaml = (configmap.get("data") or {}).get(GLOBAL_FILE, "")
        rendering = await self._write_routes(configmap, render(routes, policies, config_yaml))
        await self._roll_out(configmap, rendering)
        pods = await self.cluster.ready_pods()
        port = traffic_port(config_yaml)
        reports = await probe_pods(self.session, {pod: self.pod_url(pod, ip, port) for pod, ip in pods.items()})
        await self._write_statuses(ROUTE, ROUTES, routes, rendering, reports)
        await self._write_statuses(POLICY, POLICIES, policies, rendering, reports)

    async def _write_routes(self, configmap: dict[str, Any], rendering: Rendering) -> Rendering:
        """Write routes.yaml if it changed. Returns the rendering as it stands after the write: one the
        API server refused (the ConfigMap's 1 MiB limit) counts as invalid, and the last good one stays."""
        if rendering.errors:
            self._report(rendering.errors)
            return rendering
        digest = text_hash(rendering.routes_yaml)
        current = (configmap.get("data") or {}).get(ROUTES_FILE)
        annotations = configmap["metadata"].get("annotations") or {}
        if current == rendering.routes_yaml and annotations.get(ROUTES_ANNOTATION) == digest:
            self._report([])
            return rendering
        patch = {"metadata": {"annotations": {ROUTES_ANNOTATION: digest}}, "data": {ROUTES_FILE: rendering.routes_yaml}}
        try:
            await self.cluster.patch_configmap(patch)
        except ApiException as exc:
            if exc.status not in (413, 422):
                raise
            t = self.cluster.target
            size = len(rendering.routes_yaml.encode())
            refused = [f"ConfigMap {t.namespace}/{t.configmap} refused routes.yaml ({size} bytes): {api_message(exc)}"]
            self._report(refused)
            return replace(rendering, config_hash=None, errors=refused)
        self._report([])
        logger.info("wrote routes.yaml %s (config %s)", digest, rendering.config_hash)
        return rendering

    def _report(self, errors: list[str]) -> None:
        """Log why routes.yaml is not written, once per change of reason (passes repeat every resync)."""
        if errors and errors != self._reported:
            logger.error("routes.yaml left as it is, the last good config stays in force:\n%s", "\n".join(errors))
        self._reported = errors

    async def _roll_out(self, configmap: dict[str, Any], rendering: Rendering) -> None:
        """Roll the gateway only when a setting it cannot apply live changed; the first sight only records."""
        if rendering.restart_hash is None:
            return
        recorded = (configmap["metadata"].get("annotations") or {}).get(RESTART_ANNOTATION)
        if recorded == rendering.restart_hash:
            return
        if recorded is not None:
            await self.cluster.annotate_pod_template(RESTART_ANNOTATION, rendering.restart_hash)
            logger.info("restart settings changed (%s -> %s): rolling the gateway", recorded, rendering.restart_hash)
        await self.cluster.patch_configmap({"metadata": {"annotations": {RESTART_ANNOTATION: rendering.restart_hash}}})

    async def _write_statuses(
        self, kind: str, plural: str, bodies: Sequence[dict[str, Any]], rendering: Rendering, reports: list[PodReport]
    ) -> None:
        now = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        for body in bodies:
            verdict = rendering.verdicts[ref_of(kind, body)]
            wanted = [verdict.accepted, verdict.resolved_refs, programmed(verdict, rendering, reports)]
            previous = (body.get("status") or {}).get("conditions") or []
            new = conditions(wanted, previous, body["metadata"].get("generation"), now)
            if new == previous:
                continue
            meta = body["metadata"]
            await self.cluster.patch_status(plural, meta["namespace"], meta["name"], {"conditions": new})
            for event_type, reason, message in announcements(new, previous):
                try:
                    await self.cluster.post_event(body, event_type, reason, message, now)
                except ApiException as exc:  # an Event is a courtesy: the status above already says it
                    logger.warning("could not post an Event on %s/%s: %s", meta["namespace"], meta["name"], exc.reason)


class Worker:
    """Runs passes one at a time: on a nudge (any CR event) or every `interval` seconds."""

    def __init__(self, reconciler: Reconciler, interval: float, leading: Callable[[], bool]):
        self.reconciler = reconciler
        self.interval = interval
        self.leading = leading
        self._wakeup = asyncio.Event()
        self._wakeup.set()

    def nudge(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.interval)
            except TimeoutError:
                pass
            self._wakeup.clear()
            if not self.leading():
                continue
            try:
                await self.reconciler.run_once()
            except Exception:
                logger.exception("reconcile failed; retrying at the next resync")
