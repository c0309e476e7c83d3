"""A real `gateway` process for CLI, signal and reload tests: started, waited for, stopped, logs read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apigw.testkit.redis import free_port


class GatewayProcess:
    def __init__(self, config: Path, port: int, metrics_port: int, env: dict[str, str] | None = None):
        self.config, self.port, self.metrics_port = config, port, metrics_port
        self.env = {**os.environ, **(env or {})}
        self.log_path = config.parent / f"gateway-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.args: list[str] = []
        """Extra command-line arguments."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "apigw", "--config", str(self.config), *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                return self.ready()
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gateway not ready after {timeout}s:\n{self.log_text()}")

    def ready(self) -> dict[str, Any]:
        """The traffic port's `/_health/ready`: status and config hash."""
        return _json(f"{self.url}/_health/ready")

    def details(self) -> dict[str, Any]:
        """The metrics port's `/_health/ready`: with the last reload error, the pid(s), Redis."""
        return _json(f"http://127.0.0.1:{self.metrics_port}/_health/ready")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
            return response.read().decode()

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text().splitlines() if line.startswith("{")]

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def ports() -> tuple[int, int]:
    return free_port(), free_port()


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The status of a GET, 0 when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        error.close()
        return error.code
    except OSError:
        return 0


def json_answer(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """The status and JSON body of a GET, error statuses included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def wait_until(predicate: Callable[[], object], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        time.sleep(0.05)


class BackendProcess:
    """The test kit's echo backend in a process of its own, to kill and restart in fault tests."""

    def __init__(self, port: int | None = None, command: list[str] | None = None):
        self.port = port or free_port()
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = self.command or [sys.executable, "-m", "apigw.testkit.backend", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: http_status(self.url + "/up") == 200, what=f"backend on {self.url}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def __enter__(self) -> BackendProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
