"""A Redis failover under load: seconds until decisions come from the promoted replica, and what clients
got meanwhile, with real processes (a master, a replica, three sentinels with down-after-milliseconds
1000, an echo backend, a gateway with a rate-limited, token-checked route and revocation on).

    PYTHONPATH=dataplane python bench/redis_failover.py [--mode fail_open|fail_closed|both] [--runs 3]

The scenario is `apigw.testkit.failover.run_failover`, the same one tests/test_failover.py checks.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from apigw.testkit.failover import REDIS_TIMEOUT, FailoverRun, run_failover


def show(run: FailoverRun) -> None:
    total = sum(run.statuses.values())
    print(f"  {run.failure_mode}: decisions from the new master after {run.recovered_after:.2f} s; "
          f"{run.degraded_after_kill} requests answered degraded meanwhile; {total} requests in all, "
          f"statuses {dict(sorted(run.statuses.items()))}; slowest {run.slowest * 1000:.0f} ms "
          f"(redis.timeout {REDIS_TIMEOUT * 1000:.0f} ms); after: budget {run.budget_after}, revoked token "
          f"{run.revoked_after}")
    print("    " + "; ".join(run.master_info))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["fail_open", "fail_closed", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    modes = ["fail_open", "fail_closed"] if args.mode == "both" else [args.mode]
    for mode in modes:
        runs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="apigw-failover-") as workdir:
                runs.append(await run_failover(Path(workdir), failure_mode=mode))
            show(runs[-1])
        seconds = [run.recovered_after for run in runs if run.recovered_after is not None]
        if seconds:
            print(f"{mode}: median {statistics.median(seconds):.2f} s to the new master "
                  f"(min {min(seconds):.2f}, max {max(seconds):.2f}) over {len(seconds)} of {len(runs)} runs; "
                  f"median {statistics.median(r.degraded_after_kill for r in runs):.0f} requests degraded, "
                  f"slowest request {max(r.slowest for r in runs) * 1000:.0f} ms")
        else:
            print(f"{mode}: no run recovered within its bound")


if __name__ == "__main__":
    asyncio.run(main())
