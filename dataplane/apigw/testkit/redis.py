"""Real `redis-server` processes on free loopback ports, that a fault test can stop, pause and restart; Sentinel
groups (a master, a replica, sentinels) for failover tests."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`with RedisServer() as r:` runs redis-server on `r.url`; no persistence, own temp dir."""

    def __init__(self, port: int | None = None, args: Sequence[str] = ()):
        """`args`: more redis-server options, e.g. `--tls-port`, `--unixsocket` (the plain port stays)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="apigw-redis-")
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--loglevel", "warning", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, like a hung Redis."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop and start on the same port: scripts and keys are gone, as after a real Redis restart."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelServer(RedisServer):
    """`redis-server --sentinel` on a free loopback port, watching the master at `master_port` as
    `name`, with short timeouts (down after `down_after_ms`) so that a failover test stays bounded.
    Sentinel rewrites its config file, so each one has its own (in its temp dir)."""

    def __init__(self, master_port: int, *, name: str = "mymaster", quorum: int = 2, down_after_ms: int = 1000,
                 host: str = "127.0.0.1", password: str | None = None, config: Sequence[str] = ()):
        """`config`: more sentinel.conf lines (e.g. `tls-port`; the plain port stays)."""
        super().__init__()
        self.host = host
        lines = [
            f"port {self.port}", f"bind {host}", f"dir {self.dir}",
            f"sentinel monitor {name} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {name} {down_after_ms}",
            f"sentinel failover-timeout {name} {max(3 * down_after_ms, 3000)}",
            f"sentinel parallel-syncs {name} 1",
            *([f"requirepass {password}"] if password else []),
            *config,
        ]
        self.config = f"{self.dir}/sentinel.conf"
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.password = password

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, self.config, "--sentinel", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        ping = f"AUTH {self.password}\r\nPING\r\n" if self.password else "PING\r\n"
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    s.sendall(ping.encode())
                    if b"+PONG" in s.recv(64):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis sentinel did not start on port {self.port}")


class SentinelGroup:
    """A master, one replica and `count` sentinels on loopback: `with SentinelGroup() as group:` starts
    them and waits until the sentinels know the replica and each other, so that a failover can happen."""

    def __init__(self, name: str = "mymaster", count: int = 3, password: str | None = None):
        self.name = name
        self.master = RedisServer()
        self.replica = RedisServer(args=["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinels = [SentinelServer(self.master.port, name=name, password=password) for _ in range(count)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.name}/0"

    def ask(self, sentinel: SentinelServer, *command: str) -> Any:
        with redis.Redis(host=sentinel.host, port=sentinel.port, password=sentinel.password) as client:
            return client.execute_command(*command)

    def master_port(self) -> int:
        """The master's port as the first sentinel names it now."""
        return int(self.ask(self.sentinels[0], "SENTINEL", "get-master-addr-by-name", self.name)[1])

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(self.ask(s, "SENTINEL", "replicas", self.name)) == 1
                   and len(self.ask(s, "SENTINEL", "sentinels", self.name)) == len(self.sentinels) - 1
                   for s in self.sentinels):
                return
            time.sleep(0.1)
        raise RuntimeError("the sentinels did not find the replica and each other in time")

    def __enter__(self) -> SentinelGroup:
        try:
            for server in (self.master, self.replica, *self.sentinels):
                server.start()
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.__exit__()
