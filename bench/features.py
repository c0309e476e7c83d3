"""What each feature costs on its own: CPU per request of the gateway with one feature at a time (issue 18).

    python bench/features.py [--rounds 5] [--duration 4] [--connections 50]
                             [--variants off,token,log,auth,limit,on,cold] [--tokens 20000]
                             [--baseline DIR] [--together] [--halt-poll NS]

Variants, all behind the same nginx backend (`bench/harness.py`'s layout: wrk, nginx and Redis on core 0,
the gateway alone on core 1): `off` (no feature), `token` (no feature, but the requests carry the
all-on row's bearer token, which the gateway forwards: the cost of the bigger request alone), `log` (the
access log), `auth` (RS256 JWT with its revocation check in Redis), `limit` (a Redis rate limit that never
denies), `on` (all of them: `bench/compare.py`'s warm row), `cold` (all of them, each request with the
next of `--tokens` distinct tokens: `compare.py`'s cold row). Every variant but `off` and `cold` sends the
same token.

All gateways run side by side and are measured in interleaved rounds, so that a neighbour's burst moves
one round of every variant rather than one variant: the table gives each variant's rounds, median and
minimum, and the median's excess over `token` (over `off` for `token` itself, over `on` for `cold`).

`--baseline DIR` runs each variant a second time from another checkout's `dataplane` directory (as
`name@base`, in the same rounds), to measure what a change saves or costs against the code before it:

    git worktree add /tmp/base HEAD~1 && python bench/features.py --variants on --baseline /tmp/base/dataplane

`--together` loads all the gateways at once in each round, each with its share of the connections: a
neighbour's burst then moves every variant of the round alike, so their ratios hold (the same code twice:
0.97 to 1.02 round by round) where runs one after the other move by a third. The gateways share the core
and switch between each other, which adds to every one's cost per request, the more so the more the code
differs (cold: about +96 us over on together, +54 one at a time): the figures are not those of a gateway
alone. For a change against its baseline, not for issue 18's goals.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from compare import cycle_script, cycling_tokens, gateway_config, start_gateway
from harness import (
    LOAD_CORE,
    Processes,
    add_halt_poll,
    choices,
    cpu_seconds,
    halt_poll_line,
    halt_polling,
    nginx_backend,
    pin,
    require,
    run_bench,
    wrk,
    wrk_together,
)

from apigw.testkit.process import GatewayProcess
from apigw.testkit.redis import RedisServer
from apigw.testkit.tokens import SigningKey

VARIANTS = ("off", "token", "log", "auth", "limit", "on", "cold")


def variant_config(name: str, backend_url: str, redis_url: str, key_file: Path) -> dict[str, object]:
    """`compare.py`'s all-on config with every feature but `name`'s turned off (`on` and `cold`: none off)."""
    if name in ("off", "token"):
        return gateway_config(backend_url, None, None)
    config = gateway_config(backend_url, redis_url, key_file)
    if name == "cold":
        return config
    route = config["routes"][0]  # type: ignore[index]
    config["logging"] = {"access_log": name in ("log", "on")}
    if name not in ("auth", "on"):
        route.pop("auth")
    if name not in ("limit", "on"):
        route.pop("ratelimit")
    return config


def measure(gateways: dict[str, GatewayProcess], args: argparse.Namespace, loads: dict[str, dict[str, Any]]
            ) -> dict[str, float]:
    """CPU microseconds per request of each gateway over one wrk run each (`loads`: their headers or script),
    all at once, sharing the connections (one gateway: a run of its own, see `--together`); every answer
    must be a 2xx."""
    before = {name: cpu_seconds(gateway.process.pid) for name, gateway in gateways.items()}  # type: ignore[union-attr]
    connections = max(1, args.connections // len(gateways))
    runs = wrk_together([(gateway.url + "/", loads[name]) for name, gateway in gateways.items()], args.duration,
                        connections)
    figures = {}
    for (name, gateway), result in zip(gateways.items(), runs):
        if result.non2xx or result.socket_errors:
            sys.exit(f"{gateway.config.stem}: {result.non2xx} non-2xx answers, {result.socket_errors} socket errors")
        cpu = cpu_seconds(gateway.process.pid) - before[name]  # type: ignore[union-attr]
        figures[name] = cpu / max(result.requests, 1) * 1e6
    return figures


def run(args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
    backend_url = nginx_backend(procs, tmp)
    key = SigningKey("rsa")
    key.write_public_pem(tmp / "jwt.pem")
    token = (f"Authorization: Bearer {key.token(ttl=3600, sub='warm')}",)
    notes: list[str] = []
    loads: dict[str, dict[str, Any]] = {"off": {}}
    for name in args.variants:
        if name == "cold":
            loads[name] = {"script": cycling_tokens(key, args.tokens, tmp, notes)}
        elif name != "off":
            loads[name] = {"headers": token}
    with RedisServer() as server:
        pin(server.process.pid, LOAD_CORE)
        gateways: dict[str, GatewayProcess] = {}
        try:
            for name in args.variants:
                config = variant_config(name, backend_url, server.url, tmp / "jwt.pem")
                gateways[name] = start_gateway(tmp, f"gateway-{name}", config)
                if args.baseline is not None:
                    config = variant_config(name, backend_url, server.url, tmp / "jwt.pem")
                    gateways[f"{name}@base"] = start_gateway(tmp, f"gateway-{name}-base", config, args.baseline)
                    loads[f"{name}@base"] = (  # a place in the tokens of its own: see cycle_script
                        {"script": cycle_script(tmp / "tokens.txt", tmp / "cycle-base")} if name == "cold"
                        else loads[name])
            for name, gateway in gateways.items():
                wrk(gateway.url + "/", 2, args.connections, **loads[name])  # warm-up: pools, caches
            rounds: dict[str, list[float]] = {name: [] for name in gateways}
            order = list(gateways)
            for _ in range(args.rounds):
                batches = [list(gateways)] if args.together else [[name] for name in order]
                for names in batches:
                    for name, figure in measure({name: gateways[name] for name in names}, args, loads).items():
                        rounds[name].append(figure)
                order.reverse()  # each round in the other order: whoever runs first (or after whom) changes
        finally:
            for gateway in gateways.values():
                gateway.stop()
    print_table(args, rounds)
    for note in notes:
        print(f"note: {note}")


def print_table(args: argparse.Namespace, rounds: dict[str, list[float]]) -> None:
    how = "all gateways at once" if args.together else "interleaved"
    print(f"\nCPU us per request, wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} {how} rounds; "
          + halt_poll_line(args.halt_poll))
    print(f"{'variant':<10} {'rounds':<{7 * args.rounds}} {'median':>7} {'min':>7} {'+median':>8}")
    medians = {name: statistics.median(each) for name, each in rounds.items()}
    for name, each in rounds.items():
        variant, at, code = name.partition("@")
        base = {"token": "off", "cold": "on"}.get(variant, "token") + at + code
        extra = f"{medians[name] - medians[base]:+8.1f}" if variant != "off" and base in medians else f"{'':>8}"
        print(f"{name:<10} {''.join(f'{x:7.1f}' for x in each):<{7 * args.rounds}} {medians[name]:7.1f} "
              f"{min(each):7.1f} {extra}")
    for code in ("", "@base"):
        for over, under, goal in (("on", "off", 1.3), ("cold", "on", 1.5)):
            over, under = over + code, under + code
            if over in rounds and under in rounds:
                pairs = " ".join(f"{a / b:.2f}" for a, b in zip(rounds[over], rounds[under]))
                print(f"{over} / {under}, medians: {medians[over] / medians[under]:.2f}x  (issue 18: <= {goal}x); "
                      f"round by round: {pairs}")
    for variant in args.variants:
        if f"{variant}@base" in rounds:
            pairs = [new / old for new, old in zip(rounds[variant], rounds[f"{variant}@base"])]
            print(f"{variant} / {variant}@base, round by round: {' '.join(f'{x:.3f}' for x in pairs)}; "
                  f"median {statistics.median(pairs):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--baseline", type=Path, help="another checkout's dataplane directory, run side by side")
    parser.add_argument("--tokens", type=int, default=20_000, help="distinct tokens for the cold variant")
    parser.add_argument("--together", action="store_true", help="load all gateways at once in each round")
    add_halt_poll(parser)
    args = parser.parse_args()
    args.variants = choices(parser, args.variants, VARIANTS, "variants")
    require("wrk", "nginx", "redis-server")
    with halt_polling(args.halt_poll):
        run_bench(lambda tmp, procs: run(args, tmp, procs))


if __name__ == "__main__":
    main()
