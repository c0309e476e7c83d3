"""The `gateway` command: run, `-validate-config`, and `demo`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from apigw.config.errors import ConfigError
from apigw.config.model import config_hash
from apigw.observability.logs import setup_logging
from apigw.server.config_check import check_config_and_files
from apigw.server.tls import certificate_expiry, expired_note

DEFAULT_CONFIG = "/etc/gateway/"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        usage="gateway [--config PATH] [--workers N] [--debug-port PORT] [-validate-config]\n"
              "       gateway demo [--port PORT] [--metrics-port PORT] [--redis URL]",
        description="API gateway data plane: serve traffic with the config at --config, or check it.",
        epilog="commands:\n  demo    run the gateway with an echo backend, an example config and a valid token "
               "on this machine\n          (no cluster, no Redis); see `gateway demo --help`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, metavar="PATH", default=Path(os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG)),
        help="config file, or ConfigMap directory with config.yaml and routes.yaml (default: $GATEWAY_CONFIG or %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, metavar="N", help="worker processes sharing the port (default: listen.workers, 1)",
    )
    parser.add_argument(
        "--debug-port", type=int, metavar="PORT",
        help="serve /debug/tasks and /debug/profile on 127.0.0.1:PORT (off by default)",
    )
    parser.add_argument(
        "-validate-config", "--validate-config", dest="validate", action="store_true",
        help="check the config and the files it names, print a summary or every error, and exit",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from apigw.demo import main as demo_main

        return demo_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.validate:
        return validate(args.config)
    from apigw.server.serve import run, serve

    setup_logging()
    if args.workers is not None and args.workers < 1:
        _parser().error("--workers must be at least 1")
    return run(serve(args.config, args.workers, args.debug_port))


def validate(path: Path) -> int:
    """Print a one-line summary and return 0, or every located error and return 1."""
    shown = f"{path}/" if path.is_dir() else str(path)
    try:
        checked = check_config_and_files(path)
    except ConfigError as exc:  # a config file that cannot be read
        return _report_errors(shown, exc.errors)
    if checked.errors:
        return _report_errors(shown, checked.errors)
    config = checked.config
    enabled = sum(1 for r in config.routes if r.enabled)
    print(
        f"{shown}: OK: {len(config.routes)} routes ({enabled} enabled), {len(config.policies)} rate limit policies, "
        f"config_hash {config_hash(config)}"
    )
    if config.listen.tls is not None:
        _warn_expired(config.listen.tls.cert_file)
    return 0


def _warn_expired(cert_file: Path) -> None:
    """An expired listener certificate is no config error (the gateway serves it until a renewal comes),
    but every verifying client refuses it: the check says so rather than a bare OK."""
    expired = expired_note(cert_file, certificate_expiry(cert_file))
    if expired:
        print(f"warning: listen.tls.cert_file: {expired}; verifying clients refuse it", file=sys.stderr)


def _report_errors(shown: str, errors: list[str]) -> int:
    print(f"{shown}: {len(errors)} error(s)", file=sys.stderr)
    for error in errors:
        print(f"  {error}", file=sys.stderr)
    return 1
