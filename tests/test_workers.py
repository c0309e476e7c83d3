"""`gateway --workers N`: several processes on one port, one merged /metrics, one graceful stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
            pids = set()
            deadline = time.monotonic() + 20
            while len(pids) < 2 and time.monotonic() < deadline:
                pids.add(gateway.ready()["pid"])
            assert len(pids) == 2, "both workers answer on the shared port"
            assert gateway.process is not None and gateway.process.pid not in pids

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
            wait_until(lambda: http_status(f"{gateway.url}/_health/ready") == 200 and len(_worker_pids(gateway)) == 2
                       and victim not in _worker_pids(gateway), timeout=20, what="worker restarted")
        finally:
            code = gateway.stop()
    assert code == 0
    assert "all workers stopped" in gateway.log_text()
    assert "starting it again" in gateway.log_text()


def _worker_pids(gateway: GatewayProcess) -> set[int]:
    pids = set()
    for _ in range(40):
        try:
            pids.add(gateway.ready()["pid"])
        except OSError:
            pass
    return pids


def test_workers_flag_must_be_positive(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "apigw", "--workers", "0", "--config", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--workers must be at least 1" in result.stderr
