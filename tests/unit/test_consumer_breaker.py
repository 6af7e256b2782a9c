"""The consumer's own downstream breaker around one handler call: a permit taken is always given back."""

from __future__ import annotations

import asyncio

import pytest

from treasure_engine import BreakerConfig, BreakerState, CircuitBreaker, CircuitOpen, ConsumerConfig
from treasure_engine._core import Record
from treasure_engine.consumer._context import ShardContext
from treasure_engine.consumer._leases import Lease
from treasure_engine.consumer._types import ShardStats
from treasure_engine.consumer._worker import ShardWorker
from treasure_engine.dlq import DeadLetter

SHARD = "shardId-000000000000"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def half_open_worker(handle: object, clock: Clock) -> tuple[ShardWorker, CircuitBreaker]:
    """A shard worker whose consumer owns a half-open breaker with one trial call (on a scripted clock)."""

    config = ConsumerConfig(stream="s", application="app-permit", breaker=BreakerConfig())
    breaker = CircuitBreaker(
        "downstream", BreakerConfig(window_size=10, minimum_calls=4, open_s=10.0, half_open_calls=1), clock=clock
    )
    for _ in range(4):
        with pytest.raises(ValueError, match="down"), breaker:
            raise ValueError("down")
    clock.t += 10.0
    assert breaker.state is BreakerState.OPEN

    def letter(*_args: object, **_kwargs: object) -> DeadLetter:
        raise AssertionError("no record is dead-lettered here")

    async def dead_letter(letters: list[DeadLetter]) -> None:
        raise AssertionError("no record is dead-lettered here")

    shared = ShardContext(
        config=config,
        handle=handle,  # type: ignore[arg-type]
        observe=lambda _started, _batch: None,
        letter=letter,
        dead_letter=dead_letter,
        breaker=breaker,
        owns_breaker=True,  # the consumer's own: each handler call takes a permit
    )
    lease = Lease(shard_id=SHARD, owner="me", counter=1, checkpoint="TRIM_HORIZON")
    return ShardWorker(shared, lease, ShardStats(SHARD)), breaker


async def test_a_cancelled_handler_call_gives_its_half_open_permit_back() -> None:
    clock = Clock()
    started = asyncio.Event()
    calls = 0

    async def handle(records: list[Record]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await asyncio.sleep(60)  # hangs until cancelled (a stop, a lost lease, a timeout)

    worker, breaker = half_open_worker(handle, clock)
    record = Record(b"x", "k", "1", SHARD)
    task = asyncio.create_task(worker._call([record]))
    await started.wait()
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker._release(breaker._acquire())  # the only trial permit is the handler's
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The next call is permitted at once (not paused on a trial that will never report) and closes the breaker.
    assert await asyncio.wait_for(worker._call([record]), 5) == ("ok", set(), None)
    assert calls == 2
    assert breaker.state is BreakerState.CLOSED
    assert not worker.stats.paused
