"""What runs against the control plane: operator processes, and gateway "pods" standing in for the kubelet.

A gateway pod here is a Pod object made from the Deployment's template, a real `gateway` process bound to
the pod's own 127.0.0.x address, and a thread doing the kubelet's part: projecting the ConfigMap into a
directory the way the kubelet updates a volume (`..data` symlink swap) and reporting the pod's IP and
readiness in its status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

from apigw.testkit.process import http_status
from apigw.testkit.redis import free_port
from apigw.testkit.volume import Projection
from tests.cluster.controlplane import ROOT, ApiError, ControlPlane, terminate

NS = "api-gateway"
CM = "api-gateway-config"
CM_PATH = f"/api/v1/namespaces/{NS}/configmaps/{CM}"
SERVICE_ACCOUNT = "api-gateway-operator"
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/apigw-operator"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT / "dataplane"), str(ROOT / "operator"), *filter(None, [os.environ.get("PYTHONPATH")])]
)}
"""For the operator and gateway processes: this checkout's code before whatever is installed."""


def wait_for(check: Any, timeout: float = 30, what: str = "") -> Any:
    """Poll `check()` until it returns something truthy; fail with `what` and its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what or check.__doc__ or check} (last: {value!r})")
        time.sleep(0.1)


def holder(plane: ControlPlane) -> str:
    """Who holds the operators' Lease ("" while no one does)."""
    try:
        return plane.api.get(LEASE_PATH)["spec"].get("holderIdentity") or ""
    except ApiError as exc:
        if exc.status == 404:
            return ""
        raise


class OperatorProcess:
    """`python -m apigw_operator` with the ServiceAccount's own token: the shipped RBAC, nothing more."""

    def __init__(self, plane: ControlPlane, name: str, args: list[str]):
        self.name, self.plane = name, plane
        self.token = plane.service_account_token(NS, SERVICE_ACCOUNT)
        kubeconfig = plane.dir / f"{name}.kubeconfig"
        kubeconfig.write_text(plane.kubeconfig(name, self.token))
        self.env = {**ENV, "KUBECONFIG": str(kubeconfig), "POD_NAME": name}
        self.env.pop("KUBERNETES_SERVICE_HOST", None)
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.args = ["--liveness", self.liveness, "--metrics", self.metrics, "--resync-interval", "2", *args]
        self.log_path = plane.dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "apigw_operator", *self.args], stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )
        return self

    def alive(self) -> bool:
        """kopf's liveness endpoint answers: the replica is up and watching."""
        return http_status(self.liveness) == 200

    def kill(self) -> None:
        """SIGKILL: no cleanup, no Lease release, as when a node dies."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def credential(self) -> str:
        """How the audit log names this process's token (`user.extra` credential id: the token's JTI)."""
        return "JTI=" + jwt.decode(self.token, options={"verify_signature": False})["jti"]


class GatewayPod:
    """One pod of the `api-gateway` Deployment: Pod object, `gateway` process on `ip`, kubelet thread."""

    def __init__(self, plane: ControlPlane, name: str, ip: str, template: dict[str, Any]):
        self.plane, self.name, self.ip = plane, name, ip
        self.projection = Projection(plane.dir / "pods" / name / "config")
        self.log_path = plane.dir / "pods" / name / "gateway.log"
        self.path = f"/api/v1/namespaces/{NS}/pods/{name}"
        self.template = template
        self.process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._held = threading.Event()
        self._seen: str | None = None
        self._kubelet = threading.Thread(target=self._sync_loop, name=f"kubelet-{name}", daemon=True)

    def start(self, port: int) -> None:
        """Create the Pod, project the ConfigMap, run the gateway, and report it ready like the kubelet."""
        meta = self.template["metadata"]
        self.plane.api.post(f"/api/v1/namespaces/{NS}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": NS, "labels": meta["labels"], "annotations": meta.get("annotations", {})},
            "spec": self.template["spec"],
        })
        self.sync()
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("podnet.py")), self.ip, "--config", str(self.projection.dir)],
            stdout=self._log, stderr=subprocess.STDOUT, env=ENV,
        )
        wait_for(lambda: self.process.poll() is not None or http_status(f"http://{self.ip}:{port}/_health/ready") == 200,
                 what=f"gateway pod {self.name} ready")
        assert self.process.poll() is None, self.log_path.read_text()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.plane.api.merge(self.path + "/status", {"status": {
            "phase": "Running", "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [
                {"name": c["name"], "image": c["image"], "imageID": "", "ready": True, "started": True,
                 "restartCount": 0, "state": {"running": {"startedAt": now}}}
                for c in self.template["spec"]["containers"]
            ],
        }})
        self._kubelet.start()

    def sync(self) -> None:
        """Project the config volume's ConfigMaps (the template's projected sources) when one changed."""
        sources = next(v for v in self.template["spec"]["volumes"] if v["name"] == "config")["projected"]["sources"]
        data: dict[str, str] = {}
        versions = []
        for source in (s["configMap"] for s in sources):
            try:
                found = self.plane.api.get(f"{CM_PATH.rsplit('/', 1)[0]}/{source['name']}")
            except ApiError as exc:
                if exc.status == 404 and source.get("optional"):
                    continue
                raise
            data.update(found.get("data") or {})
            versions.append(found["metadata"]["resourceVersion"])
        version = ",".join(versions)
        if version != self._seen:
            self.projection.write(data)
            self._seen = version

    def hold(self) -> None:
        """Stop projecting ConfigMap changes (a slow kubelet): the pod keeps the config it has."""
        self._held.set()

    def release(self) -> None:
        self._held.clear()

    def _sync_loop(self) -> None:
        while not self._stop.wait(0.3):
            if self._held.is_set():
                continue
            try:
                self.sync()
            except (ApiError, OSError):
                pass  # the kubelet retries too

    def stop(self) -> None:
        self._stop.set()
        if self._kubelet.is_alive():
            self._kubelet.join()
        if self.process is not None:
            terminate(self.process)
            self._log.close()
