"""A scriptable downstream: a real HTTP service on 127.0.0.1, in a process of its own (its timers stay true
while the test's loop is busy), whose behaviour the test switches while it runs.

``POST /batch``: in mode "ok" the body (a chaos batch frame) is appended to OUT_FILE in one write and the answer
is 200; "fail" answers ``status`` (503) without recording; "slow" waits ``delay_s`` (2 s), then records and
answers 200; a client that gave up meanwhile is not recorded (aiohttp cancels the handler). "reset" closes the
connection unanswered. ``POST /_mode`` with ``{"mode": ..., "status": ..., "delay_s": ...}`` switches;
``GET /_stats`` answers the counts by outcome.

    with ScriptedDownstream(out_file) as downstream:
        downstream.url                      # http://127.0.0.1:<port>
        downstream.set("fail", status=503)
        downstream.set("slow", delay_s=2.0)
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web
from tests.support.server_process import ServerProcess, serve


def make_app(out_path: str) -> web.Application:
    mode: dict[str, Any] = {"mode": "ok", "status": 503, "delay_s": 2.0}
    counts: Counter[str] = Counter()
    out = open(out_path, "ab", buffering=0)  # noqa: SIM115 - open for the server's life

    async def batch(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        current = mode["mode"]
        counts[current] += 1
        if current == "fail":
            return web.Response(status=int(mode["status"]), text="scripted failure")
        if current == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=503)
        if current == "slow":
            await asyncio.sleep(float(mode["delay_s"]))
        out.write(body)
        counts["recorded"] += 1
        return web.Response(text="ok")

    async def set_mode(request: web.Request) -> web.Response:
        mode.update(await request.json())
        return web.json_response(mode)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(dict(counts))

    async def close(app: web.Application) -> None:
        out.close()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/batch", batch)
    app.router.add_post("/_mode", set_mode)
    app.router.add_get("/_stats", stats)
    app.on_cleanup.append(close)
    return app


class ScriptedDownstream(ServerProcess):
    """Runs this module as a child process recording into `out_path`; stops it on exit."""

    def __init__(self, out_path: Path) -> None:
        super().__init__("tests.support.scripted_downstream", str(out_path))

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def set(self, mode: str, **settings: Any) -> None:
        self._call("/_mode", {"mode": mode, **settings})

    def stats(self) -> dict[str, int]:
        return dict(self._call("/_stats"))


if __name__ == "__main__":
    serve(make_app(sys.argv[1]))
