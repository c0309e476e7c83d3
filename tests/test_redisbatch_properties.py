"""The per-tick batch against a hostile Redis (RawRedis), as properties: whatever the chunking of the
replies (down to one byte a write), answers late past the timeout, NOSCRIPT, hang-ups before or in the
middle of a reply, a second reply to one command, an answer with a nil inside, a check whose own command
failed in the script (its error in its place), and requests cancelled
while their check waits, on asyncio's loop and uvloop:
- every check gets its own answer or an error its caller handles (RedisError, OSError, TimeoutError),
  never another check's answer or error, and within its bound;
- a script call whose reply began is never sent again (it ran: its GCRA steps would count twice);
- afterwards the pool is whole (no connection counted busy for ever) and checks are answered again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.exceptions import RedisError

from apigw.config.model import RedisConfig
from apigw.redis.batch import RedisBatch
from tests.test_redislink import CLOSE, Answer, RawRedis

TIMEOUT = 0.1
BOUND = TIMEOUT + 2.0
"""No check waits longer (the flush's two loop turns and the overdue grace included, with ample room for
a loaded machine): a hang, not a timing, is what this catches."""

KINDS = ("ok", "bytewise", "late", "noscript", "close-before", "close-mid", "extra", "nil-inside", "check-failed")


@dataclass(frozen=True)
class Behaviour:
    """What the server does with one script call."""

    kind: str
    cut: float
    """Where the reply is cut into two writes (or, for close-mid, where it stops), as a share of it."""


def expected(kind: str, index: int) -> int | tuple[int, int, int]:
    """The fake script's answer to check `index`: unique to it, so a misdelivered answer shows."""
    return (index % 2, 1000 * index + 1, 1000 * index + 2) if kind == "L" else 1000 * index + 3


def script_reply(command: list[bytes]) -> list[tuple[bytes, list[int | bytes]]]:
    """What the batch script would answer: each check's key and its numbers, from its key (`...:<index>`)."""
    count = int(command[2])
    keys, args = command[3:3 + count], iter(command[3 + count:])
    out: list[tuple[bytes, list[int | bytes]]] = []
    for key in keys:
        kind = next(args).decode()
        if kind == "L":
            next(args), next(args)
        answer = expected(kind, index_of(key))
        out.append((key, list(answer) if isinstance(answer, tuple) else [answer]))
    return out


def index_of(key: bytes) -> int:
    return int(key.rsplit(b":", 1)[1])


WRONGTYPE = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
"""The script's answer in the place of a check whose own command failed (0 in its other places)."""


def encode(values: list[int | bytes | None]) -> bytes:
    return b"*%d\r\n" % len(values) + b"".join(
        b"$-1\r\n" if v is None else v if isinstance(v, bytes) else b":%d\r\n" % v for v in values)


class HostileScript:
    """RawRedis's answers: each script call gets the next behaviour (then `ok`); it records the calls
    whose reply began, to catch one sent again, and the checks answered with their own error."""

    def __init__(self, behaviours: list[Behaviour]):
        self.behaviours = list(behaviours)
        self.began: set[tuple[bytes, ...]] = set()
        self.resent: list[list[bytes]] = []
        self.failed: set[int] = set()

    def __call__(self, connection: int, command: list[bytes]) -> Answer:
        if tuple(command) in self.began:
            self.resent.append(command)
        behaviour = self.behaviours.pop(0) if self.behaviours else Behaviour("ok", 0.5)
        if behaviour.kind == "noscript" and command[0] == b"EVALSHA":
            return b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
        if behaviour.kind == "close-before":
            return [CLOSE]
        checks = script_reply(command)
        if behaviour.kind == "check-failed":
            key, numbers = checks[int(behaviour.cut * (len(checks) - 1))]
            numbers[:] = [WRONGTYPE] + [0] * (len(numbers) - 1)
            self.failed.add(index_of(key))
        values: list[int | bytes | None] = [value for _, numbers in checks for value in numbers]
        if behaviour.kind == "nil-inside":
            values[int(behaviour.cut * (len(values) - 1))] = None
        reply = encode(values)
        at = max(1, min(len(reply) - 1, round(behaviour.cut * len(reply))))
        self.began.add(tuple(command))
        if behaviour.kind == "bytewise":
            return [step for byte in range(len(reply)) for step in (reply[byte:byte + 1], 0.0)]
        if behaviour.kind == "close-mid":
            return [reply[:at], 0.01, CLOSE]
        steps: list[bytes | float | object] = [reply[:at], 0.0, reply[at:]]
        if behaviour.kind == "late":
            return [1.5 * TIMEOUT, *steps]
        if behaviour.kind == "extra":
            return [*steps, reply]  # the same answer again: fit for the next call of the same shape
        return steps


@dataclass
class Check:
    kind: str
    index: int
    cancel: bool
    answer: object = None
    took: float = 0.0


async def run(ticks: list[list[tuple[str, bool]]], behaviours: list[Behaviour], pool_size: int, max_checks: int,
              pauses: list[int]) -> None:
    script = HostileScript(behaviours)
    async with RawRedis(script) as raw:
        batch = RedisBatch(RedisConfig(url=raw.url, timeout=TIMEOUT, connect_timeout=TIMEOUT, pool_size=pool_size),
                           max_checks=max_checks)
        loop = asyncio.get_running_loop()
        checks: list[Check] = []
        tasks: list[asyncio.Task[None]] = []

        async def ask(check: Check, future: asyncio.Future[object]) -> None:
            started = loop.time()
            try:
                check.answer = await future
            except BaseException as error:  # noqa: BLE001 (the outcome is the test's to judge)
                check.answer = error
            check.took = loop.time() - started

        for tick, pause in zip(ticks, pauses, strict=True):
            for kind, cancel in tick:
                check = Check(kind, len(checks), cancel)
                checks.append(check)
                key = f"ratelimit:p:{check.index}" if kind == "L" else f"revoked:{check.index}"
                future = batch.limit(key, 1000, 2000) if kind == "L" else batch.revoked(key)
                tasks.append(loop.create_task(ask(check, future)))
            for _ in range(pause):
                await asyncio.sleep(0)  # the next tick, or one more batch in the same one
            for task, check in zip(tasks[-len(tick):], checks[-len(tick):], strict=True):
                if check.cancel:
                    task.cancel()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), BOUND + 1)

        for check, outcome in zip(checks, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):  # cancelled before it began to wait
                check.answer = outcome
            if isinstance(check.answer, asyncio.CancelledError):
                assert check.cancel
            elif isinstance(check.answer, BaseException):
                assert isinstance(check.answer, RedisError | OSError | TimeoutError), repr(check.answer)
                assert "WRONGTYPE" not in str(check.answer) or check.index in script.failed, check  # not another's
            else:
                assert check.answer == expected(check.kind, check.index), check
                assert check.index not in script.failed, check  # not numbers where its error was
            assert check.took < BOUND, check
        assert not script.resent, script.resent

        async def drained() -> None:
            while batch._sending:  # the round trips of cancelled checks go on: the pool is judged after them
                await asyncio.sleep(0.01)

        await asyncio.wait_for(drained(), BOUND)
        link = batch.link
        assert link._open == len(link._idle) <= pool_size and not link._waiting

        script.behaviours.clear()
        final = [batch.revoked(f"revoked:{len(checks) + i}") for i in range(max_checks + 1)]
        assert await asyncio.wait_for(asyncio.gather(*final), BOUND) == [
            expected("R", len(checks) + i) for i in range(max_checks + 1)]
        await batch.aclose()


behaviour = st.builds(Behaviour, st.sampled_from(KINDS), st.floats(0, 1))
tick = st.lists(st.tuples(st.sampled_from("LR"), st.sampled_from([False, False, False, True])), min_size=1, max_size=6)
"""A tick's checks: a limit step or a revocation check each, about one in four cancelled while it waits."""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ticks=st.lists(tick, min_size=1, max_size=4),
    behaviours=st.lists(behaviour, max_size=6),
    pool_size=st.integers(1, 3),
    max_checks=st.integers(1, 4),
    pauses=st.lists(st.integers(0, 3), min_size=4, max_size=4),
    new_loop=st.sampled_from([asyncio.new_event_loop, uvloop.new_event_loop]),
)
@example(ticks=[[("L", False), ("R", False)], [("L", False), ("R", False)]], behaviours=[Behaviour("extra", 0.5)],
         pool_size=1, max_checks=4, pauses=[3, 3, 0, 0], new_loop=asyncio.new_event_loop)
@example(ticks=[[("R", False), ("L", False)]], behaviours=[Behaviour("close-mid", 0.4)], pool_size=1,
         max_checks=4, pauses=[0, 0, 0, 0], new_loop=uvloop.new_event_loop)
def test_every_check_gets_its_own_answer_or_an_error(
    ticks: list[list[tuple[str, bool]]], behaviours: list[Behaviour], pool_size: int, max_checks: int,
    pauses: list[int], new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    loop = new_loop()
    try:
        scenario = run(ticks, behaviours, pool_size, max_checks, pauses[:len(ticks)])
        loop.run_until_complete(asyncio.wait_for(scenario, 20))  # a hang fails this example, it does not stall the run
    finally:
        loop.close()
