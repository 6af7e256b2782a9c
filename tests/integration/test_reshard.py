"""A split, and a merge, in the middle of an aggregated, ordered burst (issue 15), on kinesalite.

The producer builds KPL aggregates per shard from its shard map. When a shard is split mid-burst, aggregates
built for the parent land in a child, and some of their user records hash outside that child's range. The
Java KCL drops such an aggregate whole, so those events are lost to every KCL consumer unless the producer
sends them again where they belong. These tests read the stream back with ``tests.support.kcl_reader`` (boto3
+ aws_kinesis_agg, applying the KCL's rule, independent of the engine) and count: no event lost, order per key
kept; and they run the engine's own Consumer over the same kind of stream in both ``out_of_range_aggregates``
modes.

Each event's data is ``b"<id>:<key index>:<seq>:"`` padded to 100 bytes, partition key ``k<key index>``;
``seq`` counts up per key in submission order. The producer runs at its defaults (the real per-shard limits:
3 MB at 1 MiB/s per shard takes a couple of seconds) with ``ordered=True``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from tests.support.emulators import Kinesalite, list_shards, merge_shards, open_shards, split_shard
from tests.support.kcl_reader import KclRead, read_kcl

from treasure_engine import Producer, ProducerConfig

pytestmark = pytest.mark.integration

N = 30_000
KEYS = 400
RESHARD_AFTER = 10_000
"""Events submitted (and delivered) before the reshard; the rest follow at once, with the stale shard map."""
EVENT_BYTES = 100


def make_events(n: int, keys: int, *, seed: int) -> list[tuple[bytes, str]]:
    """``n`` events with ids ``0..n-1``, random keys among ``keys``, per-key sequence numbers."""
    rng = random.Random(seed)
    seq = [0] * keys
    out: list[tuple[bytes, str]] = []
    for i in range(n):
        k = rng.randrange(keys)
        head = b"%d:%d:%d:" % (i, k, seq[k])
        out.append((head + b"." * (EVENT_BYTES - len(head)), f"k{k}"))
        seq[k] += 1
    return out


def parse(data: bytes) -> tuple[int, int, int]:
    """(id, key index, seq) of an event."""
    i, k, s = data.split(b":", 3)[:3]
    return int(i), int(k), int(s)


def order_violations(data: Sequence[bytes]) -> list[str]:
    """Per key, the sequence numbers in the order given, duplicates removed (first occurrence kept), must
    increase; returns a description of each place where one does not."""
    seen: set[int] = set()
    last: dict[int, int] = {}
    bad: list[str] = []
    for d in data:
        i, k, s = parse(d)
        if i in seen:
            continue
        seen.add(i)
        if s <= last.get(k, -1):
            bad.append(f"k{k}: seq {s} (id {i}) after seq {last[k]}")
        last[k] = max(s, last.get(k, -1))
    return bad


# --- the burst ---------------------------------------------------------------------------------------------


@dataclass
class Burst:
    stats: Any
    """The producer's ProducerStats after flush."""
    stats_dict: dict[str, int]
    elapsed: float


async def submit(producer: Producer, events: Sequence[tuple[bytes, str]]) -> None:
    done = 0
    while done < len(events):
        done += producer.submit_many(events[done : done + 5_000])
        await asyncio.sleep(0)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def burst_with_reshard(endpoint: str, stream: str, events: Sequence[tuple[bytes, str]], reshard: str) -> Burst:
    """Submits ``events``; after the first RESHARD_AFTER are delivered, splits the lowest shard at its middle
    (``reshard="split"``) or merges the two lowest (``"merge"``), and goes on submitting at once, without
    flushing or refreshing the producer's shard map; then flushes."""
    t0 = time.monotonic()
    config = ProducerConfig(stream=stream, endpoint_url=endpoint, region="us-east-1", ordered=True)
    async with Producer(config) as producer:
        await submit(producer, events[:RESHARD_AFTER])
        await wait_until(lambda: producer.stats().delivered >= RESHARD_AFTER, 30, "the first part delivered")
        shards = await asyncio.to_thread(open_shards, endpoint, stream)
        shards.sort(key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]))
        if reshard == "split":
            await asyncio.to_thread(split_shard, endpoint, stream, shards[0]["ShardId"])
        else:
            await asyncio.to_thread(merge_shards, endpoint, stream, shards[0]["ShardId"], shards[1]["ShardId"])
        await submit(producer, events[RESHARD_AFTER:])
        await producer.flush(timeout=60)
        stats, stats_dict = producer.stats(), producer.stats_dict()
    return Burst(stats, stats_dict, time.monotonic() - t0)


def wrong_shard_records(stats: Any) -> int:
    value = getattr(stats, "wrong_shard_records", None)
    if value is None:
        pytest.fail(
            "ProducerStats has no `wrong_shard_records` (user records re-sent because their aggregate landed in a"
            " shard whose range does not hold them all): the producer does not re-send misplaced aggregates",
            pytrace=False,
        )
    return int(value)


def check_burst(name: str, burst: Burst, read: KclRead, shards: list[dict[str, Any]]) -> None:
    """The assertions both reshard tests share: every event settled at the producer, in the stream, and kept
    by the KCL rule; order per key among the kept records."""
    stats = burst.stats
    kept_ids = {parse(r["data"])[0] for r in read.kept}
    in_stream = kept_ids | {parse(r["data"])[0] for r in read.skipped}
    lost = sorted(set(range(N)) - kept_ids)
    violations = order_violations([r["data"] for r in read.kept])
    print(
        f"\n[{name}] {N} events over {KEYS} keys in {burst.elapsed:.1f}s: {stats.records_sent} Kinesis records in"
        f" {stats.requests} requests, shard_mismatches={burst.stats_dict.get('shard_mismatches')},"
        f" wrong_shard_records={getattr(stats, 'wrong_shard_records', 'n/a')}\n"
        f"[{name}] KCL-rule reader: {read}\n"
        f"[{name}] lost to a KCL consumer: {len(lost)} (first {lost[:5]}); not in the stream at all:"
        f" {N - len(in_stream & set(range(N)))}; duplicates among kept: {len(read.kept) - len(kept_ids)};"
        f" order violations among kept: {len(violations)} (first {violations[:3]})"
    )
    assert stats.accepted == N, stats
    assert stats.in_flight == 0, stats
    assert stats.dead_lettered == 0, stats
    assert stats.delivered == N, stats
    assert burst.stats_dict.get("shard_mismatches", 0) > 0, (
        "no PutRecords answer named another shard than predicted: the reshard did not happen mid-burst"
    )
    position = {sid: i for i, sid in enumerate(read.shard_order)}
    assert sorted(position) == sorted(s["ShardId"] for s in shards), read.shard_order
    for s in shards:
        for parent in (s.get("ParentShardId"), s.get("AdjacentParentShardId")):
            assert parent is None or position[parent] < position[s["ShardId"]], read.shard_order
    assert set(range(N)) <= in_stream, f"{len(set(range(N)) - in_stream)} events are not in the stream at all"
    assert not lost, f"{len(lost)} events lost to a KCL consumer (first {lost[:5]}); {read}"
    assert not violations, f"{len(violations)} order violations per key (first {violations[:5]})"


# --- the KCL-rule reader ------------------------------------------------------------------------------------


async def test_split_mid_burst_no_kcl_loss(kinesalite: Kinesalite, stream_factory: Callable[..., str]) -> None:
    """2 shards; shard 0 split at its middle after 10,000 of 30,000 events, the rest submitted at once. A KCL
    consumer (parents read before children) keeps every event, in order per key; what it skips was re-sent."""
    endpoint = kinesalite.endpoint_url
    stream = stream_factory(endpoint, 2)
    burst = await burst_with_reshard(endpoint, stream, make_events(N, KEYS, seed=15), "split")
    shards = list_shards(endpoint, stream)
    read = await asyncio.to_thread(read_kcl, endpoint, stream)
    assert len(shards) == 4, shards
    check_burst("split", burst, read, shards)
    resent = wrong_shard_records(burst.stats)
    print(f"[split] re-sent (wrong shard): {resent}; KCL skipped {read.skipped_records} in {read.skipped_aggregates}")
    # Every record of an aggregate the KCL skips must have been sent again (the producer counts every re-send).
    assert read.skipped_records <= resent, (read.skipped_records, resent)


async def test_merge_mid_burst_no_kcl_loss(kinesalite: Kinesalite, stream_factory: Callable[..., str]) -> None:
    """3 shards; shards 0 and 1 merged after 10,000 of 30,000 events, the rest submitted at once. The child's
    range covers both parents, so nothing is out of range: no loss, order per key, and nothing re-sent."""
    endpoint = kinesalite.endpoint_url
    stream = stream_factory(endpoint, 3)
    burst = await burst_with_reshard(endpoint, stream, make_events(N, KEYS, seed=16), "merge")
    shards = list_shards(endpoint, stream)
    read = await asyncio.to_thread(read_kcl, endpoint, stream)
    assert len(shards) == 4, shards
    check_burst("merge", burst, read, shards)
    assert read.skipped_aggregates == 0, read
    resent = wrong_shard_records(burst.stats)
    print(f"[merge] re-sent (wrong shard): {resent}")
    assert resent == 0, "aggregates that landed in the merged child hold only records in its range"
