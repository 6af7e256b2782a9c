"""Child process of bench/test_e2e.py: one end-to-end run of one contender, with its process CPU.

    python bench/e2e_child.py --peer PEER --endpoint URL --stream NAME [--dynamodb URL] [--events N]

Producers (``--peer``), each pushing ``--events`` events (100-byte payloads: the event's index, zero-padded;
partition keys from 1,000; built before the clock starts and then frozen out of the garbage collector's sight,
as bench/limits_child.py does) into a fresh stream:

- ``treasure_engine``: ``Producer`` with the shard limits raised (``shard_records_per_s=1e6,
  shard_bytes_per_s=1e9``), ``submit_many`` in lists of 1,000, ``await flush()``;
- ``async_kinesis``: async-kinesis's ``Producer(stream_name=..., endpoint_url=..., processor=KPLStringProcessor(),
  put_rate_limit_per_shard=1e6, put_bandwidth_limit_per_shard=1e6)`` (its throttles out of the way),
  ``await put(data)`` per event, ``await flush()``. Its KPL processor refuses partition keys (one global
  aggregator, a random key per aggregate), so the events go without theirs; the payloads are passed as ``str``
  (``KPLStringProcessor`` encodes ``str(item)``);
- ``aiokpl``: aiokpl's ``Producer(Config(..., rate_limit_records_per_sec_per_shard=1e6,
  rate_limit_bytes_per_sec_per_shard=1e9))``, ``await put_record(...)`` per event, ``await flush()``, then
  every outcome awaited;
- ``boto3_agg``: what a boto3 user writes: one aws-kinesis-agg ``RecordAggregator`` (its defaults),
  ``add_user_record(key, data)`` per event, completed aggregates gathered into PutRecords batches of up to 500
  records / 5 MiB, each batch sent by a pool of 4 threads (one shared boto3 client), failed records resent;
- ``ceiling``: the emulator's ceiling: the same events aggregated per shard (aws-kinesis-agg, 51,200-byte
  aggregates, routed by the MD5 of their key, as the KPL does) and sealed into PutRecords bodies of 10 records
  (``--ceiling-records``; about 500 KB, kinesalite's fastest shape here), all before the clock starts; the clock
  times only posting them with aiohttp, 4 requests in flight (``--ceiling-in-flight``; SigV4-shaped headers
  built beforehand: kinesalite does not check signatures).

Consumers, reading a stream that already holds the events from its start (TRIM_HORIZON) until every event has
been handed over:

- ``consumer_treasure_engine``: ``Consumer(ConsumerConfig(stream, application, endpoint_url,
  dynamodb_endpoint_url, region))``, everything else at its defaults, leases in ``--dynamodb`` (moto's server),
  a no-op async handler (it keeps each batch's list for the check afterwards);
- ``consumer_boto3``: a boto3 GetRecords loop, one thread per shard (ListShards, GetShardIterator
  TRIM_HORIZON, GetRecords with Limit 10,000 until an empty response), aws-kinesis-agg's
  ``iter_deaggregate_records(records, data_format="Boto3")`` to a no-op handler per response.

Steady state (group "e2e_consume_steady"; run side by side by bench/test_e2e.py, which counts the DynamoDB calls
through bench/counting_proxy.py):

- ``producer_steady``: the default ``ProducerConfig`` pushing ``--rate`` events/s (``submit_many`` of the
  events due every 10 ms) for ``--seconds``, then ``flush``; prints ``{"pushing": ...}`` as it starts;
- ``consumer_steady``: ``Consumer(ConsumerConfig(stream, application, endpoint_url, dynamodb_endpoint_url,
  region))`` at its defaults with a no-op handler, reading a fresh stream from its start; prints
  ``{"ready": ...}`` once it holds a lease on every one of ``--shards`` shards, then runs until ``--events``
  distinct events were handed over, and reports each shard's handler calls (monotonic time, records).

Measured from the first event handed over (producers) or the consumer's start (consumers: the boto3 client is
created inside the window, as the Consumer creates its own) to the last one acknowledged or handled: wall time
and the process's CPU (``getrusage(RUSAGE_SELF)``, user + sys), and CPU per thread name as limits_child.py
measures it. Prints one JSON object on the last line of stdout; exits 1 when an event is missing. Each peer
imports only its own library.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from limits_child import freeze_harness, make_chunks, process_cpu_s, thread_deltas, threads

PRODUCERS = ("treasure_engine", "async_kinesis", "aiokpl", "boto3_agg", "ceiling")
CONSUMERS = ("consumer_treasure_engine", "consumer_boto3")
STEADY = ("producer_steady", "consumer_steady")
RAISED = {"shard_records_per_s": 1e6, "shard_bytes_per_s": 1e9}
REGION = "us-east-1"
BATCH_RECORDS = 500  # PutRecords: at most 500 records
BATCH_BYTES = 5 * 1024 * 1024  # and 5 MiB
POOL = 4  # threads (boto3_agg) or requests in flight (ceiling)
CEILING_AGGREGATE_BYTES = 51_200
# Requests of 10 aggregates (about 500 KB): the fastest shape for kinesalite measured here (a quick sweep on
# 2 cores: 500, 100, 25, 10 and 5 records per request, 4 and 8 in flight); five full 5 MiB requests took 0.7 to
# 2.1 s against 0.45 to 0.52 s, which would make the "ceiling" slower than the libraries measured against it.
CEILING_RECORDS = 10


class Window:
    """The measured window: wall, process CPU and per-thread CPU between ``start()`` and ``stop()``."""

    def start(self) -> None:
        self.threads0, self.cpu0, self.t0 = threads(), process_cpu_s(), time.perf_counter()

    def stop(self) -> dict[str, Any]:
        wall, cpu = time.perf_counter() - self.t0, process_cpu_s() - self.cpu0
        return {"wall_s": wall, "cpu_s": cpu, "threads": thread_deltas(self.threads0, threads())}


def boto3_client(endpoint: str) -> Any:
    import boto3
    import botocore.config

    cfg = botocore.config.Config(retries={"max_attempts": 10, "mode": "standard"}, max_pool_connections=POOL * 2)
    return boto3.client("kinesis", endpoint_url=endpoint, region_name=REGION, config=cfg)


def sized_chunks(args: argparse.Namespace) -> list[list[tuple[bytes, str]]]:
    """As limits_child.make_chunks, with ``--data-bytes`` payloads and keys from ``--keys`` (group e2e_sweep)."""
    n, size, keys = args.events, args.data_bytes, args.keys
    events = [(f"{i:0>{size}}".encode(), f"key-{(i * 7919) % keys}") for i in range(n)]
    return [events[i : i + 1_000] for i in range(0, n, 1_000)]


# --- producers ---------------------------------------------------------------------------------------------


async def produce_treasure_engine(args: argparse.Namespace, chunks: list[list[tuple[bytes, str]]]) -> Any:
    from treasure_engine import Producer, ProducerConfig

    config = ProducerConfig(stream=args.stream, endpoint_url=args.endpoint, region=REGION, **RAISED)
    producer = Producer(config)
    await producer.start()
    w = Window()
    w.start()
    for chunk in chunks:
        if producer.submit_many(chunk) != len(chunk):
            raise RuntimeError("submit_many refused events")
    await producer.flush()
    out = w.stop()
    stats = producer.stats_dict()
    await producer.close()
    out["requests"] = stats["requests"]
    out["kinesis_records"] = stats["records_sent"]
    if (stats["delivered"], stats["in_flight"], stats["dead_lettered"]) != (args.events, 0, 0):
        raise RuntimeError(f"treasure_engine: events lost: {stats}")
    return out


async def produce_async_kinesis(args: argparse.Namespace, chunks: list[list[tuple[bytes, str]]]) -> Any:
    from kinesis import Producer
    from kinesis.processors import KPLStringProcessor

    payloads = [data.decode() for chunk in chunks for data, _ in chunk]
    requests = 0

    async def counted(_items: Any) -> None:
        nonlocal requests
        requests += 1

    async with Producer(
        stream_name=args.stream,
        endpoint_url=args.endpoint,
        region_name=REGION,
        processor=KPLStringProcessor(),
        put_rate_limit_per_shard=1_000_000,
        put_bandwidth_limit_per_shard=1_000_000,  # KiB/s
        after_flush_fun=counted,
    ) as producer:
        w = Window()
        w.start()
        for payload in payloads:
            await producer.put(payload)
        await producer.flush()
        out = w.stop()
    out["requests"] = requests
    return out


async def produce_aiokpl(args: argparse.Namespace, chunks: list[list[tuple[bytes, str]]]) -> Any:
    from aiokpl import Config, Producer

    config = Config(
        region=REGION,
        endpoint_url=args.endpoint,
        verify_ssl=False,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        rate_limit_records_per_sec_per_shard=1e6,
        rate_limit_bytes_per_sec_per_shard=1e9,
    )
    async with Producer(config) as producer:
        w = Window()
        w.start()
        outcomes = []
        for chunk in chunks:
            for data, key in chunk:
                outcomes.append(await producer.put_record(stream=args.stream, partition_key=key, data=data))
        await producer.flush()
        results = [await o.wait() for o in outcomes]
        out = w.stop()
    failed = [r for r in results if not r.success]
    if failed:
        raise RuntimeError(f"aiokpl: {len(failed)} records failed, e.g. {failed[0]}")
    return out


def produce_boto3_agg(args: argparse.Namespace, chunks: list[list[tuple[bytes, str]]]) -> Any:
    from aws_kinesis_agg.aggregator import RecordAggregator

    client = boto3_client(args.endpoint)
    client.describe_stream_summary(StreamName=args.stream)  # connect before the clock
    requests = 0
    lock = threading.Lock()

    def send(records: list[dict[str, Any]]) -> None:
        nonlocal requests
        while records:
            resp = client.put_records(StreamName=args.stream, Records=records)
            with lock:
                requests += 1
            if not resp["FailedRecordCount"]:
                return
            records = [r for r, res in zip(records, resp["Records"], strict=True) if "ErrorCode" in res]
            time.sleep(0.1)

    w = Window()
    w.start()
    with ThreadPoolExecutor(POOL) as pool:
        futures = []
        batch: list[dict[str, Any]] = []
        size = 0

        def add(record: Any) -> None:
            nonlocal batch, size
            pk, ehk, data = record.get_contents()
            entry = {"Data": data, "PartitionKey": pk}
            if ehk:
                entry["ExplicitHashKey"] = ehk
            if len(batch) == BATCH_RECORDS or size + len(data) + len(pk) > BATCH_BYTES:
                futures.append(pool.submit(send, batch))
                batch, size = [], 0
            batch.append(entry)
            size += len(data) + len(pk)

        agg = RecordAggregator()
        for chunk in chunks:
            for data, key in chunk:
                full = agg.add_user_record(key, data)
                if full is not None:
                    add(full)
        last = agg.clear_and_get()
        if last is not None:
            add(last)
        if batch:
            futures.append(pool.submit(send, batch))
        for f in futures:
            f.result()
    out = w.stop()
    out["requests"] = requests
    return out


def ceiling_bodies(args: argparse.Namespace, chunks: list[list[tuple[bytes, str]]]) -> list[bytes]:
    """The events aggregated per shard and sealed into PutRecords JSON bodies (untimed)."""
    from aws_kinesis_agg.aggregator import RecordAggregator

    client = boto3_client(args.endpoint)
    shards = client.list_shards(StreamName=args.stream)["Shards"]
    ranges = [(int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"])) for s in shards]
    aggs = [RecordAggregator(max_size=CEILING_AGGREGATE_BYTES) for _ in shards]
    records: list[dict[str, str]] = []

    def add(record: Any, shard: int) -> None:
        _, _, data = record.get_contents()
        records.append(
            {"Data": base64.b64encode(data).decode(), "PartitionKey": "a", "ExplicitHashKey": str(ranges[shard][0])}
        )

    for chunk in chunks:
        for data, key in chunk:
            h = int.from_bytes(hashlib.md5(key.encode()).digest(), "big")
            shard = next(i for i, (lo, hi) in enumerate(ranges) if lo <= h <= hi)
            full = aggs[shard].add_user_record(key, data)
            if full is not None:
                add(full, shard)
    for shard, agg in enumerate(aggs):
        last = agg.clear_and_get()
        if last is not None:
            add(last, shard)
    bodies, batch, size = [], [], 0
    for r in records:
        n = len(r["Data"]) * 3 // 4 + 1
        if batch and (len(batch) == args.ceiling_records or size + n > BATCH_BYTES):
            bodies.append(json.dumps({"StreamName": args.stream, "Records": batch}).encode())
            batch, size = [], 0
        batch.append(r)
        size += n
    if batch:
        bodies.append(json.dumps({"StreamName": args.stream, "Records": batch}).encode())
    return bodies


async def produce_ceiling(args: argparse.Namespace, chunks: list[list[tuple[bytes, str]]]) -> Any:
    import aiohttp

    bodies = ceiling_bodies(args, chunks)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    headers = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "Kinesis_20131202.PutRecords",
        "X-Amz-Date": stamp,
        "Authorization": f"AWS4-HMAC-SHA256 Credential=testing/{stamp[:8]}/{REGION}/kinesis/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=" + "0" * 64,
    }
    failed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.ceiling_in_flight)) as session:
        queue = list(reversed(bodies))

        async def worker() -> None:
            nonlocal failed
            while queue:
                body = queue.pop()
                async with session.post(args.endpoint, data=body, headers=headers) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status != 200:
                        raise RuntimeError(f"ceiling: HTTP {resp.status}: {answer}")
                    failed += answer.get("FailedRecordCount", 0)

        w = Window()
        w.start()
        await asyncio.gather(*(worker() for _ in range(args.ceiling_in_flight)))
        out = w.stop()
    if failed:
        raise RuntimeError(f"ceiling: {failed} records failed (no retries in the ceiling client)")
    out["requests"] = len(bodies)
    return out


# --- consumers ---------------------------------------------------------------------------------------------


async def consume_treasure_engine(args: argparse.Namespace) -> Any:
    from treasure_engine import Consumer, ConsumerConfig, Record

    batches: list[list[Record]] = []
    seen = 0
    done = asyncio.Event()

    async def handler(records: list[Record]) -> None:
        nonlocal seen
        batches.append(records)
        seen += len(records)
        if seen >= args.events:
            done.set()

    config = ConsumerConfig(
        stream=args.stream,
        application=f"bench-e2e-{args.stream}-{time.time_ns()}",
        region=REGION,
        endpoint_url=args.endpoint,
        dynamodb_endpoint_url=args.dynamodb,
    )
    w = Window()
    w.start()
    async with Consumer(config, handler):
        await asyncio.wait_for(done.wait(), 120)
        out = w.stop()
    out["payloads"] = [r.data for b in batches for r in b]
    return out


def consume_boto3(args: argparse.Namespace) -> Any:
    from aws_kinesis_agg.deaggregator import iter_deaggregate_records

    batches: list[list[dict[str, Any]]] = []
    requests = 0
    lock = threading.Lock()

    def handler(records: list[dict[str, Any]]) -> None:
        batches.append(records)  # a no-op handler (list.append is atomic)

    w = Window()
    w.start()
    client = boto3_client(args.endpoint)
    shards = client.list_shards(StreamName=args.stream)["Shards"]

    def read(shard_id: str) -> None:
        nonlocal requests
        it = client.get_shard_iterator(StreamName=args.stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON")
        iterator = it["ShardIterator"]
        while iterator:
            resp = client.get_records(ShardIterator=iterator, Limit=10_000)
            with lock:
                requests += 1
            if not resp["Records"]:
                return
            handler(list(iter_deaggregate_records(resp["Records"], data_format="Boto3")))
            iterator = resp.get("NextShardIterator")

    with ThreadPoolExecutor(len(shards)) as pool:
        for f in [pool.submit(read, s["ShardId"]) for s in shards]:
            f.result()
    out = w.stop()
    out["requests"] = requests
    # Aggregated user records come back base64-encoded in the Boto3 format.
    out["payloads"] = [
        base64.b64decode(r["kinesis"]["data"]) if r["kinesis"].get("aggregated") else r["kinesis"]["data"]
        for b in batches
        for r in b
    ]
    return out


# --- steady state (group e2e_consume_steady) ----------------------------------------------------------------


def say(line: dict[str, Any]) -> None:
    """One JSON line on stdout, at once (the parent reads these as they come)."""
    print(json.dumps(line), flush=True)


async def produce_steady(args: argparse.Namespace) -> Any:
    from treasure_engine import Producer, ProducerConfig

    n = int(args.rate * args.seconds)
    events = [(f"{i:0>{args.data_bytes}}".encode(), f"key-{(i * 7919) % args.keys}") for i in range(n)]
    producer = Producer(ProducerConfig(stream=args.stream, endpoint_url=args.endpoint, region=REGION))
    await producer.start()
    w = Window()
    w.start()
    say({"pushing": time.monotonic()})
    t0, sent = time.monotonic(), 0
    while sent < n:
        due = min(n, int((time.monotonic() - t0) * args.rate))
        if due > sent:
            if producer.submit_many(events[sent:due]) != due - sent:
                raise RuntimeError("producer_steady: submit_many refused events")
            sent = due
        await asyncio.sleep(0.01)
    pushed_s = time.monotonic() - t0
    await producer.flush()
    out = w.stop()
    stats = producer.stats_dict()
    await producer.close()
    if (stats["delivered"], stats["in_flight"], stats["dead_lettered"]) != (n, 0, 0):
        raise RuntimeError(f"producer_steady: events lost: {stats}")
    out.update(pushed_s=pushed_s, requests=stats["requests"], sent=n)
    return out


async def consume_steady(args: argparse.Namespace) -> Any:
    from treasure_engine import Consumer, ConsumerConfig, Record

    calls: dict[str, list[tuple[float, int]]] = {}
    payloads: list[bytes] = []
    done = asyncio.Event()

    async def handler(records: list[Record]) -> None:
        calls.setdefault(records[0].shard_id, []).append((time.monotonic(), len(records)))
        payloads.extend(r.data for r in records)
        if len(payloads) >= args.events:
            done.set()

    config = ConsumerConfig(
        stream=args.stream,
        application=f"bench-steady-{args.stream}-{time.time_ns()}",
        region=REGION,
        endpoint_url=args.endpoint,
        dynamodb_endpoint_url=args.dynamodb,
    )
    w = Window()
    w.start()
    async with Consumer(config, handler) as consumer:
        deadline = time.monotonic() + 60
        while len(consumer.owned_shards()) < args.shards:
            if time.monotonic() > deadline:
                raise RuntimeError(f"consumer_steady: holds {consumer.owned_shards()} after 60 s")
            await asyncio.sleep(0.05)
        say({"ready": time.monotonic(), "owned": sorted(consumer.owned_shards())})
        await asyncio.wait_for(done.wait(), args.seconds + 120)
        out = w.stop()
        stats = consumer.stats()
    out.update(calls=calls, checkpoints={shard: s["checkpoints"] for shard, s in stats.items()}, payloads=payloads)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", choices=PRODUCERS + CONSUMERS + STEADY, required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--dynamodb")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--data-bytes", type=int, default=100, help="payload size (at least 16; group e2e_sweep)")
    ap.add_argument("--keys", type=int, default=1_000, help="distinct partition keys (group e2e_sweep)")
    ap.add_argument("--ceiling-records", type=int, default=CEILING_RECORDS, help="ceiling: records per request")
    ap.add_argument("--rate", type=float, default=2_000.0, help="producer_steady: events per second")
    ap.add_argument("--seconds", type=float, default=24.0, help="producer_steady: how long it pushes")
    ap.add_argument("--shards", type=int, default=4, help="consumer_steady: leases to hold before it says ready")
    ap.add_argument("--ceiling-in-flight", type=int, default=POOL, help="ceiling: requests in flight")
    args = ap.parse_args()

    if args.peer in PRODUCERS:
        chunks = make_chunks(args.events) if (args.data_bytes, args.keys) == (100, 1_000) else sized_chunks(args)
        freeze_harness()
        run: Callable[[], Any] = {
            "treasure_engine": lambda: asyncio.run(produce_treasure_engine(args, chunks)),
            "async_kinesis": lambda: asyncio.run(produce_async_kinesis(args, chunks)),
            "aiokpl": lambda: asyncio.run(produce_aiokpl(args, chunks)),
            "boto3_agg": lambda: produce_boto3_agg(args, chunks),
            "ceiling": lambda: asyncio.run(produce_ceiling(args, chunks)),
        }[args.peer]
    else:
        run = {
            "consumer_treasure_engine": lambda: asyncio.run(consume_treasure_engine(args)),
            "consumer_boto3": lambda: consume_boto3(args),
            "producer_steady": lambda: asyncio.run(produce_steady(args)),
            "consumer_steady": lambda: asyncio.run(consume_steady(args)),
        }[args.peer]
    out = run()
    n = out.get("sent", args.events)
    out.update(peer=args.peer, events=n, events_per_s=n / out["wall_s"], cpu_per_event_ns=out["cpu_s"] / n * 1e9)
    out["process_cpu_s_total"] = process_cpu_s()
    payloads = out.pop("payloads", None)
    if payloads is not None:
        out["handled"] = len(payloads)
        out["distinct_payloads"] = len(set(payloads))
    print(json.dumps(out))
    if payloads is not None and out["distinct_payloads"] != n:
        print(f"{args.peer}: {out['distinct_payloads']} distinct events handled of {n}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
