"""The suite's guard against tests that talk to the gateway's default ports (conftest's tripwire)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from apigw.testkit.process import wait_until


def test_the_tripwire_catches_a_connection_made_by_this_run(tripwire) -> None:
    if not tripwire.sockets:
        pytest.skip("8080 and 9090 are both in use on this machine: nothing to trip on")
    port = tripwire.sockets[0].getsockname()[1]
    before = len(tripwire.seen)
    code = (f"import socket; s = socket.create_connection(('127.0.0.1', {port})); "
            "s.sendall(b'GET /stray HTTP/1.1\\r\\n'); s.recv(1)")  # as an HTTP client, it waits for an answer
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    wait_until(lambda: len(tripwire.seen) > before, timeout=5, what="the tripwire's record")
    assert tripwire.seen[before:] == [f":{port} GET /stray HTTP/1.1"]
    del tripwire.seen[before:]  # meant: the autouse check must not fail this test
