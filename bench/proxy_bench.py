"""Load the backend directly and through the gateway in one run, and print one table.

    python bench/proxy_bench.py [--duration 10] [--connections 50]

wrk (Debian package `wrk`) generates the load. The backend is nginx when installed (so the table
measures the gateway, not a slow backend), else the test kit's aiohttp echo backend. wrk and the
backend run on core 0, the gateway on core 1. CPU us/request is the gateway's own CPU time divided by
the requests it served: the figure that survives a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "dataplane"))

from apigw.testkit.process import http_status, wait_until  # noqa: E402
from apigw.testkit.redis import free_port  # noqa: E402

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
    uwsgi_temp_path {dir}; scgi_temp_path {dir};
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{ default_type application/json; return 200 '{{"ok":true}}'; }}
    }}
}}
"""


def wait_http(url: str) -> None:
    wait_until(lambda: http_status(url) == 200, what=url)


def start_backend(tmp: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx:
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, port=port))
        cmd = ["taskset", "-c", "0", nginx, "-c", str(conf), "-e", str(tmp / "error.log")]
        kind = "nginx"
    else:
        cmd = ["taskset", "-c", "0", sys.executable, "-m", "apigw.testkit.backend", str(port)]
        kind = "aiohttp echo"
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/")
    return process, url, kind


def start_gateway(tmp: Path, backend_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port, metrics_port = free_port(), free_port()
    config = {
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
        "logging": {"access_log": True},
        "routes": [{"name": "bench", "backend": {"service": "bench", "url": backend_url}}],
    }
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-m", "apigw", "--config", str(tmp / "gateway.yaml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_health/ready")
    return process, url


def _env() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "PYTHONPATH": f"{root / 'dataplane'}:{os.environ.get('PYTHONPATH', '')}"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": rps, "requests": total, "errors": int(non2xx.group(1)) if non2xx else 0,
        "p50": _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),
        "p99": _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="apigw-bench-") as tmp_name:
        tmp = Path(tmp_name)
        backend, backend_url, kind = start_backend(tmp)
        gateway, gateway_url = start_gateway(tmp, backend_url)
        try:
            wrk(gateway_url + "/", 2, args.connections)  # warm up pools and caches
            direct = wrk(backend_url + "/", args.duration, args.connections)
            before = cpu_seconds(gateway.pid)
            through = wrk(gateway_url + "/", args.duration, args.connections)
            through["cpu_us"] = (cpu_seconds(gateway.pid) - before) / through["requests"] * 1e6
        finally:
            gateway.terminate()
            backend.terminate()
            gateway.wait(30)
            backend.wait(30)
    print(f"backend: {kind}; wrk -t1 -c{args.connections} -d{args.duration}s; wrk+backend on core 0, gateway on core 1")
    print(f"{'target':<10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'CPU us/req':>11}")
    print(f"{'direct':<10} {direct['rps']:>10.0f} {direct['p50']:>8.2f} {direct['p99']:>8.2f} {direct['errors']:>8}"
          f" {'-':>11}")
    print(f"{'gateway':<10} {through['rps']:>10.0f} {through['p50']:>8.2f} {through['p99']:>8.2f} "
          f"{through['errors']:>8} {through['cpu_us']:>11.0f}")
    print(f"gateway/direct req/s ratio: {through['rps'] / direct['rps']:.3f}")


if __name__ == "__main__":
    main()
