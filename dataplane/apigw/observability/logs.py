"""JSON logs on stdout, one object per line, readable by `grep` and `jq` as the runbook does.

Structured fields go in `extra={"fields": {...}}`; they become top-level keys of the line.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError


def dumps(line: dict[str, Any]) -> str:
    """One JSON object as text: orjson (a tenth of `json`'s cost), or `json` for what orjson refuses
    (strings holding lone surrogates, as undecodable bytes in a request path become)."""
    try:
        return orjson.dumps(line, default=str).decode()
    except TypeError:
        return json.dumps(line, default=str)


def timestamp(created: float) -> str:
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(created))}.{int(created % 1 * 1000):03d}Z"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            exc = record.exc_info[1]
            # aiohttp's parser errors quote the raw request (a token, for a bad Authorization header)
            line["exception"] = type(exc).__name__ if isinstance(exc, HttpProcessingError) else f"{type(exc).__name__}: {exc}"
        return dumps(line)


class OutputLock:
    """Writes to a pipe or socket that other processes write to too (`--workers`: the supervisor and its
    workers share the container's stdout), made one at a time. The kernel splits a write larger than
    PIPE_BUF (4 KiB: an access log batch, a long line) on a full pipe and may put another process's write
    in the middle: two lines spliced into one that jq stops at. Every process finds the same lock file
    from the pipe's identity, so none needs telling. A file or a terminal needs no lock (a write to a
    file lands whole), nor does a stream without a descriptor."""

    def __init__(self, stream: TextIO):
        self._fd: int | None = None
        try:
            status = os.fstat(stream.fileno())
            if stat.S_ISFIFO(status.st_mode) or stat.S_ISSOCK(status.st_mode):
                path = os.path.join(tempfile.gettempdir(), f"apigw-stdout-{status.st_dev}-{status.st_ino}.lock")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                if os.fstat(fd).st_uid == os.geteuid():  # another user's file in a shared /tmp: not ours to wait on
                    self._fd = fd
                else:
                    os.close(fd)
        except (OSError, ValueError):  # no descriptor (io.StringIO), no writable temporary directory, a symlink
            self._fd = None

    def __enter__(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


class _LockedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record (and the buffered text before it) while holding the stream's `OutputLock`."""

    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self.output_lock = OutputLock(stream)

    def emit(self, record: logging.LogRecord) -> None:
        with self.output_lock:
            super().emit(record)


REPEAT_INTERVAL = 10.0
"""Seconds: a warning or error repeated within this long of its last line is counted, not written."""
REPEAT_KEYS = 1000
"""Kinds of repeated lines remembered; beyond, the oldest is forgotten (its next line is written)."""


@dataclass
class _Repeats:
    since: float
    """When the kind's last line was written."""
    count: int = 0
    record: logging.LogRecord | None = None
    """The last suppressed record, written with `repeated: count` when the interval ends."""


class RepeatFilter(logging.Filter):
    """Flood control: of warnings and errors of one kind (logger, message, and the `error` or
    `error_type` field and the `backend_service` field when there are) the first is written, then at
    most one line per interval, carrying `repeated: N`, the count suppressed since the last. A Redis
    outage at 800 requests a second then writes one `ratelimit error` line per 10 s instead of 8,000,
    and one backend's breaker opening never hides another's. Metrics still count every event; access
    lines do not pass through here."""

    def __init__(self, handler: logging.Handler, interval: float = REPEAT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.handler, self.interval, self.clock = handler, interval, clock
        self._seen: dict[tuple[Any, ...], _Repeats] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "repeat_summary", False):
            return True
        fields = getattr(record, "fields", None) or {}
        key = (record.name, record.msg, fields.get("error", fields.get("error_type")), fields.get("backend_service"))
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or now - seen.since >= self.interval:
            if seen is not None and seen.count:
                record.fields = {**fields, "repeated": seen.count}
            self._remember(key, _Repeats(now))
            return True
        if not seen.count:
            self._flush_later(key, seen.since + self.interval - now)
        seen.count += 1
        seen.record = record
        return False

    def _remember(self, key: tuple[Any, ...], repeats: _Repeats) -> None:
        self._seen.pop(key, None)
        self._seen[key] = repeats
        if len(self._seen) > REPEAT_KEYS:
            oldest = next(iter(self._seen))
            self.flush(oldest)  # its count, if any, before it is forgotten
            self._seen.pop(oldest, None)

    def _flush_later(self, key: tuple[Any, ...], delay: float) -> None:
        try:
            asyncio.get_running_loop().call_later(delay, self.flush, key)
        except RuntimeError:  # no loop: the count goes out with the kind's next line
            pass

    def flush(self, key: tuple[Any, ...]) -> None:
        """At the end of an interval: the kind's last suppressed line, with the count, if any."""
        seen = self._seen.get(key)
        if seen is None or not seen.count or seen.record is None:
            return
        record = logging.makeLogRecord(seen.record.__dict__)
        record.fields = {**(getattr(record, "fields", None) or {}), "repeated": seen.count}
        record.repeat_summary = True
        del self._seen[key]
        self._seen[key] = _Repeats(self.clock())  # the summary is the kind's last line now
        self.handler.handle(record)

    def flush_all(self) -> None:
        """Every kind's pending count, at shutdown: the last interval's repeats are not lost."""
        for key in list(self._seen):
            self.flush(key)


def flush_repeats() -> None:
    """Write the counts the flood control still holds (see `RepeatFilter.flush_all`)."""
    for handler in logging.getLogger().handlers:
        for each in handler.filters:
            if isinstance(each, RepeatFilter):
                each.flush_all()


def setup_logging(level: str = "INFO") -> None:
    handler = _LockedStreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(RepeatFilter(handler))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = True  # the pipeline writes its own access log


GREPPED = re.compile(r"=|error|fatal|auth|rate|duration|oom|memory|backend_service", re.IGNORECASE)
"""What the runbook's greps look for in log lines (`status_code=5`, `auth_status=failure`, `-i error`,
`-i "auth.*error"`, `-i "ratelimit.*error"`, `-i "rate.*duration"`, `backend_service`, `-i oom`, ...).
`grep_safe` keeps every match of it out of the text of request- and config-supplied values."""
_GREPPED_LOWER = re.compile(GREPPED.pattern)
"""`GREPPED` for lower-cased ASCII text: a fifth of the cost of matching without regard to case."""

_HEX_OR_DASH = re.compile(r"[0-9A-Fa-f-]*").fullmatch
"""Text no `GREPPED` match can occur in (each grepped word holds a letter past `f`, or `=`), checked a
quarter as fast as the general case."""


def grep_safe(value: str) -> str:
    """`value` as the inside of a JSON string in which no `GREPPED` match occurs: `=` and one character
    of each grepped word are written as `\\uXXXX` escapes, which grep sees as such and every JSON reader
    (jq, `json.loads`) turns back into the exact value. So `GET /open/status_code=503` is logged as
    `/open/status_code\\u003d503` and `jq -r .path` prints `/open/status_code=503`."""
    if _HEX_OR_DASH(value):
        return value  # request ids, UUIDs: no grepped word is spelt in hex digits
    if (value.isascii() and value.isprintable() and '"' not in value and "\\" not in value
            and not _GREPPED_LOWER.search(value.lower())):
        return value  # the common case: the JSON text is the value itself
    tokens = [char if char.isascii() and char.isprintable() and char not in '"\\' else json.dumps(char)[1:-1]
              for char in value]
    text = "".join(tokens)
    while starts := [match.start() for match in GREPPED.finditer(text)]:
        # No grepped word fits inside escapes (they all hold a character an escape cannot), so each
        # match holds a literal character: escaping its first one breaks it (escapes start with a
        # backslash, which no grepped word holds). A new match the escape's hex digits make with what
        # follows is found in the next round. Every match of a round is broken in one pass over the
        # tokens: a client's 16 KB of `oom` costs a few passes, not one per match.
        index = offset = 0
        for start in starts:
            while offset < start or len(tokens[index]) != 1:
                offset += len(tokens[index])
                index += 1
            tokens[index] = f"\\u{ord(tokens[index]):04x}"
            offset, index = offset + 1, index + 1
        text = "".join(tokens)
    return text


grep_safe_name = lru_cache(maxsize=4096)(grep_safe)
"""`grep_safe` for values that recur from request to request: route and backend names (from the config),
methods and client addresses. Least recently used first out, so a value seen once only takes a slot."""


@dataclass(slots=True)
class Access:
    """What one request's access line says. `method`, `path`, `route`, `backend_service`, `client_ip`
    and `request_id` are written through `grep_safe`: neither a client nor a route's name can make a
    line that the runbook's greps select."""

    method: str
    path: str
    route: str
    status: int
    client_ip: str
    request_id: str
    auth_status: str = "none"
    error_type: str | None = None
    duration: float | None = None
    """Seconds from the start of the pipeline; None where the request never reached it (parser refusals)."""
    backend_service: str | None = None
    backend_duration: float | None = None

    def line(self, ts: str) -> str:
        """The JSON line; `error_type` comes before `msg`, so that text after `auth` holds `error` only
        on an auth failure (whose `msg` ends `auth_error=<type>`): `grep -i "auth.*error"` selects those."""
        parts = _line_parts if len(self.method) <= CACHED_METHOD_LENGTH else _make_line_parts
        head, middle, route, backend, client = parts(
            self.method, self.status, self.auth_status, self.error_type, self.route, self.backend_service
        )
        path = grep_safe(self.path if len(self.path) <= MAX_LOGGED_PATH else f"{self.path[:MAX_LOGGED_PATH]}...")
        duration = f',"duration_ms":{self.duration * 1000:.3f}' if self.duration is not None else ""
        backend_duration = (f',"backend_duration_ms":{self.backend_duration * 1000:.3f}'
                            if self.backend_duration else "")
        return (f'{{"ts":"{ts}{head}{path}{middle}{path}{route}{duration}{backend}{backend_duration}{client}'
                f'{grep_safe_name(self.client_ip)}","request_id":"{grep_safe(self.request_id)}","auth_status":"'
                f'{self.auth_status}"}}')


MAX_LOGGED_PATH = 1024
"""Characters of a path an access line keeps (a longer one ends with `...`): the path is written twice, each
character up to a 6-byte escape, and a line must fit in the 16 KiB that containerd, CRI-O and Docker keep in
one log record (a longer line is split into partial records, which not every log shipper joins)."""

CACHED_METHOD_LENGTH = 16
"""A longer method (only aiohttp's pure-Python parser lets one through) is escaped anew for each line,
not remembered: a client could otherwise fill the caches with 16 KB methods."""


def _make_line_parts(
    method: str, status: int, auth: str, error_type: str | None, route: str, backend_service: str | None,
) -> tuple[str, str, str, str, str]:
    """The text of an access line between its per-request values (time, path, durations, client, request id)."""
    method = (grep_safe_name if len(method) <= CACHED_METHOD_LENGTH else grep_safe)(method)
    error = f'"error_type":"{error_type}",' if error_type else ""
    auth_error = f" auth_error={error_type}" if auth == "failure" else ""
    backend = f',"backend_service":"{grep_safe_name(backend_service)}"' if backend_service is not None else ""
    return (
        f'","level":"info","logger":"apigw.access",{error}"msg":"{method} ',
        f' status_code={status} auth_status={auth}{auth_error}","method":"{method}","path":"',
        f'","route":"{grep_safe_name(route)}","status_code":{status}',
        backend,
        ',"client_ip":"',
    )


_line_parts = lru_cache(maxsize=4096)(_make_line_parts)
"""`_make_line_parts` for the values that recur: made once per route, method, status and outcome, not once
per request."""


FLUSH_INTERVAL = 0.01
"""Seconds an access line may wait to be written with the others of its interval: at 10,000 requests a
second one write carries a hundred lines instead of a few (`bench/compare.py`). The gateway writes what is
left when it stops; only a process killed outright (SIGKILL, OOM) loses the last interval's lines."""


class AccessLog:
    """One JSON line per request, in the same shape as the other log lines (`logger: apigw.access`).

    Written straight to the stream rather than through `logging`, whose per-record machinery costs
    more than building the line itself, and in one write per `FLUSH_INTERVAL`. A request only leaves
    its `Access` and the time; the line is made when it is written, after the response has gone out:
    work done before the response is sent costs a loaded gateway about three times its own CPU time
    (`bench/features.py`, the access log alone: made in the request's path 12 us a request, made here 4-6 us).
    """

    def __init__(self, stream: TextIO | None = None, interval: float = FLUSH_INTERVAL):
        self.stream = stream or sys.stdout
        self._output_lock = OutputLock(self.stream)
        self._interval = interval
        self._second = self._millisecond = -1
        self._second_text = self._text = ""
        self._pending: list[tuple[Access, str]] = []
        """The requests ended since the last write, each with its timestamp."""
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop it writes on, kept from the first line (`asyncio.get_running_loop()` is a getpid()
        system call on Python 3.11)."""

    def _timestamp(self, now: float) -> str:
        """`timestamp(now)`, formatting the date and time (the costly part) once a second, and the
        whole text once a millisecond (a busy gateway ends several requests in one)."""
        millisecond = int(now * 1000)
        if millisecond != self._millisecond:
            second, fraction = divmod(millisecond, 1000)
            if second != self._second:
                self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._millisecond, self._text = millisecond, f"{self._second_text}.{fraction:03d}Z"
        return self._text

    def write(self, access: Access) -> None:
        if not self._pending:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_later(self._interval, self.flush)
        self._pending.append((access, self._timestamp(time.time())))

    def flush(self) -> None:
        """Write the lines of the requests ended so far (also when the gateway stops)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        text = "\n".join([access.line(ts) for access, ts in pending]) + "\n"
        with self._output_lock:
            self.stream.write(text)
            self.stream.flush()
