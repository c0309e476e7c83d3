"""With `--workers N`: the last config a worker loaded, for a sibling that is started again.

A reload keeps the config in force when the files turn invalid, so the workers serve on; but a worker that
dies then (a crash, an OOM kill) is started again by the supervisor, reads the invalid files and would exit
at once, again and again. So each worker keeps the texts of the files it loaded (config.yaml, routes.yaml
and the shards: the texts as the loader read them, under their own names) in a file of the directory it
shares with the supervisor, at start and at each reload; a worker whose files do not load starts from that
copy instead: the config its siblings serve. The key and certificate files that config names are read as
they are now (private keys are not copied out of their Secret): when they do not load either, the worker
exits with both errors, and the supervisor's back-off and health say so. On the pod's first start there
is no copy: the supervisor itself checks the files and exits with their errors (shards that do not match
routes.yaml yet are waited for first, `SHARDS_WAIT`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import orjson

from apigw.config.errors import ConfigError, ConfigIncomplete
from apigw.config.loader import Checked, check_documents
from apigw.config.model import config_hash
from apigw.server.config_check import check_config_and_files, check_files

log = logging.getLogger("apigw.server")

LAST_GOOD_FILE = "last-good-config.json"


SHARDS_WAIT = 45.0
"""Seconds a gateway starting with no config to fall back on waits for shards that do not match routes.yaml
yet: the kubelet updates each ConfigMap of the volume on its own, and the pod's startup probe allows 60 s."""


class LastGood:
    def __init__(self, directory: Path):
        self.path = directory / LAST_GOOD_FILE

    def keep(self, texts: Mapping[str, str]) -> None:
        """Replace the copy whole (write, then rename): a worker starting meanwhile reads the old or the new.
        A copy that cannot be written costs only the fallback: the worker serves on."""
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")  # siblings write it too
        try:
            temporary.write_bytes(orjson.dumps(texts))
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("cannot keep a copy of the config for a restarted worker: %s", exc,
                        extra={"fields": {"error": str(exc)}})

    def load(self) -> Checked:
        """The kept config, checked with the files it names as they are now (ConfigError: no copy yet)."""
        try:
            texts = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(["no config has loaded since the pod started"]) from None
        return check_files(check_documents(texts), hold=True)


def start_config(path: Path, last_good: LastGood | None) -> tuple[Checked, ConfigError | None]:
    """The config to start with: the files at `path`, checked with the files they name. For a worker whose
    files do not load, the last good config instead, with the files' error."""
    try:
        return _complete(path, SHARDS_WAIT if last_good is None else 0), None
    except ConfigError as exc:
        if last_good is None:
            raise
        rejected = exc
    try:
        kept = last_good.load()
        config = kept.result()
    except ConfigError as exc:
        log.error("cannot start on the last good config instead: %s", exc.errors[0],
                  extra={"fields": {"errors": exc.errors, "pid": os.getpid()}})
        raise rejected from None
    incomplete = isinstance(rejected, ConfigIncomplete)
    log.log(
        logging.WARNING if incomplete else logging.ERROR,
        "config %s %s: %s; starting on the last good config %s, the one the other workers serve", path,
        "is mid-update" if incomplete else "is invalid", rejected.errors[0], config_hash(config),
        extra={"fields": {"errors": rejected.errors, "config_hash": config_hash(config), "pid": os.getpid()}},
    )
    return kept, rejected


def _complete(path: Path, wait: float) -> Checked:
    """The files at `path`, checked; while their shards do not match routes.yaml (ConfigIncomplete), read
    again for up to `wait` seconds, the volume's next update being on its way."""
    deadline = time.monotonic() + wait
    warned = False
    while True:
        try:
            checked = check_config_and_files(path, hold=True)
            checked.result()
            return checked
        except ConfigIncomplete as exc:
            if time.monotonic() >= deadline:
                raise
            if not warned:
                log.warning("config %s is mid-update, waiting up to %.0f s for its shards: %s", path, wait,
                            exc.errors[0], extra={"fields": {"errors": exc.errors}})
                warned = True
            time.sleep(0.5)
