"""The README's dashboard picture: the API Gateway dashboard's main panels, drawn from a real run.

A real gateway process, Redis and echo backend on loopback; a mixed load for `--seconds` (at most 60,
and at most `--max-requests`): good requests, 401s (missing, expired and wrongly signed tokens), 429s
from a rate limit, 503s from a backend, 502s from a dead one whose breaker opens and half-opens, and a
slow route. The gateway's own `/metrics` is scraped every `--every` seconds; rates, ratios and
quantiles are computed from the scrapes as the dashboard's PromQL does, over a sliding window of three
scrapes, and drawn with matplotlib (`pip install matplotlib`):

    python bench/dashboard_snapshot.py [--seconds 45] [--out docs/dashboard.png]

tests/test_dashboards.py starts the same site to check the dashboards' metric names against a scrape.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dataplane"))

import yaml
from prometheus_client.parser import text_string_to_metric_families

from apigw.testkit import route
from apigw.testkit.process import BackendProcess, GatewayProcess, http_status, ports
from apigw.testkit.redis import RedisServer, free_port
from apigw.testkit.tokens import SigningKey

WINDOW = 3
"""Scrapes a rate spans (the dashboard's `rate(...[$__rate_interval])`)."""


@dataclass
class Site:
    gateway: GatewayProcess
    redis: RedisServer
    tokens: dict[str, str]
    """Authorization header by kind: good, expired, forged (signed by a key the gateway does not know)."""
    payments_port: int
    """Where the payments backend should listen: nothing does until `run` starts it halfway."""


@contextmanager
def site(directory: Path) -> Iterator[Site]:
    """Redis, an echo backend and a gateway with five routes, each making one kind of traffic."""
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        echo = stack.enter_context(BackendProcess())
        key = SigningKey("ec")
        payments_port = free_port()  # nothing listens yet: 502 backend_unreachable, then 503 circuit_open
        port, metrics_port = ports()
        config = {
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
            "logging": {"access_log": False},
            "redis": {"url": redis.url},
            "auth": {"keys": [{"file": str(key.write_public_pem(directory / "jwt-public-key.pem"))}]},
            "policies": [{"name": "per-client", "requests": 40, "period": "1s"}],
            "routes": [
                route("users", echo.url, match={"path_prefix": "/users"}),
                route("orders", echo.url, match={"path_prefix": "/orders"}, rewrite_prefix="/", ratelimit="per-client"),
                route("accounts", echo.url, match={"path_prefix": "/accounts"}, auth={"required": True}),
                route("reports", echo.url, match={"path_prefix": "/reports"}, rewrite_prefix="/"),
                {"name": "payments", "match": {"path_prefix": "/payments"},
                 "backend": {"service": "payments", "url": f"http://127.0.0.1:{payments_port}",
                             "retries": {"max_retries": 0},
                             "circuit_breaker": {"consecutive_failures": 5, "open_duration": "4s"}}},
            ],
        }
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
        gateway = GatewayProcess(directory / "config.yaml", port, metrics_port)
        gateway.start()
        stack.callback(gateway.stop)
        tokens = {
            "good": f"Bearer {key.token()}",
            "expired": f"Bearer {key.token(ttl=-600)}",
            "forged": f"Bearer {SigningKey('ec').token()}",
        }
        yield Site(gateway, redis, tokens, payments_port)


MIX = [  # (weight, path, token kind or None)
    (40, "/users/1", None),
    (20, "/orders/status/200", None),
    (3, "/orders/status/503", None),
    (12, "/accounts/me", "good"),
    (3, "/accounts/me", None),
    (2, "/accounts/me", "expired"),
    (1, "/accounts/me", "forged"),
    (6, "/reports/slow?s=0.15", None),
    (2, "/payments/charge", None),
]


def load(s: Site, seconds: float, max_requests: int, workers: int = 6, seed: int = 1) -> dict[int, int]:
    """The mixed load, bounded in time and count; the statuses seen, counted."""
    weights, requests = [w for w, *_ in MIX], [(p, k) for _, p, k in MIX]
    deadline, statuses, lock = time.monotonic() + seconds, defaultdict(int), threading.Lock()
    counter = itertools.count()

    def worker(n: int) -> None:
        rng = random.Random(seed + n)
        while time.monotonic() < deadline and next(counter) < max_requests:
            path, kind = rng.choices(requests, weights)[0]
            status = http_status(s.gateway.url + path, {"Authorization": s.tokens[kind]} if kind else None)
            with lock:
                statuses[status] += 1

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))
    return dict(statuses)


@dataclass
class Scrapes:
    """Each scrape's samples as {(name, labels): value}, with its time."""

    times: list[float] = field(default_factory=list)
    samples: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.times.append(time.monotonic())
        self.samples.append({
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
        })

    def series(self, name: str, by: str, where: dict[str, str] | None = None) -> dict[str, list[float]]:
        """`sum by (by) (name{where})` at each scrape."""
        out: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(self.samples))
        for i, samples in enumerate(self.samples):
            for (sample, labels), value in samples.items():
                labels_ = dict(labels)
                if sample == name and all(_matches(labels_.get(k, ""), v) for k, v in (where or {}).items()):
                    out[labels_.get(by, "")][i] += value
        return dict(out)

    def rate(self, name: str, by: str, where: dict[str, str] | None = None) -> dict[str, list[float]]:
        """Per second over the last WINDOW scrapes (NaN before there are that many)."""
        return {key: [self._per_second(values, i) for i in range(len(values))]
                for key, values in self.series(name, by, where).items()}

    def _per_second(self, values: list[float], i: int) -> float:
        if i < WINDOW:
            return math.nan
        return (values[i] - values[i - WINDOW]) / (self.times[i] - self.times[i - WINDOW])

    def quantile(self, q: float, histogram: str, by: str) -> dict[str, list[float]]:
        """`histogram_quantile(q, sum by (le, by) (rate(histogram_bucket[window])))` for each `by` value."""
        buckets: dict[str, dict[float, list[float]]] = defaultdict(dict)
        for i, samples in enumerate(self.samples):
            for (sample, labels), value in samples.items():
                if sample == f"{histogram}_bucket":
                    labels_ = dict(labels)
                    per_le = buckets[labels_.get(by, "")].setdefault(float(labels_["le"]), [0.0] * len(self.samples))
                    per_le[i] += value
        return {key: [_bucket_quantile(q, {le: self._per_second(v, i) for le, v in per_le.items()})
                      for i in range(len(self.samples))]
                for key, per_le in buckets.items()}


def _matches(value: str, pattern: str) -> bool:
    """A label matcher as the dashboards write them: a regex, or `!~regex`."""
    if pattern.startswith("!~"):
        return re.fullmatch(pattern[2:], value) is None
    return re.fullmatch(pattern, value) is not None


def _bucket_quantile(q: float, rates: dict[float, float]) -> float:
    """Prometheus's histogram_quantile on cumulative bucket rates: linear inside the bucket."""
    les = sorted(rates)
    if not les or any(math.isnan(rates[le]) for le in les) or rates[les[-1]] <= 0:
        return math.nan
    rank, lower, below = q * rates[les[-1]], 0.0, 0.0
    for le in les:
        if rates[le] >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(rates[le] - below, 1e-12)
        lower, below = le, rates[le]
    return math.nan


def run(seconds: float, max_requests: int, every: float, directory: Path) -> tuple[Scrapes, dict[int, int]]:
    """The load, with the payments backend down for its first half and started then; scraped meanwhile."""
    scrapes = Scrapes()
    with site(directory) as s, ExitStack() as payments:
        recover_at = time.monotonic() + seconds / 2
        done = threading.Event()
        statuses: dict[int, int] = {}

        def drive() -> None:
            statuses.update(load(s, seconds, max_requests))
            done.set()

        threading.Thread(target=drive, daemon=True).start()
        scrapes.add(s.gateway.metrics())
        while not done.wait(every):
            scrapes.add(s.gateway.metrics())
            if recover_at and time.monotonic() >= recover_at:
                payments.enter_context(BackendProcess(s.payments_port))
                recover_at = 0.0
        scrapes.add(s.gateway.metrics())
    return scrapes, statuses


def render(scrapes: Scrapes, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [x - scrapes.times[0] for x in scrapes.times]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    fig.suptitle(f"API Gateway dashboard, main panels: a real gateway's /metrics under {t[-1]:.0f} s of mixed load "
                 "(payments backend down for the first half)", fontsize=13)

    def draw(ax: Any, title: str, lines: dict[str, list[float]], unit: str = "",
             threshold: tuple[float, str] | None = None) -> None:
        for name, values in sorted(lines.items()):
            if not any(v for v in values if not math.isnan(v)):
                continue  # series the gateway exports at zero (every auth error type) stay off the picture
            ax.plot(t, values, label=name or "(none)", linewidth=1.6)
        if threshold:
            ax.axhline(threshold[0], color="red", linestyle="--", linewidth=1.2, label=threshold[1])
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("seconds")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")

    requests = scrapes.rate("gateway_http_requests_total", "route")
    draw(axes[0][0], "Request rate by route", requests, "requests/s")

    errors = scrapes.rate("gateway_http_requests_total", "route", {"status_code": "5.."})
    ratio = {r: [e / a if a else math.nan for e, a in zip(v, requests[r])] for r, v in errors.items()}
    all_errors = [sum(x) for x in zip(*errors.values())]
    all_requests = [sum(x) for x in zip(*requests.values())]
    ratio["all routes (alert)"] = [e / a if a else math.nan for e, a in zip(all_errors, all_requests)]
    draw(axes[0][1], "5xx error ratio", ratio, "share of responses", (0.05, "APIGatewayHighErrorRate: 5%"))

    p99 = scrapes.quantile(0.99, "gateway_http_request_duration_seconds", "route")
    draw(axes[0][2], "Latency p99 by route", p99, "seconds")

    backend = scrapes.rate("gateway_backend_requests_total", "backend_service", {"status_code": "!~[1-4].."})
    draw(axes[1][0], "Backend errors by backend_service", backend, "errors/s")

    auth = scrapes.rate("gateway_auth_attempts_total", "error_type", {"result": "failure"})
    draw(axes[1][1], "Token check failures by error_type", auth, "failures/s")

    states = scrapes.series("gateway_circuit_breaker_state", "backend_service")
    ax = axes[1][2]
    for offset, (name, values) in enumerate(sorted(states.items())):
        ax.step(t, [v + offset * 0.04 for v in values], where="post", label=name, linewidth=1.6)
    ax.set_yticks([0, 1, 2], ["closed", "open", "half-open"])
    ax.set_title("Circuit breaker state by backend_service", fontsize=11)
    ax.set_xlabel("seconds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--max-requests", type=int, default=40_000)
    parser.add_argument("--every", type=float, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="apigw-dashboard-") as directory:
        started = time.monotonic()
        scrapes, statuses = run(min(args.seconds, 60), args.max_requests, args.every, Path(directory))
        took = time.monotonic() - started
    print(f"{sum(statuses.values())} requests in {took:.1f} s, {len(scrapes.times)} scrapes; statuses: "
          + ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items())))
    render(scrapes, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
