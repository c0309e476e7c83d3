"""The manifests, offline: Kubernetes schema validation and the names, ports and paths the runbook uses.

Schemas: `kubernetes-validate` (bundled Kubernetes JSON schemas, strict: unknown fields are errors)
for the built-in kinds. Kinds from other projects' CRDs (cert-manager, Prometheus operator) have no
bundled schema and are listed in `FOREIGN_KINDS`; the PrometheusRule's content is checked by promtool
in test_alert_rules.py. Our own CRs (crds/examples/, e2e/resources/) are validated against crds/.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from apigw.config.loader import GLOBAL_FILE, ROUTES_FILE, parse_documents
from apigw_operator.admission import HANDLER_IDS, PATH
from apigw_operator.cli import parse_args
from apigw_operator.cluster import Target
from apigw_operator.crds import GROUP, VERSION

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
NAMESPACE = "api-gateway"
# The oldest Kubernetes we support, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.28", kubernetes_validate.latest_version()]
FOREIGN_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
# What the alerts watch (APIGatewayHighCPU, APIGatewayHighMemory): limits must leave room above them.
CPU_ALERT_CORES = 1.5
MEMORY_ALERT_BYTES = 800 * 1024**2


def load_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` builds, for layouts that list resources and generate
    ConfigMaps from files without a name suffix (the Grafana dashboards)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions"}
    assert not unsupported, f"{directory}: this loader (and the layout's simplicity) allows only resources, not {unsupported}"
    objects = [generated_configmap(directory, generator, kustomization.get("generatorOptions", {}))
               for generator in kustomization.get("configMapGenerator", [])]
    for entry in kustomization["resources"]:
        path = directory / entry
        if path.is_dir():
            objects += load_kustomization(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objects


def generated_configmap(directory: Path, generator: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    assert options == {"disableNameSuffixHash": True}, f"{directory}: only disableNameSuffixHash is supported"
    assert set(generator) <= {"name", "namespace", "files", "options"}, generator
    assert set(generator.get("options", {})) <= {"labels", "annotations"}, generator
    metadata = {"name": generator["name"], "namespace": generator["namespace"], **generator.get("options", {})}
    data = {PurePosixPath(file).name: (directory / file).read_text() for file in generator["files"]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


OBJECTS = load_kustomization(MANIFESTS)


def key(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def get(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def gateway_config() -> dict[str, Any]:
    return yaml.safe_load(get("ConfigMap", "api-gateway-config")["data"][GLOBAL_FILE])


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (`500m`, `2`, `1Gi`, `800M`) as a number."""
    number, suffix = re.fullmatch(r"([0-9.]+)(m|[KMGT]i?)?", str(value)).groups()
    scale = {None: 1, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(number) * scale[suffix]


# --- schema validation -------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("obj", OBJECTS, ids=key)
def test_manifest_matches_the_kubernetes_schema(obj: dict[str, Any], version: str) -> None:
    if (obj["apiVersion"], obj["kind"]) in FOREIGN_KINDS:
        pytest.skip(f"{obj['kind']} comes from a CRD of another project; no bundled schema")
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{key(obj)}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_only_crd_kinds_lack_a_bundled_schema() -> None:
    """A typo in a built-in kind's apiVersion must fail, not be skipped as 'foreign'."""
    missing = set()
    for obj in OBJECTS:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            missing.add((obj["apiVersion"], obj["kind"]))
    assert missing == FOREIGN_KINDS


def test_schema_validation_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(get("Deployment", "api-gateway"))
    container(deployment, "gateway")["readinesProbe"] = container(deployment, "gateway").pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_the_same_objects(tmp_path: Path) -> None:
    # Without a kubeconfig some kubectl builds (Google Cloud SDK's) ask localhost:8080 for /version even
    # to build locally: point them at a port where nothing listens instead.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none"}}],
    }))
    built = subprocess.run(["kubectl", "kustomize", str(MANIFESTS), "--kubeconfig", str(kubeconfig)],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert sorted(objects, key=key) == sorted(OBJECTS, key=key)


def test_every_namespaced_object_is_in_the_gateway_namespace() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration"}
    assert get("Namespace", NAMESPACE)
    for obj in OBJECTS:
        assert obj["metadata"].get("namespace") == (None if obj["kind"] in cluster_scoped else NAMESPACE), key(obj)


# --- the gateway: names, ports and paths from the runbook ---------------------------------------


def test_configmap_validates_with_the_gateways_own_loader() -> None:
    data = get("ConfigMap", "api-gateway-config")["data"]
    config = parse_documents(data)
    assert config.redis is not None and config.listen.tls is not None
    assert config.auth.keys


def test_configmap_leaves_routes_yaml_to_the_operator() -> None:
    """`kubectl apply` merges ConfigMap data by key: a key we never apply is one we never clobber."""
    assert ROUTES_FILE not in get("ConfigMap", "api-gateway-config")["data"]


def test_gateway_deployment_and_service_match_the_runbook() -> None:
    deployment = get("Deployment", "api-gateway")
    labels = {"app": "api-gateway"}
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert deployment["spec"]["template"]["metadata"]["labels"] == labels
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; apply would reset it"
    gateway = container(deployment, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": 8080, "https": 8443, "metrics": 9090}

    service = get("Service", "api-gateway")
    assert service["spec"]["selector"] == labels
    service_ports = {p["port"]: ports[p["targetPort"]] for p in service["spec"]["ports"]}
    assert service_ports == {80: 8080, 443: 8443, 9090: 9090}


def test_container_ports_are_where_config_yaml_listens() -> None:
    """The probes use the named ports, and the operator asks each pod's IP on config.yaml's metrics port
    for `/_health/ready`: each named port must be one the gateway listens on."""
    from apigw_operator.reconciler import metrics_port

    data = get("ConfigMap", "api-gateway-config")["data"]
    listen = parse_documents(data).listen
    ports = {p["name"]: p["containerPort"] for p in container(get("Deployment", "api-gateway"), "gateway")["ports"]}
    assert ports == {"http": listen.port, "https": listen.tls_port, "metrics": listen.metrics_port}
    assert metrics_port(data[GLOBAL_FILE]) == ports["metrics"]


def test_probes_use_the_health_paths() -> None:
    gateway = container(get("Deployment", "api-gateway"), "gateway")
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/_health/live", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/_health/ready", "port": "http"}
    assert gateway["startupProbe"]["httpGet"] == {"path": "/_health/ready", "port": "http"}


def mounts(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mount path -> the volume mounted there."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container(deployment, "gateway")["volumeMounts"]}


def source_of(path: str, deployment: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The volume a file path lies in, and the file's key in it."""
    for mount, volume in mounts(deployment).items():
        if PurePosixPath(path).parent == PurePosixPath(mount):
            return volume, PurePosixPath(path).name
    raise AssertionError(f"{path} is in no mounted volume")


def test_config_files_come_from_the_named_configmap_and_secrets() -> None:
    deployment = get("Deployment", "api-gateway")
    env = {e["name"]: e["value"] for e in container(deployment, "gateway")["env"]}
    assert env["GATEWAY_CONFIG"] == "/etc/gateway/"
    config_dir = mounts(deployment)[env["GATEWAY_CONFIG"].rstrip("/")]
    shards = [{"configMap": {"name": Target().shard(n), "optional": True}} for n in range(1, Target.route_shards + 1)]
    assert config_dir == {"name": "config", "projected": {"sources": [{"configMap": {"name": "api-gateway-config"}}, *shards]}}, \
        "mounted whole (no items, no subPath), so updates arrive; with every route shard the operator may write"
    for source in shards:
        shipped = get("ConfigMap", source["configMap"]["name"])
        assert "data" not in shipped, "shipped empty: re-applying the manifests never clobbers the operator's routes"

    config = gateway_config()
    for path, secret, item in [
        (config["auth"]["keys"][0]["file"], "api-gateway-secrets", "jwt-public-key.pem"),
        (config["listen"]["tls"]["cert_file"], "api-gateway-tls", "tls.crt"),
        (config["listen"]["tls"]["key_file"], "api-gateway-tls", "tls.key"),
    ]:
        volume, name = source_of(path, deployment)
        assert (volume["secret"]["secretName"], name) == (secret, item)
        assert "items" not in volume["secret"], "mounted whole, so rotations arrive"
    assert get("Certificate", "api-gateway-tls")["spec"]["secretName"] == "api-gateway-tls"


@pytest.mark.parametrize("certificate", [o for o in OBJECTS if o["kind"] == "Certificate"], ids=key)
def test_certificate_issuer_is_deployed(certificate: dict[str, Any]) -> None:
    issuer = certificate["spec"]["issuerRef"]
    assert get(issuer["kind"], issuer["name"])["metadata"]["namespace"] == certificate["metadata"]["namespace"]


def test_grace_period_covers_the_drain() -> None:
    listen = parse_documents({GLOBAL_FILE: get("ConfigMap", "api-gateway-config")["data"][GLOBAL_FILE]}).listen
    grace = get("Deployment", "api-gateway")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > listen.drain_delay + listen.drain_timeout


def test_resources_leave_room_above_the_alert_thresholds() -> None:
    resources = container(get("Deployment", "api-gateway"), "gateway")["resources"]
    assert quantity(resources["limits"]["cpu"]) > CPU_ALERT_CORES
    assert quantity(resources["limits"]["memory"]) > MEMORY_ALERT_BYTES
    for kind in ("cpu", "memory"):
        assert quantity(resources["requests"][kind]) <= quantity(resources["limits"][kind])


def test_disruption_budget_and_autoscaler_keep_pods_serving() -> None:
    hpa = get("HorizontalPodAutoscaler", "api-gateway")["spec"]
    pdb = get("PodDisruptionBudget", "api-gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api-gateway"}
    assert pdb["selector"]["matchLabels"] == {"app": "api-gateway"}
    assert hpa["minReplicas"] >= 2 and pdb["maxUnavailable"] < hpa["minReplicas"]


def test_redis_is_where_the_gateway_looks_for_it() -> None:
    """The gateway asks the sentinels of every Redis pod, by the headless service's stable names."""
    statefulset = get("StatefulSet", "redis")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app"] == "redis"
    headless = get("Service", statefulset["spec"]["serviceName"])
    assert headless["metadata"]["name"] == "redis" and headless["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in headless["spec"]["ports"]} == {6379, 26379}
    assert container(statefulset, "redis")["ports"] == [{"name": "redis", "containerPort": 6379}]
    assert container(statefulset, "sentinel")["ports"] == [{"name": "sentinel", "containerPort": 26379}]

    target = parse_documents({GLOBAL_FILE: get("ConfigMap", "api-gateway-config")["data"][GLOBAL_FILE]}).redis.sentinel()
    assert target is not None, "the gateway should ask the sentinels"
    pods = [f"redis-{n}.redis.{NAMESPACE}.svc.cluster.local" for n in range(statefulset["spec"]["replicas"])]
    assert target.sentinels == tuple((pod, 26379) for pod in pods)
    scripts = get("ConfigMap", "redis-scripts")["data"]
    assert f"sentinel monitor {target.master_name} " in scripts["sentinel.sh"]
    assert f"get-master-addr-by-name {target.master_name}" in scripts["master.sh"]
    assert f"for pod in {' '.join(pod.split('.')[0] for pod in pods)}; do" in scripts["master.sh"]
    assert f'"$pod.redis.{NAMESPACE}.svc.cluster.local" -p 26379' in scripts["master.sh"]


def test_redis_master_still_answers_the_runbooks_connectivity_check() -> None:
    master = get("Service", "redis-master")["spec"]
    assert master["selector"] == {"app": "redis"}
    assert [(p["port"], p["targetPort"]) for p in master["ports"]] == [(6379, "redis")]


def test_redis_survives_losing_a_pod() -> None:
    """Three pods for a sentinel quorum of two; one down at a time; spread over nodes where there are several."""
    statefulset = get("StatefulSet", "redis")
    assert statefulset["spec"]["replicas"] == 3
    assert "sentinel monitor mymaster $master 6379 2" in get("ConfigMap", "redis-scripts")["data"]["sentinel.sh"]
    pdb = get("PodDisruptionBudget", "redis")["spec"]
    assert pdb["selector"]["matchLabels"] == {"app": "redis"} and pdb["maxUnavailable"] == 1
    spread = statefulset["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = spread["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term == {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "redis"}}}
    for name in ("redis", "sentinel"):
        requests = container(statefulset, name)["resources"]["requests"]
        assert quantity(requests["cpu"]) > 0 and quantity(requests["memory"]) > 0
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["kubectl.kubernetes.io/default-container"] == "redis"  # the runbook's logs/exec without -c


def test_redis_start_up_scripts_are_valid_shell() -> None:
    for name, script in get("ConfigMap", "redis-scripts")["data"].items():
        checked = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=10, check=False)
        assert checked.returncode == 0, f"{name}: {checked.stderr}"


def test_prometheus_scrapes_the_metrics_port() -> None:
    monitor = get("ServiceMonitor", "api-gateway")["spec"]
    service = get("Service", "api-gateway")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    assert any(p["name"] == "metrics" and p["port"] == 9090 for p in service["spec"]["ports"])


# --- security ------------------------------------------------------------------------------------


WORKLOADS = [o for o in OBJECTS if o["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("workload", WORKLOADS, ids=key)
def test_pods_run_restricted(workload: dict[str, Any]) -> None:
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, c["name"]
        assert c["resources"]["limits"] and c["resources"]["requests"], c["name"]


def test_only_the_operator_gets_an_api_token() -> None:
    for workload in WORKLOADS:
        pod = workload["spec"]["template"]["spec"]
        if workload["metadata"]["name"] != "api-gateway-operator":
            assert pod["automountServiceAccountToken"] is False, key(workload)


def rules_of(kind: str) -> list[dict[str, Any]]:
    return get(kind, "api-gateway-operator")["rules"]


def test_operator_rbac_is_least_privilege() -> None:
    """Guard rails; tests/operator/test_rbac.py checks the rules against the requests the operator sends."""
    rules = rules_of("ClusterRole") + rules_of("Role")
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
        assert "secrets" not in rule["resources"], rule
    # Writes to existing objects are pinned to the ConfigMap and its route shards, the Deployment and the Lease.
    shards = [Target().shard(n) for n in range(1, Target.route_shards + 1)]
    for rule in rules:
        if {"patch", "update"} & set(rule["verbs"]):
            assert rule["resources"][0].endswith("/status") or rule["resourceNames"] in (
                ["api-gateway-config"], shards, ["api-gateway"], ["apigw-operator"]), rule


def test_operator_deployment_runs_as_documented() -> None:
    """POD_NAME names the Lease holder; the liveness probe is kopf's endpoint the flag sets; the metrics
    port is the one the flag sets and the Service and ServiceMonitor scrape."""
    container = get("Deployment", "api-gateway-operator")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    options, args = parse_args(container["args"])  # the operator's own parser
    assert (args.liveness, options.metrics) == ("http://0.0.0.0:8081/healthz", ("0.0.0.0", 9091))
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert {"name": "liveness", "containerPort": 8081} in container["ports"]
    assert {"name": "metrics", "containerPort": 9091} in container["ports"]
    service = get("Service", "api-gateway-operator-metrics")["spec"]
    assert service["ports"] == [{"name": "metrics", "port": 9091, "targetPort": "metrics"}]
    assert service["selector"] == get("Deployment", "api-gateway-operator")["spec"]["selector"]["matchLabels"]
    monitor = get("ServiceMonitor", "api-gateway-operator")["spec"]
    assert monitor["selector"]["matchLabels"] == get("Service", "api-gateway-operator-metrics")["metadata"]["labels"]
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]


def test_operator_webhook_is_wired_to_the_operator() -> None:
    """The ValidatingWebhookConfiguration reaches the port the operator listens on, at the paths its
    handlers serve, with a CA cert-manager injects from the Certificate whose Secret the pods mount."""
    deployment = get("Deployment", "api-gateway-operator")
    operator = deployment["spec"]["template"]["spec"]["containers"][0]
    webhook = parse_args(operator["args"])[0].webhook
    assert webhook is not None and webhook.host == "0.0.0.0"
    assert {"name": "webhook", "containerPort": webhook.port} in operator["ports"]
    assert operator["readinessProbe"]["tcpSocket"] == {"port": "webhook"}

    configuration = get("ValidatingWebhookConfiguration", "api-gateway-operator")
    service = get("Service", "api-gateway-operator-webhook")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    plurals = {crd["spec"]["names"]["plural"] for crd in CRDS.values()}
    served = {}
    for hook in configuration["webhooks"]:
        target = hook["clientConfig"]["service"]
        assert (target["namespace"], target["name"]) == (NAMESPACE, service["metadata"]["name"])
        port = next(p for p in service["spec"]["ports"] if p["port"] == target["port"])
        assert port["targetPort"] == "webhook"
        [rule] = hook["rules"]
        assert (rule["apiGroups"], rule["apiVersions"], rule["scope"]) == ([GROUP], [VERSION], "Namespaced")
        assert rule["operations"] == ["CREATE", "UPDATE"], "never DELETE, never the operator's /status writes"
        [plural] = rule["resources"]
        served[plural] = target["path"]
        # Fails open: a down operator blocks no change (README "Admission webhook"); short, side-effect free.
        assert (hook["failurePolicy"], hook["sideEffects"], hook["timeoutSeconds"]) == ("Ignore", "None", 10)
        assert hook["admissionReviewVersions"] == ["v1"]
    assert served == {plural: f"{PATH}/{HANDLER_IDS[plural]}" for plural in plurals}

    certificate = get("Certificate", "api-gateway-operator-webhook")
    namespace, name = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    assert (namespace, name) == (certificate["metadata"]["namespace"], certificate["metadata"]["name"])
    assert f"{service['metadata']['name']}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in operator["volumeMounts"]}
    for path, item in ((webhook.cert_file, "tls.crt"), (webhook.key_file, "tls.key")):
        volume = mounted[str(PurePosixPath(path).parent)]
        assert (volume["secret"]["secretName"], PurePosixPath(path).name) == (certificate["spec"]["secretName"], item)
        assert "items" not in volume["secret"], "mounted whole, so renewals arrive"


def test_operator_runs_under_its_bound_service_account() -> None:
    deployment = get("Deployment", "api-gateway-operator")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert get("ServiceAccount", account)
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = get(kind, "api-gateway-operator")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        assert get(binding["roleRef"]["kind"], binding["roleRef"]["name"])


# --- our own CRDs and the CRs written against them -----------------------------------------------

CRDS = {
    doc["spec"]["names"]["kind"]: doc
    for path in sorted((ROOT / "crds").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc and doc.get("kind") == "CustomResourceDefinition"
}
CUSTOM_RESOURCES = [
    pytest.param(doc, id=f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}")
    for path in sorted([*(ROOT / "crds" / "examples").glob("*.yaml"), *(ROOT / "e2e" / "resources").glob("*.yaml")])
    for doc in yaml.safe_load_all(path.read_text())
    if doc and doc.get("apiVersion", "").startswith("gateway.apigw.io/")
]
needs_crds = pytest.mark.skipif(not CRDS, reason="no CustomResourceDefinitions in crds/ yet")


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields made errors, as `kubectl apply`'s strict field validation does."""
    schema = {k: strict(v) if isinstance(v, dict) else v for k, v in schema.items()}
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    return schema


def cr_schema(kind: str, api_version: str) -> dict[str, Any]:
    crd = CRDS[kind]
    group, version = api_version.split("/")
    assert group == crd["spec"]["group"]
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert version in served, f"{kind} {api_version} is not served"
    schema = strict(served[version]["schema"]["openAPIV3Schema"])
    schema["properties"].setdefault("apiVersion", {"type": "string"})
    schema["properties"].setdefault("kind", {"type": "string"})
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@needs_crds
@pytest.mark.parametrize("crd", CRDS.values(), ids=lambda crd: crd["metadata"]["name"])
def test_crd_matches_the_kubernetes_schema(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, KUBERNETES_VERSIONS[0], strict=True)


@needs_crds
@pytest.mark.parametrize("resource", CUSTOM_RESOURCES)
def test_custom_resource_matches_its_crd(resource: dict[str, Any]) -> None:
    assert resource["kind"] in CRDS, f"no CRD for {resource['kind']}"
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in OAS30Validator(cr_schema(resource["kind"], resource["apiVersion"])).iter_errors(resource)
    ]
    assert not errors, errors


@needs_crds
def test_crd_validation_rejects_a_misspelt_field() -> None:
    route = next(p.values[0] for p in CUSTOM_RESOURCES if p.values[0]["kind"] == "GatewayRoute")
    wrong = copy.deepcopy(route)
    wrong["spec"]["bakend"] = wrong["spec"].pop("backend")
    errors = list(OAS30Validator(cr_schema("GatewayRoute", wrong["apiVersion"])).iter_errors(wrong))
    assert any("bakend" in e.message for e in errors)
