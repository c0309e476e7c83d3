"""The pure core: CR bodies and config.yaml in, routes.yaml and verdicts out."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from apigw.config.errors import ConfigError
from apigw.config.loader import parse_documents
from apigw.config.model import config_hash
from apigw_operator.render import HEADER, POLICY, ROUTE, Ref, Renderer, render
from tests.operator.kube import CONFIG_YAML, cr, route

POLICY_CR = cr("RateLimitPolicy", "per-client", {"requests": 10, "period": "1m"})


def rendered(text: str) -> dict:
    return yaml.safe_load(text)


def verdict(result, name: str, kind: str = ROUTE):
    return result.verdicts[Ref(kind, "shop", name)]


def test_valid_route_and_policy_render_with_namespaced_names() -> None:
    result = render([route("orders", "/orders", ratelimit="per-client")], [POLICY_CR], CONFIG_YAML)
    assert result.errors == []
    doc = rendered(result.routes_yaml)
    assert doc["routes"][0]["name"] == "shop.orders" and doc["routes"][0]["ratelimit"] == "shop.per-client"
    assert doc["policies"] == [{"name": "shop.per-client", "requests": 10, "period": "1m"}]
    assert result.config_hash == config_hash(parse_documents({"config.yaml": CONFIG_YAML, "routes.yaml": result.routes_yaml}))
    assert verdict(result, "orders").included and verdict(result, "per-client", POLICY).included


def test_same_input_renders_the_same_text_and_hashes() -> None:
    a = render([route("b", "/b"), route("a", "/a")], [POLICY_CR], CONFIG_YAML)
    b = render([route("a", "/a"), route("b", "/b")], [POLICY_CR], CONFIG_YAML)
    assert (a.routes_yaml, a.config_hash, a.restart_hash) == (b.routes_yaml, b.config_hash, b.restart_hash)


def test_invalid_spec_is_excluded_with_located_messages() -> None:
    typo = route("typo", "/typo", bogus=1)
    rewrite = route("rewrite", "/rewrite", rewrite_prefix="x", created="2025-01-02T00:00:00Z")
    result = render([route("good", "/good"), typo, rewrite], [], CONFIG_YAML)
    assert [r["name"] for r in rendered(result.routes_yaml)["routes"]] == ["shop.good"]
    accepted = verdict(result, "typo").accepted
    assert (accepted.status, accepted.reason) == (False, "Invalid")
    assert accepted.message == "spec.bogus: unknown setting (check its spelling and indentation)"
    assert verdict(result, "rewrite").accepted.message == "spec: rewrite_prefix must start with /"


def test_name_too_long_for_the_config_is_invalid() -> None:
    long = route("x" * 60, "/long")
    result = render([long], [], CONFIG_YAML)
    assert verdict(result, "x" * 60).accepted.message.startswith("metadata.name: the config name 'shop.xxx")


def test_dangling_policy_reference() -> None:
    result = render([route("orders", "/orders", ratelimit="missing")], [], CONFIG_YAML)
    refs = verdict(result, "orders").resolved_refs
    assert (refs.status, refs.reason) == (False, "PolicyNotFound")
    assert rendered(result.routes_yaml)["routes"] == []


def test_reference_to_an_invalid_policy() -> None:
    broken = cr("RateLimitPolicy", "per-client", {"requests": -1, "period": "1m"})
    result = render([route("orders", "/orders", ratelimit="per-client")], [broken], CONFIG_YAML)
    refs = verdict(result, "orders").resolved_refs
    assert (refs.status, refs.reason) == (False, "PolicyNotAccepted")
    assert "spec.requests" in refs.message


def test_policy_deletion_is_reported_on_the_routes_using_it() -> None:
    routes = [route("orders", "/orders", ratelimit="per-client"), route("cart", "/cart")]
    before = render(routes, [POLICY_CR], CONFIG_YAML)
    after = render(routes, [], CONFIG_YAML)
    assert verdict(before, "orders").included
    assert verdict(after, "orders").resolved_refs.reason == "PolicyNotFound"
    assert verdict(after, "cart").included
    assert rendered(after.routes_yaml)["policies"] == []


def test_conflict_older_wins_by_timestamp_then_name() -> None:
    newer = route("aaa", "/orders", created="2025-02-01T00:00:00Z")
    older = route("zzz", "/orders", created="2025-01-01T00:00:00Z")
    result = render([newer, older], [], CONFIG_YAML)
    assert verdict(result, "zzz").included
    conflict = verdict(result, "aaa").accepted
    assert (conflict.status, conflict.reason) == (False, "Conflicted")
    assert "same host, path and method as route 'shop.zzz'" in conflict.message
    tie = render([route("b", "/x"), route("a", "/x")], [], CONFIG_YAML)
    assert verdict(tie, "a").included and verdict(tie, "b").accepted.reason == "Conflicted"


def test_conflicts_resolve_in_age_order() -> None:
    """b loses to a; c (same as b only) then stands, since b is out."""
    a = route("a", "/x", created="2025-01-01T00:00:00Z", match={"path_prefix": "/x", "methods": ["GET"]})
    b = route("b", "/x", created="2025-01-02T00:00:00Z", match={"path_prefix": "/x", "methods": ["POST", "GET"]})
    c = route("c", "/x", created="2025-01-03T00:00:00Z", match={"path_prefix": "/x", "methods": ["POST"]})
    result = render([a, b, c], [], CONFIG_YAML)
    assert {n: verdict(result, n).included for n in "abc"} == {"a": True, "b": False, "c": True}


def test_backend_service_with_two_urls_is_a_conflict() -> None:
    one = route("one", "/one", created="2025-01-01T00:00:00Z")
    two = route("two", "/two", created="2025-01-02T00:00:00Z")
    two["spec"]["backend"] = {"service": "one", "url": "http://elsewhere:80"}
    result = render([one, two], [], CONFIG_YAML)
    assert verdict(result, "two").accepted.reason == "Conflicted"
    assert "spec.backend.url: backend service 'one' already has url" in verdict(result, "two").accepted.message


def test_route_conflicting_with_a_hand_written_route_in_config_yaml_loses() -> None:
    hand = CONFIG_YAML + "routes:\n- name: legacy\n  match: {path_prefix: /orders}\n  backend: {service: legacy, url: 'http://legacy'}\n"
    result = render([route("orders", "/orders")], [], hand)
    assert verdict(result, "orders").accepted.reason == "Conflicted"
    assert result.errors == [] and result.config_hash is not None


def test_disabled_route_is_rendered_disabled_and_does_not_conflict() -> None:
    live = route("live", "/x")
    off = route("off", "/x", enabled=False, created="2025-03-01T00:00:00Z")
    result = render([live, off], [], CONFIG_YAML)
    assert [(r["name"], r.get("enabled", True)) for r in rendered(result.routes_yaml)["routes"]] == [
        ("shop.live", True), ("shop.off", False),
    ]
    assert verdict(result, "off").included
    assert "disabled by spec.enabled: false" in verdict(result, "off").accepted.message


def test_broken_config_yaml_fails_the_whole_config_but_still_judges_crs() -> None:
    result = render([route("orders", "/orders"), route("bad", "nope")], [], "listen: [")
    assert result.config_hash is None and result.restart_hash is None
    assert result.errors and result.errors[0].startswith("config.yaml")
    assert verdict(result, "orders").included and verdict(result, "bad").accepted.reason == "Invalid"


def test_restart_hash_moves_only_with_restart_settings() -> None:
    base = render([], [], CONFIG_YAML).restart_hash
    assert render([route("a", "/a")], [], CONFIG_YAML).restart_hash == base
    assert render([], [], CONFIG_YAML.replace("fail_closed", "fail_open")).restart_hash == base
    assert render([], [], CONFIG_YAML.replace("8080", "8081")).restart_hash != base


def test_pods_are_probed_on_the_configured_metrics_port() -> None:
    from apigw_operator.reconciler import metrics_port, pod_url

    assert pod_url("gw-0", "10.0.0.7", metrics_port("listen: {port: 8181, metrics_port: 9191}\n")) == "http://10.0.0.7:9191"
    assert metrics_port("listen: {port: 8181}\n") == 9090
    assert metrics_port("") == 9090
    assert metrics_port("listen: [broken\n") == 9090


def test_routes_sharing_a_backend_may_differ_in_timeout_but_not_in_cluster_settings() -> None:
    one = route("one", "/one", created="2025-01-01T00:00:00Z")
    slower = route("slower", "/slower", created="2025-01-02T00:00:00Z")
    slower["spec"]["backend"] = {"service": "one", "url": "http://one.shop:8080", "timeout": "90s"}
    other = route("other", "/other", created="2025-01-03T00:00:00Z")
    other["spec"]["backend"] = {"service": "one", "url": "http://one.shop:8080", "connect_timeout": "1s"}
    result = render([one, slower, other], [], CONFIG_YAML)
    assert verdict(result, "slower").included, "a route's own timeout"
    assert verdict(result, "other").accepted.message.startswith(
        "spec.backend.connect_timeout: backend service 'one' has other connect_timeout settings in route 'shop.one'"
    )


_paths = st.sampled_from(["/a", "/b", "/a/x"])
_specs = st.fixed_dictionaries({
    "match": st.fixed_dictionaries({}, optional={
        "path_prefix": _paths,
        "host": st.sampled_from(["a.example", "*.example"]),
        "methods": st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2, unique=True),
    }),
    "backend": st.fixed_dictionaries(
        {"service": st.sampled_from(["s1", "s2"]), "url": st.sampled_from(["http://one:80", "http://two:80"])},
        optional={"timeout": st.sampled_from(["1s", "2s"]), "connect_timeout": st.sampled_from(["1s", "2s"])},
    ),
}, optional={"enabled": st.booleans()})


@settings(max_examples=60, deadline=None)
@given(st.lists(_specs, min_size=1, max_size=6))
def test_the_conflict_index_finds_what_the_loader_finds(specs: list[dict]) -> None:
    """The operator's index agrees with the loader: every conflict is found by the index (its messages
    name the CR; the loader's would name `routes.yaml routes[i]`), and each CR it excludes would make
    the loader refuse the config if it were added back."""
    bodies = [cr("GatewayRoute", f"r{i}", spec, created=f"2025-01-0{i + 1}T00:00:00Z") for i, spec in enumerate(specs)]
    result = render(bodies, [], CONFIG_YAML)
    assert result.errors == [] and result.config_hash is not None
    for ref, v in result.verdicts.items():
        if v.accepted.reason == "Conflicted":
            assert "(GatewayRoute shop/r" in v.accepted.message, v.accepted.message
            document = rendered(result.routes_yaml)
            document["routes"].append({"name": ref.config_name, **specs[int(ref.name[1:])]})
            with pytest.raises(ConfigError):
                parse_documents({"config.yaml": CONFIG_YAML, "routes.yaml": yaml.safe_dump(document)})


_texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=120)
_entries = st.fixed_dictionaries({
    "match": st.fixed_dictionaries({"path_prefix": st.from_regex(r"\A/[a-z0-9/]{0,150}\Z").filter(lambda p: "//" not in p)}),
    "backend": st.fixed_dictionaries({"service": st.sampled_from(["s1", "s2"]), "url": st.just("http://one:80")},
                                     optional={"timeout": st.sampled_from(["1s", 2.5, 30, "500ms"])}),
}, optional={"auth": st.fixed_dictionaries({"scopes": st.lists(_texts, max_size=3)}), "ratelimit": st.just("per-client"),
             "enabled": st.booleans()})


@settings(max_examples=40, deadline=None)
@given(st.lists(_entries, min_size=1, max_size=8), st.data())
def test_the_text_is_what_yaml_dumps_and_holds_the_config_that_was_validated(specs: list[dict], data) -> None:
    """routes.yaml is assembled from one remembered dump per entry and validated as models, never parsed:
    it must be the text `yaml.dump` writes for the whole document, whose parse has the hash reported.
    Rendered twice with one CR changed in between, so remembered entries are reused."""
    keyed = "listen:\n  port: 8080\nauth:\n  keys:\n  - file: /keys/k.pem\n"
    renderer = Renderer()
    bodies = [cr("GatewayRoute", f"r{i}", spec, created=f"2025-01-01T00:00:{i:02d}Z") for i, spec in enumerate(specs)]
    for _ in range(2):
        result = renderer.render(bodies, [POLICY_CR], keyed)
        assert result.errors == [] and result.config_hash is not None
        document = yaml.safe_load(result.routes_yaml)
        assert result.routes_yaml == HEADER + yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)
        assert result.config_hash == config_hash(parse_documents({"config.yaml": keyed, "routes.yaml": result.routes_yaml}))
        changed = data.draw(st.integers(0, len(bodies) - 1))
        bodies[changed] = cr("GatewayRoute", f"r{changed}", data.draw(_entries), created=f"2025-01-01T00:00:{changed:02d}Z")


def test_a_route_whose_backend_tls_files_the_gateway_cannot_use_blocks_no_other_route(tmp_path) -> None:
    """A tenant's route naming a CA file the gateway pods do not have is Accepted and written (render does no
    I/O). The pods must not refuse the whole routes.yaml for it (then no tenant's change would apply any more):
    they load the rest and hold that one backend unavailable, which its CR's status then reports."""
    from apigw.config.loader import load_config
    from apigw.upstream.cluster import cluster_settings

    tls = {"service": "evil", "url": "https://evil.other:443", "tls": {"ca_file": str(tmp_path / "missing-ca.pem")}}
    evil = cr("GatewayRoute", "evil", {"match": {"path_prefix": "/evil"}, "backend": tls}, namespace="other")
    result = render([route("orders", "/orders"), evil], [], CONFIG_YAML)
    included = {ref.name for ref, verdict in result.verdicts.items() if verdict.included}
    (tmp_path / "config.yaml").write_text(CONFIG_YAML)
    (tmp_path / "routes.yaml").write_text(result.routes_yaml)
    clusters = cluster_settings(load_config(tmp_path))  # what a gateway pod's (re)load does before anything changes
    assert included == {"orders", "evil"}
    assert clusters["orders"].unusable is None, "the gateway refuses the whole config the operator wrote"
    assert "missing-ca.pem" in (clusters["evil"].unusable or "")
