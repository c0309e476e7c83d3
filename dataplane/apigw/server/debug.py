"""The debug listener (`gateway --debug-port 6060`, off by default, loopback only): the Python
counterpart of the runbook's pprof step, reached with `kubectl port-forward <pod> 6060:6060`.

    GET /debug/tasks               every asyncio task with its stack (what is the loop waiting on?)
    GET /debug/profile?seconds=5   a CPU profile of the event loop thread, functions by own time

py-spy (`py-spy dump --pid 1`, `py-spy record -o profile.svg --pid 1`) does the same from outside the
process and also works with `--workers`.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats

from aiohttp import web

MAX_PROFILE_SECONDS = 60.0
_PROFILING = web.AppKey("profiling", asyncio.Lock)


async def tasks(request: web.Request) -> web.Response:
    out = io.StringIO()
    current = asyncio.all_tasks()
    out.write(f"{len(current)} asyncio tasks\n")
    for task in sorted(current, key=lambda t: t.get_name()):
        out.write(f"\n{task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(limit=20, file=out)
    return web.Response(text=out.getvalue())


async def profile(request: web.Request) -> web.Response:
    try:
        seconds = float(request.query.get("seconds", "5"))
    except ValueError:
        raise web.HTTPBadRequest(text="seconds must be a number\n") from None
    if not 0 < seconds <= MAX_PROFILE_SECONDS:
        raise web.HTTPBadRequest(text=f"seconds must be in (0, {MAX_PROFILE_SECONDS:g}]\n")
    lock = request.app[_PROFILING]
    if lock.locked():
        raise web.HTTPConflict(text="a profile is already running\n")
    async with lock:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            await asyncio.sleep(seconds)
        finally:
            profiler.disable()
    out = io.StringIO()
    out.write(f"CPU profile of the event loop thread over {seconds:g}s, by own time\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)
    return web.Response(text=out.getvalue())


def debug_app() -> web.Application:
    app = web.Application()
    app[_PROFILING] = asyncio.Lock()
    app.router.add_get("/debug/tasks", tasks)
    app.router.add_get("/debug/profile", profile)
    return app
