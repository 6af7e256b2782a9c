"""Downstream against real aiohttp servers on 127.0.0.1: adaptive limit vs a fixed one, retries, typed errors.

Run with `-s` to see the figures of the adaptive-vs-fixed comparison.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType

import pytest
import pytest_asyncio
from aiohttp import web
from tests.support.latency_server import LatencyServer

from treasure_engine import TreasureEngineError
from treasure_engine.downstream import (
    Downstream,
    DownstreamClosed,
    DownstreamConfig,
    DownstreamOverloaded,
    DownstreamTimeout,
    DownstreamUnavailable,
)

pytestmark = pytest.mark.integration

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Starts aiohttp servers in the test's loop on free ports of 127.0.0.1: `url = await serve(handler)`."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    for _ in itertools.count():
        if predicate():
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# --- (a) the adaptive limit against a service that slows down with concurrency -----------------------------------

KNEE = 16
BASE_MS = 20.0
PENALTY_MS = 4.0
CALLERS = 96


@pytest.fixture(scope="module")
def knee_server() -> Iterator[LatencyServer]:
    with LatencyServer(base_ms=BASE_MS, knee=KNEE, penalty_ms=PENALTY_MS) as server:
        yield server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Run:
    name: str
    calls: int = 0
    rejected: int = 0
    caller_latencies: list[float] = field(default_factory=list)
    service_latencies: list[float] = field(default_factory=list)
    limits: list[int] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def steady_limits(self) -> list[int]:
        return self.limits[len(self.limits) // 2 :]

    def caller_p(self, q: float) -> float:
        return percentile(self.caller_latencies, q)

    @property
    def p50_s(self) -> float:
        return percentile(self.service_latencies, 0.5)

    @property
    def p99_s(self) -> float:
        return percentile(self.service_latencies, 0.99)

    def line(self) -> str:
        lim = self.steady_limits
        return (
            f"{self.name:>8}: limit median {statistics.median(lim):5.1f} (range {min(lim)}-{max(lim)}), "
            f"service p50 {self.p50_s * 1e3:6.1f} ms p99 {self.p99_s * 1e3:6.1f} ms, "
            f"caller p50 {self.caller_p(0.5) * 1e3:6.1f} ms p99 {self.caller_p(0.99) * 1e3:6.1f} ms, "
            f"{self.calls / self.duration_s:6.0f} calls/s, {self.rejected} rejected"
        )


async def drive(url: str, config: DownstreamConfig, name: str, duration_s: float) -> Run:
    """CALLERS concurrent callers call in a loop for `duration_s`; the second half is the steady state."""
    run = Run(name)
    async with Downstream(url, config) as downstream:
        t0 = time.monotonic()
        steady_from, stop = t0 + duration_s / 2, t0 + duration_s

        async def caller() -> None:
            while (now := time.monotonic()) < stop:
                try:
                    response = await downstream.get("/work")
                except DownstreamOverloaded:
                    run.rejected += 1
                    await asyncio.sleep(0.01)
                    continue
                assert response.status == 200
                run.calls += 1
                if now >= steady_from:
                    run.caller_latencies.append(response.elapsed_s)
                    run.service_latencies.append(response.attempt_s)

        async def sample_limit() -> None:
            while time.monotonic() < stop:
                run.limits.append(downstream.limit)
                await asyncio.sleep(0.05)

        await asyncio.gather(sample_limit(), *(caller() for _ in range(CALLERS)))
        run.duration_s = time.monotonic() - t0
        metrics = downstream.metrics
        assert metrics.in_flight == 0
        assert metrics.p99_s is not None
    return run


async def test_adaptive_limit_settles_near_the_knee_and_bounds_p99(knee_server: LatencyServer) -> None:
    adaptive = await drive(
        knee_server.url,
        DownstreamConfig(window_s=0.2, probe_interval_s=1.5, max_queue=CALLERS, queue_timeout_s=2.0),
        "adaptive",
        5.0,
    )
    fixed = await drive(
        knee_server.url,
        DownstreamConfig(limiter="fixed", initial_limit=CALLERS, max_limit=CALLERS, queue_timeout_s=2.0),
        "fixed",
        3.0,
    )
    no_load = BASE_MS / 1e3
    print(
        f"\nserver: {BASE_MS:.0f} ms + {PENALTY_MS:.0f} ms per concurrent request beyond {KNEE}; {CALLERS} callers"
        f"\n{adaptive.line()}\n{fixed.line()}"
        f"\nservice p99 fixed/adaptive: {fixed.p99_s / adaptive.p99_s:.1f}x"
    )
    median_limit = statistics.median(adaptive.steady_limits)
    # Equilibrium of the gradient rule with rtt_tolerance 1.5 on this server is about 22 (docs/downstream.md).
    assert 0.75 * KNEE <= median_limit <= 1.75 * KNEE
    # Bounded: the service latency stays within a few times the no-load latency ...
    assert adaptive.p99_s < 5 * no_load
    # ... while the fixed client's is its 96 calls' worth of penalty: 20 + 4 * 80 = 340 ms.
    assert fixed.p99_s > 8 * no_load
    assert fixed.p99_s > 3 * adaptive.p99_s
    # Shedding concurrency does not cost throughput: the service does more at its knee than past it.
    assert adaptive.calls / adaptive.duration_s > fixed.calls / fixed.duration_s
    assert adaptive.caller_p(0.99) < fixed.caller_p(0.99)
    assert adaptive.rejected == fixed.rejected == 0


# --- (b) retries within the budget ---------------------------------------------------------------------------------


class FlakyServer:
    """Answers 503 to every `fail_every`-th request (1 = all), 200 otherwise; counts requests."""

    def __init__(self, fail_every: int) -> None:
        self.fail_every = fail_every
        self.requests = 0
        self.failed = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.requests % self.fail_every == 0:
            self.failed += 1
            return web.Response(status=503, text="busy")
        return web.Response(text="ok")


async def test_retries_stay_within_the_budget(serve: Callable[[Handler], Awaitable[str]]) -> None:
    server = FlakyServer(fail_every=3)
    url = await serve(server.handle)
    config = DownstreamConfig(retry_ratio=0.1, max_attempts=3, backoff_base_s=0.0, backoff_max_s=0.0)
    attempts_seen: list[int] = []
    async with Downstream(url, config) as downstream:
        for _ in range(300):
            response = await downstream.get("/x")
            attempts_seen.append(response.attempts)
        m = downstream.metrics
    retried_to_success = sum(1 for a in attempts_seen if a > 1)
    print(f"\n300 calls, a third of requests 503: {m.retries} retries, {m.retries_denied} denied, {m.failures} failed")
    assert m.calls == 300
    assert server.requests == m.calls + m.retries == m.attempts
    # About 100 calls fail their first attempt; the budget allows 300 * 0.1 = 30 retries of them.
    assert m.retries <= 0.1 * m.calls
    assert m.retries >= 0.1 * m.calls - 1
    assert m.retries_denied > 0
    assert retried_to_success > 0
    assert m.failures == sum(1 for a in attempts_seen if a >= 1) - m.succeeded


async def test_retries_never_exceed_the_ratio_when_everything_fails(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    server = FlakyServer(fail_every=1)
    url = await serve(server.handle)
    config = DownstreamConfig(retry_ratio=0.2, max_attempts=5, backoff_base_s=0.0, backoff_max_s=0.0)
    async with Downstream(url, config) as downstream:
        statuses = [(await downstream.get("/x")).status for _ in range(200)]
        m = downstream.metrics
    assert statuses == [503] * 200
    assert m.failures == 200
    assert m.retries <= 0.2 * 200
    assert server.requests == 200 + m.retries
    assert server.requests <= 1.2 * 200


async def test_post_is_not_retried_by_default(serve: Callable[[Handler], Awaitable[str]]) -> None:
    server = FlakyServer(fail_every=1)
    url = await serve(server.handle)
    async with Downstream(url, DownstreamConfig(retry_ratio=1.0, backoff_base_s=0.0, backoff_max_s=0.0)) as d:
        for _ in range(5):
            assert (await d.get("/x")).status == 503
        gets = server.requests
        assert gets > 5  # GETs were retried
        response = await d.post("/x", json={"a": 1})
    assert response.status == 503
    assert response.attempts == 1
    assert server.requests == gets + 1


class RefusingBreaker:
    """A stand-in for `treasure_engine.CircuitBreaker`: records outcomes, refuses while `open`."""

    class Open(TreasureEngineError):
        pass

    def __init__(self) -> None:
        self.open = False
        self.outcomes: list[type[BaseException] | None] = []

    async def __aenter__(self) -> None:
        if self.open:
            raise self.Open("open")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.outcomes.append(exc_type)


async def test_breaker_records_failures_and_its_refusals_are_never_retried(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    server = FlakyServer(fail_every=2)
    url = await serve(server.handle)
    breaker = RefusingBreaker()
    config = DownstreamConfig(retry_ratio=1.0, retry_budget_max=100.0, backoff_base_s=0.0, backoff_max_s=0.0)
    async with Downstream(url, config, breaker=breaker) as downstream:
        first = await downstream.get("/x")  # 200
        second = await downstream.get("/x")  # 503, retried: 200
        assert (first.status, first.attempts) == (200, 1)
        assert (second.status, second.attempts) == (200, 2)
        assert breaker.outcomes[0] is None
        assert breaker.outcomes[1] is not None  # the 503 was recorded as a failure
        assert breaker.outcomes[2] is None
        breaker.open = True
        before = server.requests, downstream.metrics.retries
        with pytest.raises(RefusingBreaker.Open):
            await downstream.get("/x")
        assert (server.requests, downstream.metrics.retries) == before
        assert downstream.metrics.breaker_refusals == 1
        assert downstream.in_flight == 0


async def test_limiter_refuses_beyond_limit_and_queue(serve: Callable[[Handler], Awaitable[str]]) -> None:
    release = asyncio.Event()
    requests = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        await release.wait()
        return web.Response(text="ok")

    url = await serve(slow)
    config = DownstreamConfig(limiter="fixed", initial_limit=2, max_limit=2, max_queue=1, queue_timeout_s=5.0)
    async with Downstream(url, config) as downstream:
        held = [asyncio.create_task(downstream.get("/x")) for _ in range(3)]  # 2 in flight, 1 queued
        await eventually(lambda: requests == 2 and downstream.metrics.queued == 1)
        t0 = time.monotonic()
        with pytest.raises(DownstreamOverloaded):
            await downstream.get("/x")
        assert time.monotonic() - t0 < 0.1  # refused at once, not after queue_timeout_s
        m = downstream.metrics
        assert (m.in_flight, m.queued, m.rejected, requests) == (2, 1, 1, 2)
        release.set()
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200, 200]
        assert requests == 3
        assert downstream.metrics.retries == 0

    zero_wait = DownstreamConfig(limiter="fixed", initial_limit=1, max_limit=1, queue_timeout_s=0.0)
    release.clear()
    async with Downstream(url, zero_wait) as downstream:
        task = asyncio.create_task(downstream.get("/x"))
        await eventually(lambda: requests == 4)
        with pytest.raises(DownstreamOverloaded):
            await downstream.get("/x")
        release.set()
        assert (await task).status == 200


async def test_with_treasure_engine_circuit_breaker(serve: Callable[[Handler], Awaitable[str]]) -> None:
    """The real breaker: 503s open it, then calls are refused fast, nothing reaches the server, nothing is retried."""
    from treasure_engine import BreakerConfig, BreakerState, CircuitBreaker, CircuitOpen

    server = FlakyServer(fail_every=1)
    url = await serve(server.handle)
    breaker = CircuitBreaker(
        "downstream-test", BreakerConfig(window_size=10, minimum_calls=5, failure_rate=0.5, open_s=60.0)
    )
    config = DownstreamConfig(retry_ratio=1.0, max_attempts=2, backoff_base_s=0.0, backoff_max_s=0.0)
    async with Downstream(url, config, breaker=breaker) as downstream:
        # Calls 1 and 2: a 503 each, and a retry that gets another 503 (four failures) ...
        assert [(await downstream.get("/x")).status for _ in range(2)] == [503, 503]
        assert breaker.state is BreakerState.CLOSED
        # ... call 3: the fifth failure opens the breaker, which refuses the retry.
        with pytest.raises(CircuitOpen):
            await downstream.get("/x")
        assert breaker.state is BreakerState.OPEN
        assert server.requests == 5
        before = server.requests, downstream.metrics.retries
        for _ in range(20):
            t0 = time.monotonic()
            with pytest.raises(CircuitOpen):
                await downstream.get("/x")
            assert time.monotonic() - t0 < 0.05
        assert (server.requests, downstream.metrics.retries) == before
        assert downstream.metrics.breaker_refusals >= 20
        assert downstream.in_flight == 0


# --- (c) typed errors and lifecycle --------------------------------------------------------------------------------


async def test_timeout_is_typed_and_bounded(serve: Callable[[Handler], Awaitable[str]]) -> None:
    done = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await done.wait()
        return web.Response(text="late")

    url = await serve(hang)
    async with Downstream(url, DownstreamConfig(timeout_s=0.2)) as downstream:
        t0 = time.monotonic()
        with pytest.raises(DownstreamTimeout) as info:
            await downstream.get("/x")
        elapsed = time.monotonic() - t0
        with pytest.raises(TimeoutError):
            await downstream.get("/x", timeout=0.05)
        m = downstream.metrics
    done.set()
    assert isinstance(info.value, TreasureEngineError)
    assert 0.15 < elapsed < 1.0
    assert m.timeouts >= 2
    assert m.failures == 2


async def test_connection_refused_is_typed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now.
    async with Downstream(f"http://127.0.0.1:{port}", DownstreamConfig(timeout_s=2.0)) as downstream:
        with pytest.raises(DownstreamUnavailable) as info:
            await downstream.get("/x")
        assert downstream.metrics.failures == 1
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value, TreasureEngineError)


async def test_lifecycle(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "body": await request.text()})

    url = await serve(ok)
    downstream = Downstream(url + "/", DownstreamConfig())
    with pytest.raises(DownstreamClosed):
        await downstream.get("/x")
    await downstream.start()
    await downstream.start()  # idempotent
    response = await downstream.post("/a/b", json={"k": 1})
    assert response.ok
    assert response.json() == {"path": "/a/b", "body": '{"k":1}'}
    with pytest.raises(ValueError, match="path"):
        await downstream.get("no-slash")
    await downstream.close()
    await downstream.close()  # idempotent
    with pytest.raises(DownstreamClosed):
        await downstream.get("/x")
    with pytest.raises(DownstreamClosed):
        await downstream.start()
