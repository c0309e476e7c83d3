"""One level-triggered pass: the CRs (kept in memory from kopf's watch) and the ConfigMap in, render,
write only what differs.

A pass never aborts for one object: whatever fails (a ConfigMap or Deployment write, one status write,
an Event) is logged and reported on the CRs' Programmed condition, and the pass goes on. Rendering runs
in a worker thread so the event loop (kopf's watches, the liveness endpoint, the Lease) keeps answering.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from kubernetes_asyncio.client.rest import ApiException

from apigw.config.errors import ConfigError
from apigw.config.loader import GLOBAL_FILE, ROUTES_FILE, parse_documents, shard_index
from apigw.config.model import ListenConfig, shard_hash
from apigw_operator.cluster import Cluster, Target, api_message
from apigw_operator.crds import GROUP, POLICIES, ROUTES
from apigw_operator.health import PodReport, probe_pods
from apigw_operator.metrics import Metrics
from apigw_operator.render import (
    LAST_ACCEPTED,
    POLICY,
    ROUTE,
    Condition,
    Labels,
    Ref,
    Renderer,
    Rendering,
    entry_digests,
    ref_of,
    text_hash,
)
from apigw_operator.shards import leftovers, shard_key, shard_slot, split
from apigw_operator.status import NOT_ACCEPTED, Served, announcements, conditions, kept, merge_patch, programmed
from apigw_operator.throttle import Once, Throttle

ROUTES_ANNOTATION = f"{GROUP}/routes-hash"
CONFIG_ANNOTATION = f"{GROUP}/config-hash"
"""On the ConfigMap: the hash of the whole config (config.yaml + routes.yaml) the pods should report."""
RESTART_ANNOTATION = f"{GROUP}/restart-hash"
"""On the ConfigMap: the restart settings last seen. On the pod template: what rolled the pods."""

CONFIGMAP_LIMIT = 1024 * 1024
"""What the API server lets a ConfigMap's data hold (keys and values, data and binaryData together)."""

SHARD_CHECK_INTERVAL = 300.0
"""Seconds between reading the route shards back (a re-applied or recreated shard may have lost its
routes); also read back once for each config the pods do not all serve."""

logger = logging.getLogger(__name__)

PodUrl = Callable[[str, str, int], str]
"""(pod name, pod IP, metrics port) -> the base URL of its metrics listener."""

Snapshot = Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]]
"""() -> (GatewayRoute bodies, RateLimitPolicy bodies) as the watch last saw them."""


def pod_url(pod: str, ip: str, port: int) -> str:
    return f"http://{ip}:{port}"


def configmap_size(configmap: Mapping[str, Any], data: Mapping[str, str]) -> int:
    """The size the API server checks against its limit: every key and value, `data` replaced by `data`."""
    size = sum(len(k) + len(v.encode()) for k, v in {**(configmap.get("data") or {}), **data}.items())
    binary = configmap.get("binaryData") or {}
    return size + sum(len(k) + len(base64.b64decode(v)) for k, v in binary.items())


def _stored_bytes(configmap: Mapping[str, Any], files: Mapping[str, str]) -> int:
    """What the gateway's ConfigMap and the shards hold once `files` are written."""
    shards = sum(len(k) + len(v.encode()) for k, v in files.items() if k != ROUTES_FILE)
    return configmap_size(configmap, {ROUTES_FILE: files[ROUTES_FILE]}) + shards


def route_files(
    configmap: Mapping[str, Any], rendering: Rendering, target: Target, limit: int, in_place: Collection[str] = ()
) -> dict[str, str] | None:
    """The files to write for `rendering`: routes.yaml alone, or the index and its shards; None when the
    routes fit in neither the ConfigMap nor its `route_shards` shards of half `limit` bytes (each shard's
    ConfigMap holds the shard in force and the one written to replace it; `in_place`: shards in force
    with no room beside them, rewritten where they are)."""
    room = limit - configmap_size(configmap, {ROUTES_FILE: ""})
    in_force = shard_index((configmap.get("data") or {}).get(ROUTES_FILE) or "")
    return split(*rendering.items, room=room, shard_room=limit // 2 - len(shard_key(1)), shards=target.route_shards,
                 in_force=in_force, in_place=in_place)


def too_large(configmap: Mapping[str, Any], rendering: Rendering, target: Target, limit: int) -> str:
    """Why `rendering`'s routes cannot be written (`route_files` is None)."""
    size = len(rendering.routes_yaml.encode())
    total = configmap_size(configmap, {ROUTES_FILE: rendering.routes_yaml})
    why = f"routes.yaml ({size} bytes) would make ConfigMap {target.namespace}/{target.configmap} {total} bytes, over its limit of {limit}"
    if target.route_shards:
        why += (f", and the routes do not fit in the {target.route_shards} shard ConfigMaps {target.shard(1)}.."
                f"{target.route_shards} ({limit // 2} bytes each, half their limit: the other half takes the next "
                "version while the one in force stays) either")
    return why


def too_large_message(configmap: Mapping[str, Any], rendering: Rendering, target: Target, limit: int) -> str:
    """What the CRs left out are told (Programmed=False ConfigTooLarge): why, and how to make room."""
    more = target.shard(target.route_shards + 1)
    return (f"{too_large(configmap, rendering, target, limit)}: the last good routes.yaml stays in force; remove or "
            f"shrink routes, or raise --route-shards (each shard one more ConfigMap, {more} next, projected into the "
            "gateway's config volume and named in the operator's RBAC)")


async def wait_set(event: asyncio.Event, seconds: float) -> bool:
    """True once `event` is set, False after `seconds`. Not `asyncio.wait_for`: on Python 3.11 it swallows
    a cancellation that comes as the event is set, and the cancelled loop runs on (the operator's stop then
    waited forever: seen as a kopf shutdown past 30 s in the KMock tests)."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


def metrics_port(config_yaml: str) -> int:
    """`listen.metrics_port` of config.yaml, where the pods answer `/_health/ready` with the details (the
    traffic port's answer has no `last_reload_error`); the default if config.yaml is invalid."""
    try:
        return parse_documents({GLOBAL_FILE: config_yaml}).listen.metrics_port
    except ConfigError:
        return ListenConfig().metrics_port


@dataclass(frozen=True)
class Blocked:
    """Why the config of this pass is not in force: stands on Programmed of every CR the pods do not
    serve yet, or of every CR (`everywhere`) when no config can be judged served."""

    condition: Condition
    everywhere: bool = False
    kept: Mapping[str, str] | None = None
    """What the ConfigMap's routes.yaml holds (`entry_digests`): CRs in it as they are now are spared."""


class Reconciler:
    def __init__(
        self,
        cluster: Cluster,
        session: aiohttp.ClientSession,
        clock: Callable[[], datetime],
        crs: Snapshot,
        pod_url: PodUrl = pod_url,
        throttle: Throttle | None = None,
        events: Once | None = None,
        metrics: Metrics | None = None,
        limit: int = CONFIGMAP_LIMIT,
        leading: Callable[[], bool] = lambda: True,
        namespaces: Callable[[], Labels] = dict,
    ):
        self.cluster = cluster
        self.session = session
        self.clock = clock
        self.crs = crs
        self.pod_url = pod_url
        self.throttle = throttle or Throttle(rate=50, burst=50, concurrency=10)
        self.events = events or Once(window=600)
        self.metrics = metrics or cluster.metrics
        self.limit = limit
        self.leading = leading
        """Checked before every status write: a replica that lost the Lease mid-pass stops writing."""
        self.namespaces = namespaces
        """() -> each namespace's labels, for ownership rules that select namespaces by label."""
        self.metrics.config_limit.set(max(limit, limit // 2 * cluster.target.route_shards))
        self.renderer = Renderer()
        self.served = Served()
        self._reported: list[str] = []
        self._shards_read = -SHARD_CHECK_INTERVAL
        """When the shards were last read back (monotonic seconds)."""
        self._unserved: str | None = None
        """The config the ready pods did not all serve at the last pass."""
        self._read_for: str | None = None
        """The config whose shards were read back because the pods did not serve it (once per config)."""
        self._written: dict[Ref, tuple[str | None, list[dict[str, Any]], Mapping[str, Any] | None]] = {}
        """What this replica last wrote to each CR's status (by uid): conditions and lastAccepted, newer
        than the watch may show yet."""

    def forget(self) -> None:
        """Drop what this replica wrote: while the other replica leads, the watch is newer than it."""
        self._written.clear()

    async def run_once(self) -> None:
        routes, policies = self.crs()
        configmap = await self.cluster.read_configmap()
        if configmap is None:
            t = self.cluster.target
            why = (f"ConfigMap {t.namespace}/{t.configmap} not found: it holds config.yaml, which people own; "
                   "routes.yaml is written into it once it exists")
            self._report([why])
            await self._announce_config(configmap, "Warning", "ConfigMapNotFound", why)
            blocked = Blocked(Condition("Programmed", False, "ConfigMapNotFound", why), everywhere=True)
            self.metrics.programmed.set(0)
            await self._write_statuses(routes, policies, None, None, blocked)
            return
        config_yaml = (configmap.get("data") or {}).get(GLOBAL_FILE, "")
        judged = [self._with_own_status(ref_of(ROUTE, body), body) for body in routes]
        rendering = await asyncio.to_thread(self.renderer.render, judged, policies, config_yaml, self.namespaces())
        if not self.leading():  # the Lease ran out while rendering: the new leader's routes.yaml may be newer
            logger.info("lost the lease during the pass: writing nothing")
            return
        blocked = await self._write_routes(configmap, rendering)
        blocked = await self._roll_out(configmap, rendering) or blocked
        reports = await self._probe(config_yaml)
        if reports is not None:
            wanted = rendering.config_hash
            served = blocked is None and wanted is not None and bool(reports) and all(r.config_hash == wanted for r in reports)
            self.metrics.programmed.set(int(served))
            self._unserved = None if served else wanted
        await self._write_statuses(routes, policies, rendering, reports, blocked)

    async def _write_routes(self, configmap: dict[str, Any], rendering: Rendering) -> Blocked | None:
        """Write routes.yaml (and its shards, when the routes outgrow the ConfigMap) and the config hash if
        anything changed; the last good config stays otherwise. Shards go first, the index naming them last."""
        if rendering.errors:
            self._report(rendering.errors)
            more = f" (and {len(rendering.errors) - 1} more)" if len(rendering.errors) > 1 else ""
            message = f"the gateway config cannot be applied, the last good routes.yaml stays in force: {rendering.errors[0]}{more}"
            return Blocked(Condition("Programmed", False, "ConfigInvalid", message), everywhere=True)
        assert rendering.config_hash is not None
        t = self.cluster.target
        files = route_files(configmap, rendering, t, self.limit)
        self.metrics.config_bytes.set(_stored_bytes(configmap, files or {ROUTES_FILE: rendering.routes_yaml}))
        current = (configmap.get("data") or {}).get(ROUTES_FILE)
        annotations = configmap["metadata"].get("annotations") or {}
        digest = text_hash(rendering.routes_yaml)
        wanted = {ROUTES_ANNOTATION: digest, CONFIG_ANNOTATION: rendering.config_hash}
        if files is None:
            return await self._too_large(configmap, rendering)
        index = shard_index(current or "")
        in_place = await self._no_room_beside(index, files)
        if in_place:
            files = route_files(configmap, rendering, t, self.limit, in_place) or files
        held = await self._shards_held(files, rendering.config_hash) or index
        stale = [key for key, text in files.items() if key != ROUTES_FILE and held.get(key) != shard_hash(text)]
        if not stale and current == files[ROUTES_FILE] and all(annotations.get(k) == v for k, v in wanted.items()):
            self._report([])
            self.served.record(rendering.config_hash, rendering.digests)
            return None
        blocked = await self._write_shards({key: files[key] for key in stale})
        if blocked is not None:
            return blocked
        patch: dict[str, Any] = {"metadata": {"annotations": wanted}}
        if current != files[ROUTES_FILE]:
            patch["data"] = {ROUTES_FILE: files[ROUTES_FILE]}
        try:
            await self.cluster.patch_configmap(patch)
        except ApiException as exc:
            return self._write_failed(exc, t.configmap, ROUTES_FILE, len(files[ROUTES_FILE].encode()))
        self._report([])
        self.served.record(rendering.config_hash, rendering.digests)
        logger.info("wrote routes.yaml %s (%d bytes, %d shards, config %s)", digest, len(rendering.routes_yaml.encode()),
                    len(files) - 1, rendering.config_hash)
        await self._clear_shards(index, files)
        return None

    async def _shards_held(self, files: Mapping[str, str], config: str) -> dict[str, str] | None:
        """What each shard ConfigMap holds (key -> hash), read back when due; None: the index in force is
        trusted to say it (the shards are written before it)."""
        now = time.monotonic()
        doubted = self._unserved == config and self._read_for != config
        if len(files) == 1 or not (doubted or now - self._shards_read >= SHARD_CHECK_INTERVAL):
            return None
        self._shards_read = now
        self._read_for = config if doubted else self._read_for
        held = {}
        for key in files.keys() - {ROUTES_FILE}:
            try:
                found = await self.cluster.read_configmap(self._holder(key))
            except ApiException as exc:
                logger.warning("could not read %s: %s", self._holder(key), api_message(exc))
                found = None
            text = ((found or {}).get("data") or {}).get(key)
            held[key] = shard_hash(text) if text is not None else ""
        return held

    async def _no_room_beside(self, index: Mapping[str, str], files: Mapping[str, str]) -> set[str]:
        """The shards in force whose ConfigMap cannot hold the next version beside them: filled past half by
        an operator before the two-key scheme (or with a larger --configmap-limit). Each is rewritten in
        place, once: until routes.yaml follows, a pod starting waits for it (a running pod defers)."""
        named = {shard_slot(key): key for key in index}
        found = set()
        for key, text in files.items():
            if key == ROUTES_FILE or key in index or shard_slot(key) not in named:
                continue
            name = self._holder(key)
            try:
                holder = await self.cluster.read_configmap(name)
            except ApiException as exc:
                logger.warning("could not read %s: %s", name, api_message(exc))
                continue
            if holder is not None and configmap_size(holder, {key: text}) > self.limit:
                logger.warning("%s has no room for %s beside %s, in force (written whole, before the two-key "
                               "scheme): rewriting %s in place, once", name, key, named[shard_slot(key)],
                               named[shard_slot(key)])
                found.add(named[shard_slot(key)])
        return found

    async def _write_shards(self, files: Mapping[str, str]) -> Blocked | None:
        for key, text in files.items():
            name = self._holder(key)
            try:
                await self.cluster.patch_configmap({"data": {key: text}}, name)
            except ApiException as exc:
                return self._write_failed(exc, name, key, len(text.encode()))
        return None

    async def _clear_shards(self, index: Mapping[str, str], files: Mapping[str, str]) -> None:
        """Empty the shard ConfigMaps routes.yaml no longer uses (`leftovers`; the pods ignore them)."""
        by_holder: dict[str, dict[str, None]] = {}
        for key in leftovers(index, files):
            by_holder.setdefault(self._holder(key), {})[key] = None
        for name, removed in by_holder.items():
            try:
                await self.cluster.patch_configmap({"data": removed}, name)
            except ApiException as exc:
                logger.warning("could not empty %s, no longer used: %s", name, api_message(exc))

    def _write_failed(self, exc: ApiException, name: str, key: str, size: int) -> Blocked:
        t = self.cluster.target
        if exc.status in (413, 422):
            reason, why = "ConfigInvalid", f"ConfigMap {t.namespace}/{name} refused {key} ({size} bytes): {api_message(exc)}"
        elif exc.status == 404:
            reason, why = "ConfigMapNotFound", f"ConfigMap {t.namespace}/{name} not found when writing {key}"
        else:
            reason, why = "ConfigWriteFailed", f"writing {key} to ConfigMap {t.namespace}/{name} failed: {api_message(exc)}; retrying"
        self._report([why])
        return Blocked(Condition("Programmed", False, reason, why))

    async def _too_large(self, configmap: dict[str, Any], rendering: Rendering) -> Blocked:
        """Nothing is written: the CRs in the config in force as they are now are spared, the rest are told why."""
        why = too_large_message(configmap, rendering, self.cluster.target, self.limit)
        self._report([why])
        await self._announce_config(configmap, "Warning", "ConfigTooLarge", why)
        kept = await self._in_force(configmap)
        annotations = configmap["metadata"].get("annotations") or {}
        if annotations.get(CONFIG_ANNOTATION):  # the config in force holds the CRs kept as they are
            held = {ref: d for ref, d in rendering.digests.items() if kept.get(ref.entry_key) == d}
            self.served.record(annotations[CONFIG_ANNOTATION], held)
        return Blocked(Condition("Programmed", False, "ConfigTooLarge", why), kept=kept)

    async def _in_force(self, configmap: dict[str, Any]) -> dict[str, str]:
        """`entry_digests` of the routes.yaml in force and the shards it names."""
        current = (configmap.get("data") or {}).get(ROUTES_FILE) or ""
        texts = [current]
        for key in shard_index(current):
            try:
                shard = await self.cluster.read_configmap(self._holder(key))
            except ApiException as exc:
                logger.warning("could not read %s: %s", self._holder(key), api_message(exc))
                continue
            texts.append(((shard or {}).get("data") or {}).get(key) or "")
        return await asyncio.to_thread(entry_digests, *texts)

    def _holder(self, key: str) -> str:
        """The shard ConfigMap that holds shard file `key`."""
        t = self.cluster.target
        return t.shard(shard_slot(key))

    def _report(self, errors: list[str]) -> None:
        """Log why routes.yaml is not written, once per change of reason (passes repeat every resync)."""
        if errors and errors != self._reported:
            logger.error("routes.yaml left as it is, the last good config stays in force:\n%s", "\n".join(errors))
        self._reported = errors

    async def _announce_config(self, configmap: dict[str, Any] | None, event_type: str, reason: str, message: str) -> None:
        """One Event on the ConfigMap for what concerns the whole config (not one per CR)."""
        t = self.cluster.target
        if not self.events(("ConfigMap", reason)):
            return
        meta = (configmap or {}).get("metadata") or {"name": t.configmap, "namespace": t.namespace}
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
        await self._post_event(body, event_type, reason, message, self._now())

    async def _roll_out(self, configmap: dict[str, Any], rendering: Rendering) -> Blocked | None:
        """Roll the gateway only when a setting it cannot apply live changed; the first sight only records."""
        if rendering.restart_hash is None:
            return None
        recorded = (configmap["metadata"].get("annotations") or {}).get(RESTART_ANNOTATION)
        if recorded == rendering.restart_hash:
            return None
        t = self.cluster.target
        if recorded is not None:
            try:
                await self.cluster.annotate_pod_template(RESTART_ANNOTATION, rendering.restart_hash)
            except ApiException as exc:
                what = "not found" if exc.status == 404 else f"not patched: {api_message(exc)}"
                why = (f"config.yaml changed settings the gateway applies only at start, but Deployment "
                       f"{t.namespace}/{t.deployment} was {what}; retrying")
                self._report([why])
                reason = "DeploymentNotFound" if exc.status == 404 else "RolloutFailed"
                await self._announce_config(configmap, "Warning", reason, why)
                return Blocked(Condition("Programmed", False, reason, why))
            logger.info("restart settings changed (%s -> %s): rolling the gateway", recorded, rendering.restart_hash)
        try:
            await self.cluster.patch_configmap({"metadata": {"annotations": {RESTART_ANNOTATION: rendering.restart_hash}}})
        except ApiException as exc:  # the roll-out is repeated at the next pass: harmless, same annotation
            logger.warning("could not record the restart settings on the ConfigMap: %s", api_message(exc))
        return None

    async def _probe(self, config_yaml: str) -> list[PodReport] | None:
        """What the ready pods serve; None when the pods cannot be listed (Programmed then stays as it is)."""
        try:
            pods = await self.cluster.ready_pods()
        except ApiException as exc:
            logger.warning("could not list the gateway pods: %s", api_message(exc))
            return None
        port = metrics_port(config_yaml)
        return await probe_pods(self.session, {pod: self.pod_url(pod, ip, port) for pod, ip in pods.items()})

    async def _write_statuses(
        self,
        routes: Sequence[Mapping[str, Any]],
        policies: Sequence[Mapping[str, Any]],
        rendering: Rendering | None,
        reports: list[PodReport] | None,
        blocked: Blocked | None,
    ) -> None:
        """Write every status that changed, throttled, all at once; one failure skips only its CR."""
        now = self._now()
        bodies = [(POLICY, POLICIES, b) for b in policies] + [(ROUTE, ROUTES, b) for b in routes]
        present = {ref_of(kind, b) for kind, _, b in bodies}
        self._written = {ref: w for ref, w in self._written.items() if ref in present}
        writes = []
        counts: Counter[tuple[str, str, str]] = Counter()
        for kind, plural, body in bodies:
            ref = ref_of(kind, body)
            previous, previous_kept = self._previous(ref, body)
            wanted = self._wanted(ref, previous, rendering, reports, blocked)
            new = conditions(wanted, previous, body["metadata"].get("generation"), now)
            judged = rendering is not None and not rendering.unjudged
            last = rendering.verdicts[ref].last_accepted if judged and rendering is not None else previous_kept
            counts.update((kind, c["type"], c["status"]) for c in new)
            if new != previous or last != previous_kept:
                writes.append(self._write_status(ref, plural, body, (new, last), (previous, previous_kept), now))
        self.metrics.count_crs(dict(counts))
        failed = sum(not ok for ok in await asyncio.gather(*writes))
        if failed:
            logger.warning("%d of %d status writes failed; they are retried at the next pass", failed, len(writes))

    def _previous(self, ref: Ref, body: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Mapping[str, Any] | None]:
        """The CR's conditions and lastAccepted as they are now: as this replica wrote them, else as watched."""
        uid = body["metadata"].get("uid")
        mine = self._written.get(ref)
        if mine is not None and mine[0] == uid:
            return mine[1], mine[2]
        status = body.get("status") or {}
        return list(status.get("conditions") or []), status.get(LAST_ACCEPTED)

    def _with_own_status(self, ref: Ref, body: dict[str, Any]) -> dict[str, Any]:
        """The route with the lastAccepted this replica wrote last, which the watch may not show yet."""
        mine = self._written.get(ref)
        status = body.get("status") or {}
        if mine is None or mine[0] != body["metadata"].get("uid") or status.get(LAST_ACCEPTED) == mine[2]:
            return body
        return {**body, "status": {**status, LAST_ACCEPTED: mine[2]}}

    def _wanted(
        self,
        ref: Ref,
        previous: list[dict[str, Any]],
        rendering: Rendering | None,
        reports: list[PodReport] | None,
        blocked: Blocked | None,
    ) -> list[Condition]:
        if rendering is None or rendering.unjudged:  # nothing to judge by: keep the last valid verdict
            accepted = kept(previous, "Accepted", "waiting for a valid config.yaml to judge it by")
            refs = kept(previous, "ResolvedRefs", "waiting for a valid config.yaml to judge it by")
            if accepted.status is False or refs.status is False:
                return [accepted, refs, NOT_ACCEPTED]
            assert blocked is not None  # no rendering, or one without a valid config.yaml
            return [accepted, refs, blocked.condition]
        verdict = rendering.verdicts[ref]
        if blocked is not None and blocked.everywhere and verdict.included:
            state = blocked.condition
        elif reports is None:
            state = kept(previous, "Programmed", "the gateway pods could not be listed")
        else:
            digest = rendering.digests.get(ref)
            spared = blocked is not None and blocked.kept is not None and blocked.kept.get(ref.entry_key) == digest
            condition = blocked.condition if blocked is not None and not spared else None
            state = programmed(ref, verdict, digest, reports, self.served, condition)
        return [verdict.accepted, verdict.resolved_refs, state]

    async def _write_status(
        self,
        ref: Ref,
        plural: str,
        body: Mapping[str, Any],
        new: tuple[list[dict[str, Any]], Mapping[str, Any] | None],
        previous: tuple[list[dict[str, Any]], Mapping[str, Any] | None],
        now: str,
    ) -> bool:
        """Write (conditions, lastAccepted) `new` over `previous`."""
        meta = body["metadata"]
        if not self.leading():
            return True
        patch: dict[str, Any] = {"conditions": new[0]}
        if new[1] != previous[1]:
            patch[LAST_ACCEPTED] = merge_patch(previous[1], new[1])
        try:
            await self.throttle.run(lambda: self.cluster.patch_status(plural, meta["namespace"], meta["name"], patch))
        except ApiException as exc:
            self._written.pop(ref, None)
            if exc.status == 404:  # deleted since the watch saw it: nothing to report on
                return True
            logger.warning("could not write the status of %s %s/%s: %s", ref.kind, ref.namespace, ref.name, api_message(exc))
            return False
        self._written[ref] = (meta.get("uid"), *new)
        for event_type, reason, message in announcements(new[0], previous[0]):
            if self.events((meta.get("uid"), reason)):
                await self._post_event(body, event_type, reason, message, now)
        return True

    async def _post_event(self, body: Mapping[str, Any], event_type: str, reason: str, message: str, now: str) -> None:
        try:
            await self.throttle.run(lambda: self.cluster.post_event(body, event_type, reason, message, now))
        except ApiException as exc:  # an Event is a courtesy: the status already says it
            meta = body["metadata"]
            logger.warning("could not post an Event on %s/%s: %s", meta["namespace"], meta["name"], exc.reason)

    def _now(self) -> str:
        return self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")


class Worker:
    """Runs passes one at a time: on a nudge (any CR event) or every `interval` seconds, once `ready`
    (kopf has listed every CR into its index)."""

    def __init__(self, reconciler: Reconciler, interval: float, leading: Callable[[], bool], ready: asyncio.Event):
        self.reconciler = reconciler
        self.interval = interval
        self.leading = leading
        self.ready = ready
        self._wakeup = asyncio.Event()
        self._wakeup.set()

    def nudge(self) -> None:
        self._wakeup.set()

    def lead(self) -> None:
        """The Lease was taken (again): what this replica wrote before may have been overwritten by the other
        replica since, so it is forgotten; and a pass runs now."""
        self.reconciler.forget()
        self.nudge()

    async def _indexed(self) -> None:
        """kopf runs no event handler before its indices hold every CR, so the first event says the index
        is whole; with no CR at all there is none: then an empty LIST says it."""
        cluster = self.reconciler.cluster
        while not self.ready.is_set():
            try:
                if not (await cluster.any_crs(ROUTES) or await cluster.any_crs(POLICIES)):
                    return
            except ApiException as exc:
                logger.warning("could not list the CRs: %s; retrying", api_message(exc))
            await wait_set(self.ready, 2)

    async def run(self) -> None:
        await self._indexed()
        self.ready.set()  # also when there was no CR at all: the admission webhook waits for it
        while True:
            await wait_set(self._wakeup, self.interval)
            self._wakeup.clear()
            metrics = self.reconciler.metrics
            leading = self.leading()
            metrics.leader.set(int(leading))
            if not leading:
                continue
            start = time.perf_counter()
            try:
                await self.reconciler.run_once()
            except Exception:
                metrics.passes.labels("error").inc()
                logger.exception("reconcile failed; retrying at the next resync")
            else:
                metrics.passes.labels("ok").inc()
            metrics.duration.observe(time.perf_counter() - start)
