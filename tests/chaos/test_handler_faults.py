"""Chaos cases 3 and 4: what the consumer's handler meets downstream.

3. The downstream (a real HTTP server on 127.0.0.1, scripted) fails every call for 60 s, then answers in 2 s for
   30 s, while a producer keeps feeding the stream. The consumer's breaker pauses reading instead of
   dead-lettering: nothing lost, nothing dead-lettered, order per key kept.
4. Poison records, 1 in 10,000, that the handler can never process: each is isolated by bisecting its batch and
   dead-lettered alone; every other event is handled, in order per key.

Short versions in CI; ``TREASURE_CHAOS=full`` (``make chaos``) runs the issue's durations and sizes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.support.chaos import (
    POISON,
    Feeder,
    Outcome,
    Rig,
    assert_no_loss,
    caught_up,
    event,
    producer_config,
    short_or_full,
)
from tests.support.scripted_downstream import ScriptedDownstream

from treasure_engine import Producer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BREAKER = {"window_size": 10, "minimum_calls": 4, "failure_rate": 0.5, "open_s": 0.5, "half_open_calls": 1}


async def test_case03_downstream_failing_then_slow(
    chaos_rig: Callable[..., Rig], downstream_dir: Path, chaos_outcome: Callable[[Outcome], Outcome]
) -> None:
    fail_s = short_or_full(5.0, 60.0)
    slow_s = short_or_full(4.0, 30.0)
    rate = 300.0
    with ScriptedDownstream(downstream_dir / "accepted.out") as downstream:
        rig = chaos_rig(shards=2, downstream=downstream.url, batch_size=100, max_attempts=3, breaker=BREAKER)
        config = producer_config(rig.stream, rig.kinesis, rig.producer_state())
        async with Producer(config) as producer:
            feeder = Feeder(producer)
            await feeder.run(rate, duration_s=1.0)
            downstream.set("fail", status=503)
            await feeder.run(rate, duration_s=fail_s)
            downstream.set("slow", delay_s=2.0)
            await feeder.run(rate, duration_s=slow_s)
            downstream.set("ok")
            ok_at = time.monotonic()
            before = list(feeder.accepted)
            await feeder.run(rate, duration_s=1.0)
            await producer.flush(timeout=60)
        await caught_up(rig.ledger, before, 120, dead=rig.dead)
        recover_s = time.monotonic() - ok_at
        await caught_up(rig.ledger, feeder.accepted, 60, dead=rig.dead)
        calls = downstream.stats()
    notes = (
        f"{fail_s:.0f} s of 503 ({calls.get('fail', 0)} calls reached it), then "
        f"{slow_s:.0f} s of 2 s answers ({calls.get('slow', 0)} calls)"
    )
    outcome = chaos_outcome(
        rig.check("3 downstream failing, then slow", feeder.accepted, recover_s=recover_s, notes=notes)
    )
    assert calls.get("fail", 0) > 0
    assert calls.get("slow", 0) > 0
    assert_no_loss(outcome, rig.ledger, feeder.accepted)
    assert outcome.dead_lettered == 0, "the outage was dead-lettered instead of paused"


async def test_case04_poison_records(
    chaos_rig: Callable[..., Rig], chaos_outcome: Callable[[Outcome], Outcome]
) -> None:
    every = 10_000
    n = int(short_or_full(30_000, 300_000))
    rig = chaos_rig(shards=4, consumers=2, poison=True, batch_size=100, max_attempts=2)
    config = producer_config(rig.stream, rig.kinesis, rig.producer_state())
    poison = {i for i in range(n) if POISON in event(i, 101, poison_every=every)[0]}
    async with Producer(config) as producer:
        feeder = Feeder(producer, poison_every=every)
        started = time.monotonic()
        await feeder.run(10_000.0, count=n)
        await producer.flush(timeout=60)
    # Recovery: from the last event's submission until every event was handled or dead-lettered.
    await caught_up(rig.ledger, feeder.accepted, 120, dead=rig.dead)
    recover_s = time.monotonic() - started - n / 10_000.0
    notes = f"1 in {every:,}: {len(poison)} poison records"
    outcome = chaos_outcome(rig.check("4 poison records", feeder.accepted, recover_s=max(recover_s, 0.0), notes=notes))
    assert_no_loss(outcome, rig.ledger, feeder.accepted)
    assert rig.dead() == poison, "exactly the poison records are dead-lettered"
    await asyncio.sleep(0)
