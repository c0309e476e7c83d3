"""Operator replicas with real Lease leader election: one writer at any time, a takeover after a crash, a
hand-over on a clean stop.

Each replica has its own ServiceAccount token; the API server's audit log names the token of every write,
so "only the leader writes" is checked on what the server received, not on what the replicas log.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from tests.cluster.controlplane import ControlPlane
from tests.cluster.objects import create, gatewayroute, namespace, route_names, writes_by
from tests.cluster.parts import OperatorProcess, holder, wait_for

LEASE_SECONDS = 15  # apigw_operator.leadership: lease_duration


def at(event: dict) -> datetime:
    return datetime.fromisoformat(event["requestReceivedTimestamp"])


def is_lease(event: dict) -> bool:
    return event["objectRef"]["resource"] == "leases"


def lease_writes(plane: ControlPlane, replica: OperatorProcess) -> list[dict]:
    """The replica's successful writes of the Lease: taking, renewing or releasing it."""
    return [e for e in writes_by(plane, replica.credential) if is_lease(e) and e["responseStatus"]["code"] < 300]


def test_only_the_leader_writes_and_the_standby_takes_over(cluster: ControlPlane, operators) -> None:
    ns = namespace(cluster, "leader")
    first = operators("replica-a")
    wait_for(lambda: holder(cluster).startswith("replica-a"), what="replica-a holds the Lease")
    second = operators("replica-b")
    wait_for(second.alive, what="replica-b up (liveness endpoint)")
    create(cluster, gatewayroute("before", ns, "/before"))
    wait_for(lambda: f"{ns}.before" in route_names(cluster), what="the leader renders")
    time.sleep(4)  # two of the standby's election rounds: it must write nothing

    first.kill()  # a crash: the Lease must run out before replica-b may take it
    killed = time.monotonic()
    create(cluster, gatewayroute("after-crash", ns, "/after-crash"))
    wait_for(lambda: f"{ns}.after-crash" in route_names(cluster), timeout=LEASE_SECONDS + 15, what="replica-b renders")
    print(f"takeover after a crash: routes.yaml written {time.monotonic() - killed:.1f} s after the kill")
    assert holder(cluster).startswith("replica-b")

    third = operators("replica-c")
    wait_for(third.alive, what="replica-c up (liveness endpoint)")
    second.stop()  # a clean stop (rolling update): replica-b hands the Lease over
    stopped = time.monotonic()
    create(cluster, gatewayroute("after-stop", ns, "/after-stop"))
    wait_for(lambda: f"{ns}.after-stop" in route_names(cluster), timeout=LEASE_SECONDS + 15, what="replica-c renders")
    print(f"hand-over after a clean stop: routes.yaml written {time.monotonic() - stopped:.1f} s after SIGTERM")
    assert holder(cluster).startswith("replica-c")
    *_, renewed, released = lease_writes(cluster, second)
    taken = lease_writes(cluster, third)[0]
    assert at(released) <= at(taken) < at(renewed) + timedelta(seconds=LEASE_SECONDS), "replica-c waited for expiry"

    replicas = [first, second, third]  # one writer at a time: each writes only from its taking the Lease
    starts = [at(lease_writes(cluster, r)[0]) for r in replicas]  # until the next one took it
    for replica, start, end in zip(replicas, starts, [*starts[1:], None]):
        work = [e for e in writes_by(cluster, replica.credential) if not is_lease(e)]
        assert work, f"{replica.name} wrote nothing"
        assert all(e["responseStatus"]["code"] < 400 for e in work)
        outside = [e["requestURI"] for e in work if at(e) < start or (end is not None and at(e) >= end)]
        assert not outside, f"{replica.name} wrote without the Lease: {outside}"
