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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.support.emulators import Dynalite, Kinesalite, list_shards, merge_shards, open_shards, split_shard
from tests.support.kcl_reader import KclRead, read_kcl

from treasure_engine import Consumer, ConsumerConfig, Producer, ProducerConfig, Record

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
    # Every record of an aggregate the KCL skips was sent again, and nothing else (the producer counts re-sends).
    assert read.skipped_aggregates > 0, "the split misplaced no aggregate: the test did not reshard mid-burst"
    assert read.skipped_records == resent, (read.skipped_records, resent)


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


# --- the engine's consumer over the same kind of stream ---------------------------------------------------------


def consumer_config(stream: str, kinesis: str, dynamodb: str, state_dir: str, **kw: Any) -> ConsumerConfig:
    return ConsumerConfig(
        stream=stream, application=f"app-{random.getrandbits(40):010x}", endpoint_url=kinesis,
        dynamodb_endpoint_url=dynamodb, region="us-east-1", idle_poll_ms=100.0, max_batch_wait_ms=50.0,
        lease_duration_s=3.0, backoff_base_s=0.01, backoff_max_s=0.2, shard_sync_s=1.0, parallelism=2,
        state_dir=state_dir, **kw,
    )  # fmt: skip


def stat_total(stats: dict[str, dict[str, Any]], name: str) -> int:
    """A consumer counter summed over shards; fails clearly when the consumer does not count it."""
    if not any(name in s for s in stats.values()):
        pytest.fail(f"the consumer's per-shard stats have no {name!r} (keys: {sorted(next(iter(stats.values())))})")
    return sum(int(s.get(name, 0)) for s in stats.values())


async def split_burst_then_consume(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], state_dir: str, **kw: Any
) -> tuple[Burst, KclRead, list[bytes], dict[str, dict[str, Any]]]:
    """The split scenario of test_split_mid_burst_no_kcl_loss, then the engine's Consumer (``kw`` added to its
    config) over the whole stream until every copy the KCL-rule reader found (kept or skipped) was handled, or
    every event once and no more came for a second. Returns the data handled, in order, and the stats."""
    endpoint = kinesalite.endpoint_url
    stream = stream_factory(endpoint, 2)
    burst = await burst_with_reshard(endpoint, stream, make_events(N, KEYS, seed=15), "split")
    read = await asyncio.to_thread(read_kcl, endpoint, stream)
    copies = len(read.kept) + len(read.skipped)
    handled: list[bytes] = []

    async def handle(records: list[Record]) -> None:
        handled.extend(r.data for r in records)

    def unique() -> int:
        return len({parse(d)[0] for d in handled})

    config = consumer_config(stream, endpoint, dynalite.endpoint_url, state_dir, **kw)
    async with Consumer(config, handle) as consumer:
        deadline = time.monotonic() + 60
        quiet_since, seen = time.monotonic(), 0
        while len(handled) < copies:
            await asyncio.sleep(0.05)
            if len(handled) != seen:
                quiet_since, seen = time.monotonic(), len(handled)
            elif unique() >= N and time.monotonic() - quiet_since > 1.0:
                break  # every event once; what is left was skipped (or lost)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out: {len(handled)} handled ({unique()} events) of {copies} copies")
        await asyncio.sleep(0.5)  # anything more would be a duplicate too many
        stats = consumer.stats()
    shown = ("records_read", "records_handled", "ended", "out_of_range_records", "skipped_out_of_range_records")
    per_shard = {sid: {k: s[k] for k in shown if k in s} for sid, s in stats.items()}
    label = f"consumer {kw or 'default'}"
    print(f"\n[{label}] {read}\n[{label}] handled {len(handled)} ({unique()} events) of {copies} copies; {per_shard}")
    assert sum(s["records_dead_lettered"] + s["malformed"] for s in stats.values()) == 0, stats
    return burst, read, handled, stats


async def test_split_mid_burst_consumer_skip_handles_each_event_once(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    """With ``out_of_range_aggregates="skip"`` (the KCL's rule) the consumer drops the misplaced aggregates that
    the producer re-sent: every event reaches the handler exactly once, in order per key."""
    if "out_of_range_aggregates" not in ConsumerConfig.__struct_fields__:
        pytest.fail('ConsumerConfig has no `out_of_range_aggregates` option ("skip" | "deliver")', pytrace=False)
    _, read, handled, stats = await split_burst_then_consume(
        kinesalite, dynalite, stream_factory, str(tmp_path), out_of_range_aggregates="skip"
    )
    counts = Counter(parse(d)[0] for d in handled)
    missing = sorted(set(range(N)) - counts.keys())
    twice = sorted(i for i, c in counts.items() if c > 1)
    assert not missing, f"{len(missing)} events never handled (first {missing[:5]})"
    assert not twice, f"{len(twice)} events handled more than once (first {twice[:5]})"
    assert counts.keys() == set(range(N))
    violations = order_violations(handled)
    assert not violations, f"{len(violations)} order violations per key (first {violations[:5]})"
    # The consumer skipped what the independent KCL-rule reader skipped.
    assert stat_total(stats, "skipped_out_of_range_records") == read.skipped_records, read


async def test_split_mid_burst_consumer_deliver_counts_out_of_range(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    """By default the consumer delivers every user record, in range or not, and counts the records of aggregates
    that hold any record out of range: every event at least once, and the duplicates equal that count (they are
    the misplaced copies the producer sent again, all records of those aggregates)."""
    burst, read, handled, stats = await split_burst_then_consume(kinesalite, dynalite, stream_factory, str(tmp_path))
    counts = Counter(parse(d)[0] for d in handled)
    missing = sorted(set(range(N)) - counts.keys())
    duplicates = len(handled) - len(counts)
    assert not missing, f"{len(missing)} events never handled (first {missing[:5]})"
    # Every copy in the stream was handled once: N events plus the copies re-sent.
    assert len(handled) == len(read.kept) + len(read.skipped), (len(handled), read)
    out_of_range = stat_total(stats, "out_of_range_records")
    print(f"[consumer default] duplicates {duplicates}, out_of_range_records {out_of_range}")
    # The duplicates are exactly the counted records: those of the aggregates a KCL consumer skips, which the
    # producer re-sent.
    assert duplicates == out_of_range == read.skipped_records, (duplicates, out_of_range, read)
    assert duplicates == wrong_shard_records(burst.stats)
