"""Hot reload: rebuild the whole state from the config files and swap it in, or keep the old one.

Triggers are SIGHUP and a change of any watched file: the config files, and the key and certificate
files they name. A change is loaded only once it is complete (`StableFiles`): a symlink swap at once
(Kubernetes updates a mounted ConfigMap or Secret by swapping the `..data` symlink, which is atomic), a
file written in place once it has stayed the same for `SETTLE` seconds, so a half-written or truncated
file is never served. Reading, parsing and validating run in a worker process, so traffic keeps flowing
while a large config loads; the new state is built on the event loop and swapped in one assignment.
A failed reload is logged with every error, counted, reported by `/_health/ready`, and changes nothing.
Shard files that do not match routes.yaml's index (ConfigMaps updated at different times) are not a
failure: the reload waits for the next change, and the config in force stays.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from apigw.config.errors import ConfigError, ConfigIncomplete
from apigw.config.loader import config_files, load_config_parts, shard_files
from apigw.config.model import Config, Route, restart_settings
from apigw.pipeline.state import Gateway, GatewayState, build_steps
from apigw.server.last_good import LastGood
from apigw.server.tls import ServerTLS, check_tls

log = logging.getLogger("apigw.reload")

POLL_INTERVAL = 0.5
SETTLE = 2.0
"""Seconds a file written in place must stay unchanged (inode, mtime, size) before it is loaded."""

WORKER_NICENESS = 10
"""The reload's worker process yields the CPU to traffic: where both share a core (a pod limited to one
CPU), the kernel gives the event loop about nine tenths of it."""

RETIRE_POLL = 0.5
RETIRE_LIMIT = 3600.0
"""Pools of a removed backend close when the last request begun before the reload is done, or after
this long (a stream that outlives it is cut)."""

FileStat = tuple[str, int, int, int]
"""(resolved path, inode, mtime in ns, size); ("", 0, 0, 0) for a file that cannot be read."""
Snapshot = dict[str, FileStat]


class StableFiles:
    """Tells when changed files are complete enough to load.

    A file whose resolved path changed was swapped in by a symlink (atomic: ready at once). A file
    changed in place may still be being written: it is ready once its stat has stayed the same for
    `settle` seconds, seen on two polls or more.
    """

    def __init__(self, files: Callable[[], list[Path]], settle: float = SETTLE,
                 clock: Callable[[], float] = time.monotonic):
        self.files, self.settle, self.clock = files, settle, clock
        self.in_force = self.snapshot()
        """The files as they were when last loaded (or rejected): a change is measured against it."""
        self._seen, self._since = self.in_force, clock()

    def snapshot(self) -> Snapshot:
        stats = {}
        for file in self.files():
            try:
                real = os.path.realpath(file)
                st = os.stat(real)
                stats[str(file)] = (real, st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                stats[str(file)] = ("", 0, 0, 0)
        return stats

    def unchanged_for(self, snapshot: Snapshot) -> float:
        """Seconds since the files were first seen as in `snapshot`."""
        now = self.clock()
        if snapshot != self._seen:
            self._seen, self._since = snapshot, now
        return now - self._since

    def ready(self) -> bool:
        """True when the files differ from those in force and the change is complete."""
        current = self.snapshot()
        if current == self.in_force:
            return False
        settled = self.unchanged_for(current) >= self.settle
        return settled or self._swapped(current)

    def _swapped(self, current: Snapshot) -> bool:
        """Every changed file now resolves to another path: a symlink swap, complete when visible."""
        changed = [(self.in_force.get(name), stat) for name, stat in current.items() if self.in_force.get(name) != stat]
        return all(before is not None and before[0] and stat[0] and before[0] != stat[0] for before, stat in changed)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Unpickling a large config and building its state make objects by the hundred thousand, and the
    cyclic collector's passes over them hold the event loop (measured while parsing 5,000 routes in a
    thread: passes of up to 650 ms). The collector rests until the new state is in force."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def keep_out_of_collections() -> None:
    """Move every object alive now, the state in force among them, out of the cyclic collector's reach.

    A config of 5,000 routes is some 110,000 objects; after a reload the collector's next full pass would
    walk them all, and each later one again (measured: 110 ms holding the event loop). A config holds no
    reference cycle (a test checks that a replaced state is freed by reference counting alone), so frozen
    objects are still freed when their last reference goes. Only garbage cycles alive now would never be
    collected; requests make none (measured: 0 after 500 requests answered 200, 401, 404, 429, 502, 503).
    """
    gc.freeze()


class Reloader:
    def __init__(self, gateway: Gateway, path: Path, tls: ServerTLS | None, last_good: LastGood | None,
                 interval: float = POLL_INTERVAL):
        self.gateway, self.path, self.tls, self.interval = gateway, path, tls, interval
        self.last_good = last_good
        """A worker's copy of the config in force, for a sibling started while the files are invalid."""
        self.files = StableFiles(self.watched_files)
        self._lock = asyncio.Lock()
        """One reload at a time: a SIGHUP during a reload runs after it."""
        self._requested = False
        """A reload requested by a signal waits for its turn."""
        self._tasks: set[asyncio.Task[Any]] = set()
        """Reloads started by a signal, and pools waiting to be retired."""
        self._pending: list[Any] = []
        """Retired pools not closed yet."""

    def watched_files(self) -> list[Path]:
        try:
            files = config_files(self.path)
        except ConfigError:
            files = [self.path]
        files += shard_files(self.path)
        files += self.gateway.state.auth.watched_files()
        files += self.gateway.shared.clusters.watched_files()
        if self.tls is not None:
            files += self.tls.watched_files()
        return files

    def request(self, reason: str) -> None:
        """Start a reload from a signal handler (which cannot await). Signals that come while a reload
        waits for its turn add nothing to it: a storm of them makes a reload at a time, not one each."""
        if self._requested:
            return
        self._requested = True
        self._spawn(self._requested_reload(reason))

    async def _requested_reload(self, reason: str) -> bool:
        async with self._lock:
            self._requested = False  # from here the files are read: a later signal needs a reload of its own
            return await self._reload(reason)

    async def reload(self, reason: str) -> bool:
        """Build the new state from the files and swap it in; on any error keep the old one and say why.

        The certificate in force is reloaded first and on its own: a renewal is served even while the
        config is broken. Only a config naming other certificate files waits for the config to be valid.
        """
        async with self._lock:
            return await self._reload(reason)

    async def _reload(self, reason: str) -> bool:
        gateway = self.gateway
        old = gateway.state
        started = time.monotonic()
        certificate_error = self._reload_certificate()
        before = self.files.snapshot()
        try:
            parsed = await self._parse_in_worker()
        except ConfigIncomplete as exc:
            return self._wait_for_shards(reason, old, before, exc)
        except Exception as exc:  # ConfigError, or anything else: a reload never takes the gateway down
            return self._reject(reason, old, before, exc, certificate_error)
        with collector_paused():
            try:
                base, parts, digest, texts = parsed
                config, digest, held = await self._unpickle(base, parts, digest)
                if self._incomplete(before, old.config, config, reason):
                    return False
                tls_files = config.listen.tls if self.tls is not None and config.listen.tls != self.tls.files else None
                if tls_files is not None:
                    check_tls(tls_files)
                state, built_in = await self._build(config, digest)
                held = max(held, built_in)
                if tls_files is not None:
                    self.tls.load(tls_files)
            except Exception as exc:
                return self._reject(reason, old, before, exc, certificate_error)
            gateway.state = state
            keep_out_of_collections()
            await asyncio.sleep(0)  # traffic first, then the bookkeeping and the old state's release
        gateway.last_reload_error = certificate_error
        logging.getLogger().setLevel(config.logging.level)
        gateway.metrics.config_reloads.labels("success").inc()
        self.files.in_force = self.files.snapshot()  # the new state may watch other key files
        self._warn_dropped_routes(old.config, config)
        self._warn_restart_settings(old.config, config)
        self._retire(old)
        if self.last_good is not None:
            await asyncio.to_thread(self.last_good.keep, texts)
        took = round((time.monotonic() - started) * 1000, 1)
        log.info(
            "config reloaded (%s) in %s ms: %s -> %s, %d routes", reason, took, old.config_hash, state.config_hash,
            len(config.routes),
            extra={"fields": {"config_hash": state.config_hash, "previous_config_hash": old.config_hash,
                              "reload_ms": took, "loop_held_ms": round(held * 1000, 1)}},
        )
        return True

    def _wait_for_shards(self, reason: str, old: GatewayState, before: Snapshot, exc: ConfigIncomplete) -> bool:
        log.warning(
            "config reload (%s) deferred, keeping config %s until the shards match routes.yaml: %s",
            reason, old.config_hash, exc.errors[0], extra={"fields": {"errors": exc.errors, "config_hash": old.config_hash}},
        )
        self.files.in_force = before
        return False

    def _reject(
        self, reason: str, old: GatewayState, before: Snapshot, exc: Exception, certificate_error: str | None
    ) -> bool:
        errors = exc.errors if isinstance(exc, ConfigError) else [f"{type(exc).__name__}: {exc}"]
        self.gateway.metrics.config_reloads.labels("failure").inc()
        self.gateway.last_reload_error = "; ".join([certificate_error, *errors] if certificate_error else errors)
        log.error(
            "config reload (%s) rejected, keeping config %s: %s", reason, old.config_hash, errors[0],
            extra={"fields": {"errors": errors, "config_hash": old.config_hash}},
        )
        self.files.in_force = before
        return False

    async def _parse_in_worker(self) -> tuple[bytes, list[bytes], str, dict[str, str]]:
        """Read, parse, validate and hash the config in a worker process (`load_config_parts`).

        A thread is not enough: parsing holds the GIL, and every I/O callback of the event loop waits
        for it (measured with 5,000 routes: requests delayed by up to 2 s during a 1 s parse). A fresh
        process per reload costs its start-up (about half a second) and no memory between reloads.
        """
        pool = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice, initargs=(WORKER_NICENESS,)
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, load_config_parts, self.path)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    async def _unpickle(base: bytes, parts: list[bytes], digest: str) -> tuple[Config, str, float]:
        """The config from the worker's parts, a part at a time with traffic served in between; also the
        longest a part held the event loop, in seconds."""
        config = pickle.loads(base)
        routes: list[Route] = []
        held = 0.0
        for part in parts:
            await asyncio.sleep(0)
            started = time.perf_counter()
            routes += pickle.loads(part)
            held = max(held, time.perf_counter() - started)
        return config.model_copy(update={"routes": routes}), digest, held

    async def _build(self, config: Config, digest: str) -> tuple[GatewayState, float]:
        """The state for `config`, built a step at a time with traffic served in between; also the longest
        a step held the event loop, in seconds. Fails, if at all, before it changes anything shared."""
        steps = build_steps(config, self.gateway.shared, digest)
        held = 0.0
        while True:
            started = time.perf_counter()
            try:
                next(steps)
            except StopIteration as built:
                return built.value, max(held, time.perf_counter() - started)
            held = max(held, time.perf_counter() - started)
            await asyncio.sleep(0)

    def _incomplete(self, before: Snapshot, old: Config, new: Config, reason: str) -> bool:
        """True when what was read must not be served yet; the watcher loads it once the files settle.

        Files that changed while they were read may have been read half-written. A config without routes
        replacing one with routes is most likely a file truncated for rewriting (a SIGHUP does not wait
        for files to settle), so it is applied only once the files have stayed the same for `settle`.
        """
        if self.files.snapshot() != before:
            log.info("config reload (%s) deferred: the files changed while being read", reason)
            return True
        if old.routes and not new.routes and self.files.unchanged_for(before) < self.files.settle:
            log.info("config reload (%s) deferred: the new config has no routes (%d in force); applied if the "
                     "files stay so for %ss", reason, len(old.routes), self.files.settle)
            return True
        return False

    def _reload_certificate(self) -> str | None:
        """Load the certificate files in force again; the error when they are unusable (the old one stays)."""
        if self.tls is None:
            return None
        try:
            self.tls.load(self.tls.files)
        except ConfigError as exc:
            self.gateway.metrics.config_reloads.labels("failure").inc()
            log.error("TLS certificate reload rejected, keeping the one in force: %s", exc.errors[0],
                      extra={"fields": {"errors": exc.errors}})
            self.gateway.last_reload_error = "; ".join(exc.errors)
            return self.gateway.last_reload_error
        return None

    def _warn_dropped_routes(self, old: Config, new: Config) -> None:
        """A reload that removes more than half the routes is applied (it may be meant), and said loudly."""
        kept = {route.name for route in new.routes}
        dropped = sum(1 for route in old.routes if route.name not in kept)
        if dropped * 2 > len(old.routes):
            log.warning(
                "config reload drops %d of %d routes (%d routes now); applied, as it is valid",
                dropped, len(old.routes), len(new.routes),
                extra={"fields": {"routes_dropped": dropped, "routes_before": len(old.routes),
                                  "routes_after": len(new.routes)}},
            )

    def _warn_restart_settings(self, old: Config, new: Config) -> None:
        before, after = restart_settings(old), restart_settings(new)
        changed = sorted(k for k in after if before.get(k) != after[k])
        if new.listen.tls is not None and old.listen.request_head_timeout != new.listen.request_head_timeout:
            changed.append("listen.request_head_timeout (the TLS handshake bound)")  # asyncio takes it once
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

        self._spawn(close_when_unused())

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.files.ready():
                await self.reload("file change")

    async def close(self) -> None:
        """At shutdown (requests are done): stop reloads, close the pools still waiting to be retired."""
        for task in self._tasks:
            task.cancel()
        pools, self._pending = self._pending, []
        for pool in pools:
            await pool.aclose()
