"""The TLS listener's certificate, replaced without a restart on renewal.

The port's SSLContext never changes: each handshake is handed the context of the certificate in force
(`sni_callback`, called with or without SNI). A renewal is loaded into a new context and swapped in only
once it loaded whole, so files written one at a time, or changed while they are read, never leave the
port without a certificate. The certificate's notAfter is exported for the expiry alert.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from apigw.config.errors import ConfigError
from apigw.config.model import TLSFiles
from apigw.observability.metrics import Metrics

log = logging.getLogger("apigw.server")


class ServerTLS:
    def __init__(self, files: TLSFiles, metrics: Metrics):
        self.metrics = metrics
        self.context = _server_context()
        """The port's context: it only hands each handshake to the one in force."""
        self.context.sni_callback = self._in_force
        self.load(files)

    def _in_force(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        connection.context = self._current

    def load(self, files: TLSFiles) -> None:
        """Put `files` in force; on error the old certificate stays and ConfigError says why."""
        self._current, expiry = load_tls(files)
        self.files = files
        self.metrics.tls_expiry.set(expiry)
        expired = expired_note(files.cert_file, expiry)
        if expired:  # served all the same: better than no TLS port, and most clients refuse it
            log.warning("listen.tls: %s; serving it until a renewal comes", expired)

    def watched_files(self) -> list[Path]:
        return [self.files.cert_file, self.files.key_file]


def check_tls(files: TLSFiles) -> float:
    """Load `files` into a scratch context (ConfigError if unusable); return the certificate's expiry."""
    return load_tls(files)[1]


def load_tls(files: TLSFiles) -> tuple[ssl.SSLContext, float]:
    """A server context holding `files`, and the certificate's expiry; ConfigError if they are unusable."""
    expiry = certificate_expiry(files.cert_file)
    context = _server_context()
    try:
        context.load_cert_chain(files.cert_file, files.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"listen.tls: cannot load {files.cert_file} with {files.key_file}: {exc}"]) from None
    return context, expiry


def _server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def expired_note(cert_file: Path, expiry: float) -> str | None:
    """What to tell about a certificate past its notAfter (`expiry`), or None while it is valid."""
    if expiry > time.time():
        return None
    return f"the certificate {cert_file} expired at {datetime.datetime.fromtimestamp(expiry, datetime.UTC).isoformat()}"


def certificate_expiry(path: Path) -> float:
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ConfigError([f"listen.tls.cert_file: cannot read {path}: {exc.strerror}"]) from None
    except ValueError:
        raise ConfigError([f"listen.tls.cert_file: {path} is not a PEM certificate"]) from None
    return certificate.not_valid_after_utc.timestamp()


class TLSSite(web.TCPSite):
    """The TLS port's site, its handshakes bounded by `handshake_timeout` (the gateway passes
    `listen.request_head_timeout`): the connection handler, and with it the head timer, only starts once a
    handshake is done, and aiohttp's TCPSite leaves the bound at the event loop's default of 60s, for which a
    client that connects and never finishes its handshake would hold the connection."""

    def __init__(self, *args: Any, handshake_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner; TCPSite.start would listen too
        assert self._runner.server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self._handshake_timeout,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
