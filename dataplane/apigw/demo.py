"""`gateway demo`: the whole gateway on one machine with nothing else installed.

It starts an echo backend on a free loopback port, generates a development key pair, writes an
example config (a rate-limited route, a route that needs a token, a slow one) into a temporary
directory, runs the real gateway on it, and prints what to try with a valid token. No Redis, no cluster.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from apigw.observability.logs import setup_logging
from apigw.server.serve import run, serve
from apigw.testkit.backend import Backend
from apigw.testkit.tokens import SigningKey


class PlainDumper(yaml.SafeDumper):
    """Writes a value shared by several routes out in full each time: no `&id001` anchors for people
    editing the file to puzzle over (and no error reported twice on a shared part)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


DEMO_AUDIENCE = "gateway-demo"
"""The demo's tokens are minted for it, as a production gateway's should be (`auth.audience`)."""


def demo_config(backend_url: str, port: int, metrics_port: int, key_file: Path, redis_url: str | None) -> dict:
    backend = {"service": "echo", "url": backend_url, "timeout": "2s"}
    config = {
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
        "auth": {"keys": [{"file": str(key_file), "kid": "demo"}], "audience": DEMO_AUDIENCE,
                 "forward_claims": {"sub": "X-User-Id"}},
        "policies": [{"name": "demo", "requests": 5, "period": "10s"}],
        "routes": [
            {"name": "echo", "match": {"path_prefix": "/api/v1"}, "rewrite_prefix": "/", "backend": backend,
             "ratelimit": "demo"},
            {"name": "secure", "match": {"path_prefix": "/secure"}, "backend": backend,
             "auth": {"scopes": ["demo:read"]}},
            {"name": "slow", "match": {"path_prefix": "/slow"}, "backend": {**backend, "timeout": "1s"}},
        ],
    }
    if redis_url:
        config["redis"] = {"url": redis_url}
    return config


def instructions(port: int, metrics_port: int, config_dir: Path, token: str, redis_url: str | None) -> str:
    base = f"http://127.0.0.1:{port}"
    limiter = f"in Redis at {redis_url}" if redis_url else "in-process (give --redis URL to share it through Redis)"
    return f"""
API gateway demo: gateway on {base}, metrics on http://127.0.0.1:{metrics_port}/metrics
config: {config_dir}/config.yaml (edit it: the gateway reloads on save); rate limit state {limiter}

Try:
  curl -i {base}/api/v1/hello                  # proxied to the echo backend (prefix rewritten to /)
  for i in $(seq 1 8); do curl -s -o /dev/null -w "%{{http_code}}\\n" {base}/api/v1/hello; done | sort | uniq -c
                                               # 5 requests per 10s: a mix of 200 and 429
  curl -i {base}/secure/data                   # 401: this route needs a token
  TOKEN={token}
  curl -i -H "Authorization: Bearer $TOKEN" {base}/secure/data
                                               # 200: the backend sees X-User-Id: demo-user
  curl -i {base}/nowhere                       # 404 from the gateway, JSON with a request_id
  curl -i '{base}/slow?s=3'                    # backend too slow: 504 after the route's 1s timeout
  curl -s {base}/_health/ready                 # readiness and the config_hash in force
  curl -s http://127.0.0.1:{metrics_port}/metrics | grep -E "gateway_(http_requests|auth_attempts|ratelimit_requests)_total"
Logs below are the gateway's JSON lines. Ctrl-C stops it.
"""


async def run_demo(port: int, metrics_port: int, redis_url: str | None) -> int:
    async with Backend("echo") as backend:
        with tempfile.TemporaryDirectory(prefix="apigw-demo-") as tmp:
            config_dir = Path(tmp)
            key = SigningKey("rsa", kid="demo")
            key_file = key.write_public_pem(config_dir / "jwt-public-key.pem")
            config = demo_config(backend.url, port, metrics_port, key_file, redis_url)
            (config_dir / "config.yaml").write_text(yaml.dump(config, Dumper=PlainDumper, sort_keys=False))
            token = key.token(ttl=24 * 3600, sub="demo-user", scope="demo:read", aud=DEMO_AUDIENCE)
            print(instructions(port, metrics_port, config_dir, token, redis_url), flush=True)
            return await serve(config_dir)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gateway demo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="the gateway's traffic port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=9090, metavar="PORT",
                        help="the /metrics port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--redis", metavar="URL", help="keep rate limit state in this Redis (redis://host:port/0)")
    args = parser.parse_args(argv)
    setup_logging()
    return run(run_demo(args.port, args.metrics_port, args.redis))
