"""`overflow="spill"` end to end: the endpoint stalls (the fault proxy holds every PutRecords), a burst of five
times the ring is accepted into the spill, and once the endpoint returns everything is delivered; ids are counted
in kinesalite with the reference reader."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.support.emulators import Kinesalite
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.kinesis_reader import read_all

from treasure_engine import BufferFull, ConfigError, DeadLetterQueue, Producer, ProducerConfig
from treasure_engine.errors import FlushTimeout

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
RING = 1 * MiB
SMALL: dict[str, Any] = {
    "ring_bytes": RING,
    "max_record_bytes": 64 * 1024,
    "max_request_bytes": 256 * 1024,
    "aggregation_max_bytes": 50 * 1024,
    "max_buffered_bytes": 1 * MiB,
    "shard_records_per_s": 1e9,
    "shard_bytes_per_s": 1e9,
    "linger_ms": 5.0,
    "request_timeout_s": 2.0,
    "backoff_base_s": 0.01,
    "backoff_max_s": 0.2,
}


def _spilling(proxy: ThreadedFaultProxy, stream: str, state_dir: Path, **kw: Any) -> ProducerConfig:
    """A small producer (1 MiB ring) that spills into `state_dir`, sending through the proxy."""
    return ProducerConfig(
        stream=stream, endpoint_url=proxy.endpoint_url, overflow="spill", state_dir=str(state_dir), **SMALL, **kw
    )


def _event(i: int) -> tuple[bytes, str]:
    key = f"k{i % 50}"
    return (b"%d:%s:" % (i, key.encode()) + b"." * 180, key)


async def test_burst_five_times_the_ring_spills_then_is_delivered(
    fault_proxy: ThreadedFaultProxy, kinesalite: Kinesalite, kinesalite_stream: str, tmp_path: Path
) -> None:
    config = _spilling(fault_proxy, kinesalite_stream, tmp_path, ordered=True)
    n = 5 * RING // 200 + 1  # 5x the ring in event bytes alone
    async with Producer(config) as producer:
        fault_proxy.set(stall=True)
        for i in range(n):
            producer.submit(*_event(i))  # never BufferFull: the spill takes what the ring cannot
        stats = producer.stats_dict()
        assert stats["accepted"] == n
        assert stats["refused"] == 0
        # Memory holds the ring and max_buffered_bytes (2 MiB here); the rest of the 5 MiB burst is on disk.
        assert stats["spilled"] > n // 3, stats
        assert stats["delivered"] == 0
        assert any((tmp_path / "spill").iterdir())
        with pytest.raises(FlushTimeout):
            await producer.flush(timeout=1.0)
        fault_proxy.set(stall=False)
        await producer.flush(timeout=120)
        final = producer.stats()
    assert (final.accepted, final.delivered, final.dead_lettered, final.in_flight) == (n, n, 0, 0)
    records = read_all(kinesalite.endpoint_url, kinesalite_stream)
    ids = Counter(int(r["data"].split(b":", 1)[0]) for r in records)
    assert set(ids) == set(range(n)), "every accepted event is in the stream"
    # Per key, the first delivery of each id keeps submit order (ordered=True, spill replayed oldest first).
    firsts: dict[str, list[int]] = {}
    seen: set[int] = set()
    for r in records:
        i = int(r["data"].split(b":", 1)[0])
        if i not in seen:
            seen.add(i)
            firsts.setdefault(r["partition_key"], []).append(i)
    for key, order in firsts.items():
        assert order == sorted(order), f"key {key} out of order"


async def test_spill_full_raises_buffer_full_and_keeps_what_it_accepted(
    fault_proxy: ThreadedFaultProxy, kinesalite: Kinesalite, kinesalite_stream: str, tmp_path: Path
) -> None:
    config = _spilling(fault_proxy, kinesalite_stream, tmp_path, spill_max_bytes=1 * MiB)
    accepted: list[int] = []
    async with Producer(config) as producer:
        fault_proxy.set(stall=True)
        refused: BufferFull | None = None
        for i in range(10 * RING // 200):
            try:
                producer.submit(*_event(i))
            except BufferFull as e:
                refused = e
                break
            accepted.append(i)
        assert refused is not None, "a 1 MiB spill cannot take 10 MiB"
        assert "spill" in str(refused)
        assert producer.stats().refused == 1
        fault_proxy.set(stall=False)
        await producer.flush(timeout=120)
    ids = {int(r["data"].split(b":", 1)[0]) for r in read_all(kinesalite.endpoint_url, kinesalite_stream)}
    assert ids == set(accepted)


async def test_spill_left_at_close_is_replayed_by_the_next_producer(
    fault_proxy: ThreadedFaultProxy, kinesalite: Kinesalite, kinesalite_stream: str, tmp_path: Path
) -> None:
    config = _spilling(fault_proxy, kinesalite_stream, tmp_path)
    n = 4 * RING // 200
    first = Producer(config)
    await first.start()
    fault_proxy.set(stall=True)
    for i in range(n):
        first.submit(*_event(i))
    assert first.stats_dict()["spilled"] > 0
    await first.close(timeout=0.5)  # the endpoint is still stalled: memory is dead-lettered, the spill kept
    dead = {int(d.data.split(b":", 1)[0]) for d in DeadLetterQueue(tmp_path / "dlq").entries()}
    fault_proxy.set(stall=False)

    second = Producer(config)
    await second.start()
    await second.flush(timeout=60)  # waits for the spill's backlog too
    assert second.stats_dict()["spill_backlog_bytes"] == 0
    recovered = second.stats_dict()["spill_recovered"]
    await second.close()
    delivered = {int(r["data"].split(b":", 1)[0]) for r in read_all(kinesalite.endpoint_url, kinesalite_stream)}
    assert recovered > 0
    assert dead | delivered == set(range(n)), "each event dead-lettered or delivered"
    assert not dead & delivered, "held requests were cut at close, never forwarded"
    assert len(delivered) >= recovered


def test_spill_needs_a_sane_limit() -> None:
    with pytest.raises(ConfigError, match="spill_max_bytes"):
        ProducerConfig(stream="s", overflow="spill", spill_max_bytes=10)
