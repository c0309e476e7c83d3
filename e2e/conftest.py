"""A kind cluster with the project deployed as manifests/ describes, for the e2e tests.

Every test here is skipped, with the reason, where Docker (with a running daemon), kind or kubectl is
missing. Session setup builds both images, loads them into kind, applies the CRDs, the manifests and
e2e/resources/, and creates the two Secrets from keys generated here. cert-manager and the Prometheus
operator are not installed: manifests/tls/ and manifests/monitoring/ are checked offline by tests/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_kind import KindCluster

from harness import NAMESPACE, Deployment, deploy, build_and_load, missing_tools

HERE = Path(__file__).resolve().parent
SETUP_TIMEOUT = 1800
"""Seconds for a test, counting the session setup (image builds, cluster creation) of the first."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = [item for item in items if Path(item.path).resolve().is_relative_to(HERE)]
    reason = missing_tools() if e2e else None
    for item in e2e:
        item.add_marker(pytest.mark.skip(reason=f"e2e needs Docker and kind: {reason}") if reason else pytest.mark.timeout(SETUP_TIMEOUT))


@pytest.fixture(scope="session")
def deployed(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """pytest-kind's cluster (options --cluster-name, --kind-image, --keep-cluster) with kind and
    kubectl from PATH, and the project deployed in it."""
    cluster = KindCluster(
        request.config.getoption("cluster_name"),
        image=request.config.getoption("kind_image"),
        kind_path=Path(shutil.which("kind")),
        kubectl_path=Path(shutil.which("kubectl")),
    )
    cluster.create()
    deployment = Deployment(cluster, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    try:
        build_and_load(cluster)
        deploy(deployment)
        yield deployment
    finally:
        if not request.config.getoption("keep_cluster"):
            cluster.delete()


@pytest.fixture(scope="session")
def gateway_port(deployed: Deployment) -> Iterator[int]:
    """A local port forwarded to Service api-gateway port 80, as the runbook's port-forward does."""
    with deployed.cluster.port_forward("svc/api-gateway", 80, "-n", NAMESPACE) as port:
        yield port


@pytest.fixture(scope="session")
def metrics_port(deployed: Deployment) -> Iterator[int]:
    with deployed.cluster.port_forward("svc/api-gateway", 9090, "-n", NAMESPACE) as port:
        yield port
