"""Log lines: one JSON object each, whatever the request carried, and never a match for the runbook's
greps in what a client or a config supplied."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from aiohttp.http_exceptions import BadHttpMessage
from hypothesis import example, given
from hypothesis import strategies as st

from apigw.observability.logs import GREPPED, REPEAT_KEYS, Access, AccessLog, JSONFormatter, RepeatFilter, grep_safe
from apigw.testkit.backend import Backend
from apigw.testkit.clock import FakeClock
from apigw.testkit.process import BackendProcess, GatewayProcess, http_status, ports, wait_until
from apigw.testkit.redis import free_port
from tests.conftest import access_lines, gateway_of

RUNBOOK_GREPS = [re.compile(p) for p in ("status_code=5", "auth_status=failure", "backend_service")] + [
    re.compile(p, re.IGNORECASE) for p in ("auth.*error", "error", "ratelimit.*error", "rate.*duration", "error|fatal",
                                           "out of memory|oom")]
"""The runbook's log greps, as grep reads them (`\\|` is `|`)."""
hostile = st.lists(st.sampled_from(["status_code=5", "auth_status=failure", "auth_error=expired", "Error", "auth", "=",
                                    "/", "\\", "\r", "\udcfe", "rate", "duration"]) | st.text(max_size=3)).map("".join)
"""Text made of what the greps look for, and anything else."""


async def test_access_lines_of_one_interval_are_written_together_and_parse() -> None:
    stream = io.StringIO()
    log = AccessLog(stream, interval=0.5)
    log.write(Access("GET", "/a", "users", 200, "10.0.0.1", "id-1", duration=0.00125))
    await asyncio.sleep(0)
    log.write(Access("GET", "/\udcff", "-", 400, "10.0.0.1", "id-2", error_type="bad_path"))  # lone surrogate
    assert stream.getvalue() == ""  # not before the end of the interval
    await asyncio.sleep(0.7)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first == {"ts": first["ts"], "level": "info", "logger": "apigw.access",
                     "msg": "GET /a status_code=200 auth_status=none", "method": "GET", "path": "/a",
                     "route": "users", "status_code": 200, "duration_ms": 1.25, "client_ip": "10.0.0.1",
                     "request_id": "id-1", "auth_status": "none"}
    assert list(second)[:5] == ["ts", "level", "logger", "error_type", "msg"]
    assert second["path"] == "/\udcff" and "duration_ms" not in second


async def test_access_lines_kept_for_the_next_write_are_written_by_flush() -> None:
    """What the gateway does when it stops: the lines of its last interval are not lost."""
    stream = io.StringIO()
    log = AccessLog(stream, interval=3600)
    log.write(Access("GET", "/a", "users", 200, "10.0.0.1", "id-1"))
    log.write(Access("GET", "/b", "users", 200, "10.0.0.1", "id-2"))
    assert stream.getvalue() == ""
    log.flush()
    assert [json.loads(line)["path"] for line in stream.getvalue().splitlines()] == ["/a", "/b"]
    log.flush()  # nothing kept: nothing more written
    assert len(stream.getvalue().splitlines()) == 2


async def test_a_sampled_access_log_writes_every_error_and_a_share_of_the_rest(gateway_client, backend: Backend) -> None:
    def config(sample: float) -> dict:
        return {"logging": {"access_log_sample": sample}, "routes": [{
            "name": "echo", "match": {"path_prefix": "/echo"}, "rewrite_prefix": "/",
            "backend": {"service": "echo", "url": backend.url}}]}

    client = await gateway_client(config(1e-9))
    for path in ["/echo/a"] * 30 + ["/echo/status/503", "/nowhere", "/echo/status/404"]:
        await (await client.get(path)).read()
    await asyncio.sleep(0)  # the tick's lines are written at its end
    assert [(line["path"], line["status_code"]) for line in access_lines(client)] == [
        ("/echo/status/503", 503), ("/nowhere", 404), ("/echo/status/404", 404)]
    value = gateway_of(client).metrics.registry.get_sample_value
    assert value("gateway_http_requests_total", {"route": "echo", "method": "GET", "status_code": "200"}) == 30

    client = await gateway_client(config(0.5))
    for _ in range(400):
        await (await client.get("/echo/a")).read()
    await asyncio.sleep(0)
    assert 120 < len(access_lines(client)) < 280  # about half; outside these bounds once in 10^19 runs


def test_an_auth_failure_says_so_in_msg_after_auth_status() -> None:
    line = Access("GET", "/a", "r", 401, "", "i", auth_status="failure", error_type="expired").line("t")
    assert json.loads(line)["msg"] == "GET /a status_code=401 auth_status=failure auth_error=expired"
    assert re.search("auth.*error", line) and "status_code=5" not in line


def test_forged_fields_are_read_back_exactly_but_not_grepped() -> None:
    access = Access("GET", "/open/status_code=503/error", "rates", 200, "10.0.0.1", "auth_status=failure",
                    backend_service="error-pages", duration=0.5)
    line = access.line("t")
    assert not any(pattern.search(line) for pattern in RUNBOOK_GREPS[:2] + RUNBOOK_GREPS[3:])
    fields = json.loads(line)
    assert fields["msg"] == "GET /open/status_code=503/error status_code=200 auth_status=none"
    assert (fields["path"], fields["route"], fields["request_id"], fields["backend_service"]) == (
        "/open/status_code=503/error", "rates", "auth_status=failure", "error-pages")
    assert r"/open/status_code\u003d503/\u0065rror" in line


@given(hostile | st.text())
@example("\u000duration")  # an escape's hex digit next to what follows
@example("\udcfe" + "rror")
@example("bac\u0bac" + "kend_service")
@example('"\\=\n\t\x00é😀')
def test_grep_safe_text_round_trips_and_holds_no_grepped_word(value: str) -> None:
    text = grep_safe(value)
    assert json.loads(f'"{text}"') == value
    assert not GREPPED.search(text)


@pytest.mark.parametrize("word", ["oom", "=", "error", "\u000duration", "bac\u0bac" + "kend_service"])
def test_a_path_made_of_grepped_words_is_escaped_in_a_few_passes_not_one_per_word(word: str) -> None:
    """A client's longest path (16 KB) of grepped words: every match of a pass is broken in that pass.
    One match a pass took 8-10 s for 16 KB, holding the event loop; 64 KB would outlast the test's timeout."""
    value = ("/" + word) * (65_536 // (len(word) + 1))
    text = grep_safe(value)
    assert json.loads(f'"{text}"') == value
    assert not GREPPED.search(text)


@given(st.text("0123456789abcdefABCDEF-"))
def test_hex_text_passes_as_it_is_since_no_grepped_word_is_spelt_in_hex(value: str) -> None:
    """grep_safe returns text of hex digits and dashes (request ids, UUIDs) without looking further: that
    holds only while every grepped word needs another character."""
    assert not any(re.fullmatch(r"[0-9A-Fa-f-]+", word) for word in GREPPED.pattern.split("|"))
    assert grep_safe(value) == value and not GREPPED.search(value)


@given(hostile, hostile, st.sampled_from(["none", "success", "failure"]), st.integers(100, 599))
def test_no_request_makes_a_line_the_greps_select_for_what_it_is_not(
    path: str, request_id: str, auth_status: str, status: int
) -> None:
    """`status_code=5` selects exactly the 5xx lines, `auth_status=failure` and `auth.*error` exactly the
    auth failures, `error` exactly the failed requests: whatever the path and request id hold."""
    error_type = "expired" if auth_status == "failure" else ("backend_timeout" if status >= 500 else None)
    line = Access("GET", path, "r", status, "", request_id, auth_status=auth_status, error_type=error_type,
                  duration=0.001).line("t")
    assert json.loads(line)["path"] == path
    assert bool(re.search("status_code=5", line)) == (status >= 500)
    assert bool(re.search("auth_status=failure", line)) == (auth_status == "failure")
    assert bool(re.search("auth.*error", line, re.IGNORECASE)) == (auth_status == "failure")
    assert bool(re.search("error", line, re.IGNORECASE)) == (error_type is not None)


def test_parser_errors_in_log_records_are_named_not_quoted() -> None:
    """aiohttp's parser errors quote the request's bytes (a token, for a bad Authorization header)."""
    try:
        raise BadHttpMessage("Invalid header value char:\n\n  b'Authorization: Bearer secret\\x01'")
    except BadHttpMessage as exc:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "bad request", (), (type(exc), exc, None))
    line = json.loads(JSONFormatter().format(record))
    assert line["exception"] == "BadHttpMessage" and "secret" not in json.dumps(line)


def repeat_filtered(clock: FakeClock) -> tuple[logging.Logger, io.StringIO, RepeatFilter]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    repeats = RepeatFilter(handler, interval=10, clock=clock)
    handler.addFilter(repeats)
    logger = logging.getLogger(f"apigw.test.repeats.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream, repeats


def lines_of(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_repeated_errors_are_counted_not_written(clock: FakeClock) -> None:
    logger, stream, _ = repeat_filtered(clock)
    for _ in range(500):  # one kind: the first is written, the rest counted
        logger.error("ratelimit error: %s; %s", "timeout after 0.1 s", "fail_open",
                     extra={"fields": {"error": "timeout after 0.1 s"}})
        clock.advance(0.01)
    logger.error("ratelimit error: %s; %s", "ConnectionError: refused", "fail_open",
                 extra={"fields": {"error": "ConnectionError: refused"}})  # another reason: its own kind
    logger.info("config reloaded")  # below warning: never held back
    logger.info("config reloaded")
    clock.advance(10)
    logger.error("ratelimit error: %s; %s", "timeout after 0.1 s", "fail_open",
                 extra={"fields": {"error": "timeout after 0.1 s"}})
    lines = lines_of(stream)
    assert [(line["msg"], line.get("repeated")) for line in lines] == [
        ("ratelimit error: timeout after 0.1 s; fail_open", None),
        ("ratelimit error: ConnectionError: refused; fail_open", None),
        ("config reloaded", None),
        ("config reloaded", None),
        ("ratelimit error: timeout after 0.1 s; fail_open", 499),
    ]


async def test_the_count_of_a_flood_that_stops_is_written_when_its_interval_ends() -> None:
    clock = FakeClock()
    logger, stream, repeats = repeat_filtered(clock)
    repeats.interval = 0.2
    repeats.clock = time.monotonic
    for _ in range(50):
        logger.warning("ratelimit slow Redis round trip: duration_ms=%s checks=%d", 80, 3)
    assert len(lines_of(stream)) == 1
    await asyncio.sleep(0.5)
    lines = lines_of(stream)
    assert [line.get("repeated") for line in lines] == [None, 49]


def test_the_counts_held_back_are_written_at_shutdown_and_when_a_kind_is_forgotten(clock: FakeClock) -> None:
    """A flood that stops within its interval, at shutdown, or with more kinds than are remembered: its
    count still reaches the log, else on-call reads one error where there were thousands."""
    logger, stream, repeats = repeat_filtered(clock)
    for kind in range(REPEAT_KEYS + 1):  # the first kind, flooded, is the oldest when the last one comes
        for _ in range(3 if kind == 0 else 1):
            logger.error("backend error", extra={"fields": {"error": f"e{kind}"}})
    assert [line.get("repeated") for line in lines_of(stream) if line["error"] == "e0"] == [None, 2]
    for _ in range(5):
        logger.error("backend error", extra={"fields": {"error": "late"}})
    repeats.flush_all()  # what `flush_repeats` does at shutdown
    assert [line.get("repeated") for line in lines_of(stream) if line["error"] == "late"] == [None, 4]
    repeats.flush_all()
    assert len([line for line in lines_of(stream) if line["error"] == "late"]) == 2  # nothing twice


@pytest.mark.parametrize(("target", "logged"), [
    (b"http://alice:s3cr3t-pw@127.0.0.1/orders?api_key=k3y", "http://***@127.0.0.1/orders"),
    (b"http://s3cr3t-token@127.0.0.1/orders", "http://***@127.0.0.1/orders"),
    (b"https://alice:s3cr3t-pw@127.0.0.1", "https://***@127.0.0.1"),
])
async def test_the_credentials_of_an_absolute_form_target_are_not_logged(
    gateway_client, backend: Backend, target: bytes, logged: str
) -> None:
    """The gateway refuses a target with user information (400 bad_target); its access line still says what
    was asked for, without the client's credentials."""
    client = await gateway_client({"routes": [{"name": "all", "backend": {"service": "all", "url": backend.url}}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    [line] = access_lines(client)
    assert (line["error_type"], line["path"]) == ("bad_target", logged)
    assert not any(secret in json.dumps(line) for secret in ("s3cr3t", "k3y")), line


CRI_LINE_LIMIT = 16 * 1024
"""Bytes of a container's output line that containerd, CRI-O and Docker's json-file log keep in one record:
a longer line is split into partial records, which a shipper that does not join them reads as two broken
lines."""


@pytest.mark.parametrize("path", [b"/" + b"a" * 8100, b"/" + b"a" * 16000, b"/" + b"=" * 16000, b"/" + b"oom" * 5300])
async def test_an_access_line_fits_in_one_container_log_record_whatever_the_path(
    gateway_client, backend: Backend, path: bytes
) -> None:
    client = await gateway_client({"routes": [{"name": "all", "backend": {"service": "all", "url": backend.url}}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 ")  # the backend's answer: aiohttp's own refuses a line over 8190 bytes
    [line] = access_lines(client)
    text = gateway_of(client).access_log.stream.getvalue()
    assert len(text.encode()) < CRI_LINE_LIMIT, len(text.encode())
    assert path.decode().startswith(line["path"].removesuffix("...")) and len(line["path"]) >= 1024


def test_each_backends_breaker_opening_is_logged_at_once(tmp_path: Path) -> None:
    """A real gateway whose three backends all go down within the flood-control interval: on-call greps
    for the breaker of each by name, so the repeat filter must not take the second and third for repeats
    of the first (the message's text is the same, the backend differs)."""
    port, metrics_port = ports()
    routes = [{"name": name, "match": {"path_prefix": f"/{name}"},
               "backend": {"service": name, "url": f"http://127.0.0.1:{free_port()}",  # nothing listens
                           "retries": {"max_retries": 0}, "circuit_breaker": {"consecutive_failures": 2}}}
              for name in ("payments", "orders", "users")]
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port}, "routes": routes,
    }))
    with GatewayProcess(config, port, metrics_port) as gateway:
        for name in ("payments", "orders", "users"):  # two failures open it: 502s, then 503 circuit_open
            wait_until(lambda name=name: http_status(f"{gateway.url}/{name}") == 503, timeout=30,
                       what=f"the breaker of {name} open")

        def opened() -> set[str]:
            return {line["backend_service"] for line in gateway.log_lines()
                    if line["logger"] == "apigw.breaker" and line.get("state") == "open"}

        wait_until(lambda: len(opened()) == 3, timeout=5, what="an 'opened' line for each backend")
        assert opened() == {"payments", "orders", "users"}


def test_workers_sharing_a_pipe_write_whole_lines(tmp_path: Path) -> None:
    """`--workers 2` with stdout a pipe, as a container runtime gives it, drained slowly by its reader (a
    busy log shipper): every line read is one whole JSON object, and every request answered has its line.
    A write larger than PIPE_BUF (4 KiB: an access log batch, a long line) is not atomic on a full pipe:
    the kernel may put another process's write in the middle of it."""
    port, metrics_port = ports()
    with BackendProcess() as backend:
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump({
            "listen": {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port},
            "routes": [{"name": "echo", "backend": {"service": "echo", "url": backend.url}}],
        }))
        gateway = subprocess.Popen([sys.executable, "-m", "apigw", "--config", str(config), "--workers", "2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert gateway.stdout is not None
        read: list[bytes] = []
        draining = threading.Event()

        def drain_slowly() -> None:
            while data := os.read(gateway.stdout.fileno(), 4096):  # type: ignore[union-attr]
                read.append(data)
                if not draining.is_set():
                    time.sleep(0.005)

        reader = threading.Thread(target=drain_slowly)
        reader.start()
        try:
            wait_until(lambda: http_status(f"http://127.0.0.1:{port}/_health/ready") == 200, timeout=30,
                       what="both workers ready")
            answered = []

            def send(rounds: int = 20, pipelined: int = 50) -> None:
                request = f"GET /{'x' * 900} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                count = 0
                for _ in range(rounds):
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                        sock.sendall(request * pipelined)
                        received = b""
                        while received.count(b"HTTP/1.1 200 ") < pipelined and (data := sock.recv(65536)):
                            received += data
                        count += received.count(b"HTTP/1.1 200 ")
                answered.append(count)

            senders = [threading.Thread(target=send) for _ in range(4)]
            for thread in senders:
                thread.start()
            for thread in senders:
                thread.join()
            wait_until(lambda: b"".join(read).count(b'"logger":"apigw.access"') >= sum(answered), timeout=60,
                       what="the answered requests' lines read")
            data = b"".join(read)  # before the stop (shutdown is not what this is about), whole lines only
            lines = data[: data.rfind(b"\n") + 1].decode().splitlines()
        finally:
            draining.set()
            gateway.terminate()
            gateway.wait(30)
            reader.join(10)
            gateway.stdout.close()
    broken = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            broken.append(line)
    assert not broken, f"{len(broken)} of {len(lines)} lines are not JSON, such as {broken[0][:200]!r}...{broken[0][-200:]!r}"
    assert sum(1 for line in lines if '"logger":"apigw.access"' in line) == sum(answered) == 4000
