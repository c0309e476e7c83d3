"""The admission decision: a candidate CR refused exactly when the rendering would not accept it, with the
message its status would carry; a change that pushes out a served CR or overflows the ConfigMap refused;
whatever cannot be judged admitted with a warning (the webhook fails open)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from typing import Any

from kubernetes_asyncio import client

from apigw.config.loader import GLOBAL_FILE, ROUTES_FILE
from apigw_operator.admission import FORBIDDEN, INVALID, Admission, Decision, decide
from apigw_operator.cluster import Cluster, Target
from apigw_operator.reconciler import configmap_size
from apigw_operator.render import POLICY, ROUTE, Renderer, ref_of, render
from tests.operator.kube import CONFIG_YAML, cr, route

TARGET = Target()
CONFIGMAP = {"metadata": {"name": TARGET.configmap, "namespace": TARGET.namespace}, "data": {GLOBAL_FILE: CONFIG_YAML}}
LIMIT = 1024 * 1024
KEYED_CONFIG = CONFIG_YAML + "auth:\n  keys:\n    - {kid: k1, algorithm: HS256, secret_env: KEY}\n"


def new(body: dict[str, Any]) -> dict[str, Any]:
    """As the API server sends a CREATE: stamped now, later than every CR here (all made in 2025)."""
    body = copy.deepcopy(body)
    body["metadata"]["creationTimestamp"] = "2026-06-01T00:00:00Z"
    return body


def accepted(body: dict[str, Any]) -> dict[str, Any]:
    """The CR with the status the operator wrote for it: Accepted."""
    return {**body, "status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}]}}


def judge(kind: str, candidate: dict[str, Any], routes: list[dict[str, Any]], policies: list[dict[str, Any]] = (),
          configmap: dict[str, Any] | None = CONFIGMAP, limit: int = LIMIT, labels: Any = None) -> Any:
    return decide(Renderer(), kind, candidate, routes, list(policies), configmap, TARGET, limit, labels)


def status_message(kind: str, candidate: dict[str, Any], routes: list[dict[str, Any]], policies: list[dict[str, Any]] = ()) -> str:
    """What the status of `candidate` would say once the operator rendered it among the others."""
    everyone = [*routes, candidate] if kind == ROUTE else routes
    rendering = render(everyone, [*policies, candidate] if kind == POLICY else list(policies), CONFIG_YAML)
    return rendering.verdicts[ref_of(kind, candidate)].accepted.message


def test_a_valid_route_among_others_is_admitted_without_warnings() -> None:
    decision = judge(ROUTE, new(route("payments", "/payments")), [route("orders", "/orders")])
    assert decision.allowed and decision.warnings == ()


def test_a_route_that_would_lose_a_conflict_is_refused_naming_the_winner() -> None:
    orders = route("orders", "/orders")
    late = new(route("late", "/orders"))
    decision = judge(ROUTE, late, [orders])
    assert not decision.allowed and decision.code == INVALID
    assert decision.message.startswith(
        "spec.match: same host, path and method as route 'shop.orders' (GatewayRoute shop/orders), which wins"
    )
    assert decision.message == status_message(ROUTE, late, [orders])
    unstamped = copy.deepcopy(late)
    del unstamped["metadata"]["creationTimestamp"]  # had the API server not stamped it: still the newest
    assert judge(ROUTE, unstamped, [orders]).message == decision.message


def test_a_route_outside_its_namespace_claims_is_forbidden_by_the_namespace_labels_the_operator_holds() -> None:
    owned = CONFIG_YAML + (
        "ownership:\n  routes:\n    - namespaces: {labels: {team: shop}}\n      hostnames: [shop.example.com]\n"
    )
    configmap = {**CONFIGMAP, "data": {GLOBAL_FILE: owned}}
    foreign = new(route("refunds", "/refunds", match={"host": "pay.example.com", "path_prefix": "/refunds"}))
    decision = judge(ROUTE, foreign, [], configmap=configmap, labels={"shop": {"team": "shop"}})
    assert not decision.allowed and decision.code == FORBIDDEN
    assert "ownership.routes[0].hostnames: shop.example.com" in decision.message
    own = new(route("orders", "/orders", match={"host": "shop.example.com", "path_prefix": "/orders"}))
    assert judge(ROUTE, own, [], configmap=configmap, labels={"shop": {"team": "shop"}}).allowed
    unlabelled = judge(ROUTE, own, [], configmap=configmap, labels={"shop": {}})
    assert not unlabelled.allowed and unlabelled.code == FORBIDDEN


def test_a_backend_at_the_metadata_endpoint_is_forbidden_at_apply() -> None:
    steal = new(route("steal", "/steal"))
    steal["spec"]["backend"]["url"] = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    decision = judge(ROUTE, steal, [])
    assert not decision.allowed and decision.code == FORBIDDEN
    assert decision.message == status_message(ROUTE, steal, []) == (
        "spec.backend.url: the address 169.254.169.254 lies in 169.254.0.0/16, a network backends of GatewayRoutes "
        "may not reach (ownership.denied_backend_networks in config.yaml)")


def test_an_update_that_would_lose_a_conflict_is_refused_too() -> None:
    orders, other = route("orders", "/orders"), route("other", "/other", created="2025-03-01T00:00:00Z")
    moved = copy.deepcopy(other)
    moved["spec"]["match"]["path_prefix"] = "/orders"
    decision = judge(ROUTE, moved, [orders, other])
    assert not decision.allowed and "as route 'shop.orders'" in decision.message


def test_what_the_model_refuses_is_refused_with_its_words() -> None:
    encoded = new(route("encoded", "/%62oth"))  # passes the CRD's CEL rules; not in normal form
    decision = judge(ROUTE, encoded, [])
    assert not decision.allowed and decision.code == INVALID
    assert decision.message.startswith("spec.match.path_prefix: ") and decision.message == status_message(ROUTE, encoded, [])
    policy = new(cr("RateLimitPolicy", "zero", {"requests": 10, "period": "0s"}))
    refused = judge(POLICY, policy, [])
    assert not refused.allowed and refused.message.startswith("spec.period: ")


def test_what_depends_on_config_yaml_is_judged_with_the_configmaps_config_yaml() -> None:
    guarded = new(route("guarded", "/guarded", auth={"required": True}))
    refused = judge(ROUTE, guarded, [])
    assert not refused.allowed and "no key is configured" in refused.message
    keyed = {**CONFIGMAP, "data": {GLOBAL_FILE: KEYED_CONFIG}}
    assert judge(ROUTE, guarded, [], configmap=keyed).allowed


def test_an_edit_that_pushes_out_a_served_route_is_refused_naming_it() -> None:
    """The older route would win by the documented order, and the newer one, served now, would go."""
    old, served = route("old", "/old"), accepted(route("served", "/payments", created="2025-03-01T00:00:00Z"))
    grab = copy.deepcopy(old)
    grab["spec"]["match"]["path_prefix"] = "/payments"
    decision = judge(ROUTE, grab, [old, served])
    assert not decision.allowed and decision.code == INVALID
    assert decision.message == ("GatewayRoute shop/served is in the gateway config now and would be pushed out: "
                                "spec.match: same host, path and method as route 'shop.old' (GatewayRoute shop/old), which wins: "
                                "config.yaml's routes first, then CRs oldest first (creationTimestamp, then namespace/name)")
    # A route that is not served now (its policy is missing) is pushed out of nothing: the edit passes.
    unserved = accepted(route("unserved", "/payments", created="2025-03-01T00:00:00Z", ratelimit="missing"))
    assert judge(ROUTE, grab, [old, unserved]).allowed


def test_a_change_that_would_overflow_the_configmap_and_its_shards_is_refused_and_one_that_shrinks_is_not() -> None:
    orders = route("orders", "/orders")
    now = configmap_size(CONFIGMAP, {ROUTES_FILE: render([orders], [], CONFIG_YAML).routes_yaml})
    limit = 1000  # a shard (half of it) takes a route
    padded = {**CONFIGMAP, "data": {**CONFIGMAP["data"], "notes.txt": "x" * (limit - now - 50)}}  # no second one here
    payments = new(route("payments", "/payments"))
    assert decide(Renderer(), ROUTE, payments, [orders], [], padded, TARGET, limit).allowed  # a shard takes it
    unsharded = dataclasses.replace(TARGET, route_shards=0)
    decision = decide(Renderer(), ROUTE, payments, [orders], [], padded, unsharded, limit)
    assert not decision.allowed and decision.code == INVALID
    assert f"over its limit of {limit}: remove or shrink routes first" in decision.message
    assert f"ConfigMap {TARGET.namespace}/{TARGET.configmap} " in decision.message
    shards = dataclasses.replace(TARGET, route_shards=2)
    too_small = decide(Renderer(), ROUTE, payments, [orders], [], CONFIGMAP, shards, 60)
    assert not too_small.allowed
    assert "the routes do not fit in the 2 shard ConfigMaps api-gateway-routes-1..2 (30 bytes each, half their limit" in too_small.message

    # Already over the limit (it was lowered): a change that shrinks routes.yaml is not refused.
    long = route("orders", "/orders/with/a/long/prefix/that/takes/room")
    shorter = copy.deepcopy(long)
    shorter["spec"]["match"]["path_prefix"] = "/orders"
    assert decide(Renderer(), ROUTE, shorter, [long], [], CONFIGMAP, unsharded, 100).allowed
    assert not decide(Renderer(), ROUTE, long, [shorter], [], CONFIGMAP, unsharded, 100).allowed


def test_a_dangling_policy_reference_is_admitted_with_a_warning() -> None:
    """`kubectl apply -f dir/` applies routes before the policies they name (file order)."""
    decision = judge(ROUTE, new(route("orders", "/orders", ratelimit="per-client")), [])
    assert decision.allowed
    warning = "admitted, but not served until this is resolved: RateLimitPolicy 'per-client' not found in namespace 'shop'"
    assert decision.warnings == (warning,)


def test_what_cannot_be_judged_is_admitted_with_a_warning() -> None:
    late = new(route("late", "/orders"))
    missing = judge(ROUTE, late, [route("orders", "/orders")], configmap=None)
    assert missing.allowed and "ConfigMap api-gateway/api-gateway-config not found" in missing.warnings[0]
    broken = {**CONFIGMAP, "data": {GLOBAL_FILE: "listen: [\n"}}
    unjudged = judge(ROUTE, late, [route("orders", "/orders")], configmap=broken)
    assert unjudged.allowed and "config.yaml in ConfigMap api-gateway/api-gateway-config is invalid" in unjudged.warnings[0]


async def test_review_admits_metadata_edits_and_waits_only_so_long_for_the_index() -> None:
    """Labels or finalizers on a CR the operator refuses today stay possible; before the index is whole a
    review admits with a warning rather than judge against half the CRs."""
    api = client.ApiClient()
    try:
        indexed = asyncio.Event()
        admission = Admission(Cluster(api, TARGET), lambda: ([], []), indexed, LIMIT, wait=0.1)
        late = new(route("late", "/%62oth"))
        labelled = copy.deepcopy(late)
        labelled["metadata"]["labels"] = {"team": "shop"}
        assert await admission.review(ROUTE, labelled, late) == Decision(True)  # before the index is whole, even
        waited = await admission.review(ROUTE, late, None)
        assert waited.allowed and "still listing the CRs" in waited.warnings[0]
        elsewhere = Admission(Cluster(api, TARGET), lambda: ([], []), indexed, LIMIT, namespaces=("other",), wait=0.1)
        assert (await elsewhere.review(ROUTE, late, None)).warnings == ()
    finally:
        await api.close()
