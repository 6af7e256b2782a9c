"""`treasure-engine demo`: push a burst through an embedded Kinesis endpoint and balance the books.

Until the full peak-sale demo lands, it pushes 1,000,000 events and prints the accounting:
accepted == delivered + dead-lettered, in flight 0, and every event found in the stream exactly once.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import orjson

from treasure_engine import _core
from treasure_engine.config import ProducerConfig
from treasure_engine.producer import Producer

__all__ = ["run_demo"]


def _read_ids(endpoint_url: str, stream: str, region: str) -> tuple[int, int]:
    """(unique ids, total events) found in the stream, de-aggregating KPL records."""
    import boto3

    client = boto3.client("kinesis", endpoint_url=endpoint_url, region_name=region)
    seen: set[bytes] = set()
    total = 0
    for shard in client.list_shards(StreamName=stream)["Shards"]:
        it = client.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON")[
            "ShardIterator"
        ]
        while it:
            page = client.get_records(ShardIterator=it, Limit=10_000)
            for rec in page["Records"]:
                data = rec["Data"]
                subs = [d for d, _k, _e in _core.kpl_decode(data)] if _core.kpl_is_aggregated(data) else [data]
                for d in subs:
                    seen.add(d[: d.index(b",")])
                    total += 1
            if not page["Records"]:
                break
            it = page.get("NextShardIterator")
    return len(seen), total


async def _produce(endpoint_url: str, stream: str, events: int, shards: int) -> dict[str, Any]:
    config = ProducerConfig(
        stream=stream,
        endpoint_url=endpoint_url,
        region="us-east-1",
        linger_ms=20,
        ordered=True,  # one request in flight per shard: moto loses concurrent writes to one shard
        ring_bytes=128 * 1024 * 1024,
        # "block" would stall this event loop (the sender runs on it): refuse and retry after a yield instead.
        overflow="reject",
    )
    async with Producer(config) as producer:
        started = time.perf_counter()
        batch: list[tuple[bytes, str]] = []
        for i in range(events):
            batch.append(
                (
                    b'%d,{"hunt":"peak-sale","user":%d,"clue":%d}' % (i, i % 50_000, i % 97),
                    f"user-{i % 50_000}",
                )
            )
            if len(batch) == 10_000:
                accepted = producer.submit_many(batch)
                while accepted < len(batch):  # ring full: let the sender drain, then carry on
                    await asyncio.sleep(0.01)
                    accepted += producer.submit_many(batch[accepted:])
                batch.clear()
                await asyncio.sleep(0)
        if batch:
            producer.submit_many(batch)
        submitted = time.perf_counter() - started
        await producer.flush(timeout=300)
        elapsed = time.perf_counter() - started
        stats = producer.stats()
    return {
        "events": events,
        "shards": shards,
        "submit_s": round(submitted, 3),
        "delivered_s": round(elapsed, 3),
        "accepted": stats.accepted,
        "delivered": stats.delivered,
        "dead_lettered": stats.dead_lettered,
        "in_flight": stats.in_flight,
        "refused": stats.refused,
        "requests": stats.requests,
        "kinesis_records": stats.records_sent,
        "retried": stats.retried,
    }


def run_demo(events: int = 1_000_000, shards: int = 16, endpoint_url: str | None = None, as_json: bool = False) -> int:
    """Runs the demo; returns the exit code (0 only when nothing was lost)."""
    from treasure_engine.embedded import EmbeddedAWS

    stream = f"treasure-demo-{os.getpid()}"
    server = None
    if endpoint_url is None:
        server = EmbeddedAWS().start()
        endpoint_url = server.endpoint_url
    try:
        if server is not None:
            server.create_stream(stream, shards)
        else:
            import boto3

            client = boto3.client("kinesis", endpoint_url=endpoint_url, region_name="us-east-1")
            client.create_stream(StreamName=stream, ShardCount=shards)
            client.get_waiter("stream_exists").wait(StreamName=stream, WaiterConfig={"Delay": 0.2})
        result = asyncio.run(_produce(endpoint_url, stream, events, shards))
        unique, total = _read_ids(endpoint_url, stream, "us-east-1")
    finally:
        if server is not None:
            server.stop()
    result["found_unique"] = unique
    result["duplicates"] = total - unique
    result["lost"] = result["accepted"] - result["dead_lettered"] - unique
    if as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        width = max(len(k) for k in result)
        print("treasure_engine demo: the books")
        for key, value in result.items():
            print(f"  {key:<{width}}  {value:>12,}" if isinstance(value, int) else f"  {key:<{width}}  {value:>12}")
        print(f"  events/s (submit)  {events / result['submit_s']:>12,.0f}")
        print(f"  events/s (delivered)  {events / result['delivered_s']:>9,.0f}")
    return 0 if result["lost"] == 0 and result["in_flight"] == 0 else 1
