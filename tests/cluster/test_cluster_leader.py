"""Two operator replicas with real Lease leader election: one writer at any time, a takeover after a crash.

Each replica has its own ServiceAccount token; the API server's audit log names the token of every write,
so "only the leader writes" is checked on what the server received, not on what the replicas log.
"""

from __future__ import annotations

import time
from datetime import datetime

from tests.cluster.controlplane import ApiError, ControlPlane
from tests.cluster.objects import create, gatewayroute, namespace, route_names, writes_by
from tests.cluster.parts import LEASE_PATH, wait_for

LEASE_SECONDS = 15  # apigw_operator.leadership: lease_duration


def holder(plane: ControlPlane) -> str:
    try:
        return plane.api.get(LEASE_PATH)["spec"].get("holderIdentity") or ""
    except ApiError as exc:
        if exc.status == 404:
            return ""
        raise


def at(event: dict) -> datetime:
    return datetime.fromisoformat(event["requestReceivedTimestamp"])


def test_only_the_leader_writes_and_the_standby_takes_over(cluster: ControlPlane, operators) -> None:
    ns = namespace(cluster, "leader")
    first = operators("replica-a")
    wait_for(lambda: holder(cluster).startswith("replica-a"), what="replica-a holds the Lease")
    second = operators("replica-b")
    wait_for(second.alive, what="replica-b up (liveness endpoint)")
    create(cluster, gatewayroute("before", ns, "/before"))
    wait_for(lambda: f"{ns}.before" in route_names(cluster), what="the leader renders")
    time.sleep(4)  # two of the standby's election rounds: it must write nothing

    first.kill()
    killed = time.monotonic()
    create(cluster, gatewayroute("after", ns, "/after"))
    wait_for(lambda: f"{ns}.after" in route_names(cluster), timeout=LEASE_SECONDS + 15, what="the standby renders")
    print(f"takeover: routes.yaml written {time.monotonic() - killed:.1f} s after the leader was killed")
    assert holder(cluster).startswith("replica-b")

    def is_lease(event: dict) -> bool:
        return event["objectRef"]["resource"] == "leases"

    a_writes, b_writes = writes_by(cluster, first.credential), writes_by(cluster, second.credential)
    acquired = [e for e in b_writes if is_lease(e) and e["verb"] == "update" and e["responseStatus"]["code"] == 200]
    assert acquired, "replica-b never took the Lease"
    b_work = [e for e in b_writes if not is_lease(e)]
    a_work = [e for e in a_writes if not is_lease(e)]
    assert a_work and b_work
    assert all(at(e) >= at(acquired[0]) for e in b_work), "replica-b wrote before it held the Lease"
    assert all(at(e) < at(acquired[0]) for e in a_work), "replica-a's writes overlap replica-b's leadership"
    assert all(e["responseStatus"]["code"] < 400 for e in a_work + b_work)
