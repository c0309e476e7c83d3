"""End to end on kind: CRs become routes, traffic flows, tokens are checked, limits bite, status tells.

Routes (e2e/resources/routes.yaml): /public (no auth) and /private (token required, 3 requests per
minute per X-E2E-Client header), both to the `echo` backend in namespace e2e.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from harness import NAMESPACE, Deployment, eventually, sign


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def conditions(deployed: Deployment, kind: str, name: str) -> dict[str, dict[str, Any]]:
    status = deployed.get(kind, name).get("status", {})
    return {c["type"]: c for c in status.get("conditions", [])}


def test_public_route_serves_traffic(deployed: Deployment, gateway_port: int) -> None:
    eventually(lambda: _assert_status(get(gateway_port, "/public/"), 200))


def test_unknown_path_is_a_json_404(deployed: Deployment, gateway_port: int) -> None:
    status, _, body = get(gateway_port, "/no-such-route")
    assert status == 404
    assert set(json.loads(body)) == {"error", "request_id"}


def test_private_route_checks_the_token(deployed: Deployment, gateway_port: int) -> None:
    client = {"X-E2E-Client": uuid.uuid4().hex}
    eventually(lambda: _assert_status(get(gateway_port, "/private/", client), 401))
    _, headers, _ = get(gateway_port, "/private/", client)
    assert headers["WWW-Authenticate"].startswith("Bearer")
    expired = deployed.token(exp=1)
    assert get(gateway_port, "/private/", {**client, "Authorization": f"Bearer {expired}"})[0] == 401
    foreign = sign(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert get(gateway_port, "/private/", {**client, "Authorization": f"Bearer {foreign}"})[0] == 401
    good = {**client, "Authorization": f"Bearer {deployed.token()}"}
    assert get(gateway_port, "/private/", good)[0] == 200


def test_rate_limit_answers_429_with_retry_after(deployed: Deployment, gateway_port: int) -> None:
    headers = {"X-E2E-Client": uuid.uuid4().hex, "Authorization": f"Bearer {deployed.token()}"}
    eventually(lambda: _assert_status(get(gateway_port, "/private/", {"X-E2E-Client": "probe"}), 401))
    statuses = [get(gateway_port, "/private/", headers)[0] for _ in range(10)]
    assert statuses[0] == 200 and 429 in statuses, statuses
    status, response_headers, body = get(gateway_port, "/private/", headers)
    assert status == 429 and int(response_headers["Retry-After"]) > 0
    assert json.loads(body)["error"]


def test_cr_status_reports_programmed_pods(deployed: Deployment) -> None:
    def programmed() -> None:
        for kind, name in [("gatewayroute", "public"), ("gatewayroute", "private"), ("ratelimitpolicy", "three-per-minute")]:
            found = conditions(deployed, kind, name)
            assert found["Accepted"]["status"] == "True", (kind, name, found)
            assert found["Programmed"]["status"] == "True", (kind, name, found)
        pods = len(deployed.gateway_pods())
        programmed = conditions(deployed, "gatewayroute", "public")["Programmed"]
        assert programmed["reason"] == "Programmed"
        assert re.fullmatch(rf"{pods}/{pods} pods serve its current spec", programmed["message"]), programmed

    eventually(programmed)


def test_invalid_cr_is_reported_and_others_keep_serving(deployed: Deployment, gateway_port: int) -> None:
    broken = {
        "apiVersion": "gateway.apigw.io/v1alpha1", "kind": "GatewayRoute",
        "metadata": {"name": "broken", "namespace": "e2e"},
        "spec": {"match": {"path_prefix": "/broken"}, "backend": {"service": "echo", "url": "http://echo.e2e:8080"},
                 "ratelimit": "no-such-policy"},
    }
    deployed.kubectl("apply", "-f", "-", input=json.dumps(broken))
    try:
        eventually(lambda: _assert_condition(deployed, "broken", "ResolvedRefs", "False"))
        found = conditions(deployed, "gatewayroute", "broken")
        assert found["ResolvedRefs"]["reason"] == "PolicyNotFound"
        assert "'no-such-policy'" in found["ResolvedRefs"]["message"]
        assert (found["Programmed"]["status"], found["Programmed"]["reason"]) == ("False", "NotAccepted")
        assert get(gateway_port, "/public/")[0] == 200
    finally:
        deployed.kubectl("delete", "gatewayroute", "broken", "-n", "e2e")


def test_disabling_a_route_reaches_every_pod(deployed: Deployment, gateway_port: int) -> None:
    eventually(lambda: _assert_status(get(gateway_port, "/public/"), 200))
    patch = ["patch", "gatewayroute", "public", "-n", "e2e", "--type=merge", "-p"]
    deployed.kubectl(*patch, '{"spec": {"enabled": false}}')
    try:
        eventually(lambda: _assert_status(get(gateway_port, "/public/"), 404))
        eventually(lambda: _assert_every_pod_serves_one_config(deployed))
        accepted = conditions(deployed, "gatewayroute", "public")["Accepted"]
        assert accepted["status"] == "True" and "disabled by spec.enabled: false" in accepted["message"], accepted
    finally:
        deployed.kubectl(*patch, '{"spec": {"enabled": true}}')
    eventually(lambda: _assert_status(get(gateway_port, "/public/"), 200))


def test_runbook_validate_config_command_works_in_the_pod(deployed: Deployment) -> None:
    pod = deployed.gateway_pods()[0]["metadata"]["name"]
    output = deployed.kubectl("exec", pod, "-n", NAMESPACE, "--", "/app/gateway", "-validate-config")
    assert "OK" in output


def test_metrics_port_exports_request_counts(deployed: Deployment, gateway_port: int, metrics_port: int) -> None:
    eventually(lambda: _assert_status(get(gateway_port, "/public/"), 200))
    _, _, body = get(metrics_port, "/metrics")
    samples = [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]
    assert any(
        s.name == "gateway_http_requests_total" and s.labels == {"route": "e2e.public", "method": "GET", "status_code": "200"}
        for s in samples
    )


def _assert_status(response: tuple[int, dict[str, str], bytes], expected: int) -> None:
    assert response[0] == expected, response


def _assert_condition(deployed: Deployment, name: str, type_: str, status: str) -> None:
    assert conditions(deployed, "gatewayroute", name)[type_]["status"] == status


def _assert_every_pod_serves_one_config(deployed: Deployment) -> None:
    """Each ready gateway pod reports the config hash in force (`/_health/ready`); they must agree."""
    hashes = set()
    for pod in deployed.gateway_pods():
        body = deployed.kubectl(
            "exec", pod["metadata"]["name"], "-n", NAMESPACE, "--",
            "python", "-c", "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/_health/ready').read().decode())",
        )
        hashes.add(json.loads(body)["config_hash"])
    assert len(hashes) == 1, hashes
