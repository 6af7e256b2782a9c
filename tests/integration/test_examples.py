"""The embedding examples, each served for real on 127.0.0.1 and fed over HTTP; the events end up in the stream."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from tests.support.emulators import MotoServer, free_port, wait_for_port
from tests.support.kinesis_reader import read_all

pytestmark = pytest.mark.integration

N = 200


@pytest.fixture
def engine_toml(
    moto_server: MotoServer, stream_factory: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    stream = stream_factory(moto_server.endpoint_url, 2)
    path = tmp_path / "engine.toml"
    path.write_text(
        f'[producer]\nstream = "{stream}"\nendpoint_url = "{moto_server.endpoint_url}"\nregion = "us-east-1"\n'
        f'linger_ms = 5.0\nordered = true\nstate_dir = "{tmp_path / "state"}"\n'
    )
    monkeypatch.setenv("TREASURE_ENGINE_CONFIG", str(path))
    return stream


def post_events(port: int) -> list[int]:
    statuses = []
    for i in range(N):
        body = json.dumps({"hunter": f"h{i % 7}", "id": i}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/hunt", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            statuses.append(resp.status)
    bad = urllib.request.Request(f"http://127.0.0.1:{port}/hunt", data=b"not json", method="POST")
    try:
        urllib.request.urlopen(bad, timeout=10)
    except urllib.error.HTTPError as e:
        statuses.append(e.code)
    return statuses


def assert_in_stream(endpoint_url: str, stream: str) -> None:
    records = read_all(endpoint_url, stream)
    ids = sorted(json.loads(r["data"])["id"] for r in records)
    assert ids == list(range(N))


def test_aiohttp_example(moto_server: MotoServer, engine_toml: str) -> None:
    from examples.aiohttp_app import make_app

    port = free_port()
    result: dict[str, Any] = {}

    async def serve() -> None:
        runner = web.AppRunner(make_app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        result["statuses"] = await asyncio.to_thread(post_events, port)
        await runner.cleanup()  # the engine flushes here

    asyncio.run(serve())
    assert result["statuses"] == [202] * N + [400]
    assert_in_stream(moto_server.endpoint_url, engine_toml)


def test_fastapi_example(moto_server: MotoServer, engine_toml: str) -> None:
    import uvicorn
    from examples.fastapi_app import app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        statuses = post_events(port)
    finally:
        server.should_exit = True
        thread.join(30)
    assert statuses == [202] * N + [400]
    assert_in_stream(moto_server.endpoint_url, engine_toml)


def test_flask_example(moto_server: MotoServer, engine_toml: str) -> None:
    from examples.flask_app import create_app
    from werkzeug.serving import make_server

    app = create_app()
    engine = app.extensions["treasure_engine"]
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        statuses = post_events(port)
    finally:
        server.shutdown()
        thread.join(10)
        started = time.monotonic()
        engine.stop()
    assert time.monotonic() - started < 30
    assert statuses == [202] * N + [400]
    assert_in_stream(moto_server.endpoint_url, engine_toml)
