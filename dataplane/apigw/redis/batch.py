"""All the Redis work of two event-loop ticks in one round trip.

Requests ask for rate limit decisions and revocation checks as futures; the first ask schedules a
flush at the end of the NEXT tick, which sends everything asked meanwhile as ONE EVALSHA of a batch
script (GCRA steps and EXISTS checks, evaluated in order, on Redis's clock). Waiting one more turn lets
the checks that the handlers run in that turn ask join the batch: under load that halves the round
trips, each of which costs a send, a wake-up and a read (`bench/compare.py`: the all-on gateway's CPU per
request fell by a tenth), for one loop turn of latency. A batch holds at most MAX_CHECKS checks: a
turn that asks more sends each full batch at once and goes on with a new one, so its checks go out as
several script calls in the same turn (in parallel, on as many connections). The replies are handed to
the checks as the socket's read parses them, a loop turn before the task that waits for the round trip
runs (the turns between a request's steps are most of its wait at half load: `bench/compare.py`'s latency
note). A failed or timed-out batch fails every future in it with the same error; each caller then applies
its own failure mode. A check whose own command fails in the script (its key holds another type, a write
refused for memory) fails alone, with Redis's error: one bad key must not fail every tenant's check of
the tick. An error about the node (READONLY: an old master) still fails the whole call, for the link to
leave the connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import hiredis
from redis.exceptions import ResponseError

from apigw.config.model import RedisConfig
from apigw.redis.link import RedisLink

BATCH_LUA = (Path(__file__).parent / "batch.lua").read_text()
"""The batch script: GCRA steps and revocation checks, in order, on Redis's clock. GCRA's in-process twin
is `apigw.policy.ratelimit.gcra`; tests/test_gcra_parity.py keeps the two the same."""
BATCH_SHA = hashlib.sha1(BATCH_LUA.encode()).hexdigest()


MAX_CHECKS = 256
"""Checks per script call. A script blocks Redis while it runs (~4 us per check, measured on Redis 7):
256 keep each call near 1 ms, so other clients of the same Redis are not held up by one large tick."""

SLOW_ROUND_TRIP = 0.05
"""A round trip slower than this (seconds) is logged with its duration."""

log = logging.getLogger("apigw.ratelimit")


@dataclass
class Seen:
    """Redis as the latest round trip found it, for the health details: `up`, `down` (with the error),
    or `unknown` before the first; `since` is the wall-clock time the state began."""

    state: str = "unknown"
    error: str | None = None
    since: float = field(default_factory=time.time)

    def round_trip(self, error: BaseException | None) -> None:
        state = "up" if error is None else "down"
        if state != self.state:
            self.state, self.since = state, time.time()
        self.error = None if error is None else f"{type(error).__name__}: {error}".removesuffix(": ")


class RedisBatch:
    """Coalesces the checks of one event-loop tick into script calls of at most `max_checks` checks on
    the Redis of `settings`; each call is bounded by `settings.timeout`."""

    def __init__(
        self, settings: RedisConfig, slow: float = SLOW_ROUND_TRIP, max_checks: int = MAX_CHECKS,
        on_master: Callable[[str, str | None], None] | None = None,
    ):
        """`on_master(address, previous)`: told the Redis address in use, and each move of the master."""
        sentinel = settings.sentinel()
        self.link = RedisLink(
            sentinel.url if sentinel else settings.url, pool_size=settings.pool_size, timeout=settings.timeout,
            connect_timeout=settings.connect_timeout, on_master=on_master,
            sentinels=sentinel.sentinels if sentinel else (), master_name=sentinel.master_name if sentinel else "",
            sentinel_password=settings.sentinel_password,
        )
        self._slow = slow
        self._max_checks = max_checks
        self._keys: list[bytes] = []
        """The keys of the batch being gathered, each a RESP bulk string."""
        self._args: list[bytes] = []
        """Their arguments in RESP, one piece per check."""
        self._count = 0
        """How many arguments `_args` holds."""
        self._waiters: list[tuple[asyncio.Future[Any], int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop it runs on, kept from the first check (`asyncio.get_running_loop()` is a getpid()
        system call on Python 3.11)."""
        self.round_trips = 0
        self.seen = Seen()
        self._sending: set[asyncio.Task[None]] = set()

    def limit(self, key: str, interval: int, capacity: int) -> asyncio.Future[tuple[int, int, int]]:
        """One GCRA step on bucket `key`: (allowed 1|0, µs until full, µs until a request may pass)."""
        return self._ask(key, 3, _limit_args(interval, capacity), 3)

    def describe(self, error: Exception) -> str:
        """A failed check's error as its log line says it (a timeout has no text of its own)."""
        if isinstance(error, TimeoutError):
            return f"timeout after {self.link.timeout:g} s"
        return f"{type(error).__name__}: {error}"

    def revoked(self, key: str) -> asyncio.Future[int]:
        """Whether `key` exists: 1 or 0."""
        return self._ask(key, 1, _REVOKED_ARGS, 1)

    def _ask(self, key: str, width: int, args: bytes, count: int) -> asyncio.Future[Any]:
        """A check on `key` of `width` replies, its `count` arguments already in RESP (`args`)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if not self._waiters:
            self._loop.call_soon(self._loop.call_soon, self._flush)  # the end of the next turn: see the module
        future = self._loop.create_future()
        self._keys.append(_bulk_key(key))
        self._args.append(args)
        self._count += count
        self._waiters.append((future, width))
        if len(self._waiters) >= self._max_checks:
            self._flush()  # full: sent now; the tick's next check starts another batch
        return future

    def _flush(self) -> None:
        keys, args, count, waiters = self._keys, self._args, self._count, self._waiters
        if not waiters:  # the tick's batches were all full and are sent already
            return
        self._keys, self._args, self._count, self._waiters = [], [], 0, []
        self.round_trips += 1
        # the script's key count, the keys, their arguments: what EVALSHA and EVAL (NOSCRIPT) both send after the script
        parts = (3 + len(keys) + count, _bulk(b"%d" % len(keys)), *keys, *args)
        deadline = self._loop.time() + self.link.timeout  # for the EVAL after NOSCRIPT too
        try:  # written now if it can be
            sent = self.link.send(_command(_EVALSHA, parts), partial(_hand_out, waiters), deadline)
        except Exception as error:  # a bug of ours: every check of the tick fails, none hangs
            _fail(waiters, error)
            return
        task = self._loop.create_task(self._settle(sent, parts, waiters, time.perf_counter(), deadline))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _settle(
        self, sent: Awaitable[Any], parts: tuple[Any, ...], waiters: list[tuple[asyncio.Future[Any], int]],
        started: float, deadline: float,
    ) -> None:
        """Hand each waiter its share of the replies, or the error."""
        try:
            replies = await self._replies(sent, parts, deadline)
        except BaseException as error:  # every waiter learns of it, cancellation included
            if isinstance(error, Exception):  # not a cancellation at shutdown
                self.seen.round_trip(error)
            _fail(waiters, error if isinstance(error, Exception) else ConnectionError("cancelled"))
            if not isinstance(error, Exception):
                raise
            return
        self.seen.round_trip(None)
        elapsed = time.perf_counter() - started
        if elapsed > self._slow:  # timed from send to reply
            duration_ms = round(elapsed * 1000, 1)
            log.warning("ratelimit slow Redis round trip: duration_ms=%s checks=%d", duration_ms, len(waiters),
                        extra={"fields": {"duration_ms": duration_ms, "checks": len(waiters)}})
        if not _hand_out(waiters, replies):
            _fail(waiters, ConnectionError(f"Redis's answer to {len(waiters)} checks is not the numbers asked for"))

    async def _replies(self, sent: Awaitable[Any], parts: tuple[Any, ...], deadline: float) -> list[int]:
        try:
            return await sent
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.link.send(_command(_EVAL, parts), None, deadline)  # caches it again

    async def aclose(self) -> None:
        await self.link.aclose()


def _bulk(value: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


@lru_cache(maxsize=4096)
def _bulk_key(key: str) -> bytes:
    """A key as a RESP bulk string: buckets and revoked tokens recur from request to request."""
    return _bulk(key.encode("utf-8", "surrogatepass"))


def _command(script: bytes, parts: tuple[Any, ...]) -> bytes:
    """The script call: the array's length (`parts[0]`), the command and script (`script`), then the rest."""
    return b"".join((b"*%d\r\n" % parts[0], script, *parts[1:]))


_EVALSHA = _bulk(b"EVALSHA") + _bulk(BATCH_SHA.encode())
_EVAL = _bulk(b"EVAL") + _bulk(BATCH_LUA.encode())
_REVOKED_ARGS = _bulk(b"R")


@lru_cache(maxsize=1024)
def _limit_args(interval: int, capacity: int) -> bytes:
    """A limit check's arguments in RESP (`L`, interval, capacity), made once per policy, not per check."""
    return _bulk(b"L") + _bulk(b"%d" % interval) + _bulk(b"%d" % capacity)


def _hand_out(waiters: list[tuple[asyncio.Future[Any], int]], replies: Any) -> bool:
    """Each check its share of the script's replies, if they are the numbers the batch asked for (else
    False: an error reply or a list of another length is `RedisBatch._settle`'s to fail); a check already
    settled keeps its result."""
    if type(replies) is not list or len(replies) != sum(width for _, width in waiters):
        return False
    if not all(type(reply) is int for reply in replies):  # a nil would read as "not revoked"
        return _hand_out_errors(waiters, replies)
    at = 0
    for future, width in waiters:
        if not future.done():
            future.set_result(tuple(replies[at:at + width]) if width > 1 else replies[at])
        at += width
    return True


def _hand_out_errors(waiters: list[tuple[asyncio.Future[Any], int]], replies: list[Any]) -> bool:
    """`_hand_out` for replies that are not all numbers: a check whose own command failed in the script (the
    error in its first place, numbers in the others) fails with that error, the others get their numbers;
    anything else (a nil, an error elsewhere) is not the answer asked for, and nothing is handed out."""
    shares = []
    at = 0
    for _, width in waiters:
        share = replies[at:at + width]
        at += width
        if not all(type(reply) is int for reply in share[1:]):
            return False
        if type(share[0]) is hiredis.ReplyError:
            shares.append(ResponseError(str(share[0])))
        elif type(share[0]) is int:
            shares.append(tuple(share) if width > 1 else share[0])
        else:
            return False
    for (future, width), share in zip(waiters, shares, strict=True):
        if future.done():
            continue
        if isinstance(share, ResponseError):
            _fail([(future, width)], share)
        else:
            future.set_result(share)
    return True


def _fail(waiters: list[tuple[asyncio.Future[Any], int]], error: Exception) -> None:
    for future, _ in waiters:
        if not future.done():
            future.set_exception(error)
            future.exception()  # marks it seen: a request that failed meanwhile never reads it
