"""Health on two ports: the public traffic port says status and config hash only; the metrics port says why."""

from __future__ import annotations

import json
import re
import signal
import urllib.error
from pathlib import Path

import pytest
import yaml

from apigw.server.health import WorkersHealth, status_path
from apigw.testkit.process import BackendProcess, GatewayProcess, http_status, ports, wait_until
from apigw.testkit.raw import Answer, exchange
from apigw.testkit.redis import RedisServer

README = Path(__file__).resolve().parent.parent / "README.md"


def _config(port: int, metrics_port: int, backend: str, redis: str) -> dict:
    return {
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port, "drain_delay": "2s"},
        "redis": {"url": redis, "timeout": "200ms"},
        "ratelimit": {"failure_mode": "fail_open"},
        "policies": [{"name": "wide", "requests": 1000, "period": "1s"}],
        "routes": [{"name": "echo", "ratelimit": "wide", "backend": {"service": "echo", "url": backend}}],
    }


def test_traffic_port_says_status_and_hash_and_the_metrics_port_says_why(tmp_path: Path) -> None:
    port, metrics_port = ports()
    path = tmp_path / "gw.yaml"
    with RedisServer() as redis, BackendProcess() as backend:
        path.write_text(yaml.safe_dump(_config(port, metrics_port, backend.url, redis.url)))
        gateway = GatewayProcess(path, port, metrics_port)
        gateway.start()
        try:
            config_hash = gateway.ready()["config_hash"]
            details = gateway.details()
            assert details == {
                "status": "ready", "config_hash": config_hash, "last_reload_error": None, "pid": gateway.process.pid,
                "redis": {"state": "unknown", "error": None, "since": details["redis"]["since"]},
                "unavailable_backends": [],
            }
            assert http_status(f"{gateway.url}/x") == 200  # a rate limit decision: a round trip to Redis
            assert gateway.details()["redis"]["state"] == "up"

            path.write_text("routes: [{name: broken}]\n")
            gateway.signal(signal.SIGHUP)
            wait_until(lambda: gateway.details()["last_reload_error"] is not None, what="reload rejected")
            assert f"{path}:1: routes[0].backend: required setting is missing" in gateway.details()["last_reload_error"]
            ready = Answer(exchange(port, b"GET /_health/ready HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"))
            assert ready.status == 200 and ready.json() == {"status": "ready", "config_hash": config_hash}
            assert str(path).encode() not in ready.raw and str(gateway.process.pid).encode() not in ready.raw
            live = Answer(exchange(port, b"GET /_health/live HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"))
            assert live.status == 200 and live.json() == {"status": "alive"}

            redis.stop()
            assert http_status(f"{gateway.url}/x") == 200  # fail_open: served, and the failure seen
            down = gateway.details()
            assert down["status"] == "ready", "Redis down does not make the pod unready"
            assert down["redis"]["state"] == "down" and "Connection" in down["redis"]["error"]
            shown = re.search(r"\$ curl -s http://localhost:9090/_health/ready\n(\{.*\})\n", README.read_text())
            assert shown, "README's example of the metrics port's /_health/ready not found"
            example = json.loads(shown.group(1))
            assert example.keys() == down.keys() and example["redis"].keys() == down["redis"].keys()

            gateway.signal(signal.SIGTERM)  # drain_delay 2s: both ports say draining meanwhile
            wait_until(lambda: http_status(f"{gateway.url}/_health/ready") == 503, what="draining")
            for read, keys in ((gateway.ready, {"status", "config_hash"}),
                               (gateway.details, {"status", "config_hash", "last_reload_error", "pid", "redis",
                                                  "unavailable_backends"})):
                with pytest.raises(urllib.error.HTTPError) as draining:
                    read()
                assert draining.value.code == 503
                body = json.loads(draining.value.read())
                draining.value.close()
                assert body["status"] == "draining" and set(body) == keys
        finally:
            assert gateway.stop() == 0


def test_workers_health_counts_a_worker_without_a_status_file_as_starting(tmp_path: Path) -> None:
    status_path(tmp_path, 101).write_text(json.dumps(
        {"status": "ready", "config_hash": "aa", "last_reload_error": None, "pid": 101, "redis": None}))
    pids = [101, 102]
    health = WorkersHealth(tmp_path, lambda: pids, list, lambda: False)
    body, code = health.body()
    assert code == 503 and body["status"] == "not ready"
    assert body["config_hash"] == "aa" and body["problem"] == "worker pid 102 is starting"
    assert body["workers"][1] == {"pid": 102, "status": "starting"}

    pids.remove(102)  # gone (its slot restarts it later): the live ones decide
    assert health.body()[1] == 200
    pids.clear()
    body, code = health.body()
    assert code == 503 and body["problem"] == "no worker is running"


def test_workers_health_lists_each_backend_a_worker_holds_unavailable_once(tmp_path: Path) -> None:
    """Every worker loads the same files: the supervisor's answer (what the operator reads) lists a held
    backend once; one that a worker still holds (it has not reloaded yet) is listed too."""
    held = {"backend_service": "evil", "routes": ["other.evil"], "error": "cannot use the TLS files: ca_file /x: gone"}
    old = {**held, "error": "cannot use the TLS files: ca_file /x: No such file or directory"}
    for pid, backends in ((101, [held]), (102, [held, old]), (103, [])):
        status_path(tmp_path, pid).write_text(json.dumps({
            "status": "ready", "config_hash": "aa", "last_reload_error": None, "pid": pid, "redis": None,
            "unavailable_backends": backends}))
    body, code = WorkersHealth(tmp_path, lambda: [101, 102, 103], list, lambda: False).body()
    assert code == 200 and body["unavailable_backends"] == [held, old]
