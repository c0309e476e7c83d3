"""Real backend servers on loopback for tests, benchmarks and the demo.

`echo_app()` answers every request with what it received (method, path, headers, body length and
digest), and has a few misbehaving paths: `/slow?s=N`, `/hang`, `/reset`, `/status/NNN`,
`/bytes/N` (streams N bytes), `/flaky/KEY/N` (503 to the first N calls), `/truncated` and `/short` (die mid-body) — enough to drive the gateway's error paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket

from aiohttp import web


async def _echo(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        digest.update(chunk)
        size += len(chunk)
    request.app[SEEN].append(request.path_qs)
    return web.json_response({
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": request.rel_url.raw_query_string,
        "headers": {k: v for k, v in request.headers.items()},
        "body_size": size,
        "body_sha256": digest.hexdigest(),
        "server": request.app[NAME],
    })


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "1")))
    return web.json_response({"slept": float(request.query.get("s", "1")), "server": request.app[NAME]})


async def _hang(request: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    return web.Response()


async def _reset(request: web.Request) -> web.Response:
    assert request.transport is not None
    sock = request.transport.get_extra_info("socket")
    if sock is not None:  # SO_LINGER 0: close sends RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    request.transport.close()
    await asyncio.sleep(0.1)
    return web.Response()


async def _status(request: web.Request) -> web.Response:
    return web.json_response({"status": int(request.match_info["code"])}, status=int(request.match_info["code"]))


async def _flaky(request: web.Request) -> web.Response:
    """Answers 503 to the first `n` requests for `key`, then 200: a backend that recovers."""
    key, failures = request.match_info["key"], int(request.match_info["n"])
    calls = request.app[CALLS]
    calls[key] = calls.get(key, 0) + 1
    status = 503 if calls[key] <= failures else 200
    return web.json_response({"call": calls[key]}, status=status)


async def _bytes(request: web.Request) -> web.StreamResponse:
    total = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = total
    await response.prepare(request)
    if request.method == "HEAD":
        await response.write_eof()
        return response
    block = b"x" * 65536
    sent = 0
    while sent < total:
        part = block[: min(len(block), total - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def _short(request: web.Request) -> web.StreamResponse:
    """Promises 100 bytes, sends 10, and closes: a backend dying inside a small body."""
    response = web.StreamResponse()
    response.content_length = 100
    await response.prepare(request)
    await response.write(b"0123456789")
    assert request.transport is not None
    request.transport.close()
    return response


async def _stream_then_reset(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = 1_000_000
    await response.prepare(request)
    await response.write(b"x" * 1000)
    assert request.transport is not None
    request.transport.close()
    return response


NAME = web.AppKey("name", str)
SEEN = web.AppKey("seen", list)
CALLS = web.AppKey("calls", dict)


def echo_app(name: str = "echo") -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app[NAME] = name
    app[SEEN] = []
    app[CALLS] = {}
    app.router.add_get("/slow", _slow)
    app.router.add_get("/hang", _hang)
    app.router.add_route("*", "/reset", _reset)
    app.router.add_get("/status/{code:\\d+}", _status)
    app.router.add_get("/bytes/{n:\\d+}", _bytes)
    app.router.add_get("/truncated", _stream_then_reset)
    app.router.add_get("/short", _short)
    app.router.add_route("*", "/flaky/{key}/{n:\\d+}", _flaky)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


class Backend:
    """`async with Backend() as b:` serves `echo_app` on `b.url` until the block ends."""

    def __init__(self, name: str = "echo", port: int = 0):
        self.app = echo_app(name)
        self.port = port
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def seen(self) -> list[str]:
        return self.app[SEEN]

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> Backend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def main() -> None:
    """`python -m apigw.testkit.backend PORT [NAME]`: a backend in its own process, to kill in fault tests."""
    import sys

    port = int(sys.argv[1])
    web.run_app(echo_app(sys.argv[2] if len(sys.argv) > 2 else "echo"), host="127.0.0.1", port=port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
