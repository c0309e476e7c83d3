"""A real Kubernetes control plane on loopback: etcd and kube-apiserver built by tests/apiserver/build.sh.

No kubelet, no controller manager, no scheduler ("envtest"): objects are stored, validated, admitted and
authorized exactly as in a cluster, but nothing acts on them. Authentication by bearer tokens: a static
admin token (group system:masters) for the test, and real ServiceAccount tokens from the TokenRequest
API for the operator, so the operator runs with exactly the RBAC rules of manifests/operator/rbac.yaml.
Writes are recorded in an audit log, so a test can tell which credential wrote what.
"""

from __future__ import annotations

import json
import secrets
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from apigw.testkit.certs import write_self_signed
from apigw.testkit.redis import free_port

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tests/apiserver/build.sh"
HOST = "127.0.0.1"
OPERATOR_USER = "system:serviceaccount:api-gateway:api-gateway-operator"
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "users": [OPERATOR_USER]},  # everything the operator asks, reads included
        {"level": "Metadata", "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
        {"level": "None"},
    ],
}


def terminate(process: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    """SIGTERM a process this tier started (by its PID), SIGKILL it if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def binaries() -> Path | None:
    """The directory holding kube-apiserver, etcd and kubectl at the pinned versions, if built."""
    found = subprocess.run(["bash", str(BUILD), "--check"], capture_output=True, text=True, check=False)
    return Path(found.stdout.strip()) if found.returncode == 0 else None


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(f"{status}: {body.get('message', body)}")
        self.status = status
        self.body = body


class Api:
    """A minimal JSON client for the test's own setup and checks (the operator uses its real client)."""

    def __init__(self, server: str, token: str, ca_file: Path):
        self.server, self.token = server, token
        self.context = ssl.create_default_context(cafile=str(ca_file))

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                warnings: list[str] | None = None) -> dict[str, Any]:
        return json.loads(self.text(method, path, body, content_type, warnings) or "{}")

    def text(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
             warnings: list[str] | None = None) -> str:
        """The response body; a 429 (e.g. a new CRD's storage still initializing) is retried as
        client-go does, after its Retry-After, for up to 30 s."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return self._text(method, path, body, content_type, warnings)
            except ApiError as exc:
                if exc.status != 429 or time.monotonic() > deadline:
                    raise
                time.sleep(float((exc.body.get("details") or {}).get("retryAfterSeconds") or 1))

    def _text(self, method: str, path: str, body: Any, content_type: str, warnings: list[str] | None) -> str:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json", "Content-Type": content_type}
        request = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                if warnings is not None:
                    warnings += response.headers.get_all("Warning") or []
                return response.read().decode()
        except urllib.error.HTTPError as error:
            with error:
                text = error.read()
            try:
                found = json.loads(text)
            except ValueError:
                found = {"message": text.decode(errors="replace")}
            raise ApiError(error.code, found) from None

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> dict[str, Any]:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any) -> dict[str, Any]:
        return self.request("PUT", path, body)

    def merge(self, path: str, patch: Any) -> dict[str, Any]:
        return self.request("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, path: str) -> None:
        try:
            self.request("DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise


class ControlPlane:
    def __init__(self, bin_dir: Path, work: Path | None = None):
        self.bin = bin_dir
        self.dir = work or Path(tempfile.mkdtemp(prefix="apigw-k8s-"))
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []
        self.admin_token = secrets.token_hex(16)
        self.port = free_port()
        self.server = f"https://{HOST}:{self.port}"
        self.ca_file = self.dir / "apiserver.crt"
        self.admin_kubeconfig = self.dir / "admin.kubeconfig"
        self.audit_log = self.dir / "audit.log"
        self.startup_seconds = 0.0
        self.api: Api
        """The admin's client, once `start()` has written the serving certificate."""

    def start(self, timeout: float = 90) -> None:
        began = time.monotonic()
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://{HOST}:{etcd_port}"
        self._spawn("etcd", [
            str(self.bin / "etcd"), "--data-dir", str(self.dir / "etcd"), "--name", "default",
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://{HOST}:{peer_port}",
            "--initial-advertise-peer-urls", f"http://{HOST}:{peer_port}",
            "--initial-cluster", f"default=http://{HOST}:{peer_port}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        write_self_signed(self.ca_file, self.dir / "apiserver.key", name="localhost")
        self.api = Api(self.server, self.admin_token, self.ca_file)
        self._write_service_account_key()
        (self.dir / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        (self.dir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        self._spawn("kube-apiserver", [
            str(self.bin / "kube-apiserver"),
            "--etcd-servers", etcd_url,
            "--bind-address", HOST, "--advertise-address", HOST, "--secure-port", str(self.port),
            "--tls-cert-file", str(self.ca_file), "--tls-private-key-file", str(self.dir / "apiserver.key"),
            "--cert-dir", str(self.dir / "certs"),
            "--token-auth-file", str(self.dir / "tokens.csv"),
            "--authorization-mode", "RBAC",
            "--service-account-issuer", self.server,
            "--service-account-key-file", str(self.dir / "sa.key"),
            "--service-account-signing-key-file", str(self.dir / "sa.key"),
            "--service-cluster-ip-range", "10.96.0.0/24",
            "--endpoint-reconciler-type", "none",
            "--audit-policy-file", str(self.dir / "audit-policy.yaml"),
            "--audit-log-path", str(self.audit_log), "--audit-log-mode", "blocking",
            "--profiling=false",
        ])
        self._wait_ready(timeout)
        self.admin_kubeconfig.write_text(self.kubeconfig("admin", self.admin_token))
        self.startup_seconds = time.monotonic() - began

    def _write_service_account_key(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.dir / "sa.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")
        self._logs.append(log)
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")
            try:
                self.api.text("GET", "/readyz")
                return
            except (ApiError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kube-apiserver not ready after {timeout}s:\n{self.log_tail('kube-apiserver')}")
                time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kubeconfig(self, user: str, token: str) -> str:
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": user,
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "test", "user": user}}],
        })

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A real ServiceAccount token (TokenRequest API), as a kubelet would project into the pod."""
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": seconds}}
        found = self.api.post(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", request)
        return found["status"]["token"]

    def audit(self) -> list[dict[str, Any]]:
        """Audit events (stage ResponseComplete) of every write so far, and of every request the operator made."""
        text = self.audit_log.read_text() if self.audit_log.exists() else ""
        return [e for e in map(json.loads, text.splitlines()) if e.get("stage") == "ResponseComplete"]

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """kubectl as the admin, exactly as a person types it (arguments after `kubectl`)."""
        done = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.admin_kubeconfig), *args],
            capture_output=True, text=True, input=stdin, timeout=60, check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done

    def stop(self) -> None:
        for name in ("kube-apiserver", "etcd"):
            terminate(self.processes.get(name))
        for log in self._logs:
            log.close()
