"""`gateway --workers N`: several processes on one port, one merged /metrics, one graceful stop."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from apigw.testkit import loopback_allowed
from apigw.testkit.process import (
    BackendProcess,
    GatewayProcess,
    http_status,
    ports,
    wait_until,
)
from apigw.testkit.tokens import SigningKey
from apigw.testkit.volume import Projection


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


def test_a_worker_killed_while_the_files_are_invalid_comes_back_on_the_last_good_config(tmp_path: Path) -> None:
    """A worker that dies while the ConfigMap holds an invalid config is started again on the config its
    sibling serves (the last one that loaded), says so, serves traffic, and follows the next valid config."""
    port, metrics_port = ports()
    with BackendProcess() as backend:
        volume = Projection(tmp_path / "config")
        settings = yaml.safe_dump({"listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port,
                                              "workers": 2}, "ownership": loopback_allowed()})

        def routes(prefix: str) -> str:
            return yaml.safe_dump({"routes": [{"name": "echo", "match": {"path_prefix": prefix},
                                               "backend": {"service": "echo", "url": backend.url}}]})

        volume.write({"config.yaml": settings, "routes.yaml": routes("/")})
        gateway = GatewayProcess(volume.dir, port, metrics_port)
        gateway.start()
        try:
            wait_until(lambda: len(_worker_pids(gateway)) == 2, timeout=20, what="both workers ready")
            good = gateway.details()["config_hash"]
            volume.write({"config.yaml": settings, "routes.yaml": "routes: [{name: broken}]\n"})
            wait_until(lambda: all(w["last_reload_error"] for w in gateway.details()["workers"]), what="both rejected")
            failures = 'gateway_config_reloads_total{result="failure"}'
            wait_until(lambda: metric_value(gateway.metrics(), failures) == 2, timeout=5, what="both rejections counted")

            victim, survivor = sorted(_worker_pids(gateway))
            os.kill(victim, signal.SIGKILL)

            def back() -> bool:
                workers = _health(gateway)["workers"]
                return len(workers) == 2 and victim not in {w["pid"] for w in workers} and all(
                    w["status"] == "ready" for w in workers)

            wait_until(back, timeout=20, what="the worker back")
            details = gateway.details()
            restarted = ({w["pid"] for w in details["workers"]} - {survivor}).pop()
            assert details["status"] == "ready" and details["config_hash"] == good and details["problem"] is None
            assert "routes[0].backend: required setting is missing" in details["last_reload_error"]
            assert _served_by(gateway, 24) == {survivor, restarted}
            started = [line for line in gateway.log_lines() if "last good config" in line["msg"]]
            assert len(started) == 1 and started[0]["level"] == "error", started
            assert started[0]["config_hash"] == good
            assert any("routes.yaml:1: routes[0].backend: required setting is missing" in error
                       for error in started[0]["errors"])
            wait_until(lambda: metric_value(gateway.metrics(), failures) == 3, timeout=5,
                       what="the start on the last good config counted as a rejected config")

            volume.write({"config.yaml": settings, "routes.yaml": routes("/v2")})
            wait_until(lambda: gateway.details()["config_hash"] not in (None, good), what="both on the new config")
            assert {w["pid"] for w in gateway.details()["workers"]} == {survivor, restarted}
            assert gateway.details()["last_reload_error"] is None
            assert http_status(f"{gateway.url}/v2/x") == 200 and http_status(f"{gateway.url}/x") == 404
        finally:
            assert gateway.stop() == 0


def test_a_worker_that_cannot_start_is_restarted_less_often_and_reported_down(tmp_path: Path) -> None:
    """The last good config names a key file that is now broken: the restarted worker cannot serve the keys
    its sibling holds, so it exits; the supervisor waits longer at each exit in a row, logs each, and its
    health lists the worker as down (the pod stays ready: its other worker serves). Once the key file is
    mended, the next start brings the worker back."""
    key = SigningKey()
    key_file = key.write_public_pem(tmp_path / "jwt.pem")
    gateway = two_workers(tmp_path, auth={"keys": [{"file": str(key_file)}]})
    gateway.start()
    try:
        wait_until(lambda: len(_worker_pids(gateway)) == 2, timeout=20, what="both workers ready")
        key_file.write_text("not a key\n")
        wait_until(lambda: all(w["last_reload_error"] for w in gateway.details()["workers"]), what="both rejected")
        victim = min(_worker_pids(gateway))
        os.kill(victim, signal.SIGKILL)

        def down_twice() -> bool:
            return any(w["status"] == "restarting" and w["exits_in_a_row"] == 2 for w in _health(gateway)["workers"])

        wait_until(down_twice, timeout=20, what="the worker down after a failed start")
        details = gateway.details()  # 200: the other worker serves
        assert details["status"] == "ready" and gateway.ready()["status"] == "ready"
        down = next(w for w in details["workers"] if w["status"] == "restarting")
        assert down["last_exit"] == "exited with 1" and down["worker"] == 0
        assert f"worker 0 is down (exited with 1, 2 time(s) in a row since {down['since']}), next start at " \
            f"{down['next_start']}" in details["problem"]
        lines = gateway.log_lines()
        exits = [line for line in lines if line["logger"] == "apigw.workers" and "starting it again" in line["msg"]]
        assert [(line["exits_in_a_row"], line["restart_in_s"]) for line in exits] == [(1, 1.0), (2, 2.0)]
        assert exits[0]["msg"].startswith(f"worker 0 (pid {victim}) killed by SIGKILL after ")
        assert "exited with 1 after " in exits[1]["msg"] and "2 times in a row since" in exits[1]["msg"]
        assert exits[1]["msg"].endswith("; starting it again in 2 s")
        cannot = [line for line in lines if line["msg"].startswith("cannot start on the last good config instead")]
        assert cannot and all(line["msg"].endswith("auth.keys[0].file: not a PEM public key") for line in cannot), cannot

        key.write_public_pem(key_file)
        wait_until(lambda: len(_worker_pids(gateway)) == 2 and gateway.details()["problem"] is None, timeout=20,
                   what="the worker back once the key file is mended")
    finally:
        assert gateway.stop() == 0


def _health(gateway: GatewayProcess) -> dict[str, Any]:
    """The metrics port's `/_health/ready`, ready (200) or not (503)."""
    try:
        return gateway.details()
    except urllib.error.HTTPError as error:
        with error:
            return json.loads(error.read())


def _served_by(gateway: GatewayProcess, connections: int) -> set[int]:
    """The pids of the workers that answered `connections` requests, each on a connection of its own (the
    kernel spreads connections over the sockets sharing the port); each answer must be a 200."""
    opened = [http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5) for _ in range(connections)]
    try:
        client_ports = set()
        for connection in opened:
            connection.request("GET", "/x")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
            client_ports.add(connection.sock.getsockname()[1])
        def answered(local: int, remote: int, state: str) -> bool:
            return local == gateway.port and remote in client_ports and state == "01"  # 01: ESTABLISHED

        return {pid for pid in _worker_pids(gateway) if _holds(pid, answered)}
    finally:
        for connection in opened:
            connection.close()


def _worker_pids(gateway: GatewayProcess) -> set[int]:
    """The workers the supervisor reports ready on the metrics port; none while it is not ready."""
    try:
        details = gateway.details()
    except OSError:
        return set()
    return {worker["pid"] for worker in details["workers"]}


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port`."""
    return _holds(pid, lambda local, remote, state: local == port and state == "0A")  # 0A: LISTEN


def _holds(pid: int, wanted: Callable[[int, int, str], bool]) -> bool:
    """Whether process `pid` holds a TCP socket whose (local port, remote port, state) is `wanted`
    (/proc/net/tcp's inode among its fds)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
        if wanted(local, remote, fields[3]):
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
