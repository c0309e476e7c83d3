"""Bounded resources on the client side, against a real gateway process: slow or silent clients lose
their connection, oversized heads are refused, and bodies are invited only once a request is accepted.

Timeouts are set short in the config; the bounds asserted are generous (a busy CI machine), the point
being that the connection does end, long before aiohttp's own defaults would end it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from apigw.testkit import route
from apigw.testkit.process import BackendProcess, GatewayProcess, ports, wait_until
from apigw.testkit.raw import Answer, exchange
from apigw.testkit.tokens import SigningKey

HEAD_TIMEOUT, IDLE_TIMEOUT, BODY_TIMEOUT = 1.0, 2.0, 1.0
BOUND = 10.0
"""Seconds by which a connection must have been cut (aiohttp's own keep-alive default is an hour)."""


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("ec")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Iterator[GatewayProcess]:
    directory: Path = tmp_path_factory.mktemp("limits")
    port, metrics_port = ports()
    with BackendProcess() as echo:
        config = {
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port,
                       "request_head_timeout": HEAD_TIMEOUT, "idle_timeout": IDLE_TIMEOUT,
                       "request_body_timeout": BODY_TIMEOUT},
            "limits": {"max_request_head_size": "8KiB"},
            "auth": {"keys": [{"file": str(key.write_public_pem(directory / "key.pem"))}]},
            "routes": [route("open", echo.url, match={"path_prefix": "/open"}),
                       route("secure", echo.url, service="open", match={"path_prefix": "/secure"},
                             auth={"required": True})],
        }
        (directory / "gateway.yaml").write_text(yaml.safe_dump(config))
        with GatewayProcess(directory / "gateway.yaml", port, metrics_port) as process:
            yield process


def connect(gateway: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=BOUND + 5)


def read_all(sock: socket.socket) -> tuple[bytes, float]:
    """Everything until the gateway closes the connection, and how long that took."""
    started, chunks = time.monotonic(), []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def logged(gateway: GatewayProcess, request_id: str) -> dict:
    found: list[dict] = []
    wait_until(lambda: found.extend(line for line in gateway.log_lines() if line.get("request_id") == request_id)
               or found, timeout=5, what=f"access line of {request_id}")
    return found[0]


def assert_head_timeout(gateway: GatewayProcess, answer: bytes, took: float) -> None:
    parsed = Answer(answer)
    assert parsed.status == 408, answer
    assert took < BOUND
    line = logged(gateway, parsed.json()["request_id"])
    assert (line["error_type"], line["route"], line["status_code"]) == ("request_head_timeout", "-", 408)


def test_a_client_that_sends_nothing_is_cut_off(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        assert_head_timeout(gateway, *read_all(sock))


def test_a_client_trickling_its_head_is_cut_off(gateway: GatewayProcess) -> None:
    """Slowloris: a byte now and then does not keep the connection, the head must be whole in time."""
    with connect(gateway) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /open HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.3)
        answer = b""
        while time.monotonic() - started < BOUND:
            try:
                sock.sendall(b"X")
                answer = sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        sock.settimeout(BOUND)
        rest, _ = read_all(sock)
    assert_head_timeout(gateway, answer + rest, time.monotonic() - started)


def test_an_idle_keep_alive_connection_is_closed(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"GET /open/x HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        rest, idle = read_all(sock)  # the response was whole: nothing more comes, then the close
    assert b"HTTP/1.1" not in rest  # closed quietly, no 408 for a client that owed nothing
    assert idle < BOUND


def test_a_body_that_stops_arriving_is_408(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"POST /open/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        answer, took = read_all(sock)
    parsed = Answer(answer)
    assert parsed.status == 408, answer
    assert took < BOUND
    assert logged(gateway, parsed.json()["request_id"])["error_type"] == "client_body_timeout"


def test_an_oversized_request_head_is_431_and_reaches_no_backend(gateway: GatewayProcess) -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 700) for i in range(100))  # 70 KB, each header small
    answer = Answer(exchange(gateway.port, b"GET /open/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"))
    assert answer.status == 431
    line = logged(gateway, answer.json()["request_id"])
    assert line["error_type"] == "headers_too_large" and "backend_duration_ms" not in line


def test_a_refused_request_is_not_invited_to_send_its_body(gateway: GatewayProcess) -> None:
    answer = exchange(gateway.port, b"POST /secure/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                    b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert b"100 Continue" not in answer


def test_an_accepted_request_is_invited_and_expect_is_not_forwarded(gateway: GatewayProcess, key: SigningKey) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"POST /secure/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                     b"Authorization: Bearer " + key.token().encode() + b"\r\nConnection: close\r\n\r\n")
        interim = sock.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        answer, _ = read_all(sock)
    echoed = Answer(answer).json()
    assert echoed["body_size"] == 5
    assert "Expect" not in echoed["headers"]


def test_an_expectation_other_than_100_continue_is_417(gateway: GatewayProcess) -> None:
    answer = Answer(exchange(gateway.port, b"POST /open/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                                           b"Expect: 200-ok\r\nConnection: close\r\n\r\nx"))
    assert answer.status == 417
    assert logged(gateway, answer.json()["request_id"])["error_type"] == "expectation_failed"
