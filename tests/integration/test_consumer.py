"""The consumer end to end: Kinesis on kinesalite (and moto's server), leases in dynalite's DynamoDB (moto's when
Kinesis is moto too, as in the embedded demo), downstreams as real HTTP servers on 127.0.0.1.

Events are produced with the engine's own Producer (KPL aggregation on), so every read exercises the Rust
de-aggregation. Each event's data is ``<key>:<n>``: the handled data tell what was lost, duplicated or reordered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web
from tests.support.emulators import (
    Dynalite,
    Kinesalite,
    MotoServer,
    kinesis_client,
    merge_shards,
    open_shards,
    split_shard,
)

from treasure_engine import (
    BatchResult,
    BreakerConfig,
    CircuitBreaker,
    Consumer,
    ConsumerConfig,
    DeadLetterQueue,
    Downstream,
    DownstreamConfig,
    Producer,
    ProducerConfig,
    Record,
)
from treasure_engine.errors import ConfigError, LeaseTableNotFound, StreamNotFound

pytestmark = pytest.mark.integration

FAST_PRODUCER: dict[str, Any] = {"shard_records_per_s": 1e9, "shard_bytes_per_s": 1e9, "linger_ms": 5.0}
CHILD = Path(__file__).resolve().parents[1] / "support" / "consumer_child.py"
ROOT = Path(__file__).resolve().parents[2]


def events(n: int, keys: int = 101, start: int = 0) -> list[tuple[bytes, str]]:
    """(data, partition key): ``k<key>:<n>``, n counting up per key in submission order."""
    return [(f"k{i % keys}:{i}".encode(), f"k{i % keys}") for i in range(start, start + n)]


async def produce(endpoint: str, stream: str, batch: Sequence[tuple[bytes, str]], *, aggregate: bool = True) -> None:
    config = ProducerConfig(
        stream=stream, endpoint_url=endpoint, region="us-east-1", ordered=True, aggregate=aggregate, **FAST_PRODUCER
    )
    async with Producer(config) as producer:
        for start in range(0, len(batch), 5_000):
            chunk = batch[start : start + 5_000]
            done = 0
            while done < len(chunk):
                done += producer.submit_many(chunk[done:])
                if done < len(chunk):
                    await asyncio.sleep(0.01)
        await producer.flush(timeout=120)


def consumer_config(stream: str, kinesis: str, dynamodb: str, app: str, **kw: Any) -> ConsumerConfig:
    defaults: dict[str, Any] = {
        "region": "us-east-1",
        "idle_poll_ms": 100.0,
        "max_batch_wait_ms": 50.0,
        "lease_duration_s": 3.0,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.2,
        "shard_sync_s": 1.0,
    }
    defaults.update(kw)
    return ConsumerConfig(
        stream=stream, application=app, endpoint_url=kinesis, dynamodb_endpoint_url=dynamodb, **defaults
    )


def app_name() -> str:
    return f"app-{random.getrandbits(40):010x}"


class Collector:
    """An async handler that records what it was given, in order."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.batches = 0
        self.max_batch = 0

    async def __call__(self, records: list[Record]) -> None:
        self.batches += 1
        self.max_batch = max(self.max_batch, len(records))
        self.data.extend(r.data for r in records)

    def ids(self) -> Counter[int]:
        return Counter(int(d.split(b":")[1]) for d in self.data)


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def assert_order_per_key(data: Sequence[bytes]) -> None:
    """For each key, the first delivery of each event comes in the order the events were produced."""
    seen: set[bytes] = set()
    last: dict[bytes, int] = {}
    for d in data:
        if d in seen:
            continue  # an at-least-once redelivery
        seen.add(d)
        key, n = d.split(b":")
        assert int(n) > last.get(key, -1), f"{d!r} handled after a later event of its key"
        last[key] = int(n)


def leases(dynamodb: str, table: str) -> list[dict[str, Any]]:
    client = boto3.client("dynamodb", endpoint_url=dynamodb, region_name="us-east-1")
    return list(client.scan(TableName=table, ConsistentRead=True)["Items"])


def owners(dynamodb: str, table: str) -> Counter[str]:
    return Counter(item["owner"]["S"] for item in leases(dynamodb, table) if "owner" in item)


class MoveCounter(threading.Thread):
    """Reads the lease table every 100 ms and counts the shards' moves from one owner to another (a shard that
    is unowned for a while between two owners moves once). Each move may repeat one round of the shard."""

    def __init__(self, dynamodb: str, table: str) -> None:
        super().__init__(daemon=True)
        self.dynamodb, self.table = dynamodb, table
        self.moves = 0
        self._last: dict[str, str] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.1):
            self.sample()

    def sample(self) -> None:
        for item in leases(self.dynamodb, self.table):
            shard, owner = item["shard_id"]["S"], item.get("owner", {}).get("S")
            if owner is None:
                continue
            if shard in self._last and self._last[shard] != owner:
                self.moves += 1
            self._last[shard] = owner

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.sample()
        return self.moves


# --- one process -----------------------------------------------------------------------------------------


async def test_every_record_handled_in_order_and_checkpointed(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 4)
    batch = events(6_000)
    await produce(kinesalite.endpoint_url, stream, batch)
    app = app_name()
    collector = Collector()
    config = consumer_config(
        stream,
        kinesalite.endpoint_url,
        dynalite.endpoint_url,
        app,
        parallelism=4,
        batch_size=50,
        state_dir=str(tmp_path),
    )
    async with Consumer(config, collector) as consumer:
        await wait_for(lambda: len(collector.ids()) == len(batch), 60, "every event")
        stats = consumer.stats()
    assert collector.ids() == Counter(range(len(batch)))  # nothing lost, nothing twice
    assert collector.max_batch <= 50
    assert_order_per_key(collector.data)
    assert len(stats) == 4
    assert all(s["records_handled"] > 0 for s in stats.values())
    assert sum(s["records_handled"] for s in stats.values()) == len(batch)
    # The final checkpoints are in the table, every lease handed back.
    items = leases(dynalite.endpoint_url, app)
    assert len(items) == 4
    assert all("owner" not in item for item in items)
    assert all(item["checkpoint"]["S"].isdigit() for item in items)

    # A new worker of the same application starts at the checkpoints: nothing is handled again.
    again = Collector()
    await produce(kinesalite.endpoint_url, stream, events(100, start=len(batch)))
    async with Consumer(config, again):
        await wait_for(lambda: len(again.data) >= 100, 30, "the new events")
        await asyncio.sleep(0.5)
    assert again.ids() == Counter(range(len(batch), len(batch) + 100))


async def test_checkpoints_once_per_interval_and_at_stop(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    """A busy shard writes its checkpoint at most once per checkpoint_interval_s, not once per round of
    batch_size records (200 rounds here); a shard gone quiet writes what it handled once the interval has
    passed, without waiting for stop; and a worker started after stop handles nothing twice."""
    stream = stream_factory(kinesalite.endpoint_url, 1)
    batch = events(20_000)
    await produce(kinesalite.endpoint_url, stream, batch, aggregate=False)
    client = kinesis_client(kinesalite.endpoint_url)
    (shard,) = open_shards(kinesalite.endpoint_url, stream)
    iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    last_sequence = ""
    while True:
        page = client.get_records(ShardIterator=iterator, Limit=10_000)
        if not page["Records"]:
            break
        last_sequence, iterator = page["Records"][-1]["SequenceNumber"], page["NextShardIterator"]
    app = app_name()
    collector = Collector()
    interval = 1.0
    config = consumer_config(
        stream,
        kinesalite.endpoint_url,
        dynalite.endpoint_url,
        app,
        checkpoint_interval_s=interval,
        state_dir=str(tmp_path),
    )
    async with Consumer(config, collector) as consumer:
        started = time.monotonic()
        await wait_for(lambda: len(collector.ids()) == len(batch), 60, "every event")
        busy_s = time.monotonic() - started
        written = consumer.stats()[shard["ShardId"]]["checkpoints"]
        # Quiet now: the last position is written within the interval, not at stop.
        await wait_for(
            lambda: leases(dynalite.endpoint_url, app)[0]["checkpoint"]["S"] == last_sequence,
            3 * interval + 2,
            "the quiet shard's checkpoint",
        )
    print(f"{len(batch)} records in {busy_s:.2f} s: {written} checkpoint(s) while busy")
    assert written <= busy_s / interval + 1, (written, busy_s)
    assert collector.ids() == Counter(range(len(batch)))
    again = Collector()
    await produce(kinesalite.endpoint_url, stream, events(100, start=len(batch)))
    async with Consumer(config, again):
        await wait_for(lambda: len(again.data) >= 100, 30, "the new events")
        await asyncio.sleep(0.5)
    assert again.ids() == Counter(range(len(batch), len(batch) + 100))


async def test_moto_kinesis_backend(moto_server: MotoServer, stream_factory: Callable[..., str]) -> None:
    stream = stream_factory(moto_server.endpoint_url, 2)
    batch = events(2_000)
    await produce(moto_server.endpoint_url, stream, batch)
    collector = Collector()
    config = consumer_config(stream, moto_server.endpoint_url, moto_server.endpoint_url, app_name(), parallelism=2)
    async with Consumer(config, collector):
        await wait_for(lambda: len(collector.ids()) == len(batch), 60, "every event")
    assert collector.ids() == Counter(range(len(batch)))
    assert_order_per_key(collector.data)


async def test_poison_records_go_to_the_dlq_with_context(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 2)
    n = 30_000
    batch = events(n)
    poison = {i for i in range(n) if i % 10_000 == 4_321}
    await produce(kinesalite.endpoint_url, stream, batch)
    handled: list[bytes] = []

    async def handle(records: list[Record]) -> None:
        for r in records:
            if int(r.data.split(b":")[1]) in poison:
                raise ValueError(f"cannot process {r.data!r}")
        handled.extend(r.data for r in records)

    config = consumer_config(
        stream,
        kinesalite.endpoint_url,
        dynalite.endpoint_url,
        app_name(),
        batch_size=200,
        max_attempts=3,
        state_dir=str(tmp_path),
        parallelism=3,
    )
    async with Consumer(config, handle) as consumer:
        await wait_for(
            lambda: (
                len(set(handled)) == n - len(poison)
                and sum(s["records_dead_lettered"] for s in consumer.stats().values()) == len(poison)
            ),
            90,
            "all good records handled and the poison dead-lettered",
        )
        await asyncio.sleep(0.3)
        stats = consumer.stats()
    good = Counter(int(d.split(b":")[1]) for d in handled)
    assert set(good) == set(range(n)) - poison
    assert max(good.values()) == 1  # bisection re-runs only failing halves, and those never succeed
    letters = list(DeadLetterQueue(tmp_path / "dlq").entries())
    assert sorted(int(d.data.split(b":")[1]) for d in letters) == sorted(poison)
    for d in letters:
        assert d.source == "consumer"
        assert d.stream == stream
        assert d.error_type == "ValueError"
        assert "cannot process" in d.error_message
        assert d.traceback is not None
        assert "ValueError" in d.traceback
        assert d.attempts == 3
        assert d.shard_id in stats
        assert d.sequence_number
        assert d.partition_key == d.data.split(b":")[0].decode()
    # The checkpoints went past the poison.
    for item in leases(dynalite.endpoint_url, config.application):
        assert item["checkpoint"]["S"].isdigit()


async def test_handler_reported_failures_are_retried_alone(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 1)
    await produce(kinesalite.endpoint_url, stream, events(500))
    calls: Counter[int] = Counter()
    handled: list[int] = []

    async def handle(records: list[Record]) -> BatchResult:
        failed = []
        reasons: dict[Record, BaseException | str] = {}
        for r in records:
            i = int(r.data.split(b":")[1])
            calls[i] += 1
            # Every 50th fails twice then succeeds; 7 and 8 always fail, 8 with a reason.
            if i in (7, 8) or (i % 50 == 0 and calls[i] <= 2):
                failed.append(r)
                if i == 8:
                    reasons[r] = KeyError("no such hunter: k8")
            else:
                handled.append(i)
        return BatchResult(failed=failed, reasons=reasons)

    config = consumer_config(
        stream,
        kinesalite.endpoint_url,
        dynalite.endpoint_url,
        app_name(),
        max_attempts=4,
        state_dir=str(tmp_path),
    )
    async with Consumer(config, handle):
        await wait_for(lambda: len(handled) == 498, 60, "498 handled")
        await asyncio.sleep(0.3)
    assert sorted(handled) == [i for i in range(500) if i not in (7, 8)]
    assert calls[7] == 4
    assert calls[50] == 3
    assert calls[51] == 1
    seven, eight = DeadLetterQueue(tmp_path / "dlq").entries()
    assert seven.data == b"k7:7"
    assert seven.error_type == "HandlerReportedFailure"
    assert seven.attempts == 4
    assert eight.data == b"k8:8"
    assert eight.error_type == "KeyError"
    assert "no such hunter" in eight.error_message


async def test_malformed_aggregates_are_dead_lettered_raw(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    from treasure_engine._core import kpl_encode

    stream = stream_factory(kinesalite.endpoint_url, 1)
    good = kpl_encode([(b"k1:0", "k1", None), (b"k1:1", "k1", None)])
    bad_md5 = bytearray(kpl_encode([(b"k2:2", "k2", None)]))
    bad_md5[-1] ^= 0xFF
    body = kpl_encode([(b"k3:3", "k3", None)])
    truncated = body[:-20] + hashlib.md5(body[4:-20]).digest()
    client = kinesis_client(kinesalite.endpoint_url)
    for data, key in ((good, "k1"), (bytes(bad_md5), "k2"), (truncated, "k3"), (b"k4:4", "k4")):
        client.put_record(StreamName=stream, Data=data, PartitionKey=key)
    collector = Collector()
    config = consumer_config(
        stream, kinesalite.endpoint_url, dynalite.endpoint_url, app_name(), state_dir=str(tmp_path)
    )
    async with Consumer(config, collector) as consumer:
        await wait_for(lambda: len(collector.data) == 3, 30, "the good records")
        await wait_for(lambda: sum(s["malformed"] for s in consumer.stats().values()) == 2, 10, "the bad ones")
    assert collector.data == [b"k1:0", b"k1:1", b"k4:4"]
    letters = list(DeadLetterQueue(tmp_path / "dlq").entries())
    assert [d.data for d in letters] == [bytes(bad_md5), truncated]
    assert all(d.error_type == "MalformedRecord" and d.attempts == 0 for d in letters)
    assert "MD5" in letters[0].error_message or "digest" in letters[0].error_message.lower()


# --- aggregates whose records lie outside their shard's range ----------------------------------------------


Written = tuple[bytes, str, str | None]
"""(data, partition key, explicit hash key) of a user record, as the producer wrote it."""


def record_aggregator() -> Any:
    """aws-kinesis-agg's RecordAggregator: a Python producer that aggregates across shards (its aggregate goes
    where its first record's key says). Importing the package puts its own directory at the front of
    sys.path; put sys.path back."""
    saved = list(sys.path)
    try:
        from aws_kinesis_agg.aggregator import RecordAggregator  # type: ignore[import-untyped]
    finally:
        sys.path[:] = saved
    return RecordAggregator()


def hash_of(partition_key: str, explicit_hash_key: str | None = None) -> int:
    """Where Kinesis (and the KCL's check) places a record: its explicit hash key, else MD5 of its key."""
    if explicit_hash_key is not None:
        return int(explicit_hash_key)
    return int.from_bytes(hashlib.md5(partition_key.encode()).digest(), "big")


class Shards:
    """The stream's shards as ListShards gives them (boto3, not the consumer's client)."""

    def __init__(self, endpoint: str, stream: str) -> None:
        self.ranges = {
            s["ShardId"]: (int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"]))
            for s in open_shards(endpoint, stream)
        }

    def of(self, hash_key: int) -> str:
        (shard,) = [sid for sid, (lo, hi) in self.ranges.items() if lo <= hash_key <= hi]
        return shard

    def keys(self, shard: str, n: int, tag: str) -> list[str]:
        """n partition keys that Kinesis routes to `shard`."""
        return [k for k in (f"{tag}-{i}" for i in range(10_000)) if self.of(hash_of(k)) == shard][:n]

    def middle(self, shard: str) -> str:
        lo, hi = self.ranges[shard]
        return str((lo + hi) // 2)


async def test_foreign_aggregates_are_delivered_and_counted_or_skipped_whole(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    """An aggregate written by a producer that aggregates across shards (aws-kinesis-agg's RecordAggregator) holds
    records of both shards and sits in one. By default every record reaches the handler as written and the
    records of such aggregates are counted; with out_of_range_aggregates="skip" the aggregate is skipped whole,
    as the KCL does, its records are counted, and everything around it is handled and checkpointed past."""
    stream = stream_factory(kinesalite.endpoint_url, 2)
    shards = Shards(kinesalite.endpoint_url, stream)
    home, other = sorted(shards.ranges)
    home_keys, other_keys = shards.keys(home, 8, "h"), shards.keys(other, 8, "o")
    client = kinesis_client(kinesalite.endpoint_url)

    def aggregate(tag: str, records: list[tuple[str, str | None]]) -> tuple[list[Written], str]:
        """Aggregates the records across shards; puts the aggregate with PutRecord; returns them and its shard."""
        agg = record_aggregator()
        written: list[Written] = [(f"{tag}:{i}".encode(), pk, ehk) for i, (pk, ehk) in enumerate(records)]
        for data, pk, ehk in written:
            assert agg.add_user_record(pk, data, ehk) is None  # all in one aggregate
        pk, ehk, blob = agg.clear_and_get().get_contents()
        args = {"ExplicitHashKey": ehk} if ehk else {}
        put = client.put_record(StreamName=stream, Data=blob, PartitionKey=pk, **args)
        return written, put["ShardId"]

    plain: list[Written] = []

    def put_plain(tag: str, keys: list[str]) -> None:
        batch = [(f"{tag}:{i}".encode(), k, None) for i, k in enumerate(keys)]
        client.put_records(StreamName=stream, Records=[{"Data": d, "PartitionKey": k} for d, k, _ in batch])
        plain.extend(batch)

    put_plain("before", home_keys[:3] + other_keys[:3])
    foreign, landed = aggregate(
        "foreign",
        [
            (home_keys[0], None),  # the first record's key places the aggregate: in `home`
            (other_keys[0], None),
            (home_keys[1], None),
            (other_keys[1], None),
            (other_keys[2], None),
            (home_keys[2], shards.middle(other)),  # its key is home's, its explicit hash key the other's
            (other_keys[3], shards.middle(home)),  # and the reverse: in range
            (home_keys[3], None),
        ],
    )
    assert landed == home
    put_plain("after", home_keys[4:6] + other_keys[4:6])
    # An aggregate whose records all belong where it lands, in the other shard.
    local, local_shard = aggregate("local", [(k, None) for k in other_keys[4:8]])
    assert local_shard == other
    # A second foreign aggregate, the last record of `home`: a page of nothing but a skipped aggregate.
    last, landed = aggregate("last", [(home_keys[5], None), (other_keys[6], None), (other_keys[7], None)])
    assert landed == home

    lo, hi = shards.ranges[home]
    strays = sum(not lo <= hash_of(pk, ehk) <= hi for _, pk, ehk in foreign + last)
    assert strays == 6  # 4 of `foreign`, 2 of `last`: computed from MD5 and ListShards, not by the consumer
    # What the consumer counts: every record of an aggregate with a stray (the KCL skips them all).
    in_stray_aggregates = len(foreign) + len(last)
    everything = plain + foreign + local + last

    async def consume(policy: str, expected: int, **kw: Any) -> tuple[list[Written], dict[str, Any], str]:
        got: list[Written] = []

        async def handle(records: list[Record]) -> None:
            got.extend((r.data, r.partition_key, r.explicit_hash_key) for r in records)

        app = app_name()
        config = consumer_config(
            stream,
            kinesalite.endpoint_url,
            dynalite.endpoint_url,
            app,
            state_dir=str(tmp_path / policy),
            out_of_range_aggregates=policy,
            **kw,
        )
        async with Consumer(config, handle) as consumer:
            await wait_for(
                lambda: (
                    len(got) >= expected
                    and all(s["checkpoint"] and s["checkpoint"].isdigit() for s in consumer.stats().values())
                    and sum(s["skipped_out_of_range_records"] for s in consumer.stats().values())
                    >= (len(foreign) + len(last) if policy == "skip" else 0)
                ),
                60,
                f"every record ({policy})",
            )
            await asyncio.sleep(0.5)  # nothing more comes
            stats = consumer.stats()
        return got, stats, app

    # (a) deliver: every record, exactly as written, once; the records of the stray aggregates counted.
    got, stats, _ = await consume("deliver", len(everything))
    assert Counter(got) == Counter(everything)
    assert sum(s["out_of_range_records"] for s in stats.values()) == in_stray_aggregates
    assert stats[home]["out_of_range_records"] == in_stray_aggregates
    assert stats[other]["out_of_range_records"] == 0
    assert sum(s["skipped_out_of_range_records"] for s in stats.values()) == 0
    assert sum(s["records_read"] for s in stats.values()) == len(everything)

    # (b) skip, one Kinesis record per read: both foreign aggregates skipped whole, everything else handled once,
    # and the checkpoint of `home` passed the skipped aggregate that ends it.
    got, stats, app = await consume("skip", len(everything) - len(foreign) - len(last), get_records_limit=1)
    assert Counter(got) == Counter(plain + local)
    assert stats[home]["skipped_out_of_range_records"] == len(foreign) + len(last)
    assert stats[other]["skipped_out_of_range_records"] == 0
    assert sum(s["out_of_range_records"] for s in stats.values()) == 0
    assert sum(s["records_read"] for s in stats.values()) == len(plain + local)
    last_in_home = client.get_records(
        ShardIterator=client.get_shard_iterator(StreamName=stream, ShardId=home, ShardIteratorType="TRIM_HORIZON")[
            "ShardIterator"
        ]
    )["Records"][-1]["SequenceNumber"]
    checkpoints = {
        i["shard_id"]["S"]: (i["checkpoint"]["S"], int(i["sub_sequence"]["N"]))
        for i in leases(dynalite.endpoint_url, app)
    }
    assert checkpoints[home] == (last_in_home, len(last) - 1)


# --- a downstream that goes down ---------------------------------------------------------------------------


class Rewards:
    """A real HTTP downstream on 127.0.0.1 that answers 503 while `down` is set."""

    def __init__(self) -> None:
        self.down = False
        self.received: list[bytes] = []
        self.refused_calls = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.down:
            self.refused_calls += 1
            return web.Response(status=503, text="rewards is down")
        self.received.extend(body.split(b"\n"))
        return web.Response(text="ok")

    async def __aenter__(self) -> Rewards:
        app = web.Application()
        app.router.add_post("/rewards", self._post)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/rewards"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_downstream_outage_pauses_reading_and_dead_letters_nothing(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 2)
    n = 4_000
    async with Rewards() as rewards, aiohttp.ClientSession() as http:

        async def handle(records: list[Record]) -> None:
            async with http.post(rewards.url, data=b"\n".join(r.data for r in records)) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"rewards answered {resp.status}")

        breaker = BreakerConfig(window_size=10, minimum_calls=4, failure_rate=0.5, open_s=0.3, half_open_calls=1)
        config = consumer_config(
            stream,
            kinesalite.endpoint_url,
            dynalite.endpoint_url,
            app_name(),
            batch_size=20,
            max_attempts=2,
            breaker=breaker,
            state_dir=str(tmp_path),
        )
        rewards.down = True
        producing = asyncio.create_task(produce(kinesalite.endpoint_url, stream, events(n)))
        async with Consumer(config, handle) as consumer:
            await wait_for(lambda: any(s["paused"] for s in consumer.stats().values()), 30, "a paused shard")
            assert consumer.breaker is not None
            assert consumer.breaker.state.value in ("open", "half_open")
            await asyncio.sleep(3.0)  # the outage goes on: probes only, nothing dead-lettered
            refused = rewards.refused_calls
            assert refused < 40, f"{refused} calls reached the downed downstream in 3 s"
            assert sum(s["records_dead_lettered"] for s in consumer.stats().values()) == 0
            rewards.down = False
            await producing
            await wait_for(lambda: len(set(rewards.received)) >= n, 60, "every event after the outage")
            stats = consumer.stats()
        assert not any(s["paused"] for s in stats.values())
    assert {int(d.split(b":")[1]) for d in rewards.received} == set(range(n))
    assert list(DeadLetterQueue(tmp_path / "dlq").entries()) == []


async def test_a_downstream_breaker_passed_in_is_watched_not_double_counted(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    """The handler calls through a `Downstream` with its own breaker, and the consumer is given that breaker:
    the consumer takes no permits of its own (no double counting, no half-open deadlock), and every failure
    while the breaker is not closed is the outage, so nothing is dead-lettered however long it lasts."""
    stream = stream_factory(kinesalite.endpoint_url, 1)
    n = 1_000
    async with Rewards() as rewards:
        breaker = CircuitBreaker(
            f"rewards-{app_name()}",
            BreakerConfig(window_size=10, minimum_calls=4, failure_rate=0.5, open_s=0.2, half_open_calls=1),
        )
        async with Downstream(
            rewards.url.rsplit("/", 1)[0], DownstreamConfig(timeout_s=2.0, max_attempts=1), breaker=breaker
        ) as downstream:

            async def handle(records: list[Record]) -> None:
                response = await downstream.post("/rewards", data=b"\n".join(r.data for r in records))
                if not response.ok:
                    raise RuntimeError(f"rewards answered {response.status}")

            config = consumer_config(
                stream, kinesalite.endpoint_url, dynalite.endpoint_url, app_name(), batch_size=25,
                max_attempts=2, state_dir=str(tmp_path),
            )  # fmt: skip
            rewards.down = True
            await produce(kinesalite.endpoint_url, stream, events(n))
            async with Consumer(config, handle, breaker=breaker) as consumer:
                await wait_for(lambda: any(s["paused"] for s in consumer.stats().values()), 30, "a paused shard")
                await asyncio.sleep(2.0)  # ten open periods: each ends in one failing trial call
                assert sum(s["records_dead_lettered"] for s in consumer.stats().values()) == 0
                rewards.down = False
                await wait_for(lambda: len(set(rewards.received)) >= n, 60, "every event after the outage")
    assert {int(d.split(b":")[1]) for d in rewards.received} == set(range(n))
    assert list(DeadLetterQueue(tmp_path / "dlq").entries()) == []


async def test_stop_during_an_outage_is_prompt_and_loses_nothing(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    """Stopping while the downstream is down does not wait for it: the batch is abandoned uncheckpointed, and the
    next worker reads it again."""
    stream = stream_factory(kinesalite.endpoint_url, 1)
    await produce(kinesalite.endpoint_url, stream, events(300))
    down = True
    handled: list[bytes] = []

    async def handle(records: list[Record]) -> None:
        if down:
            raise ConnectionError("rewards is down")
        handled.extend(r.data for r in records)

    config = consumer_config(
        stream, kinesalite.endpoint_url, dynalite.endpoint_url, app_name(), state_dir=str(tmp_path),
        breaker=BreakerConfig(window_size=5, minimum_calls=2, open_s=0.5), shutdown_timeout_s=30.0,
    )  # fmt: skip
    consumer = Consumer(config, handle)
    await consumer.start()
    await wait_for(lambda: any(s["paused"] for s in consumer.stats().values()), 30, "paused")
    started = asyncio.get_running_loop().time()
    await consumer.stop()
    assert asyncio.get_running_loop().time() - started < 3.0
    down = False
    async with Consumer(config, handle):
        await wait_for(lambda: len(set(handled)) == 300, 30, "every event after the restart")
    assert list(DeadLetterQueue(tmp_path / "dlq").entries()) == []


# --- resharding --------------------------------------------------------------------------------------------


async def test_split_and_merge_while_producing_keeps_order_per_key(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    endpoint = kinesalite.endpoint_url
    stream = stream_factory(endpoint, 2)
    collector = Collector()
    config = consumer_config(stream, endpoint, dynalite.endpoint_url, app_name(), parallelism=2)
    produced = 0
    async with Consumer(config, collector) as consumer:
        for _ in range(3):
            await produce(endpoint, stream, events(1_500, start=produced))
            produced += 1_500
            shards = sorted(open_shards(endpoint, stream), key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]))
            if len(shards) == 2:
                await asyncio.to_thread(split_shard, endpoint, stream, shards[0]["ShardId"])
            else:
                await asyncio.to_thread(merge_shards, endpoint, stream, shards[0]["ShardId"], shards[1]["ShardId"])
        await produce(endpoint, stream, events(1_500, start=produced))
        produced += 1_500
        await wait_for(lambda: len(collector.ids()) == produced, 90, "every event across the reshards")
        stats = consumer.stats()
    assert set(collector.ids()) == set(range(produced))
    assert_order_per_key(collector.data)
    ended = [s for s, v in stats.items() if v["ended"]]
    assert len(ended) >= 3, stats  # split parent, then the two merged shards


# --- bad input ---------------------------------------------------------------------------------------------


async def test_missing_stream_is_a_clear_error(kinesalite: Kinesalite, dynalite: Dynalite) -> None:
    config = consumer_config("no-such-stream", kinesalite.endpoint_url, dynalite.endpoint_url, app_name())
    consumer = Consumer(config, Collector())
    with pytest.raises(StreamNotFound, match="no-such-stream"):
        await consumer.start()
    await consumer.stop()


async def test_missing_lease_table_without_create_is_a_clear_error(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str]
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 1)
    config = consumer_config(
        stream, kinesalite.endpoint_url, dynalite.endpoint_url, "absent-table", create_lease_table=False
    )
    with pytest.raises(LeaseTableNotFound, match="absent-table"):
        async with Consumer(config, Collector()):
            pass


def test_handler_must_be_async() -> None:
    config = ConsumerConfig(stream="s", application="app")

    def sync_handler(records: list[Record]) -> None:
        pass

    with pytest.raises(ConfigError, match="async"):
        Consumer(config, sync_handler)  # type: ignore[arg-type]


# --- several processes -------------------------------------------------------------------------------------


def _spawn(config: dict[str, Any], out: Path) -> subprocess.Popen[str]:
    """Starts a worker and waits for its "ready" line; its log goes to `<out>.log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(config), str(out)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise AssertionError(f"consumer child failed to start: {line}{out.with_suffix('.log').read_text()}")
    return proc


def _handled(paths: Sequence[Path]) -> Counter[int]:
    ids: Counter[int] = Counter()
    for path in paths:
        for line in path.read_bytes().split(b"\n"):
            parts = line.split(b":")
            if len(parts) == 2 and parts[1].isdigit():
                ids[int(parts[1])] += 1
    return ids


async def test_three_processes_share_shards_and_take_over_a_killed_one(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    endpoint, dynamodb = kinesalite.endpoint_url, dynalite.endpoint_url
    stream = stream_factory(endpoint, 8)
    n = 200_000
    app = app_name()
    lease_s = 4.0
    batch_size = 100
    config = {
        "stream": stream,
        "application": app,
        "region": "us-east-1",
        "endpoint_url": endpoint,
        "dynamodb_endpoint_url": dynamodb,
        "lease_duration_s": lease_s,
        "batch_size": batch_size,
        # A checkpoint after every round: the tightest bound on what a killed worker repeats (the default
        # interval's bound is tested in test_checkpoints_once_per_interval_and_at_stop).
        "checkpoint_interval_s": 0.0,
        "idle_poll_ms": 100.0,
        "max_batch_wait_ms": 50.0,
        "shard_sync_s": 2.0,
        "get_records_limit": 50,
    }
    outs = [tmp_path / f"worker-{i}.out" for i in range(3)]
    procs = []
    try:
        for i, out in enumerate(outs):
            procs.append(_spawn({**config, "worker_id": f"worker-{i}", "state_dir": str(tmp_path / f"s{i}")}, out))
        # Balance first: 3/3/2 across the three workers.
        deadline = time.monotonic() + 30
        while sorted(owners(dynamodb, app).values()) != [2, 3, 3]:
            assert time.monotonic() < deadline, f"no 3/3/2 balance: {owners(dynamodb, app)}"
            await asyncio.sleep(0.2)
        balanced = owners(dynamodb, app)
        moves = MoveCounter(dynamodb, app)
        moves.sample()
        moves.start()

        producing = asyncio.create_task(produce(endpoint, stream, events(n, keys=997)))
        await wait_for(lambda: sum(_handled(outs).values()) > n // 4, 120, "a quarter handled")
        victim_id = max(balanced, key=lambda w: balanced[w])
        victim = procs[int(victim_id.split("-")[1])]
        moved = balanced[victim_id]
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait()
        while owners(dynamodb, app).get(victim_id, 0) > 0:
            assert time.monotonic() - killed_at < 3 * lease_s, "the killed worker's shards were not taken over"
            await asyncio.sleep(0.05)
        takeover_s = time.monotonic() - killed_at
        await producing
        await wait_for(lambda: set(_handled(outs)) >= set(range(n)), 180, "every id handled")
        await asyncio.sleep(1.0)
        shard_moves = moves.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            assert p.stdout is not None
            p.stdout.close()
    handled = _handled(outs)
    missing = set(range(n)) - set(handled)
    assert not missing, f"{len(missing)} id(s) never handled"
    duplicates = sum(c - 1 for c in handled.values())
    # At most one round (one batch per lane, parallelism 1) is handled twice per move of a shard: the killed
    # worker's shards move, and so may a shard the survivors then balance between them (a loaded machine showed
    # 400 duplicates with 3 shards taken from the killed worker).
    print(
        f"takeover in {takeover_s:.2f} s (lease {lease_s} s); {duplicates} duplicate(s), {moved} shard(s) of the "
        f"killed worker, {shard_moves} move(s) in all"
    )
    assert shard_moves >= moved
    assert duplicates <= shard_moves * batch_size
    # Expiry is judged on the survivors' clocks, from when they saw the last renewal, and they look every
    # lease_s / 4: the takeover comes between lease_s - lease_s / 3 and lease_s + 2 * lease_s / 4 after the kill.
    assert takeover_s <= lease_s * 1.5 + 0.5


async def test_cli_consumes_until_sigterm_then_hands_leases_back(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 2)
    await produce(kinesalite.endpoint_url, stream, events(1_000))
    app = app_name()
    config = tmp_path / "consumer.toml"
    config.write_text(
        "[consumer]\n"
        f'stream = "{stream}"\napplication = "{app}"\nregion = "us-east-1"\n'
        f'endpoint_url = "{kinesalite.endpoint_url}"\ndynamodb_endpoint_url = "{dynalite.endpoint_url}"\n'
        f'state_dir = "{tmp_path / "state"}"\nidle_poll_ms = 100.0\nlease_duration_s = 3.0\n'
    )
    out = tmp_path / "handled.out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TREASURE_TEST_OUT": str(out)}
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; the loop only polls it
        [sys.executable, "-m", "treasure_engine", "consume", "--config", str(config),
         "--handler", "tests.support.handlers:append_to_file"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        await wait_for(lambda: out.exists() and len(_handled([out])) == 1_000, 60, "every event")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "1000 record(s) handled" in stdout
    items = leases(dynalite.endpoint_url, app)
    assert len(items) == 2
    assert all("owner" not in item for item in items)
