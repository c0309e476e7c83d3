"""Reading pods' `/_health/ready` over real HTTP on loopback."""

from __future__ import annotations

import aiohttp

from apigw_operator.health import PodReport, probe_pods
from tests.operator.kube import GatewayPod


async def test_probe_reads_hash_and_reload_error_and_survives_a_dead_pod() -> None:
    good, bad = GatewayPod(), GatewayPod()
    await good.start()
    await bad.start()
    good.config_hash = "aaaa"
    bad.config_hash, bad.last_reload_error = "old", "config.yaml:2: listen.port: bad"
    dead = GatewayPod()
    await dead.start()
    dead_url = dead.url
    await dead.stop()
    try:
        async with aiohttp.ClientSession() as session:
            reports = await probe_pods(session, {"a": good.url, "b": bad.url, "c": dead_url})
    finally:
        await good.stop()
        await bad.stop()
    assert reports[0] == PodReport("a", "aaaa")
    assert reports[1] == PodReport("b", "old", "config.yaml:2: listen.port: bad", rejected=True)
    assert reports[2].pod == "c" and reports[2].config_hash is None and not reports[2].rejected
    assert reports[2].problem.startswith("health endpoint not answering")
