"""Two replicas, one writer: both watch, only the holder of a Lease reconciles.

The follower keeps its watches (and kopf's liveness endpoint) up, so a takeover after a crash is one
Lease period. A replica that stops cleanly (a rolling update, a drained node) hands the Lease over at
once: it clears the holder, which the follower's next retry takes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kubernetes_asyncio.client import ApiClient, CoordinationV1Api
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.leaderelection import electionconfig, leaderelection
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock

logger = logging.getLogger(__name__)


class Leadership:
    def __init__(self, api: ApiClient, namespace: str, name: str, identity: str, on_lead: Callable[[], None]):
        self.leading = False
        self._lock = LeaseLock(name, namespace, identity, api)
        self._leases = CoordinationV1Api(api)
        self._on_lead = on_lead

    async def campaign(self) -> None:
        while True:
            config = electionconfig.Config(
                self._lock, lease_duration=15, renew_deadline=10, retry_period=2,
                onstarted_leading=self._lead, onstopped_leading=self._follow,
            )
            try:
                await leaderelection.LeaderElection(config).run()
            except Exception:
                logger.exception("leader election failed; retrying")
                self.leading = False
                await asyncio.sleep(2)

    async def _lead(self) -> None:
        logger.info("leading: this replica writes")
        self.leading = True
        self._on_lead()

    async def _follow(self) -> None:
        logger.info("lost the lease: this replica only watches")
        self.leading = False

    async def release(self) -> None:
        """Clear the Lease's holder if it is still us; call after `campaign()` has stopped."""
        if not self.leading:
            return
        self.leading = False
        lock = self._lock
        try:
            lease = await self._leases.read_namespaced_lease(lock.name, lock.namespace)
            if lease.spec.holder_identity == lock.identity:
                lease.spec.holder_identity = None
                await self._leases.replace_namespaced_lease(lock.name, lock.namespace, lease)  # resourceVersion-checked
                logger.info("released the lease")
        except ApiException as exc:  # it runs out by itself: only the hand-over is slower
            logger.warning("could not release the lease: %s", exc.reason)
