"""A breaker in front of a real aiohttp server on 127.0.0.1 that fails for a scripted window: it opens within the
window, refuses fast while open (no request reaches the server), probes half-open and closes after recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from treasure_engine import BreakerConfig, BreakerState, CircuitBreaker, CircuitOpen

pytestmark = pytest.mark.integration


@dataclass
class Flaky:
    """The server: answers 503 while `failing`, and counts every request it receives."""

    url: str = ""
    failing: bool = False
    requests: int = 0


@pytest_asyncio.fixture
async def flaky() -> AsyncIterator[Flaky]:
    state = Flaky()

    async def handle(_: web.Request) -> web.Response:
        state.requests += 1
        return web.Response(status=503 if state.failing else 200, text="down" if state.failing else "ok")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/"
    try:
        yield state
    finally:
        await runner.cleanup()


class Unavailable(Exception):
    pass


async def test_breaker_opens_refuses_fast_and_closes_after_recovery(flaky: Flaky) -> None:
    breaker = CircuitBreaker(
        "flaky",
        BreakerConfig(window_size=10, minimum_calls=5, failure_rate=0.5, open_s=0.5, half_open_calls=3),
    )
    transitions: list[tuple[BreakerState, BreakerState]] = []
    breaker.on_transition(lambda _name, old, new: transitions.append((old, new)))

    async with aiohttp.ClientSession() as session:

        @breaker
        async def get() -> str:
            async with session.get(flaky.url) as resp:
                if resp.status >= 500:
                    raise Unavailable(resp.status)
                return await resp.text()

        for _ in range(20):
            assert await get() == "ok"
        assert breaker.state is BreakerState.CLOSED

        # The failure window starts: the breaker must open within it, after a handful of failed calls.
        flaky.failing = True
        failed_calls = 0
        while breaker.state is BreakerState.CLOSED:
            with pytest.raises(Unavailable):
                await get()
            failed_calls += 1
            assert failed_calls <= 10, "the breaker did not open within the failure window"
        assert breaker.state is BreakerState.OPEN
        # 20 successes then failures: the last 10 calls reach 50% failed after 5 failures
        assert failed_calls == 5

        # Open: refused fast, and nothing reaches the server.
        seen = flaky.requests
        t0 = time.perf_counter()
        refused = 0
        for _ in range(200):
            with pytest.raises(CircuitOpen) as info:
                await get()
            refused += 1
        per_call = (time.perf_counter() - t0) / refused
        assert flaky.requests == seen
        assert info.value.name == "flaky"
        assert 0 < info.value.remaining_s <= 0.5
        assert per_call < 200e-6, f"refusal took {per_call * 1e6:.1f} us"

        # Still failing at the first probe: the trial calls re-open it.
        await asyncio.sleep(0.55)
        for _ in range(3):
            with pytest.raises(Unavailable):
                await get()
        assert breaker.state is BreakerState.OPEN
        assert flaky.requests == seen + 3

        # The server recovers; the next probe closes the breaker and traffic flows again.
        flaky.failing = False
        await asyncio.sleep(0.55)
        results = await asyncio.gather(*(get() for _ in range(3)))
        assert results == ["ok"] * 3
        assert breaker.state is BreakerState.CLOSED
        for _ in range(20):
            assert await get() == "ok"

    assert transitions == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    m = breaker.metrics()
    assert m.not_permitted == 200
    assert (m.calls, m.failed) == (10, 0)
