"""What the e2e tests use to drive the kind cluster: kubectl, tokens, waiting, images and Secrets."""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pytest_kind import KindCluster

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "api-gateway"
IMAGES = {"Dockerfile.gateway": "apigw-gateway:0.1.0", "Dockerfile.operator": "apigw-operator:0.1.0"}
T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 180, interval: float = 2) -> T:
    """Retry `check` until it returns without an AssertionError, or re-raise the last one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, subprocess.CalledProcessError):
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def sign(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "e2e", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex, **claims}
    return jwt.encode(payload, key, algorithm="RS256")


@dataclass
class Deployment:
    cluster: KindCluster
    private_key: rsa.RSAPrivateKey

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cluster.kubectl(*args, input=input)

    def json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def token(self, **claims: Any) -> str:
        """A token the deployed gateway accepts (signed with the key whose public half it holds)."""
        return sign(self.private_key, **claims)

    def get(self, kind: str, name: str, namespace: str = "e2e") -> dict[str, Any]:
        return self.json("get", kind, name, "-n", namespace)

    def gateway_pods(self) -> list[dict[str, Any]]:
        return self.json("get", "pods", "-n", NAMESPACE, "-l", "app=api-gateway")["items"]


def missing_tools() -> str | None:
    """Why the e2e tests cannot run here, or None."""
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    daemon = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if daemon.returncode != 0:
        return "the Docker daemon is not reachable (`docker info` failed)"
    return None


def build_and_load(cluster: KindCluster) -> None:
    for dockerfile, tag in IMAGES.items():
        subprocess.run(["docker", "build", "-f", dockerfile, "-t", tag, "."], cwd=ROOT, check=True)
        cluster.load_docker_image(tag)


def deploy(deployment: Deployment) -> None:
    """Everything manifests/ holds except tls/ and monitoring/, with Secrets made from fresh keys."""
    public_pem = deployment.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert_pem, key_pem = self_signed_tls()
    kubectl = deployment.kubectl
    kubectl("apply", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    kubectl("apply", "-f", str(ROOT / "manifests" / "namespace.yaml"))
    kubectl("apply", "-f", "-", input=secret("api-gateway-secrets", "Opaque", {"jwt-public-key.pem": public_pem}))
    kubectl("apply", "-f", "-", input=secret("api-gateway-tls", "kubernetes.io/tls", {"tls.crt": cert_pem, "tls.key": key_pem}))
    webhook_cert, webhook_key = self_signed_tls()  # cert-manager's part; without its CA in caBundle the API
    kubectl("apply", "-f", "-", input=secret(      # server cannot call the webhook, and failurePolicy Ignore admits
        "api-gateway-operator-webhook-tls", "kubernetes.io/tls", {"tls.crt": webhook_cert, "tls.key": webhook_key}))
    for part in ("redis", "gateway"):
        kubectl("apply", "-k", str(ROOT / "manifests" / part))
    kubectl("apply", "-f", "-", input=without_cert_manager(kubectl("kustomize", str(ROOT / "manifests" / "operator"))))
    kubectl("apply", "-f", str(ROOT / "e2e" / "resources" / "backend.yaml"))
    for workload in ("statefulset/redis", "deployment/api-gateway", "deployment/api-gateway-operator"):
        kubectl("rollout", "status", workload, "-n", NAMESPACE, "--timeout=300s")
    kubectl("rollout", "status", "deployment/echo", "-n", "e2e", "--timeout=300s")
    kubectl("apply", "-f", str(ROOT / "e2e" / "resources" / "routes.yaml"))


def without_cert_manager(documents: str) -> str:
    """The manifests minus cert-manager's kinds (Issuer, Certificate), which need cert-manager installed."""
    kept = [d for d in yaml.safe_load_all(documents) if d and d.get("apiVersion", "").split("/")[0] != "cert-manager.io"]
    return yaml.safe_dump_all(kept)


def self_signed_tls() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api-gateway.api-gateway.svc")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def secret(name: str, type_: str, data: dict[str, bytes]) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Secret", "type": type_,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    })
