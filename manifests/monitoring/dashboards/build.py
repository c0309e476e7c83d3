"""Writes the Grafana dashboards in this directory: `python manifests/monitoring/dashboards/build.py`.

The JSON files are what users import and what the ConfigMaps carry; this script is where they are
edited, so that the ~30 panels share one layout, one datasource reference and one way of naming their
runbook section and alert. tests/test_dashboards.py checks the JSON files are this script's output.

Every panel's description ends with `Runbook: <section>` (a RUNBOOK.md heading, or a README.md
heading for the operator) and, for the panel behind an alert, `Alert: <name>`; the panel then draws
the alert's threshold and plots the alert's own expression (scoped to `$namespace`) as the series
`alert`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39  # Grafana 10.4+; newer Grafana migrates it on load
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace="$namespace"'
ROUTE = f'{NS}, route=~"$route"'
BACKEND = f'{NS}, backend_service=~"$backend_service"'
GATEWAY = f'job="api-gateway", {NS}'
CONTAINER = f'{NS}, container="gateway"'
WINDOW = "5m"  # the alerts' rate window: the alert series show exactly what the rule evaluates
RATE = "$__rate_interval"
FIVE_XX = 'status_code=~"5.."'
BACKEND_FAILED = 'status_code=~"5..|backend_.+|upstream_overflow"'
"""A backend's failures in `gateway_backend_requests_total`: not its clients' (body_too_large, client_*)."""

STATES = [  # gateway_circuit_breaker_state
    {"type": "value", "options": {
        "0": {"text": "closed", "color": "green", "index": 0},
        "1": {"text": "open", "color": "red", "index": 1},
        "2": {"text": "half-open", "color": "orange", "index": 2},
    }},
]
UP_STATES = [{"type": "value", "options": {
    "0": {"text": "down", "color": "red", "index": 0}, "1": {"text": "up", "color": "green", "index": 1}}}]
LEADER_STATES = [{"type": "value", "options": {
    "0": {"text": "standby", "color": "blue", "index": 0}, "1": {"text": "leader", "color": "green", "index": 1}}}]


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"refId": ref, "datasource": DATASOURCE, "expr": " ".join(expr.split()), "legendFormat": legend,
            "range": True}


def quantile(q: float, metric: str, selector: str, by: str = "", window: str = RATE) -> str:
    """The histogram's q-quantile, by one label (or '' for all)."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{window}])))"


def quantiles(metric: str, selector: str, by: str) -> list[tuple[str, str]]:
    """p50, p95 and p99 targets."""
    legend = f" {{{{{by}}}}}" if by else ""
    return [(quantile(q, metric, selector, by), f"p{round(q * 100)}{legend}") for q in (0.5, 0.95, 0.99)]


def ratio(metric: str, selector: str, bad: str, by: str = "") -> str:
    """The share of `metric`'s rate matching `bad`, as the alert rules write it (over their window)."""
    group = f"sum by ({by}) " if by else "sum"
    return (f"{group}(rate({metric}{{{selector}, {bad}}}[{WINDOW}])) "
            f"/ {group}(rate({metric}{{{selector}}}[{WINDOW}]))")


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    """Green below the first step, unless the first step is `(None, color)`: the color from minus infinity."""
    base = [] if steps and steps[0][0] is None else [{"color": "green", "value": None}]
    return {"mode": "absolute", "steps": base + [{"color": color, "value": value} for value, color in steps]}


class Dashboard:
    """Panels laid out left to right in rows of 24 grid units, under collapsible-looking row headers."""

    def __init__(self, uid: str, title: str, description: str):
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[dict[str, Any]] = []
        self.variables: list[dict[str, Any]] = [{
            "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False, "multi": False,
        }]
        self.x = self.y = self.row_height = 0

    def variable(self, name: str, query: str, all_: bool) -> None:
        self.variables.append({
            "name": name, "label": name, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "sort": 1,
            "current": {}, "options": [], "hide": 0, "regex": "",
            "includeAll": all_, "multi": all_, **({"allValue": ".*"} if all_ else {}),
        })

    def _id(self) -> int:
        return len(self.panels) + 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"id": self._id(), "type": "row", "title": title, "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0

    def panel(self, kind: str, title: str, description: str, runbook: str, targets: list[tuple[str, str]], *,
              unit: str = "short", width: int = 12, height: int = 8, alert: str | None = None,
              steps: tuple[tuple[float | None, str], ...] = (), mappings: list[dict[str, Any]] | None = None,
              stack: bool = False, bars: bool = False) -> None:
        if self.x + width > 24:
            self._newline()
        text = f"{description}\n\nRunbook: {runbook}" + (f"\n\nAlert: {alert}" if alert else "")
        defaults: dict[str, Any] = {"unit": unit, "thresholds": thresholds(*steps), "mappings": mappings or []}
        options: dict[str, Any] = {"tooltip": {"mode": "multi", "sort": "desc"},
                                   "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"}}
        if kind == "timeseries":
            defaults["color"] = {"mode": "palette-classic"}
            defaults["custom"] = {
                "drawStyle": "bars" if bars else "line", "lineWidth": 1, "fillOpacity": 80 if bars else 10,
                "showPoints": "never", "spanNulls": False,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                "thresholdsStyle": {"mode": "dashed" if steps else "off"},
            }
        elif kind == "state-timeline":
            defaults["color"] = {"mode": "thresholds"}
            options = {"showValue": "auto", "mergeValues": True, "rowHeight": 0.9, "alignValue": "left",
                       "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
                       "tooltip": {"mode": "single", "sort": "none"}}
        elif kind == "stat":
            defaults["color"] = {"mode": "thresholds"}
            options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                       "colorMode": "background", "graphMode": "none", "textMode": "value_and_name",
                       "orientation": "auto", "justifyMode": "auto"}
        self.panels.append({
            "id": self._id(), "type": kind, "title": title, "description": text, "datasource": DATASOURCE,
            "gridPos": {"h": height, "w": width, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options,
            "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        })
        self.row_height = height if self.x == 0 else max(self.row_height, height)
        self.x += width

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": ["api-gateway"],
            "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": True, "graphTooltip": 1,
            "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "browser",
            "annotations": {"list": [{
                "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
                "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
            }]},
            "templating": {"list": self.variables},
            "panels": self.panels,
            "links": [],
        }


def gateway() -> Dashboard:
    d = Dashboard("apigw-gateway", "API Gateway", "The gateway's traffic, backends, auth, rate limits, config, TLS "
                  "and pods: what RUNBOOK.md's investigations read with curl | grep, over time.")
    d.variable("namespace", "label_values(gateway_http_requests_total, namespace)", all_=False)
    d.variable("route", 'label_values(gateway_http_requests_total{namespace="$namespace"}, route)', all_=True)
    d.variable("backend_service",
               'label_values(gateway_backend_requests_total{namespace="$namespace"}, backend_service)', all_=True)

    d.row("Traffic")
    d.panel("timeseries", "Request rate by route",
            "Requests answered per second, by route name (`-`: no route matched, or the request was refused "
            "before routing).", "High Latency (High Request Volume)",
            [(f"sum by (route) (rate(gateway_http_requests_total{{{ROUTE}}}[{RATE}]))", "{{route}}")], unit="reqps")
    d.panel("timeseries", "Responses by status code",
            "Responses per second by status code, all selected routes: 401/403 are token checks, 429 rate "
            "limits, 502/503/504 backends, breakers or a fail_closed limiter.", "High Error Rate",
            [(f"sum by (status_code) (rate(gateway_http_requests_total{{{ROUTE}}}[{RATE}]))", "{{status_code}}")],
            unit="reqps", stack=True)
    d.panel("timeseries", "5xx error ratio",
            "Share of responses that are 5xx. `alert` is the alert's own expression over every route of the "
            "namespace; the other series split it by route.", "High Error Rate",
            [(ratio("gateway_http_requests_total", NS, FIVE_XX), "alert"),
             (ratio("gateway_http_requests_total", ROUTE, FIVE_XX, by="route"), "{{route}}")],
            unit="percentunit", alert="APIGatewayHighErrorRate", steps=((0.05, "red"),))
    d.panel("timeseries", "p95 latency",
            "95th percentile of the time from request to response. `alert` is the alerts' own expression over "
            "every route of the namespace (warning above 500 ms for 10 minutes, critical above 1 s for 5).",
            "High Latency",
            [(quantile(0.95, "gateway_http_request_duration_seconds", f'{NS}, route!="-"', window=WINDOW), "alert"),
             (quantile(0.95, "gateway_http_request_duration_seconds", ROUTE, "route", WINDOW), "{{route}}")],
            unit="s", alert="APIGatewayHighLatency, APIGatewayVeryHighLatency", steps=((0.5, "orange"), (1, "red")))
    d.panel("timeseries", "Latency p50 / p95 / p99 by route",
            "Time from request to response by route: compare with the backend duration below to tell gateway "
            "time from backend time.", "High Latency",
            quantiles("gateway_http_request_duration_seconds", ROUTE, "route"), unit="s", width=24)

    d.row("Backends")
    d.panel("timeseries", "Backend error ratio",
            "Share of backend requests that failed: 5xx answers, no answer at all (status_code "
            "backend_unreachable, backend_reset, backend_timeout, ...) and a full pool (upstream_overflow); "
            "not the clients' failures (body_too_large, client_body_aborted, ...).", "Backend Service Errors",
            [(ratio("gateway_backend_requests_total", BACKEND, BACKEND_FAILED, by="backend_service"),
              "{{backend_service}}")],
            unit="percentunit", alert="APIGatewayBackendErrors", steps=((0.1, "red"),))
    d.panel("timeseries", "Backend responses by status",
            "Backend requests per second by backend_service and what came back (an HTTP status, or the error "
            "type when nothing did).", "Backend Service Errors",
            [(f"sum by (backend_service, status_code) (rate(gateway_backend_requests_total{{{BACKEND}}}[{RATE}]))",
              "{{backend_service}} {{status_code}}")], unit="reqps")
    d.panel("timeseries", "Backend duration p50 / p95 / p99",
            "Time until each backend's response headers, by backend_service.", "High Latency (Backend Service Slow)",
            quantiles("gateway_backend_duration_seconds", BACKEND, "backend_service"), unit="s")
    d.panel("state-timeline", "Circuit breaker state",
            "Each backend's breaker, the worst over pods: closed, open (503 circuit_open at once) or half-open "
            "(probes let through).", "Backend Service Errors",
            [(f"max by (backend_service) (gateway_circuit_breaker_state{{{BACKEND}}})", "{{backend_service}}")],
            mappings=STATES, steps=((1, "red"),))

    d.row("Auth")
    d.panel("timeseries", "Token check failure ratio",
            "Share of token checks that failed, all routes of the namespace (not revocation_unavailable: Redis "
            "down, the Redis panels).", "High Authorization Failure Rate",
            [(ratio("gateway_auth_attempts_total", f'{NS}, error_type!="revocation_unavailable"', 'result="failure"'),
              "alert")],
            unit="percentunit", alert="APIGatewayHighAuthFailureRate", steps=((0.2, "red"),))
    d.panel("timeseries", "Token checks by result and error type",
            "Token checks per second: successes, and failures by error_type (missing_token, expired, "
            "bad_signature, unknown_kid, revoked, insufficient_scope, ...): the runbook's "
            "`jq -r '.error_type' | sort | uniq -c` over time.",
            "High Authorization Failure Rate",
            [(f"sum by (result, error_type) (rate(gateway_auth_attempts_total{{{NS}}}[{RATE}]))",
              "{{result}} {{error_type}}")], unit="reqps", stack=True)

    d.row("Rate limiting and Redis")
    d.panel("timeseries", "Rate limit decisions by policy",
            "Decisions per second by policy and decision: allowed, limited, or error (Redis failed; "
            "failure_mode decided).", "Rate Limiter Issues",
            [(f"sum by (policy, decision) (rate(gateway_ratelimit_requests_total{{{NS}}}[{RATE}]))",
              "{{policy}} {{decision}}")], unit="reqps", width=8)
    d.panel("timeseries", "Rate limiter errors",
            "Rate limit checks per second that failed (Redis error or timeout); failure_mode decided what "
            "each did.", "Rate Limiter Issues",
            [(f"sum(rate(gateway_ratelimit_errors_total{{{NS}}}[{WINDOW}]))", "alert")],
            unit="short", alert="APIGatewayRateLimiterErrors", steps=((1, "red"),), width=8)
    d.panel("timeseries", "Redis errors by operation",
            "Redis calls per second that failed, by operation. `alert` is their sum, as the alert reads it.",
            "Redis Connectivity Issues",
            [(f"sum(rate(gateway_redis_errors_total{{{NS}}}[{WINDOW}]))", "alert"),
             (f"sum by (operation) (rate(gateway_redis_errors_total{{{NS}}}[{RATE}]))", "{{operation}}")],
            unit="short", alert="APIGatewayRedisConnectivityIssues", steps=((5, "red"),), width=8)
    d.panel("timeseries", "Rate limit decision latency",
            "Time of one rate limit decision (one Redis round trip): the runbook's `grep -i \"rate.*duration\"`, "
            "for every decision rather than only the slow ones logged.", "High Latency (Redis Latency)",
            quantiles("gateway_ratelimit_duration_seconds", NS, ""), unit="s", width=24)

    d.row("Config and TLS")
    d.panel("timeseries", "Config reloads by pod and result",
            "Config reloads per pod: success, or failure (rejected: the old config stays in force; the pod's log "
            "says why). "
            "The hash of the config each pod serves is not a metric: it is `config_hash` in each pod's "
            "/_health/ready, and the operator's Programmed condition counts the pods serving the rendered one "
            "(operator dashboard: Config programmed).", "High Error Rate (Configuration Error)",
            [(f"sum by (pod, result) (increase(gateway_config_reloads_total{{{NS}}}[{RATE}]))", "{{pod}} {{result}}")],
            unit="short", bars=True)
    d.panel("stat", "TLS certificate expires in",
            "Time left on the certificate each pod serves (pods without TLS are left out; negative: expired). "
            "cert-manager renews 30 days ahead: orange under 30 days means renewal is late, red under 14 fires "
            "the alert.",
            "Certificate Expiration",
            [(f"(gateway_tls_certificate_expiry_timestamp_seconds{{{NS}}} > 0) - time()", "{{pod}}")],
            unit="dtdurations", alert="APIGatewayCertificateExpiringSoon",
            steps=((None, "red"), (14 * 86400, "orange"), (30 * 86400, "green")))

    d.row("Pods")
    d.panel("state-timeline", "Gateway targets up",
            "Each gateway pod's scrape: down means Prometheus cannot reach its :9090/metrics. No rows at all "
            "means no gateway target (every pod gone).", "Service Down",
            [(f"up{{{GATEWAY}}}", "{{pod}}")], mappings=UP_STATES, alert="APIGatewayDown", steps=((1, "green"),),
            width=8)
    d.panel("timeseries", "CPU per pod",
            "CPU cores used by each gateway process. One event loop uses at most one core: scale out, "
            "not up.", "High CPU/Memory Usage",
            [(f"rate(process_cpu_seconds_total{{{GATEWAY}}}[{WINDOW}])", "{{pod}}")],
            unit="short", alert="APIGatewayHighCPU", steps=((1.5, "red"),), width=8)
    d.panel("timeseries", "Resident memory per pod",
            "Resident memory of each gateway process.", "High CPU/Memory Usage",
            [(f"process_resident_memory_bytes{{{GATEWAY}}}", "{{pod}}")],
            unit="bytes", alert="APIGatewayHighMemory", steps=((800 * 1024 * 1024, "red"),), width=8)
    d.panel("timeseries", "Container restarts",
            "Restarts of the gateway container per pod over 15 minutes (kube-state-metrics); the alert fires "
            "on any.", "Pod Restart Loop",
            [(f"increase(kube_pod_container_status_restarts_total{{{CONTAINER}}}[15m])", "{{pod}}")],
            unit="short", alert="APIGatewayHighRestartRate", steps=((1, "red"),), bars=True, width=8)
    d.panel("timeseries", "CPU throttling per pod",
            "Share of CFS periods in which the gateway container was throttled (cAdvisor): what the "
            "runbook's `kubectl describe pod | grep -i throttl` cannot show.", "High Latency (Resource Contention)",
            [((f'sum by (pod) (rate(container_cpu_cfs_throttled_periods_total{{{CONTAINER}}}[{RATE}])) '
               f'/ sum by (pod) (rate(container_cpu_cfs_periods_total{{{CONTAINER}}}[{RATE}]))'), "{{pod}}")],
            unit="percentunit", width=8)
    d.panel("timeseries", "In-flight requests and asyncio tasks",
            "Requests being handled and asyncio tasks alive per pod (the runbook's go_goroutines check).",
            "High CPU/Memory Usage",
            [(f"gateway_inflight_requests{{{GATEWAY}}}", "in flight {{pod}}"),
             (f"gateway_asyncio_tasks{{{GATEWAY}}}", "tasks {{pod}}")], width=8)
    return d


def operator() -> Dashboard:
    leader = f"on (instance) (apigw_operator_leader{{{NS}}} == 1)"
    d = Dashboard("apigw-operator", "API Gateway operator", "The operator that renders GatewayRoute and "
                  "RateLimitPolicy CRs into the gateway's ConfigMap: CR conditions, passes, size, leader.")
    d.variable("namespace", "label_values(apigw_operator_leader, namespace)", all_=False)
    readme = "README: What the conditions say"

    d.row("Config")
    d.panel("state-timeline", "Config programmed",
            "1 when the rendered routes.yaml is in the ConfigMap and every ready gateway pod serves it "
            "(the leader's view).", readme,
            [(f"apigw_operator_config_programmed{{{NS}}} and {leader}", "programmed")],
            mappings=[{"type": "value", "options": {"0": {"text": "not programmed", "color": "red", "index": 0},
                                                    "1": {"text": "programmed", "color": "green", "index": 1}}}],
            alert="APIGatewayConfigNotProgrammed", steps=((1, "green"),), width=8)
    d.panel("timeseries", "Config size against its limit",
            "The ConfigMap's data with the rendered routes.yaml, as a share of the most it may hold; past it "
            "new routes are not programmed (Programmed=False ConfigTooLarge).", readme,
            [(f"apigw_operator_config_bytes{{{NS}}} / apigw_operator_config_limit_bytes{{{NS}}} and {leader}",
              "share of limit")],
            unit="percentunit", alert="APIGatewayConfigNearSizeLimit", steps=((0.8, "red"),), width=8)
    d.panel("state-timeline", "Leader",
            "Which operator replica holds the Lease and writes (the other waits); none for 10 minutes: "
            "APIGatewayOperatorDown.", readme,
            [(f"apigw_operator_leader{{{NS}}}", "{{pod}}")], mappings=LEADER_STATES, alert="APIGatewayOperatorDown",
            width=8)

    d.row("CRs and passes")
    d.panel("timeseries", "CRs by condition",
            "GatewayRoutes and RateLimitPolicies by condition and its status, as the leader last wrote them.",
            readme,
            [(f"max by (kind, condition, status) (apigw_operator_crs{{{NS}}} and {leader})",
              "{{kind}} {{condition}}={{status}}")], width=24)
    d.panel("timeseries", "Reconcile duration",
            "Time of one reconcile pass, rendering and validation included.", readme,
            quantiles("apigw_operator_reconcile_duration_seconds", NS, ""), unit="s", width=8)
    d.panel("timeseries", "Reconcile passes by result",
            "Passes per second: ok, or error (aborted; the next pass retries).", readme,
            [(f"sum by (pod, result) (rate(apigw_operator_reconcile_passes_total{{{NS}}}[{RATE}]))",
              "{{pod}} {{result}}")], unit="ops", width=8)
    d.panel("timeseries", "Kubernetes API requests",
            "The operator's API requests per second by verb and result (ok or the HTTP status).", readme,
            [(f"sum by (verb, result) (rate(apigw_operator_api_requests_total{{{NS}}}[{RATE}]))",
              "{{verb}} {{result}}")], unit="reqps", width=8)
    return d


DASHBOARDS = {"api-gateway.json": gateway, "api-gateway-operator.json": operator}


def render(build: Any) -> str:
    return json.dumps(build().json(), indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    for name, build in DASHBOARDS.items():
        (HERE / name).write_text(render(build))


if __name__ == "__main__":
    main()
