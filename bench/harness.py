"""What the bench scripts share: processes pinned to cores, nginx configs, wrk runs, /proc figures.

The layout follows issue 8: two cores; wrk, the backend and Redis on core 0 (`LOAD_CORE`), the proxy
under test alone on core 1 (`PROXY_CORE`). A proxy's cost is its own CPU time (user + sys, from
/proc/<pid>/stat, summed over its process tree) divided by the requests it served: the figure that
survives a noisy machine, where requests/s and latencies move with whatever else runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dataplane"))

from apigw.testkit.process import http_status, wait_until  # noqa: E402
from apigw.testkit.redis import free_port  # noqa: E402

LOAD_CORE = 0
PROXY_CORE = 1
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
"""How long an idle vCPU of this VM polls for work before it halts (cpuidle-haltpoll; 0 at boot here)."""

NGINX_COMMON = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
    uwsgi_temp_path {dir}; scgi_temp_path {dir};
    keepalive_requests 1000000;
{body}
}}
"""

NGINX_BACKEND = """
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{{"ok":true}}'; }}
    }}
"""
"""A backend that answers a small fixed JSON body at once, so the proxy in front is the bottleneck."""

NGINX_PROXY = """
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""
"""The anchor peer: nginx as a reverse proxy keeping its upstream connections alive, as a gateway does."""


def env() -> dict[str, str]:
    """The environment for child processes: `apigw` importable from the checkout."""
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'dataplane'}:{os.environ.get('PYTHONPATH', '')}"}


def pin(pid: int, core: int) -> None:
    """Pin every thread of `pid` (threads it starts later inherit the pin)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {core})


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (nginx: master and worker)."""
    found = [pid]
    for tid in os.listdir(f"/proc/{pid}/task"):
        children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        for child in children:
            found.extend(process_tree(int(child)))
    return found


def cpu_seconds(pid: int) -> float:
    """User + sys CPU time of `pid` and its descendants."""
    total = 0
    for each in process_tree(pid):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants."""
    total_kb = 0
    for each in process_tree(pid):
        status = Path(f"/proc/{each}/status").read_text()
        total_kb += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
    return total_kb / 1024


class Processes:
    """Everything a bench run starts, stopped in reverse order by `stop_all` (also on error or Ctrl-C)."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, command: Sequence[str], core: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["taskset", "-c", str(core), *command], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env()
        )
        self.running.append(process)
        return process

    def nginx(self, workdir: Path, body: str, core: int) -> subprocess.Popen[bytes]:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_COMMON.format(dir=workdir, body=body))
        return self.start([binary, "-c", str(conf), "-e", str(workdir / "error.log")], core)

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)


def nginx_backend(procs: Processes, tmp: Path) -> str:
    """The backend every wrk-driven script proxies to (`NGINX_BACKEND` on the load core); its URL once it answers."""
    port = free_port()
    procs.nginx(tmp / "backend", NGINX_BACKEND.format(port=port), LOAD_CORE)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/")
    return url


def run_bench(run: Callable[[Path, Processes], None]) -> None:
    """`run(tmp, procs)` from the load core in a temporary directory; whatever it starts through `procs` is
    stopped on the way out, also on Ctrl-C or SIGTERM. Prints the total time."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop everything on the way out, as on Ctrl-C
    os.sched_setaffinity(0, {LOAD_CORE})  # this script (wrk's parent, a MONITOR reader) stays off the proxy's core
    started = time.monotonic()
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="apigw-bench-") as tmp:
            run(Path(tmp), procs)
    except KeyboardInterrupt:
        sys.exit("interrupted: everything started is stopped")
    finally:
        procs.stop_all()
    print(f"total time {time.monotonic() - started:.0f} s")


def wait_http(url: str, process: subprocess.Popen[bytes] | None = None) -> None:
    def up() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the process serving it exited with {process.returncode}")
        return http_status(url) != 0

    wait_until(up, what=url)


@dataclass
class WrkResult:
    rps: float
    requests: int
    non2xx: int
    socket_errors: int
    p50: float
    """Milliseconds."""
    p99: float
    mean: float


def wrk(
    url: str, duration: float, connections: int, script: Path | None = None, headers: Sequence[str] = (),
) -> WrkResult:
    """One wrk run from core 0 with one thread (one thread drives tens of thousands of requests/s)."""
    command = ["taskset", "-c", str(LOAD_CORE), "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    for header in headers:
        command += ["-H", header]
    if script is not None:
        command += ["-s", str(script)]
    out = subprocess.run(command + [url], capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        requests=int(re.search(r"(\d+) requests in", out).group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(n) for n in socket.groups()) if socket else 0,
        p50=_ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),
        p99=_ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),
        mean=_ms(re.search(r"Latency\s+([\d.]+\w+)", out).group(1)),
    )


def wrk_together(loads: Sequence[tuple[str, dict[str, Any]]], duration: float, connections: int) -> list[WrkResult]:
    """One wrk run for each (url, its headers or script) in `loads`, all at once, each with `connections`."""
    with ThreadPoolExecutor(len(loads)) as pool:
        return list(pool.map(lambda each: wrk(each[0], duration, connections, **each[1]), loads))


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def choices(parser: argparse.ArgumentParser, text: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated list of names from `allowed` (`--rows`, `--variants`); a usage error names the others."""
    names = text.split(",")
    unknown = set(names) - set(allowed)
    if unknown:
        parser.error(f"unknown {what} {sorted(unknown)}; choose from {','.join(allowed)}")
    return names


def require(*binaries: str) -> None:
    missing = [name for name in binaries if not (shutil.which(name) or Path(f"/usr/sbin/{name}").exists())]
    if missing:
        sys.exit(f"not installed: {', '.join(missing)} (apt-get install {' '.join(missing)})")


@contextmanager
def halt_polling(ns: int | None) -> Iterator[None]:
    """With `ns`: idle vCPUs poll that long for work before they halt, while the benchmark runs; then as before
    (unless the script is killed with SIGKILL).

    On this VM a halted vCPU is woken by an interrupt that exits to the hypervisor, and the waker pays for
    it in system time: the proxy, each time it sends to wrk or the backend while the load core is idle
    (session 7: the off gateway's system time 35 us a request, 23 with polling; nginx's 15 and 14). A proxy
    serving other machines never pays it. See bench/README.md for what it does to each row."""
    if ns is None:
        yield
        return
    try:
        before = HALT_POLL.read_text().strip()
        HALT_POLL.write_text(str(ns))
    except OSError as exc:
        sys.exit(f"--halt-poll {ns}: cannot set {HALT_POLL}: {exc.strerror} (it takes root, a VM with "
                 "cpuidle-haltpoll, and nanoseconds from 0 up)")
    try:
        yield
    finally:
        HALT_POLL.write_text(before)


def add_halt_poll(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--halt-poll", type=int, metavar="NS",
                        help=f"idle vCPUs poll NS nanoseconds before halting during the run ({HALT_POLL}); "
                             "see bench/README.md")


def halt_poll_line(ns: int | None) -> str:
    """The table's note of the setting: every figure depends on it."""
    if ns is None:
        return f"idle vCPUs as the machine has them (guest_halt_poll_ns {_halt_poll_now()})"
    return f"idle vCPUs poll {ns / 1000:.0f} us before halting (--halt-poll {ns})"


def _halt_poll_now() -> str:
    try:
        return HALT_POLL.read_text().strip()
    except OSError:
        return "not on this machine"
