"""Hostile requests, exact bytes on raw sockets, against a real gateway process and recording backends.

One case (or a few) per attack class: a request must reach the backend of the route the gateway chose
for it, with a path and headers that backend cannot read differently; or it is refused with the
gateway's own JSON error and reaches no backend at all. Peers on 127.0.0.1 are untrusted clients; the
config trusts 127.0.0.2 as a proxy, so a test connects from there to play the proxy.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from apigw.config.model import ListenConfig
from apigw.pipeline.proxy import Edge
from apigw.testkit import raw, route
from apigw.testkit.backend import Backend
from apigw.testkit.process import GatewayProcess, ports, wait_until
from apigw.testkit.tokens import SigningKey
from tests.conftest import access_lines

UNTRUSTED, TRUSTED = "127.0.0.1", "127.0.0.2"


class Backends:
    """Echo backends named `public`, `secure` and `admin`, served from a thread of their own so that the
    test can talk to the gateway with plain blocking sockets; `seen` lists every request they got."""

    def __init__(self, names: list[str]):
        self.loop = asyncio.new_event_loop()
        self.servers = {name: Backend(name) for name in names}
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Backends:
        self.thread.start()
        for server in self.servers.values():
            asyncio.run_coroutine_threadsafe(server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers.values():
            asyncio.run_coroutine_threadsafe(server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def seen(self) -> int:
        return sum(len(server.seen) for server in self.servers.values())


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("ec")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Iterator[tuple[GatewayProcess, Backends]]:
    directory: Path = tmp_path_factory.mktemp("edge")
    port, metrics_port = ports()
    with Backends(["public", "secure", "admin"]) as backends:
        url = {name: server.url for name, server in backends.servers.items()}
        config = {
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port,
                       "trusted_proxies": [f"{TRUSTED}/32"]},
            "auth": {"keys": [{"file": str(key.write_public_pem(directory / "key.pem"))}],
                     "forward_claims": {"sub": "X-User-Id"}},
            "routes": [
                route("public", url["public"]),
                route("open", url["public"], service="public", match={"path_prefix": "/open"}),
                route("secure", url["secure"], match={"path_prefix": "/secure"}, auth={"required": True}),
                route("admin", url["admin"], match={"host": "admin.internal"}, auth={"required": True}),
            ],
        }
        (directory / "gateway.yaml").write_text(yaml.safe_dump(config))
        with GatewayProcess(directory / "gateway.yaml", port, metrics_port) as gateway:
            yield gateway, backends


class Answer(raw.Answer):
    @property
    def backend(self) -> str | None:
        """The echo backend that answered, or None for an answer of the gateway's own."""
        return self.json().get("server") if self.status == 200 else None


def send(gateway: GatewayProcess, data: bytes, source: str = UNTRUSTED) -> Answer:
    return Answer(raw.exchange(gateway.port, data, source))


def get(gateway: GatewayProcess, target: bytes, *headers: bytes, host: bytes = b"gw.test",
        source: str = UNTRUSTED) -> Answer:
    head = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"
    return send(gateway, head + b"".join(h + b"\r\n" for h in headers) + b"\r\n", source)


def logged(gateway: GatewayProcess, request_id: str) -> dict[str, Any]:
    """The access log line of the request `request_id`."""
    found: list[dict[str, Any]] = []
    wait_until(lambda: found.extend(line for line in gateway.log_lines() if line.get("request_id") == request_id)
               or found, timeout=5, what=f"access log line of {request_id}")
    return found[0]


def refused(answer: Answer, status: int, error_type: str, edge: tuple[GatewayProcess, Backends], seen: int) -> None:
    """`answer` is the gateway's JSON refusal, logged with `error_type`, and no backend saw the request."""
    gateway, backends = edge
    assert answer.status == status, answer.raw
    request_id = answer.json()["request_id"]
    assert request_id == answer.headers["x-request-id"]
    assert backends.seen() == seen, "a refused request reached a backend"
    assert logged(gateway, request_id)["error_type"] == error_type


def bearer(key: SigningKey, **claims: Any) -> bytes:
    return b"Authorization: Bearer " + key.token(**claims).encode()


# --- paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [b"//secure/x/", b"//secure//x", b"/%73ecure/x", b"/secure/x/", b"///secure"])
def test_every_spelling_of_a_protected_path_needs_its_token(edge, key, target: bytes) -> None:
    gateway, backends = edge
    before = backends.seen()
    refused(get(gateway, target), 401, "missing_token", edge, before)
    answer = get(gateway, target, bearer(key))
    assert answer.backend == "secure"


@pytest.mark.parametrize("target", [
    b"/open/..;/secure/x", b"/open/.;/secure", b"/secure;x=1/y", b"/secure%3Bx/y", b"/;/secure",
    b"/open/%2e%2e/secure", b"/open/%2e%2e%3b/secure", b"/open/..%2fsecure", b"/open/%5c../secure",
    b"/open\\..\\secure", b"/open/%00", b"/open/%0A", b"/%2573ecure/x", b"/open/%zz",
])
def test_paths_a_backend_could_read_as_another_route_are_refused(edge, target: bytes) -> None:
    gateway, backends = edge
    before = backends.seen()
    answer = get(gateway, target)
    refused(answer, 400, "bad_path", edge, before)


@pytest.mark.parametrize(("target", "received"), [
    (b"/open/a%3Bb", "/open/a%3Bb"),  # reserved characters stay encoded as sent: the backend decodes them, not us
    (b"/open/x%3D1%40y", "/open/x%3D1%40y"),
    (b"/open/%3b", "/open/%3B"),
    (b"/open//a///b/", "/open/a/b/"),
    (b"/%6Fpen/%7Euser", "/open/~user"),
    (b"/open/caf%c3%a9", "/open/caf%C3%A9"),
    (b"/open/%FF", "/open/%FF"),
    (b"/open/x;jsessionid=1", "/open/x;jsessionid=1"),  # a parameter that changes no route is passed on
    (b"/open/a\"b", "/open/a%22b"),
    (b"/open?q=/../secure&x=%2f#frag", "/open?q=/../secure&x=%2f"),
])
def test_the_backend_receives_the_path_that_was_routed(edge, target: bytes, received: str) -> None:
    gateway, _ = edge
    answer = get(gateway, target)
    assert answer.backend == "public"
    assert answer.json()["raw_path"] == received


# --- hosts and target forms --------------------------------------------------------------------------


@pytest.mark.parametrize("host", [b"admin.internal", b"ADMIN.Internal", b"admin.internal.", b"admin.internal:8080",
                                  b"Admin.Internal.:443"])
def test_every_spelling_of_a_host_reaches_its_route(edge, key, host: bytes) -> None:
    gateway, backends = edge
    refused(get(gateway, b"/x", host=host), 401, "missing_token", edge, backends.seen())
    answer = get(gateway, b"/x", bearer(key), host=host)
    assert answer.backend == "admin"
    assert answer.json()["headers"]["X-Forwarded-Host"] == "admin.internal"


def test_an_absolute_target_names_the_host_and_the_host_header_is_ignored(edge, key) -> None:
    gateway, backends = edge
    refused(get(gateway, b"http://admin.internal/admin/x", host=b"public.test"), 401, "missing_token", edge,
            backends.seen())
    answer = get(gateway, b"HTTP://Admin.Internal.:8080/admin/x?q=1", bearer(key), host=b"public.test")
    assert answer.backend == "admin"
    assert answer.json()["raw_path"] == "/admin/x?q=1"
    assert answer.json()["headers"]["X-Forwarded-Host"] == "admin.internal"


@pytest.mark.parametrize(("target", "host", "error_type"), [
    (b"/x", b"admin internal", "bad_host"),
    (b"/x", b"admin.internal..", "bad_host"),
    (b"/x", b"admin.internal:http", "bad_host"),
    (b"/x", b"[::1", "bad_host"),
    (b"http://user:pw@admin.internal/x", b"gw.test", "bad_target"),
    (b"http://admin%2einternal/x", b"gw.test", "bad_host"),
])
def test_malformed_hosts_and_targets_are_refused(edge, target: bytes, host: bytes, error_type: str) -> None:
    gateway, backends = edge
    answer = get(gateway, target, host=host)
    refused(answer, 400, error_type, edge, backends.seen())


@pytest.mark.parametrize(("request_line", "status", "error_type"), [
    (b"CONNECT admin.internal:443 HTTP/1.1", 405, "method_not_allowed"),
    (b"TRACE /open HTTP/1.1", 405, "method_not_allowed"),
    (b"OPTIONS * HTTP/1.1", 404, "no_route"),
    (b"GET /open HTTP/2.0", 505, "unsupported_version"),
])
def test_target_forms_methods_and_versions_the_gateway_does_not_proxy(
    edge, request_line: bytes, status: int, error_type: str
) -> None:
    gateway, backends = edge
    before = backends.seen()
    answer = send(gateway, request_line + b"\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    refused(answer, status, error_type, edge, before)


def test_http_0_9_is_refused(edge) -> None:
    gateway, backends = edge
    before = backends.seen()
    raw = send(gateway, b"GET /open\r\n\r\n").raw
    assert raw.startswith(b"HTTP/") and b" 505 " in raw.split(b"\r\n")[0]
    assert backends.seen() == before



# --- pipelining -------------------------------------------------------------------------------------


SMUGGLED = b"GET /open/smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"
FRAMINGS = {
    "content-length": b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED),
    "chunked": b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
    "chunked with an extension": b"Transfer-Encoding: chunked\r\n\r\n%x;a=b\r\n%s\r\n0\r\n\r\n" % (
        len(SMUGGLED), SMUGGLED),
}


@pytest.mark.parametrize("framing", FRAMINGS.values(), ids=FRAMINGS.keys())
def test_the_body_of_a_refused_request_is_never_read_as_a_request(edge, framing: bytes) -> None:
    """A request refused before its body is read (401) with a request in its body, then a good one on
    the same connection: the body is skipped by its framing, the next request is answered, and the one
    in the body reaches no backend."""
    gateway, backends = edge
    data = (b"POST /secure/x HTTP/1.1\r\nHost: gw.test\r\n" + framing
            + b"GET /open/after HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    answers = raw.exchange(gateway.port, data)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answers) == [b"401", b"200"], answers
    paths = [path for server in backends.servers.values() for path in server.seen]
    assert "/open/after" in paths and "/open/smuggled" not in paths

# --- headers ----------------------------------------------------------------------------------------


IDENTITY_HEADERS = [b"X-Forwarded-For: 10.0.0.1", b"X-Forwarded-Proto: https", b"X-Forwarded-Host: evil.test",
                    b"X-Forwarded-Port: 443", b"X-Forwarded-Prefix: /admin", b"Forwarded: for=10.0.0.1;proto=https",
                    b"X-Real-IP: 10.0.0.1", b"True-Client-IP: 10.0.0.1", b"X-Client-IP: 10.0.0.1"]


def test_a_clients_identity_and_path_override_headers_never_reach_the_backend(edge, key) -> None:
    gateway, _ = edge
    answer = get(gateway, b"/secure/x", bearer(key, sub="alice"), *IDENTITY_HEADERS, b"X-Original-URL: /admin",
                 b"X-Rewrite-URL: /admin", b"X_User_Id: admin", b"X-User-Id: admin", b"X-Request-ID: chosen-by-me")
    headers = answer.json()["headers"]
    assert answer.backend == "secure"
    assert headers["X-Forwarded-For"] == UNTRUSTED
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "gw.test"
    assert headers["X-User-Id"] == "alice"
    assert headers["X-Request-ID"] != "chosen-by-me" and headers["X-Request-ID"] == answer.headers["x-request-id"]
    for name in ("X-Forwarded-Port", "X-Forwarded-Prefix", "Forwarded", "X-Real-IP", "True-Client-IP", "X-Client-IP",
                 "X-Original-URL", "X-Rewrite-URL", "X_User_Id"):
        assert name not in headers, name
    assert [name for name in headers if name.lower().replace("_", "-") == "x-user-id"] == ["X-User-Id"]


def test_a_trusted_proxys_forwarding_headers_are_believed(edge, key) -> None:
    gateway, _ = edge
    answer = get(gateway, b"/open/x", *IDENTITY_HEADERS, b"X-Original-URL: /admin", b"X-Request-ID: from-the-proxy",
                 b"X-Forwarded-For: 198.51.100.7", source=TRUSTED)
    headers = answer.json()["headers"]
    assert headers["X-Forwarded-For"] == f"10.0.0.1, 198.51.100.7, {TRUSTED}"
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-Host"] == "evil.test"
    assert headers["X-Real-IP"] == "10.0.0.1" and headers["Forwarded"] == "for=10.0.0.1;proto=https"
    assert headers["X-Request-ID"] == "from-the-proxy" == answer.headers["x-request-id"]
    assert "X-Original-URL" not in headers  # the path is the one routed, whoever asks
    assert logged(gateway, "from-the-proxy")["client_ip"] == "198.51.100.7"  # the rightmost hop that is not a trusted proxy



def test_a_connection_header_cannot_remove_what_the_gateway_sets(edge, key) -> None:
    """`Connection` may name any header as hop-by-hop: those the gateway sets itself (forwarding, request
    id, forwarded claims, Host) still reach the backend with the gateway's values; the token, named
    there, was checked all the same."""
    gateway, _ = edge
    named = b"Connection: close, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Request-ID, X-User-Id, Host"
    assert get(gateway, b"/secure/x", b"Connection: Authorization").status == 401
    answer = get(gateway, b"/secure/x", bearer(key, sub="alice"), named, b"Connection: Authorization")
    headers = answer.json()["headers"]
    assert answer.backend == "secure"
    assert (headers["X-Forwarded-For"], headers["X-Forwarded-Proto"], headers["X-Forwarded-Host"]) == (
        UNTRUSTED, "http", "gw.test")
    assert headers["X-Request-ID"] == answer.headers["x-request-id"] and headers["X-User-Id"] == "alice"
    assert headers["Host"].startswith("127.0.0.1:") and "Authorization" not in headers

def test_the_client_ip_of_an_untrusted_peer_is_the_peer(edge) -> None:
    gateway, _ = edge
    answer = get(gateway, b"/open/who", b"X-Forwarded-For: 198.51.100.7", b"X-Real-IP: 198.51.100.7")
    assert logged(gateway, answer.headers["x-request-id"])["client_ip"] == UNTRUSTED


async def test_underscored_headers_are_refused_when_configured(gateway_client, backend: Backend) -> None:
    client = await gateway_client({"listen": {"headers_with_underscores": "reject"}, "routes": [route("all", backend.url)]})
    resp = await client.get("/x", headers={"X_User_Id": "admin"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "header name 'X_User_Id' has an underscore"
    assert access_lines(client)[-1]["error_type"] == "bad_header"
    assert backend.seen == []
    assert (await client.get("/x", headers={"X-User-Id": "fine"})).status == 200


def answering(response: bytes) -> raw.Handler:
    """A backend that answers every request with exactly `response`, then closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()

    return answer


async def test_hop_by_hop_headers_of_the_response_are_removed(gateway_client) -> None:
    """Including those the backend's own Connection header names."""
    response = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Internal-Token\r\n"
                b"X-Internal-Token: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
                b"Trailer: X-T\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\nok")
    async with raw.raw_server(answering(response)) as url:
        client = await gateway_client({"routes": [route("raw", url)]})
        resp = await client.get("/x")
        assert resp.status == 200 and await resp.read() == b"ok"
        assert resp.headers["X-Kept"] == "yes"
        for name in ("X-Internal-Token", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
            assert name not in resp.headers, name


@pytest.mark.parametrize("codings", [b"gzip", b"chunked, gzip", b"gzip, chunked"])
async def test_a_transfer_coding_other_than_chunked_is_not_passed_on(gateway_client, codings: bytes) -> None:
    """The client would get gzip bytes that no header says are gzip."""
    async with raw.raw_server(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + codings + b"\r\n\r\n0\r\n\r\n")) as url:
        client = await gateway_client({"routes": [route("raw", url)]})
        resp = await client.get("/x")
        assert resp.status == 502
        assert access_lines(client)[-1]["error_type"] == "backend_invalid_response"


@pytest.mark.parametrize("peer, forwarded_for, client", [
    ("10.0.0.5", "198.51.100.7", "198.51.100.7"),
    ("::ffff:10.0.0.5", "198.51.100.7", "198.51.100.7"),  # a dual-stack listener's IPv4 peer
    ("10.0.0.5", "198.51.100.7, ::ffff:10.0.0.6", "198.51.100.7"),  # an inner proxy writes its peer mapped
    ("10.0.0.5", "::ffff:198.51.100.7", "198.51.100.7"),  # one client, one bucket, however it is written
])
def test_an_ipv4_mapped_address_is_its_ipv4_address(peer: str, forwarded_for: str, client: str) -> None:
    """`::ffff:a.b.c.d` is a.b.c.d (as nginx's realip and access modules read it): a trusted proxy seen
    through a dual-stack socket or written so by another proxy is still trusted, else every client behind
    it shares the proxy's rate limit bucket; and a client gets one bucket, not one per spelling."""
    edge = Edge(ListenConfig(trusted_proxies=["10.0.0.0/8"]), ())
    assert edge.is_trusted(peer)
    assert edge.client_ip(peer, CIMultiDictProxy(CIMultiDict({"X-Forwarded-For": forwarded_for}))) == client
