"""The pure core: CR bodies and `config.yaml` in, `routes.yaml` text and a verdict per CR out.

Every check is the data plane's own (`apigw.loader.parse_documents`), so a CR the operator accepts is
a CR the gateway loads. CRs are handled oldest first (creationTimestamp, then name): in a conflict the
older one keeps its place and the newer one is excluded and told why. No I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from apigw.config.errors import ConfigError
from apigw.config.loader import GLOBAL_FILE, ROUTES_FILE, parse_documents
from apigw.config.model import config_hash, restart_settings

ROUTE = "GatewayRoute"
POLICY = "RateLimitPolicy"
MAX_NAME = 63
HEADER = "# Rendered by apigw-operator from GatewayRoute and RateLimitPolicy objects: edits are overwritten.\n"

_NO_REFERENCE = {
    # Also what a route reads when a client's misspelt `ratelimit` was pruned by the API server.
    ROUTE: "spec.ratelimit is not set: requests to this route are not rate limited",
    POLICY: "a policy refers to nothing",
}
# `routes.yaml:12: routes[3].match: ...` -> which item, and the rest of the message.
_LOCATED = re.compile(rf"^{re.escape(ROUTES_FILE)}(?::\d+)?: (routes|policies)\[(\d+)\]\.?(\S*): (.*)$", re.S)


@dataclass(frozen=True)
class Ref:
    kind: str
    namespace: str
    name: str

    @property
    def config_name(self) -> str:
        """The name in `routes.yaml`, in metrics (`route` label) and logs: `<namespace>.<name>`."""
        return f"{self.namespace}.{self.name}"


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """What became of one CR: `included` means it is in the rendered routes.yaml."""

    accepted: Condition
    resolved_refs: Condition

    @property
    def included(self) -> bool:
        return self.accepted.status and self.resolved_refs.status


@dataclass(frozen=True)
class Rendering:
    routes_yaml: str
    verdicts: dict[Ref, Verdict]
    config_hash: str | None = None
    """Of config.yaml + routes_yaml as the data plane computes it; None when the whole config is invalid."""
    restart_hash: str | None = None
    """Of the settings the data plane cannot apply live; None when the whole config is invalid."""
    errors: list[str] = field(default_factory=list)
    """Why the whole config is invalid (then routes_yaml must not be written)."""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ref_of(kind: str, body: Mapping[str, Any]) -> Ref:
    return Ref(kind, body["metadata"]["namespace"], body["metadata"]["name"])


def render(routes: Iterable[Mapping[str, Any]], policies: Iterable[Mapping[str, Any]], config_yaml: str) -> Rendering:
    """Render and validate all CRs against `config.yaml` (the ConfigMap's hand-owned key)."""
    try:
        parse_documents({GLOBAL_FILE: config_yaml})
        base_errors: list[str] = []
    except ConfigError as exc:
        base_errors = exc.errors
        config_yaml = ""  # still judge the CRs among themselves
    settings = yaml.safe_load(config_yaml) if config_yaml else None
    settings_yaml = yaml.safe_dump({k: v for k, v in (settings or {}).items() if k not in ("routes", "policies")})
    bodies = [(POLICY, b) for b in policies] + [(ROUTE, b) for b in routes]
    items = {ref_of(kind, b): b for kind, b in sorted(bodies, key=lambda kb: _age(kb[1]))}
    verdicts: dict[Ref, Verdict] = {}
    entries: dict[Ref, dict[str, Any]] = {}
    for ref, body in items.items():
        entry, problem = _entry(ref, body, settings_yaml)
        verdicts[ref] = Verdict(
            accepted=_accepted(problem, body, ref),
            resolved_refs=Condition("ResolvedRefs", True, "ResolvedRefs", _NO_REFERENCE[ref.kind]),
        )
        if entry is not None:
            entries[ref] = entry
    while True:
        _resolve_policies(items, verdicts, entries)
        included = [ref for ref in entries if verdicts[ref].included]
        text = _dump(entries, included)
        try:
            config = parse_documents({GLOBAL_FILE: config_yaml, ROUTES_FILE: text})
        except ConfigError as exc:
            culprit = _first_located(exc.errors, included)
            if culprit is None:
                return Rendering(text, verdicts, errors=base_errors or exc.errors)
            ref, message = culprit
            verdicts[ref] = Verdict(Condition("Accepted", False, "Conflicted", message), verdicts[ref].resolved_refs)
            continue
        if base_errors:
            return Rendering(text, verdicts, errors=base_errors)
        restart = text_hash(json.dumps(restart_settings(config), sort_keys=True, default=str))
        return Rendering(text, verdicts, config_hash=config_hash(config), restart_hash=restart)


def _age(body: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return meta.get("creationTimestamp") or "", meta["namespace"], meta["name"]


def _entry(ref: Ref, body: Mapping[str, Any], settings_yaml: str) -> tuple[dict[str, Any] | None, str | None]:
    """The CR as a routes.yaml entry, or the reason it is invalid on its own: with config.yaml's global
    settings (a route that checks tokens needs auth keys), without its routes (those are conflicts)."""
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        return None, "spec: required, and must be a mapping"
    if len(ref.config_name) > MAX_NAME:
        return None, (
            f"metadata.name: the config name {ref.config_name!r} (namespace.name) is longer than {MAX_NAME} characters"
        )
    entry = {"name": ref.config_name, **spec}
    alone = {k: v for k, v in entry.items() if k != "ratelimit"}  # references are checked next, by CR name
    section = "routes" if ref.kind == ROUTE else "policies"
    try:
        parse_documents({GLOBAL_FILE: settings_yaml, ROUTES_FILE: yaml.safe_dump({section: [alone]})})
    except ConfigError as exc:
        return None, "; ".join(_spec_message(e) for e in exc.errors)
    return entry, None


def _accepted(problem: str | None, body: Mapping[str, Any], ref: Ref) -> Condition:
    if problem is not None:
        return Condition("Accepted", False, "Invalid", problem)
    if ref.kind == ROUTE and body["spec"].get("enabled") is False:
        return Condition("Accepted", True, "Accepted", f"valid, disabled by spec.enabled: false (config name {ref.config_name!r})")
    return Condition("Accepted", True, "Accepted", f"valid (config name {ref.config_name!r})")


def _resolve_policies(
    items: Mapping[Ref, Mapping[str, Any]], verdicts: dict[Ref, Verdict], entries: dict[Ref, dict[str, Any]]
) -> None:
    """Point each route at its policy's config name, or mark its reference unresolved."""
    for ref, body in items.items():
        wanted = (body.get("spec") or {}).get("ratelimit") if ref.kind == ROUTE else None
        if wanted is None:
            continue
        policy = Ref(POLICY, ref.namespace, str(wanted))
        if policy not in verdicts:
            refs = Condition("ResolvedRefs", False, "PolicyNotFound", f"RateLimitPolicy {wanted!r} not found in namespace {ref.namespace!r}")
        elif not verdicts[policy].included:
            why = verdicts[policy].accepted.message
            refs = Condition("ResolvedRefs", False, "PolicyNotAccepted", f"RateLimitPolicy {wanted!r} is not accepted: {why}")
        else:
            refs = Condition("ResolvedRefs", True, "ResolvedRefs", f"RateLimitPolicy {wanted!r} resolved")
            if ref in entries:
                entries[ref]["ratelimit"] = policy.config_name
        verdicts[ref] = Verdict(verdicts[ref].accepted, refs)


def _dump(entries: Mapping[Ref, dict[str, Any]], included: list[Ref]) -> str:
    document = {
        "routes": [entries[r] for r in included if r.kind == ROUTE],
        "policies": [entries[r] for r in included if r.kind == POLICY],
    }
    return HEADER + yaml.safe_dump(document, sort_keys=False)


def _first_located(errors: list[str], included: list[Ref]) -> tuple[Ref, str] | None:
    """The first error that names an item of routes.yaml: that item is the newer party of a conflict."""
    by_section = {
        "routes": [r for r in included if r.kind == ROUTE],
        "policies": [r for r in included if r.kind == POLICY],
    }
    for error in errors:
        match = _LOCATED.match(error)
        if match:
            section, index, path, rest = match.groups()
            return by_section[section][int(index)], _spec_path(path) + ": " + rest
    return None


def _spec_message(error: str) -> str:
    match = _LOCATED.match(error)
    if not match:
        return error
    _, _, path, rest = match.groups()
    return _spec_path(path) + ": " + rest


def _spec_path(path: str) -> str:
    """`backend.url` -> `spec.backend.url`; `name` -> `metadata.name`; the whole item -> `spec`."""
    if path == "name":
        return "metadata.name"
    return f"spec.{path}" if path else "spec"
