"""Ownership (config.yaml's `ownership`) and no hijack on failure (`status.lastAccepted`), as pure renders."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from apigw.config.errors import ConfigError
from apigw.config.loader import parse_documents
from apigw.config.model import Route
from apigw.pipeline.routing import Router
from apigw_operator.ownership import host_allowed, path_allowed
from apigw_operator.render import POLICY, ROUTE, Ref, Renderer, render
from tests.operator.kube import CONFIG_YAML, cr

TWO_TEAMS = CONFIG_YAML + """\
ownership:
  routes:
    - namespaces: {names: [payments]}
      hostnames: [pay.example.com]
    - namespaces: {labels: {team: shop}}
      hostnames: [shop.example.com, "*.shop.example.com"]
      path_prefixes: [/orders, /cart/]
  policy_references:
    - from: {names: [payments]}
      namespace: platform
      policies: [global]
"""
LABELS = {"shop": {"team": "shop"}, "sandbox": {"team": "sandbox"}}


def gwr(namespace: str, name: str, host: str | None, path: str = "/", created: str = "2025-01-01T00:00:00Z", **spec: Any) -> dict:
    match = {"path_prefix": path} if host is None else {"host": host, "path_prefix": path}
    body = {"match": match, "backend": {"service": f"{namespace}-{name}", "url": f"http://{name}.{namespace}:8080"}, **spec}
    return cr("GatewayRoute", name, body, created=created, namespace=namespace)


def rlp(namespace: str, name: str, requests: int = 10) -> dict:
    return cr("RateLimitPolicy", name, {"requests": requests, "period": "1m"}, namespace=namespace)


def verdict(result, namespace: str, name: str, kind: str = ROUTE):
    return result.verdicts[Ref(kind, namespace, name)]


def served(result) -> list[str]:
    return [r["name"] for r in yaml.safe_load(result.routes_yaml)["routes"]]


def accepted(result, namespace: str, name: str) -> tuple[bool | None, str]:
    condition = verdict(result, namespace, name).accepted
    return condition.status, condition.reason


def with_status(body: dict, last_accepted: Any) -> dict:
    """The CR as the operator left it: its status holding the last accepted version."""
    return {**body, "status": {"lastAccepted": last_accepted}}


# --- ownership ------------------------------------------------------------------------------------


def test_without_ownership_every_namespace_may_claim_anything_as_before() -> None:
    result = render([gwr("sandbox", "any", None), gwr("payments", "pay", "pay.example.com")], [], CONFIG_YAML)
    assert sorted(served(result)) == ["payments.pay", "sandbox.any"]


def test_an_older_route_of_another_team_no_longer_takes_a_host_it_was_not_given() -> None:
    """The issue's case: sandbox's route, created first, made payments' own route Conflicted."""
    sandbox = gwr("sandbox", "grab", "pay.example.com", created="2025-01-01T00:00:00Z")
    payments = gwr("payments", "pay", "pay.example.com", created="2025-02-01T00:00:00Z")
    result = render([sandbox, payments], [], TWO_TEAMS, LABELS)
    assert served(result) == ["payments.pay"]
    assert accepted(result, "sandbox", "grab") == (False, "NotAllowed")
    assert verdict(result, "sandbox", "grab").accepted.message == (
        "namespace 'sandbox' may attach no routes: no entry of ownership.routes in config.yaml selects it"
    )
    assert not verdict(result, "sandbox", "grab").included


def test_not_allowed_names_the_rule_broken() -> None:
    routes = [
        gwr("payments", "wrong-host", "shop.example.com"),
        gwr("payments", "no-host", None),
        gwr("shop", "wrong-path", "shop.example.com", "/payments"),
        gwr("shop", "orders", "shop.example.com", "/orders/v2"),
    ]
    result = render(routes, [], TWO_TEAMS, LABELS)
    messages = {ref.name: v.accepted.message for ref, v in result.verdicts.items() if not v.accepted.status}
    assert messages == {
        "wrong-host": "spec.match.host 'shop.example.com' is not among the hosts namespace 'payments' may claim "
                      "(ownership.routes[0].hostnames: pay.example.com)",
        "no-host": "a route without spec.match.host (any host) is not among the hosts namespace 'payments' may claim "
                   "(ownership.routes[0].hostnames: pay.example.com)",
        "wrong-path": "spec.match.path_prefix '/payments' on host 'shop.example.com' is outside the paths namespace "
                      "'shop' may claim there (ownership.routes[1].path_prefixes: /orders, /cart/)",
    }
    assert {ref.name: v.accepted.reason for ref, v in result.verdicts.items() if not v.accepted.status} == dict.fromkeys(messages, "NotAllowed")
    assert served(result) == ["shop.orders"]


def test_namespaces_selected_by_labels_follow_the_labels() -> None:
    route = gwr("shop", "orders", "a.shop.example.com", "/orders")
    assert accepted(render([route], [], TWO_TEAMS, LABELS), "shop", "orders") == (True, "Accepted")
    assert accepted(render([route], [], TWO_TEAMS, {"shop": {"team": "other"}}), "shop", "orders") == (False, "NotAllowed")
    assert accepted(render([route], [], TWO_TEAMS), "shop", "orders") == (False, "NotAllowed"), "labels unknown"


@pytest.mark.parametrize(
    ("host", "path", "allowed"),
    [
        ("shop.example.com", "/orders", True),
        ("shop.example.com", "/orders/1", True),
        ("shop.example.com", "/ordersx", False),  # whole segments only, as the data plane matches
        ("x.y.shop.example.com", "/cart/", True),
        ("x.shop.example.com", "/cart", False),  # /cart/ covers /cart/..., not /cart itself
        ("*.a.shop.example.com", "/orders", True),  # a narrower wildcard
        ("*.example.com", "/orders", False),  # a wider one
        ("example.com", "/orders", False),
    ],
)
def test_hosts_and_paths_are_compared_as_requests_are_matched(host: str, path: str, allowed: bool) -> None:
    result = render([gwr("shop", "r", host, path)], [], TWO_TEAMS, LABELS)
    assert verdict(result, "shop", "r").included is allowed


_labels = st.sampled_from(["a", "b"])
_hosts = st.lists(_labels, min_size=1, max_size=3).map(".".join)
_patterns = st.one_of(_hosts, _hosts.map("*.{}".format))
_paths = st.lists(st.sampled_from(["x", "y", "xy"]), max_size=3).map(lambda parts: "/" + "/".join(parts))
_prefixes = st.one_of(_paths, _paths.map(lambda p: p if p.endswith("/") else p + "/"))


def _router(host: str | None, prefix: str) -> Router[str]:
    match = {"path_prefix": prefix} if host is None else {"host": host, "path_prefix": prefix}
    return Router([(Route.model_validate({"name": "r", "match": match, "backend": {"service": "s", "url": "http://s"}}), "r")])


@settings(max_examples=300, deadline=None)
@given(_patterns, _patterns, _prefixes, _prefixes, _hosts, _paths)
def test_an_allowed_route_matches_no_request_its_grant_does_not(
    route_host: str, grant_host: str, route_path: str, grant_path: str, host: str, path: str
) -> None:
    """What a route of an allowed host and path matches, the grant's own host and prefix match too,
    by the data plane's own router: a team cannot reach past its grant with a wildcard or a prefix."""
    allowed = host_allowed(route_host, [grant_host]) and path_allowed(route_path, [grant_path])
    if allowed and _router(route_host, route_path).match(host, path, "GET"):
        assert _router(grant_host, grant_path).match(host, path, "GET")


def test_policy_of_another_namespace_only_where_granted() -> None:
    policies = [rlp("platform", "global"), rlp("platform", "internal"), rlp("shop", "own")]
    routes = [
        gwr("payments", "pay", "pay.example.com", ratelimit="platform/global"),
        gwr("payments", "internal", "pay.example.com", "/internal", ratelimit="platform/internal"),
        gwr("shop", "orders", "shop.example.com", "/orders", ratelimit="platform/global"),
        gwr("shop", "cart", "shop.example.com", "/cart/", ratelimit="own"),
    ]
    result = render(routes, policies, TWO_TEAMS, LABELS)
    refs = {ref.name: (v.resolved_refs.status, v.resolved_refs.reason) for ref, v in result.verdicts.items() if ref.kind == ROUTE}
    assert refs == {
        "pay": (True, "ResolvedRefs"), "internal": (False, "RefNotPermitted"),
        "orders": (False, "RefNotPermitted"), "cart": (True, "ResolvedRefs"),
    }
    assert verdict(result, "shop", "orders").resolved_refs.message == (
        "RateLimitPolicy platform/global is in another namespace, and no entry of ownership.policy_references "
        "in config.yaml lets namespace 'shop' use it"
    )
    rendered = {r["name"]: r.get("ratelimit") for r in yaml.safe_load(result.routes_yaml)["routes"]}
    assert rendered == {"payments.pay": "platform.global", "shop.cart": "shop.own"}
    without = render(routes, policies, CONFIG_YAML)  # no ownership: still no other namespace's policy
    assert verdict(without, "payments", "pay").resolved_refs.reason == "RefNotPermitted"


def test_ownership_errors_are_located_in_config_yaml() -> None:
    broken = CONFIG_YAML + "ownership:\n  routes:\n    - namespaces: {}\n      hostnames: ['bad host']\n"
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": broken})
    assert caught.value.errors == [
        "config.yaml:7: ownership.routes[0].namespaces: give either names or labels",
        "config.yaml:8: ownership.routes[0].hostnames[0]: 'bad host' is not a host name (exact, or *.example.com)",
    ]


# --- no hijack on failure -------------------------------------------------------------------------


def test_a_broken_route_keeps_serving_its_last_accepted_version() -> None:
    good = gwr("shop", "orders", None, "/orders")
    first = render([good], [], CONFIG_YAML)
    kept = verdict(first, "shop", "orders").last_accepted
    assert kept == {"generation": 1, "spec": good["spec"]}

    broken = with_status(gwr("shop", "orders", None, "orders-without-slash"), kept)
    broken["metadata"]["generation"] = 2
    thief = gwr("other", "catch-all", None, "/orders", created="2025-02-01T00:00:00Z")
    result = render([broken, thief], [], CONFIG_YAML)
    assert yaml.safe_load(result.routes_yaml)["routes"] == yaml.safe_load(first.routes_yaml)["routes"]
    orders = verdict(result, "shop", "orders")
    assert (orders.accepted.status, orders.accepted.reason, orders.fallback, orders.included) == (False, "Invalid", True, True)
    assert orders.last_accepted == kept, "the last accepted version stays as it was"
    assert orders.accepted.message.startswith("spec.match.path_prefix: must start with /")
    assert accepted(result, "other", "catch-all") == (False, "Conflicted")
    assert verdict(result, "other", "catch-all").accepted.message == (
        "spec.match: same host, path and method as route 'shop.orders' (GatewayRoute shop/orders, its last accepted "
        "version), which wins: config.yaml's routes first, then CRs oldest first (creationTimestamp, then namespace/name)"
    )


def test_a_route_without_a_last_accepted_version_is_just_excluded() -> None:
    result = render([gwr("shop", "orders", None, "nope")], [], CONFIG_YAML)
    assert served(result) == [] and not verdict(result, "shop", "orders").fallback


def test_deleted_policy_keeps_the_route_with_the_policy_as_it_was() -> None:
    route = gwr("shop", "orders", None, "/orders", ratelimit="per-client")
    first = render([route], [rlp("shop", "per-client", 10)], CONFIG_YAML)
    kept = verdict(first, "shop", "orders").last_accepted
    assert kept["policy"] == {"namespace": "shop", "name": "per-client", "spec": {"requests": 10, "period": "1m"}}

    after = render([with_status(route, kept)], [], CONFIG_YAML)
    orders = verdict(after, "shop", "orders")
    assert (orders.accepted.status, orders.resolved_refs.reason, orders.fallback) == (True, "PolicyNotFound", True)
    assert yaml.safe_load(after.routes_yaml) == yaml.safe_load(first.routes_yaml)

    edited = render([with_status(route, kept)], [rlp("shop", "per-client", 99)], CONFIG_YAML)
    assert verdict(edited, "shop", "orders").current
    assert verdict(edited, "shop", "orders").last_accepted is kept, "a policy edit rewrites no route's status"
    assert yaml.safe_load(edited.routes_yaml)["policies"][0]["requests"] == 99


def test_an_edit_into_a_conflict_keeps_the_last_accepted_match() -> None:
    older = gwr("shop", "cart", None, "/cart", created="2025-01-01T00:00:00Z")
    orders = gwr("shop", "orders", None, "/orders", created="2025-02-01T00:00:00Z")
    kept = verdict(render([older, orders], [], CONFIG_YAML), "shop", "orders").last_accepted
    moved = with_status(gwr("shop", "orders", None, "/cart", created="2025-02-01T00:00:00Z"), kept)
    result = render([older, moved], [], CONFIG_YAML)
    assert accepted(result, "shop", "orders") == (False, "Conflicted") and verdict(result, "shop", "orders").fallback
    assert served(result) == ["shop.cart", "shop.orders"]
    assert "/orders" in result.routes_yaml


def test_the_last_accepted_version_obeys_todays_ownership() -> None:
    route = gwr("shop", "orders", "shop.example.com", "/orders")
    kept = verdict(render([route], [], TWO_TEAMS, LABELS), "shop", "orders").last_accepted
    broken = with_status(gwr("shop", "orders", "shop.example.com", "orders"), kept)
    assert verdict(render([broken], [], TWO_TEAMS, LABELS), "shop", "orders").fallback
    revoked = render([broken], [], TWO_TEAMS.replace("team: shop", "team: gone"), LABELS)
    assert served(revoked) == [] and not verdict(revoked, "shop", "orders").included


def test_conflict_winner_names_its_losers() -> None:
    old = gwr("shop", "old", None, "/x", created="2025-01-01T00:00:00Z")
    losers = [gwr(f"team{i}", "new", None, "/x", created=f"2025-02-0{i + 1}T00:00:00Z") for i in range(5)]
    result = render([old, *losers[:1]], [], CONFIG_YAML)
    assert verdict(result, "shop", "old").accepted.message == (
        "valid (config name 'shop.old'); wins, as the older, its conflicts with GatewayRoute team0/new"
    )
    assert "(GatewayRoute shop/old), which wins" in verdict(result, "team0", "new").accepted.message
    many = render([old, *losers], [], CONFIG_YAML)
    assert verdict(many, "shop", "old").accepted.message.endswith(
        "GatewayRoute team0/new, GatewayRoute team1/new, GatewayRoute team2/new and 2 more"
    )


def test_disabled_route_is_marked_disabled_and_its_snapshot_kept_by_a_remembering_renderer() -> None:
    renderer = Renderer()
    off = gwr("shop", "off", None, "/off", enabled=False)
    result = renderer.render([off], [], CONFIG_YAML)
    assert verdict(result, "shop", "off").disabled and verdict(result, "shop", "off").current
    kept = verdict(result, "shop", "off").last_accepted
    again = renderer.render([with_status(off, kept)], [], CONFIG_YAML)
    assert verdict(again, "shop", "off").last_accepted is kept
    assert not verdict(again, "shop", "off").fallback
    assert Ref(POLICY, "shop", "off") not in again.verdicts


# --- backends a route may not reach (ownership.denied_backend_networks) ----------------------------


def to(namespace: str, name: str, url: str, **spec: Any) -> dict:
    """A route of its own path, to `url`."""
    return gwr(namespace, name, None, f"/{name}", backend={"service": f"{namespace}-{name}", "url": url}, **spec)


SETTING = "ownership.denied_backend_networks in config.yaml"


@pytest.mark.parametrize(("url", "address", "network"), [
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "169.254.169.254", "169.254.0.0/16"),
    ("http://2852039166/latest/", "169.254.169.254", "169.254.0.0/16"),  # the URL parser's spellings of it
    ("http://0xa9.0376.43518/", "169.254.169.254", "169.254.0.0/16"),
    ("http://[::ffff:169.254.169.254]/", "::ffff:a9fe:a9fe", "169.254.0.0/16"),
    ("http://127.1:9090/metrics", "127.0.0.1", "127.0.0.0/8"),
    ("http://[::1]:9090/", "::1", "::1/128"),
    ("https://[fd00:ec2::254]/", "fd00:ec2::254", "fd00:ec2::254/128"),
    ("http://0/", "0.0.0.0", "0.0.0.0/32"),
])
def test_a_backend_url_at_a_denied_address_is_not_allowed(url: str, address: str, network: str) -> None:
    result = render([to("shop", "steal", url), to("shop", "fine", "http://orders.shop:8080")], [], CONFIG_YAML)
    assert accepted(result, "shop", "steal") == (False, "NotAllowed")
    assert verdict(result, "shop", "steal").accepted.message == (
        f"spec.backend.url: the address {address} lies in {network}, a network backends of GatewayRoutes may not "
        f"reach ({SETTING})")
    assert served(result) == ["shop.fine"]


def test_names_are_left_to_the_gateway_and_the_setting_decides_what_is_denied() -> None:
    routes = [to("shop", "named", "http://metadata.attacker.example/"), to("shop", "loop", "http://127.0.0.1:9090/"),
              to("shop", "meta", "http://169.254.169.254/")]
    assert sorted(served(render(routes, [], CONFIG_YAML))) == ["shop.named"]
    relaxed = CONFIG_YAML + "ownership:\n  denied_backend_networks: [169.254.0.0/16]\n"
    assert sorted(served(render(routes, [], relaxed))) == ["shop.loop", "shop.named"]
    off = CONFIG_YAML + "ownership:\n  denied_backend_networks: []\n"
    assert sorted(served(render(routes, [], off))) == ["shop.loop", "shop.meta", "shop.named"]


def test_config_yaml_s_own_routes_may_reach_any_address() -> None:
    people = CONFIG_YAML + "routes:\n  - name: metrics\n    backend: {service: local, url: 'http://127.0.0.1:9090'}\n"
    result = render([to("shop", "fine", "http://orders.shop:8080")], [], people)
    assert result.errors == [] and served(result) == ["shop.fine"]


def test_a_last_accepted_version_at_a_now_denied_address_is_not_kept() -> None:
    """The setting tightened after the route was accepted: its fallback obeys today's rule too."""
    old = to("shop", "steal", "http://127.0.0.1:9090/")
    kept = {"generation": 1, "spec": old["spec"]}
    broken = with_status(to("shop", "steal", "not a url"), kept)
    result = render([broken], [], CONFIG_YAML)
    assert not verdict(result, "shop", "steal").fallback and served(result) == []
    relaxed = render([broken], [], CONFIG_YAML + "ownership:\n  denied_backend_networks: []\n")
    assert verdict(relaxed, "shop", "steal").fallback and served(relaxed) == ["shop.steal"]
