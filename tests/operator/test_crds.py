"""The CRDs are generated from the config model, and every example CR passes both the CRD and the model."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from apigw.config.model import Duration, PositiveDuration, RouteMatch
from apigw_operator import crds
from apigw_operator.render import POLICY, ROUTE, render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))
KINDS = {"GatewayRoute": crds.gatewayroute_crd(), "RateLimitPolicy": crds.ratelimitpolicy_crd()}


def schema_of(kind: str) -> dict:
    return KINDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("name", sorted(crds.manifests()))
def test_committed_crd_is_the_generated_one(name: str) -> None:
    committed = (ROOT / "crds" / name).read_text(encoding="utf-8")
    assert committed == crds.manifests()[name], f"crds/{name} is stale: run `python -m apigw_operator.crds crds/`"


def test_schemas_are_structural() -> None:
    """No $ref, every node typed, and anyOf only as the API server's int-or-string form (exactly
    `[{type: integer}, {type: string}]`: a constraint inside a branch makes the CRD non-structural);
    untyped only where a duration is kept as written, with no types inside its validations."""

    def walk(node: dict, where: str) -> None:
        assert "$ref" not in node and "additionalProperties" not in node, where
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True and "type" not in node, where
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], where
        elif node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
            assert "type" not in str([node.get("allOf"), node.get("not")]), where
        else:
            assert "type" in node, where
        for key, child in node.get("properties", {}).items():
            walk(child, f"{where}.{key}")
        if "items" in node:
            walk(node["items"], f"{where}[]")

    for kind in KINDS:
        walk(schema_of(kind), kind)


def test_spec_fields_are_the_model_fields() -> None:
    from apigw.config.model import Policy, Route

    route_spec = schema_of("GatewayRoute")["properties"]["spec"]
    policy_spec = schema_of("RateLimitPolicy")["properties"]["spec"]
    assert set(route_spec["properties"]) == set(Route.model_fields) - {"name"}
    assert set(policy_spec["properties"]) == set(Policy.model_fields) - {"name"}
    assert set(route_spec["properties"]["backend"]["properties"]) == set(Route.model_fields["backend"].annotation.model_fields)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_its_crd(path: Path) -> None:
    body = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert body["apiVersion"] == f"{crds.GROUP}/{crds.VERSION}"
    jsonschema.Draft4Validator(schema_of(body["kind"])).validate(body)


def test_examples_are_accepted_by_the_data_plane_model() -> None:
    bodies = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in EXAMPLES]
    config_yaml = "auth: {keys: [{file: /etc/gateway-secrets/jwt-public-key.pem}]}"  # routes check tokens
    rendering = render(
        [b for b in bodies if b["kind"] == ROUTE], [b for b in bodies if b["kind"] == POLICY], config_yaml
    )
    assert rendering.errors == []
    assert {ref.name: v.included for ref, v in rendering.verdicts.items()} == {
        "orders": True, "status-page": True, "per-client": True, "per-user": True,
    }


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("GatewayRoute", {"match": {"path_prefix": "/x"}}),  # no backend
        ("GatewayRoute", {"backend": {"service": "Bad_Name", "url": "http://x"}}),
        ("GatewayRoute", {"backend": {"service": "x", "url": "http://x", "timeout": "soon"}}),
        ("GatewayRoute", {"backend": {"service": "x", "url": "http://x"}, "match": {"methods": ["FETCH"]}}),
        ("RateLimitPolicy", {"requests": 0, "period": "1m"}),
        ("RateLimitPolicy", {"requests": 5, "period": 0}),
        ("RateLimitPolicy", {"requests": 5, "period": "1m", "key": {"type": "cookie"}}),
    ],
)
def test_crd_rejects_what_the_model_rejects(kind: str, spec: dict) -> None:
    body = {"apiVersion": f"{crds.GROUP}/{crds.VERSION}", "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema_of(kind)).validate(body)


@pytest.mark.parametrize("host", [
    "api.example.com", "Example.COM.", "*.example.com", "*.Example.com.", "10.0.0.1", "_svc.example.com", "a-.b",
    "a.com:80", "ex\u00e4mple.com", "foo bar", "[::1]", "", "*", "*.", "a..b", "-a.com", "a.com..", "*.*.example.com",
    "a.com/x",
])
def test_crd_accepts_a_host_exactly_when_the_model_does(host: str) -> None:
    """What the CRD admits and the data plane refuses is applied, then only excluded: kubectl says nothing.
    (A trailing newline is the API server's to refuse: Python's `$` matches before one, Go's does not.)"""
    try:
        RouteMatch.model_validate({"host": host})
        accepted = True
    except ValidationError:
        accepted = False
    body = {"apiVersion": f"{crds.GROUP}/{crds.VERSION}", "kind": "GatewayRoute", "metadata": {"name": "x"},
            "spec": {"match": {"host": host}, "backend": {"service": "x", "url": "http://x"}}}
    assert jsonschema.Draft4Validator(schema_of("GatewayRoute")).is_valid(body) == accepted, host


DURATION_VALUES = st.one_of(
    st.integers(-10, 10**12), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
    st.from_regex(r"\A\s?-?[0-2]{0,3}(\.[0-2]{0,3})?\s?(ms|s|m|h|d|us|S|)\s?\Z"),  # zeros often
    st.text(max_size=8), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@pytest.mark.parametrize(("model", "bound"), [(PositiveDuration, "gt"), (Duration, "ge")], ids=["gt", "ge"])
@given(value=DURATION_VALUES)
@example(value="0s").via("more than 0: a string of zeros is 0")
@example(value=0.0).via("more than 0")
@example(value={}).via("no object, not even an empty one")
def test_a_duration_schema_accepts_what_the_model_accepts(model: object, bound: str, value: object) -> None:
    """The untyped duration schema and the model's parse_duration agree on any JSON value, valid or
    not (but null: the API server drops a null field before validating, so the model's default
    applies). Python's regex here; the API server's own (RE2) in tests/cluster/test_cluster_crds.py."""
    schema = crds.duration(bound, 0)
    try:
        TypeAdapter(model).validate_python(value)
        accepted = True
    except ValidationError:
        accepted = False
    assert jsonschema.Draft4Validator(schema).is_valid(value) == accepted, (value, schema)
