"""The import-linter contracts in pyproject.toml hold (the data plane never imports the operator; the
backend client and the Redis link never import the config model)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_import_contracts_hold() -> None:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'dataplane'}:{ROOT / 'operator'}"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout
