"""apigw-operator: GatewayRoute and RateLimitPolicy CRs to the gateway's validated `routes.yaml`."""


def main() -> None:
    """The `apigw-operator` command: a clear word, not a traceback, when the `operator` extra is missing."""
    import sys

    try:
        from apigw_operator.cli import main as run
    except ModuleNotFoundError as exc:
        sys.exit(f"apigw-operator needs the {exc.name!r} package: pip install 'apigw[operator]'")
    run()
