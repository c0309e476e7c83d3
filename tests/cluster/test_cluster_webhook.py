"""The admission webhook on a real API server: the shipped ValidatingWebhookConfiguration (pointed at a
loopback URL instead of the in-cluster Service, with a self-signed certificate in place of cert-manager's),
the operator serving it with the flags the Deployment passes.

What the operator would not accept is refused at `kubectl apply` with the message its status would carry;
what it would is admitted; with no operator answering, every change goes through (failurePolicy Ignore).
"""

from __future__ import annotations

import base64
import copy
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from apigw.config.loader import ROUTES_FILE
from apigw.testkit.certs import write_self_signed
from apigw.testkit.redis import free_port
from apigw_operator.reconciler import configmap_size
from apigw_operator.render import render
from tests.cluster.conftest import manifest
from tests.cluster.controlplane import ApiError, ControlPlane
from tests.cluster.objects import (
    conditions,
    create,
    gatewayroute,
    model_refused,
    namespace,
    path_of,
    ratelimitpolicy,
    summary,
)
from tests.cluster.parts import CM_PATH, OperatorProcess, holder, wait_for

CONFIGURATIONS = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
SHIPPED = manifest("manifests/operator/webhook.yaml", "ValidatingWebhookConfiguration")


def apply(plane: ControlPlane, body: dict[str, Any], *flags: str) -> subprocess.CompletedProcess[str]:
    return plane.kubectl("apply", *flags, "-f", "-", stdin=yaml.safe_dump(body), check=False)


def denied(name: str, message: str) -> str:
    """How kubectl reports a refusal by the webhook `name` of the shipped configuration."""
    return f'admission webhook "{name}" denied the request: {message}'


def exists(plane: ControlPlane, body: dict[str, Any]) -> bool:
    try:
        plane.api.get(path_of(body))
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


class Webhooks:
    """Operator replicas serving the webhook, each on its own port with its own certificate, and the
    shipped configuration pointed at one of them."""

    def __init__(self, plane: ControlPlane, operators: Callable[..., OperatorProcess]):
        self.plane, self.operators = plane, operators
        self.ports: dict[str, int] = {}

    def start(self, name: str = "operator", *args: str) -> OperatorProcess:
        cert, key = self.plane.dir / f"{name}-webhook.crt", self.plane.dir / f"{name}-webhook.key"
        write_self_signed(cert, key)  # for 127.0.0.1, as cert-manager's is for the Service's name
        port = self.ports[name] = free_port()
        return self.operators(name, "--webhook", f"127.0.0.1:{port}", "--webhook-cert-file", str(cert),
                              "--webhook-key-file", str(key), *args)

    def point_at(self, replica: OperatorProcess) -> None:
        """The shipped configuration with a URL for the Service and a caBundle for cert-manager's cainjector;
        returns once the replica answers."""
        configuration = copy.deepcopy(SHIPPED)
        del configuration["metadata"]["annotations"]
        ca = base64.b64encode((self.plane.dir / f"{replica.name}-webhook.crt").read_bytes()).decode()
        for hook in configuration["webhooks"]:
            url = f"https://127.0.0.1:{self.ports[replica.name]}{hook['clientConfig']['service']['path']}"
            hook["clientConfig"] = {"url": url, "caBundle": ca}
        self.remove()
        self.plane.api.post(CONFIGURATIONS, configuration)
        probe = model_refused(gatewayroute("probe", namespace(self.plane, "probe"), "/probe"))

        def answers() -> bool:
            assert replica.process is not None and replica.process.poll() is None, f"{replica.name} exited"
            return "denied the request: spec.backend.timeout" in apply(self.plane, probe, "--dry-run=server").stderr

        try:  # a slow first start on a fresh machine: alive first, then the webhook, each with its own wait
            wait_for(replica.alive, timeout=120, what=f"{replica.name} alive")
            wait_for(answers, timeout=60, what=f"the webhook of {replica.name} answers")
        except AssertionError as exc:  # a failure that says why: the replica's own account of its start
            raise AssertionError(f"{exc}\n--- the end of {replica.name}'s log:\n{replica.log_text()[-6000:]}") from None

    def remove(self) -> None:
        self.plane.api.delete(f"{CONFIGURATIONS}/{SHIPPED['metadata']['name']}")


@pytest.fixture
def webhooks(cluster: ControlPlane, operators: Callable[..., OperatorProcess]) -> Iterator[Webhooks]:
    found = Webhooks(cluster, operators)
    yield found
    found.remove()


def test_what_the_operator_would_not_accept_is_refused_at_apply_and_nothing_else(cluster: ControlPlane, webhooks: Webhooks) -> None:
    ns = namespace(cluster, "hook")
    operator = webhooks.start()
    webhooks.point_at(operator)
    orders = gatewayroute("orders", ns, "/orders")
    assert apply(cluster, orders).returncode == 0
    wait_for(lambda: summary(cluster, orders).get("Accepted") == ("True", "Accepted"), what="orders accepted")

    # A route that would lose a conflict: refused, naming the winner; nothing stored.
    late = gatewayroute("shadow", ns, "/orders")  # after "orders" by name too: creationTimestamp has seconds only
    conflict = ("spec.match: same host, path and method as route 'hook.orders' (GatewayRoute hook/orders), which wins: "
                "config.yaml's routes first, then CRs oldest first (creationTimestamp, then namespace/name)")
    refused = apply(cluster, late)
    assert refused.returncode == 1 and denied("gatewayroutes.gateway.apigw.io", conflict) in refused.stderr, refused.stderr
    assert not exists(cluster, late)
    assert denied("gatewayroutes.gateway.apigw.io", conflict) in apply(cluster, late, "--dry-run=server").stderr

    # What only the config model (not the CRD's schema and CEL rules) refuses, for both kinds.
    encoded = apply(cluster, model_refused(gatewayroute("encoded", ns, "/encoded")))
    assert encoded.returncode == 1 and 'denied the request: spec.backend.timeout: ' in encoded.stderr, encoded.stderr
    zero = ratelimitpolicy("zero", ns)
    zero["spec"]["period"] = f"0.{'0' * 400}1s"  # a non-zero digit for the schema, 0.0 s as a float for the model
    refused = apply(cluster, zero)
    assert refused.returncode == 1
    assert denied("ratelimitpolicies.gateway.apigw.io", "spec.period: ") in refused.stderr, refused.stderr
    # An edit the operator would not accept: refused; the served route keeps its spec.
    moved = model_refused(gatewayroute("orders", ns, "/orders"))
    assert apply(cluster, moved).returncode == 1
    assert cluster.api.get(path_of(orders))["spec"]["match"] == {"path_prefix": "/orders"}

    # Unrelated valid changes pass; a dangling policy reference passes with a warning (apply order).
    assert apply(cluster, gatewayroute("payments", ns, "/payments")).returncode == 0
    assert apply(cluster, ratelimitpolicy("per-client", ns)).returncode == 0
    dangling = apply(cluster, gatewayroute("search", ns, "/search", ratelimit="missing"))
    assert dangling.returncode == 0
    assert "Warning: admitted, but not served until this is resolved: RateLimitPolicy 'missing' not found" in dangling.stderr
    assert cluster.kubectl("label", "gatewayroute", "orders", "-n", ns, "team=shop").returncode == 0

    # The operator stopped: nothing answers, nothing is blocked, and the status reports what the webhook
    # would have refused, in the same words.
    operator.stop()
    began = time.monotonic()
    admitted = apply(cluster, late)
    print(f"create with the operator down: {time.monotonic() - began:.2f} s")
    assert admitted.returncode == 0, admitted.stderr
    assert apply(cluster, gatewayroute("reports", ns, "/reports")).returncode == 0
    webhooks.start("restarted")
    wait_for(lambda: summary(cluster, late).get("Accepted") == ("False", "Conflicted"), what="shadow conflicted")
    assert conditions(cluster, late)["Accepted"]["message"] == conflict


def test_a_follower_answers_as_the_leader_would(cluster: ControlPlane, webhooks: Webhooks) -> None:
    """Both replicas keep the whole index: the Service may send a review to either."""
    ns = namespace(cluster, "follow")
    leader = webhooks.start("replica-a")
    wait_for(lambda: holder(cluster).startswith("replica-a"), what="replica-a holds the Lease")
    follower = webhooks.start("replica-b")
    webhooks.point_at(follower)
    orders = gatewayroute("orders", ns, "/orders")
    create(cluster, orders)
    wait_for(lambda: summary(cluster, orders).get("Accepted") == ("True", "Accepted"), what="the leader accepts orders")
    refused = apply(cluster, gatewayroute("shadow", ns, "/orders"))  # after "orders" in the same second too
    assert refused.returncode == 1 and "as route 'follow.orders' (GatewayRoute follow/orders)" in refused.stderr, refused.stderr
    assert leader.process is not None and leader.process.poll() is None
    assert apply(cluster, gatewayroute("other", ns, "/other")).returncode == 0


def test_a_change_that_would_overflow_the_configmap_is_refused(cluster: ControlPlane, webhooks: Webhooks) -> None:
    ns = namespace(cluster, "full")
    first = create(cluster, gatewayroute("first", ns, "/first"))  # stored, with the CRD's defaults
    second = gatewayroute("second", ns, "/second")
    defaulted = cluster.api.post(path_of(second).rsplit("/", 1)[0] + "?dryRun=All", second)
    configmap = cluster.api.get(CM_PATH)
    config_yaml = configmap["data"]["config.yaml"]
    one, two = (configmap_size(configmap, {ROUTES_FILE: render(crs, [], config_yaml).routes_yaml})
                for crs in ([first], [first, defaulted]))
    limit = (one + two) // 2  # room for the first route, not for both
    operator = webhooks.start("operator", "--configmap-limit", str(limit), "--route-shards", "0")
    webhooks.point_at(operator)
    wait_for(lambda: summary(cluster, first).get("Accepted") == ("True", "Accepted"), what="first accepted")
    refused = apply(cluster, second)
    assert refused.returncode == 1, refused.stderr
    assert f"would make ConfigMap api-gateway/api-gateway-config {two} bytes, over its limit of {limit}" in refused.stderr


def test_a_route_outside_its_namespace_claims_is_forbidden_until_the_namespace_is_labelled(
    cluster: ControlPlane, webhooks: Webhooks
) -> None:
    """The ownership rules of config.yaml at apply time, with the namespace labels the operator watches."""
    ownership = "ownership:\n  routes:\n    - namespaces: {labels: {team: hooks}}\n      hostnames: [hooks.example.com]\n"
    config_yaml = cluster.api.get(CM_PATH)["data"]["config.yaml"] + ownership
    cluster.api.merge(CM_PATH, {"data": {"config.yaml": config_yaml}})
    ns = namespace(cluster, "claims")
    operator = webhooks.start()
    webhooks.point_at(operator)
    orders = gatewayroute("orders", ns, "/orders", match={"host": "hooks.example.com", "path_prefix": "/orders"})
    refused = apply(cluster, orders)
    assert refused.returncode == 1, refused.stderr
    assert denied("gatewayroutes.gateway.apigw.io", "namespace 'claims' may attach no routes") in refused.stderr
    with pytest.raises(ApiError) as forbidden:
        cluster.api.post(path_of(orders).rsplit("/", 1)[0], orders)
    assert forbidden.value.status == 403
    assert not exists(cluster, orders)
    cluster.kubectl("label", "namespace", ns, "team=hooks")
    wait_for(lambda: apply(cluster, orders).returncode == 0, what="admitted once the namespace is labelled")
    wait_for(lambda: summary(cluster, orders).get("Accepted") == ("True", "Accepted"), what="orders accepted")
