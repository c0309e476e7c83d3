"""TLS on the TLS port: served, renewed without restart, expiry exported."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from apigw.config.errors import ConfigError
from apigw.config.model import TLSFiles
from apigw.observability.metrics import Metrics
from apigw.server.tls import ServerTLS
from apigw.testkit.certs import write_self_signed
from apigw.testkit.process import GatewayProcess, ports, wait_until
from apigw.testkit.redis import free_port


def served_certificate(port: int, server_name: str | None = "localhost") -> x509.Certificate:
    """The certificate a handshake on `port` gets, asking for `server_name` (None: no SNI)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def tls_gateway(tmp_path: Path, cert: Path, key: Path, **listen: object) -> tuple[GatewayProcess, int]:
    """A gateway (not started) serving `cert` and `key` on its TLS port, with no route; and that port."""
    port, metrics_port = ports()
    tls_port = free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port, "tls_port": tls_port,
                   "tls": {"cert_file": str(cert), "key_file": str(key)}, **listen},
        "routes": [],
    }))
    return GatewayProcess(config, port, metrics_port), tls_port


def test_tls_served_and_renewed_without_restart(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first = write_self_signed(cert, key, days=30)
    gateway_process, tls_port = tls_gateway(tmp_path, cert, key)
    with gateway_process as gateway:
        assert served_certificate(tls_port).serial_number == first.serial_number
        assert _metric(gateway.metrics()) == first.not_valid_after_utc.timestamp()

        second = write_self_signed(cert, key, days=90)
        deadline = time.monotonic() + 10
        while served_certificate(tls_port).serial_number != second.serial_number:
            assert time.monotonic() < deadline, "renewed certificate not served"
            time.sleep(0.1)
        assert _metric(gateway.metrics()) == second.not_valid_after_utc.timestamp()
        assert gateway.process is not None and gateway.process.poll() is None

        # A renewal is served even while the config is broken (the config change itself is rejected).
        good = gateway.config.read_text()
        gateway.config.write_text(good + "routes: [{name: broken}]\n")
        third = write_self_signed(cert, key, days=120)
        deadline = time.monotonic() + 10
        while served_certificate(tls_port).serial_number != third.serial_number:
            assert time.monotonic() < deadline, "renewed certificate not served while the config is invalid"
            time.sleep(0.1)
        assert gateway.details()["last_reload_error"] is not None


def test_validate_config_checks_certificate_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "bad.crt").write_text("not a certificate")
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({"listen": {"tls": {"cert_file": str(tmp_path / "bad.crt"),
                                                         "key_file": str(tmp_path / "missing.key")}}}))
    result = subprocess.run([sys.executable, "-m", "apigw", "-validate-config", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"listen.tls.cert_file: {tmp_path / 'bad.crt'} is not a PEM certificate" in result.stderr


def _metric(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("gateway_tls_certificate_expiry_timestamp_seconds "):
            return float(line.split()[1])
    raise AssertionError("expiry metric missing")


def test_an_unusable_renewal_is_reported_by_health_and_the_old_certificate_served(tmp_path: Path) -> None:
    """A renewed certificate that cannot be used (here a key that does not match it) is rejected: the
    certificate in force is still served, and the metrics port's `/_health/ready` says why, as it does
    for a rejected config, until a usable one comes."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first = write_self_signed(cert, key, days=30)
    gateway_process, tls_port = tls_gateway(tmp_path, cert, key)
    with gateway_process as gateway:
        old_key = key.read_bytes()
        write_self_signed(cert, tmp_path / "other.key", days=90)  # the certificate renewed, its key not
        key.write_bytes(old_key)
        deadline = time.monotonic() + 15
        while 'gateway_config_reloads_total{result="failure"} 1.0' not in gateway.metrics():
            assert time.monotonic() < deadline, "the unusable renewal was not rejected"
            time.sleep(0.1)
        assert served_certificate(tls_port).serial_number == first.serial_number
        error = gateway.details()["last_reload_error"]
        assert error is not None and error.startswith(f"listen.tls: cannot load {cert} with {key}: ")


async def test_a_renewal_is_put_in_force_whole_or_not_at_all(tmp_path: Path) -> None:
    """The port keeps one context and hands each handshake the certificate in force: a renewal that does not
    load (here a new certificate beside the old key, as a writer replacing one file at a time leaves them)
    leaves the old one served, with or without SNI, and the port never without a certificate."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first = write_self_signed(cert, key)
    tls = ServerTLS(TLSFiles(cert_file=cert, key_file=key), Metrics())
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0, ssl=tls.context)
    port = server.sockets[0].getsockname()[1]

    async def serials() -> set[int]:
        return {(await asyncio.to_thread(served_certificate, port, name)).serial_number for name in ("localhost", None)}

    async with server:
        assert await serials() == {first.serial_number}
        old_key = key.read_bytes()
        second = write_self_signed(cert, key)
        key.write_bytes(old_key)
        with pytest.raises(ConfigError, match="listen.tls: cannot load"):
            tls.load(TLSFiles(cert_file=cert, key_file=key))
        assert await serials() == {first.serial_number}
        second = write_self_signed(cert, key)
        tls.load(TLSFiles(cert_file=cert, key_file=key))
        assert await serials() == {second.serial_number}


HANDSHAKE_BOUND = 10.0
"""Seconds by which a stalled handshake must have been cut (the event loop's own default is 60)."""


def test_a_client_that_never_finishes_its_handshake_is_cut_off(tmp_path: Path) -> None:
    """A client that connects to the TLS port and sends nothing, or half a ClientHello, holds the connection
    no longer than `listen.request_head_timeout`, as on the plain port: the handshake is part of the head."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    write_self_signed(cert, key)
    gateway_process, tls_port = tls_gateway(tmp_path, cert, key, request_head_timeout=1, idle_timeout=2)
    with gateway_process:
        for first_bytes in (b"", b"\x16\x03\x01\x02\x00\x01"):  # nothing; the start of a ClientHello
            with socket.create_connection(("127.0.0.1", tls_port), timeout=HANDSHAKE_BOUND) as raw:
                raw.sendall(first_bytes)
                started = time.monotonic()
                try:
                    closed = raw.recv(1) == b""
                except TimeoutError:
                    closed = False
                except ConnectionResetError:
                    closed = True
                assert closed and time.monotonic() - started < HANDSHAKE_BOUND, first_bytes


def test_a_reload_changing_the_head_timeout_says_the_handshake_bound_waits_for_a_restart(tmp_path: Path) -> None:
    """The TLS port's handshake bound is fixed when the port opens (asyncio takes it once), while the head
    timer follows the reload: on-call must be told, as for every setting that needs a restart."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    write_self_signed(cert, key)
    gateway_process, _ = tls_gateway(tmp_path, cert, key, request_head_timeout=1)
    with gateway_process as gateway:
        first = gateway.ready()["config_hash"]
        config = yaml.safe_load(gateway.config.read_text())
        config["listen"]["request_head_timeout"] = 5
        gateway.config.write_text(yaml.safe_dump(config))
        wait_until(lambda: gateway.ready()["config_hash"] != first, what="the reload")
        wait_until(lambda: any("restart_settings" in line for line in gateway.log_lines()), what="the warning")
        warning = next(line for line in gateway.log_lines() if "restart_settings" in line)
    assert warning["level"] == "warning"
    assert warning["restart_settings"] == ["listen.request_head_timeout (the TLS handshake bound)"]


def test_an_expired_certificate_is_served_and_said_so(tmp_path: Path) -> None:
    """An expired certificate at start (or renewed into one) is still served, better than no TLS port at all,
    but the log must say so, naming the file and the time it expired: every verifying client now fails its
    handshake, and those failures are logged nowhere."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    expired = write_self_signed(cert, key, days=-2)
    gateway_process, tls_port = tls_gateway(tmp_path, cert, key)
    with gateway_process as gateway:
        assert served_certificate(tls_port).serial_number == expired.serial_number
        warnings = [line for line in gateway.log_lines() if line["level"] == "warning" and str(cert) in line["msg"]]
        assert warnings, gateway.log_text()
        assert "expired" in warnings[0]["msg"] and expired.not_valid_after_utc.isoformat() in warnings[0]["msg"]
