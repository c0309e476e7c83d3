"""A backend of routes.yaml (the operator's file, rendered from tenants' CRs) whose TLS files the gateway
cannot use, in a real gateway process: the rest of the config serves, that backend answers 503
`backend_tls_unusable`, the logs and the metrics port's `/_health/ready` say which and why, and once its
files are fixed (they are watched) it serves again."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from apigw.testkit import loopback_allowed
from apigw.testkit.certs import write_self_signed
from apigw.testkit.process import GatewayProcess, json_answer, ports, wait_until

SECRET = "KEYMATERIALNEVERLOGGED"
"""What the broken key file holds: it must reach no log line and no health answer."""


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"server": "tls-backend", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def https_backend(cert: Path, key: Path) -> Iterator[str]:
    """A real HTTPS server on loopback, in a thread of its own."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_tenants_unusable_backend_tls_files_hold_that_backend_only(tmp_path: Path) -> None:
    server_cert, server_key = tmp_path / "server.pem", tmp_path / "server.key"
    write_self_signed(server_cert, server_key, name="users.internal")
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client.key"
    write_self_signed(client_cert, client_key, name="gateway")
    broken_key = tmp_path / "broken.key"
    broken_key.write_text(f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n")
    missing_ca = tmp_path / "later" / "ca.pem"
    port, metrics_port = ports()
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "config.yaml").write_text(yaml.safe_dump({
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
        "ownership": loopback_allowed(),  # the backend listens on 127.0.0.1
    }))
    with https_backend(server_cert, server_key) as url:

        def route(name: str, **tls: Path) -> dict:
            return {"name": f"shop.{name}", "match": {"path_prefix": f"/{name}"}, "backend": {
                "service": name, "url": url,
                "tls": {"server_name": "users.internal", **{k: str(v) for k, v in tls.items()}}}}

        (volume / "routes.yaml").write_text(yaml.safe_dump({"routes": [
            route("good", ca_file=server_cert),
            route("later", ca_file=missing_ca),
            route("badkey", ca_file=server_cert, cert_file=client_cert, key_file=broken_key),
        ]}))
        with GatewayProcess(volume, port, metrics_port) as gateway:
            status, body = json_answer(f"{gateway.url}/good/x")
            assert (status, body["server"]) == (200, "tls-backend")
            for name in ("later", "badkey"):
                status, body = json_answer(f"{gateway.url}/{name}/x")
                assert status == 503, body
                assert body["error"] == f"backend {name} is unavailable: the gateway cannot use its TLS files"

            def refused() -> list[dict]:
                return [line for line in gateway.log_lines() if line.get("status_code") == 503]

            wait_until(lambda: len(refused()) == 2, what="the two access lines")  # written once the answers are out
            access = refused()
            assert {line["error_type"] for line in access} == {"backend_tls_unusable"}
            assert {line["backend_service"] for line in access} == {"later", "badkey"}

            held = {b["backend_service"]: b for b in gateway.details()["unavailable_backends"]}
            assert held["later"]["routes"] == ["shop.later"]
            assert held["later"]["error"] == (
                f"cannot use the TLS files: ca_file {missing_ca}: No such file or directory")
            assert held["badkey"]["routes"] == ["shop.badkey"] and str(broken_key) in held["badkey"]["error"]
            assert gateway.details()["status"] == "ready" and gateway.details()["last_reload_error"] is None
            errors = [line for line in gateway.log_lines() if line["level"] == "error" and "backend_service" in line
                      and "status_code" not in line]
            assert {line["backend_service"] for line in errors} == {"later", "badkey"}
            later = next(line for line in errors if line["backend_service"] == "later")
            assert "shop.later" in later["msg"] and str(missing_ca) in later["msg"] and "No such file" in later["msg"]
            assert SECRET not in gateway.log_text() and SECRET not in json.dumps(gateway.details())

            missing_ca.parent.mkdir()
            missing_ca.write_bytes(server_cert.read_bytes())  # the file appears: a watched file, so a reload
            wait_until(lambda: json_answer(f"{gateway.url}/later/x")[0] == 200, timeout=20,
                       what="the fixed backend serving")
            assert [b["backend_service"] for b in gateway.details()["unavailable_backends"]] == ["badkey"]
            assert json_answer(f"{gateway.url}/good/x")[0] == 200
        assert SECRET not in gateway.log_text()
