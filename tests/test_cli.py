"""The `gateway` command as users run it: real processes, real signals, real files."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from apigw.testkit import loopback_allowed
from apigw.testkit.certs import write_self_signed
from apigw.testkit.process import (
    BackendProcess,
    GatewayProcess,
    http_status,
    ports,
    wait_until,
)

ROOT = Path(__file__).parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apigw", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", ["-validate-config", "--validate-config"])
def test_validate_config_ok(flag: str) -> None:
    result = run_cli(flag, "--config", str(ROOT / "examples" / "configmap"))
    assert result.returncode == 0, result.stderr
    assert "OK: 2 routes (2 enabled), 1 rate limit policies, config_hash " in result.stdout


def test_validate_config_reports_every_error_with_location(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("listen:\n  port: banana\n")
    (tmp_path / "routes.yaml").write_text("routes:\n  - name: a\n    backend: {service: a, url: 'nope'}\n    ratelimit: x\n")
    result = run_cli("-validate-config", "--config", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{tmp_path}/config.yaml:2: listen.port: Input should be a valid integer" in result.stderr
    assert f"{tmp_path}/routes.yaml:3: routes[0].backend.url: Input should be a valid URL" in result.stderr
    assert "2 error(s)" in result.stderr


def test_validate_config_prints_the_readme_example(tmp_path: Path) -> None:
    """The README's example, byte for byte: a type error and an undefined policy, in one run."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```\n\$ (gateway -validate-config --config (/etc/gateway/))\n(.*?)```", readme, re.DOTALL)
    assert block, "README example of -validate-config not found"
    command, shown_dir, shown_output = block.groups()
    config_dir = tmp_path / "etc" / "gateway"
    shutil.copytree(ROOT / "tests" / "configs" / "readme_example", config_dir)
    args = command.split()[1:]
    args[args.index(shown_dir)] = f"{config_dir}/"
    result = run_cli(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.replace(str(tmp_path), "") == shown_output


def test_validate_config_reports_key_files_with_config_errors(tmp_path: Path) -> None:
    """A missing key file, a bad setting and an undefined policy: all three, located, in one run."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "listen: {port: banana}\n"
        "auth:\n  keys:\n    - file: /nonexistent/jwt-public-key.pem\n"
        "routes:\n  - name: a\n    backend: {service: a, url: 'http://a'}\n    ratelimit: gold\n"
    )
    result = run_cli("-validate-config", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{config}: 3 error(s)",
        f"  {config}:1: listen.port: Input should be a valid integer, unable to parse string as an integer (got 'banana')",
        f"  {config}:4: auth.keys[0].file: cannot read /nonexistent/jwt-public-key.pem: No such file or directory",
        f"  {config}:8: routes[0].ratelimit: policy 'gold' is not defined (defined: none)",
    ]


def test_validate_config_reports_certificate_files_with_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "listen:\n  tls: {cert_file: /nonexistent/tls.crt, key_file: /nonexistent/tls.key}\n"
        "routes: [{name: a}]\n"
    )
    result = run_cli("-validate-config", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines()[1:] == [
        f"  {config}:2: listen.tls.cert_file: cannot read /nonexistent/tls.crt: No such file or directory",
        f"  {config}:3: routes[0].backend: required setting is missing",
    ]


def test_validate_config_reads_the_backends_tls_files_as_start_up_does(tmp_path: Path) -> None:
    """A backend TLS file the gateway cannot use makes start-up and every reload refuse the config: the
    check says so too, for each such backend, at its line, instead of OK."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "routes:\n"
        "  - name: a\n    match: {path_prefix: /a}\n"
        "    backend: {service: a, url: 'https://a', tls: {ca_file: /nonexistent/a-ca.pem}}\n"
        "  - name: b\n    match: {path_prefix: /b}\n    backend: {service: b, url: 'http://b'}\n"
        "  - name: c\n    match: {path_prefix: /c}\n"
        "    backend: {service: c, url: 'https://c', tls: {ca_file: /nonexistent/c-ca.pem}}\n"
    )
    result = run_cli("-validate-config", "--config", str(config))
    assert result.returncode == 1, result.stdout
    errors = result.stderr.splitlines()
    assert errors[0] == f"{config}: 2 error(s)", errors
    assert errors[1].startswith(f"  {config}:4: routes[0].backend.tls: cannot use the TLS files: "), errors
    assert "/nonexistent/a-ca.pem" in errors[1], errors
    assert errors[2].startswith(f"  {config}:10: routes[2].backend.tls: cannot use the TLS files: "), errors


def test_validate_config_passes_an_expired_listener_certificate_but_says_so(tmp_path: Path) -> None:
    """The gateway serves an expired certificate until a renewal comes, so the config is valid; but every
    verifying client now fails its handshake, and a bare OK would hide that."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    config = tmp_path / "gateway.yaml"
    config.write_text(f"listen:\n  tls: {{cert_file: {cert}, key_file: {key}}}\nroutes: []\n")
    write_self_signed(cert, key, days=30)
    valid = run_cli("-validate-config", "--config", str(config))
    assert (valid.returncode, valid.stderr) == (0, "")
    expired = write_self_signed(cert, key, days=-2)
    result = run_cli("-validate-config", "--config", str(config))
    assert result.returncode == 0 and result.stdout.startswith(f"{config}: OK: 0 routes")
    assert result.stderr == (f"warning: listen.tls.cert_file: the certificate {cert} expired at "
                             f"{expired.not_valid_after_utc.isoformat()}; verifying clients refuse it\n")


def test_validate_config_uses_env_default(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("routes: []\n")
    env = {"GATEWAY_CONFIG": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "apigw", "-validate-config"], capture_output=True, text=True,
                            env={**__import__("os").environ, **env}, timeout=60)
    assert result.returncode == 0
    assert str(tmp_path) in result.stdout


@pytest.mark.parametrize(
    "text, errors",
    [
        ("routes: [{name: a}]\n", ["1: routes[0].backend: required setting is missing"]),
        ("logging: {level: LOUD}\nauth:\n  keys: [{file: /nonexistent/key.pem}]\n", [
            "1: logging.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR' (got 'LOUD')",
            "3: auth.keys[0].file: cannot read /nonexistent/key.pem: No such file or directory",
        ]),
    ],
    ids=["config", "config-and-key-file"],
)
def test_start_with_invalid_config_exits_1_with_every_error_in_json(tmp_path: Path, text: str, errors: list[str]) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    result = run_cli("--config", str(config))
    assert result.returncode == 1
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["level"] == "error"
    assert line["errors"] == [f"{config}:{error}" for error in errors]


def _write(path: Path, port: int, metrics_port: int, backend_url: str, **listen: object) -> None:
    path.write_text(yaml.safe_dump({
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port, **listen},
        "routes": [{"name": "echo", "backend": {"service": "echo", "url": backend_url, "timeout": "10s"}}],
    }))


@pytest.fixture
def backend_process() -> Iterator[str]:
    with BackendProcess() as backend:
        yield backend.url


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path, backend_process: str) -> None:
    port, metrics_port = ports()
    _write(tmp_path / "gw.yaml", port, metrics_port, backend_process, drain_delay="1s", drain_timeout="10s")
    gateway = GatewayProcess(tmp_path / "gw.yaml", port, metrics_port)
    gateway.start()
    results: dict[str, object] = {}

    def slow_request() -> None:
        with urllib.request.urlopen(f"{gateway.url}/slow?s=1.5", timeout=20) as response:
            results["status"] = response.status
            results["body"] = json.loads(response.read())

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)
    gateway.signal(signal.SIGTERM)
    wait_until(lambda: http_status(f"{gateway.url}/_health/ready") == 503, what="not-ready while draining")
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        gateway.ready()
    assert not_ready.value.code == 503
    assert json.loads(not_ready.value.read())["status"] == "draining"
    not_ready.value.close()
    thread.join(20)
    assert results["status"] == 200 and results["body"]["slept"] == 1.5
    assert gateway.process is not None
    assert gateway.process.wait(20) == 0
    gateway.stop()
    assert "stopped" in gateway.log_text()
    drained = [line for line in gateway.log_lines() if line.get("logger") == "apigw.access"]
    assert [(line["path"], line["status_code"]) for line in drained] == [("/slow", 200)]  # written before the exit


def test_sigterm_cuts_a_request_still_running_at_the_end_of_drain_timeout(tmp_path: Path, backend_process: str) -> None:
    """The drain is bounded by `drain_timeout`, as the Deployment's grace period counts on: a request the
    backend answers well after it (here 2.7 s after, and before twice the timeout) is cut, and the gateway
    still writes its access line (499) and exits 0 before that answer would have come."""
    port, metrics_port = ports()
    _write(tmp_path / "gw.yaml", port, metrics_port, backend_process, drain_timeout="4s")
    gateway = GatewayProcess(tmp_path / "gw.yaml", port, metrics_port)
    gateway.start()
    results: dict[str, object] = {}

    def slow_request() -> None:
        try:
            with urllib.request.urlopen(f"{gateway.url}/slow?s=7", timeout=20) as response:
                results["status"] = response.status
        except (OSError, http.client.HTTPException) as exc:
            results["error"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(lambda: "gateway_inflight_requests 1.0" in gateway.metrics(), what="the request in flight")
    gateway.signal(signal.SIGTERM)
    assert gateway.process is not None
    assert gateway.process.wait(20) == 0
    thread.join(20)
    gateway.stop()
    assert "status" not in results, "the request outlived drain_timeout and was answered"
    drained = [line for line in gateway.log_lines() if line.get("logger") == "apigw.access"]
    assert [(line["path"], line["status_code"], line["error_type"]) for line in drained] == [
        ("/slow", 499, "drain_timeout")]  # the gateway cut it: the client did not leave


def test_sighup_reloads_and_bad_config_keeps_the_old_one(tmp_path: Path, backend_process: str) -> None:
    port, metrics_port = ports()
    path = tmp_path / "gw.yaml"
    _write(path, port, metrics_port, backend_process)
    with GatewayProcess(path, port, metrics_port) as gateway:
        first = gateway.ready()["config_hash"]
        config = yaml.safe_load(path.read_text())
        config["routes"][0]["match"] = {"path_prefix": "/only"}
        path.write_text(yaml.safe_dump(config))
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: gateway.ready()["config_hash"] != first)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{gateway.url}/elsewhere", timeout=5)
        assert missing.value.code == 404
        missing.value.close()
        second = gateway.ready()["config_hash"]

        path.write_text("routes: [{name: broken}]\n")
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: gateway.details()["last_reload_error"] is not None)
        details = gateway.details()
        assert details["config_hash"] == second
        assert "routes[0].backend: required setting is missing" in details["last_reload_error"]
        assert gateway.ready() == {"status": "ready", "config_hash": second}
        with urllib.request.urlopen(f"{gateway.url}/only/x", timeout=5) as response:
            assert response.status == 200
        metrics = gateway.metrics()
        assert 'gateway_config_reloads_total{result="success"} 1.0' in metrics
        assert 'gateway_config_reloads_total{result="failure"} 1.0' in metrics
        errors = [line for line in gateway.log_lines() if line["msg"].startswith("config reload (SIGHUP) rejected")]
        assert errors and errors[0]["level"] == "error"


def test_configmap_symlink_swap_is_picked_up_without_signal(tmp_path: Path, backend_process: str) -> None:
    """Kubernetes updates a ConfigMap volume by re-pointing the `..data` symlink; files are links into it."""
    port, metrics_port = ports()
    volume = tmp_path / "volume"
    volume.mkdir()

    def publish(version: str, prefix: str) -> None:
        data = volume / f"..{version}"
        data.mkdir()
        config = {"listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
                  "ownership": loopback_allowed()}
        (data / "config.yaml").write_text(yaml.safe_dump(config))
        routes = {"routes": [{"name": "echo", "match": {"path_prefix": prefix},
                              "backend": {"service": "echo", "url": backend_process}}]}
        (data / "routes.yaml").write_text(yaml.safe_dump(routes))
        tmp_link = volume / "..data_tmp"
        tmp_link.symlink_to(data.name)
        tmp_link.rename(volume / "..data")

    publish("v1", "/one")
    for name in ("config.yaml", "routes.yaml"):
        (volume / name).symlink_to(f"..data/{name}")
    with GatewayProcess(volume, port, metrics_port) as gateway:
        first = gateway.ready()["config_hash"]
        publish("v2", "/two")
        wait_until(lambda: gateway.ready()["config_hash"] != first)
        with urllib.request.urlopen(f"{gateway.url}/two", timeout=5) as response:
            assert response.status == 200


@pytest.mark.parametrize("command", [[], ["demo"]])
def test_help_lists_the_subcommands_and_describes_every_flag(command: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "apigw", *command, "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: gateway")
    options = re.findall(r"^  (-[-\w]+(?:, -[-\w]+)*)(?: [A-Z]+)?(?:\s{2,}(\S.*))?$", out.stdout, re.MULTILINE)
    assert len(options) >= 4
    undescribed = [flag for flag, text in options if not text and not _described_below(out.stdout, flag)]
    assert undescribed == []
    if not command:
        assert re.search(r"^commands:\n  demo +run the gateway", out.stdout, re.MULTILINE)


def _described_below(help_text: str, flag: str) -> bool:
    """argparse puts a long flag's description on the next line, indented."""
    lines = help_text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag}"))
    return lines[index + 1].startswith(" " * 10) and bool(lines[index + 1].strip())


def test_demo_serves_and_prints_what_to_try(tmp_path: Path) -> None:
    port, metrics_port = ports()
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "demo.out", "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "apigw", "demo", "--port", str(port), "--metrics-port", str(metrics_port)],
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    try:
        wait_until(lambda: http_status(f"{base}/_health/ready") == 200, timeout=20)
        output = (tmp_path / "demo.out").read_text()
        assert f"curl -i {base}/api/v1/hello" in output
        config_file = Path(re.search(r"config: (\S+)", output).group(1))
        assert "&id" not in config_file.read_text() and "*id" not in config_file.read_text()  # no YAML anchors
        token = re.search(r"TOKEN=(\S+)", output).group(1)
        with urllib.request.urlopen(f"{base}/api/v1/hello", timeout=5) as response:
            assert json.loads(response.read())["path"] == "/hello"
        assert [http_status(f"{base}/api/v1/hello") for _ in range(5)].count(429) >= 1
        assert http_status(f"{base}/secure/data") == 401
        request = urllib.request.Request(f"{base}/secure/data", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read())["headers"]["X-User-Id"] == "demo-user"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert b"gateway_http_requests_total" in response.read()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert process.returncode == 0
    assert "Traceback" not in (tmp_path / "demo.out").read_text()


def test_debug_listener_serves_tasks_and_a_profile(tmp_path: Path, backend_process: str) -> None:
    from apigw.testkit.redis import free_port

    port, metrics_port = ports()
    debug_port = free_port()
    _write(tmp_path / "gw.yaml", port, metrics_port, backend_process)
    gateway = GatewayProcess(tmp_path / "gw.yaml", port, metrics_port)
    gateway.args = ["--debug-port", str(debug_port)]
    with gateway:
        with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/debug/tasks", timeout=5) as response:
            text = response.read().decode()
        assert "asyncio tasks" in text and "watch" in text  # the reload watcher is one of them
        with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/debug/profile?seconds=0.5", timeout=10) as response:
            assert "by own time" in response.read().decode()
        assert http_status(f"http://127.0.0.1:{debug_port}/debug/profile?seconds=999") == 400


def test_stream_begun_before_a_reload_that_removes_its_backend_completes(tmp_path: Path, backend_process: str) -> None:
    """Its pool is retired only when no request that began on the old config is left, not after a fixed time."""
    port, metrics_port = ports()
    path = tmp_path / "gw.yaml"
    _write(path, port, metrics_port, backend_process, drain_timeout="200ms")
    with GatewayProcess(path, port, metrics_port) as gateway:
        first = gateway.ready()["config_hash"]
        total = 0
        with urllib.request.urlopen(f"{gateway.url}/bytes/30000000", timeout=30) as response:
            total += len(response.read(1 << 20))
            config = yaml.safe_load(path.read_text())
            config["routes"][0]["backend"]["service"] = "renamed"  # a new pool; the old one is retired
            path.write_text(yaml.safe_dump(config))
            gateway.signal(signal.SIGHUP)
            wait_until(lambda: gateway.ready()["config_hash"] != first)
            time.sleep(0.5)  # well past drain_timeout: a fixed-delay close would have cut the stream by now
            while chunk := response.read(1 << 20):
                total += len(chunk)
        assert total == 30_000_000


def test_logging_level_applies(tmp_path: Path, backend_process: str) -> None:
    port, metrics_port = ports()
    path = tmp_path / "gw.yaml"
    _write(path, port, metrics_port, backend_process)
    config = yaml.safe_load(path.read_text())
    config["logging"] = {"level": "WARNING"}
    path.write_text(yaml.safe_dump(config))
    with GatewayProcess(path, port, metrics_port) as gateway:
        assert http_status(f"{gateway.url}/x") == 200
        assert http_status(f"{gateway.url}/status/502") == 502
    lines = gateway.log_lines()
    assert not [line for line in lines if line["logger"] != "apigw.access" and line["level"] == "info"]
    assert [line["status_code"] for line in lines if line["logger"] == "apigw.access"] == [200, 502]
