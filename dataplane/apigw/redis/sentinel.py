"""The Redis master as Redis Sentinel names it: asked once, then followed. A library: plain parameters.

`Sentinel.master()` answers from memory, so the hot path never waits on a sentinel. The sentinels are
asked (`SENTINEL get-master-addr-by-name`, one after another until one answers) only when no master is
known: at start, and after the pool reported the address lost (`forget`: refused, a node whose `ROLE`
is not master, READONLY). Meanwhile a subscription to `+switch-master` on one sentinel moves to a newly
promoted master at once, without waiting for an error; when that sentinel goes away the next one is
subscribed to, and the master asked again, in case a switch was missed in between.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.exceptions import RedisError

from apigw.redis.resp import Subscription, connect, pack

Address = tuple[str, int]


class Sentinel:
    """The master named `name` by the sentinels at `addresses`. `handshake`: commands each sentinel
    connection runs first (AUTH); `timeout` bounds each sentinel's answer; `on_change(new, previous)` is
    called whenever the master known differs from the one known before (`previous` None the first time)."""

    def __init__(
        self, addresses: Sequence[Address], name: str, *, handshake: list[bytes], ssl_context: ssl.SSLContext | None,
        timeout: float, on_change: Callable[[Address, Address | None], None], retry: float = 0.5,
    ):
        if not addresses:
            raise ValueError("at least one sentinel address is needed")
        self._addresses = list(addresses)
        self._name = name
        self._handshake = handshake
        self._ssl = ssl_context
        self._timeout = timeout
        self._on_change = on_change
        self._retry = retry
        self.address: Address | None = None
        self._last: Address | None = None
        self._first = 0  # the sentinel asked first
        self._asking: asyncio.Task[Address] | None = None
        self._watching: asyncio.Task[None] | None = None

    async def master(self) -> Address:
        """The master's address; the sentinels are asked (once for all callers) only when none is known."""
        if self.address is not None:
            return self.address
        loop = asyncio.get_running_loop()
        if self._watching is None:
            self._watching = loop.create_task(self._watch())
        if self._asking is None:
            self._asking = loop.create_task(self._ask())
            self._asking.add_done_callback(self._answered)
        return await asyncio.shield(self._asking)  # a caller that gives up does not stop the question

    def forget(self, address: Address) -> None:
        """`address` failed or is not the master: the next `master()` asks, the next sentinel first."""
        if self.address == address:
            self.address = None
            self._first = (self._first + 1) % len(self._addresses)

    async def aclose(self) -> None:
        tasks = [task for task in (self._asking, self._watching) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their connections closed before we return
        self._watching = None

    def _answered(self, task: asyncio.Task[Address]) -> None:
        self._asking = None
        if not task.cancelled() and task.exception() is None:
            self._move(task.result())

    def _move(self, address: Address) -> None:
        self.address = address
        if address != self._last:
            previous, self._last = self._last, address
            self._on_change(address, previous)

    async def _ask(self) -> Address:
        loop = asyncio.get_running_loop()
        problems = []
        for turn in range(len(self._addresses)):
            index = (self._first + turn) % len(self._addresses)
            host, port = self._addresses[index]
            try:
                conn = await connect(host, port, path=None, ssl_context=self._ssl, handshake=self._handshake,
                                     timeout=self._timeout)
                try:
                    reply = await conn.send(pack(["SENTINEL", "get-master-addr-by-name", self._name]),
                                            loop.time() + self._timeout)
                finally:
                    conn.close()
            except (OSError, TimeoutError, RedisError) as exc:
                problems.append(f"{host}:{port}: {exc or type(exc).__name__}")
                continue
            if isinstance(reply, list) and len(reply) == 2 and all(type(part) is bytes for part in reply) \
                    and reply[1].isdigit():
                self._first = index
                return reply[0].decode(errors="replace"), int(reply[1])
            if isinstance(reply, hiredis.ReplyError):
                problems.append(f"{host}:{port}: {reply}")
            elif reply is None:
                problems.append(f"{host}:{port}: knows no master named {self._name!r}")
            else:  # a broken sentinel, or something else on its port
                problems.append(f"{host}:{port}: answered {reply!r:.80}, not an address")
        raise ConnectionError(f"no sentinel named the Redis master: {'; '.join(problems)}")

    async def _watch(self) -> None:
        """Follow `+switch-master` on one sentinel after another, for as long as the link is open."""
        index, subscribed_before = 0, False
        while True:
            host, port = self._addresses[index % len(self._addresses)]
            index += 1
            try:
                conn = await connect(host, port, path=None, ssl_context=self._ssl, timeout=self._timeout,
                                     handshake=[*self._handshake, pack(["SUBSCRIBE", "+switch-master"])],
                                     connection=Subscription)
                try:
                    if subscribed_before:  # a switch may have happened while no one listened
                        self._move(await self._ask())
                    subscribed_before = True
                    assert isinstance(conn, Subscription)
                    while (message := await conn.messages.get()) is not None:
                        self._switched(message)
                finally:
                    conn.close()
            except (OSError, TimeoutError, RedisError):
                pass  # this sentinel is gone, or speaks garbage: the next one, after a pause
            await asyncio.sleep(self._retry)

    def _switched(self, message: Any) -> None:
        """`message +switch-master "<name> <old-ip> <old-port> <new-ip> <new-port>"`."""
        if not (isinstance(message, list) and len(message) == 3 and message[0] == b"message"
                and type(message[2]) is bytes):  # anything else from a broken sentinel would end the watch
            return
        fields = message[2].decode(errors="replace").split()
        if len(fields) == 5 and fields[0] == self._name and fields[4].isdigit():
            self._move((fields[3], int(fields[4])))
