"""Chaos cases 1, 2 and 9 (responses): the Kinesis endpoint misbehaves under a producer at full rate.

The producer (ordered, the default shard limits) sends through the fault proxy in front of kinesalite; one
consumer process reads the stream and records what it handled; the checker counts (tests.support.chaos). Short
versions in CI; ``TREASURE_CHAOS=full`` (``make chaos``) runs the issue's durations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from tests.support.chaos import Feeder, Outcome, Rig, assert_no_loss, caught_up, producer_config, short_or_full
from tests.support.faultproxy import BODY_FAULTS, ThreadedFaultProxy

from treasure_engine import Producer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024


async def fault_window(
    rig: Rig,
    producer: Producer,
    feeder: Feeder,
    *,
    rate: float,
    before_s: float,
    fault_s: float,
    after_s: float,
    start: Callable[[], None],
    end: Callable[[], None],
) -> tuple[float, float]:
    """Feeds at `rate` before, during and after a fault; returns the time to recover (from the fault's end until
    every event accepted before it was handled, or dead-lettered by the producer) and the producer's delivery
    rate during the fault (events/s)."""
    await feeder.run(rate, duration_s=before_s)
    start()
    delivered = producer.stats().delivered
    await feeder.run(rate, duration_s=fault_s)
    end()
    rate_during = (producer.stats().delivered - delivered) / fault_s
    before = list(feeder.accepted)
    recovering = asyncio.create_task(caught_up(rig.ledger, before, 60 + fault_s, dead=rig.dead))
    await feeder.run(rate, duration_s=after_s)
    await producer.flush(timeout=60 + fault_s)
    return await recovering, rate_during


async def test_case01_throttling_storm(
    chaos_rig: Callable[..., Rig], fault_proxy: ThreadedFaultProxy, chaos_outcome: Callable[[Outcome], Outcome]
) -> None:
    """Half of the records of every PutRecords throttled (and really withheld) for 60 s (6 s short) at full rate:
    one Kinesis record per event (no aggregation) at 75 % of the four shards' 1,000 records/s."""
    storm_s = short_or_full(6.0, 60.0)
    rate = 3_000.0
    rig = chaos_rig(shards=4)
    config = producer_config(rig.stream, fault_proxy.endpoint_url, rig.producer_state(), aggregate=False)
    async with Producer(config) as producer:
        feeder = Feeder(producer)
        recover_s, rate_during = await fault_window(
            rig, producer, feeder, rate=rate, before_s=1.0, fault_s=storm_s, after_s=1.0,
            start=lambda: fault_proxy.set(fail_fraction=0.5), end=lambda: fault_proxy.set(fail_fraction=0.0),
        )  # fmt: skip
        stats = producer.stats()
    withheld = fault_proxy.snapshot()["records_withheld"]
    await caught_up(rig.ledger, feeder.accepted, 60, dead=rig.dead)
    notes = (
        f"{storm_s:.0f} s at 50 %: {withheld:,} Kinesis records withheld; "
        f"{rate:,.0f} events/s submitted, {rate_during:,.0f}/s delivered meanwhile"
    )
    outcome = chaos_outcome(rig.check("1 throttling storm", feeder.accepted, recover_s=recover_s, notes=notes))
    assert withheld > 0
    assert stats.throttled > 0
    assert stats.in_flight == 0
    assert_no_loss(outcome, rig.ledger, feeder.accepted)
    assert outcome.dead_lettered == stats.dead_lettered


async def test_case02_endpoint_down_mid_burst_with_spill(
    chaos_rig: Callable[..., Rig], fault_proxy: ThreadedFaultProxy, chaos_outcome: Callable[[Outcome], Outcome]
) -> None:
    """The endpoint drops every connection for 30 s (4 s short) in the middle of a burst; a 1 MiB ring spills to
    disk meanwhile, and everything is delivered once it is back."""
    down_s = short_or_full(4.0, 30.0)
    rate = 4_000.0
    rig = chaos_rig(shards=2)
    config = producer_config(
        rig.stream, fault_proxy.endpoint_url, rig.producer_state(), overflow="spill", ring_bytes=1 * MiB,
        max_buffered_bytes=1 * MiB, max_request_bytes=256 * 1024, max_record_bytes=128 * 1024,
        aggregation_max_bytes=50 * 1024,
    )  # fmt: skip
    async with Producer(config) as producer:
        feeder = Feeder(producer, pad=300)  # 1.2 MiB/s: the ring alone would fill within a second
        recover_s, rate_during = await fault_window(
            rig, producer, feeder, rate=rate, before_s=1.0, fault_s=down_s, after_s=1.0,
            start=lambda: fault_proxy.set(down="reset"), end=lambda: fault_proxy.set(down=False),
        )  # fmt: skip
        stats = producer.stats()
    await caught_up(rig.ledger, feeder.accepted, 60, dead=rig.dead)
    notes = (
        f"{down_s:.0f} s of reset connections; {stats.spilled:,} events spilled, "
        f"{rate_during:,.0f}/s delivered meanwhile"
    )
    outcome = chaos_outcome(rig.check("2 endpoint down, spill on", feeder.accepted, recover_s=recover_s, notes=notes))
    assert fault_proxy.snapshot()["faults"]["down"] > 0
    assert stats.spilled > 0, "the burst never reached the spill"
    assert feeder.refused_ticks == 0, "the spill refused events"
    assert_no_loss(outcome, rig.ledger, feeder.accepted)
    assert outcome.dead_lettered == 0


async def test_case09_damaged_put_records_responses(
    chaos_rig: Callable[..., Rig], fault_proxy: ThreadedFaultProxy, chaos_outcome: Callable[[Outcome], Outcome]
) -> None:
    """A third of the PutRecords answers damaged after the records were written, for 60 s (4 s short): garbage,
    truncated bodies, resets in the middle of the body, 8 MiB bodies that never parse, at random. Each is a failed
    request, retried (at-least-once: duplicates, never a loss, never a crash or a hang)."""
    fault_s = short_or_full(4.0, 60.0)
    faults = ("garbage", "truncated", "midbody_reset", "oversized")
    rig = chaos_rig(shards=2)
    config = producer_config(rig.stream, fault_proxy.endpoint_url, rig.producer_state())
    fault_proxy.set(fault_targets={"PutRecords"}, body_fault_fraction=0.3, oversized_bytes=8 * MiB)
    async with Producer(config) as producer:
        feeder = Feeder(producer)
        await feeder.run(2_000.0, duration_s=0.5)
        fault_proxy.set(body_fault="mixed")
        await feeder.run(2_000.0, duration_s=fault_s)
        fault_proxy.set(body_fault=None)
        recovering = asyncio.create_task(caught_up(rig.ledger, feeder.accepted, 60, dead=rig.dead))
        await producer.flush(timeout=60)
        recover_s = await recovering
        stats = producer.stats()
    damaged = fault_proxy.snapshot()["faults"]
    notes = ", ".join(f"{damaged[f]} {f}" for f in faults)
    outcome = chaos_outcome(
        rig.check("9 damaged PutRecords answers", feeder.accepted, recover_s=recover_s, notes=notes)
    )
    assert all(damaged[f] > 0 for f in faults), damaged
    assert stats.requests_failed >= sum(damaged[f] for f in faults)
    assert_no_loss(outcome, rig.ledger, feeder.accepted)


async def test_case09_damaged_get_records_answers(
    chaos_rig: Callable[..., Rig], fault_proxy: ThreadedFaultProxy, chaos_outcome: Callable[[Outcome], Outcome]
) -> None:
    """The consumer reads through the proxy, which damages a third of the GetRecords answers for 60 s (4 s short)
    the same four ways: each is a failed read, retried from the same iterator; nothing skipped."""
    fault_s = short_or_full(4.0, 60.0)
    rig = chaos_rig(shards=2, reads_via=fault_proxy.endpoint_url)
    fault_proxy.set(oversized_bytes=8 * MiB)
    config = producer_config(rig.stream, rig.kinesis, rig.producer_state())
    async with Producer(config) as producer:
        feeder = Feeder(producer)
        recover_s, _ = await fault_window(
            rig, producer, feeder, rate=2_000.0, before_s=0.5, fault_s=fault_s, after_s=0.5,
            start=lambda: fault_proxy.set(fault_targets={"GetRecords"}, body_fault="mixed", body_fault_fraction=0.3),
            end=lambda: fault_proxy.set(body_fault=None),
        )  # fmt: skip
    damaged = fault_proxy.snapshot()["faults"]
    notes = ", ".join(f"{damaged[f]} {f}" for f in BODY_FAULTS)
    outcome = chaos_outcome(
        rig.check("9 damaged GetRecords answers", feeder.accepted, recover_s=recover_s, notes=notes)
    )
    assert all(damaged[f] > 0 for f in BODY_FAULTS), damaged
    assert_no_loss(outcome, rig.ledger, feeder.accepted)
