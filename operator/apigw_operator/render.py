"""The pure core: CR bodies and `config.yaml` in, `routes.yaml` text and a verdict per CR out.

Every check is the data plane's own: each CR's spec is validated with the config model
(`apigw.config.model`), and the rendered whole once with `apigw.config.loader.parse_documents`, so a CR the operator
accepts is a CR the gateway loads. CRs are handled oldest first (creationTimestamp, then namespace/name):
in a conflict the older one keeps its place, the newer one is excluded, and both are told who won.

The platform team's rules (`ownership` in config.yaml, see `apigw_operator.ownership`) decide which
namespaces' routes may claim which hosts and paths. A route whose current version is not accepted keeps
serving its last accepted one (`status.lastAccepted`, written by the reconciler), re-judged by every
rule, so its traffic never moves to another route because its own CR broke.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ValidationError

from apigw.config.errors import ConfigError
from apigw.config.loader import CLUSTER_SETTINGS, GLOBAL_FILE, ROUTES_FILE, check_models, parse_documents
from apigw.config.model import Config, Policy, Route, RoutesDocument, config_hash, restart_settings
from apigw_operator.crds import LAST_ACCEPTED
from apigw_operator.ownership import reference_refused, route_refused

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
_ORDER = ", which wins: config.yaml's routes first, then CRs oldest first (creationTimestamp, then namespace/name)"
_NO_KEY = "the route checks tokens, but no key is configured (auth.keys or auth.jwks_file in config.yaml)"
# `routes.yaml:12: routes[3].match: ...` -> which item, and the rest of the message.
_LOCATED = re.compile(rf"^{re.escape(ROUTES_FILE)}(?::\d+)?: (routes|policies)\[(\d+)\]\.?(\S*): (.*)$", re.S)


Labels = Mapping[str, Mapping[str, str]]
"""Namespace name -> its labels."""


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
    generation: int | None = None
    """The generation it speaks of when not the CR's current one (its last accepted version)."""


@dataclass(frozen=True)
class Verdict:
    """What became of one CR: `included` means routes.yaml holds it, as it is now (`current`) or, for a
    route whose current version is not accepted, as it was last accepted (`fallback`)."""

    accepted: Condition
    resolved_refs: Condition
    fallback: bool = False
    last_accepted: Mapping[str, Any] | None = None
    """What the route's `status.lastAccepted` holds: generation, spec, and the policy it used then."""
    disabled: bool = False
    """The version in routes.yaml has `enabled: false`."""

    @property
    def current(self) -> bool:
        return bool(self.accepted.status and self.resolved_refs.status)

    @property
    def included(self) -> bool:
        return self.current or self.fallback


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
        self._checked: dict[tuple[Ref, bool], tuple[tuple[bytes, bool], _Checked]] = {}
        """(CR, its last accepted version?) -> (its spec, auth keys configured?) and the verdict on it."""
        self._fragments: dict[str, str] = {}
        """Entry digest -> the entry as a YAML list item, for the entries of the last pass."""
        self._whole: tuple[tuple[str, str], tuple[str, str]] | None = None
        """(config.yaml, routes.yaml) last validated whole -> (config hash, restart hash): a resync parses nothing."""
        self._base: tuple[str, Config] | None = None
        """The last valid config.yaml and its model: CRs are judged against it while config.yaml is broken."""

    def render(
        self,
        routes: Iterable[Mapping[str, Any]],
        policies: Iterable[Mapping[str, Any]],
        config_yaml: str,
        namespaces: Labels | None = None,
    ) -> Rendering:
        """Render and validate all CRs against `config.yaml` (the ConfigMap's hand-owned key); `namespaces`
        (name -> labels) serves the ownership rules that select namespaces by label."""
        try:
            self._base = (config_yaml, parse_documents({GLOBAL_FILE: config_yaml}))
            base_errors: list[str] = []
        except ConfigError as exc:
            base_errors = exc.errors
        base_yaml, base = self._base or ("", Config())
        bodies = [(POLICY, b) for b in policies] + [(ROUTE, b) for b in routes]
        items = {ref_of(kind, b): b for kind, b in sorted(bodies, key=lambda kb: _age(kb[1]))}
        self._checked = {key: found for key, found in self._checked.items() if key[0] in items}
        vetoed: dict[tuple[Ref, bool], str] = {}
        while True:
            decision = _Pass(self._check, base, namespaces or {}, items, vetoed).decide()
            verdicts, entries = decision.verdicts, decision.entries
            included = list(entries)
            digests = {ref: entry_digest(entries[ref]) for ref in included}
            fragments = self._dump(entries, digests)
            text = document_text(*fragments)
            if base_errors:
                return Rendering(text, verdicts, errors=base_errors, digests=digests, unjudged=self._base is None)
            if self._whole is not None and self._whole[0] == (base_yaml, text):
                hashes = self._whole[1]
                return Rendering(text, verdicts, config_hash=hashes[0], restart_hash=hashes[1], digests=digests, items=fragments)
            try:
                config = check_models({GLOBAL_FILE: base, ROUTES_FILE: _document(decision.models, included)}).result()
            except ConfigError as exc:
                # What the index does not know (a new check in the data plane): one culprit at a time.
                culprit = _first_located(exc.errors, included)
                if culprit is None:
                    return Rendering(text, verdicts, errors=exc.errors, digests=digests)
                ref, message = culprit
                vetoed[ref, ref in decision.fallbacks] = message
                continue
            hashes = config_hash(config), text_hash(json.dumps(restart_settings(config), sort_keys=True, default=str))
            self._whole = ((base_yaml, text), hashes)
            return Rendering(text, verdicts, config_hash=hashes[0], restart_hash=hashes[1], digests=digests, items=fragments)

    def _check(self, ref: Ref, spec: Any, has_keys: bool, fallback: bool) -> _Checked:
        key = (canonical(spec), has_keys)
        known = self._checked.get((ref, fallback))
        if known is not None and known[0] == key:
            return known[1]
        found = _check(ref, spec, has_keys)
        self._checked[ref, fallback] = (key, found)
        return found

    def _dump(self, entries: Mapping[Ref, dict[str, Any]], digests: Mapping[Ref, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The routes' and the policies' YAML list items: one remembered dump per entry."""
        fragments = {d: self._fragments.get(d) or _dump_item(entries[ref]) for ref, d in digests.items()}
        self._fragments = fragments
        routes = tuple(fragments[d] for ref, d in digests.items() if ref.kind == ROUTE)
        return routes, tuple(fragments[d] for ref, d in digests.items() if ref.kind == POLICY)


def render(
    routes: Iterable[Mapping[str, Any]],
    policies: Iterable[Mapping[str, Any]],
    config_yaml: str,
    namespaces: Labels | None = None,
) -> Rendering:
    """One rendering with nothing remembered."""
    return Renderer().render(routes, policies, config_yaml, namespaces)


def _age(body: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return meta.get("creationTimestamp") or "", meta["namespace"], meta["name"]


def _check(ref: Ref, spec: Any, has_keys: bool) -> _Checked:
    """The CR as a routes.yaml entry, or the reason it is invalid on its own: with config.yaml's global
    settings (a route that checks tokens needs auth keys), without its routes (those are conflicts)."""
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


@dataclass
class _Decision:
    verdicts: dict[Ref, Verdict] = field(default_factory=dict)
    entries: dict[Ref, dict[str, Any]] = field(default_factory=dict)
    """What routes.yaml holds, by CR (a policy kept for a route's last accepted version has no CR)."""
    fallbacks: set[Ref] = field(default_factory=set)
    """Entries that are a last accepted version (of a route, or of the policy it used then)."""
    models: dict[Ref, Route | Policy] = field(default_factory=dict)
    """Each entry as the model it was validated into (what the whole is checked from)."""


class _Pass:
    """One decision over every CR: policies, then routes oldest first, each as it is now or else as it
    was last accepted (so that a broken route keeps its traffic and never hands it to another)."""

    def __init__(
        self,
        check: Callable[[Ref, Any, bool, bool], _Checked],
        base: Config,
        labels: Labels,
        items: Mapping[Ref, Mapping[str, Any]],
        vetoed: Mapping[tuple[Ref, bool], str],
    ):
        self.check = check
        self.has_keys = bool(base.auth.keys or base.auth.jwks_file)
        self.ownership = base.ownership
        self.labels = labels
        self.items = items
        self.vetoed = vetoed
        self.claims = _Claims(base)
        self.done = _Decision()
        self.beaten: dict[Ref, list[Ref]] = {}
        """Winner -> the CRs it won conflicts against."""

    def decide(self) -> _Decision:
        for ref, body in self.items.items():
            if ref.kind == POLICY:
                self._policy(ref, body)
        for ref, body in self.items.items():
            if ref.kind == ROUTE:
                self._route(ref, body)
        for winner, losers in self.beaten.items():
            verdict = self.done.verdicts[winner]
            accepted = replace(verdict.accepted, message=f"{verdict.accepted.message}; {_wins_over(losers)}")
            self.done.verdicts[winner] = replace(verdict, accepted=accepted)
        return self.done

    def _policy(self, ref: Ref, body: Mapping[str, Any]) -> None:
        found = self.check(ref, body.get("spec"), self.has_keys, False)
        refused = self._refused(ref, found, False) or self._claim(ref, found, False)
        accepted = refused or Condition("Accepted", True, "Accepted", f"valid (config name {ref.config_name!r})")
        self.done.verdicts[ref] = Verdict(accepted, Condition("ResolvedRefs", True, "ResolvedRefs", _NO_REFERENCE[POLICY]))
        if refused is None:
            assert isinstance(found.model, Policy)
            self.done.entries[ref] = dict(found.entry or {})
            self.done.models[ref] = found.model

    def _route(self, ref: Ref, body: Mapping[str, Any]) -> None:
        spec = body.get("spec")
        found = self.check(ref, spec, self.has_keys, False)
        refs, policy = self._reference(ref, spec.get("ratelimit") if isinstance(spec, Mapping) else None)
        refused = self._refused(ref, found, False)
        if refused is None and refs.status:
            refused = self._claim(ref, found, False)
        accepted = refused or _accepted(found, ref)
        kept = _last_accepted(body)
        if refused is None and refs.status:
            self._include(ref, found, policy, fallback=False)
            snapshot = self._snapshot(body, kept, policy)
            self.done.verdicts[ref] = Verdict(accepted, refs, last_accepted=snapshot, disabled=found.entry.get("enabled") is False)
            return
        entry = self._fallback(ref, kept) if kept is not None else None
        disabled = entry is not None and entry.get("enabled") is False
        self.done.verdicts[ref] = Verdict(accepted, refs, fallback=entry is not None, last_accepted=kept, disabled=disabled)

    def _refused(self, ref: Ref, found: _Checked, fallback: bool) -> Condition | None:
        """Why this version of the CR may not be in routes.yaml, on its own and by the platform's rules."""
        if found.problem is not None:
            return Condition("Accepted", False, "Invalid", found.problem)
        vetoed = self.vetoed.get((ref, fallback))
        if vetoed is not None:
            return Condition("Accepted", False, "Conflicted", vetoed)
        if isinstance(found.model, Route):
            rule = route_refused(self.ownership, ref.namespace, self._labels(ref.namespace), found.model)
            if rule is not None:
                return Condition("Accepted", False, "NotAllowed", rule)
        return None

    def _claim(self, ref: Ref, found: _Checked, fallback: bool) -> Condition | None:
        assert found.model is not None
        noun = "route" if ref.kind == ROUTE else "policy"
        version = ", its last accepted version" if fallback else ""
        conflict = self.claims.take(found.model, f"{noun} {ref.config_name!r} ({ref.kind} {ref.namespace}/{ref.name}{version})", ref)
        if conflict is None:
            return None
        message, winner = conflict
        if winner is not None and ref not in self.beaten.setdefault(winner, []):
            self.beaten[winner].append(ref)
        return Condition("Accepted", False, "Conflicted", message)

    def _reference(self, ref: Ref, wanted: Any) -> tuple[Condition, Ref | None]:
        """The route's `spec.ratelimit` as it is now, resolved: to an accepted policy it may use, or why not."""
        if wanted is None:
            return Condition("ResolvedRefs", True, "ResolvedRefs", _NO_REFERENCE[ROUTE]), None
        policy = _policy_ref(ref, str(wanted))
        refused = reference_refused(self.ownership, ref.namespace, self._labels(ref.namespace), policy.namespace, policy.name)
        if refused is not None:
            return Condition("ResolvedRefs", False, "RefNotPermitted", refused), None
        if policy not in self.items:
            return Condition("ResolvedRefs", False, "PolicyNotFound", f"RateLimitPolicy {wanted!r} not found in namespace {policy.namespace!r}"), None
        verdict = self.done.verdicts[policy]
        if not verdict.current:
            return Condition("ResolvedRefs", False, "PolicyNotAccepted", f"RateLimitPolicy {wanted!r} is not accepted: {verdict.accepted.message}"), None
        return Condition("ResolvedRefs", True, "ResolvedRefs", f"RateLimitPolicy {wanted!r} resolved"), policy

    def _fallback(self, ref: Ref, kept: Mapping[str, Any]) -> dict[str, Any] | None:
        """The route as it was last accepted, if that version still passes every rule: included, else None."""
        found = self.check(ref, kept["spec"], self.has_keys, True)
        if self._refused(ref, found, True) is not None:
            return None
        wanted = kept["spec"].get("ratelimit")
        policy, kept_policy = (None, None) if wanted is None else self._kept_policy(ref, _policy_ref(ref, str(wanted)), kept)
        if wanted is not None and policy is None:
            return None
        if self._claim(ref, found, True) is not None:
            return None
        if kept_policy is not None:
            assert policy is not None
            self.claims.names["policy", policy.config_name] = (f"policy {policy.config_name!r} (kept for GatewayRoute {ref.namespace}/{ref.name})", None)
            self.done.entries[policy] = kept_policy
            self.done.models[policy] = Policy.model_validate(kept_policy)
            self.done.fallbacks.add(policy)
        return self._include(ref, found, policy, fallback=True)

    def _kept_policy(self, ref: Ref, policy: Ref, kept: Mapping[str, Any]) -> tuple[Ref | None, dict[str, Any] | None]:
        """The policy a route's last accepted version uses: as it is now if accepted, else as it was then
        (a new entry to add); (None, None) if neither may be used."""
        if reference_refused(self.ownership, ref.namespace, self._labels(ref.namespace), policy.namespace, policy.name):
            return None, None
        if policy in self.done.entries:  # accepted as it is now, or kept already for an older route
            return policy, None
        then = kept.get("policy") or {}
        if (then.get("namespace"), then.get("name")) != (policy.namespace, policy.name) or (policy, True) in self.vetoed:
            return None, None
        entry = {"name": policy.config_name, **(then.get("spec") or {})}
        try:
            Policy.model_validate(entry)
        except ValidationError:
            return None, None
        if ("policy", policy.config_name) in self.claims.names:
            return None, None
        return policy, entry

    def _include(self, ref: Ref, found: _Checked, policy: Ref | None, fallback: bool) -> dict[str, Any]:
        assert found.entry is not None and isinstance(found.model, Route)
        entry, model = dict(found.entry), found.model
        if policy is not None:
            entry["ratelimit"] = policy.config_name
            model = model.model_copy(update={"ratelimit": policy.config_name})
        self.done.entries[ref] = entry
        self.done.models[ref] = model
        if fallback:
            self.done.fallbacks.add(ref)
        return entry

    def _snapshot(self, body: Mapping[str, Any], kept: Mapping[str, Any] | None, policy: Ref | None) -> Mapping[str, Any]:
        """status.lastAccepted for a route accepted as it is now. The policy's spec is taken when the
        route's own version changes, not at each edit of the policy (one policy edit rewrites no route)."""
        generation = body["metadata"].get("generation")
        same_policy = (policy is None and kept is not None and "policy" not in kept) or (
            policy is not None and kept is not None
            and ((kept.get("policy") or {}).get("namespace"), (kept.get("policy") or {}).get("name")) == (policy.namespace, policy.name)
        )
        if kept is not None and kept.get("spec") == body["spec"] and kept.get("generation") == generation and same_policy:
            return kept
        snapshot: dict[str, Any] = {"generation": generation, "spec": body["spec"]}
        if policy is not None:
            snapshot["policy"] = {"namespace": policy.namespace, "name": policy.name, "spec": self.items[policy]["spec"]}
        return snapshot

    def _labels(self, namespace: str) -> Mapping[str, str]:
        return self.labels.get(namespace) or {}


def _accepted(found: _Checked, ref: Ref) -> Condition:
    if isinstance(found.model, Route) and not found.model.enabled:
        return Condition("Accepted", True, "Accepted", f"valid, disabled by spec.enabled: false (config name {ref.config_name!r})")
    return Condition("Accepted", True, "Accepted", f"valid (config name {ref.config_name!r})")


def _wins_over(losers: list[Ref]) -> str:
    named = ", ".join(f"{r.kind} {r.namespace}/{r.name}" for r in losers[:3])
    more = f" and {len(losers) - 3} more" if len(losers) > 3 else ""
    return f"wins, as the older, its conflicts with {named}{more}"


def _policy_ref(ref: Ref, wanted: str) -> Ref:
    """`spec.ratelimit`: `name` in the route's namespace, or `namespace/name`."""
    namespace, _, name = wanted.rpartition("/")
    return Ref(POLICY, namespace or ref.namespace, name)


def _last_accepted(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    kept = (body.get("status") or {}).get(LAST_ACCEPTED)
    return kept if isinstance(kept, Mapping) and isinstance(kept.get("spec"), Mapping) else None


Owner = tuple[str, "Ref | None"]
"""Who holds a claim: how to name it in a message, and its CR (None for config.yaml's own)."""


class _Claims:
    """What config.yaml and the CRs judged so far hold: names, backend services, (host, path, method)."""

    def __init__(self, base: Config):
        self.names: dict[tuple[str, str], Owner] = {}
        self.backends: dict[str, tuple[dict[str, Any], Owner]] = {}
        self.matches: dict[tuple[Any, ...], Owner] = {}
        for i, policy in enumerate(base.policies):
            self.names.setdefault(("policy", policy.name), (f"policy {policy.name!r} (config.yaml policies[{i}])", None))
        for i, route in enumerate(base.routes):
            self.take(route, f"route {route.name!r} (config.yaml routes[{i}])", None)

    def take(self, model: BaseModel, where: str, ref: Ref | None) -> tuple[str, Ref | None] | None:
        """Record what `model` takes, unless something older took part of it: then say what and who
        holds it, and take nothing."""
        owner = (where, ref)
        if isinstance(model, Policy):
            if ("policy", model.name) in self.names:
                holder = self.names["policy", model.name]
                return f"metadata.name: the config name {model.name!r} is already defined by {holder[0]}", holder[1]
            self.names["policy", model.name] = owner
            return None
        assert isinstance(model, Route)
        if ("route", model.name) in self.names:
            holder = self.names["route", model.name]
            return f"metadata.name: the config name {model.name!r} is already defined by {holder[0]}", holder[1]
        backend = model.backend
        cluster = {"url": backend.url, **{s: getattr(backend, s) for s in CLUSTER_SETTINGS}}  # the loader's own list
        first = self.backends.get(backend.service)
        if first is not None and first[0] != cluster:
            (settings, (holder, winner)) = first
            if settings["url"] != cluster["url"]:
                return f"spec.backend.url: backend service {backend.service!r} already has url {settings['url']} in {holder}{_ORDER}", winner
            setting = next(k for k in cluster if cluster[k] != settings[k])
            return (f"spec.backend.{setting}: backend service {backend.service!r} has other {setting} settings in "
                    f"{holder}; routes sharing a backend must give the same{_ORDER}"), winner
        keys = []
        if model.enabled:
            m = model.match
            keys = [(m.host, m.path, m.path_prefix or ("/" if m.path is None else None), method) for method in m.methods or ["*"]]
            for key in keys:
                if key in self.matches:
                    holder, winner = self.matches[key]
                    return f"spec.match: same host, path and method as {holder}{_ORDER}", winner
        self.names["route", model.name] = owner
        self.backends.setdefault(backend.service, (cluster, owner))
        for key in keys:
            self.matches[key] = owner
        return None


def document_text(routes: Iterable[str], policies: Iterable[str], head: str = "") -> str:
    """A routes document as `yaml.dump` writes it, from its entries' list items (`head`: settings before)."""
    sections = []
    for section, items in (("routes", "".join(routes)), ("policies", "".join(policies))):
        sections.append(f"{section}:\n{items}" if items else f"{section}: []\n")
    return HEADER + head + "".join(sections)


def _dump_item(entry: Mapping[str, Any]) -> str:
    """One entry as an item of a block sequence at column 0, as in a mapping's indentless sequence."""
    return yaml.dump([entry], Dumper=_DUMPER, sort_keys=False)


def _document(models: Mapping[Ref, Route | Policy], included: list[Ref]) -> RoutesDocument:
    """routes.yaml as the models its entries were validated into (each route pointed at its policy)."""
    return RoutesDocument.model_construct(
        routes=[models[ref] for ref in included if ref.kind == ROUTE],
        policies=[models[ref] for ref in included if ref.kind == POLICY],
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
