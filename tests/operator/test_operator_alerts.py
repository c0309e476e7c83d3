"""The operator's PrometheusRule: `promtool check rules` and `promtool test rules`, a firing and a quiet
case per alert, and every alert on a metric the operator exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from apigw_operator.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULE_FILE = ROOT / "manifests" / "monitoring" / "operator-prometheusrule.yaml"
UNIT_TESTS = sorted((ROOT / "tests" / "rules" / "operator").glob("*.test.yaml"))
EXTRACTED = "api-gateway-operator.rules.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`)")


def rules() -> dict[str, dict]:
    spec = yaml.safe_load(RULE_FILE.read_text())["spec"]
    return {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"]}


def test_alerts_use_only_exported_metrics_and_have_both_cases() -> None:
    exported = {metric.name for metric in Metrics().registry.collect()}
    for name, rule in rules().items():
        used = set(re.findall(r"apigw_operator_\w+", rule["expr"]))
        assert used and used <= exported, (name, used - exported)
    firing, quiet = set(), set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case["alert_rule_test"]:
                (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == quiet == set(rules())


@needs_promtool
def test_promtool_checks_and_unit_tests(tmp_path: Path) -> None:
    spec = yaml.safe_load(RULE_FILE.read_text())["spec"]
    (tmp_path / EXTRACTED).write_text(yaml.safe_dump(spec, sort_keys=False))
    for path in UNIT_TESTS:
        shutil.copy(path, tmp_path / path.name)
    checked = subprocess.run([PROMTOOL, "check", "rules", EXTRACTED], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and f"SUCCESS: {len(rules())} rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", *(p.name for p in UNIT_TESTS)], check=False, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr
