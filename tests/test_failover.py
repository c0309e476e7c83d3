"""A Redis failover under load with real processes (see `apigw.testkit.failover`): the master is
SIGKILLed while a gateway serves a rate-limited route with revocation on, in fail_open mode. Figures
(how fast, how many requests degraded) are printed by bench/redis_failover.py, not asserted here."""

from __future__ import annotations

from pathlib import Path

from apigw.testkit.failover import REDIS_TIMEOUT, run_failover

GRACE = 1.0
"""Above the Redis bounds: the backend, the event loop, and a machine shared with other work."""


async def test_fail_open_failover_keeps_serving_and_limits_come_back(tmp_path: Path) -> None:
    run = await run_failover(tmp_path, failure_mode="fail_open", bound=30.0)
    assert run.recovered_after is not None, "no decision came from the promoted replica within 30 s"
    assert run.degraded_after_kill > 0  # the outage happened, and was answered, not waited out
    assert set(run.statuses) == {200}, run.statuses  # no 5xx (and no 429: each load request has its own key)
    # A request makes two bounded Redis calls (revocation check, then limit decision).
    assert run.slowest < 2 * REDIS_TIMEOUT + GRACE
    assert run.budget_after == [200] * 5 + [429]  # limits enforced again, on the new master
    assert run.revoked_after == 401  # the revocation list survived (replicated)
    assert f'gateway_redis_master_info{{address="{run.new_master}"}} 1.0' in run.master_info
    assert f'gateway_redis_master_info{{address="{run.old_master}"}} 0.0' in run.master_info
    assert "gateway_redis_failovers_total 1.0" in run.master_info


async def test_fail_closed_failover_answers_503_meanwhile_then_decides_again(tmp_path: Path) -> None:
    run = await run_failover(tmp_path, failure_mode="fail_closed", bound=30.0)
    assert run.recovered_after is not None, "no decision came from the promoted replica within 30 s"
    assert set(run.statuses) == {200, 503}, run.statuses
    assert run.statuses[503] >= run.degraded_after_kill > 0  # every undecided request refused, none let through
    assert run.slowest < 2 * REDIS_TIMEOUT + GRACE
    assert run.budget_after == [200] * 5 + [429]
    assert run.revoked_after == 401
