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
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from aiohttp import web

_ROOT = Path(__file__).resolve().parent.parent.parent


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


async def _serve(base_ms: float, knee: int, penalty_ms: float) -> None:
    runner = web.AppRunner(make_app(base_ms, knee, penalty_ms), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    print(f"LISTENING {port}", flush=True)
    try:
        # Serve until the parent closes our stdin (or dies).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await runner.cleanup()


class LatencyServer:
    """Runs this module as a child process listening on a free port of 127.0.0.1; stops it on exit."""

    def __init__(self, *, base_ms: float, knee: int, penalty_ms: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.latency_server", str(base_ms), str(knee), str(penalty_ms)],
            cwd=_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"latency server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> LatencyServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_ms", type=float)
    parser.add_argument("knee", type=int)
    parser.add_argument("penalty_ms", type=float)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(_serve(args.base_ms, args.knee, args.penalty_ms))
    else:
        uvloop.run(_serve(args.base_ms, args.knee, args.penalty_ms))


if __name__ == "__main__":
    main()
