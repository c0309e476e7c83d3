"""CRs to create and what to read back: conditions, the rendered routes.yaml, the audit trail of writes."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import yaml

from tests.cluster.controlplane import ApiError, ControlPlane
from tests.cluster.parts import CM_PATH

API = "/apis/gateway.apigw.io/v1alpha1"


def namespace(plane: ControlPlane, name: str) -> str:
    try:
        plane.api.post("/api/v1/namespaces", {"metadata": {"name": name}})
    except ApiError as exc:
        if exc.status != 409:
            raise
    return name


def gatewayroute(name: str, namespace: str, prefix: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.apigw.io/v1alpha1", "kind": "GatewayRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"match": {"path_prefix": prefix}, "backend": {"service": name, "url": f"http://{name}.{namespace}:8080"}, **spec},
    }


ZERO = f"0.{'0' * 400}1s"
"""A duration with a non-zero digit for the CRD's schema, 0.0 s as a float for the model: a spec that only the
model refuses (the CRD refuses every path, host or name the model does)."""


def model_refused(route: dict[str, Any]) -> dict[str, Any]:
    """`route` with a backend timeout only the model refuses (`spec.backend.timeout`)."""
    route["spec"]["backend"]["timeout"] = ZERO
    return route


def ratelimitpolicy(name: str, namespace: str, requests: int = 100) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.apigw.io/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"requests": requests, "period": "1m"},
    }


def path_of(body: dict[str, Any]) -> str:
    plural = {"GatewayRoute": "gatewayroutes", "RateLimitPolicy": "ratelimitpolicies"}[body["kind"]]
    return f"{API}/namespaces/{body['metadata']['namespace']}/{plural}/{body['metadata']['name']}"


def create(plane: ControlPlane, body: dict[str, Any]) -> dict[str, Any]:
    return plane.api.post(path_of(body).rsplit("/", 1)[0], body)


def conditions(plane: ControlPlane, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """type -> condition, as stored now."""
    try:
        found = plane.api.get(path_of(body))
    except ApiError as exc:
        if exc.status == 404:
            return {}
        raise
    return {c["type"]: c for c in (found.get("status") or {}).get("conditions") or []}


def summary(plane: ControlPlane, body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """type -> (status, reason)."""
    return {t: (c["status"], c["reason"]) for t, c in conditions(plane, body).items()}


def routes_yaml(plane: ControlPlane) -> dict[str, Any]:
    """The operator's routes.yaml in the ConfigMap, parsed ({} while it has written none)."""
    text = (plane.api.get(CM_PATH).get("data") or {}).get("routes.yaml")
    return yaml.safe_load(text) if text else {}


def served(pod_ip: str, port: int) -> str:
    """The hash of the config a gateway pod serves, from its `/_health/ready`."""
    with urllib.request.urlopen(f"http://{pod_ip}:{port}/_health/ready", timeout=5) as response:
        return json.loads(response.read())["config_hash"]


def config_annotation(plane: ControlPlane) -> str | None:
    """The hash of the config the operator wants served, as the ConfigMap names it."""
    return (plane.api.get(CM_PATH)["metadata"].get("annotations") or {}).get("gateway.apigw.io/config-hash")


def route_names(plane: ControlPlane) -> list[str]:
    return [r["name"] for r in routes_yaml(plane).get("routes") or []]


def requests_by(plane: ControlPlane, credential: str) -> list[dict[str, Any]]:
    """Audit events of the requests made with one token (its credential id), in order."""
    return [
        e for e in plane.audit()
        if credential in (e.get("user", {}).get("extra", {}).get("authentication.kubernetes.io/credential-id") or [])
    ]


def table(text: str) -> dict[str, dict[str, str]]:
    """kubectl's table output: row name -> column -> cell, cut at the header's column starts (an empty
    cell of a CRD's printer column is blank)."""
    header, *rows = text.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    bounds = list(zip(starts, [*starts[1:], None]))
    cells = [[row[a:b].strip() for a, b in bounds] for row in rows]
    return {row[0]: dict(zip(header.split(), row)) for row in cells}


def writes_by(plane: ControlPlane, credential: str) -> list[dict[str, Any]]:
    return [e for e in requests_by(plane, credential) if e["verb"] in ("create", "update", "patch", "delete")]
