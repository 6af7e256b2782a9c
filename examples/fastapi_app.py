"""A FastAPI service that records treasure-hunt events; the engine lives in the app's lifespan.

TREASURE_ENGINE_CONFIG=engine.toml uvicorn examples.fastapi_app:app --host 127.0.0.1
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request

from treasure_engine import BufferFull, Engine, EngineConfig


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    config = EngineConfig.from_toml(os.environ.get("TREASURE_ENGINE_CONFIG", "engine.toml"))
    async with Engine(config) as engine:  # flushes what was accepted at shutdown
        app.state.engine = engine
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/hunt", status_code=202)
async def hunt(request: Request) -> dict[str, bool]:
    body = await request.body()
    try:
        hunter = str((await request.json())["hunter"])
    except (ValueError, KeyError, TypeError):
        raise HTTPException(400, "expected a JSON object with a hunter") from None
    try:
        request.app.state.engine.submit(body, hunter)
    except BufferFull:
        raise HTTPException(503, "busy, retry later") from None
    return {"accepted": True}


@app.get("/stats")
async def stats(request: Request) -> dict[str, object]:
    return dict(request.app.state.engine.stats())
