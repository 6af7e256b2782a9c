"""Group "memory": peak RSS of a producer whose endpoint has stalled (the ring must bound it).

Each case runs bench/memory_child.py in its own process, so the peak RSS (``ru_maxrss``) is the producer's
and not this test runner's. The endpoint is ``StalledKinesis`` below, in this process on 127.0.0.1: it
answers ListShards (4 open shards) and accepts every PutRecords connection without ever answering.

Cases:

- ``baseline``: the child imports treasure_engine, starts the same producer and closes it;
- ``stalled-10M``: the child also offers 10,000,000 100-byte events with ``submit_many`` as fast as it can
  (refusals expected once the 64 MiB ring is full, and counted), tops the ring up after a settle, then reads
  its peak RSS.

Target (from the issue; checked by bench/run.py, not asserted here): peak RSS < ring size + 64 MiB.
The time the benchmark records is the child's whole run; the figures are in ``extra_info``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_benchmark.fixture import BenchmarkFixture

from conftest import RING_BYTES, STREAM, MiB, shard_list

CHILD = Path(__file__).resolve().parent / "memory_child.py"
EVENTS = 10_000_000
CASES = ["baseline", "stalled-10M"]
AMZ_JSON = "application/x-amz-json-1.1"


class StalledKinesis:
    """A Kinesis endpoint in a thread: ListShards answers, PutRecords (and anything else) never does."""

    def __init__(self, shards: int = 4) -> None:
        self.shards = shard_list(shards)
        self.put_records_held = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stalled-kinesis", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _list_shards(self) -> bytes:
        return json.dumps(
            {
                "Shards": [
                    {
                        "ShardId": sid,
                        "HashKeyRange": {"StartingHashKey": str(lo), "EndingHashKey": str(hi)},
                        "SequenceNumberRange": {"StartingSequenceNumber": "0"},
                    }
                    for sid, lo, hi in self.shards
                ]
            }
        ).encode()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = request.headers.get("X-Amz-Target", "")
        if target.endswith(".ListShards"):
            await request.read()
            return web.Response(body=self._list_shards(), headers={"Content-Type": AMZ_JSON})
        # Stalled: the body is never read and no answer comes, until the server stops.
        self.put_records_held += 1
        assert self._release is not None
        await self._release.wait()
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=503)

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def _stop(self) -> None:
        assert self._release is not None
        assert self._runner is not None
        self._release.set()
        await self._runner.cleanup()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._stop())
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def start(self) -> StalledKinesis:
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError("stalled endpoint did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def stalled_endpoint() -> Iterator[StalledKinesis]:
    server = StalledKinesis().start()
    try:
        yield server
    finally:
        server.stop()


def run_child(endpoint_url: str, env: dict[str, str], *, baseline: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(CHILD), "--endpoint", endpoint_url, "--stream", STREAM]
    cmd += ["--ring-mib", str(RING_BYTES // MiB), "--events", str(EVENTS)]
    if baseline:
        cmd.append("--baseline")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{CHILD.name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.bench
@pytest.mark.parametrize("case", CASES)
def test_memory(
    benchmark: BenchmarkFixture, case: str, stalled_endpoint: StalledKinesis, child_env: dict[str, str]
) -> None:
    benchmark.group = "memory"
    results: list[dict[str, Any]] = []

    def run() -> None:
        results.append(run_child(stalled_endpoint.endpoint_url, child_env, baseline=case == "baseline"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    (result,) = results
    if case != "baseline":
        assert result["offered"] == EVENTS
        assert result["accepted"] > 0
        assert result["refused"] > 0, "the ring never filled: the endpoint did not stall"
        # Closing with the endpoint stalled dead-letters what could not be delivered: nothing is lost.
        closed = result["after_close"]
        assert closed["in_flight"] == 0, closed
        assert closed["accepted"] == closed["delivered"] + closed["dead_lettered"], closed
    benchmark.extra_info.update(case=case, target_rss=RING_BYTES + 64 * MiB, **result)
