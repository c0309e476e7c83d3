"""The pure core: CR bodies and `config.yaml` in, `routes.yaml` text and a verdict per CR out.

Every check is the data plane's own: each CR's spec is validated with the config model
(`apigw.config.model`), and the rendered whole once with `apigw.config.loader.parse_documents`, so a CR the operator
accepts is a CR the gateway loads. CRs are handled oldest first (creationTimestamp, then name): in a
conflict the older one keeps its place and the newer one is excluded and told why.

The cost is O(CRs): a `Renderer` remembers each CR's verdict by the content of its spec (a resync
re-checks nothing) and each entry's YAML by its content (an edit dumps one entry), conflicts are found
with one pass over an index of names, matches and backends, and the whole config is validated once,
from the models already validated (`apigw.config.loader.check_models`: the text is not parsed again).
No I/O, no clock: the reconciler runs it in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ValidationError

from apigw.config.errors import ConfigError
from apigw.config.loader import CLUSTER_SETTINGS, GLOBAL_FILE, ROUTES_FILE, check_models, parse_documents
from apigw.config.model import Config, Policy, Route, RoutesDocument, config_hash, restart_settings

ROUTE = "GatewayRoute"
POLICY = "RateLimitPolicy"
MAX_NAME = 63
HEADER = "# Rendered by apigw-operator from GatewayRoute and RateLimitPolicy objects: edits are overwritten.\n"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml where present: ~3x faster
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_NO_REFERENCE = {
    # Also what a route reads when a client's misspelt `ratelimit` was pruned by the API server.
    ROUTE: "spec.ratelimit is not set: requests to this route are not rate limited",
    POLICY: "a policy refers to nothing",
}
_NO_KEY = "the route checks tokens, but no key is configured (auth.keys or auth.jwks_file in config.yaml)"
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

    @property
    def entry_key(self) -> str:
        """Its key in `entry_digests()`."""
        return f"{'routes' if self.kind == ROUTE else 'policies'}/{self.config_name}"


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None
    """None is `Unknown`."""
    reason: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """What became of one CR: `included` means it is in the rendered routes.yaml."""

    accepted: Condition
    resolved_refs: Condition

    @property
    def included(self) -> bool:
        return bool(self.accepted.status and self.resolved_refs.status)


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
    digests: dict[Ref, str] = field(default_factory=dict)
    """Of each included CR's entry in routes_yaml: which configs hold a CR as it is now."""
    unjudged: bool = False
    """config.yaml is invalid and no valid one was seen yet: the verdicts were made without its settings."""
    items: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    """routes_yaml's routes and policies, each as its YAML list item: what shards are made of."""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def canonical(value: Any) -> bytes:
    """JSON with sorted keys: orjson (a tenth of `json`'s cost), `json` for what orjson refuses (huge ints)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str)
    except orjson.JSONEncodeError:
        return json.dumps(value, sort_keys=True, default=str).encode()


def entry_digest(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()[:16]


def entry_digests(*texts: str) -> dict[str, str]:
    """Config name -> entry digest of what routes.yaml and its shards hold (a route and a policy may share a name)."""
    found = {}
    for text in texts:
        document = yaml.load(text, Loader=_LOADER) or {}
        found.update({
            f"{section}/{entry['name']}": entry_digest(entry)
            for section in ("routes", "policies") for entry in document.get(section) or [] if isinstance(entry, dict)
        })
    return found


def ref_of(kind: str, body: Mapping[str, Any]) -> Ref:
    return Ref(kind, body["metadata"]["namespace"], body["metadata"]["name"])


@dataclass(frozen=True)
class _Checked:
    """One CR judged on its own: its routes.yaml entry and model, or why it is invalid."""

    entry: dict[str, Any] | None
    model: Route | Policy | None
    problem: str | None


class Renderer:
    """Renders passes one after another, remembering each CR's own verdict by the content of its spec.

    The key is the spec itself rather than `resourceVersion`: it is never stale, and a status write
    (which moves resourceVersion) costs no re-check.
    """

    def __init__(self) -> None:
        self._checked: dict[Ref, tuple[tuple[bytes, bool], _Checked]] = {}
        self._fragments: dict[str, str] = {}
        """Entry digest -> the entry as a YAML list item, for the entries of the last pass."""
        self._whole: tuple[tuple[str, str], tuple[str, str]] | None = None
        """(config.yaml, routes.yaml) last validated whole -> (config hash, restart hash): a resync parses nothing."""
        self._base: tuple[str, Config] | None = None
        """The last valid config.yaml and its model: CRs are judged against it while config.yaml is broken."""

    def render(
        self, routes: Iterable[Mapping[str, Any]], policies: Iterable[Mapping[str, Any]], config_yaml: str
    ) -> Rendering:
        """Render and validate all CRs against `config.yaml` (the ConfigMap's hand-owned key)."""
        try:
            self._base = (config_yaml, parse_documents({GLOBAL_FILE: config_yaml}))
            base_errors: list[str] = []
        except ConfigError as exc:
            base_errors = exc.errors
        base_yaml, base = self._base or ("", Config())
        has_keys = bool(base.auth.keys or base.auth.jwks_file)
        bodies = [(POLICY, b) for b in policies] + [(ROUTE, b) for b in routes]
        items = {ref_of(kind, b): b for kind, b in sorted(bodies, key=lambda kb: _age(kb[1]))}
        self._checked = {ref: found for ref, found in self._checked.items() if ref in items}
        verdicts: dict[Ref, Verdict] = {}
        checked: dict[Ref, _Checked] = {}
        for ref, body in items.items():
            checked[ref] = self._check(ref, body, has_keys)
            verdicts[ref] = Verdict(
                accepted=_accepted(checked[ref].problem, body, ref),
                resolved_refs=Condition("ResolvedRefs", True, "ResolvedRefs", _NO_REFERENCE[ref.kind]),
            )
        entries = {ref: dict(c.entry) for ref, c in checked.items() if c.entry is not None}
        _find_conflicts(base, checked, verdicts)
        while True:
            _resolve_policies(items, verdicts, entries)
            included = [ref for ref in entries if verdicts[ref].included]
            digests = {ref: entry_digest(entries[ref]) for ref in included}
            items = self._dump(entries, digests)
            text = document_text(*items)
            if base_errors:
                return Rendering(text, verdicts, errors=base_errors, digests=digests, unjudged=self._base is None)
            if self._whole is not None and self._whole[0] == (base_yaml, text):
                hashes = self._whole[1]
                return Rendering(text, verdicts, config_hash=hashes[0], restart_hash=hashes[1], digests=digests, items=items)
            try:
                config = check_models({GLOBAL_FILE: base, ROUTES_FILE: _document(checked, entries, included)}).result()
            except ConfigError as exc:
                # What the index does not know (a new check in the data plane): one culprit at a time.
                culprit = _first_located(exc.errors, included)
                if culprit is None:
                    return Rendering(text, verdicts, errors=exc.errors, digests=digests)
                ref, message = culprit
                verdicts[ref] = Verdict(Condition("Accepted", False, "Conflicted", message), verdicts[ref].resolved_refs)
                continue
            hashes = config_hash(config), text_hash(json.dumps(restart_settings(config), sort_keys=True, default=str))
            self._whole = ((base_yaml, text), hashes)
            return Rendering(text, verdicts, config_hash=hashes[0], restart_hash=hashes[1], digests=digests, items=items)

    def _check(self, ref: Ref, body: Mapping[str, Any], has_keys: bool) -> _Checked:
        key = (canonical(body.get("spec")), has_keys)
        known = self._checked.get(ref)
        if known is not None and known[0] == key:
            return known[1]
        found = _check(ref, body, has_keys)
        self._checked[ref] = (key, found)
        return found

    def _dump(self, entries: Mapping[Ref, dict[str, Any]], digests: Mapping[Ref, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The routes' and the policies' YAML list items: one remembered dump per entry."""
        fragments = {d: self._fragments.get(d) or _dump_item(entries[ref]) for ref, d in digests.items()}
        self._fragments = fragments
        routes = tuple(fragments[d] for ref, d in digests.items() if ref.kind == ROUTE)
        return routes, tuple(fragments[d] for ref, d in digests.items() if ref.kind == POLICY)


def render(routes: Iterable[Mapping[str, Any]], policies: Iterable[Mapping[str, Any]], config_yaml: str) -> Rendering:
    """One rendering with nothing remembered."""
    return Renderer().render(routes, policies, config_yaml)


def _age(body: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return meta.get("creationTimestamp") or "", meta["namespace"], meta["name"]


def _check(ref: Ref, body: Mapping[str, Any], has_keys: bool) -> _Checked:
    """The CR as a routes.yaml entry, or the reason it is invalid on its own: with config.yaml's global
    settings (a route that checks tokens needs auth keys), without its routes (those are conflicts)."""
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        return _Checked(None, None, "spec: required, and must be a mapping")
    if len(ref.config_name) > MAX_NAME:
        problem = f"metadata.name: the config name {ref.config_name!r} (namespace.name) is longer than {MAX_NAME} characters"
        return _Checked(None, None, problem)
    entry = {"name": ref.config_name, **spec}
    alone = {k: v for k, v in entry.items() if k != "ratelimit"}  # references are checked later, by CR name
    try:
        model = (Route if ref.kind == ROUTE else Policy).model_validate(alone)
    except ValidationError:
        # Invalid CRs only: the loader's own words, located, for the same item as a routes.yaml would hold it.
        section = "routes" if ref.kind == ROUTE else "policies"
        try:
            parse_documents({ROUTES_FILE: yaml.dump({section: [alone]}, Dumper=_DUMPER)})
        except ConfigError as exc:
            return _Checked(None, None, "; ".join(_spec_message(e) for e in exc.errors))
        raise  # the model refused what the loader accepts: a bug, not a verdict
    if isinstance(model, Route) and model.enabled and model.auth is not None and not has_keys:
        return _Checked(None, None, f"spec.auth: {_NO_KEY}")
    return _Checked(entry, model, None)


def _accepted(problem: str | None, body: Mapping[str, Any], ref: Ref) -> Condition:
    if problem is not None:
        return Condition("Accepted", False, "Invalid", problem)
    if ref.kind == ROUTE and body["spec"].get("enabled") is False:
        return Condition("Accepted", True, "Accepted", f"valid, disabled by spec.enabled: false (config name {ref.config_name!r})")
    return Condition("Accepted", True, "Accepted", f"valid (config name {ref.config_name!r})")


def _find_conflicts(base: Config, checked: Mapping[Ref, _Checked], verdicts: dict[Ref, Verdict]) -> None:
    """One pass, oldest first, over what config.yaml and the older CRs already hold: a name defined twice,
    a backend service with other settings, a (host, path, method) taken. The newer party is excluded."""
    names: dict[tuple[str, str], str] = {}
    backends: dict[str, tuple[dict[str, Any], str]] = {}
    matches: dict[tuple[Any, ...], str] = {}
    for i, policy in enumerate(base.policies):
        names.setdefault(("policy", policy.name), f"policy {policy.name!r} (config.yaml policies[{i}])")
    for i, route in enumerate(base.routes):
        _claim(route, f"route {route.name!r} (config.yaml routes[{i}])", names, backends, matches)
    for ref, found in checked.items():
        if found.model is None:
            continue
        noun = "route" if ref.kind == ROUTE else "policy"
        where = f"{noun} {ref.config_name!r} ({ref.kind} {ref.namespace}/{ref.name})"
        conflict = _claim(found.model, where, names, backends, matches)
        if conflict is not None:
            verdicts[ref] = Verdict(Condition("Accepted", False, "Conflicted", conflict), verdicts[ref].resolved_refs)


def _claim(
    model: BaseModel,
    where: str,
    names: dict[tuple[str, str], str],
    backends: dict[str, tuple[dict[str, Any], str]],
    matches: dict[tuple[Any, ...], str],
) -> str | None:
    """Record what `model` takes, unless something older took part of it: then say what, and take nothing."""
    if isinstance(model, Policy):
        if ("policy", model.name) in names:
            return f"metadata.name: the config name {model.name!r} is already defined by {names['policy', model.name]}"
        names["policy", model.name] = where
        return None
    assert isinstance(model, Route)
    if ("route", model.name) in names:
        return f"metadata.name: the config name {model.name!r} is already defined by {names['route', model.name]}"
    backend = model.backend
    cluster = {"url": backend.url, **{s: getattr(backend, s) for s in CLUSTER_SETTINGS}}  # the loader's own list
    first = backends.get(backend.service)
    if first is not None and first[0] != cluster:
        if first[0]["url"] != cluster["url"]:
            return f"spec.backend.url: backend service {backend.service!r} already has url {first[0]['url']} in {first[1]}"
        setting = next(k for k in cluster if cluster[k] != first[0][k])
        return (f"spec.backend.{setting}: backend service {backend.service!r} has other {setting} settings in "
                f"{first[1]}; routes sharing a backend must give the same")
    keys = []
    if model.enabled:
        m = model.match
        keys = [(m.host, m.path, m.path_prefix or ("/" if m.path is None else None), method) for method in m.methods or ["*"]]
        for key in keys:
            if key in matches:
                return f"spec.match: same host, path and method as {matches[key]}"
    names["route", model.name] = where
    backends.setdefault(backend.service, (cluster, where))
    for key in keys:
        matches[key] = where
    return None


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


def document_text(routes: Iterable[str], policies: Iterable[str], head: str = "") -> str:
    """A routes document as `yaml.dump` writes it, from its entries' list items (`head`: settings before)."""
    sections = []
    for section, items in (("routes", "".join(routes)), ("policies", "".join(policies))):
        sections.append(f"{section}:\n{items}" if items else f"{section}: []\n")
    return HEADER + head + "".join(sections)


def _dump_item(entry: Mapping[str, Any]) -> str:
    """One entry as an item of a block sequence at column 0, as in a mapping's indentless sequence."""
    return yaml.dump([entry], Dumper=_DUMPER, sort_keys=False)


def _document(checked: Mapping[Ref, _Checked], entries: Mapping[Ref, dict[str, Any]], included: list[Ref]) -> RoutesDocument:
    """routes.yaml as models: each CR's own, pointed at its policy (a name already checked)."""
    models = {}
    for ref in included:
        model = checked[ref].model
        assert model is not None
        wanted = entries[ref].get("ratelimit")
        models[ref] = model.model_copy(update={"ratelimit": wanted}) if wanted is not None else model
    return RoutesDocument.model_construct(
        routes=[m for ref, m in models.items() if ref.kind == ROUTE],
        policies=[m for ref, m in models.items() if ref.kind == POLICY],
    )


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
