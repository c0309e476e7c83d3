"""The platform team's rules (`ownership` in config.yaml): which namespaces' routes may claim which hosts
and paths, which namespaces' policies they may use, and which addresses their backends may not be at.
Pure functions of the rules, a namespace and its labels; each answers None (allowed) or the rule
broken, in words for the CR's status.

Hosts and paths are compared the way the data plane matches requests (`apigw.pipeline.routing`): a
`*.example.com` host covers every subdomain at any depth, and a path prefix covers whole segments.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_address

from apigw.config.model import Ownership, Route, RouteGrant
from apigw.http.networks import denied_network


def route_refused(rules: Ownership, namespace: str, labels: Mapping[str, str], route: Route) -> str | None:
    """Why `route` of `namespace` may not be served, or None. No `ownership.routes`: any host and path."""
    denied = backend_refused(rules, route)
    if denied is not None or rules.routes is None:
        return denied
    grants = [(i, g) for i, g in enumerate(rules.routes) if g.namespaces.selects(namespace, labels)]
    if not grants:
        return f"namespace {namespace!r} may attach no routes: no entry of ownership.routes in config.yaml selects it"
    host = route.match.host
    hosted = [(i, g) for i, g in grants if host_allowed(host, g.hostnames)]
    if not hosted:
        what = f"spec.match.host {host!r} is" if host else "a route without spec.match.host (any host) is"
        return f"{what} not among the hosts namespace {namespace!r} may claim ({_listed(grants, 'hostnames')})"
    path = route.match.path or route.match.path_prefix or "/"
    if any(path_allowed(path, g.path_prefixes) for _, g in hosted):
        return None
    field = "spec.match.path" if route.match.path else "spec.match.path_prefix"
    on = f" on host {host!r}" if host else ""
    return f"{field} {path!r}{on} is outside the paths namespace {namespace!r} may claim there ({_listed(hosted, 'path_prefixes')})"


def backend_refused(rules: Ownership, route: Route) -> str | None:
    """Why the route's backend URL may not be used: its host is an address in a denied network. A host
    name is the gateway's to check, when it connects (what it resolves to is known only then)."""
    host = route.backend.url.host or ""
    if not (host.startswith("[") or host[-1:].isdigit()):  # a name: the URL parser writes IPs as a.b.c.d, [v6]
        return None
    try:
        address = ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    network = denied_network(address, rules.denied_backend_networks)
    if network is None:
        return None
    return (f"spec.backend.url: the address {address} lies in {network}, a network backends of GatewayRoutes may "
            "not reach (ownership.denied_backend_networks in config.yaml)")


def reference_refused(rules: Ownership, namespace: str, labels: Mapping[str, str], policy_namespace: str, policy: str) -> str | None:
    """Why a route of `namespace` may not use RateLimitPolicy `policy_namespace/policy`, or None."""
    if policy_namespace == namespace:
        return None
    for grant in rules.policy_references:
        named = not grant.policies or policy in grant.policies
        if grant.namespace == policy_namespace and named and grant.from_.selects(namespace, labels):
            return None
    return (f"RateLimitPolicy {policy_namespace}/{policy} is in another namespace, and no entry of "
            f"ownership.policy_references in config.yaml lets namespace {namespace!r} use it")


def host_allowed(host: str | None, patterns: list[str]) -> bool:
    """Is every host `host` matches also matched by one of `patterns`? (No patterns: any host.)"""
    if not patterns:
        return True
    if host is None:
        return False
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:]) and len(host) > len(p) - 1) for p in patterns)


def path_allowed(path: str, prefixes: list[str]) -> bool:
    """Does `path` (a route's exact path or prefix) lie under one of `prefixes`? (No prefixes: any path.)"""
    if not prefixes:
        return True
    return any(path == p or path.startswith(p if p.endswith("/") else p + "/") for p in prefixes)


def _listed(grants: list[tuple[int, RouteGrant]], what: str) -> str:
    parts = []
    for i, grant in grants:
        values = getattr(grant, what)
        parts.append(f"ownership.routes[{i}].{what}: {', '.join(values) if values else 'any'}")
    return "; ".join(parts)
