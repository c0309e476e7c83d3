"""`ownership.denied_backend_networks`: the networks a backend of a route from routes.yaml (a tenant's
GatewayRoute) may not reach, checked when a connection is opened, after the host name is resolved.

The rule (`denied_network`): an address is refused iff it lies in a denied network, an IPv4-mapped IPv6
address (`::ffff:169.254.169.254`, which a dual-stack socket connects to 169.254.169.254) counted as the
IPv4 address it reaches. Then the pool (real backends on loopback; the resolver's answer stands in for an
attacker's DNS record where noted), and a real gateway process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from apigw.config.errors import ConfigError
from apigw.config.loader import load_config_parts, parse_documents
from apigw.config.model import DEFAULT_DENIED_BACKEND_NETWORKS, Config
from apigw.http.networks import denied_network
from apigw.server.reload import Reloader
from apigw.testkit import route
from apigw.testkit.backend import Backend, echo_app
from apigw.testkit.certs import write_self_signed
from apigw.testkit.process import BackendProcess, GatewayProcess, http_status, json_answer, ports, wait_until
from apigw.upstream.client import BackendError, Pool
from apigw.upstream.cluster import cluster_settings

MAPPED = int(IPv6Address("::ffff:0.0.0.0"))
METADATA = ["169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254", "fe80::a9fe:a9fe", "127.0.0.1",
            "127.255.255.254", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::", "::ffff:0.0.0.0"]
"""The cloud metadata endpoints, the gateway's own loopback, and the unspecified addresses (which Linux
connects to loopback), each as the default must refuse it."""


def mapped(address: IPv4Address) -> IPv6Address:
    return IPv6Address(MAPPED | int(address))


def reached(address: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """The address a connection to `address` reaches: an IPv4-mapped one's IPv4 address."""
    return getattr(address, "ipv4_mapped", None) or address


def twins(address: IPv4Address | IPv6Address) -> set[IPv4Address | IPv6Address]:
    """The address a connection reaches, in both spellings where it is IPv4 (`a.b.c.d`, `::ffff:a.b.c.d`)."""
    ip = reached(address)
    return {ip, mapped(ip)} if ip.version == 4 else {ip}


def inside(address: IPv4Address | IPv6Address, network: IPv4Network | IPv6Network) -> bool:
    """Arithmetic, not `ipaddress`'s `in`: the oracle the rule is checked against."""
    if address.version != network.version:
        return False
    return int(network.network_address) <= int(address) <= int(network.broadcast_address)


def forms(network: IPv4Network | IPv6Network) -> list[IPv4Network | IPv6Network]:
    """A network and, for IPv4 or IPv4-mapped IPv6, the same addresses in the other family."""
    if network.version == 4:
        return [network, IPv6Network((mapped(network.network_address), network.prefixlen + 96))]
    if network.prefixlen >= 96 and int(network.network_address) >> 32 == 0xFFFF:
        return [network, IPv4Network((reached(network.network_address), network.prefixlen - 96))]
    return [network]


v4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
mapped_v4 = v4.map(mapped)
addresses = st.one_of(v4, v6, mapped_v4)
networks = st.one_of(
    st.builds(lambda a, p: IPv4Network((a, p), strict=False), v4, st.integers(0, 32)),
    st.builds(lambda a, p: IPv6Network((a, p), strict=False), v6, st.integers(0, 128)),
    st.builds(lambda a, p: IPv6Network((mapped(a), p), strict=False), v4, st.integers(96, 128)),
)


# --- the rule --------------------------------------------------------------------------------------


@given(st.lists(networks, max_size=6), addresses)
def test_an_address_is_refused_iff_it_lies_in_a_denied_network(denied: list, address) -> None:
    expected = [n for n in denied if any(inside(a, n) for a in twins(address))]
    found = denied_network(address, denied)
    assert (found is not None) == bool(expected)
    if found is not None:
        assert found == expected[0], "the first denied network holding it is the one named"


@given(networks, st.data())
def test_every_address_of_a_denied_network_is_refused_in_either_family(network, data) -> None:
    offset = data.draw(st.integers(0, network.num_addresses - 1))
    address = network.network_address + offset
    assert denied_network(address, [network]) == network
    for other in forms(network)[1:]:  # 169.254.169.254 and ::ffff:169.254.169.254 are one address
        assert denied_network(other.network_address + offset, [network]) == network


@pytest.mark.parametrize("address", METADATA)
def test_the_default_refuses_metadata_loopback_and_unspecified_addresses(address: str) -> None:
    assert denied_network(ip_address(address), DEFAULT_DENIED_BACKEND_NETWORKS) is not None


@given(addresses)
def test_the_default_refuses_only_loopback_link_local_unspecified_and_aws_ipv6_metadata(address) -> None:
    ip = reached(address)
    special = ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip == IPv6Address("fd00:ec2::254")
    assert (denied_network(address, DEFAULT_DENIED_BACKEND_NETWORKS) is not None) == special


# --- the setting ----------------------------------------------------------------------------------


def test_the_setting_defaults_to_the_secure_list_and_may_be_emptied() -> None:
    assert Config().ownership.denied_backend_networks == DEFAULT_DENIED_BACKEND_NETWORKS
    assert [str(n) for n in DEFAULT_DENIED_BACKEND_NETWORKS] == [
        "127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/32", "::/128", "fd00:ec2::254/128"]
    emptied = parse_documents({"config.yaml": "ownership:\n  denied_backend_networks: []\n"})
    assert emptied.ownership.denied_backend_networks == []


def test_a_bad_network_is_located_in_config_yaml_and_routes_yaml_cannot_set_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": "ownership:\n  denied_backend_networks: [169.254.169.254/16]\n",
                         "routes.yaml": "ownership:\n  denied_backend_networks: []\n"})
    assert caught.value.errors[0].startswith("config.yaml:2: ownership.denied_backend_networks[0]: ")
    assert caught.value.errors[1] == "routes.yaml:2: ownership: unknown setting (check its spelling and indentation)"


def documents(config: dict, routes: list[dict], shard: list[dict] | None = None) -> dict[str, str]:
    found = {"config.yaml": yaml.safe_dump(config), "routes.yaml": yaml.safe_dump({"routes": routes})}
    if shard is not None:
        found["routes-001.yaml"] = yaml.safe_dump({"routes": shard})
    return found


def test_only_backends_of_routes_from_routes_yaml_and_its_shards_are_guarded() -> None:
    people = route("people", "http://127.0.0.1:9000", match={"path_prefix": "/people"})
    shared = route("shared", "http://10.0.0.1:80", match={"path_prefix": "/shared"})
    config = parse_documents(documents(
        {"routes": [people, shared]},
        [route("tenant", "http://localhost:9001", match={"path_prefix": "/tenant"}),
         route("also-shared", "http://10.0.0.1:80", service="shared", match={"path_prefix": "/also"})],
        [route("sharded", "http://sharded:80", match={"path_prefix": "/sharded"})],
    ))
    assert [(r.name, config.operator_owned(r)) for r in config.routes] == [
        ("people", False), ("shared", False), ("tenant", True), ("also-shared", True), ("sharded", True)]
    denied = {service: s.denied_networks for service, s in cluster_settings(config).items()}
    default = tuple(DEFAULT_DENIED_BACKEND_NETWORKS)
    # a service config.yaml defines is trusted whoever else routes to it: its URL is config.yaml's own
    assert denied == {"people": (), "shared": (), "tenant": default, "sharded": default}


def test_a_service_of_a_disabled_config_yaml_route_is_guarded_for_the_routes_yaml_one() -> None:
    """config.yaml vouches for the backends of the routes it serves, not for a URL a tenant copied from a
    route it turned off."""
    off = route("off", "http://127.0.0.1:9090", service="local", enabled=False, match={"path_prefix": "/off"})
    config = parse_documents(documents({"routes": [off]}, [route("copy", "http://127.0.0.1:9090", service="local")]))
    assert cluster_settings(config)["local"].denied_networks == tuple(DEFAULT_DENIED_BACKEND_NETWORKS)


def test_a_single_config_file_is_config_yaml_and_a_change_of_the_setting_makes_new_clusters() -> None:
    config = parse_documents({"gw.yaml": yaml.safe_dump({"routes": [route("a", "http://127.0.0.1:1")]})})
    assert cluster_settings(config)["a"].denied_networks == ()
    before = cluster_settings(parse_documents(documents({}, [route("a", "http://a:1")])))
    after = cluster_settings(parse_documents(documents(
        {"ownership": {"denied_backend_networks": ["169.254.0.0/16"]}}, [route("a", "http://a:1")])))
    assert after["a"].denied_networks == (ip_network("169.254.0.0/16"),)
    assert before["a"] != after["a"], "the cluster is rebuilt with the new networks"


async def test_the_guard_survives_the_reload_worker(tmp_path: Path) -> None:
    for name, text in documents({}, [route("tenant", "http://localhost:1")]).items():
        (tmp_path / name).write_text(text)
    base, parts, digest, _ = load_config_parts(tmp_path)
    config, _, _ = await Reloader._unpickle(base, parts, digest)
    assert cluster_settings(config)["tenant"].denied_networks == tuple(DEFAULT_DENIED_BACKEND_NETWORKS)


# --- the pool -------------------------------------------------------------------------------------


async def get(pool: Pool) -> tuple[int, bytes]:
    response = await pool.request("GET", "/x", [("Host", "backend")], None, None, 5.0, 5.0)
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def test_a_name_resolving_to_a_denied_address_is_refused_before_any_connection(
    backend: Backend, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="apigw.upstream")
    pool = Pool(URL(f"http://localhost:{backend.port}/"), service="tenant-svc",
                denied_networks=DEFAULT_DENIED_BACKEND_NETWORKS)
    with pytest.raises(BackendError) as caught:
        await get(pool)
    assert caught.value.kind == "denied"
    assert backend.seen == [] and pool.open == 0, "nothing reached the backend, and the slot is free again"
    [line] = [r for r in caplog.records if r.name == "apigw.upstream"]
    message = line.getMessage()
    assert line.levelno == logging.ERROR
    for part in ("tenant-svc", "localhost", "127.0.0.1 in 127.0.0.0/8", "ownership.denied_backend_networks"):
        assert part in message
    assert line.fields["backend_service"] == "tenant-svc" and line.fields["error_type"] == "backend_denied"
    await pool.aclose()


async def test_a_pool_whose_networks_allow_the_address_connects(backend: Backend) -> None:
    pool = Pool(URL(f"http://localhost:{backend.port}/"), denied_networks=[ip_network("169.254.0.0/16")])
    assert (await get(pool))[0] == 200
    assert (await get(pool))[0] == 200
    assert pool.open == 1, "kept alive: the second request reused the checked connection"
    await pool.aclose()


def resolving_to(monkeypatch: pytest.MonkeyPatch, *answer: str) -> None:
    """The resolver answers `answer` for any name: an attacker's public DNS record (A and AAAA) stands in
    for a name this machine cannot resolve."""

    async def getaddrinfo(host, port, *, family=0, type=0, proto=0, flags=0):
        infos = []
        for address in answer:
            ip = ip_address(address)
            kind = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            sockaddr = (address, port) if ip.version == 4 else (address, port, 0, 0)
            infos.append((kind, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return infos

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)


async def test_denied_answers_are_dropped_and_an_allowed_one_is_used(
    backend: Backend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolving_to(monkeypatch, "::ffff:169.254.169.254", "169.254.169.254", "127.0.0.1")
    pool = Pool(URL(f"http://attacker.example:{backend.port}/"), denied_networks=[ip_network("169.254.0.0/16")])
    assert (await get(pool))[0] == 200
    await pool.aclose()


async def test_an_ipv4_mapped_answer_does_not_slip_through(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    resolving_to(monkeypatch, "::ffff:127.0.0.1")  # a dual-stack socket would reach the backend on 127.0.0.1
    pool = Pool(URL(f"http://attacker.example:{backend.port}/"), denied_networks=[ip_network("127.0.0.0/8")])
    with pytest.raises(BackendError) as caught:
        await get(pool)
    assert caught.value.kind == "denied" and backend.seen == []
    await pool.aclose()


async def test_tls_still_checks_the_url_host_name_and_sends_it_as_sni(tmp_path: Path) -> None:
    cert, key = tmp_path / "backend.pem", tmp_path / "backend.key"
    write_self_signed(cert, key, name="localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    names: list[str | None] = []
    server.sni_callback = lambda _socket, name, _context: names.append(name)
    runner = web.AppRunner(echo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server)
    await site.start()
    port = runner.addresses[0][1]
    pool = Pool(URL(f"https://localhost:{port}/"), ssl_context=ssl.create_default_context(cafile=cert),
                denied_networks=[ip_network("169.254.0.0/16")])
    try:
        assert (await get(pool))[0] == 200
        assert names == ["localhost"], "the name, not the address connected to"
    finally:
        await pool.aclose()
        await runner.cleanup()


# --- a real gateway -------------------------------------------------------------------------------


def write_configmap(directory: Path, port: int, metrics_port: int, backend: str, **ownership: object) -> None:
    config = {"listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
              "routes": [route("people", backend, match={"path_prefix": "/people"})]}
    if ownership:
        config["ownership"] = ownership
    tenant = backend.replace("127.0.0.1", "localhost")
    directory.mkdir(exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / "routes.yaml").write_text(yaml.safe_dump({"routes": [
        route("shop.steal", tenant, service="shop-steal", match={"path_prefix": "/steal"})]}))


def samples(text: str) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(s.name, tuple(s.labels.values())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_gateway_refuses_a_tenant_backend_on_loopback_and_serves_config_yaml_s(tmp_path: Path) -> None:
    port, metrics_port = ports()
    directory = tmp_path / "configmap"
    with BackendProcess() as backend:
        write_configmap(directory, port, metrics_port, backend.url)
        with GatewayProcess(directory, port, metrics_port) as gateway:
            assert http_status(f"{gateway.url}/people/1") == 200, "config.yaml's backend on 127.0.0.1 is trusted"
            for _ in range(30):  # more than the breaker's consecutive_failures (5)
                status, body = json_answer(f"{gateway.url}/steal/latest/meta-data/")
                assert status == 502
            assert "ownership.denied_backend_networks" in body["error"] and "127.0.0.1" not in body["error"]
            metrics = samples(gateway.metrics())
            assert metrics["gateway_backend_requests_total", ("shop-steal", "backend_denied")] == 30
            assert metrics["gateway_circuit_breaker_state", ("shop-steal",)] == 0, (
                "a configuration problem, not a backend failure: the breaker stays closed")

            write_configmap(directory, port, metrics_port, backend.url, denied_backend_networks=["169.254.0.0/16"])
            wait_until(lambda: http_status(f"{gateway.url}/steal/x") == 200, what="served once loopback is allowed")
        lines = gateway.log_lines()
    access = [line for line in lines if line["logger"] == "apigw.access" and line["path"].startswith("/steal/latest")]
    assert len(access) == 30 and {line["error_type"] for line in access} == {"backend_denied"}
    refused = [line for line in lines
               if line["logger"] == "apigw.upstream" and line.get("error_type") == "backend_denied"]
    assert refused and refused[0]["level"] == "error" and refused[0]["backend_service"] == "shop-steal"
    assert "localhost" in refused[0]["msg"] and "127.0.0.1 in 127.0.0.0/8" in refused[0]["msg"]
    assert len(refused) < 30, "repeats within the flood interval are counted, not written"


async def test_an_address_in_the_url_is_checked_as_one_resolved(backend: Backend) -> None:
    denied = Pool(URL(f"http://[::ffff:127.0.0.1]:{backend.port}/"), denied_networks=[ip_network("127.0.0.0/8")])
    with pytest.raises(BackendError) as caught:
        await get(denied)
    assert caught.value.kind == "denied"
    allowed = Pool(URL(f"http://127.0.0.1:{backend.port}/"), denied_networks=[ip_network("169.254.0.0/16")])
    assert (await get(allowed))[0] == 200
    await denied.aclose()
    await allowed.aclose()
