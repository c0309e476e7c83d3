"""The CRDs on a real API server: the shipped examples, printer columns, and what happens to unknown fields."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from apigw.config.model import Policy, Route
from tests.cluster.controlplane import ROOT, ControlPlane
from tests.cluster.objects import (
    conditions,
    create,
    gatewayroute,
    namespace,
    path_of,
    ratelimitpolicy,
    route_names,
    summary,
    table,
)
from tests.cluster.parts import wait_for

EXAMPLES = sorted((ROOT / "crds/examples").glob("*.yaml"))


def test_examples_apply_and_print_their_columns(cluster: ControlPlane, operators) -> None:
    namespace(cluster, "shop")
    operators()
    applied = cluster.kubectl("apply", "-f", str(ROOT / "crds/examples")).stdout
    assert all(f"{yaml.safe_load(p.read_text())['metadata']['name']} created" in applied for p in EXAMPLES), applied
    orders = yaml.safe_load((ROOT / "crds/examples/gatewayroute-orders.yaml").read_text())
    # kubectl applies the route before its policy: wait for the pass that saw both.
    wait_for(lambda: summary(cluster, orders).get("ResolvedRefs") == ("True", "ResolvedRefs"), what="orders accepted")

    routes = cluster.kubectl("get", "gatewayroutes", "-n", "shop").stdout
    assert routes.splitlines()[0].split() == [
        "NAME", "HOST", "PATH", "BACKEND", "ENABLED", "ACCEPTED", "PROGRAMMED", "REASON", "AGE"]
    row = table(routes)["orders"]
    assert (row["HOST"], row["PATH"], row["BACKEND"]) == ("api.example.com", "/orders", "http://orders.shop.svc.cluster.local:8080")
    assert (row["ENABLED"], row["ACCEPTED"], row["PROGRAMMED"]) == ("true", "True", "False")  # no gateway pods here
    assert row["REASON"] == summary(cluster, orders)["Programmed"][1]  # why not: the first False condition's reason
    assert table(routes)["status-page"]["PATH"] == "/status"  # an exact path, in the same column

    policies = cluster.kubectl("get", "ratelimitpolicies", "-n", "shop").stdout
    assert policies.splitlines()[0].split() == ["NAME", "REQUESTS", "PERIOD", "KEY", "ACCEPTED", "PROGRAMMED", "REASON", "AGE"]
    assert {k: table(policies)["per-user"][k] for k in ("REQUESTS", "PERIOD", "KEY")} == {"REQUESTS": "1000", "PERIOD": "1h", "KEY": "claim"}
    everything = cluster.kubectl("get", "apigw", "-n", "shop", "-o", "name").stdout.split()
    assert sorted(everything) == sorted(
        f"{'gatewayroute' if 'gatewayroute' in p.name else 'ratelimitpolicy'}.gateway.apigw.io/"
        f"{yaml.safe_load(p.read_text())['metadata']['name']}" for p in EXAMPLES
    )
    assert route_names(cluster) == ["shop.orders", "shop.status-page"]


def test_unknown_field_is_refused_by_kubectl_and_pruned_for_other_clients(cluster: ControlPlane, operators) -> None:
    namespace(cluster, "typo")
    create(cluster, ratelimitpolicy("per-client", "typo"))
    typo = gatewayroute("orders", "typo", "/orders", ratelimt="per-client")

    refused = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(typo), check=False)
    assert refused.returncode == 1 and 'unknown field "spec.ratelimt"' in refused.stderr, refused.stderr

    warnings: list[str] = []  # a client that asks for no field validation: the server warns and prunes
    cluster.api.request("POST", "/apis/gateway.apigw.io/v1alpha1/namespaces/typo/gatewayroutes", typo, warnings=warnings)
    assert any(w.startswith('299 ') and 'unknown field' in w and 'spec.ratelimt' in w for w in warnings), warnings
    stored = cluster.kubectl("get", "gatewayroute", "orders", "-n", "typo", "-o", "yaml").stdout
    assert "ratelimt" not in stored

    operators()
    wait_for(lambda: summary(cluster, typo).get("Accepted") == ("True", "Accepted"), what="the pruned route accepted")
    refs = conditions(cluster, typo)["ResolvedRefs"]
    assert refs["status"] == "True" and "not rate limited" in refs["message"], refs
    assert "not rate limited" in cluster.kubectl("describe", "gatewayroute", "orders", "-n", "typo").stdout


def test_crds_are_structural_and_server_side_appliable(cluster: ControlPlane) -> None:
    crds = sorted((ROOT / "crds").glob("*.yaml"))
    for path in crds:
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        found = cluster.api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")["status"]["conditions"]
        assert {c["type"]: c["status"] for c in found} == {"Established": "True", "NamesAccepted": "True"}, found
    reapplied = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds")).stdout
    assert reapplied.count("serverside-applied") == len(crds)  # as GitOps tools apply them


def _route(**spec: object) -> dict:
    return gatewayroute("bad", "cel", "/orders", **spec)


def _policy(**spec: object) -> dict:
    policy = ratelimitpolicy("bad", "cel")
    policy["spec"].update(spec)
    return policy


CEL_CASES = [
    (_route(match={"path": "/a", "path_prefix": "/b"}), "give either match.path or match.path_prefix, not both"),
    (_route(match={"path_prefix": "orders"}), "match.path_prefix must start with /"),
    (_route(match={"path_prefix": "/a//b"}), "match.path_prefix must start with /"),
    (_route(match={"path_prefix": "/a/../b"}), "match.path_prefix must start with /"),
    (_route(match={"path": "/a;x=1"}), "match.path must start with /"),
    (_route(match={}, rewrite_prefix="/v2"), "rewrite_prefix needs match.path or match.path_prefix"),
    (_route(rewrite_prefix="/v2/."), "rewrite_prefix must start with /"),
    (_route(backend={"service": "s", "url": "http://s:80", "tls": {}}), "backend.tls needs an https:// url"),
    (_route(backend={"service": "s", "url": "https://s:443", "tls": {"cert_file": "/c.pem"}}),
     "give backend.tls.cert_file and key_file together"),
    (_route(max_body_size="10MiB junk"), "spec.max_body_size"),
    (_route(match={"host": "api.example.com:8443"}), "spec.match.host in body should match"),
    (_route(match={"host": "api.example.com\n"}), "spec.match.host in body should match"),
    (_policy(key={"type": "client_ip", "name": "x"}), "key type client_ip takes no name"),
    (_policy(key={"type": "header"}), "header and claim keys need one"),
]


def test_what_only_the_model_used_to_catch_is_refused_at_apply(cluster: ControlPlane) -> None:
    """Each CEL rule (and anchored pattern) refuses its case at `kubectl apply`, with its message; and
    the data plane's model refuses the same spec, so the two cannot drift apart."""
    namespace(cluster, "cel")
    for body, message in CEL_CASES:
        refused = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body), check=False)
        assert refused.returncode == 1 and message in refused.stderr, (body["spec"], refused.stderr)
        model = Route if body["kind"] == "GatewayRoute" else Policy
        with pytest.raises(ValidationError):
            model.model_validate({"name": "bad", **body["spec"]})



PATHS = [
    "/", "/a", "/a/", "/a.b", "/.well-known/x", "/~user", "/a%20b", "/%3A", "/%C3%A9", "/%25", "/%25z", "/a=b,c",
    "/%61", "/\u00e9", "/a b", "/%zz", "/%2F", "/%2f", "/a%00", "/%2e%2e/x", "/%3a", "/%7E", "/%2541", "/a%3Bb",
    "/a\tb", "/a\"b", "/a%",
]


def test_a_path_is_admitted_exactly_when_the_model_takes_it(cluster: ControlPlane) -> None:
    """match.path_prefix, match.path and rewrite_prefix: what the API server admits (schema and CEL), the
    data plane takes; the rest is refused at apply, not applied and then only excluded."""
    namespace(cluster, "paths")
    wrong = []
    for path in PATHS:
        for spec in ({"match": {"path_prefix": path}}, {"match": {"path": path}},
                     {"match": {"path_prefix": "/v1"}, "rewrite_prefix": path}):
            body = gatewayroute("p", "paths", "/x")
            body["spec"].update(spec)
            applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(body), check=False)
            try:
                Route.model_validate({"name": "p", **body["spec"]})
                taken = True
            except ValidationError:
                taken = False
            if (applied.returncode == 0) != taken:
                wrong.append((spec, applied.returncode == 0, taken))
    assert wrong == [], "(spec, admitted by the API server, taken by the model)"

def test_defaults_and_columns_answer_why(cluster: ControlPlane) -> None:
    namespace(cluster, "cols")
    policy = ratelimitpolicy("plain", "cols")
    create(cluster, policy)
    assert table(cluster.kubectl("get", "rlp", "-n", "cols").stdout)["plain"]["KEY"] == "client_ip"
    create(cluster, gatewayroute("off", "cols", "/off", enabled=False))
    create(cluster, gatewayroute("on", "cols", "/on"))
    routes = cluster.kubectl("get", "gwr", "-n", "cols").stdout
    assert routes.splitlines()[0].split() == [
        "NAME", "HOST", "PATH", "BACKEND", "ENABLED", "ACCEPTED", "PROGRAMMED", "REASON", "AGE"]
    assert (table(routes)["off"]["ENABLED"], table(routes)["on"]["ENABLED"]) == ("false", "true")


DURATIONS = [  # spec.backend.timeout as written, and what the API server says when it refuses it
    (0.5, None),
    (2, None),
    ("500ms", None),
    (" 1.5h ", None),
    ("0.25", None),
    (0, "spec.backend.timeout in body should be greater than 0"),
    (-1, "spec.backend.timeout in body should be greater than 0"),
    ("0s", "spec.backend.timeout in body should match '[1-9]'"),
    ("5 parsecs", "spec.backend.timeout in body should match"),
    (True, '"spec.backend.timeout" must not validate the schema (not)'),
    ({"a": 1}, "spec.backend.timeout: Too many: 1: must have at most 0 items"),
    ({}, "spec.backend.timeout in body should have at least 1 properties"),
    ([1], "spec.backend.timeout: Too many: 1: must have at most 0 items"),
]


def test_a_duration_is_what_the_model_accepts(cluster: ControlPlane) -> None:
    """A duration as text or as any number: `kubectl apply` accepts exactly what the model accepts."""
    namespace(cluster, "durations")
    for value, message in DURATIONS:
        route = gatewayroute("timed", "durations", "/timed", backend={"service": "timed", "url": "http://timed:80", "timeout": value})
        applied = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(route), check=False)
        try:
            Route.model_validate({"name": "timed", **route["spec"]})
            model = None
        except ValidationError as exc:
            model = exc
        if message is None:
            assert applied.returncode == 0 and model is None, (value, applied.stderr, model)
            stored = cluster.api.get(path_of(route))["spec"]["backend"]["timeout"]
            assert stored == value, (value, stored)  # kept as written: the model reads it
            cluster.kubectl("delete", "gatewayroute", "timed", "-n", "durations")
        else:
            assert applied.returncode == 1 and message in applied.stderr, (value, applied.stderr)
            assert model is not None and "backend.timeout" in str(model), value
    for value in ("3s\v", "\u0663s"):  # Python's \s and \d are Unicode (\v, U+0663 "3"), RE2's ASCII
        route = gatewayroute("timed", "durations", "/timed", backend={"service": "timed", "url": "http://timed:80", "timeout": value})
        applied = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(route), check=False)
        assert applied.returncode == 1 and "spec.backend.timeout in body should match" in applied.stderr, (value, applied.stderr)
        assert Route.model_validate({"name": "timed", **route["spec"]}).backend.timeout == 3.0  # known: the model reads 3 s
    explained = " ".join(cluster.kubectl("explain", "gatewayroutes.spec.backend.timeout").stdout.split())
    assert "A duration: 500ms, 30s, 1m, 1h, or a number of seconds (30, 0.5); more than 0." in explained
