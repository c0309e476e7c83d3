"""The GatewayRoute and RateLimitPolicy CRDs, generated from the data plane's config model.

`crds/*.yaml` are the output of `python -m apigw_operator.crds crds/`; a test regenerates them and
compares, so the API server's validation can never drift from what the data plane accepts. The
model stays the authority: the operator validates every CR with it, the CRD schema is a first filter
that makes `kubectl apply` fail early.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from apigw.config import model as config
from apigw.config.model import NamespaceName, Policy, Route

GROUP = "gateway.apigw.io"
LAST_ACCEPTED = "lastAccepted"
"""The GatewayRoute status field keeping its last accepted version (see `apigw_operator.render`)."""
VERSION = "v1alpha1"
ROUTES = "gatewayroutes"
POLICIES = "ratelimitpolicies"
CONDITION_TYPES = ("Accepted", "ResolvedRefs", "Programmed")

_KEPT = {
    "type", "properties", "required", "items", "enum", "pattern", "format", "description", "default",
    "x-kubernetes-validations",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "minItems", "maxItems", "anyOf", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "allOf", "not", "minProperties", "maxProperties",
}
_DROPPED = {"$defs", "title", "default", "additionalProperties"}  # k8s prunes unknown fields itself
_BYTE_SIZE = "^\\s*(\\d*\\.?\\d+)\\s*(\\w+)?"
"""pydantic's ByteSize pattern, open at its end: anchored (`10MiB junk` is no size) where it is used."""


_DURATION_MARK = "x-apigw-duration"


class _DurationsAsStrings(GenerateJsonSchema):
    """Durations are float seconds in the model but written `30s` or `500ms` by people."""

    def function_before_schema(self, schema: Any) -> dict[str, Any]:
        if schema["function"].get("function") is config.parse_duration:
            return {_DURATION_MARK: True}  # written out by `duration()` once its bound (gt, ge) is known
        return super().function_before_schema(schema)


def duration(bound: str, limit: float) -> dict[str, Any]:
    """A duration as the model reads it: a string in the model's own syntax (config._DURATION), or a
    number, integer or not (`timeout: 0.5`), within the model's bound (`gt` or `ge` 0); nothing else.

    Kubernetes has no type for "number or string" (`anyOf` of types is int-or-string only, and that
    refuses 0.5), and CEL cannot see a field without a type. So the field is left untyped and each
    JSON Schema keyword does one job, as each applies to its own type only: `pattern` to strings,
    `minimum` to numbers; objects and lists fail one of a contradictory min/max pair, booleans the
    `not`. A string is more than 0 where it has a non-zero digit (its unit has none)."""
    if limit != 0 or bound not in ("gt", "ge"):
        raise ValueError(f"no string form of the duration bound {bound} {limit}")
    node: dict[str, Any] = {
        "description": "A duration: 500ms, 30s, 1m, 1h, or a number of seconds (30, 0.5); "
                       + ("more than 0." if bound == "gt" else "0 or more."),
        "x-kubernetes-preserve-unknown-fields": True,
        "pattern": config._DURATION.pattern,
        **_minimum(limit, exclusive=bound == "gt"),
        "minProperties": 1, "maxProperties": 0,
        "minItems": 1, "maxItems": 0,
        "not": {"enum": [True, False]},
    }
    if bound == "gt":
        node["allOf"] = [{"pattern": "[1-9]"}]
    return node


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema node as a Kubernetes structural schema: refs inlined, nulls dropped."""
    node = dict(node)
    if "$ref" in node:
        node = {**defs[node.pop("$ref").rsplit("/", 1)[1]], **node}
    if node.get("additionalProperties") not in (None, False):
        raise ValueError(f"free-form maps are not supported here: {node}")
    branches = [b for b in node.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        node = {**structural(branches[0], defs), **node}
    elif branches:
        types = sorted(b.get("type") for b in branches)
        if types != ["integer", "string"]:
            raise ValueError(f"Kubernetes allows no union of {types}")
        # The API server allows exactly `anyOf: [{type: integer}, {type: string}]` here; each branch's
        # constraints move up to the node, where they apply to their own type only (pattern: strings,
        # minimum: numbers), as in JSON Schema.
        node["x-kubernetes-int-or-string"] = True
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        for branch in (structural(b, defs) for b in branches):
            node.update({k: v for k, v in branch.items() if k != "type"})
    if node.pop(_DURATION_MARK, False):
        [(bound, limit)] = [(k, node.pop(k)) for k in ("gt", "ge") if k in node]
        what = node.pop("description", "")
        node = {**duration(bound, limit), **node}
        node["description"] = f"{what} {node['description']}".lstrip()
    if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
        node.update(_minimum(node.pop("exclusiveMinimum"), True))
    if "properties" in node:
        node["properties"] = {k: structural(v, defs) for k, v in node["properties"].items()}
    if "items" in node:
        node["items"] = structural(node["items"], defs)
    if node.get("format") == "path":  # pydantic's name for a file path: no OpenAPI format
        del node["format"]
    if node.get("pattern") == _BYTE_SIZE:
        node["pattern"] = _BYTE_SIZE + "\\s*$"
    node = {k: v for k, v in node.items() if k not in _DROPPED}
    unknown = set(node) - _KEPT
    if unknown:
        raise ValueError(f"no structural-schema translation for {sorted(unknown)} in {node}")
    return node


def _minimum(value: float, exclusive: bool) -> dict[str, Any]:
    return {"minimum": value, "exclusiveMinimum": True} if exclusive else {"minimum": value}


_PATH_RULE = (
    "self.startsWith('/') && !self.contains('//') && !self.contains(';') && !self.contains('\\\\')"
    " && !self.matches('(^|/)[.][.]?(/|$)')"
)
_NORMAL_PATH = (
    # apigw.http.target's normal form: raw only what a path may hold raw (no ;), an escape only for what
    # must be escaped, in upper-case hex (never an unreserved character, / or \, a control or ;)
    "^(?:/(?:[A-Za-z0-9._~!$&'()*+,=:@-]|%(?:2[0-9A-C]|3[ACDEF]|40|5[BDE]|60|7[BCD]|[89A-F][0-9A-F]))*)+$"
)
_NORMAL_RULES = [
    (f'self.matches(r"{_NORMAL_PATH}")', ("must be in normal form: escape (%XX, upper-case hex) only what a path "
                                           "may not hold raw, never a letter, digit, -._~, /, \\, ; or a control character")),
    ("!self.matches('%25[0-9A-Fa-f]{2}')", "must not be percent-encoded twice (%25XX)"),
]


def _path_rules(field: str) -> list[tuple[str, str]]:
    return [(_PATH_RULE, f"{field} must start with / and hold no //, no . or .. segment, no ; and no \\")] + [
        (rule, f"{field} {message}") for rule, message in _NORMAL_RULES
    ]


RULES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "GatewayRoute": {
        "": [("!has(self.rewrite_prefix) || (has(self.match) && (has(self.match.path) || has(self.match.path_prefix)))",
              "rewrite_prefix needs match.path or match.path_prefix")],
        "match": [("!(has(self.path) && has(self.path_prefix))", "give either match.path or match.path_prefix, not both")],
        "match.path": _path_rules("match.path"),
        "match.path_prefix": _path_rules("match.path_prefix"),
        "rewrite_prefix": _path_rules("rewrite_prefix"),
        "backend": [("!has(self.tls) || self.url.startsWith('https://')", "backend.tls needs an https:// url")],
        "backend.tls": [("has(self.cert_file) == has(self.key_file)", "give backend.tls.cert_file and key_file together")],
    },
    "RateLimitPolicy": {
        "key": [("self.type == 'client_ip' ? !has(self.name) : (has(self.name) && self.name != '')",
                 "key type client_ip takes no name; header and claim keys need one")],
    },
}
"""CEL rules (`x-kubernetes-validations`) for what the model checks beyond types and patterns, so that
`kubectl apply` refuses such a CR at once; tests/cluster/test_cluster_crds.py applies a CR breaking each
one and checks that the model refuses it too."""
DEFAULTS: dict[str, dict[str, Any]] = {
    "GatewayRoute": {"enabled": True},
    "RateLimitPolicy": {"key": {"type": "client_ip"}, "key.type": "client_ip"},
}
"""Defaults the API server writes into a CR, as the model has them, where they answer what users read
(`kubectl get` columns): whether a route is enabled, the key a policy counts by."""


def spec_schema(model: type[BaseModel], kind: str, descriptions: dict[str, str]) -> dict[str, Any]:
    """The model's schema minus `name` (the CR's own name stands for it), with the kind's CEL rules and
    defaults."""
    raw = model.model_json_schema(schema_generator=_DurationsAsStrings)
    schema = structural(raw, raw.get("$defs", {}))
    schema.pop("description", None)
    del schema["properties"]["name"]
    schema["required"] = [r for r in schema["required"] if r != "name"]
    for field, text in descriptions.items():
        schema["properties"][field]["description"] = text
    for path, rules in RULES[kind].items():
        _at(schema, path)["x-kubernetes-validations"] = [{"rule": rule, "message": message} for rule, message in rules]
    for path, value in DEFAULTS[kind].items():
        _at(schema, path)["default"] = value
    return schema


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in filter(None, path.split(".")):
        node = node["properties"][part]
    return node


def _status_schema(kind: str) -> dict[str, Any]:
    condition = {
        "type": "object",
        "required": ["type", "status", "reason", "message", "lastTransitionTime"],
        "properties": {
            "type": {"type": "string", "enum": list(CONDITION_TYPES)},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
        },
    }
    properties: dict[str, Any] = {
        "conditions": {
            "type": "array",
            "items": condition,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    }
    if kind == "GatewayRoute":
        properties[LAST_ACCEPTED] = _last_accepted_schema()
    return {"type": "object", "properties": properties}


def _last_accepted_schema() -> dict[str, Any]:
    """The operator's durable copy of what a route serves while its current spec is not accepted. Specs
    are kept as written (not pruned by today's schema): each is judged again by the model when used."""
    def spec() -> dict[str, Any]:  # a new dict each time: no YAML anchors in crds/
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

    return {
        "type": "object",
        "description": "The route's last accepted version: served, instead of nothing, while its current spec is not accepted.",
        "properties": {
            "generation": {"type": "integer", "format": "int64", "minimum": 0},
            "spec": spec(),
            "policy": {
                "type": "object",
                "description": "The RateLimitPolicy it used then, as it was then (kept in case the policy is deleted).",
                "properties": {"namespace": {"type": "string"}, "name": {"type": "string"}, "spec": spec()},
            },
        },
    }


def _condition_column(kind: str) -> dict[str, Any]:
    return {"name": kind, "type": "string", "jsonPath": f'.status.conditions[?(@.type=="{kind}")].status'}


def _crd(kind: str, plural: str, short: str, spec: dict[str, Any], columns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["apigw"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        _condition_column("Accepted"),
                        _condition_column("Programmed"),
                        {"name": "Reason", "type": "string",
                         "jsonPath": '.status.conditions[?(@.status=="False")].reason',
                         "description": "Why not: the reason of the first condition that is False."},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {"spec": spec, "status": _status_schema(kind)},
                        }
                    },
                }
            ],
        },
    }


def gatewayroute_crd() -> dict[str, Any]:
    spec = spec_schema(
        Route, "GatewayRoute",
        {
            "ratelimit": ("The name of a RateLimitPolicy in the same namespace, or namespace/name of one in another "
                          "namespace where config.yaml's ownership.policy_references allows it."),
            "enabled": "false keeps the route in the config but serving no traffic.",
        },
    )
    spec["properties"]["ratelimit"]["pattern"] = _reference_pattern(spec["properties"]["ratelimit"]["pattern"])
    spec["properties"]["match"]["properties"]["host"]["pattern"] = HOST_PATTERN
    columns = [
        {"name": "Host", "type": "string", "jsonPath": ".spec.match.host"},
        {"name": "Path", "type": "string", "jsonPath": ".spec.match['path_prefix','path']",
         "description": "The path prefix, or the exact path."},
        {"name": "Backend", "type": "string", "jsonPath": ".spec.backend.url"},
        {"name": "Enabled", "type": "boolean", "jsonPath": ".spec.enabled"},
    ]
    return _crd("GatewayRoute", ROUTES, "gwr", spec, columns)


_LABEL = "[A-Za-z0-9_][-A-Za-z0-9_]{0,62}"
HOST_PATTERN = rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\.?$"
"""`match.host` as the model takes it (`apigw.http.target.normalize_host`, any case, one trailing dot): no
port, no IPv6 literal, ASCII only."""


def _reference_pattern(name: str) -> str:
    """`name`, or `namespace/name`."""
    namespace = TypeAdapter(NamespaceName).json_schema()["pattern"]
    return f"^({namespace.removeprefix('^').removesuffix('$')}/)?{name.removeprefix('^')}"


def ratelimitpolicy_crd() -> dict[str, Any]:
    columns = [
        {"name": "Requests", "type": "integer", "jsonPath": ".spec.requests"},
        {"name": "Period", "type": "string", "jsonPath": ".spec.period"},
        {"name": "Key", "type": "string", "jsonPath": ".spec.key.type"},
    ]
    return _crd("RateLimitPolicy", POLICIES, "rlp", spec_schema(Policy, "RateLimitPolicy", {}), columns)


def manifests() -> dict[str, str]:
    """File name -> YAML text, as committed under `crds/`."""
    header = "# Generated from dataplane/apigw/config/model.py by `python -m apigw_operator.crds crds/`: do not edit.\n"
    return {
        "gatewayroute.yaml": header + yaml.safe_dump(gatewayroute_crd(), sort_keys=False),
        "ratelimitpolicy.yaml": header + yaml.safe_dump(ratelimitpolicy_crd(), sort_keys=False),
    }


def main(argv: list[str] | None = None) -> None:
    target = Path((argv or sys.argv[1:] or ["crds"])[0])
    for name, text in manifests().items():
        (target / name).write_text(text, encoding="utf-8")
        print(f"wrote {target / name}")


if __name__ == "__main__":
    main()
