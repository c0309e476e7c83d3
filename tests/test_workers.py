"""`gateway --workers N`: several processes on one port, one merged /metrics, one graceful stop."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from apigw.testkit.process import (
    BackendProcess,
    GatewayProcess,
    http_status,
    ports,
    wait_until,
)


def metric_value(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def two_workers(tmp_path: Path, **config: object) -> GatewayProcess:
    """A gateway (not started) with `--workers 2` from its config, and `config`'s other settings (by
    default one route to a backend nobody listens on)."""
    port, metrics_port = ports()
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port, "workers": 2},
        "routes": [{"name": "echo", "backend": {"service": "echo", "url": "http://127.0.0.1:9"}}],
        **config,
    }))
    return GatewayProcess(path, port, metrics_port)


def test_two_workers_share_the_port_and_the_metrics(tmp_path: Path) -> None:
    port, metrics_port = ports()
    with BackendProcess() as backend:
        config = tmp_path / "gw.yaml"
        config.write_text(yaml.safe_dump({
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port, "workers": 2},
            "routes": [{"name": "echo", "backend": {"service": "echo", "url": backend.url}}],
        }))
        gateway = GatewayProcess(config, port, metrics_port)
        gateway.start()
        try:
            wait_until(lambda: len(_worker_pids(gateway)) == 2, timeout=20, what="both workers ready")
            pids = _worker_pids(gateway)
            assert gateway.process is not None and gateway.process.pid not in pids
            assert all(_listens(pid, port) for pid in pids), "both workers listen on the shared port"
            assert not _listens(gateway.process.pid, port), "the supervisor serves no traffic"

            for _ in range(60):
                assert http_status(f"{gateway.url}/x") == 200
            counted = 'gateway_http_requests_total{method="GET",route="echo",status_code="200"}'
            # each worker copies its counts into the shared files once a second
            wait_until(lambda: metric_value(gateway.metrics(), counted) >= 60, timeout=5, what="the requests counted")
            metrics = gateway.metrics()
            assert metric_value(metrics, counted) == 60
            assert metric_value(metrics, 'gateway_http_request_duration_seconds_count{route="echo"}') == 60
            assert metric_value(metrics, 'gateway_http_request_duration_seconds_bucket{le="+Inf",route="echo"}') == 60
            assert metric_value(metrics, 'gateway_backend_requests_total{backend_service="echo",status_code="200"}') == 60
            assert metric_value(metrics, "gateway_inflight_requests") == 0
            assert metric_value(metrics, "process_resident_memory_bytes") > 0

            victim = pids.pop()
            os.kill(victim, signal.SIGKILL)

            def restarted() -> bool:  # one look at the workers: two looks could see the victim, then none
                workers = _worker_pids(gateway)
                return len(workers) == 2 and victim not in workers and http_status(f"{gateway.url}/_health/ready") == 200

            wait_until(restarted, timeout=20, what="worker restarted")
        finally:
            code = gateway.stop()
    assert code == 0
    assert "all workers stopped" in gateway.log_text()
    assert "starting it again" in gateway.log_text()


def test_metrics_port_health_answers_for_every_worker(tmp_path: Path) -> None:
    """The supervisor has no config: its `/_health/ready` is what each worker reports, put together."""
    port, metrics_port = ports()
    config = tmp_path / "gw.yaml"

    def write(prefix: str) -> None:
        config.write_text(yaml.safe_dump({
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port, "workers": 2},
            "routes": [{"name": "echo", "match": {"path_prefix": prefix},
                        "backend": {"service": "echo", "url": "http://127.0.0.1:9"}}],
        }))

    write("/a")
    gateway = GatewayProcess(config, port, metrics_port)
    gateway.start()
    try:
        wait_until(lambda: len(_worker_pids(gateway)) == 2, timeout=20, what="both workers ready")
        first = gateway.ready()["config_hash"]
        details = gateway.details()
        assert details["status"] == "ready" and details["config_hash"] == first and details["problem"] is None
        assert details["pid"] == gateway.process.pid
        assert [(w["status"], w["config_hash"], w["last_reload_error"]) for w in details["workers"]] == [
            ("ready", first, None), ("ready", first, None)]

        config.write_text("routes: [{name: broken}]\n")  # both workers see the file change and reject it
        wait_until(lambda: all(w["last_reload_error"] for w in gateway.details()["workers"]), what="both rejected")
        details = gateway.details()
        assert "routes[0].backend: required setting is missing" in details["last_reload_error"]
        assert details["config_hash"] == first and details["status"] == "ready"
        for _ in range(10):  # whichever worker answers
            assert gateway.ready() == {"status": "ready", "config_hash": first}

        stopped, running = sorted(_worker_pids(gateway))
        os.kill(stopped, signal.SIGSTOP)  # it cannot reload: the workers disagree until it can
        try:
            write("/b")
            wait_until(lambda: gateway.details()["config_hash"] is None, what="the workers disagree")
            details = gateway.details()
            second = {w["pid"]: w["config_hash"] for w in details["workers"]}[running]
            assert second != first
            problem = details["problem"]
            assert problem.startswith("workers serve different configs: ")
            assert f"pid {stopped} {first}" in problem and f"pid {running} {second}" in problem
        finally:
            os.kill(stopped, signal.SIGCONT)
        wait_until(lambda: gateway.details()["config_hash"] == second, what="both serve the new config")
        assert gateway.details()["problem"] is None and gateway.details()["last_reload_error"] is None
    finally:
        assert gateway.stop() == 0


def _worker_pids(gateway: GatewayProcess) -> set[int]:
    """The workers the supervisor reports ready on the metrics port; none while it is not ready."""
    try:
        details = gateway.details()
    except OSError:
        return set()
    return {worker["pid"] for worker in details["workers"]}


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port` (/proc/net/tcp's inode in its fds)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    return any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())


LIMITED = {"policies": [{"name": "p", "requests": 5, "period": "1h"}],
           "routes": [{"name": "echo", "backend": {"service": "echo", "url": "http://127.0.0.1:9"}, "ratelimit": "p"}]}


def test_without_redis_workers_refuse_a_rate_limit_they_could_not_share(tmp_path: Path) -> None:
    """Without Redis a limiter's buckets live in its process: two workers would each let the policy through,
    a replica twice its limit. The gateway says so at start and exits instead."""
    gateway = two_workers(tmp_path, **LIMITED)
    gateway.start(wait=False)
    assert gateway.process is not None
    gateway.process.wait(timeout=30)
    assert gateway.stop() == 1
    errors = [line for line in gateway.log_lines() if line["level"] == "error"]
    assert len(errors) == 1 and "is invalid" in errors[0]["msg"]
    assert errors[0]["errors"] == [
        "routes: echo name a rate limit policy, but with --workers (listen.workers) above 1 and no redis each "
        "worker would keep its own budget and let the policy through once per worker: configure redis, or run "
        "one worker"]


def test_without_redis_workers_keep_their_config_when_a_reload_adds_a_rate_limit(tmp_path: Path) -> None:
    gateway = two_workers(tmp_path)
    gateway.start()
    try:
        wait_until(lambda: len(_worker_pids(gateway)) == 2, timeout=20, what="both workers ready")
        first = gateway.ready()["config_hash"]
        config = yaml.safe_load(gateway.config.read_text())
        gateway.config.write_text(yaml.safe_dump({**config, **LIMITED}))
        wait_until(lambda: all(w["last_reload_error"] for w in gateway.details()["workers"]), what="both rejected")
        assert "each worker would keep its own budget" in gateway.details()["last_reload_error"]
        assert {w["config_hash"] for w in gateway.details()["workers"]} == {first}
    finally:
        assert gateway.stop() == 0


def test_with_one_process_an_in_process_rate_limit_holds(tmp_path: Path) -> None:
    with BackendProcess() as backend:
        port, metrics_port = ports()
        config = tmp_path / "gw.yaml"
        config.write_text(yaml.safe_dump({
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
            "policies": LIMITED["policies"],
            "routes": [{"name": "echo", "backend": {"service": "echo", "url": backend.url}, "ratelimit": "p"}],
        }))
        with GatewayProcess(config, port, metrics_port) as gateway:
            statuses = [http_status(f"{gateway.url}/x") for _ in range(12)]
    assert statuses == [200] * 5 + [429] * 7


def test_workers_flag_must_be_positive(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "apigw", "--workers", "0", "--config", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--workers must be at least 1" in result.stderr


def test_process_cpu_seconds_never_goes_down_when_a_worker_dies(tmp_path: Path) -> None:
    """`process_cpu_seconds_total` is a counter: a worker's CPU time must stay in it after the worker exits,
    or Prometheus takes the drop for a reset and `rate()` shows the whole pod's past CPU as a spike."""
    gateway = two_workers(tmp_path)
    gateway.start()
    try:
        wait_until(lambda: len(_worker_pids(gateway)) == 2, timeout=20, what="both workers ready")
        victim = min(_worker_pids(gateway))
        samples = [metric_value(gateway.metrics(), "process_cpu_seconds_total")]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 3  # past the restart delay: the gap between the death and the new worker
        while time.monotonic() < deadline:
            samples.append(metric_value(gateway.metrics(), "process_cpu_seconds_total"))
            time.sleep(0.1)
        assert all(later >= earlier for earlier, later in itertools.pairwise(samples)), samples
        wait_until(lambda: len(_worker_pids(gateway) - {victim}) == 2, timeout=20, what="the worker restarted")
    finally:
        assert gateway.stop() == 0


def test_sigterm_as_the_workers_start_stops_them_and_exits_0(tmp_path: Path) -> None:
    """A pod may be deleted as soon as it starts (a rollout undone, a scale-down): a SIGTERM that comes while
    the supervisor is still starting its workers stops them too, and the stop is a clean one (exit 0),
    not a worker left serving with a supervisor waiting for it until the kubelet's SIGKILL."""
    gateway = two_workers(tmp_path)
    gateway.start(wait=False)
    try:
        while "supervising 2 workers" not in gateway.log_text():  # logged just before the workers are started
            time.sleep(0.001)
        gateway.signal(signal.SIGTERM)
        assert gateway.process is not None
        assert gateway.process.wait(20) == 0
    finally:
        gateway.stop(timeout=5)
    assert "all workers stopped" in gateway.log_text()
