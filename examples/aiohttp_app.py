"""An aiohttp service that records treasure-hunt events: the engine starts and stops with the app.

    TREASURE_ENGINE_CONFIG=engine.toml python examples/aiohttp_app.py

POST /hunt with a JSON body {"hunter": ..., ...}: the event is accepted into the engine (never blocking on
Kinesis) and the answer is 202; 503 when the engine refuses it (its ring is full and its policy is "reject").
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from aiohttp import web

from treasure_engine import BufferFull, Engine, EngineConfig

ENGINE = web.AppKey("engine", Engine)


async def hunt(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        hunter = str((await request.json())["hunter"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "expected a JSON object with a hunter"}, status=400)
    try:
        request.app[ENGINE].submit(body, hunter)
    except BufferFull:
        return web.json_response({"error": "busy, retry later"}, status=503)
    return web.json_response({"accepted": True}, status=202)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE].stats())


async def engine_context(app: web.Application) -> AsyncIterator[None]:
    config = EngineConfig.from_toml(os.environ.get("TREASURE_ENGINE_CONFIG", "engine.toml"))
    async with Engine(config) as engine:  # flushes what was accepted when the app stops
        app[ENGINE] = engine
        yield


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/hunt", hunt)
    app.router.add_get("/stats", stats)
    app.cleanup_ctx.append(engine_context)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
