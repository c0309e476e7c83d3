"""Hot reload: rebuild the whole state from the config files and swap it in, or keep the old one.

Triggers are SIGHUP and a change of any watched file: the config files, and the key and certificate
files they name. Kubernetes updates a mounted ConfigMap or Secret by swapping the `..data` symlink, so
files are fingerprinted through the symlink (inode, mtime, size), which catches that swap too.
A failed reload is logged with every error, counted, reported by `/_health/ready`, and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from apigw.config.errors import ConfigError
from apigw.config.loader import config_files, load_config
from apigw.config.model import Config, restart_settings
from apigw.pipeline.state import Gateway, GatewayState, build_state
from apigw.server.tls import ServerTLS, check_tls

log = logging.getLogger("apigw.reload")

RETIRE_POLL = 0.5
RETIRE_LIMIT = 3600.0
"""Pools of a removed backend close when the last request begun before the reload is done, or after
this long (a stream that outlives it is cut)."""

Fingerprint = tuple[tuple[str, int, int, int], ...]


class Reloader:
    def __init__(self, gateway: Gateway, path: Path, tls: ServerTLS | None, interval: float = 1.0):
        self.gateway, self.path, self.tls, self.interval = gateway, path, tls, interval
        self._fingerprint = self._current_fingerprint()
        self._retiring: set[asyncio.Task[None]] = set()
        self._pending: list[Any] = []
        """Retired pools not closed yet."""

    def watched_files(self) -> list[Path]:
        try:
            files = config_files(self.path)
        except ConfigError:
            files = [self.path]
        files += self.gateway.state.auth.watched_files()
        if self.tls is not None:
            files += self.tls.watched_files()
        return files

    def _current_fingerprint(self) -> Fingerprint:
        prints = []
        for file in self.watched_files():
            try:
                st = os.stat(file)
                prints.append((str(file), st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                prints.append((str(file), 0, 0, 0))
        return tuple(prints)

    def reload(self, reason: str) -> bool:
        """Build the new state from the files and swap it in; on any error keep the old one and say why.

        The certificate in force is reloaded first and on its own: a renewal is served even while the
        config is broken. Only a config naming other certificate files waits for the config to be valid.
        """
        gateway = self.gateway
        old = gateway.state
        self._reload_certificate()
        try:
            config = load_config(self.path)
            tls_files = config.listen.tls if self.tls is not None and config.listen.tls != self.tls.files else None
            if tls_files is not None:
                check_tls(tls_files)
            state = build_state(config, gateway.shared)  # fails only before it changes anything shared
            if tls_files is not None:
                self.tls.load(tls_files)
        except Exception as exc:  # ConfigError, or anything else: a reload never takes the gateway down
            errors = exc.errors if isinstance(exc, ConfigError) else [f"{type(exc).__name__}: {exc}"]
            gateway.metrics.config_reloads.labels("failure").inc()
            gateway.last_reload_error = "; ".join(errors)
            log.error(
                "config reload (%s) rejected, keeping config %s: %s", reason, old.config_hash, errors[0],
                extra={"fields": {"errors": errors, "config_hash": old.config_hash}},
            )
            self._fingerprint = self._current_fingerprint()
            return False
        gateway.state = state
        gateway.last_reload_error = None
        logging.getLogger().setLevel(config.logging.level)
        gateway.metrics.config_reloads.labels("success").inc()
        self._fingerprint = self._current_fingerprint()
        self._warn_restart_settings(old.config, config)
        self._retire(old)
        log.info(
            "config reloaded (%s): %s -> %s, %d routes", reason, old.config_hash, state.config_hash, len(config.routes),
            extra={"fields": {"config_hash": state.config_hash, "previous_config_hash": old.config_hash}},
        )
        return True

    def _reload_certificate(self) -> None:
        if self.tls is None:
            return
        try:
            self.tls.load(self.tls.files)
        except ConfigError as exc:
            self.gateway.metrics.config_reloads.labels("failure").inc()
            log.error("TLS certificate reload rejected, keeping the one in force: %s", exc.errors[0],
                      extra={"fields": {"errors": exc.errors}})

    def _warn_restart_settings(self, old: Config, new: Config) -> None:
        before, after = restart_settings(old), restart_settings(new)
        changed = sorted(k for k in after if before.get(k) != after[k])
        if changed:
            log.warning(
                "settings changed that apply only after a restart: %s", ", ".join(changed),
                extra={"fields": {"restart_settings": changed}},
            )

    def _retire(self, old: GatewayState) -> None:
        """Close pools the new config no longer uses once no request that began on `old` is running."""
        shared = self.gateway.shared
        pools, shared.retired = shared.retired, []
        if not pools:
            return
        self._pending += pools

        async def close_when_unused() -> None:
            deadline = time.monotonic() + RETIRE_LIMIT
            while old.usage.inflight and time.monotonic() < deadline:
                await asyncio.sleep(RETIRE_POLL)
            for pool in pools:
                self._pending.remove(pool)
                await pool.aclose()

        task = asyncio.get_running_loop().create_task(close_when_unused())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._current_fingerprint() != self._fingerprint:
                self.reload("file change")

    async def close(self) -> None:
        """At shutdown (requests are done): close the pools still waiting to be retired."""
        for task in self._retiring:
            task.cancel()
        pools, self._pending = self._pending, []
        for pool in pools:
            await pool.aclose()
