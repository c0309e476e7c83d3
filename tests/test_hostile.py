"""Hostile requests over a raw socket: each gets a clean 4xx, never reaches the backend, never hangs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from pathlib import Path

import pytest
import yaml

from apigw.config.loader import parse_documents
from apigw.observability.metrics import Metrics
from apigw.pipeline.state import Gateway
from apigw.testkit import raw
from apigw.testkit.backend import Backend
from apigw.testkit.tokens import SigningKey
from tests.conftest import access_lines


@pytest.fixture
async def gateway_port(traffic_server, backend: Backend) -> int:
    config = {"routes": [
        {"name": "public", "backend": {"service": "echo", "url": backend.url}},
        {"name": "admin", "match": {"path_prefix": "/admin"}, "backend": {"service": "echo", "url": backend.url},
         "rewrite_prefix": "/internal-admin"},
    ]}
    gateway = Gateway.create(parse_documents({"config.yaml": yaml.safe_dump(config)}), Metrics())
    server = await traffic_server(gateway)
    return server.port


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def until_closed(port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Send `raw` on one connection; everything the gateway answers until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("path", [b"/a/../admin", b"/a/%2e%2e/admin", b"/a/%2E%2e/admin", b"/x/%2fadmin",
                                  b"/a/./b", b"/a/%00b", b"/a\\..\\admin"])
async def test_ambiguous_paths_are_rejected(gateway_port: int, backend: Backend, path: bytes) -> None:
    response = await exchange(gateway_port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 400, response
    assert b'"error"' in response
    assert backend.seen == []


async def test_double_slashes_collapse_before_matching(gateway_port: int, backend: Backend) -> None:
    response = await exchange(gateway_port, b"GET //a///b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert backend.seen == ["/a/b"]


async def test_percent_encoded_letters_are_decoded_before_matching(gateway_port: int, backend: Backend) -> None:
    """`/%61dmin` is `/admin` to the backend, so it must take the admin route, not slip through as public."""
    response = await exchange(gateway_port, b"GET /%61dmin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert backend.seen == ["/internal-admin/x"]


async def test_content_length_with_transfer_encoding_is_refused(gateway_port: int, backend: Backend) -> None:
    smuggle = (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    response = await exchange(gateway_port, smuggle)
    assert status_of(response) == 400
    assert backend.seen == []


async def test_duplicate_content_length_is_refused(gateway_port: int, backend: Backend) -> None:
    raw = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 5\r\n\r\nhello"
    assert status_of(await exchange(gateway_port, raw)) == 400
    assert backend.seen == []


@pytest.mark.parametrize("raw", [
    b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET /" + b"p" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
])
async def test_malformed_and_oversized_requests_get_400(gateway_port: int, backend: Backend, raw: bytes) -> None:
    response = await exchange(gateway_port, raw)
    assert 400 <= status_of(response) < 500
    assert backend.seen == []


async def test_a_fragment_stays_with_the_client(gateway_port: int, backend: Backend) -> None:
    response = await exchange(gateway_port, b"GET /caf%C3%A9?q=1#frag HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200, response
    assert b'"raw_path": "/caf%C3%A9?q=1"' in response


async def test_raw_bytes_that_are_not_utf8_are_400(gateway_port: int, backend: Backend) -> None:
    response = await exchange(gateway_port, b"GET /caf\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 400, response
    assert backend.seen == []


# --- the Authorization header and the claims forwarded from it ----------------------------------------


@pytest.fixture
async def auth_port(traffic_server, backend: Backend, tmp_path: Path) -> int:
    """A route that needs a token signed by KEY, forwarding its `sub` as X-User-Id."""
    config = {"auth": {"keys": [{"file": str(KEY.write_public_pem(tmp_path / "key.pem"))}],
                       "forward_claims": {"sub": "X-User-Id"}},
              "routes": [{"name": "api", "backend": {"service": "echo", "url": backend.url}, "auth": {}}]}
    gateway = Gateway.create(parse_documents({"config.yaml": yaml.safe_dump(config)}), Metrics())
    server = await traffic_server(gateway)
    return server.port


KEY = SigningKey("ed25519")
SMUGGLED = {  # {T}: alice's valid token; {F}: mallory's, its signature forged
    "folded onto the next line": (b"Authorization: Bearer {T}\r\n {F}\r\n", 400),
    "space before the colon": (b"Authorization : Bearer {T}\r\n", 400),
    "NUL after the token": (b"Authorization: Bearer {T}\x00\r\n", 400),
    "bare CR before a header": (b"Authorization: Bearer {T}\rX-User-Id: admin\r\n", 400),
    "bare LF before a header": (b"Authorization: Bearer {T}\nX-User-Id: admin\r\n", 400),
    "a second header in other case": (b"Authorization: Bearer {T}\r\nauthorization: Bearer {F}\r\n", 401),
    "two tokens in one header": (b"Authorization: Bearer {T}, Bearer {F}\r\n", 401),
}


@pytest.mark.parametrize("name", SMUGGLED)
async def test_a_valid_token_does_not_carry_a_smuggled_one_or_header_to_the_backend(
    auth_port: int, backend: Backend, name: str
) -> None:
    lines, status = SMUGGLED[name]
    forged = KEY.token(sub="mallory")[:-4] + "AAAA"
    lines = lines.replace(b"{T}", KEY.token(sub="alice").encode()).replace(b"{F}", forged.encode())
    response = await exchange(auth_port, b"GET /x HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n")
    assert status_of(response) == status, response
    assert backend.seen == []


async def test_client_copies_of_a_forwarded_claim_header_never_reach_the_backend(auth_port: int) -> None:
    spoofed = b"x-user-id: admin\r\nX-USER-ID: root\r\nX_User_Id: admin\r\n"
    token = KEY.token(sub="alice").encode()
    response = await exchange(
        auth_port, b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n" + spoofed
        + b"Connection: close\r\n\r\n",
    )
    assert status_of(response) == 200, response
    sent = json.loads(response.partition(b"\r\n\r\n")[2])["headers"]
    assert [(name, value) for name, value in sent.items() if "user" in name.lower()] == [("X-User-Id", "alice")]

async def test_transfer_encoding_in_an_http_1_0_request_is_refused_and_the_connection_closed(
    gateway_port: int, backend: Backend
) -> None:
    """HTTP/1.0 has no chunked coding: a proxy in front may frame this body otherwise (RFC 9112 6.1: faulty
    framing, close the connection). Nothing after it on the connection may be read as a request."""
    raw = (b"POST /x HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.0\r\nHost: x\r\n\r\n")
    response = await until_closed(gateway_port, raw)
    head, _, body = response.partition(b"\r\n\r\n")
    assert status_of(response) == 400, response
    assert b"Content-Length: %d\r\n" % len(body) in head, response  # the one answer, then the close
    assert backend.seen == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_refused_as_too_large_is_skipped_and_the_next_request_answered(
    traffic_server, backend: Backend, chunked: bool
) -> None:
    """413 for a body over the route's limit (at once for a declared length, once the limit is passed for
    chunks), with a request inside the body and a good one behind it on the same connection: the body is
    skipped by its framing, never read as a request."""
    config = {"routes": [{"name": "small", "backend": {"service": "echo", "url": backend.url}, "max_body_size": 16}]}
    server = await traffic_server(Gateway.create(parse_documents({"config.yaml": yaml.safe_dump(config)}), Metrics()))
    body = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".ljust(100, b"x")
    framed = (b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked
              else b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    answers = await until_closed(
        server.port, b"POST /x HTTP/1.1\r\nHost: x\r\n" + framed + b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answers) == [b"413", b"200"], answers
    assert "/after" in backend.seen and "/smuggled" not in backend.seen

# --- clients that hold a backend connection: the route's request_timeout bounds the whole request ------


def closed_by_gateway(received: asyncio.Event, answer: bytes = b"") -> raw.Handler:
    """A backend that reads a request head, sends `answer`, reads on, and sets `received` once the gateway
    hangs up (the backend connection is closed, not held for the client)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        try:
            while await reader.read(65536):
                pass
        finally:  # a close or a reset (the gateway had left some of `answer` unread)
            received.set()

    return serve


async def test_a_body_trickled_past_the_request_timeout_is_cut(gateway_client) -> None:
    """One byte every 200 ms never leaves the body idle for `request_body_timeout`: without a bound on the
    whole request, one client connection would hold a backend connection for as long as it trickles."""
    hung_up = asyncio.Event()
    async with raw.raw_server(closed_by_gateway(hung_up)) as url:
        client = await gateway_client({"listen": {"request_body_timeout": "500ms"}, "routes": [
            {"name": "up", "backend": {"service": "up", "url": url, "request_timeout": "1s"}}]})
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n")
        answer = b""
        for _ in range(40):  # 8 s at most; 40 bytes of the 100 announced
            writer.write(b"a")
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(65536), 0.2)
                break
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        await asyncio.wait_for(hung_up.wait(), 5)
    assert access_lines(client)[-1]["error_type"] == "client_body_timeout"


async def test_a_client_that_stops_reading_is_cut_at_the_request_timeout(gateway_client) -> None:
    """A response too large for the buffers on the way, to a client that reads nothing: the gateway stops
    reading the backend and waits for the client; at the route's request_timeout it cuts both."""
    hung_up = asyncio.Event()
    size = 16 * 1024 * 1024
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    async with raw.raw_server(closed_by_gateway(hung_up, answer)) as url:
        client = await gateway_client({"routes": [
            {"name": "down", "backend": {"service": "down", "url": url, "request_timeout": "1s"}}]})
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.server.port))
        _, writer = await asyncio.open_connection(sock=sock)  # its reader stops at its buffer limit
        writer.write(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
        try:
            await asyncio.wait_for(hung_up.wait(), 5)
        finally:
            writer.close()
    for _ in range(50):
        if access_lines(client):
            break
        await asyncio.sleep(0.05)
    assert access_lines(client)[-1]["error_type"] == "client_timeout"


@pytest.mark.parametrize("upgrade", [b"foo", b"h2c", b"websocket"])
async def test_a_request_asking_to_upgrade_is_answered_and_its_connection_closed(
    gateway_port: int, backend: Backend, upgrade: bytes
) -> None:
    """The gateway upgrades no connection (Upgrade is hop-by-hop, never passed on), but aiohttp's parser
    reads whatever follows such a request as the upgraded stream: a request pipelined behind it would wait,
    unanswered, for the idle timeout. Answered, then closed, so the client retries it at once."""
    raw = (b"GET /first HTTP/1.1\r\nHost: x\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n"
           b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n" % upgrade)
    answers = await until_closed(gateway_port, raw, timeout=5)  # well before the idle timeout
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answers) == [b"200"], answers
    assert b"\r\nConnection: close\r\n" in answers.partition(b"\r\n\r\n")[0] + b"\r\n", answers
    assert backend.seen == ["/first"]
