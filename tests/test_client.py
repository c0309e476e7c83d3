"""The backend HTTP/1.1 client (`apigw.upstream.client`) against real servers on loopback: the echo backend, and
small raw servers that write exact bytes for the responses a real backend rarely sends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httptools
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from yarl import URL

from apigw.upstream import client
from apigw.testkit.backend import Backend
from apigw.upstream.client import MAX_HEAD, MAX_TRAILER_SIZE, MAX_TRAILERS, PAUSE_AT, BackendError, Pool, Response

HOST = [("Host", "backend")]


# Raw servers


class Peer:
    """One connection a RawServer accepted."""

    def __init__(self, server: RawServer, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server, self.number, self.reader, self.writer = server, number, reader, writer

    async def request(self) -> tuple[bytes, bytes] | None:
        """The next request's head and body (also recorded in `server.requests`); None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return None
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:-2])
        if fields.get(b"Transfer-Encoding") == b"chunked":
            body = b""
            while size := int(await self.reader.readuntil(b"\r\n"), 16):
                body += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readexactly(2)
        else:
            body = await self.reader.readexactly(int(fields.get(b"Content-Length", b"0")))
        self.server.requests.append((self.number, head, body))
        return head, body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self) -> None:
        """Until the client closes the connection (bytes sent meanwhile are dropped)."""
        while await self.reader.read(65536):
            pass
        self.server.closed_by_client.append(self.number)


class RawServer:
    """`async with RawServer(handler) as server:` runs `handler(peer)` for each connection to `server.url`.

    Connections are numbered from 1 in the order accepted; a connection closes when its handler returns.
    """

    def __init__(self, handler: Callable[[Peer], Awaitable[None]]):
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[int, bytes, bytes]] = []
        """(connection, head, body) of each request read."""
        self.closed_by_client: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.handler(Peer(self, self.connections, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away (what several tests provoke), or the server stops
        except Exception as exc:  # noqa: BLE001 - reported when the server stops
            self._errors.append(exc)
        finally:
            writer.close()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = URL(f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        if self._errors:
            raise self._errors[0]

    def methods(self) -> list[bytes]:
        return [head.split(b" ", 1)[0] for _, head, _ in self.requests]


def ok(body: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in headers) + \
        b"Content-Length: %d\r\n\r\n" % len(body) + body


async def answer_all(peer: Peer) -> None:
    """A keep-alive server: each request is answered with the connection's number."""
    while await peer.request() is not None:
        await peer.send(ok(b"conn %d" % peer.number))
    peer.server.closed_by_client.append(peer.number)


def answering(*responses: bytes) -> Callable[[Peer], Awaitable[None]]:
    """A handler that reads one request, writes each of `responses` separately, then waits for the client."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        for data in responses:
            await peer.send(data)
        await peer.until_closed()

    return handler


def first_then_all(response: bytes) -> Callable[[Peer], Awaitable[None]]:
    """The first connection gets `response`; later ones are served by `answer_all`."""

    async def handler(peer: Peer) -> None:
        await (answering(response) if peer.number == 1 else answer_all)(peer)

    return handler


async def hang(peer: Peer) -> None:
    """Read nothing, answer nothing."""
    await asyncio.Future()


# Helpers


@asynccontextmanager
async def open_pool(url: URL | str) -> AsyncIterator[Pool]:
    pool = Pool(URL(url))
    try:
        yield pool
    finally:
        await pool.aclose()


async def send(
    pool: Pool, method: str = "GET", target: str = "/", headers: list[tuple[str, str]] = HOST,
    body: AsyncIterator[bytes] | None = None, length: int | None = None, timeout: float = 5.0,
    connect_timeout: float = 5.0,
) -> Response:
    return await pool.request(method, target, headers, body, length, timeout, connect_timeout)


async def fetch(pool: Pool, method: str = "GET", target: str = "/", **kwargs) -> tuple[Response, bytes]:
    """Send a request, read the whole response, release it."""
    response = await send(pool, method, target, **kwargs)
    try:
        return response, await response.read()
    finally:
        response.release()


async def parts(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def until(condition: Callable[[], bool]) -> None:
    """Until `condition()` holds (bounded: the test fails rather than hangs)."""
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


async def failure(request: Awaitable[object]) -> BackendError:
    with pytest.raises(BackendError) as caught:
        await request
    return caught.value


# Requests and responses through the echo backend


async def test_get_through_echo_backend(backend: Backend) -> None:
    async with open_pool(backend.url) as pool:
        response, body = await fetch(pool, "GET", "/a/b%2Fc?x=1&y=%20", headers=[("Host", "svc"), ("X-Test", "1")])
    assert (response.status, response.reason) == (200, "OK")
    assert ("Content-Type", "application/json; charset=utf-8") in response.headers
    assert response.content_length == len(body)
    echoed = json.loads(body)
    assert echoed["method"] == "GET"
    assert echoed["raw_path"] == "/a/b%2Fc?x=1&y=%20"
    assert echoed["query"] == "x=1&y=%20"
    assert echoed["headers"] == {"Host": "svc", "X-Test": "1"}  # nothing added to a bodiless GET
    assert echoed["body_size"] == 0


async def test_error_status_is_a_response(backend: Backend) -> None:
    async with open_pool(backend.url) as pool:
        response, body = await fetch(pool, "GET", "/status/503")
    assert response.status == 503
    assert json.loads(body) == {"status": 503}


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_bodiless_request_that_expects_a_length_gets_content_length_zero(backend: Backend, method: str) -> None:
    async with open_pool(backend.url) as pool:
        _, body = await fetch(pool, method, "/x")
    assert json.loads(body)["headers"] == {"Host": "backend", "Content-Length": "0"}


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
async def test_other_bodiless_requests_carry_no_framing(backend: Backend, method: str) -> None:
    async with open_pool(backend.url) as pool:
        _, body = await fetch(pool, method, "/x")
    assert json.loads(body)["headers"] == {"Host": "backend"}


async def test_body_of_known_length_is_sent_with_content_length(backend: Backend) -> None:
    async with open_pool(backend.url) as pool:
        _, body = await fetch(pool, "POST", "/up", body=parts(b"hel", b"", b"lo"), length=5)
    echoed = json.loads(body)
    assert echoed["headers"] == {"Host": "backend", "Content-Length": "5"}
    assert echoed["body_size"] == 5
    assert echoed["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


async def test_body_of_unknown_length_is_sent_chunked(backend: Backend) -> None:
    chunks = [b"first", b"", b"x" * 70000, b"last"]  # an empty chunk must not end the body early
    async with open_pool(backend.url) as pool:
        _, body = await fetch(pool, "POST", "/up", body=parts(*chunks))
    echoed = json.loads(body)
    assert echoed["headers"] == {"Host": "backend", "Transfer-Encoding": "chunked"}
    assert echoed["body_size"] == sum(map(len, chunks))
    assert echoed["body_sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()


@pytest.mark.parametrize("known_length", [True, False], ids=["content-length", "chunked"])
async def test_large_streamed_upload_arrives_intact(backend: Backend, known_length: bool) -> None:
    digest = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        block = bytes(range(256)) * 4096  # 1 MiB
        for i in range(5):
            chunk = block[i:]
            digest.update(chunk)
            yield chunk

    size = sum(1024 * 1024 - i for i in range(5))
    async with open_pool(backend.url) as pool:
        _, body = await fetch(pool, "PUT", "/big", body=upload(), length=size if known_length else None)
    echoed = json.loads(body)
    assert echoed["body_size"] == size
    assert echoed["body_sha256"] == digest.hexdigest()


async def test_head_response_has_no_body_and_next_request_works(backend: Backend) -> None:
    async with open_pool(backend.url) as pool:
        head, body = await fetch(pool, "HEAD", "/bytes/1000")
        assert (head.status, head.content_length, body) == (200, 1000, b"")
        _, body = await fetch(pool, "GET", "/after")
    assert json.loads(body)["path"] == "/after"


# Keep-alive


async def test_sequential_requests_reuse_one_connection() -> None:
    async with RawServer(answer_all) as server, open_pool(server.url) as pool:
        bodies = [(await fetch(pool))[1] for _ in range(3)]
    assert bodies == [b"conn 1"] * 3
    assert server.connections == 1


async def test_most_recently_released_connection_is_used_first() -> None:
    async with RawServer(answer_all) as server, open_pool(server.url) as pool:
        first, second = await send(pool), await send(pool)  # the first is busy: a second connection
        assert [await first.read(), await second.read()] == [b"conn 1", b"conn 2"]
        first.release()
        second.release()
        assert (await fetch(pool))[1] == b"conn 2"
        assert (await fetch(pool))[1] == b"conn 2"
    assert server.connections == 2


async def test_response_not_received_in_full_is_not_reused() -> None:
    async with RawServer(first_then_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")) as server, open_pool(server.url) as pool:
        response = await send(pool)
        assert await response.chunk() == b"01234"
        response.release()
        await until(lambda: server.closed_by_client == [1])
        assert (await fetch(pool))[1] == b"conn 2"


@pytest.mark.parametrize("response", [
    ok(b"done", b"Connection: close"),
    b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\ndone",
], ids=["connection-close", "http-1.0"])
async def test_response_that_ends_keep_alive_is_not_reused(response: bytes) -> None:
    async def handler(peer: Peer) -> None:
        if peer.number == 1:
            await answering(response)(peer)
        else:
            await answer_all(peer)

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        first, body = await fetch(pool)
        assert (first.keep_alive, body) == (False, b"done")
        await until(lambda: server.closed_by_client == [1])  # the client closed it
        assert (await fetch(pool))[1] == b"conn 2"


async def test_idle_connection_closed_by_backend_is_not_used() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"conn %d" % peer.number))  # keep-alive promised, then closed

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        assert (await fetch(pool))[1] == b"conn 1"
        await until(lambda: server.connections == 1 and not pool._idle)  # the pool saw the close
        assert (await fetch(pool, "POST", body=parts(b"once"), length=4))[1] == b"conn 2"
    assert [body for _, _, body in server.requests] == [b"", b"once"]


# Response framing


CHUNKED = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n", b"1\r\n \r\n",
           b"5\r\nworld\r\n0\r\n\r\n"]


async def test_chunked_response_read_whole_and_connection_reused() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        for data in CHUNKED:
            await peer.send(data)
        await answer_all(peer)

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        response, body = await fetch(pool)
        assert (body, response.content_length) == (b"hello world", None)
        assert (await fetch(pool))[1] == b"conn 1"


async def test_chunked_response_read_chunk_by_chunk() -> None:
    async with RawServer(answering(*CHUNKED)) as server, open_pool(server.url) as pool:
        response = await send(pool)
        try:
            received = []
            while chunk := await response.chunk():
                received.append(chunk)
            assert b"".join(received) == b"hello world"
            assert await response.chunk() == b""  # the end stays the end
            assert response.complete
        finally:
            response.release()


async def test_close_delimited_response_runs_to_the_close() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await peer.send(b"part two")

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        response, body = await fetch(pool)
        assert (body, response.content_length, response.keep_alive) == (b"part one, part two", None, False)
        response = await send(pool)
        try:
            received = b""
            while chunk := await response.chunk():
                received += chunk
        finally:
            response.release()
        assert received == b"part one, part two"
    assert server.connections == 2


@pytest.mark.parametrize("codings", [
    [b"Transfer-Encoding: chunked, gzip"],
    [b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"],
], ids=["one-field", "two-fields"])
async def test_chunked_not_last_runs_to_the_close_and_the_connection_is_not_reused(codings: list[bytes]) -> None:
    """Only a last `chunked` frames the body (RFC 9112 6.3); read as chunked, this one would be cut."""
    raw = b"5\r\nhello\r\n0\r\n\r\n" + b"x" * 100  # gzip bytes that happen to look like chunks

    async def handler(peer: Peer) -> None:
        if peer.number > 1:
            return await answer_all(peer)
        await peer.request()
        head = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n" + b"".join(c + b"\r\n" for c in codings) + b"\r\n"
        await peer.send(head + raw[:10])
        await peer.send(raw[10:])

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        response, body = await fetch(pool)
        assert (body, response.content_length, response.keep_alive) == (raw, None, False)
        assert (await fetch(pool))[1] == b"conn 2"


def llhttp_frames_chunked(head: bytes) -> bool | None:
    """Whether llhttp reads the body after `head` as chunks; None if it refuses the head."""
    chunks = []
    parser = httptools.HttpResponseParser(type("Probe", (), {"on_chunk_header": lambda self: chunks.append(1)})())
    try:
        parser.feed_data(head + b"0\r\n\r\n")
    except httptools.HttpParserError:
        return None
    return bool(chunks)


CODING_PARTS = ["chunked", "CHUNKED", "Chunked", "gzip", "identity", "x", ",", ", ", " ", "\t", ";q=1"]


@given(st.lists(st.lists(st.sampled_from(CODING_PARTS), min_size=1, max_size=6).map("".join), min_size=1, max_size=3))
@example(["chunked, gzip"])
@example(["gzip", "chunked"])
@example(["chunked\t"])  # llhttp: a space may follow `chunked`, a tab may not
@example(["gzip,\tchunked "])
def test_a_body_cut_short_is_complete_only_when_llhttp_did_not_frame_it_as_chunks(codings: list[str]) -> None:
    """The client's idea of the framing (does the close end the body?) is llhttp's: a chunked body cut
    short is never taken as complete, and a body that runs to the close is never cut."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"Transfer-Encoding: %s\r\n" % c.encode() for c in codings) + b"\r\n"
    chunked = llhttp_frames_chunked(head)
    assume(chunked is not None)
    loop = asyncio.new_event_loop()
    try:
        response = Response(client._Connection(Pool(URL("http://127.0.0.1:9")), loop), "GET", 1.0)
        response.feed(head + b"5\r\nhello\r\n")
        response.lost()
        if chunked:
            assert (response.complete, response.error and response.error.kind) == (False, "reset")
        else:
            assert (response.complete, loop.run_until_complete(response.read())) == (True, b"5\r\nhello\r\n")
    finally:
        loop.close()


def with_trailers(*fields: bytes) -> bytes:
    return b"5\r\nhello\r\n0\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


async def test_trailers_within_the_bounds_end_the_body_and_the_connection_is_reused() -> None:
    fields = [b"X-Checksum: abc", b"X-Big: " + b"v" * (MAX_TRAILER_SIZE - 1024)] + \
        [b"X-T%d: 1" % i for i in range(MAX_TRAILERS - 2)]

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + with_trailers(*fields))
        await answer_all(peer)

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        response, body = await fetch(pool)
        assert (body, response.headers) == (b"hello", [("Transfer-Encoding", "chunked")])  # trailers are not headers
        assert (await fetch(pool))[1] == b"conn 1"


@pytest.mark.parametrize("fields", [
    [b"X-T%d: 1" % i for i in range(MAX_TRAILERS + 1)],
    [b"X-A: " + b"v" * (MAX_TRAILER_SIZE // 2), b"X-B: " + b"v" * (MAX_TRAILER_SIZE // 2)],
], ids=["too-many", "too-large"])
async def test_trailers_over_the_bounds_are_invalid_and_the_connection_closed(fields: list[bytes]) -> None:
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + with_trailers(*fields)
    async with RawServer(first_then_all(response)) as server, open_pool(server.url) as pool:
        received = await send(pool)
        try:
            error = await failure(received.read())
        finally:
            received.release()
        assert error.kind == "invalid" and "trailers" in str(error)
        await until(lambda: server.closed_by_client == [1])
        assert (await fetch(pool))[1] == b"conn 2"


@pytest.mark.parametrize("start", [b"0\r\nX-Endless: ", b"5;"], ids=["trailer", "chunk-extension"])
async def test_endless_bytes_between_body_bytes_are_invalid(start: bytes) -> None:
    """A trailer field or a chunk extension that never ends fails once it passes the bound, long before the timeout."""
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.05)
        await peer.send(start)
        for _ in range(128):  # 1 MiB at most; the client closes long before
            await peer.send(b"v" * 8192)
            await asyncio.sleep(0.001)
        await peer.until_closed()

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        received = await send(pool)
        try:
            assert await received.chunk() == b"hello"
            error = await failure(received.read())
        finally:
            received.release()
    assert error.kind == "invalid"
    assert f"over {MAX_TRAILER_SIZE} bytes" in str(error)


@pytest.mark.parametrize("writes", [1, 2], ids=["one-write", "two-writes"])
async def test_interim_100_continue_is_skipped(writes: int) -> None:
    interim = b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
    final = b"HTTP/1.1 201 Created\r\nX-Final: 1\r\nContent-Length: 2\r\n\r\nok"
    responses = (interim + final,) if writes == 1 else (interim, final)
    async with RawServer(answering(*responses)) as server, open_pool(server.url) as pool:
        response, body = await fetch(pool, "POST", body=parts(b"data"), length=4)
    assert (response.status, response.reason, body) == (201, "Created", b"ok")
    assert response.headers == [("X-Final", "1"), ("Content-Length", "2")]


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_status_without_length_keeps_the_connection(status: int) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 %d Nothing\r\nETag: x\r\n\r\n" % status)
        await answer_all(peer)

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        response, body = await fetch(pool)
        assert (response.status, body) == (status, b"")
        assert (await fetch(pool))[1] == b"conn 1"


async def test_repeated_headers_kept_in_order() -> None:
    response = ok(b"", b"Set-Cookie: a=1", b"X-Other: y", b"set-cookie: b=2")
    async with RawServer(answering(response)) as server, open_pool(server.url) as pool:
        received, _ = await fetch(pool)
    assert received.headers == [("Set-Cookie", "a=1"), ("X-Other", "y"), ("set-cookie", "b=2"),
                                ("Content-Length", "0")]


async def test_header_bytes_that_are_not_utf8_pass_through_unchanged() -> None:
    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(ok(b"", b"X-Raw: caf\xe9 \xff"))

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        response, _ = await fetch(pool)
        value = dict(response.headers)["X-Raw"]
        await fetch(pool, headers=[("Host", "backend"), ("X-Raw", value)])  # as a proxy would send it on
    assert b"\r\nX-Raw: caf\xe9 \xff\r\n" in server.requests[1][1]


async def test_head_just_under_the_limit_is_taken() -> None:
    value = b"v" * (MAX_HEAD - 1024)
    async with RawServer(answering(ok(b"ok", b"X-Big: " + value))) as server, open_pool(server.url) as pool:
        response, body = await fetch(pool)
    assert (dict(response.headers)["X-Big"], body) == (value.decode(), b"ok")


# Failures


async def test_connection_refused_is_unreachable() -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with open_pool(f"http://127.0.0.1:{port}") as pool:
        error = await failure(send(pool))
    assert error.kind == "unreachable"


async def test_connect_that_never_completes_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once its queue is full, new connections get no answer
        port = listener.getsockname()[1]
        filled: list[asyncio.StreamWriter] = []
        try:
            for _ in range(8):
                try:
                    async with asyncio.timeout(0.2):
                        filled.append((await asyncio.open_connection("127.0.0.1", port))[1])
                except TimeoutError:
                    break
            else:
                pytest.fail("the listen queue never filled")
            async with open_pool(f"http://127.0.0.1:{port}") as pool:
                error = await failure(send(pool, connect_timeout=0.2))
        finally:
            for writer in filled:
                writer.close()
    assert error.kind == "timeout"


async def test_backend_that_never_answers_times_out(backend: Backend) -> None:
    async with open_pool(backend.url) as pool:
        error = await failure(send(pool, target="/hang", timeout=0.2))
    assert error.kind == "timeout"


async def test_body_that_stops_coming_times_out() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"
    async with RawServer(answering(head)) as server, open_pool(server.url) as pool:
        response = await send(pool, timeout=0.2)
        try:
            assert response.status == 200
            error = await failure(response.read())
        finally:
            response.release()
    assert error.kind == "timeout"


async def test_upload_the_backend_stops_reading_times_out() -> None:
    async def upload() -> AsyncIterator[bytes]:
        block = b"x" * (1024 * 1024)
        for _ in range(256):  # far more than the socket buffers hold
            yield block

    async with RawServer(hang) as server, open_pool(server.url) as pool:
        error = await failure(send(pool, "POST", body=upload(), length=256 * 1024 * 1024, timeout=0.2))
    assert error.kind == "timeout"
    assert "stopped reading" in str(error)


async def test_backend_closing_without_answer_is_reset() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        error = await failure(send(pool))
    assert error.kind == "reset"


async def test_backend_resetting_the_connection_is_reset(backend: Backend) -> None:
    async with open_pool(backend.url) as pool:
        error = await failure(send(pool, target="/reset"))
    assert error.kind == "reset"


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"\x16\x03\x01\x02\x00"])
async def test_garbage_instead_of_a_status_line_is_invalid(garbage: bytes) -> None:
    async with RawServer(answering(garbage)) as server, open_pool(server.url) as pool:
        error = await failure(send(pool))
    assert error.kind == "invalid"


async def test_head_over_the_limit_is_invalid() -> None:
    big = ok(b"", b"X-Big: " + b"v" * (MAX_HEAD + 1))
    async with RawServer(answering(big)) as server, open_pool(server.url) as pool:
        error = await failure(send(pool))
    assert error.kind == "invalid"
    assert f"larger than {MAX_HEAD}" in str(error)


async def test_unfinished_head_over_the_limit_is_invalid() -> None:
    endless = b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * (16 * MAX_HEAD)  # and never a line end
    async with RawServer(answering(endless)) as server, open_pool(server.url) as pool:
        error = await failure(send(pool, timeout=1.0))
    assert error.kind == "invalid"


async def test_switching_protocols_is_invalid() -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    async with RawServer(answering(switch)) as server, open_pool(server.url) as pool:
        error = await failure(send(pool, headers=HOST + [("Connection", "Upgrade"), ("Upgrade", "websocket")]))
    assert error.kind == "invalid"


async def test_body_cut_short_is_reset(backend: Backend) -> None:
    async with open_pool(backend.url) as pool:
        response = await send(pool, target="/short")
        try:
            assert (response.status, response.content_length) == (200, 100)
            error = await failure(response.read())
        finally:
            response.release()
        assert error.kind == "reset"

        response = await send(pool, target="/truncated")
        try:
            received = 0
            with pytest.raises(BackendError) as caught:
                while chunk := await response.chunk():
                    received += len(chunk)
        finally:
            response.release()
        assert caught.value.kind == "reset"
        assert received == 1000


async def test_failed_response_does_not_spoil_the_pool() -> None:
    async with RawServer(first_then_all(b"nonsense\r\n\r\n")) as server, open_pool(server.url) as pool:
        assert (await failure(send(pool))).kind == "invalid"
        assert (await fetch(pool))[1] == b"conn 2"


# Stale keep-alive connections


async def one_then_silence(peer: Peer) -> None:
    """Answer the first request on a connection; read the second whole and close without a word, as a
    backend does that closed an idle connection just as the request was sent."""
    if await peer.request() is not None:
        await peer.send(ok(b"conn %d" % peer.number))
        await peer.request()


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
async def test_bodiless_idempotent_request_on_stale_connection_is_replayed(method: str) -> None:
    async with RawServer(one_then_silence) as server, open_pool(server.url) as pool:
        await fetch(pool)
        response, _ = await fetch(pool, method)
    assert response.status == 200
    assert server.methods() == [b"GET", method.encode(), method.encode()]
    assert [number for number, _, _ in server.requests] == [1, 1, 2]


@pytest.mark.parametrize(("method", "body"), [("POST", None), ("POST", b"payload"), ("PUT", b"payload")])
async def test_request_on_stale_connection_is_not_replayed(method: str, body: bytes | None) -> None:
    async with RawServer(one_then_silence) as server, open_pool(server.url) as pool:
        await fetch(pool)
        error = await failure(send(pool, method, body=None if body is None else parts(body),
                                   length=None if body is None else len(body)))
    assert error.kind == "reset"
    assert server.methods() == [b"GET", method.encode()]  # the backend got it once


async def test_reused_connection_that_answered_in_part_is_not_replayed() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"conn %d" % peer.number))
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")  # then the connection closes

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        await fetch(pool)
        error = await failure(send(pool))
    assert error.kind == "reset"
    assert server.connections == 1


async def test_backend_closing_right_after_each_answer_never_gets_a_body_twice() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"conn %d" % peer.number))  # keep-alive promised; the close races the next request

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        for i in range(20):
            assert (await fetch(pool))[0].status == 200  # a GET is replayed when needed
            payload = b"payload %d" % i
            try:
                response, _ = await fetch(pool, "POST", body=parts(payload), length=len(payload))
            except BackendError as exc:
                assert exc.kind == "reset"
                delivered = 0
            else:
                assert response.status == 200
                delivered = 1
            assert [body for _, _, body in server.requests].count(payload) == delivered


# Flow control


async def test_large_response_read_slowly_arrives_intact(backend: Backend) -> None:
    total = 20_000_000
    async with open_pool(backend.url) as pool:
        response = await send(pool, target=f"/bytes/{total}")
        try:
            sizes = []
            while chunk := await response.chunk():
                assert chunk == b"x" * len(chunk)
                sizes.append(len(chunk))
                await asyncio.sleep(0.002)  # a slow client
        finally:
            response.release()
    assert sum(sizes) == total
    assert max(sizes) < 2 * PAUSE_AT  # the backend was asked to wait rather than buffered without bound


async def test_large_response_read_whole(backend: Backend) -> None:
    async with open_pool(backend.url) as pool:
        _, body = await fetch(pool, target=f"/bytes/{4 * PAUSE_AT}", timeout=1.0)
    assert len(body) == 4 * PAUSE_AT


async def test_connection_is_usable_after_reading_a_body_of_pause_size(backend: Backend) -> None:
    async with open_pool(backend.url) as pool:
        _, body = await fetch(pool, target=f"/bytes/{PAUSE_AT}", timeout=1.0)
        assert len(body) == PAUSE_AT
        response, _ = await fetch(pool, target="/next", timeout=1.0)
    assert response.status == 200


async def test_early_answer_while_the_backend_reads_the_body() -> None:
    async def handler(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await peer.until_closed()  # and drops what comes

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * (1024 * 1024)
            await asyncio.sleep(0)

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        response, _ = await fetch(pool, "POST", body=upload(), length=64 * 1024 * 1024)
        assert response.status == 413
        await until(lambda: server.closed_by_client == [1])  # the body was not all sent: never reused


async def test_a_backend_answering_while_it_reads_gets_the_whole_body() -> None:
    """A duplex backend: response head first, then each piece of the body echoed as it arrives."""

    async def handler(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):
            piece = await peer.reader.readexactly(1000)
            await peer.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        await peer.send(b"0\r\n\r\n")
        await peer.until_closed()

    async def upload() -> AsyncIterator[bytes]:
        for i in range(8):
            yield bytes([65 + i]) * 1000
            await asyncio.sleep(0.01)

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        response, body = await fetch(pool, "POST", body=upload(), length=8000)
    assert response.status == 200
    assert body == b"".join(bytes([65 + i]) * 1000 for i in range(8))


async def test_early_answer_from_a_backend_that_stops_reading() -> None:
    async def handler(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await asyncio.Future()  # reads no more

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(256):
            yield b"x" * (1024 * 1024)

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        response, _ = await fetch(pool, "POST", body=upload(), length=256 * 1024 * 1024, timeout=1.0)
    assert response.status == 413


async def test_bytes_after_a_response_in_the_same_read_are_not_trusted() -> None:
    both = ok(b"first", b"X-Which: first") + ok(b"second", b"X-Which: second")
    async with RawServer(answering(both)) as server, open_pool(server.url) as pool:
        response, body = await fetch(pool)
        assert (body, response.content_length, dict(response.headers)["X-Which"]) == (b"first", 5, "first")
        await fetch(pool)
    assert server.connections == 2



async def test_bytes_an_idle_connection_receives_close_it_before_any_reuse() -> None:
    """A second response no request asked for, arriving once the first was taken and its connection is
    idle (a backend that read part of a body as another request): that connection is closed, so the
    bytes can never be taken for the answer to another client's request sent on it."""

    async def handler(peer: Peer) -> None:
        if peer.number > 1:
            return await answer_all(peer)
        await peer.request()
        await peer.send(ok(b"first"))
        await asyncio.sleep(0.2)
        await peer.send(ok(b"stray"))
        await peer.until_closed()

    async with RawServer(handler) as server, open_pool(server.url) as pool:
        assert (await fetch(pool))[1] == b"first"
        await until(lambda: server.closed_by_client == [1])
        assert (await fetch(pool))[1] == b"conn 2"

# Closing the pool


async def test_aclose_closes_idle_connections() -> None:
    async with RawServer(answer_all) as server:
        pool = Pool(server.url)
        await fetch(pool)
        await fetch(pool)
        assert server.closed_by_client == []
        await pool.aclose()
        await until(lambda: server.closed_by_client == [1])


async def test_aclose_closes_busy_connection_when_released() -> None:
    async with RawServer(answer_all) as server:
        pool = Pool(server.url)
        response = await send(pool)
        await pool.aclose()
        assert await response.read() == b"conn 1"  # the response in flight still completes
        response.release()
        await until(lambda: server.closed_by_client == [1])


async def test_idle_connections_close_after_the_keepalive_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "KEEPALIVE", 0.1)
    async with RawServer(answer_all) as server, open_pool(server.url) as pool:
        await fetch(pool)
        await until(lambda: server.closed_by_client == [1])  # no request came to notice it: the timer did


async def test_a_connection_closed_at_once_is_reset_without_waiting_for_the_timeout() -> None:
    async def close_at_once(peer: Peer) -> None:
        peer.writer.close()

    async with RawServer(close_at_once) as server, open_pool(server.url) as pool:
        error = await failure(asyncio.wait_for(send(pool, timeout=30.0), 5))
    assert error.kind == "reset"
