"""CR status from verdicts and pod reports: conditions, their transition times, and what to announce.

A Programmed message names no config hash (that changes with every edit of any CR): a CR whose own
entry did not change keeps the same status while the pods move on to the next config, so one route edit
rewrites one status. The hash of the config the pods should serve is on the ConfigMap
(`gateway.apigw.io/config-hash`) and in the operator's log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from apigw_operator.health import PodReport
from apigw_operator.render import Condition, Ref, Verdict

_STATUS = {True: "True", False: "False", None: "Unknown"}
_DELIBERATE = {"Disabled"}
"""False conditions that are what the user asked for: announced as Normal Events."""
NOT_ACCEPTED = Condition("Programmed", False, "NotAccepted", "not in the gateway config: see Accepted and ResolvedRefs")


class Served:
    """Which configs hold each CR as it is now: configs are numbered in the order they were written, and
    each CR remembers its entry's digest and the first config that held that entry."""

    def __init__(self, keep: int = 64):
        self.keep = keep
        self._order: dict[str, int] = {}
        self._since: dict[Ref, tuple[str, int]] = {}

    def record(self, config_hash: str, digests: Mapping[Ref, str]) -> None:
        """`config_hash` is now the config in the ConfigMap, holding the entries `digests`."""
        latest = max(self._order.values(), default=0)
        if self._order.get(config_hash) != latest or not self._order:
            self._order.pop(config_hash, None)  # a revert: the same content again, as the newest
            self._order[config_hash] = latest + 1
            while len(self._order) > self.keep:
                del self._order[next(iter(self._order))]
        number = self._order[config_hash]
        self._since = {
            ref: since if since is not None and since[0] == digest else (digest, number)
            for ref, digest in digests.items()
            for since in [self._since.get(ref)]
        }

    def holds(self, config_hash: str | None, ref: Ref, digest: str | None) -> bool:
        """Does the config `config_hash` hold the CR's entry as it is now (`digest`)?"""
        number = self._order.get(config_hash or "")
        since = self._since.get(ref)
        return number is not None and since is not None and since[0] == digest and number >= since[1]


def programmed(
    ref: Ref,
    verdict: Verdict,
    digest: str | None,
    reports: Sequence[PodReport],
    served: Served,
    blocked: Condition | None = None,
) -> Condition:
    """True only when every ready gateway pod serves a config holding this CR as routes.yaml has it now:
    its current spec, or its last accepted version (then the condition speaks of that generation). A
    disabled route served as such is False, `Disabled`: it answers no requests. A route whose backend a
    pod serving it holds unavailable (its TLS files cannot be used there) is False, `BackendTLSUnusable`,
    with the pod's words: its requests get 503.

    `blocked` says why the current config did not reach the ConfigMap: it stands on every CR the pods
    do not serve yet (those they serve are Programmed all the same).
    """
    if not verdict.included:
        return NOT_ACCEPTED
    generation = (verdict.last_accepted or {}).get("generation") if verdict.fallback else None
    subject = f"its last accepted version (generation {generation})" if verdict.fallback else "its current spec"
    serving = [r for r in reports if served.holds(r.config_hash, ref, digest)]
    message = f"{len(serving)}/{len(reports)} pods serve {subject}"
    held = [r.held[ref.config_name] for r in serving if ref.config_name in r.held]
    if held:
        why = "; ".join(dict.fromkeys(held))
        return Condition("Programmed", False, "BackendTLSUnusable", f"{message}; {len(held)} hold its backend "
                         f"unavailable (its requests get 503 backend_tls_unusable): {why}", generation)
    if reports and len(serving) == len(reports):
        if verdict.disabled:
            return Condition("Programmed", False, "Disabled", f"disabled by spec.enabled: false; {message}", generation)
        return Condition("Programmed", True, "Programmed", message, generation)
    if blocked is not None:
        return replace(blocked, generation=generation)
    if not reports:
        return Condition("Programmed", False, "Pending", "no ready gateway pods to serve it", generation)
    others = [r for r in reports if r not in serving]
    notes = "; ".join(f"{r.pod}: {r.problem}" for r in others if r.problem)
    message += f" ({notes})" if notes else ""
    reason = "Rejected" if any(r.rejected for r in others) else "Pending"
    return Condition("Programmed", False, reason, message, generation)


def kept(previous: Sequence[Mapping[str, Any]], type_: str, unknown: str) -> Condition:
    """A condition as the status holds it (a verdict kept while config.yaml is broken), else Unknown."""
    for c in previous:
        if c.get("type") == type_:
            status = {"True": True, "False": False}.get(c.get("status", ""))
            return Condition(type_, status, c.get("reason", ""), c.get("message", ""))
    return Condition(type_, None, "Pending", unknown)


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
            "observedGeneration": generation if condition.generation is None else condition.generation,
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
            kind = "Normal" if c["status"] == "True" or c["reason"] in _DELIBERATE else "Warning"
            events.append((kind, c["reason"], f"{c['type']}={c['status']}: {c['message']}"))
    return events


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: a key `new` lacks is set to null,
    or the API server would keep it (a last accepted spec must not keep a field its owner removed)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    patch = {key: None for key in old if key not in new}
    patch.update({key: merge_patch(old.get(key), value) for key, value in new.items() if old.get(key) != value})
    return patch
