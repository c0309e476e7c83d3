"""The Grafana dashboards (manifests/monitoring/dashboards/): their model, their PromQL, their metrics,
their alerts, and the ConfigMaps that deliver them.

- The JSON files are dashboards/build.py's output, and hold what Grafana's dashboard model needs in
  what we use: panels with unique ids on a 24-column grid, targets, a `datasource` variable every
  panel and target uses, and template variables for everything a query names with `$`.
- Every expression parses: each is wrapped, template variables substituted, in a recording rule that
  `promtool check rules` reads.
- Every metric an expression names is one the gateway exports, read from a real `/metrics` scrape of
  a real gateway process under the mixed load of bench/dashboard_snapshot.py (counters as `_total`,
  histograms as `_bucket`/`_sum`/`_count`), one the operator's registry exports, or one of
  `EXTERNAL_SERIES` (Prometheus, kube-state-metrics, cAdvisor). The labels an expression filters or
  groups by are checked the same way.
- Every alert of every PrometheusRule in manifests/monitoring/ has exactly one panel, which plots the
  alert's own expression (scoped to `$namespace`) and draws its threshold; README.md's table names it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from apigw.testkit.process import BackendProcess, GatewayProcess, ports, wait_until
from apigw.testkit.redis import RedisServer

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "manifests" / "monitoring"
DASHBOARDS = MONITORING / "dashboards"
RUNBOOK = ROOT / "RUNBOOK.md"
README = ROOT / "README.md"

EXTERNAL_SERIES = {
    # Prometheus itself, one per scrape target.
    "up": {"job", "namespace", "pod", "instance", "service", "endpoint", "container"},
    # kube-state-metrics.
    "kube_pod_container_status_restarts_total": {"namespace", "pod", "container"},
    # cAdvisor (the kubelet's /metrics/cadvisor).
    "container_cpu_cfs_throttled_periods_total": {"namespace", "pod", "container"},
    "container_cpu_cfs_periods_total": {"namespace", "pod", "container"},
}
"""Series from other exporters that panels may read, with the labels they carry."""
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container"}
"""Labels Prometheus adds to every series it scrapes through a ServiceMonitor."""
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h"}
OPERATOR_ALERTS = {"APIGatewayConfigNotProgrammed", "APIGatewayConfigNearSizeLimit"}
"""The operator's alerts (manifests/monitoring/operator-prometheusrule.yaml, from branch operator-scale): the
operator dashboard names them before that file is merged here."""
PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; .ci/run installs it)"
)


def load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


BUILD = load_module(DASHBOARDS / "build.py", "dashboards_build")
BOARDS = {name: json.loads((DASHBOARDS / name).read_text()) for name in sorted(BUILD.DASHBOARDS)}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every target of every dashboard."""
    return [(f"{name} panel {p['id']} ({p['title']}) {t['refId']}", t["expr"])
            for name, board in BOARDS.items() for p in panels(board) for t in p["targets"]]


def variable_queries() -> list[tuple[str, str, str]]:
    """(where, metric, label) of every `label_values(metric{...}, label)` variable."""
    found = []
    for name, board in BOARDS.items():
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]["query"]
                metric, label = re.fullmatch(r"label_values\((\w+)(?:\{.*\})?, (\w+)\)", query).groups()
                found.append((f"{name} ${variable['name']}", metric, label))
    return found


def substitute(expr: str) -> str:
    """The expression as Prometheus receives it: template variables replaced by example values."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        return "api-gateway" if name == "namespace" else ".*"
    return re.sub(r"\$\{?(\w+)\}?", value, expr)


# --- the files and Grafana's model --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILD.DASHBOARDS))
def test_json_files_are_what_build_py_writes(name: str) -> None:
    assert (DASHBOARDS / name).read_text() == BUILD.render(BUILD.DASHBOARDS[name]), \
        f"run python {DASHBOARDS.relative_to(ROOT)}/build.py"


def test_every_json_file_is_built() -> None:
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == sorted(BUILD.DASHBOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_dashboard_matches_grafanas_model(name: str) -> None:
    board = BOARDS[name]
    assert isinstance(board["uid"], str) and 0 < len(board["uid"]) <= 40 and board["title"]
    assert board["schemaVersion"] >= 39
    assert board["time"] == {"from": "now-1h", "to": "now"}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and all(isinstance(v, int) and v >= 0 for v in grid.values())
        assert grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    for panel in panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[0]["value"] is None, panel["title"]  # Grafana's base step
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values), panel["title"]


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panels_do_not_overlap(name: str) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in BOARDS[name]["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_templating_defines_every_variable_used(name: str) -> None:
    board = BOARDS[name]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["type"] == "query" and not variables["namespace"]["includeAll"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, variable["name"]
            assert variable["definition"] == variable["query"]["query"]
            assert variable.get("allValue", ".*") == ".*", "multi-value variables are matched with =~"
    used = {v for p in panels(board) for t in p["targets"] for v in re.findall(r"\$\{?(\w+)", t["expr"])}
    assert used - set(GRAFANA_VARIABLES) <= set(variables), used
    for panel in panels(board):
        for target in panel["targets"]:
            for var in ("route", "backend_service"):
                assert f'{var}="${var}"' not in target["expr"], "multi-value variables need =~"


def test_gateway_dashboard_filters_by_route_and_backend_service() -> None:
    names = {v["name"] for v in BOARDS["api-gateway.json"]["templating"]["list"]}
    assert {"datasource", "namespace", "route", "backend_service"} <= names
    exprs = [expr for where, expr in expressions() if where.startswith("api-gateway.json")]
    assert any('route=~"$route"' in e for e in exprs) and any('backend_service=~"$backend_service"' in e for e in exprs)
    assert all('namespace="$namespace"' in e for e in exprs)


# --- PromQL: it parses ---------------------------------------------------------------------------


def rules_file(tmp_path: Path, exprs: list[str]) -> Path:
    rules = [{"record": f"dashboard:expression_{i}:value", "expr": substitute(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False))
    return path


def promtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], check=False, capture_output=True, text=True,
                          timeout=60)


@needs_promtool
def test_every_expression_parses(tmp_path: Path) -> None:
    exprs = [expr for _, expr in expressions()]
    result = promtool_check(rules_file(tmp_path, exprs))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


@needs_promtool
def test_promtool_check_catches_a_broken_expression(tmp_path: Path) -> None:
    """The wrapping above would notice: one unbalanced parenthesis fails the whole file."""
    exprs = [expr for _, expr in expressions()]
    exprs[0] = exprs[0].replace(")", "", 1)
    assert promtool_check(rules_file(tmp_path, exprs)).returncode != 0


# --- PromQL: the metrics and labels it names exist -----------------------------------------------


def selectors(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """The metrics an expression reads with the labels it matches on each, and the labels it groups by.

    A text scan, not a parser: promtool has checked the syntax. Strings go first (a regex such as
    `[1-4]..` is no range), then `metric{matchers}`, then the label lists of by/without/on/ignoring/
    group_*, then ranges; what is left that is a name and not a function or keyword is a bare metric."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    found: list[tuple[str, set[str]]] = []

    def braced(match: re.Match[str]) -> str:
        found.append((match.group(1), set(re.findall(r"(\w+)\s*[=!]~?", match.group(2)))))
        return " "
    text = re.sub(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", braced, text)
    grouped = set()
    for words in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouped |= {w.strip() for w in words.split(",") if w.strip()}
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for name in re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*+)(?!\s*\()", text):
        if name not in PROMQL_WORDS:
            found.append((name, set()))
    return found, grouped


def test_selectors_finds_metrics_labels_and_groupings() -> None:
    """Guards the scan above on the shapes the dashboards use."""
    found, grouped = selectors(
        'histogram_quantile(0.99, sum by (le, route) '
        '(rate(a_bucket{namespace="$namespace", status_code!~"[1-4].."}[5m]))) '
        "/ ignoring(x) b_total and on (instance) (c == 1) - time() > 14 * 86400")
    assert found == [("a_bucket", {"namespace", "status_code"}), ("b_total", set()), ("c", set())]
    assert grouped == {"le", "route", "x", "instance"}


def exported(text: str) -> dict[str, set[str]]:
    """Series names in a Prometheus exposition, with the labels their samples carry. A family with no
    sample yet still names its series: `_total` for counters, `_bucket`/`_sum`/`_count` for histograms."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, [""]):
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


@pytest.fixture(scope="module")
def gateway_series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """A real gateway's /metrics after bench/dashboard_snapshot.py's mixed load, a Redis outage (the
    limiter's and the revocation check's errors) and a SIGHUP reload."""
    snapshot = load_module(ROOT / "bench" / "dashboard_snapshot.py", "dashboard_snapshot")
    with snapshot.site(tmp_path_factory.mktemp("gateway")) as site:
        statuses = snapshot.load(site, seconds=3, max_requests=400)
        assert {200, 401, 502} <= set(statuses), statuses
        site.redis.stop()
        snapshot.load(site, seconds=1, max_requests=30)
        site.gateway.signal(signal.SIGHUP)
        wait_until(lambda: "gateway_config_reloads_total{" in site.gateway.metrics(), what="a counted reload")
        return exported(site.gateway.metrics())


def operator_series() -> dict[str, set[str]] | None:
    """The operator's registry as its /metrics serves it, each labelled series given one sample; None
    while the operator has no metrics module."""
    try:
        from apigw_operator.metrics import Metrics
    except ImportError:
        return None
    from prometheus_client import generate_latest

    metrics = Metrics()
    metrics.count_crs({("GatewayRoute", "Accepted", "True"): 1})
    metrics.passes.labels("ok").inc()
    metrics.requests.labels("patch", "ok").inc()
    return exported(generate_latest(metrics.registry).decode())


def test_the_scrape_holds_every_gateway_family_with_samples(gateway_series: dict[str, set[str]]) -> None:
    """So the label checks below check labels, not families that had nothing to show yet."""
    labelled = {"gateway_http_requests_total", "gateway_backend_requests_total", "gateway_auth_attempts_total",
                "gateway_ratelimit_requests_total", "gateway_redis_errors_total", "gateway_circuit_breaker_state",
                "gateway_config_reloads_total", "gateway_http_request_duration_seconds_bucket",
                "gateway_backend_duration_seconds_bucket"}
    for name in labelled:
        assert gateway_series.get(name), f"{name} has no labelled sample in the scrape"


def test_the_first_failure_of_a_kind_is_counted_from_zero(tmp_path: Path) -> None:
    """Prometheus takes a series' first sample for its start: `rate` and `increase` over a counter that
    appears at 1 see no increase, so a single rejected reload (the usual bad edit) would never show on
    the reloads panel, nor a short Redis outage on the Redis panel, nor the first 429s of a storm on the
    decisions panel. A real gateway exports the outcomes it knows of at 0 before any happens."""
    port, metrics_port = ports()
    with RedisServer() as redis_server, BackendProcess() as backend:
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump({
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
            "redis": {"url": redis_server.url},
            "policies": [{"name": "standard", "requests": 10, "period": "1m"}],
            "routes": [{"name": "api", "backend": {"service": "api", "url": backend.url}, "ratelimit": "standard"}],
        }))
        with GatewayProcess(config, port, metrics_port) as gateway:
            scraped = {family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
                       for family in text_string_to_metric_families(gateway.metrics())}
            assert scraped["gateway_config_reloads"] == {(("result", "failure"),): 0, (("result", "success"),): 0}
            assert scraped["gateway_redis_errors"].get((("operation", "ratelimit"),)) == 0
            assert scraped["gateway_ratelimit_requests"] == {
                (("decision", decision), ("policy", "standard")): 0 for decision in ("allowed", "limited", "error")}
            config.write_text(config.read_text() + "bogus: 1\n")
            gateway.signal(signal.SIGHUP)
            wait_until(lambda: 'gateway_config_reloads_total{result="failure"} 1.0' in gateway.metrics(),
                       what="the rejected reload counted")


def check_names(where: str, expr: str, known: dict[str, set[str]]) -> list[str]:
    problems = []
    found, grouped = selectors(expr)
    labels = set(TARGET_LABELS)
    for metric, matched in found:
        if metric not in known:
            problems.append(f"{where}: {metric} is exported by nothing we know")
            continue
        have = known[metric] | TARGET_LABELS | ({"le"} if metric.endswith("_bucket") else set())
        labels |= have
        if matched - have:
            problems.append(f"{where}: {metric} has no label {sorted(matched - have)}")
    if grouped - labels:
        problems.append(f"{where}: groups by {sorted(grouped - labels)}, which no series in it carries")
    return problems


def test_every_expression_names_exported_metrics_and_labels(gateway_series: dict[str, set[str]]) -> None:
    known = {**gateway_series, **EXTERNAL_SERIES}
    operator = operator_series()
    problems = []
    for where, expr in expressions():
        if where.startswith("api-gateway-operator.json"):
            if operator is None:
                continue  # checked by the test below once the operator's metrics exist
            problems += check_names(where, expr, {**operator, **EXTERNAL_SERIES})
        else:
            problems += check_names(where, expr, known)
    for where, metric, label in variable_queries():
        series = operator if where.startswith("api-gateway-operator.json") else known
        if series is not None:
            problems += check_names(where, f"{metric}{{{label}=''}}", series)
    assert not problems, "\n".join(problems)


def test_the_name_check_catches_a_misspelt_metric_and_label(gateway_series: dict[str, set[str]]) -> None:
    assert check_names("x", "sum by (route) (rate(gateway_http_request_total[5m]))", gateway_series)
    assert check_names("x", 'sum(rate(gateway_http_requests_total{status="500"}[5m]))', gateway_series)
    assert check_names("x", "sum by (backend) (rate(gateway_http_requests_total[5m]))", gateway_series)
    assert not check_names("x", "sum by (route, pod) (rate(gateway_http_requests_total[5m]))", gateway_series)


def test_operator_dashboard_names_exported_metrics() -> None:
    operator = operator_series()
    if operator is None:
        pytest.skip("apigw_operator.metrics is not in this tree yet (branch operator-scale adds it)")
    problems = [p for where, expr in expressions() if where.startswith("api-gateway-operator.json")
                for p in check_names(where, expr, {**operator, **EXTERNAL_SERIES})]
    assert not problems, "\n".join(problems)


# --- alerts, runbook sections and the README ------------------------------------------------------


def alert_rules() -> dict[str, str]:
    """Alert -> expression, from every PrometheusRule in manifests/monitoring/."""
    found = {}
    for path in sorted(MONITORING.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "PrometheusRule":
                found |= {r["alert"]: r["expr"] for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r}
    return found


def panel_alerts() -> dict[str, list[dict[str, Any]]]:
    """Alert -> the panels whose description names it (`Alert: A, B`)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for board in BOARDS.values():
        for panel in panels(board):
            match = re.search(r"^Alert: (.+)$", panel["description"], re.MULTILINE)
            for alert in match.group(1).split(", ") if match else []:
                found.setdefault(alert, []).append(panel)
    return found


def normalise(expr: str) -> str:
    """An expression without spaces, namespace matchers and matchers on template variables: the
    panel's scoping, which the alert rule does not have."""
    expr = re.sub(r'\w+=~?"\$\w+"|namespace=~?"[^"]*"', "", expr)
    expr = re.sub(r"\s+", "", expr)
    while True:
        simpler = re.sub(r",(?=[,}])|(?<=\{),", "", expr).replace("{}", "")
        if simpler == expr:
            return expr
        expr = simpler


COMPARISON = re.compile(r"\s*([<>])\s*([\d.]+(?:\s*\*\s*[\d.]+)*)\s*$")


def threshold(expr: str) -> float | None:
    """The constant an alert compares its expression with last (`> 0.05`, `< 14 * 86400`)."""
    match = COMPARISON.search(expr) or re.search(r"([<>])\s*([\d.]+)\s*\)\s*and", expr)
    if not match:
        return None
    value = 1.0
    for factor in match.group(2).split("*"):
        value *= float(factor)
    return value


def test_every_alert_has_exactly_one_panel() -> None:
    rules, shown = alert_rules(), panel_alerts()
    assert set(rules) <= set(shown), f"alerts without a panel: {sorted(set(rules) - set(shown))}"
    pending = set() if OPERATOR_ALERTS & set(rules) else OPERATOR_ALERTS
    assert set(shown) - set(rules) <= pending, "panels name alerts no PrometheusRule has"
    for alert, found in shown.items():
        assert len(found) == 1, f"{alert}: {[p['title'] for p in found]}"


@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_alert_panel_plots_the_alert_and_draws_its_threshold(alert: str) -> None:
    expr = alert_rules()[alert]
    (panel,) = panel_alerts()[alert]
    targets = [t["expr"] for t in panel["targets"]]
    alert_metrics = {m for m, _ in selectors(expr)[0]}
    assert alert_metrics <= {m for t in targets for m, _ in selectors(t)[0]}
    if COMPARISON.search(expr):
        assert normalise(COMPARISON.sub("", expr)) in [normalise(t) for t in targets], \
            f"{alert}: no target plots the alert's expression"
    limit = threshold(expr)
    if limit:
        steps = [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]
        assert limit in steps, f"{alert}: threshold {limit} is not drawn ({steps})"


def color(panel: dict[str, Any], value: float) -> str:
    """The color Grafana gives `value` on `panel`: that of the last threshold step at or below it (the
    first step, of value null, stands for minus infinity)."""
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [step["color"] for step in steps if step["value"] is None or step["value"] <= value][-1]


@pytest.mark.parametrize("alert", sorted(alert for alert, expr in alert_rules().items() if threshold(expr) is not None))
def test_alert_panel_colors_every_firing_value(alert: str) -> None:
    """A value on the alert's firing side is never green: just past the threshold, and far past it (an
    error ratio of 100%, a certificate that expired a day ago; for `> 0`, one restart and a hundred)."""
    expr = alert_rules()[alert]
    limit = threshold(expr)
    assert limit is not None
    (panel,) = panel_alerts()[alert]
    below = re.search(r"<\s*[\d.\s*]+$", expr.strip()) is not None
    firing = [limit * 0.99, -86400.0] if below else [limit * 1.01 or 1.0, limit * 100 or 100.0]
    assert [color(panel, value) for value in firing].count("green") == 0, (
        f"{alert}: {[(value, color(panel, value)) for value in firing]}")


def test_the_alert_check_catches_a_changed_threshold_or_expression() -> None:
    expr = alert_rules()["APIGatewayHighErrorRate"]
    assert threshold(expr) == 0.05 and threshold(expr.replace("> 0.05", "> 0.5")) == 0.5
    (panel,) = panel_alerts()["APIGatewayHighErrorRate"]
    plotted = [normalise(t["expr"]) for t in panel["targets"]]
    assert normalise(COMPARISON.sub("", expr)) in plotted
    assert normalise(COMPARISON.sub("", expr).replace("5..", "4..")) not in plotted


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_panel_names_a_runbook_section() -> None:
    runbook = set(re.findall(r"^## (.+)$", RUNBOOK.read_text(), re.MULTILINE))
    readme = set(re.findall(r"^#+ (.+)$", README.read_text(), re.MULTILINE))
    for board in BOARDS.values():
        for panel in panels(board):
            (section,) = re.findall(r"^Runbook: (.+)$", panel["description"], re.MULTILINE)
            if section.startswith("README: "):
                assert section.removeprefix("README: ") in readme, panel["title"]
            else:
                assert section.split(" (")[0] in runbook, f"{panel['title']}: {section}"


def test_readme_table_links_each_alert_to_its_panel() -> None:
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`APIGateway\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(panel_alerts())
    for alert, (_, section, dashboard, title) in rows.items():
        (panel,) = panel_alerts()[alert]
        board = next(b for b in BOARDS.values() if panel in b["panels"])
        assert title == f"{panel['title']} (panel {panel['id']})", alert
        assert dashboard == board["title"], alert
        named = re.search(r"^Runbook: (.+)$", panel["description"], re.MULTILINE).group(1).split(" (")[0]
        heading = named.removeprefix("README: ")
        link = f"#{github_anchor(heading)}" if named.startswith("README: ") else f"RUNBOOK.md#{github_anchor(heading)}"
        assert section == f"[{heading}]({link})", alert


# --- delivery: the ConfigMaps ---------------------------------------------------------------------


def generated_configmaps() -> list[dict[str, Any]]:
    return yaml.safe_load((MONITORING / "kustomization.yaml").read_text())["configMapGenerator"]


def test_every_dashboard_ships_in_a_sidecar_configmap() -> None:
    shipped = {}
    for generator in generated_configmaps():
        assert generator["options"]["labels"]["grafana_dashboard"] == "1", generator["name"]
        for file in generator["files"]:
            shipped[Path(file).name] = generator["name"]
    assert set(shipped) == set(BUILD.DASHBOARDS)


def test_configmaps_fit_kubectl_apply() -> None:
    """Client-side `kubectl apply` copies the object into an annotation limited to 256 KiB."""
    for generator in generated_configmaps():
        size = sum(len((MONITORING / file).read_bytes()) for file in generator["files"])
        assert size < 200 * 1024, f"{generator['name']}: {size} bytes"
