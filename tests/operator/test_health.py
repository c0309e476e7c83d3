"""Reading pods' `/_health/ready` (their metrics port's, with the details) over real HTTP on loopback."""

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


async def test_a_supervisor_problem_is_reported_but_is_no_rejection() -> None:
    """With `--workers`, workers serving different configs leave `config_hash` null and say so in `problem`."""
    pod = GatewayPod()
    await pod.start()
    pod.problem = "workers serve different configs: pid 7 aaaa, pid 8 bbbb"
    try:
        async with aiohttp.ClientSession() as session:
            [report] = await probe_pods(session, {"a": pod.url})
    finally:
        await pod.stop()
    assert report == PodReport("a", None, "workers serve different configs: pid 7 aaaa, pid 8 bbbb", rejected=False)


async def test_backends_a_pod_holds_unavailable_are_read_by_route() -> None:
    """A pod that cannot use a backend's TLS files serves the config and lists that backend, with its routes."""
    pod = GatewayPod()
    await pod.start()
    pod.config_hash = "aaaa"
    why = "cannot use the TLS files: ca_file /certs/ca.pem: No such file or directory"
    pod.unavailable_backends = [{"backend_service": "evil", "routes": ["other.evil", "other.evil2"], "error": why}]
    try:
        async with aiohttp.ClientSession() as session:
            [report] = await probe_pods(session, {"a": pod.url})
    finally:
        await pod.stop()
    held = {"other.evil": f"backend evil: {why}", "other.evil2": f"backend evil: {why}"}
    assert report == PodReport("a", "aaaa", held=held)
    assert not report.rejected and report.problem is None
