"""An HTTP service whose latency rises with its concurrency, in a process of its own.

Each request to any path takes ``base_ms + penalty_ms * max(0, concurrent - knee)``, where ``concurrent`` is the
number of requests inside the server when it arrives (itself included): flat up to the knee, then each extra
request in flight slows every newcomer, as a service does once its workers, cores or locks are saturated.
``GET /_stats`` answers ``{"requests": n, "peak": most concurrent}`` without the delay and resets the peak.

A process of its own keeps the server's timers true while the test's event loop is busy driving calls.

    with LatencyServer(base_ms=5, knee=16, penalty_ms=3) as server:
        server.url  # http://127.0.0.1:<port>
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web
from tests.support.server_process import ServerProcess, serve


def make_app(base_ms: float, knee: int, penalty_ms: float) -> web.Application:
    state = {"active": 0, "peak": 0, "requests": 0}

    async def stats(request: web.Request) -> web.Response:
        body = {"requests": state["requests"], "peak": state["peak"]}
        state["peak"] = state["active"]
        return web.json_response(body)

    async def work(request: web.Request) -> web.Response:
        state["active"] += 1
        state["requests"] += 1
        concurrent = state["active"]
        state["peak"] = max(state["peak"], concurrent)
        try:
            await request.read()
            await asyncio.sleep((base_ms + penalty_ms * max(0, concurrent - knee)) / 1000)
            return web.Response(body=b"ok")
        finally:
            state["active"] -= 1

    app = web.Application()
    app.router.add_get("/_stats", stats)
    app.router.add_route("*", "/{tail:.*}", work)
    return app


class LatencyServer(ServerProcess):
    """Runs this module as a child process listening on a free port of 127.0.0.1; stops it on exit."""

    def __init__(self, *, base_ms: float, knee: int, penalty_ms: float) -> None:
        super().__init__("tests.support.latency_server", str(base_ms), str(knee), str(penalty_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_ms", type=float)
    parser.add_argument("knee", type=int)
    parser.add_argument("penalty_ms", type=float)
    args = parser.parse_args()
    serve(make_app(args.base_ms, args.knee, args.penalty_ms))


if __name__ == "__main__":
    main()
