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
from apigw.upstream.cluster import cluster_settings


def check_config_and_files(path: Path) -> Checked:
    """Every problem in the config at `path` and in the files it names (ConfigError: a file unreadable)."""
    checked = check_config(path)
    config = checked.config
    file_checks: list[Callable[[], object]] = []
    if "auth" not in checked.unparsed:
        file_checks.append(lambda: load_keys(config.auth))
    tls = config.listen.tls
    if "listen" not in checked.unparsed and tls is not None:
        file_checks.append(lambda: check_tls(tls))
    if "routes" not in checked.unparsed:
        file_checks.append(lambda: cluster_settings(config))  # the backends' TLS files
    for check in file_checks:
        try:
            check()
        except ConfigError as exc:
            for error in exc.errors:
                checked.add_setting_error(error)
    return checked
