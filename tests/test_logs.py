"""Log lines: one JSON object each, whatever the request carried."""

from __future__ import annotations

import asyncio
import io
import json

from apigw.logs import AccessLog


async def test_access_lines_of_one_tick_are_written_together_and_parse() -> None:
    stream = io.StringIO()
    log = AccessLog(stream)
    log.write("GET /a status_code=200", {"path": "/a", "status_code": 200, "duration_ms": 1.25})
    log.write("GET /\udcff status_code=400", {"path": "/\udcff"}, "bad_path")  # lone surrogate: orjson refuses it
    assert stream.getvalue() == ""  # not before the end of the tick
    await asyncio.sleep(0)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["logger"] == "apigw.access" and first["status_code"] == 200 and first["duration_ms"] == 1.25
    assert list(second)[:5] == ["ts", "level", "logger", "error_type", "msg"]
    assert second["path"] == "/\udcff"
