"""The TLS listener's certificate: loaded into one SSLContext that is refreshed in place on renewal.

Reloading the same context means new handshakes get the new certificate with no restart and no
dropped connections. The certificate's notAfter is exported for the expiry alert.
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
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.load(files)

    def load(self, files: TLSFiles) -> None:
        """Load `files` into the live context; on error the old certificate stays and ConfigError says why."""
        expiry = check_tls(files)
        self.context.load_cert_chain(files.cert_file, files.key_file)
        self.files = files
        self.metrics.tls_expiry.set(expiry)
        expired = expired_note(files.cert_file, expiry)
        if expired:  # served all the same: better than no TLS port, and most clients refuse it
            log.warning("listen.tls: %s; serving it until a renewal comes", expired)

    def watched_files(self) -> list[Path]:
        return [self.files.cert_file, self.files.key_file]


def check_tls(files: TLSFiles) -> float:
    """Load `files` into a scratch context (ConfigError if unusable); return the certificate's expiry."""
    expiry = certificate_expiry(files.cert_file)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(files.cert_file, files.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"listen.tls: cannot load {files.cert_file} with {files.key_file}: {exc}"]) from None
    return expiry


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
