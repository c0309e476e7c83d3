"""The proxy path through the real traffic app to a real backend on loopback."""

from __future__ import annotations

import hashlib

import aiohttp
import pytest
import yarl

from apigw.testkit import route
from apigw.testkit.backend import Backend
from tests.conftest import gateway_of


async def test_forwards_method_path_query_and_forwarding_headers(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"listen": {"trust_client_request_id": True},
                                   "routes": [route("users", backend.url, match={"path_prefix": "/api/users"})]})
    resp = await client.post("/api/users/7?x=1&y=%20", data=b"hello", headers={"X-Request-ID": "req-1"})
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == "req-1"
    echoed = await resp.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/api/users/7"
    assert echoed["query"] == "x=1&y=%20"
    assert echoed["body_size"] == 5
    headers = echoed["headers"]
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Request-ID"] == "req-1"
    assert headers["Host"] == f"127.0.0.1:{backend.port}"


async def test_generates_request_id_and_appends_to_forwarded_for(gateway_client, backend: Backend) -> None:
    """Behind a trusted proxy: its X-Forwarded-For is appended to; an insane X-Request-ID is replaced."""
    client = await gateway_client({"listen": {"trusted_proxies": ["127.0.0.1/32"]}, "routes": [route("all", backend.url)]})
    resp = await client.get("/x", headers={"X-Forwarded-For": "203.0.113.9", "X-Request-ID": "r" * 200})
    echoed = await resp.json()
    assert echoed["headers"]["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    generated = resp.headers["X-Request-ID"]
    assert len(generated) == 32 and generated == echoed["headers"]["X-Request-ID"]


async def test_hop_by_hop_headers_are_not_forwarded(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("all", backend.url)]})
    resp = await client.get(
        "/x", headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
                       "TE": "trailers", "Proxy-Authorization": "Basic abc", "X-Kept": "yes"},
    )
    sent = (await resp.json())["headers"]
    for name in ("X-Secret-Hop", "Keep-Alive", "TE", "Proxy-Authorization"):
        assert name not in sent
    assert sent["X-Kept"] == "yes"


async def test_prefix_rewrite(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [
        route("v1", backend.url, match={"path_prefix": "/api/v1"}, rewrite_prefix="/internal"),
        route("root", backend.url, service="v1", match={"path_prefix": "/strip"}, rewrite_prefix="/"),
    ]})
    assert (await (await client.get("/api/v1/users")).json())["path"] == "/internal/users"
    assert (await (await client.get("/api/v1")).json())["path"] == "/internal"
    assert (await (await client.get("/strip/a/b")).json())["path"] == "/a/b"


async def test_most_specific_route_wins(gateway_client, backend: Backend) -> None:
    async with Backend("other") as other:
        client = await gateway_client({"routes": [
            route("catchall", backend.url),
            route("users", other.url, match={"path_prefix": "/api/users", "methods": ["GET"]}),
        ]})
        assert (await (await client.get("/api/users/1")).json())["server"] == "other"
        assert (await (await client.post("/api/users/1")).json())["server"] == "echo"
        assert (await (await client.get("/api/usersx")).json())["server"] == "echo"


async def test_no_route_is_json_404(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("only", backend.url, match={"path": "/only"})]})
    resp = await client.get("/other")
    assert resp.status == 404
    body = await resp.json()
    assert body["request_id"] == resp.headers["X-Request-ID"]
    assert "no route" in body["error"]


async def test_disabled_route_is_not_served(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("off", backend.url, enabled=False)]})
    assert (await client.get("/")).status == 404


async def test_body_over_limit_is_413_before_reaching_backend(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"limits": {"max_body_size": 1000}, "routes": [route("all", backend.url)]})
    resp = await client.post("/upload", data=b"x" * 1001)
    assert resp.status == 413
    assert (await resp.json())["error"].startswith("request body is larger than 1000 bytes")
    assert backend.seen == []


async def test_chunked_body_over_limit_is_413(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("all", backend.url, max_body_size="64KiB")]})

    async def chunks():
        for _ in range(10):
            yield b"y" * 16384

    resp = await client.post("/upload", data=chunks())
    assert resp.status == 413


async def test_large_upload_and_download_stream_intact(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"limits": {"max_body_size": "200MiB"}, "routes": [route("all", backend.url)]})
    digest = hashlib.sha256()

    async def chunks():
        block = bytes(range(256)) * 256
        for _ in range(160):  # 10 MiB
            digest.update(block)
            yield block

    resp = await client.put("/big", data=chunks())
    echoed = await resp.json()
    assert echoed["body_size"] == 160 * 65536
    assert echoed["body_sha256"] == digest.hexdigest()

    resp = await client.get("/bytes/20000000")
    assert resp.headers["Content-Length"] == "20000000"
    received = 0
    async for chunk in resp.content.iter_chunked(1 << 20):
        received += len(chunk)
    assert received == 20_000_000


async def test_backend_timeout_is_504(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [
        {"name": "slow", "backend": {"service": "slow", "url": backend.url, "timeout": "300ms"}},
    ]})
    resp = await client.get("/hang")
    assert resp.status == 504
    assert "did not answer in time" in (await resp.json())["error"]


async def test_backend_refused_is_502(gateway_client) -> None:
    from apigw.testkit.redis import free_port

    client = await gateway_client({"routes": [route("gone", f"http://127.0.0.1:{free_port()}")]})
    resp = await client.get("/")
    assert resp.status == 502
    assert "refused" in (await resp.json())["error"]


async def test_backend_reset_is_502(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("reset", backend.url)]})
    resp = await client.get("/reset")
    assert resp.status == 502


async def test_backend_dying_mid_body_cuts_the_client_connection(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("cut", backend.url)]})
    resp = await client.get("/truncated")
    assert resp.status == 200
    try:
        body = await resp.read()
    except aiohttp.ClientPayloadError:
        body = None
    assert body is None or len(body) < 1_000_000  # never presented as complete


async def test_backend_errors_pass_through_unchanged(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("s", backend.url)]})
    resp = await client.get("/status/503")
    assert resp.status == 503
    assert (await resp.json()) == {"status": 503}


async def test_metrics_and_health(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("users", backend.url)]})
    await client.get("/a")
    await client.get("/status/500")
    ready = await client.get("/_health/ready")
    assert ready.status == 200
    gateway = gateway_of(client)
    assert (await ready.json())["config_hash"] == gateway.state.config_hash
    assert (await client.get("/_health/live")).status == 200
    value = gateway.metrics.registry.get_sample_value
    assert value("gateway_http_requests_total", {"route": "users", "method": "GET", "status_code": "200"}) == 1
    assert value("gateway_http_requests_total", {"route": "users", "method": "GET", "status_code": "500"}) == 1
    assert value("gateway_backend_requests_total", {"backend_service": "users", "status_code": "500"}) == 1
    assert value("gateway_backend_duration_seconds_count", {"backend_service": "users"}) == 2
    assert value("gateway_inflight_requests") == 0


async def test_health_paths_answer_get_and_head_and_leave_other_methods_to_the_routes(
    gateway_client, backend: Backend
) -> None:
    """The traffic port answers GET and HEAD at its health paths itself; a POST there, or a path that only
    starts like one, is a request like any other, for the route that matches it."""
    client = await gateway_client({"routes": [route("all", backend.url)]})
    head = await client.head("/_health/ready")
    assert head.status == 200 and await head.read() == b""
    assert (await client.get("/_health/live?probe=1")).status == 200
    assert (await client.post("/_health/live", data=b"x")).status == 200
    assert (await client.get("/_health/live/more")).status == 200
    assert backend.seen == ["/_health/live", "/_health/live/more"]


async def test_only_the_clients_headers_and_ours_reach_the_backend(gateway_client, backend: Backend) -> None:
    """No User-Agent, Accept or Accept-Encoding of the HTTP client's own; no guessed Content-Type."""
    client = await gateway_client({"routes": [route("all", backend.url)]})
    resp = await client.post("/x", data=b"raw", skip_auto_headers=("User-Agent", "Content-Type", "Accept",
                                                                    "Accept-Encoding"))
    sent = {k.lower() for k in (await resp.json())["headers"]}
    assert sent == {"host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}


async def test_backend_dying_inside_a_small_body_is_json_502(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("short", backend.url)]})
    resp = await client.get("/short")
    assert resp.status == 502
    assert (await resp.json())["error"] == "backend short closed the connection"


async def test_a_backend_failing_inside_its_body_is_counted_as_failing_not_as_its_status(
    gateway_client, backend: Backend
) -> None:
    """The backend's 200 headers came, then it closed: the client gets a 502 or a cut stream, and the
    backend's count must say why (the dashboards' backend error ratio counts statuses outside 1xx-4xx)."""
    import asyncio

    client = await gateway_client({"routes": [route("cut", backend.url)]})
    assert (await client.get("/short")).status == 502
    resp = await client.get("/truncated")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await asyncio.sleep(0.1)  # counted at the loop's next turns, once the responses are out
    value = gateway_of(client).metrics.registry.get_sample_value
    counted = {status: value("gateway_backend_requests_total", {"backend_service": "cut", "status_code": status})
               for status in ("200", "backend_reset", "backend_stream_aborted")}
    assert counted == {"200": None, "backend_reset": 1, "backend_stream_aborted": 1}


async def test_head_keeps_the_backends_content_length(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("h", backend.url)]})
    resp = await client.head("/bytes/5000")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "5000"
    assert await resp.read() == b""


async def test_client_leaving_mid_download_is_logged_as_such(gateway_client, backend: Backend) -> None:
    import asyncio

    from tests.conftest import access_lines

    client = await gateway_client({"routes": [route("big", backend.url)]})
    resp = await client.get("/bytes/50000000")
    await resp.content.read(65536)
    resp.close()  # the client goes away
    for _ in range(100):
        if access_lines(client):
            break
        await asyncio.sleep(0.05)
    assert access_lines(client)[-1]["error_type"] == "client_disconnected"


async def test_client_leaving_while_not_reading_is_logged_and_counted_as_such(gateway_client, backend: Backend) -> None:
    """A client that stops reading a download and leaves (its close with unread data is a reset) wakes the
    gateway's paused write with aiohttp's plain ConnectionError("Connection lost"): still the client's doing,
    not a 500 of the gateway's."""
    import asyncio
    import socket
    import struct

    from tests.conftest import access_lines

    client = await gateway_client({"routes": [route("big", backend.url)]})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"GET /bytes/50000000 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    writer.transport.pause_reading()  # the socket buffers fill and the gateway's writes wait
    await asyncio.sleep(0.5)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    for _ in range(100):
        if access_lines(client):
            break
        await asyncio.sleep(0.05)
    line = access_lines(client)[-1]
    assert (line["status_code"], line.get("error_type")) == (200, "client_disconnected"), line
    value = gateway_of(client).metrics.registry.get_sample_value
    assert value("gateway_http_requests_total", {"route": "big", "method": "GET", "status_code": "200"}) == 1
    assert value("gateway_http_requests_total", {"route": "big", "method": "GET", "status_code": "500"}) is None


async def test_decoded_paths_reach_the_backend_encoded_again(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"routes": [route("all", backend.url)]})
    for sent, received in [("/files/a%20b%25c?q=%20", "/files/a%20b%25c?q=%20"), ("/%61dmin/x", "/admin/x"),
                           ("/caf%C3%A9", "/caf%C3%A9"), ("/a-b_c.d~e!$&'()*+,;=:@", "/a-b_c.d~e!$&'()*+,;=:@")]:
        resp = await client.get(yarl.URL(sent, encoded=True))
        assert (await resp.json())["raw_path"] == received
