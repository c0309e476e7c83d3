"""A Redis failover under load, with real processes: a Sentinel group (master, replica, three sentinels), an
echo backend and a gateway with a rate-limited, token-checked route and revocation on. Bounded load runs,
the master is SIGKILLed, and the run records what clients saw until decisions come from the promoted
replica. tests/test_failover.py asserts on the record; bench/redis_failover.py prints its figures."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis
import yaml

from apigw.testkit import route
from apigw.testkit.process import BackendProcess, GatewayProcess, ports, wait_until
from apigw.testkit.redis import SentinelGroup
from apigw.testkit.tokens import SigningKey

REDIS_TIMEOUT = 0.1
"""`redis.timeout` of the gateway under test (seconds)."""


@dataclass
class FailoverRun:
    failure_mode: str
    statuses: Counter[int] = field(default_factory=Counter)
    """Every load response by status."""
    decided: int = 0
    """Load responses that carried a rate limit decision (RateLimit-* headers): Redis answered."""
    degraded_after_kill: int = 0
    """Load requests sent after the kill and answered without a decision (fail_open: let through; fail_closed: 503)."""
    slowest: float = 0.0
    """The slowest load request, seconds."""
    recovered_after: float | None = None
    """Seconds from the kill until the first request (sent after it) that Redis decided: the new master."""
    budget_after: list[int] = field(default_factory=list)
    """Statuses of a fresh client's requests after recovery (its budget, then one more)."""
    revoked_after: int = 0
    """Status for the revoked token after recovery."""
    master_info: list[str] = field(default_factory=list)
    """The gateway's `gateway_redis_master_info` and `gateway_redis_failovers_total` lines after recovery."""
    old_master: str = ""
    new_master: str = ""


async def _load(gateway: GatewayProcess, token: str, run: FailoverRun, state: dict, clients: int, pause: float) -> None:
    """`clients` workers, each sending one request at a time (each with a client key of its own, so the load
    itself is never limited) until `state["stop"]`."""
    timeout = aiohttp.ClientTimeout(total=10)
    sent = 0

    async def worker(number: int) -> None:
        nonlocal sent
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not state["stop"]:
                sent += 1
                headers = {"Authorization": f"Bearer {token}", "X-Client": f"load-{number}-{sent}"}
                started = time.monotonic()
                async with session.get(f"{gateway.url}/limited/x", headers=headers) as response:
                    await response.read()
                    run.statuses[response.status] += 1
                    decided = "RateLimit-Limit" in response.headers
                run.slowest = max(run.slowest, time.monotonic() - started)
                run.decided += decided
                killed = state.get("killed")
                if killed is not None and started > killed:
                    if decided and run.recovered_after is None:
                        run.recovered_after = started - killed
                    elif not decided:
                        run.degraded_after_kill += 1
                await asyncio.sleep(pause)

    await asyncio.gather(*[worker(n) for n in range(clients)])


async def run_failover(workdir: Path, *, failure_mode: str = "fail_open", clients: int = 4, pause: float = 0.005,
                       warm: float = 1.0, linger: float = 1.0, bound: float = 30.0, budget: int = 5) -> FailoverRun:
    """Warm up for `warm` s, SIGKILL the master, keep the load on until `linger` s after recovery (at most
    `bound` s after the kill), then check limits and revocations on the new master."""
    run = FailoverRun(failure_mode)
    key = SigningKey("ec", kid="k1")
    pem = key.write_public_pem(workdir / "jwt-public-key.pem")
    with SentinelGroup() as group, BackendProcess() as backend:
        run.old_master = f"127.0.0.1:{group.master.port}"
        run.new_master = f"127.0.0.1:{group.replica.port}"
        master = redis.Redis(port=group.master.port)
        master.set("revoked:stolen", 1)
        replica = redis.Redis(port=group.replica.port)  # the revocation must survive the failover: wait for it there
        wait_until(lambda: replica.get("revoked:stolen") is not None, what="the revocation replicated")
        port, metrics_port = ports()
        config = {
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
            "redis": {"url": group.url, "timeout": f"{REDIS_TIMEOUT * 1000:g}ms", "connect_timeout": "200ms"},
            "ratelimit": {"failure_mode": failure_mode},
            "auth": {"keys": [{"file": str(pem), "kid": "k1"}], "revocation": {"failure_mode": failure_mode}},
            "policies": [{"name": "per-client", "requests": budget, "period": "1m",
                          "key": {"type": "header", "name": "X-Client"}}],
            "routes": [route("limited", backend.url, match={"path_prefix": "/limited"}, auth={"required": True},
                             ratelimit="per-client")],
        }
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        with GatewayProcess(workdir / "config.yaml", port, metrics_port) as gateway:
            state: dict = {"stop": False}
            load = asyncio.create_task(_load(gateway, key.token(), run, state, clients, pause))
            await asyncio.sleep(warm)
            state["killed"] = time.monotonic()
            group.master.process.send_signal(signal.SIGKILL)
            group.master.process.wait()
            while run.recovered_after is None and time.monotonic() - state["killed"] < bound and not load.done():
                await asyncio.sleep(0.05)
            await asyncio.sleep(linger)
            state["stop"] = True
            await load

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                headers = {"Authorization": f"Bearer {key.token()}", "X-Client": "after-failover"}
                for _ in range(budget + 1):
                    async with session.get(f"{gateway.url}/limited/x", headers=headers) as response:
                        run.budget_after.append(response.status)
                revoked = {"Authorization": f"Bearer {key.token(jti='stolen')}", "X-Client": "thief"}
                async with session.get(f"{gateway.url}/limited/x", headers=revoked) as response:
                    run.revoked_after = response.status
            run.master_info = [line for line in gateway.metrics().splitlines()
                               if re.match(r"gateway_redis_(master_info|failovers_total)\b", line)]
    return run
