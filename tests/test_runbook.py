"""The runbook's gateway-facing commands, run as written against a real gateway process.

Each command below is quoted from RUNBOOK.md (a test checks it is still there, word for word) and run
through `bash -c` with the real curl, grep, jq, sort, uniq, paste, xargs and redis-cli. Only what
points at the cluster is substituted, by `local()`:

- `kubectl logs -l app=api-gateway -n api-gateway [--tail=N]` (or `<pod>`) -> the gateway process's log
  file (`cat` it, or `tail -n N`); `-f` is dropped, and `watch -n 5 '...'` runs its command once;
- `localhost:8080` / `localhost:9090` (the runbook's port-forwards) -> the test gateway's ports;
- `kubectl exec ... -- /app/gateway` -> a `gateway` on PATH running this checkout;
- `kubectl exec -it <redis-pod> ... -- redis-cli` and `redis-cli` -> `redis-cli -p <test redis port>`;
- `kubectl get configmap api-gateway-config -n api-gateway -o yaml` -> `manifests/gateway/configmap.yaml`.

Then each output is checked to hold exactly what the command is meant to select.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from apigw.testkit import route
from apigw.testkit.process import (
    BackendProcess,
    GatewayProcess,
    http_status,
    ports,
    wait_until,
)
from apigw.testkit.raw import exchange
from apigw.testkit.redis import RedisServer, free_port
from apigw.testkit.tokens import SigningKey

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("bash", "curl", "grep", "jq", "sort", "uniq", "paste", "xargs", "tail", "redis-cli")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"the runbook's commands need {', '.join(MISSING)} on PATH (bash .ci/run installs them)"
)


def runbook_commands() -> set[str]:
    """Every command of RUNBOOK.md's code blocks (continuation lines and `for` loops joined, spaces
    collapsed), and each part of an `a && b` chain."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "RUNBOOK.md").read_text(), re.DOTALL)
    text = re.sub(r"\n\s*done", "; done", "\n".join(blocks).replace("\\\n", " ").replace("; do\n", "; do "))
    commands = {" ".join(line.split()) for line in text.splitlines() if line.strip()}
    return commands | {part for command in commands for part in command.split(" && ")}


RUNBOOK = runbook_commands()


class Site:
    """One gateway process with its log file, ports and (optionally) Redis: where `local()` points commands."""

    def __init__(self, gateway: GatewayProcess, redis: RedisServer | None, bin_dir: Path):
        self.gateway, self.redis, self.bin_dir = gateway, redis, bin_dir

    def local(self, command: str) -> str:
        """The runbook command with its cluster parts pointed at this gateway (see the module docstring)."""
        assert " ".join(command.split()) in RUNBOOK, f"not a RUNBOOK.md command: {command}"
        log = str(self.gateway.log_path)
        command = re.sub(r"kubectl logs (-f )?-l app=api-gateway (-n api-gateway )?--tail=(\d+)( -n api-gateway)?",
                         rf"tail -n \3 {log}", command)
        command = re.sub(r"kubectl logs (-f )?(-l app=api-gateway|<pod>) -n api-gateway", f"cat {log}", command)
        command = re.sub(r"^watch -n \d+ '(.*)'$", r"\1", command)
        command = command.replace("localhost:8080", f"127.0.0.1:{self.gateway.port}")
        command = command.replace("localhost:9090", f"127.0.0.1:{self.gateway.metrics_port}")
        command = re.sub(r"kubectl exec -it <gateway-pod> -n api-gateway -- /app/gateway", "gateway", command)
        command = re.sub(r"kubectl exec -it <redis-pod> -n api-gateway -- ", "", command)
        if self.redis is not None:
            command = command.replace("redis-cli", f"redis-cli -p {self.redis.port}")
        command = command.replace("kubectl get configmap api-gateway-config -n api-gateway -o yaml",
                                  f"cat {ROOT / 'manifests/gateway/configmap.yaml'}")
        assert "kubectl" not in command and "localhost" not in command, command
        return command

    def execute(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run the runbook command, made local, with bash; a log command once the log has settled."""
        if "kubectl logs" in command:
            self.settle_log()
        return subprocess.run(
            ["bash", "-c", self.local(command)], check=False, capture_output=True, text=True, timeout=60,
            env={**self.gateway.env, "PATH": f"{self.bin_dir}:{self.gateway.env['PATH']}"},
        )

    def settle_log(self, quiet: float = 0.1, timeout: float = 15) -> None:
        """Wait until the log has not grown for `quiet` seconds: the gateway writes access lines every
        10 ms (`apigw.observability.logs.FLUSH_INTERVAL`), so the last requests' lines are in."""
        deadline, previous = time.monotonic() + timeout, -1
        while (size := self.gateway.log_path.stat().st_size) != previous:
            assert time.monotonic() < deadline, f"the gateway's log still grows after {timeout} s"
            previous = size
            time.sleep(quiet)

    def run(self, command: str, expect_status: int = 0) -> str:
        """Its stdout, once its exit status is checked (1: grep selected nothing)."""
        done = self.execute(command)
        assert done.returncode == expect_status, f"{command}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def get(self, path: str, headers: dict[str, str] | None = None) -> int:
        return http_status(self.gateway.url + path, headers)


def counted(output: str) -> dict[str, int]:
    """`uniq -c` output as {item: count}."""
    pairs = (line.strip().split(None, 1) for line in output.splitlines() if line.strip())
    return {item: int(count) for count, item in pairs}


def series(output: str) -> dict[str, float]:
    """Prometheus text lines as {'name{labels}': value}, comments left out."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in output.splitlines() if line and not line.startswith("#")}


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A `gateway` command on PATH for this checkout, as `/app/gateway` is in the image."""
    path = tmp_path / "bin"
    path.mkdir()
    script = path / "gateway"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -m apigw "$@"\n')
    script.chmod(0o755)
    return path


@pytest.fixture
def echo() -> Iterator[BackendProcess]:
    with BackendProcess() as backend:
        yield backend


def start(tmp_path: Path, config: dict, bin_dir: Path, redis: RedisServer | None = None) -> Site:
    port, metrics_port = ports()
    listen = {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port, **config.get("listen", {})}
    config = {**config, "listen": listen}
    directory = tmp_path / "etc-gateway"  # the ConfigMap directory layout
    directory.mkdir()
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    gateway = GatewayProcess(directory, port, metrics_port, env={"GATEWAY_CONFIG": str(directory)})
    gateway.start()
    return Site(gateway, redis, bin_dir)


@pytest.fixture
def sites() -> Iterator[list[Site]]:
    started: list[Site] = []
    yield started
    for site in started:
        site.gateway.stop()


def test_runbook_commands_are_quoted_from_the_runbook() -> None:
    """The quoting check itself: a command that is not in RUNBOOK.md is refused."""
    assert "curl -s http://localhost:9090/metrics | grep gateway_ratelimit" in RUNBOOK
    site = Site(GatewayProcess(Path("/x/config.yaml"), 1, 2), None, Path("/x"))
    with pytest.raises(AssertionError, match="not a RUNBOOK.md command"):
        site.local("curl -s http://localhost:9090/metrics | grep something_else")


def test_error_rate_latency_and_backend_commands(tmp_path: Path, bin_dir: Path, echo: BackendProcess, sites) -> None:
    """High Error Rate, High Latency, Backend Service Errors: 5xx by path, by backend, breaker state, durations.
    A 401 and a 429 in the same log are blamed on no backend: theirs was never called."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused -> 502
    pem = SigningKey("ec").write_public_pem(tmp_path / "jwt-public-key.pem")
    site = start(tmp_path, {
        "auth": {"keys": [{"file": str(pem)}], "audience": "api"},
        "policies": [{"name": "one", "requests": 1, "period": "1h"}],
        "routes": [
            route("users", echo.url, match={"path_prefix": "/users"}),
            route("orders", echo.url, match={"path_prefix": "/orders"}, rewrite_prefix="/"),
            {"name": "payments", "match": {"path_prefix": "/payments"},
             "backend": {"service": "payments", "url": dead, "retries": {"max_retries": 0},
                         "circuit_breaker": {"consecutive_failures": 3}}},
            route("secure", echo.url, service="accounts", match={"path_prefix": "/secure"}, auth={"required": True}),
            route("limited", echo.url, service="reports", match={"path_prefix": "/limited"}, ratelimit="one"),
        ],
    }, bin_dir)
    sites.append(site)

    statuses = [site.get("/users/1") for _ in range(4)]
    statuses += [site.get("/orders/status/503") for _ in range(2)]
    statuses += [site.get("/payments/charge") for _ in range(4)]  # 3 refused, then the breaker answers
    statuses.append(site.get("/nowhere"))
    statuses += [site.get("/secure/x"), site.get("/limited/x"), site.get("/limited/x")]
    assert statuses == [200] * 4 + [503] * 2 + [502] * 3 + [503] + [404] + [401, 200, 429]

    # High Error Rate, "Group errors by route" (kubectl logs -> the log file): every 5xx path with its count.
    out = site.run('kubectl logs -l app=api-gateway -n api-gateway | grep "status_code=5" | '
                   "jq -r '.path' | sort | uniq -c | sort -rn")
    assert counted(out) == {"/payments/charge": 4, "/orders/status/503": 2}
    assert out.splitlines()[0].split() == ["4", "/payments/charge"]  # sort -rn: the worst first

    # "Check error rate by status code": the runbook's label names, one series per route and status.
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_http_requests_total | grep status_code")
    assert series(out) == {
        'gateway_http_requests_total{method="GET",route="users",status_code="200"}': 4.0,
        'gateway_http_requests_total{method="GET",route="orders",status_code="503"}': 2.0,
        'gateway_http_requests_total{method="GET",route="payments",status_code="502"}': 3.0,
        'gateway_http_requests_total{method="GET",route="payments",status_code="503"}': 1.0,
        'gateway_http_requests_total{method="GET",route="-",status_code="404"}': 1.0,
        'gateway_http_requests_total{method="GET",route="secure",status_code="401"}': 1.0,
        'gateway_http_requests_total{method="GET",route="limited",status_code="200"}': 1.0,
        'gateway_http_requests_total{method="GET",route="limited",status_code="429"}': 1.0,
    }
    assert series(site.run("curl -s http://localhost:9090/metrics | grep gateway_http_requests_total")) == series(out)
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_http_requests_total | tail -5")
    assert len(out.splitlines()) == 5 and set(series(out)) <= set(series(site.gateway.metrics()))

    # "Check backend errors" / "Check backend metrics by service": what each backend answered; the
    # refused connections have no status, so they count as `backend_unreachable`.
    backend_series = {
        'gateway_backend_requests_total{backend_service="users",status_code="200"}': 4.0,
        'gateway_backend_requests_total{backend_service="orders",status_code="503"}': 2.0,
        'gateway_backend_requests_total{backend_service="payments",status_code="backend_unreachable"}': 3.0,
        'gateway_backend_requests_total{backend_service="reports",status_code="200"}': 1.0,
    }
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_backend_requests_total")
    assert series(out) == backend_series
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_backend_requests_total | grep backend_service")
    assert series(out) == backend_series

    # "Check circuit breaker state": payments opened (1) after 3 refusals, the others closed (0).
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_circuit_breaker_state")
    assert {k: v for k, v in series(out).items()} == {
        'gateway_circuit_breaker_state{backend_service="users"}': 0.0,
        'gateway_circuit_breaker_state{backend_service="orders"}': 0.0,
        'gateway_circuit_breaker_state{backend_service="payments"}': 1.0,
        'gateway_circuit_breaker_state{backend_service="accounts"}': 0.0,
        'gateway_circuit_breaker_state{backend_service="reports"}': 0.0,
    }

    # "Check which backends are failing" (kubectl logs -> the log file): (backend, status) pairs with
    # counts. Only requests that reached a backend (or its breaker) name one: not the 404, nor the 401
    # and the 429, refused before; the breaker's own "opened" line names one and has no status (null).
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway | grep backend_service | "
                   "jq -r '.backend_service, .status_code' | paste - - | sort | uniq -c | sort -rn")
    assert counted(out) == {"users\t200": 4, "payments\t502": 3, "orders\t503": 2, "payments\t503": 1,
                            "payments\tnull": 1, "reports\t200": 1}

    # "Group errors by backend" (kubectl logs --tail=500 -> tail -n 500): lines saying "error" are the
    # gateway-made failures (their error_type) and the breaker's warning.
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway --tail=500 | "
                   "grep -i error | jq -r '.backend_service' | sort | uniq -c | sort -rn")
    assert counted(out) == {"payments": 4, "null": 3}  # null: the 404, the 401 and the 429

    # "Check recent logs for errors" (kubectl logs --tail=100 -> tail -n 100): the failed requests.
    out = site.run("kubectl logs -l app=api-gateway --tail=100 -n api-gateway | grep -i error")
    error_types = [line.get("error_type") for line in map(json.loads, out.splitlines())]
    assert sorted(filter(None, error_types)) == sorted(
        ["backend_unreachable"] * 3 + ["circuit_open", "no_route", "missing_token", "limit_exceeded"])

    # "Check auth error types": `auth.*error` selects auth failures only (error_type comes before msg,
    # and only an auth failure's msg says auth_error=...): the 401, though other requests failed.
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway | "
                   """grep -i "auth.*error" | jq -r '.error_type' | sort | uniq -c""")
    assert counted(out) == {"missing_token": 1}

    # "Watch error rate decrease" (kubectl logs -f -> the log file, not followed): the 5xx lines.
    out = site.run('kubectl logs -f -l app=api-gateway -n api-gateway | grep "status_code=5"')
    assert sorted(line["status_code"] for line in map(json.loads, out.splitlines())) == [502] * 3 + [503] * 3

    # High Latency, "Compare gateway overhead vs backend time" (--tail=100 -> tail -n 100): both
    # durations of every request; no backend time where no backend was tried (breaker open, no route).
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway --tail=100 | "
                   "grep duration | jq '.duration_ms, .backend_duration_ms'")
    values = out.split()
    pairs = list(zip(values[0::2], values[1::2]))
    assert len(pairs) == 14
    assert all(float(total) > 0 for total, _ in pairs)
    assert [backend == "null" for _, backend in pairs] == [False] * 9 + [True] * 3 + [False, True]
    assert all(float(total) >= float(backend) for total, backend in pairs if backend != "null")

    # "Check latency metrics", "Check backend latency", "... by service": histograms by route / backend.
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_http_request_duration_seconds")
    assert series(out)['gateway_http_request_duration_seconds_count{route="users"}'] == 4.0
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_backend_duration_seconds")
    assert series(out)['gateway_backend_duration_seconds_count{backend_service="orders"}'] == 2.0
    out = site.run("curl -s http://localhost:9090/metrics | "
                   "grep gateway_backend_duration_seconds_bucket | grep backend_service")
    assert series(out)['gateway_backend_duration_seconds_bucket{backend_service="users",le="+Inf"}'] == 4.0
    assert all("_bucket{" in name for name in series(out))
    # "Monitor latency improvement" (`watch -n 5 '...'` -> run once): one _sum per route.
    out = site.run("watch -n 5 'curl -s http://localhost:9090/metrics | grep gateway_http_request_duration_seconds_sum'")
    assert {name.split('"')[1] for name in series(out)} == {"users", "orders", "payments", "-", "secure", "limited"}


def test_auth_failure_commands(tmp_path: Path, bin_dir: Path, echo: BackendProcess, redis_server, sites) -> None:
    """High Authorization Failure Rate: failures grouped by the error types provoked, and the metric."""
    key, stranger = SigningKey("ec", kid="k1"), SigningKey("ec", kid="k1")
    pem = key.write_public_pem(tmp_path / "jwt-public-key.pem")
    site = start(tmp_path, {
        "redis": {"url": redis_server.url},
        "auth": {"keys": [{"file": str(pem), "kid": "k1"}]},
        "routes": [route("accounts", echo.url, auth={"required": True, "scopes": ["read"]})],
    }, bin_dir, redis_server)
    sites.append(site)

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    revoked = key.token(scope="read", jti="stolen-1")
    redis.Redis(port=redis_server.port).set("revoked:stolen-1", 1)
    provoked = {
        "missing_token": [None] * 3,
        "expired": [key.token(scope="read", ttl=-600)] * 2,
        "bad_signature": [stranger.token(scope="read")],
        "insufficient_scope": [key.token(scope="write")],
        "revoked": [revoked],
    }
    for tokens in provoked.values():
        for token in tokens:
            assert site.get("/a", bearer(token) if token else None) in (401, 403)
    assert site.get("/a", bearer(key.token(scope="read"))) == 200
    assert site.get("/a", bearer(key.token(scope="read"))) == 200

    # "Group by error type" (kubectl logs --tail=1000 -> tail -n 1000): exactly the causes provoked.
    expected = {error_type: len(tokens) for error_type, tokens in provoked.items()}
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway --tail=1000 | "
                   "grep auth_status=failure | jq -r '.error_type' | sort | uniq -c | sort -rn")
    assert counted(out) == expected
    # "Check auth error types" (kubectl logs -> the log file): the same here, where auth is the only failure.
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway | "
                   """grep -i "auth.*error" | jq -r '.error_type' | sort | uniq -c""")
    assert counted(out) == expected

    # "Check auth metrics": result and error_type labels.
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_auth_attempts_total")
    nonzero = {name: value for name, value in series(out).items() if value}
    assert nonzero == {
        'gateway_auth_attempts_total{error_type="none",result="success"}': 2.0,
        **{f'gateway_auth_attempts_total{{error_type="{error_type}",result="failure"}}': float(count)
           for error_type, count in expected.items()},
    }

    # "Monitor auth success rate" (kubectl logs -f -> the log file): every checked request, either way.
    out = site.run("kubectl logs -f -l app=api-gateway -n api-gateway | grep auth_status")
    assert sorted(line["auth_status"] for line in map(json.loads, out.splitlines())) == (
        ["failure"] * sum(expected.values()) + ["success"] * 2)
    assert "stolen-1" not in site.gateway.log_text() and revoked not in site.gateway.log_text()


def test_rate_limiter_and_redis_commands(tmp_path: Path, bin_dir: Path, echo: BackendProcess, redis_server, sites) -> None:
    """Rate Limiter Issues and Redis Connectivity Issues: the 200/429 mix, clearing the keys, errors on
    a stopped Redis in fail_open, slow round trips on a paused one."""
    site = start(tmp_path, {
        "redis": {"url": redis_server.url, "timeout": "3s"},
        "ratelimit": {"failure_mode": "fail_open"},
        "policies": [{"name": "standard", "requests": 40, "period": "1h"}],
        "routes": [route("test", echo.url, match={"path_prefix": "/api/v1/test"}, ratelimit="standard")],
    }, bin_dir, redis_server)
    sites.append(site)

    # Redis Connectivity, "Test rate limiting": ten answers from the backend.
    out = site.run("for i in {1..10}; do curl http://localhost:8080/api/v1/test; done")
    assert out.count('"server": "echo"') == 10

    # Rate Limiter, "Verify Resolution": the 100 curls show a mix of 200 and 429 (30 left of 40).
    loop = ('for i in {1..100}; do curl -w "%{http_code}\\n" http://localhost:8080/api/v1/test -o /dev/null -s; '
            "done | sort | uniq -c")
    assert counted(site.run(loop)) == {"200": 30, "429": 70}

    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_ratelimit")
    found = series(out)
    assert found['gateway_ratelimit_requests_total{decision="allowed",policy="standard"}'] == 40.0
    assert found['gateway_ratelimit_requests_total{decision="limited",policy="standard"}'] == 70.0
    assert found["gateway_ratelimit_errors_total"] == 0.0
    assert found["gateway_ratelimit_duration_seconds_count"] == 110.0

    # "Check Redis keys" (kubectl exec <redis-pod> -> the test's redis-cli): the one client's bucket.
    out = site.run('kubectl exec -it <redis-pod> -n api-gateway -- redis-cli KEYS "ratelimit:*" | head -10')
    assert out.split() == ["ratelimit:standard:ip:127.0.0.1"]
    out = site.run("kubectl exec -it <redis-pod> -n api-gateway -- redis-cli INFO stats")
    assert "total_commands_processed:" in out

    # "Clear Corrupted State": deletes every limit key, so the full budget is back.
    out = site.run('kubectl exec -it <redis-pod> -n api-gateway -- redis-cli --scan --pattern "ratelimit:*" | '
                   "xargs redis-cli DEL")
    assert out.strip() == "1"
    assert redis.Redis(port=redis_server.port).keys("ratelimit:*") == []
    assert counted(site.run(loop)) == {"200": 40, "429": 60}

    # High Latency, "Check rate limiter latency" (kubectl logs -> the log file): a decision held up by a
    # paused Redis (shorter than redis.timeout) is logged as slow, with its duration.
    assert site.run('kubectl logs -l app=api-gateway -n api-gateway | grep -i "rate.*duration"', 1) == ""
    redis_server.pause()
    threading.Timer(0.3, redis_server.resume).start()
    assert site.get("/api/v1/test") == 429
    out = site.run('kubectl logs -l app=api-gateway -n api-gateway | grep -i "rate.*duration"')
    slow = [json.loads(line) for line in out.splitlines()]
    assert [line["msg"].split(":")[0] for line in slow] == ["ratelimit slow Redis round trip"]
    assert isinstance(slow[0]["duration_ms"], float)

    # Redis down with fail_open: requests pass, "Check rate limiter errors" finds the error (the first of
    # its kind at once, the repeats counted on one line per 10 s), and the metrics count every one.
    assert site.run('kubectl logs -l app=api-gateway -n api-gateway | grep -i "ratelimit.*error"', 1) == ""
    redis_server.stop()
    assert [site.get("/api/v1/test") for _ in range(3)] == [200] * 3
    out = site.run('kubectl logs -l app=api-gateway -n api-gateway | grep -i "ratelimit.*error"')
    errors = [json.loads(line) for line in out.splitlines()]
    assert len(errors) == 1 and "repeated" not in errors[0]
    assert all(line["logger"] == "apigw.ratelimit" and line["failure_mode"] == "fail_open" for line in errors)
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_redis_errors_total")
    assert series(out) == {'gateway_redis_errors_total{operation="ratelimit"}': 3.0,
                           'gateway_redis_errors_total{operation="revocation"}': 0.0}
    assert series(site.run("curl -s http://localhost:9090/metrics | grep gateway_ratelimit"))[
        "gateway_ratelimit_errors_total"] == 3.0
    # Redis being down keeps the pod ready (its state is in the body).
    assert site.get("/_health/ready") == 200


def test_health_validate_and_resource_commands(tmp_path: Path, bin_dir: Path, echo: BackendProcess, sites) -> None:
    """Service Down and High CPU/Memory: health paths, metrics, `-validate-config`, the config greps."""
    site = start(tmp_path, {"routes": [route("users", echo.url)]}, bin_dir)
    sites.append(site)
    assert site.get("/x") == 200

    # "Test health endpoints" (kubectl port-forward svc/api-gateway 8080:80 -> the gateway's port).
    assert site.run("curl http://localhost:8080/_health/live") != ""
    ready = yaml.safe_load(site.run("curl http://localhost:8080/_health/ready"))
    assert ready["config_hash"] == site.gateway.ready()["config_hash"]
    assert "gateway_http_requests_total" in site.run("curl http://localhost:9090/metrics")

    # "Check goroutine count": no go_goroutines series here (a Python process); the grep finds the help
    # line of its counterpart, gateway_asyncio_tasks (see README's Runbook section).
    out = site.run("curl -s http://localhost:9090/metrics | grep go_goroutines")
    assert out.splitlines() == ["# HELP gateway_asyncio_tasks asyncio tasks alive (the runbook's go_goroutines)"]
    assert series(site.gateway.metrics())["gateway_asyncio_tasks"] > 0

    # "Quick health check" (the kubectl parts dropped): `up` is Prometheus's own series, not exported by
    # the gateway, so here the grep selects the request counters (and lines that merely contain "up").
    out = site.run('curl -s http://localhost:9090/metrics | grep -E "up|gateway_http_requests_total"')
    assert 'gateway_http_requests_total{method="GET",route="users",status_code="200"} 1.0' in out
    assert not re.search(r"^up[ {]", out, re.MULTILINE)

    # Rate Limiter, "Validate rate limit config" (kubectl exec <gateway-pod> -> `gateway` on PATH, with
    # GATEWAY_CONFIG as in the image): a summary and exit 0 ...
    validate = "kubectl exec -it <gateway-pod> -n api-gateway -- /app/gateway -validate-config"
    assert ": OK: 1 routes (1 enabled)" in site.run(validate)
    # ... then a broken edit: every error with its location, exit 1. The running gateway rejects the
    # same edit and keeps its config; "Configuration Error" (kubectl logs <pod> -> the log file) finds it.
    config = site.gateway.config / "config.yaml"
    config.write_text(re.sub(r"^  port: .*$", "  port: banana", config.read_text(), flags=re.MULTILINE))
    done = site.execute(validate)
    assert done.returncode == 1
    assert re.search(r"config.yaml:\d+: listen.port: Input should be a valid integer", done.stderr), done.stderr
    site.gateway.signal(signal.SIGHUP)
    wait_until(lambda: "rejected" in site.gateway.log_text(), what="reload rejected")
    out = site.run('kubectl logs <pod> -n api-gateway | grep -i "error\\|fatal"')
    assert "listen.port" in out and "rejected" in out
    assert site.get("/x") == 200

    # Redis Connectivity "Check pool configuration" and Rate Limiter "Rate Limit Configuration Error"
    # (kubectl get configmap -> the ConfigMap manifest): the settings the runbook looks for are there.
    out = site.run("kubectl get configmap api-gateway-config -n api-gateway -o yaml | grep -A5 pool_size")
    assert out.splitlines()[0].split() == ["pool_size:", "50"]
    out = site.run("kubectl get configmap api-gateway-config -n api-gateway -o yaml | grep -A20 ratelimit")
    assert "failure_mode: fail_open" in out and "enabled: true" in out


def test_hostile_requests_do_not_forge_what_the_log_greps_select(
    tmp_path: Path, bin_dir: Path, echo: BackendProcess, sites
) -> None:
    """Paths, request ids and methods that spell what the runbook greps for, and a request aiohttp's
    parser refuses: each grep still selects exactly the real 5xx, the real auth failure, the real errors."""
    key = SigningKey("ec", kid="k1")
    pem = key.write_public_pem(tmp_path / "jwt-public-key.pem")
    site = start(tmp_path, {
        "listen": {"trust_client_request_id": True},  # so that the forged id reaches the log
        "auth": {"keys": [{"file": str(pem), "kid": "k1"}]},
        "routes": [route("open", echo.url, match={"path_prefix": "/open"}, rewrite_prefix="/"),
                   route("secure", echo.url, match={"path_prefix": "/secure"}, auth={"required": True})],
    }, bin_dir)
    sites.append(site)
    forged_id = {"X-Request-ID": "status_code=503 auth_status=failure auth_error=expired ERROR"}
    hostile = ["/open/status_code=503", "/open/auth_status=failure/error", "/open/x?status_code=500",
               "/open/ratelimit/error", "/open/generate/duration", "/open/room", "/open/Auth/Error/fatal"]
    assert [site.get(path, forged_id) for path in hostile] == [200] * len(hostile)
    assert site.get("/nowhere/backend_service") == 404
    assert site.get("/open/status/503") == 503  # the one real 5xx
    assert site.get("/secure/status_code=5/error") == 401  # the one real auth failure (missing_token)
    token = key.token()
    refused = exchange(site.gateway.port, f"GET /open HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}".encode()
                           + b"\x01\r\n\r\n")
    assert refused.startswith(b"HTTP/1.0 400 ") and b'"request_id"' in refused

    out = site.run('kubectl logs -l app=api-gateway -n api-gateway | grep "status_code=5" | '
                   "jq -r '.path' | sort | uniq -c | sort -rn")
    assert counted(out) == {"/open/status/503": 1}
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway --tail=1000 | "
                   "grep auth_status=failure | jq -r '.error_type' | sort | uniq -c | sort -rn")
    assert counted(out) == {"missing_token": 1}
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway | "
                   """grep -i "auth.*error" | jq -r '.error_type' | sort | uniq -c""")
    assert counted(out) == {"missing_token": 1}
    out = site.run("kubectl logs -l app=api-gateway --tail=100 -n api-gateway | grep -i error")
    assert sorted(json.loads(line)["error_type"] for line in out.splitlines()) == [
        "bad_request", "missing_token", "no_route"]
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway --tail=500 | "
                   "grep -i error | jq -r '.backend_service' | sort | uniq -c | sort -rn")
    assert counted(out) == {"null": 3}  # the 401 never reached a backend: none is blamed
    assert site.run('kubectl logs -l app=api-gateway -n api-gateway | grep -i "ratelimit.*error"', 1) == ""
    assert site.run('kubectl logs -l app=api-gateway -n api-gateway | grep -i "rate.*duration"', 1) == ""
    assert site.run('kubectl logs <pod> -n api-gateway | grep -i "out of memory\\|oom"', 1) == ""
    out = site.run("kubectl logs -l app=api-gateway -n api-gateway | grep backend_service | "
                   "jq -r '.backend_service, .status_code' | paste - - | sort | uniq -c | sort -rn")
    assert counted(out) == {"open\t200": len(hostile), "open\t503": 1}

    # jq reads every forged value back exactly as sent.
    lines = [line for line in site.gateway.log_lines() if line["logger"] == "apigw.access"]
    assert [line["path"] for line in lines[:len(hostile)]] == [path.partition("?")[0] for path in hostile]
    assert {line["request_id"] for line in lines[:len(hostile)]} == {forged_id["X-Request-ID"]}
    # The refusal: one line and one count under route "-", and the token nowhere in the process's output.
    assert lines[-1]["route"] == "-" and lines[-1]["status_code"] == 400 and lines[-1]["error_type"] == "bad_request"
    out = site.run("curl -s http://localhost:9090/metrics | grep gateway_http_requests_total | grep status_code")
    assert series(out)['gateway_http_requests_total{method="OTHER",route="-",status_code="400"}'] == 1.0
    assert token not in site.gateway.log_text() and token.split(".")[1] not in site.gateway.log_text()
