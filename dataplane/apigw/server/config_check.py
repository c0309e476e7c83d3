"""A config checked together with the files it names, for `gateway -validate-config` and start-up.

Key and certificate files are read as the gateway reads them at start, as far as the settings naming
them parsed, so that their problems are reported with the config's own in one pass, each at the line
of its setting. (A reload reads them when it builds the new state, after the config is valid.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from apigw.config.errors import ConfigError
from apigw.config.loader import Checked, check_config
from apigw.policy.auth import load_keys
from apigw.server.tls import check_tls
from apigw.upstream.cluster import held_backends, read_backends


def check_config_and_files(path: Path, hold: bool = False) -> Checked:
    """Every problem in the config at `path` and in the files it names (ConfigError: a file unreadable).

    A backend of the operator's routes whose TLS files cannot be used is one too, at that route's
    `backend.tls`, unless `hold` (start-up: the gateway holds it unavailable and serves the rest, as a
    reload does); `gateway -validate-config` is a check, and refuses it.
    """
    return check_files(check_config(path), hold)


def check_files(checked: Checked, hold: bool = False) -> Checked:
    """`checked` with the problems of the key and certificate files its config names added (`hold`: as
    for `check_config_and_files`)."""
    config = checked.config
    file_checks: list[Callable[[], object]] = []
    if "auth" not in checked.unparsed:
        file_checks.append(lambda: load_keys(config.auth))
    tls = config.listen.tls
    if "listen" not in checked.unparsed and tls is not None:
        file_checks.append(lambda: check_tls(tls))
    if "routes" not in checked.unparsed:
        file_checks.append(lambda: _backends_tls(checked, hold))
    for check in file_checks:
        try:
            check()
        except ConfigError as exc:
            for error in exc.errors:
                checked.add_setting_error(error)
    return checked


def _backends_tls(checked: Checked, hold: bool) -> None:
    """Read the backends' TLS files: ConfigError for those of config.yaml's backends; those of the
    operator's routes are located at the first route using the backend."""
    settings, errors = read_backends(checked.config)
    for backend in () if hold else held_backends(checked.config, settings):
        file, index = checked.route_places[backend.routes[0]]
        checked.add_at(file, ("routes", index, "backend", "tls"), backend.error)
    if errors:
        raise ConfigError(errors)
