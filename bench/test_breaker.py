"""Groups "breaker" and "breaker_async": what guarding one successful call with a circuit breaker costs.

Each peer's round makes 10,000 calls of a trivial function (``def f(x): return x``, or ``async def`` awaited
from one coroutine, so no round trip through the event loop). One benchmark round runs a round of every peer,
in a rotating order, so all peers meet the same noise; a breaker's overhead is the median, over rounds, of its
per-call time minus the bare call's in the same round.

Peers, sync ("breaker"): the bare call; ``@breaker`` (treasure_engine, a Rust ``GuardedFunction``);
``with breaker:`` (treasure_engine); ``pybreaker`` (``@CircuitBreaker()``); ``circuitbreaker``
(``@circuit``); ``purgatory`` (``SyncCircuitBreakerFactory``).
Peers, async ("breaker_async"): the bare await; ``@breaker`` on an ``async def`` (treasure_engine);
``async with breaker:`` (treasure_engine); ``aiobreaker``; ``circuitbreaker``; ``purgatory``
(``AsyncCircuitBreakerFactory``).

Targets (from issue 4; checked by bench/run.py, not asserted here): ``@breaker`` overhead <= 150 ns (sync) and
<= 300 ns (async), and at least 10x less overhead than the fastest peer library of the same group.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable, Callable

import aiobreaker
import circuitbreaker
import purgatory
import pybreaker
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from conftest import interleaved_rounds
from treasure_engine import BreakerConfig, CircuitBreaker

CALLS = 10_000
ROUNDS = 100

BARE = "bare call"
OURS = "treasure_engine @breaker"
OURS_WITH = "treasure_engine with"
SYNC_PEERS = [BARE, OURS, OURS_WITH, "pybreaker", "circuitbreaker", "purgatory"]

ABARE = "bare await"
AOURS = "treasure_engine @breaker (async)"
AOURS_WITH = "treasure_engine async with"
ASYNC_PEERS = [ABARE, AOURS, AOURS_WITH, "aiobreaker", "circuitbreaker", "purgatory"]

# Failures are never seen here; the configuration only has to be valid and keep the breaker closed.
CONFIG = BreakerConfig(window_size=100, minimum_calls=100)


def ident(x: int) -> int:
    return x


async def aident(x: int) -> int:
    return x


def sync_guarded(peer: str) -> Callable[[], None]:
    if peer == OURS_WITH:
        breaker = CircuitBreaker("bench-with", CONFIG)

        def run_with() -> None:
            for i in range(CALLS):
                with breaker:
                    ident(i)

        return run_with
    fn: Callable[[int], int]
    if peer == BARE:
        fn = ident
    elif peer == OURS:
        fn = CircuitBreaker("bench", CONFIG)(ident)
    elif peer == "pybreaker":
        fn = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)(ident)
    elif peer == "circuitbreaker":
        fn = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60)(ident)
    else:
        fn = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)("bench")(ident)

    def run() -> None:
        for i in range(CALLS):
            fn(i)

    return run


def async_guarded(peer: str) -> Callable[[], Awaitable[None]]:
    if peer == AOURS_WITH:
        breaker = CircuitBreaker("bench-async-with", CONFIG)

        async def run_with() -> None:
            for i in range(CALLS):
                async with breaker:
                    await aident(i)

        return run_with
    fn: Callable[[int], Awaitable[int]]
    if peer == ABARE:
        fn = aident
    elif peer == AOURS:
        fn = CircuitBreaker("bench-async", CONFIG)(aident)
    elif peer == "aiobreaker":
        fn = aiobreaker.CircuitBreaker(fail_max=5)(aident)
    elif peer == "circuitbreaker":
        fn = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60)(aident)
    else:
        fn = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)("bench")(aident)

    async def run() -> None:
        for i in range(CALLS):
            await fn(i)

    return run


def interleaved(
    benchmark: BenchmarkFixture, peers: list[str], bare: str, rounds: dict[str, Callable[[], None]]
) -> None:
    """Reports each peer's per-call median and min and its overhead over the bare call *of the same round*
    (median of the paired differences), every peer measured side by side (conftest ``interleaved_rounds``)."""
    per_call = interleaved_rounds(benchmark, rounds, rounds=ROUNDS, warmup_rounds=3, per_round=CALLS)
    results: dict[str, dict[str, float]] = {}
    for peer in peers:
        mine = per_call[peer]
        paired = [a - b for a, b in zip(mine, per_call[bare], strict=True)]
        results[peer] = {
            "per_call_ns_median": statistics.median(mine),
            "per_call_ns_min": min(mine),
            "overhead_ns_paired_median": statistics.median(paired),
        }
    benchmark.extra_info.update(interleaved=True, calls_per_round=CALLS, rounds=ROUNDS, peers=results)


@pytest.mark.bench
def test_breaker(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "breaker"
    interleaved(benchmark, SYNC_PEERS, BARE, {p: sync_guarded(p) for p in SYNC_PEERS})


@pytest.mark.bench
def test_breaker_async(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "breaker_async"
    loop = asyncio.new_event_loop()
    try:
        # The loop is entered once per round; the 10,000 awaits inside it are what the round measures.
        def entered(make: Callable[[], Awaitable[None]]) -> Callable[[], None]:
            return lambda: loop.run_until_complete(make())  # type: ignore[arg-type]

        interleaved(benchmark, ASYNC_PEERS, ABARE, {p: entered(async_guarded(p)) for p in ASYNC_PEERS})
    finally:
        loop.close()
