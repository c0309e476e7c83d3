"""Memory under many connections over time: the gateway, all features on, under 1,000 keep-alive
connections for a while, its RSS sampled every few seconds.

    python bench/soak.py [--minutes 10] [--connections 1000] [--tokens 20000]

Each request carries the next of `--tokens` distinct tokens, more than the verified-token cache holds,
so the cache stays full and churning: every bounded structure is exercised at its bound. The table shows
RSS over time; flat after warm-up means no leak. It asserts nothing: it prints what it saw.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare import cycling_tokens, gateway_config, start_gateway
from harness import LOAD_CORE, Processes, nginx_backend, require, rss_mb

from apigw.testkit.redis import RedisServer
from apigw.testkit.tokens import SigningKey

SAMPLE_SECONDS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=20_000)
    args = parser.parse_args()
    require("wrk", "nginx", "taskset")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="apigw-soak-") as name, RedisServer() as redis:
        tmp = Path(name)
        try:
            backend_url = nginx_backend(procs, tmp)
            key = SigningKey("rsa")
            key.write_public_pem(tmp / "jwt.pem")
            notes: list[str] = []
            script = cycling_tokens(key, args.tokens, tmp, notes)
            gateway = start_gateway(tmp, "gateway-soak", gateway_config(backend_url, redis.url, tmp / "jwt.pem"))
            seconds = int(args.minutes * 60)
            load = subprocess.Popen(
                ["taskset", "-c", str(LOAD_CORE), "wrk", "-t1", f"-c{args.connections}", f"-d{seconds}s",
                 "-s", str(script), gateway.url + "/"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            print(f"{args.connections} connections for {args.minutes:g} min; {notes[0]}")
            print(f"{'t s':>6} {'RSS MB':>8}")
            samples = []
            started = time.monotonic()
            while load.poll() is None:
                samples.append(rss_mb(gateway.process.pid))  # type: ignore[union-attr]
                print(f"{time.monotonic() - started:6.0f} {samples[-1]:8.1f}", flush=True)
                time.sleep(SAMPLE_SECONDS)
            summary = [line for line in load.stdout.read().splitlines() if "requests in" in line  # type: ignore[union-attr]
                       or "Requests/sec" in line or "Non-2xx" in line or "Socket errors" in line]
            gateway.stop()
        finally:
            procs.stop_all()
    warm = samples[len(samples) // 5:] or samples
    print("\n".join(summary))
    print(f"RSS MB: first {samples[0]:.1f}, max {max(samples):.1f}, after the first fifth: "
          f"min {min(warm):.1f} max {max(warm):.1f} (growth {max(warm) - warm[0]:+.1f})")


if __name__ == "__main__":
    sys.exit(main())
