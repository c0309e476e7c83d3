"""Programmed from pod reports, condition transition times, and which changes become Events."""

from __future__ import annotations

from apigw_operator.health import PodReport
from apigw_operator.render import Condition, Rendering, Verdict
from apigw_operator.status import announcements, conditions, programmed

OK = Verdict(Condition("Accepted", True, "Accepted", "valid"), Condition("ResolvedRefs", True, "ResolvedRefs", "ok"))
GOOD = Rendering("routes: []\n", {}, config_hash="9f2c000000000000", restart_hash="r")


def test_programmed_counts_pods_serving_the_config() -> None:
    reports = [PodReport("a", "9f2c000000000000"), PodReport("b", "9f2c000000000000"), PodReport("c", "old")]
    assert programmed(OK, GOOD, reports) == Condition("Programmed", False, "Pending", "2/3 pods serve config 9f2c000000000000")
    assert programmed(OK, GOOD, reports[:2]) == Condition("Programmed", True, "Programmed", "2/2 pods serve config 9f2c000000000000")


def test_a_pod_that_rejected_the_config_keeps_it_false_with_its_reason() -> None:
    reports = [PodReport("a", "9f2c000000000000"), PodReport("b", "old", "routes.yaml:3: routes[0].backend.url: bad", rejected=True)]
    result = programmed(OK, GOOD, reports)
    assert (result.status, result.reason) == (False, "Rejected")
    assert result.message == "1/2 pods serve config 9f2c000000000000 (b: routes.yaml:3: routes[0].backend.url: bad)"


def test_no_pods_unreachable_pods_invalid_config_and_excluded_cr() -> None:
    assert programmed(OK, GOOD, []).reason == "Pending"
    unreachable = programmed(OK, GOOD, [PodReport("a", None, "health endpoint not answering: refused")])
    assert (unreachable.reason, unreachable.message) == ("Pending", "0/1 pods serve config 9f2c000000000000 (a: health endpoint not answering: refused)")
    broken = Rendering("", {}, errors=["config.yaml:1: not valid YAML", "another"])
    assert programmed(OK, broken, []).reason == "ConfigInvalid"
    assert programmed(OK, broken, []).message.endswith("config.yaml:1: not valid YAML (and 1 more)")
    excluded = Verdict(Condition("Accepted", False, "Invalid", "x"), OK.resolved_refs)
    assert programmed(excluded, GOOD, [PodReport("a", "9f2c000000000000")]).reason == "NotAccepted"


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
