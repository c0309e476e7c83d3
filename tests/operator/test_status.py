"""Programmed from pod reports, condition transition times, and which changes become Events."""

from __future__ import annotations

from apigw_operator.health import PodReport
from apigw_operator.render import Condition, Ref, Verdict
from apigw_operator.status import Served, announcements, conditions, merge_patch, programmed

OK = Verdict(Condition("Accepted", True, "Accepted", "valid"), Condition("ResolvedRefs", True, "ResolvedRefs", "ok"))
A, B = Ref("GatewayRoute", "shop", "a"), Ref("GatewayRoute", "shop", "b")


def history() -> Served:
    """Config c1 holds a and b; c2 holds a unchanged and b edited."""
    served = Served()
    served.record("c1", {A: "a1", B: "b1"})
    served.record("c2", {A: "a1", B: "b2"})
    return served


def test_an_unchanged_cr_is_served_by_every_config_since_its_last_edit() -> None:
    served = history()
    assert served.holds("c1", A, "a1") and served.holds("c2", A, "a1")
    assert not served.holds("c1", B, "b2") and served.holds("c2", B, "b2")
    assert not served.holds("unknown", A, "a1") and not served.holds(None, A, "a1")
    served.record("c1", {A: "a1", B: "b1"})  # a revert: c1 is the newest config again
    assert served.holds("c1", B, "b1") and not served.holds("c2", B, "b1")


def test_programmed_counts_pods_serving_the_cr_as_it_is_and_names_no_hash() -> None:
    served = history()
    reports = [PodReport("p", "c2"), PodReport("q", "c2"), PodReport("r", "c1")]
    assert programmed(A, OK, "a1", reports, served) == Condition("Programmed", True, "Programmed", "3/3 pods serve its current spec")
    assert programmed(B, OK, "b2", reports, served) == Condition("Programmed", False, "Pending", "2/3 pods serve its current spec")


def test_a_pod_that_rejected_the_config_keeps_it_false_with_its_reason() -> None:
    reports = [PodReport("p", "c2"), PodReport("q", "c1", "routes.yaml:3: routes[0].backend.url: bad", rejected=True)]
    result = programmed(B, OK, "b2", reports, history())
    assert (result.status, result.reason) == (False, "Rejected")
    assert result.message == "1/2 pods serve its current spec (q: routes.yaml:3: routes[0].backend.url: bad)"


def test_no_pods_unreachable_pods_blocked_config_and_excluded_cr() -> None:
    served = history()
    assert programmed(A, OK, "a1", [], served).reason == "Pending"
    unreachable = programmed(A, OK, "a1", [PodReport("p", None, "health endpoint not answering: refused")], served)
    assert (unreachable.reason, unreachable.message) == ("Pending", "0/1 pods serve its current spec (p: health endpoint not answering: refused)")
    too_big = Condition("Programmed", False, "ConfigTooLarge", "x")
    assert programmed(B, OK, "b3", [PodReport("p", "c2")], served, too_big) == too_big
    assert programmed(A, OK, "a1", [PodReport("p", "c2")], served, too_big).reason == "Programmed", "served CRs stay Programmed"
    excluded = Verdict(Condition("Accepted", False, "Invalid", "x"), OK.resolved_refs)
    assert programmed(A, excluded, None, [PodReport("p", "c2")], served).reason == "NotAccepted"


def test_transition_time_moves_only_when_status_flips() -> None:
    first = conditions([Condition("Programmed", False, "Pending", "0/2")], [], 3, "T1")
    more = conditions([Condition("Programmed", False, "Pending", "1/2")], first, 3, "T2")
    done = conditions([Condition("Programmed", True, "Programmed", "2/2")], more, 4, "T3")
    assert [c["lastTransitionTime"] for c in (first[0], more[0], done[0])] == ["T1", "T1", "T3"]
    assert done[0]["observedGeneration"] == 4


def test_events_for_status_or_reason_changes_only() -> None:
    first = conditions([Condition("Programmed", False, "Pending", "0/2")], [], 1, "T1")
    more = conditions([Condition("Programmed", False, "Pending", "1/2")], first, 1, "T2")
    done = conditions([Condition("Programmed", True, "Programmed", "2/2")], more, 1, "T3")
    assert announcements(first, []) == [("Warning", "Pending", "Programmed=False: 0/2")]
    assert announcements(more, first) == []
    assert announcements(done, more) == [("Normal", "Programmed", "Programmed=True: 2/2")]


def test_a_kept_last_accepted_version_is_programmed_for_its_own_generation() -> None:
    failed = Verdict(Condition("Accepted", False, "Invalid", "spec.x: bad"), OK.resolved_refs, fallback=True,
                     last_accepted={"generation": 3, "spec": {}})
    state = programmed(A, failed, "a1", [PodReport("p", "c2")], history())
    assert state == Condition("Programmed", True, "Programmed", "1/1 pods serve its last accepted version (generation 3)", 3)
    written = conditions([failed.accepted, state], [], 4, "T1")
    assert [(c["type"], c["status"], c["observedGeneration"]) for c in written] == [("Accepted", "False", 4), ("Programmed", "True", 3)]
    pending = programmed(A, failed, "a1", [], history())
    assert (pending.reason, pending.generation) == ("Pending", 3)


def test_a_disabled_route_served_as_such_is_not_programmed_but_disabled() -> None:
    off = Verdict(OK.accepted, OK.resolved_refs, disabled=True)
    state = programmed(A, off, "a1", [PodReport("p", "c2")], history())
    assert (state.status, state.reason) == (False, "Disabled")
    assert state.message == "disabled by spec.enabled: false; 1/1 pods serve its current spec"
    assert programmed(A, off, "a1", [PodReport("p", "c0")], history()).reason == "Pending"
    assert announcements(conditions([state], [], 1, "T"), []) == [("Normal", "Disabled", f"Programmed=False: {state.message}")]


def test_merge_patch_removes_what_the_new_value_lacks() -> None:
    old = {"generation": 1, "spec": {"match": {"path_prefix": "/a"}, "rewrite_prefix": "/b", "backend": {"url": "u"}}}
    new = {"generation": 2, "spec": {"match": {"path": "/a"}, "backend": {"url": "u"}}}
    assert merge_patch(old, new) == {"generation": 2, "spec": {"match": {"path_prefix": None, "path": "/a"}, "rewrite_prefix": None}}
    assert merge_patch(None, new) == new and merge_patch(old, None) is None


def test_a_cr_whose_backend_the_pods_hold_unavailable_is_not_programmed_and_says_why() -> None:
    """The pods serve the config, but answer the CR's requests 503 (its backend's TLS files cannot be used):
    the CR says so, with the gateway's words; the other CRs are Programmed."""
    served = history()
    why = "backend a: cannot use the TLS files: ca_file /certs/ca.pem: No such file or directory"
    reports = [PodReport("p", "c2", held={"shop.a": why}), PodReport("q", "c2", held={"shop.a": why})]
    result = programmed(A, OK, "a1", reports, served)
    assert result == Condition("Programmed", False, "BackendTLSUnusable",
                               f"2/2 pods serve its current spec; 2 hold its backend unavailable (its requests get 503 "
                               f"backend_tls_unusable): {why}")
    assert programmed(B, OK, "b2", reports, served) == Condition(
        "Programmed", True, "Programmed", "2/2 pods serve its current spec")
