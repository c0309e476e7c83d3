"""JSON logs on stdout, one object per line, readable by `grep` and `jq` as the runbook does.

Structured fields go in `extra={"fields": {...}}`; they become top-level keys of the line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

import orjson


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
            line["exception"] = f"{type(exc).__name__}: {exc}"
        return dumps(line)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = True  # the pipeline writes its own access log


class AccessLog:
    """One JSON line per request, in the same shape as the other log lines (`logger: apigw.access`).

    Written straight to the stream rather than through `logging`, whose per-record machinery costs
    more than building the line itself. The lines of one event-loop tick are written together at its
    end: one write call for many requests, and no line waits longer than that tick.
    `error_type` comes before `msg`, so that text after `auth` holds `error` only on an auth failure
    (whose `msg` ends `auth_error=<type>`): the runbook's `grep -i "auth.*error"` selects those alone.
    """

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self._second = -1
        self._second_text = ""
        self._lines: list[str] = []

    def _timestamp(self, now: float) -> str:
        """`timestamp(now)`, formatting the date and time (the costly part) once a second."""
        second = int(now)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int(now % 1 * 1000):03d}Z"

    def write(self, msg: str, fields: dict[str, Any], error_type: str | None = None) -> None:
        head = {"ts": self._timestamp(time.time()), "level": "info", "logger": "apigw.access"}
        if error_type:
            head["error_type"] = error_type
        if not self._lines:
            asyncio.get_running_loop().call_soon(self._flush)
        self._lines.append(dumps({**head, "msg": msg, **fields}))

    def _flush(self) -> None:
        lines, self._lines = self._lines, []
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
