"""The gateway side by side with its peers, in one run and one table (issue 8).

    python bench/compare.py [--duration 10] [--connections 50]
                            [--rows direct,nginx,bare,off,cold,warm,workers,pair,latency]
                            [--rounds 5] [--tokens 20000] [--profile /tmp/gateway-warm.txt] [--halt-poll NS]

Rows: `direct` (wrk to the backend), `nginx` (nginx reverse proxy, keepalive upstream), `bare` (the
~60-line aiohttp proxy below: the baseline Python cannot beat), `off` (the gateway, a route with no
auth, no rate limit, no access log), `cold` and `warm` (the gateway with RS256 JWT auth, a Redis rate
limit that never denies, metrics and access log; `cold`: every request a different token, so the
verified-token cache misses; `warm`: one token, so it hits; `workers`: `warm` with `--workers 2`, all its
processes on the proxy's one core, so that its CPU per request compares with `warm`'s; `pair`: two
`warm` gateways of one process each on that core, loaded at once with half the connections each, the
workers row without the supervisor: so workers / pair is the tax of the workers' machinery alone, and
pair / warm what two busy processes sharing one core cost here). The off, cold, warm, workers and pair
gateways run side by side and are measured in `--rounds` interleaved rounds; the table
has each row's median round, and the notes every round's figure and each goal's ratio round by round
(the rows of one round run within a minute of each other, so the spread of those ratios shows how far the
host's noise moves the goal's). `latency` adds a
second table: latency over direct at light load, also in `--rounds` interleaved rounds (the run of
median p99 of each side). `--profile FILE` samples the gateway with py-spy during an
extra warm run (and a cold one, when `cold` is a row) and prints the functions with the most own time. See
bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import redis
import yaml
from harness import (
    LOAD_CORE,
    NGINX_PROXY,
    PROXY_CORE,
    Processes,
    WrkResult,
    add_halt_poll,
    choices,
    cpu_seconds,
    env,
    halt_poll_line,
    halt_polling,
    nginx_backend,
    pin,
    process_tree,
    require,
    rss_mb,
    run_bench,
    wait_http,
    wrk,
    wrk_together,
)
from prometheus_client.parser import text_string_to_metric_families

from apigw.config.model import AuthConfig
from apigw.testkit.process import GatewayProcess
from apigw.testkit.redis import RedisServer, free_port
from apigw.testkit.tokens import SigningKey

ROWS = ("direct", "nginx", "bare", "off", "cold", "warm", "workers", "pair", "latency")
LABELS = {
    "direct": "direct", "nginx": "nginx", "bare": "bare aiohttp", "off": "gateway off",
    "cold": "gateway on, cold", "warm": "gateway on, warm", "workers": "warm, --workers 2",
    "pair": "2 x warm, 1 core",
}
GOALS = (("warm", "off", 1.3), ("cold", "warm", 1.5), ("off", "nginx", 6.0), ("workers", "warm", 1.1))
"""Issue 18's ratios of CPU per request: (row, over row, at most)."""
SPLITS = (("workers", "pair", "the workers' machinery"), ("pair", "warm", "two processes on one core"))
"""What the workers row's excess over warm is made of: (row, over row, what the ratio measures)."""
WARMUP_SECONDS = 2
MONITOR_SECONDS = 2
PACE_MS = 10
"""Latency table: each connection waits this long on average after every response (wrk's `delay()`), so
that the offered load is set by the connection count rather than by how fast the proxy answers. The
pause is drawn from an exponential distribution, as independent clients' are: a fixed pause locks the
connections into bursts that arrive together, and then every proxy's p99 is the time to serve the whole
burst (a fixed 10 ms gave nginx straight to the backend a p50 of 0.53 ms, against 0.09 ms so)."""
HANDSHAKE = ("HELLO", "CLIENT SETINFO")
"""What a new pooled Redis connection sends once: not part of any request."""

PACE_LUA = f"function delay() return math.floor(-math.log(1 - math.random()) * {PACE_MS} + 0.5) end\n"

CYCLE_TOKENS_LUA = """
local tokens = {}
for line in io.lines("%s") do tokens[#tokens + 1] = "Bearer " .. line end
local state = "%s"
i = 0
init = function(args)
  local file = io.open(state)
  if file then i = (tonumber(file:read("*a")) or 0) %% #tokens; file:close() end
end
request = function()
  i = i %% #tokens + 1
  return wrk.format(nil, nil, {["Authorization"] = tokens[i]})
end
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end
done = function()
  local file = io.open(state, "w")
  file:write(tostring(threads[1]:get("i")))
  file:close()
end
"""
"""Each request the next token of the file; a run goes on where the one before it ended (in the state
file), so that a token comes back only after all the others, whatever the length of the runs."""


# --- the baseline: a bare aiohttp reverse proxy, run in its own process by `--serve-bare` -------

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host",
})


def serve_bare(port: int, backend: str) -> None:
    """Stream method, path, headers and body to `backend` and the answer back; nothing else."""
    import aiohttp
    import uvloop
    from aiohttp import web
    from yarl import URL

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = request.content if request.body_exists else None
        url = URL(backend + request.raw_path, encoded=True)
        async with session.request(request.method, url, headers=headers, data=body, allow_redirects=False) as up:
            response = web.StreamResponse(
                status=up.status, reason=up.reason,
                headers=[(k, v) for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP],
            )
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def main() -> None:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    session: aiohttp.ClientSession
    uvloop.run(main())


# --- measuring -------------------------------------------------------------------------------------


@dataclass
class LightLoad:
    """The latency table: direct and gateway-on-warm, both driven by `connections` paced connections."""

    direct: WrkResult
    gateway: WrkResult
    connections: int
    gateway_max_rps: float


@dataclass
class Row:
    label: str
    load: WrkResult
    cpu_us: float | None = None
    rss: float | None = None


def warm_up(url: str, args: argparse.Namespace, headers: tuple[str, ...] = ()) -> None:
    """Fill connection pools and caches before a measured run."""
    wrk(url, WARMUP_SECONDS, args.connections, headers=headers)


def measure(label: str, url: str, args: argparse.Namespace, proxy_pid: int | None = None, **load: object) -> Row:
    """One measured wrk run, charging the proxy's CPU to the requests it served."""
    before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    result = wrk(url, args.duration, args.connections, **load)
    if proxy_pid is None:
        return Row(label, result)
    cpu_us = (cpu_seconds(proxy_pid) - before) / max(result.requests, 1) * 1e6
    return Row(label, result, cpu_us, rss_mb(proxy_pid))


def measure_pair(pair: tuple[GatewayProcess, ...], args: argparse.Namespace, headers: tuple[str, ...]) -> Row:
    """The pair row: both gateways loaded at once, each with half the connections; CPU and requests summed."""
    pids = [gateway.process.pid for gateway in pair]  # type: ignore[union-attr]
    before = sum(cpu_seconds(pid) for pid in pids)
    runs = wrk_together([(gateway.url + "/", {"headers": headers}) for gateway in pair], args.duration,
                        args.connections // len(pair))
    cpu = sum(cpu_seconds(pid) for pid in pids) - before
    load = WrkResult(
        rps=sum(run.rps for run in runs), requests=sum(run.requests for run in runs),
        non2xx=sum(run.non2xx for run in runs), socket_errors=sum(run.socket_errors for run in runs),
        p50=max(run.p50 for run in runs), p99=max(run.p99 for run in runs),
        mean=statistics.mean(run.mean for run in runs),
    )
    return Row(LABELS["pair"], load, cpu / max(load.requests, 1) * 1e6, sum(rss_mb(pid) for pid in pids))


def redis_reads(redis_client: redis.Redis) -> tuple[int, int]:
    """Reads Redis made from client sockets (one per round trip, however many commands it carried), and
    connections it accepted."""
    stats = redis_client.info("stats")
    return stats["total_reads_processed"], stats["total_connections_received"]


def redis_commands(redis_client: redis.Redis, run: Callable[[], WrkResult]) -> tuple[Counter[str], int]:
    """The top-level commands clients sent while `run` ran (MONITOR; not those a script ran inside
    Redis), by name, and the requests wrk completed. MONITOR slows Redis, hence a separate short run."""
    marker = "bench-end"
    names: Counter[str] = Counter()
    with redis_client.monitor() as monitor:
        def read() -> None:
            while (command := monitor.next_command())["command"] != f"ECHO {marker}":
                text = command["command"]
                if command["client_type"] != "lua" and not text.startswith(HANDSHAKE):
                    names[text.split(" ", 1)[0].upper()] += 1

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        requests = run().requests
        redis_client.echo(marker)
        reader.join(60)
    return names, requests


def gateway_config(
    backend_url: str, redis_url: str | None, key_file: Path | None, workers: int = 1
) -> dict[str, object]:
    port, metrics_port = free_port(), free_port()
    route: dict[str, object] = {"name": "bench", "backend": {"service": "bench", "url": backend_url}}
    config: dict[str, object] = {
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port, "drain_timeout": 1,
                   "workers": workers},
        "logging": {"access_log": redis_url is not None},
        "routes": [route],
    }
    if redis_url is not None:
        route.update(auth={"required": True}, ratelimit="bench")
        config.update(
            redis={"url": redis_url},
            auth={"keys": [{"file": str(key_file)}], "algorithms": ["RS256"]},
            policies=[{"name": "bench", "requests": 1_000_000, "period": 1, "burst": 1_000_000}],
        )
    return config


def start_gateway(tmp: Path, name: str, config: dict[str, object], dataplane: Path | None = None) -> GatewayProcess:
    """A gateway process on the proxy's core, running this checkout's code or `dataplane`'s."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    listen = config["listen"]
    environment = env() if dataplane is None else {**env(), "PYTHONPATH": str(dataplane)}
    gateway = GatewayProcess(path, listen["port"], listen["metrics_port"], env=environment)  # type: ignore[index]
    gateway.start(wait=False)
    try:
        pin(gateway.process.pid, PROXY_CORE)  # type: ignore[union-attr]
        gateway.wait_ready()
    except BaseException:
        gateway.stop()
        raise
    return gateway


def redis_errors(gateway: GatewayProcess) -> float:
    return sample_totals(gateway.metrics())["gateway_redis_errors_total"]


def sample_totals(metrics: str) -> Counter[str]:
    """Each sample name's value in a `/metrics` text, summed over its labels."""
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return totals


def profile(pid: int, out: Path, seconds: int, run: Callable[[], object]) -> dict[str, list[str]]:
    """Sample `pid` with py-spy while `run` loads it. The functions with the most own (leaf) time, the
    gateway (`apigw/`) functions and the libraries with the most inclusive time, as `share%  name`."""
    spy = subprocess.Popen(
        ["taskset", "-c", str(LOAD_CORE), "py-spy", "record", "--format", "raw", "-r", "200", "-d", str(seconds),
         "-o", str(out), "--pid", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    run()
    _, error = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {error.decode(errors='replace').strip()}")
    own: Counter[str] = Counter()
    gateway: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] += int(count)
        ours = [i for i, frame in enumerate(frames) if "(apigw/" in frame and "(apigw/cli.py" not in frame
                and "(apigw/__main__" not in frame]
        for frame in {frames[i] for i in ours}:
            gateway[frame] += int(count)
        called = [frame for frame in frames[ours[0] + 1:] if "(apigw/" not in frame] if ours else []
        for library in {frame.rpartition("(")[2].split("/")[0] for frame in called}:
            libraries[library.removesuffix(")").removesuffix(".py")] += int(count)
    total = sum(own.values())

    def top(counts: Counter[str], n: int) -> list[str]:
        return [f"{100 * count / total:5.1f}%  {name}" for name, count in counts.most_common(n)]

    return {"own time": top(own, 15), "gateway functions, inclusive time (callees included)": top(gateway, 15),
            "what the gateway's code calls, by library, inclusive time": top(libraries, 10)}


def profile_notes(label: str, pid: int, args: argparse.Namespace, notes: list[str], run: Callable[[], object]) -> None:
    out = args.profile.with_name(f"{args.profile.stem}-{label.replace(' ', '-')}{args.profile.suffix}")
    notes.append(f"py-spy, {label}, 5 s at 200 Hz (raw stacks in {out}):")
    for title, lines in profile(pid, out, 5, run).items():
        notes.append(f"{title}:")
        notes.extend(f"  {line}" for line in lines)


def _function(frame: str) -> str:
    """`handle (apigw/pipeline/handler.py:68)` -> `handle (apigw/pipeline/handler.py)`: one entry per function."""
    name, _, where = frame.partition(" (")
    if name == "Runner.run":
        return "(event loop: uvloop's C code, I/O and callbacks)"
    return f"{name} ({where.rsplit(':', 1)[0]})"


# --- the run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
    rows: dict[str, Row] = {}
    notes: list[str] = []
    backend_url = nginx_backend(procs, tmp)

    def peer(name: str, start: Callable[[int], subprocess.Popen[bytes]]) -> None:
        port = free_port()
        process, url = start(port), f"http://127.0.0.1:{port}/"
        wait_http(url, process)
        warm_up(url, args)
        rows[name] = measure(LABELS[name], url, args, process.pid)
        procs.stop(process)

    if "direct" in args.rows:
        warm_up(backend_url + "/", args)
        rows["direct"] = measure(LABELS["direct"], backend_url + "/", args)
    if "nginx" in args.rows:
        peer("nginx", lambda port: procs.nginx(
            tmp / "proxy", NGINX_PROXY.format(port=port, backend_port=backend_url.rsplit(":", 1)[1]), PROXY_CORE))
    if "bare" in args.rows:
        peer("bare", lambda port: procs.start([sys.executable, __file__, "--serve-bare", str(port), backend_url], PROXY_CORE))
    off = start_gateway(tmp, "gateway-off", gateway_config(backend_url, None, None)) if "off" in args.rows else None
    try:
        if off is not None:
            warm_up(off.url + "/", args)
        light = gateway_rows(args, tmp, backend_url, rows, notes, off)
        if off is not None and args.profile:
            profile_notes("gateway off", off.process.pid, args, notes,  # type: ignore[union-attr]
                          lambda: wrk(off.url + "/", 5, args.connections))
    finally:
        if off is not None:
            off.stop()
    print_table(args, rows, light)
    for note in notes:
        print(note)


def gateway_rows(
    args: argparse.Namespace, tmp: Path, backend_url: str, rows: dict[str, Row], notes: list[str],
    off: GatewayProcess | None,
) -> LightLoad | None:
    """The off, cold, warm, workers and pair rows in `args.rounds` interleaved rounds (each row's median round
    goes in the table, so that a neighbour's burst moves one round, not the ratio), Redis round trips, the
    latency table and the profile: the off gateway (started by the caller), an all-on gateway for each of
    the other rows (`workers`: the supervisor and both workers on the proxy's core; `pair`: the warm row's
    gateway and one more), one Redis. The warm
    row has a process of its own: right after a cold run the same process often serves the warm token
    dearer for a while (0-34% in session 6; the notes give that figure too)."""
    light = None
    key = SigningKey("rsa")
    key.write_public_pem(tmp / "jwt.pem")
    warm = (f"Authorization: Bearer {key.token(ttl=3600, sub='warm')}",)
    loads: dict[str, dict[str, object]] = {"warm": {"headers": warm}}
    cold = cycling_tokens(key, args.tokens, tmp, notes) if "cold" in args.rows else None
    if cold is not None:
        loads["cold"] = {"script": cold}
    loads["workers"] = loads["warm"]
    on_rows = [name for name in ("cold", "warm", "workers", "pair") if name in args.rows]
    with RedisServer() as server:
        pin(server.process.pid, LOAD_CORE)
        client = redis.Redis(port=server.port)
        gateways: dict[str, GatewayProcess] = {}
        try:
            for name in ("warm", "cold", "workers"):
                if name in on_rows or (name == "warm" and ("latency" in args.rows or "pair" in args.rows)):
                    config = gateway_config(backend_url, server.url, tmp / "jwt.pem", 2 if name == "workers" else 1)
                    gateways[name] = start_gateway(tmp, f"gateway-{name}", config)
            if "pair" in on_rows:
                config = gateway_config(backend_url, server.url, tmp / "jwt.pem")
                gateways["pair"] = start_gateway(tmp, "gateway-pair", config)
            if "workers" in gateways:
                pin_workers(gateways["workers"], args, warm, notes)
            rounds: dict[str, list[Row]] = {name: [] for name in (["off"] if off else []) + on_rows}
            after_cold: list[Row] = []
            for last in [False] * (args.rounds - 1) + [True]:
                if off is not None:
                    rounds["off"].append(measure(LABELS["off"], off.url + "/", args, off.process.pid))
                for name in on_rows:
                    # the cold row warms up with the warm token too: a warm-up through the token file would
                    # fill the cache with the tokens the measured run starts with
                    gateway = gateways[name]
                    warm_up(gateway.url + "/", args, warm)
                    if name == "pair":
                        warm_up(gateways["warm"].url + "/", args, warm)
                        rounds[name].append(measure_pair((gateways["warm"], gateway), args, warm))
                        continue
                    rounds[name].append(measure_with_redis(name, gateway, client, args, notes if last else None,
                                                           **loads[name]))
                if "cold" in gateways and "warm" in on_rows:
                    again = gateways["cold"]
                    after_cold.append(measure(LABELS["warm"], again.url + "/", args, again.process.pid, headers=warm))
            for name, measured in rounds.items():
                rows[name] = median(measured)
                notes.append(f"{name}: CPU us/req in {len(measured)} rounds: "
                             + " / ".join(f"{row.cpu_us:.0f}" for row in measured))
            for name, over, *_ in GOALS + SPLITS:
                if name in rounds and over in rounds:
                    pairs = [row.cpu_us / base.cpu_us  # type: ignore[operator]
                             for row, base in zip(rounds[name], rounds[over])]
                    notes.append(f"{name} / {over} round by round: " + " / ".join(f"{x:.2f}" for x in pairs)
                                 + f" (median {statistics.median(pairs):.2f})")
            if after_cold:
                figure = median(after_cold).cpu_us
                over = f", {figure / rows['off'].cpu_us:.2f}x off" if "off" in rows else ""  # type: ignore[operator]
                notes.append("warm token on the cold row's gateway, right after each cold run: CPU us/req "
                             + " / ".join(f"{row.cpu_us:.0f}" for row in after_cold) + f" (median {figure:.0f}{over})")
            if "latency" in args.rows:
                light = light_load(args, tmp, backend_url + "/", gateways["warm"], warm, rows, notes)
            if args.profile and "warm" in gateways:
                url, pid = gateways["warm"].url + "/", gateways["warm"].process.pid
                profile_notes("gateway on warm", pid, args, notes, lambda: wrk(url, 5, args.connections, headers=warm))
            if args.profile and cold is not None and "cold" in gateways:
                url, pid = gateways["cold"].url + "/", gateways["cold"].process.pid
                profile_notes("gateway on cold", pid, args, notes, lambda: wrk(url, 5, args.connections, script=cold))
        finally:
            for gateway in gateways.values():
                gateway.stop()
    return light


def median(rounds: list[Row]) -> Row:
    """The round of median CPU per request (the lower middle one of an even count)."""
    return sorted(rounds, key=lambda row: row.cpu_us or 0.0)[(len(rounds) - 1) // 2]


def pin_workers(gateway: GatewayProcess, args: argparse.Namespace, warm: tuple[str, ...], notes: list[str]) -> None:
    """Make sure every process of the `--workers 2` gateway is on the proxy's core (workers inherit the
    supervisor's pin), once they all run."""
    warm_up(gateway.url + "/", args, warm)
    for each in process_tree(gateway.process.pid):  # type: ignore[union-attr]
        pin(each, PROXY_CORE)
    workers = len(process_tree(gateway.process.pid)) - 1  # type: ignore[union-attr]
    notes.append(f"workers: {workers} worker processes under the supervisor, CPU summed over all of them")


def cycling_tokens(key: SigningKey, count: int, tmp: Path, notes: list[str]) -> Path:
    """A wrk script giving each request the next of `count` distinct tokens."""
    started = time.monotonic()
    tokens = tmp / "tokens.txt"
    tokens.write_text("".join(key.token(ttl=3600, sub=f"user-{i}") + "\n" for i in range(count)))
    script = cycle_script(tokens, tmp / "cycle")
    cache = AuthConfig().cache_size
    misses = "every request misses" if count > cache else "NOT cold: tokens repeat within the cache"
    notes.append(f"cold: {count} distinct tokens cycled (minted in {time.monotonic() - started:.0f} s); "
                 f"the LRU cache holds {cache} (auth.cache_size default), so {misses}")
    return script


def cycle_script(tokens: Path, stem: Path) -> Path:
    """The wrk script cycling through the tokens in `tokens` (`stem`.lua), with its own place in them
    (`stem`.state): two gateways loaded through one place would each get tokens the other had just sent."""
    script = stem.with_suffix(".lua")
    script.write_text(CYCLE_TOKENS_LUA % (tokens, stem.with_suffix(".state")))
    return script


def measure_with_redis(
    name: str, gateway: GatewayProcess, client: redis.Redis, args: argparse.Namespace, notes: list[str] | None,
    **load: object,
) -> Row:
    """A gateway row; with `notes`, also what it cost Redis: round trips over the measured run, commands
    in a MONITOR run."""
    url = gateway.url + "/"
    errors, (reads, connections) = redis_errors(gateway), redis_reads(client)
    row = measure(LABELS[name], url, args, gateway.process.pid, **load)
    if notes is None:
        return row
    after_reads, after_connections = redis_reads(client)
    trips = (after_reads - reads - 1) / row.load.requests  # -1: the INFO itself
    commands, sampled = redis_commands(client, partial(wrk, url, MONITOR_SECONDS, args.connections, **load))
    per_request = ", ".join(f"{n} {c / sampled:.2f}" for n, c in commands.most_common()) or "none"
    notes.append(f"{name}: Redis round trips per request {trips:.2f} (INFO total_reads_processed); "
                 f"commands per request: {per_request} (MONITOR, {sampled} requests); "
                 f"gateway_redis_errors_total +{redis_errors(gateway) - errors:.0f}; "
                 f"new Redis connections +{after_connections - connections}")
    return row


def light_load(
    args: argparse.Namespace, tmp: Path, direct_url: str, gateway: GatewayProcess, warm: tuple[str, ...],
    rows: dict[str, Row], notes: list[str],
) -> LightLoad:
    """Direct and gateway-on-warm at about half the gateway's maximum rate, with paced connections
    (wrk has no fixed-rate mode): enough connections that each, pausing PACE_MS on average between
    requests, offers that rate together. In `args.rounds` interleaved rounds; each side's round of median p99
    goes in the table, so that a neighbour's burst moves one round, not the figure. The notes split the
    gateway's time by its own duration histograms: what of its latency is spent inside the gateway's
    handler (and there, waiting on Redis and on the backend) and what between wrk and the handler."""
    gateway_url = gateway.url + "/"
    top = rows["warm"].load.rps if "warm" in rows else wrk(gateway_url, WARMUP_SECONDS, args.connections,
                                                           headers=warm).rps
    connections = max(1, round(top / 2 * PACE_MS / 1000))
    (tmp / "pace.lua").write_text(PACE_LUA)
    direct: list[WrkResult] = []
    through: list[WrkResult] = []
    before = durations(gateway.metrics())
    for _ in range(args.rounds):
        direct.append(wrk(direct_url, args.duration, connections, script=tmp / "pace.lua"))
        through.append(wrk(gateway_url, args.duration, connections, script=tmp / "pace.lua", headers=warm))
    after = durations(gateway.metrics())
    means = {name: (after[name][0] - before[name][0]) / max(after[name][1] - before[name][1], 1) * 1000
             for name in DURATIONS}
    mean_wrk = statistics.mean(run.mean for run in through)
    notes.append(f"latency, means over all rounds, ms: wrk through the gateway {mean_wrk:.2f}, of it in the "
                 f"gateway's handler {means['handler']:.2f} (waiting on the rate limit {means['rate limit']:.2f}, "
                 f"on the backend {means['backend']:.2f}) and {mean_wrk - means['handler']:.2f} outside it; "
                 f"wrk straight to the backend {statistics.mean(run.mean for run in direct):.2f}")
    notes.append("latency, p99 ms in {} rounds: direct {}; gateway {}".format(
        len(direct), " / ".join(f"{run.p99:.2f}" for run in direct), " / ".join(f"{run.p99:.2f}" for run in through)))
    return LightLoad(median_p99(direct), median_p99(through), connections, top)


DURATIONS = {
    "handler": "gateway_http_request_duration_seconds", "rate limit": "gateway_ratelimit_duration_seconds",
    "backend": "gateway_backend_duration_seconds",
}
"""The histograms that split the latency table's gateway time."""


def durations(metrics: str) -> dict[str, tuple[float, float]]:
    """Each of `DURATIONS`' (sum, count), summed over its series, from a `/metrics` text."""
    totals = sample_totals(metrics)
    return {name: (totals[metric + "_sum"], totals[metric + "_count"]) for name, metric in DURATIONS.items()}


def median_p99(runs: list[WrkResult]) -> WrkResult:
    """The run of median p99 (the lower middle one of an even count)."""
    return sorted(runs, key=lambda run: run.p99)[(len(runs) - 1) // 2]


def print_table(args: argparse.Namespace, rows: dict[str, Row], light: LightLoad | None) -> None:
    print(f"\nwrk -t1 -c{args.connections} -d{args.duration}s after {WARMUP_SECONDS} s warm-up; backend: nginx "
          f"(fixed JSON); wrk, backend, Redis on core {LOAD_CORE}; proxy alone on core {PROXY_CORE}; "
          + halt_poll_line(args.halt_poll))
    print(f"{'':<18} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'RSS MB':>7} {'non-2xx':>8} "
          f"{'sock err':>8}")
    for name in ("direct", "nginx", "bare", "off", "cold", "warm", "workers", "pair"):
        if name in rows:
            row = rows[name]
            cpu = f"{row.cpu_us:.0f}" if row.cpu_us is not None else "-"
            rss = f"{row.rss:.0f}" if row.rss is not None else "-"
            print(f"{row.label:<18} {row.load.rps:>8.0f} {row.load.p50:>7.2f} {row.load.p99:>7.2f} {cpu:>10} "
                  f"{rss:>7} {row.load.non2xx:>8} {row.load.socket_errors:>8}")
    if "bare" in rows:
        bare = rows["bare"].cpu_us
        for name, target in (("warm", 1.3), ("cold", None), ("off", 1.1)):
            if name in rows:
                goal = f"  (target <= {target}x)" if target else ""
                print(f"{rows[name].label} / bare aiohttp CPU per request: {rows[name].cpu_us / bare:.2f}x{goal}")
    for name, over, most in GOALS:
        if name in rows and over in rows:
            print(f"{rows[name].label} / {rows[over].label} CPU per request: "
                  f"{rows[name].cpu_us / rows[over].cpu_us:.2f}x  (issue 18: <= {most}x)")  # type: ignore[operator]
    for name, over, what in SPLITS:
        if name in rows and over in rows:
            print(f"{rows[name].label} / {rows[over].label} CPU per request: "
                  f"{rows[name].cpu_us / rows[over].cpu_us:.2f}x  ({what})")  # type: ignore[operator]
    if light is not None:
        direct, through = light.direct, light.gateway
        print(f"\nlatency at about half load: wrk -c{light.connections} -d{args.duration}s, each connection pausing "
              f"{PACE_MS} ms after every response (wrk has no fixed-rate mode); gateway at "
              f"{through.rps / light.gateway_max_rps:.0%} of its -c{args.connections} maximum")
        print(f"{'':<18} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'+p50 ms':>8} {'+p99 ms':>8}")
        print(f"{'direct':<18} {direct.rps:>8.0f} {direct.p50:>7.2f} {direct.p99:>7.2f} {'-':>8} {'-':>8}")
        print(f"{'gateway on, warm':<18} {through.rps:>8.0f} {through.p50:>7.2f} {through.p99:>7.2f} "
              f"{through.p50 - direct.p50:>8.2f} {through.p99 - direct.p99:>8.2f}  (issue 18: +p50 < 1, +p99 < 3)")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-bare":
        serve_bare(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {','.join(ROWS)}")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of the off, cold, warm, workers and pair rows and of the latency "
                             "table; the tables have each one's median")
    parser.add_argument("--tokens", type=int, default=20_000, help="distinct tokens for the cold row")
    parser.add_argument("--profile", type=Path, help="py-spy the warm (and cold) gateway 5 s; raw samples to this file")
    add_halt_poll(parser)
    args = parser.parse_args()
    args.rows = choices(parser, args.rows, ROWS, "rows")
    require("wrk", "nginx", "redis-server", *(["py-spy"] if args.profile else []))
    with halt_polling(args.halt_poll):
        run_bench(lambda tmp, procs: run(args, tmp, procs))


if __name__ == "__main__":
    main()
