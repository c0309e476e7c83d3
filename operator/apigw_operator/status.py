"""CR status from verdicts and pod reports: conditions, their transition times, and what to announce."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from apigw_operator.health import PodReport
from apigw_operator.render import Condition, Rendering, Verdict

_STATUS = {True: "True", False: "False", None: "Unknown"}


def programmed(verdict: Verdict, rendering: Rendering, reports: Sequence[PodReport]) -> Condition:
    """True only when every ready gateway pod serves the config holding this CR."""
    if not verdict.included:
        return Condition("Programmed", False, "NotAccepted", "not in the gateway config: see Accepted and ResolvedRefs")
    if rendering.config_hash is None:
        more = f" (and {len(rendering.errors) - 1} more)" if len(rendering.errors) > 1 else ""
        return Condition(
            "Programmed", False, "ConfigInvalid",
            f"the gateway config cannot be applied, the last good routes.yaml stays in force: {rendering.errors[0]}{more}",
        )
    wanted = rendering.config_hash
    if not reports:
        return Condition("Programmed", False, "Pending", f"no ready gateway pods to serve config {wanted}")
    serving = sum(r.config_hash == wanted for r in reports)
    message = f"{serving}/{len(reports)} pods serve config {wanted}"
    if serving == len(reports):
        return Condition("Programmed", True, "Programmed", message)
    others = [r for r in reports if r.config_hash != wanted]
    notes = "; ".join(f"{r.pod}: {r.problem}" for r in others if r.problem)
    message += f" ({notes})" if notes else ""
    if any(r.rejected for r in others):
        return Condition("Programmed", False, "Rejected", message)
    return Condition("Programmed", False, "Pending", message)


def conditions(
    wanted: Sequence[Condition], previous: Sequence[Mapping[str, Any]], generation: int | None, now: str
) -> list[dict[str, Any]]:
    """Status conditions; a condition's lastTransitionTime moves only when its status flips."""
    before = {c.get("type"): c for c in previous}
    result = []
    for condition in wanted:
        status = _STATUS[condition.status]
        old = before.get(condition.type, {})
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        result.append({
            "type": condition.type,
            "status": status,
            "reason": condition.reason,
            "message": condition.message,
            "observedGeneration": generation,
            "lastTransitionTime": since or now,
        })
    return result


def announcements(new: Sequence[Mapping[str, Any]], previous: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(event type, reason, message) for each condition whose status or reason changed."""
    before = {c.get("type"): c for c in previous}
    events = []
    for c in new:
        old = before.get(c["type"], {})
        if (old.get("status"), old.get("reason")) != (c["status"], c["reason"]):
            kind = "Normal" if c["status"] == "True" else "Warning"
            events.append((kind, c["reason"], f"{c['type']}={c['status']}: {c['message']}"))
    return events
