"""Requests aiohttp's HTTP parser refuses, sent as exact bytes to a real gateway process: each gets the
gateway's JSON error with its status and `error_type`, an `X-Request-ID`, one access line and one count
under route `-`; none of its bytes reaches the log. And no response carries aiohttp's version banner."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aiohttp.http import SERVER_SOFTWARE

from apigw.config.errors import ConfigError
from apigw.config.loader import parse_documents
from apigw.testkit import route
from apigw.testkit.process import BackendProcess, GatewayProcess, ports, wait_until
from apigw.testkit.raw import exchange
from apigw.testkit.redis import free_port

BACKEND_WITH_BANNER = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    with conn:
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nServer: backend/1.0\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
"""
"""A backend that names itself in a Server header of its own."""


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def refused_count(gateway: GatewayProcess, status: int) -> float:
    wanted = f'gateway_http_requests_total{{method="OTHER",route="-",status_code="{status}"}} '
    found = [line for line in gateway.metrics().splitlines() if line.startswith(wanted)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


def access_lines(gateway: GatewayProcess, request_id: str) -> list[dict]:
    return [line for line in gateway.log_lines() if line["logger"] == "apigw.access" and line["request_id"] == request_id]


def start_gateway(directory: Path, config: dict) -> GatewayProcess:
    port, metrics_port = ports()
    directory.mkdir()
    (directory / "config.yaml").write_text(yaml.safe_dump(
        {"listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port, **config.pop("listen", {})},
         **config}))
    gateway = GatewayProcess(directory / "config.yaml", port, metrics_port)
    gateway.start()
    return gateway


@pytest.fixture(scope="module")
def echo() -> Iterator[BackendProcess]:
    with BackendProcess() as backend:
        yield backend


@pytest.fixture(scope="module")
def branded() -> Iterator[BackendProcess]:
    port = free_port()
    with BackendProcess(port, [sys.executable, "-c", BACKEND_WITH_BANNER, str(port)]) as backend:
        yield backend


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, echo: BackendProcess, branded: BackendProcess) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("parser") / "etc", {"routes": [
        route("branded", branded.url, match={"path_prefix": "/branded"}),
        route("open", echo.url, match={"path_prefix": "/open"}),
    ]})
    yield process
    process.stop()


TOKEN = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSIsInNjb3BlIjoicmVhZCJ9.c2VjcmV0LXNpZ25hdHVyZS1ieXRlcw"

REFUSALS = {
    "token then a control byte": (b"GET /open HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                                  + b"\x01\r\n\r\n", 400, "bad_request"),
    "NUL in a header value": (b"GET /open HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, "bad_request"),
    "space in a header name": (b"GET /open HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400, "bad_request"),
    "space before the colon": (b"GET /open HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello", 400, "bad_request"),
    "obsolete line folding": (b"GET /open HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n", 400, "bad_request"),
    "chunk size not hex": (b"POST /open HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
                           400, "bad_request"),
    "Content-Length with chunked": (b"POST /open HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    "two Content-Lengths": (b"POST /open HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 5\r\n\r\nhello",
                            400, "bad_request"),
    "bare LF line ends": (b"GET /open HTTP/1.1\nHost: x\n\n", 400, "bad_request_line"),
    "LF in the target": (b"GET /open/a\nb HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "control byte in the target": (b"GET /open/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_line"),
    "HTTP/9.9": (b"GET /open HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request_line"),
    "invalid method": (b"G(T /open HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_method"),
    "TLS on the plain port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "bad_method"),
    "request line too long": (b"GET /open/" + b"p" * 17000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "header too long": (b"GET /open HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
    "too many headers": (b"GET /open HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
                         + b"\r\n", 431, "headers_too_large"),
}


@pytest.mark.parametrize("raw, status, error_type", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refusal_is_the_gateways_own(gateway: GatewayProcess, raw: bytes, status: int, error_type: str) -> None:
    before = refused_count(gateway, status)
    answer_status, headers, body = parse(exchange(gateway.port, raw))
    assert answer_status == status, body
    assert headers["content-type"].startswith("application/json")
    request_id = headers["x-request-id"]
    assert json.loads(body) == {"error": json.loads(body)["error"], "request_id": request_id}
    assert "server" not in headers
    wait_until(lambda: access_lines(gateway, request_id), what="the access line")
    [line] = access_lines(gateway, request_id)
    assert (line["route"], line["status_code"], line["error_type"], line["method"], line["path"]) == (
        "-", status, error_type, "-", "-")
    assert line["msg"] == f"- - status_code={status} auth_status=none" and line["client_ip"] == "127.0.0.1"
    assert refused_count(gateway, status) == before + 1


def test_no_byte_of_a_refused_request_reaches_the_log(gateway: GatewayProcess) -> None:
    """A valid-looking bearer token followed by one \\x01 byte: aiohttp's parser error quotes the whole
    header; neither the token nor any part of it is in the process's stdout and stderr."""
    exchange(gateway.port, REFUSALS["token then a control byte"][0])
    exchange(gateway.port, REFUSALS["NUL in a header value"][0])
    status, headers, body = parse(exchange(gateway.port, b"GET /open HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 200
    wait_until(lambda: access_lines(gateway, headers["x-request-id"]), what="the access line")
    text = gateway.log_text()
    assert all(part not in text for part in TOKEN.split(".")) and "Bearer" not in text
    assert "aiohttp.server" not in text and "Traceback" not in text


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, from a connection that stays open."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    length = int(parse(answer)[1]["content-length"])
    while len(answer.partition(b"\r\n\r\n")[2]) < length:
        answer += sock.recv(65536)
    return answer


def test_a_refusal_after_a_good_request_on_the_same_connection(gateway: GatewayProcess) -> None:
    """Keep-alive: the good request is answered, then the bad one is refused and the connection closed."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /open/a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse(read_response(sock))[0] == 200
        sock.sendall(b"GET /open/b HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n")
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.0 400 ")  # HTTP/1.0 without keep-alive: the connection ends
        assert sock.recv(1) == b""


def test_broken_chunked_framing_in_a_body_being_read_is_answered_at_once(gateway: GatewayProcess) -> None:
    """The headers are in and the request is on its way when a bad chunk size arrives: that request is
    answered 400 `client_body_aborted` at once (aiohttp alone leaves it waiting for the rest of its body
    until the client gives up), once, and nothing reaches the log but its access line."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"POST /open/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.3)  # the pipeline has the request and reads its body
        sock.sendall(b"zz\r\nabc\r\n0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status, headers, body = parse(answer)
    assert (status, answer.count(b"HTTP/1.")) == (400, 1)
    wait_until(lambda: access_lines(gateway, headers["x-request-id"]), what="the access line")
    [line] = access_lines(gateway, headers["x-request-id"])
    assert (line["error_type"], line["route"]) == ("client_body_aborted", "open")
    assert not [line for line in gateway.log_lines() if line["level"] == "error"]


def test_no_response_carries_the_aiohttp_banner(gateway: GatewayProcess) -> None:
    """Health, metrics, gateway errors, proxied answers without a Server header, parser refusals: no
    Server header at all (listen.server_header unset). A backend's own Server header passes through."""
    get = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers = {path: parse(exchange(gateway.port, get % path.encode())) for path in
               ("/_health/live", "/_health/ready", "/nowhere", "/open/a", "/open/a/%2e%2e/b", "/branded")}
    answers["metrics"] = parse(exchange(gateway.metrics_port, get % b"/metrics"))
    answers["refused"] = parse(exchange(gateway.port, b"GET / HTTP/9.9\r\n\r\n"))
    answers["refused on metrics"] = parse(exchange(gateway.metrics_port, b"GET / HTTP/9.9\r\n\r\n"))
    assert {name: status for name, (status, _, _) in answers.items()} == {
        "/_health/live": 200, "/_health/ready": 200, "/nowhere": 404, "/open/a": 200, "/open/a/%2e%2e/b": 400,
        "/branded": 200, "metrics": 200, "refused": 400, "refused on metrics": 400}
    servers = {name: headers.get("server") for name, (_, headers, _) in answers.items()}
    assert servers == {**{name: None for name in answers}, "/branded": "backend/1.0"}
    # The echo backend is aiohttp: its own banner is the one value not passed through.
    assert json.loads(answers["/open/a"][2])["server"] == "echo"


def test_a_configured_server_name_replaces_the_banner(tmp_path: Path, branded: BackendProcess, echo: BackendProcess) -> None:
    gateway = start_gateway(tmp_path / "etc", {"listen": {"server_header": "edge"}, "routes": [
        route("branded", branded.url, match={"path_prefix": "/branded"}), route("open", echo.url)]})
    try:
        get = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        servers = {path: parse(exchange(gateway.port, get % path))[1].get("server")
                   for path in (b"/_health/live", b"/open", b"/branded")}
        servers[b"refused"] = parse(exchange(gateway.port, b"GET / HTTP/9.9\r\n\r\n"))[1].get("server")
        assert servers == {b"/_health/live": "edge", b"/open": "edge", b"/branded": "backend/1.0", b"refused": "edge"}
        assert SERVER_SOFTWARE not in gateway.log_text()
    finally:
        gateway.stop()


@pytest.mark.parametrize("name, valid", [("edge", True), ("edge gateway/2", True), ("", False), ("a\r\nX-Injected: 1", False),
                                         ("x" * 65, False), (" edge", False)])
def test_server_header_setting_is_one_header_value(name: str, valid: bool) -> None:
    document = {"config.yaml": yaml.safe_dump({"listen": {"server_header": name}})}
    if valid:
        assert parse_documents(document).listen.server_header == name
    else:
        with pytest.raises(ConfigError, match="listen.server_header"):
            parse_documents(document)
