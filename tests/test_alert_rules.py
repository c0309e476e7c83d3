"""The PrometheusRule against RUNBOOK.md, and `promtool check rules` / `promtool test rules` on it.

The rule groups are the PrometheusRule's `spec`; they are written to a plain rules file
(`api-gateway.rules.yaml`) next to copies of `tests/rules/*.test.yaml`, which name that file.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from apigw.testkit import route
from apigw.testkit.process import BackendProcess, GatewayProcess, http_status, ports, wait_until
from apigw.testkit.raw import exchange
from apigw.testkit.redis import free_port

ROOT = Path(__file__).resolve().parent.parent
RULE_FILE = ROOT / "manifests" / "monitoring" / "prometheusrule.yaml"
UNIT_TESTS = sorted((ROOT / "tests" / "rules").glob("*.test.yaml"))
RUNBOOK = ROOT / "RUNBOOK.md"
RUNBOOK_URL = "https://github.com/example-org/apigw/blob/main/RUNBOOK.md#"
EXTRACTED = "api-gateway.rules.yaml"

# The runbook has a section on certificate expiry but names no alert for it: this is ours.
EXTRA_ALERTS = {"APIGatewayCertificateExpiringSoon": ("certificate-expiration", "warning", 3600.0)}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; .ci/run installs it)"
)


def rules() -> dict[str, dict]:
    spec = yaml.safe_load(RULE_FILE.read_text())["spec"]
    return {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"]}


def seconds(duration: str) -> float:
    """A Prometheus duration (`5m`, `1h`, `90s`) in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unexpected duration {duration!r}"
    return float(sum(int(n) * units[u] for n, u in parts))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: `High CPU/Memory Usage` -> `high-cpumemory-usage`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_alerts() -> dict[str, tuple[str, str, float]]:
    """Alert name -> (section anchor, severity, duration in seconds), read from RUNBOOK.md."""
    found = {}
    for section in re.split(r"^## ", RUNBOOK.read_text(), flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        names = re.search(r"^### Alert: (.+)$", body, re.M)
        if not names:
            continue
        alerts = [name.strip() for name in names.group(1).split("/")]
        severities = [s.strip().lower() for s in re.search(r"\*\*Severity:\*\* (.+)", body).group(1).split("/")]
        durations = {
            (severity or "").lower(): int(minutes) * 60.0
            for minutes, severity in re.findall(r"(\d+) minutes(?: \((\w+)\))?", re.search(r"\*\*Duration:\*\* (.+)", body).group(1))
        }
        for i, alert in enumerate(alerts):
            severity = severities[i] if len(severities) > 1 else severities[0]
            duration = durations[severity] if len(durations) > 1 else next(iter(durations.values()))
            found[alert] = (github_anchor(heading), severity, duration)
    return found


def test_runbook_is_read_whole() -> None:
    """Guards the parser above: the eleven alerts the runbook names are all found."""
    assert len(runbook_alerts()) == 11
    assert runbook_alerts()["APIGatewayVeryHighLatency"] == ("high-latency", "critical", 300.0)
    assert runbook_alerts()["APIGatewayHighMemory"] == ("high-cpumemory-usage", "warning", 600.0)


def test_every_runbook_alert_has_a_rule_with_its_severity_and_duration() -> None:
    expected = runbook_alerts() | EXTRA_ALERTS
    actual = rules()
    assert sorted(actual) == sorted(expected)
    for alert, (anchor, severity, duration) in expected.items():
        rule = actual[alert]
        assert rule["labels"]["severity"] == severity, alert
        assert seconds(rule["for"]) == duration, alert
        assert rule["annotations"]["runbook_url"] == RUNBOOK_URL + anchor, alert
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], alert


def test_runbook_urls_point_at_existing_sections() -> None:
    anchors = {github_anchor(h) for h in re.findall(r"^## (.+)$", RUNBOOK.read_text(), re.M)}
    for alert, rule in rules().items():
        assert rule["annotations"]["runbook_url"].removeprefix(RUNBOOK_URL) in anchors, alert


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing, quiet = set(), set()
    for path in UNIT_TESTS:
        document = yaml.safe_load(path.read_text())
        assert document["rule_files"] == [EXTRACTED], path.name
        for case in document["tests"]:
            for check in case["alert_rule_test"]:
                (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == set(rules()), "alerts without a firing case: " + ", ".join(sorted(set(rules()) - firing))
    assert quiet == set(rules()), "alerts without a quiet case: " + ", ".join(sorted(set(rules()) - quiet))


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain rules file, with the unit tests beside it."""
    spec = yaml.safe_load(RULE_FILE.read_text())["spec"]
    (tmp_path / EXTRACTED).write_text(yaml.safe_dump(spec, sort_keys=False))
    for path in UNIT_TESTS:
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_checks_the_rules(rules_dir: Path) -> None:
    result = promtool("check", "rules", EXTRACTED, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass(rules_dir: Path) -> None:
    assert UNIT_TESTS
    result = promtool("test", "rules", *(path.name for path in UNIT_TESTS), cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_catch_a_wrong_threshold(rules_dir: Path) -> None:
    """The unit tests would notice a changed threshold: 5% -> 50% makes the firing case fail."""
    rules_file = rules_dir / EXTRACTED
    assert "> 0.05" in rules_file.read_text()
    rules_file.write_text(rules_file.read_text().replace("> 0.05", "> 0.5"))
    result = promtool("test", "rules", "traffic.test.yaml", cwd=rules_dir)
    assert result.returncode != 0
    assert "APIGatewayHighErrorRate" in result.stdout + result.stderr


@needs_promtool
def test_backend_errors_alert_blames_backends_not_their_clients(rules_dir: Path, tmp_path: Path) -> None:
    """APIGatewayBackendErrors on what a real gateway exports: a backend that refuses connections is
    blamed; a healthy one whose clients send bodies over the route's limit or hang up mid-body is not
    (those requests reached it, so they are counted by backend, under the gateway's error type)."""
    port, metrics_port = ports()
    with BackendProcess() as echo:
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump({
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
            "routes": [route("uploads", echo.url, match={"path_prefix": "/uploads"}, max_body_size=100),
                       {"name": "payments", "match": {"path_prefix": "/payments"},
                        "backend": {"service": "payments", "url": f"http://127.0.0.1:{free_port()}",  # refused
                                    "retries": {"max_retries": 0}}}],
        }))
        with GatewayProcess(config, port, metrics_port) as gateway:
            assert [http_status(gateway.url + "/uploads/a") for _ in range(2)] == [200, 200]
            assert [http_status(gateway.url + "/payments/a") for _ in range(2)] == [502, 502]
            too_large = (b"POST /uploads/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"c8\r\n" + b"x" * 200)
            for _ in range(2):
                assert exchange(port, too_large + b"\r\n0\r\n\r\n").startswith(b"HTTP/1.1 413 ")
            with socket.create_connection(("127.0.0.1", port)) as hung_up:  # 3 of the 50 bytes it announced
                hung_up.sendall(b"POST /uploads/a HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nabc")
                time.sleep(0.2)
            wait_until(lambda: "client_body_aborted" in gateway.metrics(), what="the hung-up upload counted")
            scraped = [line.rsplit(" ", 1) for line in gateway.metrics().splitlines()
                       if line.startswith("gateway_backend_requests_total{")]
    # Each scraped count, as the increase of every minute for ten minutes.
    (rules_dir / "scraped.test.yaml").write_text(yaml.safe_dump({
        "rule_files": [EXTRACTED],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": name, "values": f"0+{float(value):g}x10"} for name, value in scraped],
            "promql_expr_test": [{
                "expr": rules()["APIGatewayBackendErrors"]["expr"], "eval_time": "10m",
                "exp_samples": [{"labels": '{backend_service="payments"}', "value": 1}],
            }],
        }],
    }))
    result = promtool("test", "rules", "scraped.test.yaml", cwd=rules_dir)
    assert result.returncode == 0, "\n".join(map(" ".join, scraped)) + "\n" + result.stdout + result.stderr
