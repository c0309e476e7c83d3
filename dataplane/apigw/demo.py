"""`gateway demo`: the whole gateway on one machine with nothing else installed.

It starts an echo backend on a free loopback port, writes an example config into a temporary
directory, and runs the real gateway on it, then prints what to try. No Redis, no cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import yaml

from apigw.logs import setup_logging
from apigw.server import serve
from apigw.testkit.backend import Backend


def demo_config(backend_url: str, port: int, metrics_port: int) -> dict:
    return {
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
        "routes": [
            {"name": "echo", "match": {"path_prefix": "/api/v1"}, "rewrite_prefix": "/",
             "backend": {"service": "echo", "url": backend_url, "timeout": "2s"}},
            {"name": "slow", "match": {"path_prefix": "/slow"},
             "backend": {"service": "echo", "url": backend_url, "timeout": "1s"}},
        ],
    }


def instructions(port: int, metrics_port: int, config_dir: Path) -> str:
    base = f"http://127.0.0.1:{port}"
    return f"""
API gateway demo: gateway on {base}, metrics on http://127.0.0.1:{metrics_port}/metrics
config: {config_dir}/config.yaml (edit it: the gateway reloads on save)

Try:
  curl -i {base}/api/v1/hello                  # proxied to the echo backend (prefix rewritten to /)
  curl -i {base}/nowhere                       # 404 from the gateway, JSON with a request_id
  curl -i '{base}/slow?s=3'                    # backend too slow: 504 after the route's 1s timeout
  curl -s {base}/_health/ready                 # readiness and the config_hash in force
  curl -s http://127.0.0.1:{metrics_port}/metrics | grep gateway_http_requests_total
Logs below are the gateway's JSON lines. Ctrl-C stops it.
"""


async def run_demo(port: int, metrics_port: int) -> int:
    async with Backend("echo") as backend:
        with tempfile.TemporaryDirectory(prefix="apigw-demo-") as tmp:
            config_dir = Path(tmp)
            config = demo_config(backend.url, port, metrics_port)
            (config_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            print(instructions(port, metrics_port, config_dir), flush=True)
            return await serve(config_dir)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gateway demo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--metrics-port", type=int, default=9090)
    args = parser.parse_args(argv)
    setup_logging()
    from apigw.cli import run

    return run(run_demo(args.port, args.metrics_port))
