"""Chaos for the consumer: GetRecords throttled, failing and going down while it reads, and the worker killed
and restarted mid-stream. Kinesis is kinesalite behind the fault proxy (faults it reports are real: a throttled
or failed GetRecords returns no records), DynamoDB is moto's server.

Afterwards every event must have been handled, in order per partition key, with nothing dead-lettered. Short in
CI; ``TREASURE_CHAOS=full`` runs more events and longer outages.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.integration.test_consumer import (
    Collector,
    app_name,
    assert_order_per_key,
    consumer_config,
    events,
    produce,
    wait_for,
)
from tests.support.emulators import Kinesalite, MotoServer
from tests.support.faultproxy import FaultProxy

from treasure_engine import Consumer, DeadLetterQueue

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FULL = os.environ.get("TREASURE_CHAOS") == "full"
N = 40_000 if FULL else 8_000
OUTAGE_S = 8.0 if FULL else 2.0
READS = {"GetRecords", "GetShardIterator"}


async def test_reads_throttled_failing_and_down_lose_nothing(
    kinesalite: Kinesalite,
    moto_server: MotoServer,
    stream_factory: Callable[..., str],
    async_fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    proxy = async_fault_proxy
    stream = stream_factory(kinesalite.endpoint_url, 3)
    batch = events(N, keys=211)
    await produce(kinesalite.endpoint_url, stream, batch, aggregate=False)  # many reads, many faults
    collector = Collector()
    config = consumer_config(
        stream, proxy.endpoint_url, moto_server.endpoint_url, app_name(), parallelism=3, batch_size=50,
        get_records_limit=100, state_dir=str(tmp_path),
    )  # fmt: skip
    proxy.set(fault_targets=READS, throttle_fraction=0.3)
    async with Consumer(config, collector) as consumer:
        await wait_for(lambda: len(collector.ids()) > N // 3, 60, "a third handled while throttled")
        proxy.set(throttle_fraction=0.0, error_status=500)
        await asyncio.sleep(0.5)
        proxy.set(error_status=None, down="reset")
        await asyncio.sleep(OUTAGE_S)
        proxy.set(down="503")
        await asyncio.sleep(OUTAGE_S / 2)
        proxy.reset_faults()
        await wait_for(lambda: len(collector.ids()) == N, 120, "every event after the faults")
        stats = consumer.stats()
    faults = proxy.snapshot()["faults"]
    print(f"faults injected: {dict(faults)}")
    assert faults["throttle"] > 0
    assert sum(faults.values()) > 10
    assert set(collector.ids()) == set(range(N))
    assert_order_per_key(collector.data)
    assert sum(s["records_dead_lettered"] for s in stats.values()) == 0
    assert list(DeadLetterQueue(tmp_path / "dlq").entries()) == []


async def test_worker_restarted_mid_stream_goes_on_from_its_checkpoints(
    kinesalite: Kinesalite, moto_server: MotoServer, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    """Stop/start cycles at random points: each new worker starts at the checkpoints the last one wrote."""
    stream = stream_factory(kinesalite.endpoint_url, 2)
    await produce(kinesalite.endpoint_url, stream, events(N, keys=97))
    app = app_name()
    seen: Counter[int] = Counter()
    data: list[bytes] = []
    rng = random.Random(7)
    for _ in range(4 if FULL else 2):
        collector = Collector()
        config = consumer_config(
            stream, kinesalite.endpoint_url, moto_server.endpoint_url, app, batch_size=40, get_records_limit=10,
            state_dir=str(tmp_path),
        )  # fmt: skip
        async with Consumer(config, collector):
            target = len(seen) + rng.randint(N // 10, N // 4)
            await wait_for(
                lambda c=collector, t=target: len(set(seen) | set(c.ids())) >= min(t, N),  # type: ignore[misc]
                60,
                "progress",
            )
        seen.update(collector.ids())
        data.extend(collector.data)
    collector = Collector()
    async with Consumer(
        consumer_config(stream, kinesalite.endpoint_url, moto_server.endpoint_url, app, state_dir=str(tmp_path)),
        collector,
    ):
        await wait_for(lambda: len(set(seen) | set(collector.ids())) == N, 60, "the rest")
    seen.update(collector.ids())
    data.extend(collector.data)
    assert set(seen) == set(range(N))
    # A graceful stop checkpoints what it handled: a restart repeats nothing.
    assert max(seen.values()) == 1, f"{sum(c - 1 for c in seen.values())} duplicate(s)"
    assert_order_per_key(data)
