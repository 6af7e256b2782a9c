"""Groups "consume" and "consume_plain": user records/s out of one GetRecords response body, no network.

Workloads (one page of 10,000 user records, as a real GetRecords page can carry; each event about 100 bytes of
JSON, partition keys from 1,000; the events of rust/core/benches/records.rs):

- "consume": 100 Kinesis records, each a KPL aggregate of 100 user records (made by ``_core.kpl_encode``);
- "consume_plain": 10,000 plain (not aggregated) Kinesis records.

Peers, per page:

- ``treasure_engine.parse_get_records + lanes(4)``: ``_core.parse_get_records(body, shard_id)``, then
  ``page.lanes(4)``, then ``handle(lane)`` for each of the 4 lanes: what the consumer does with a page.
- ``json.loads + aws_kinesis_agg.deaggregate_records``: what a Python user does without us:
  ``json.loads(body)``, each GetRecords record turned into the Lambda-event shape that ``deaggregate_records``
  expects (``{"kinesis": {"data": <base64>, "partitionKey", "sequenceNumber", ...}}``; the user has to write
  that conversion, so it is timed), ``deaggregate_records`` on the list, then ``handle(records)`` once. It does
  not split the records into lanes, so it does less work than the peer above.

``handle`` is a plain no-op function (``def handle(batch): pass``): the figure is the cost of getting records
to a handler, not of handling them. Neither side reads the payload then; ours builds each record's ``bytes``
only when ``Record.data`` is read, while the peer's records already hold their payload (in base64). The
"(handler reads data)" rows measure the same with a handler that reads every record's payload as bytes
(``record.data`` for ours; ``base64.b64decode(record["kinesis"]["data"])`` for the peer, which hands it out
re-encoded in base64), reported without a target.

Targets (from the issue; checked by bench/run.py on the "consume" medians, not asserted here): ours >= 2,000,000
user records/s, and >= 10x the peer in the same run. "consume_plain" is reported.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from treasure_engine import _core

# aws-kinesis-agg's deaggregator puts its own directory on sys.path (front!) when imported; put it back.
_saved_path = list(sys.path)
from aws_kinesis_agg.deaggregator import deaggregate_records  # type: ignore[import-untyped]  # noqa: E402

sys.path[:] = _saved_path

SHARD = "shardId-000000000000"
KINESIS_RECORDS = 100
PER_AGGREGATE = 100
USER_RECORDS = KINESIS_RECORDS * PER_AGGREGATE
KEYS = 1_000
LANES = 4

OURS = "treasure_engine.parse_get_records + lanes(4)"
PEER = "json.loads + aws_kinesis_agg.deaggregate_records"
OURS_READING = f"{OURS} (handler reads data)"
PEER_READING = f"{PEER} (handler reads data)"
PEERS = [OURS, PEER, OURS_READING, PEER_READING]
ROUNDS = {OURS: 60, PEER: 12, OURS_READING: 40, PEER_READING: 8}
WORKLOADS = {"consume": True, "consume_plain": False}


def event(i: int) -> tuple[bytes, str]:
    """The ``i``-th user event: about 100 bytes of JSON, and its partition key (as in the criterion bench)."""
    user = (i * 7919) % KEYS
    data = (
        f'{{"event_id":{i:>10},"user":"user-{user:06}","type":"page_view",'
        f'"path":"/products/{i % 20_000:05}","ms":{i % 1000:>4}}}'
    )
    return data.encode(), f"user-{user:06}"


def kinesis_record(data: bytes, partition_key: str, n: int) -> dict[str, Any]:
    return {
        "SequenceNumber": f"495903382714902566085596925383615710959215759{n:011}",
        "ApproximateArrivalTimestamp": round(1.7e9 + n * 0.001, 3),
        "Data": base64.b64encode(data).decode(),
        "PartitionKey": partition_key,
    }


def page_body(aggregated: bool) -> bytes:
    """A GetRecords response body of 10,000 user records, as Kinesis sends it."""
    events = [event(i) for i in range(USER_RECORDS)]
    if aggregated:
        records = []
        for n in range(KINESIS_RECORDS):
            chunk = events[n * PER_AGGREGATE : (n + 1) * PER_AGGREGATE]
            blob = _core.kpl_encode([(data, key, None) for data, key in chunk])
            records.append(kinesis_record(blob, chunk[0][1], n))
    else:
        records = [kinesis_record(data, key, n) for n, (data, key) in enumerate(events)]
    body = {
        "Records": records,
        "NextShardIterator": "AAAAAAAAAAHsW8zCWf9164uy8Epue6WS3w6wmj4a4USt+CNvgaBsuZ3iRTyLCBLl8dq6a7F8YZ1aMSG6",
        "MillisBehindLatest": 0,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def handle(batch: list[Any]) -> None:
    """The user's handler: a no-op, so that only the cost of getting the records to it is measured."""


def handle_reading(batch: list[_core.Record]) -> None:
    """A handler that reads every record's payload."""
    for record in batch:
        record.data  # noqa: B018


def handle_reading_peer(batch: list[dict[str, Any]]) -> None:
    """The same for aws-kinesis-agg's records, whose payload comes back in base64."""
    b64decode = base64.b64decode
    for record in batch:
        b64decode(record["kinesis"]["data"])


def ours(body: bytes, handler: Callable[[list[_core.Record]], None]) -> int:
    page = _core.parse_get_records(body, SHARD)
    n = 0
    for lane in page.lanes(LANES):
        handler(lane)
        n += len(lane)
    return n


def peer(body: bytes, handler: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    response = json.loads(body)
    # deaggregate_records takes Lambda's event records; GetRecords' fields have other names.
    lambda_records = [
        {
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "data": r["Data"],
                "partitionKey": r["PartitionKey"],
                "sequenceNumber": r["SequenceNumber"],
                "approximateArrivalTimestamp": r["ApproximateArrivalTimestamp"],
            }
        }
        for r in response["Records"]
    ]
    records: list[dict[str, Any]] = deaggregate_records(lambda_records)
    handler(records)
    return records


@pytest.fixture(scope="module")
def bodies() -> dict[str, bytes]:
    return {group: page_body(aggregated) for group, aggregated in WORKLOADS.items()}


@pytest.mark.bench
@pytest.mark.parametrize("group", list(WORKLOADS))
@pytest.mark.parametrize("peer_name", PEERS)
def test_consume(benchmark: BenchmarkFixture, group: str, peer_name: str, bodies: dict[str, bytes]) -> None:
    benchmark.group = group
    body = bodies[group]
    run: Callable[[], Any]
    if peer_name in (OURS, OURS_READING):
        ours_handler = handle if peer_name == OURS else handle_reading

        def run() -> int:
            return ours(body, ours_handler)

    else:
        peer_handler = handle if peer_name == PEER else handle_reading_peer

        def run() -> list[dict[str, Any]]:
            return peer(body, peer_handler)

    result = benchmark.pedantic(run, rounds=ROUNDS[peer_name], warmup_rounds=2, iterations=1)  # type: ignore[no-untyped-call]

    # The work was done: every user record reached the handler, de-aggregated as the workload says.
    if peer_name in (OURS, OURS_READING):
        assert result == USER_RECORDS
        page = _core.parse_get_records(body, SHARD)
        assert page.malformed == []
        records = page.records
        assert [r.data for r in records[:: USER_RECORDS // 10]] == [event(i)[0] for i in range(0, USER_RECORDS, 1000)]
        assert all(r.aggregated for r in records) is WORKLOADS[group]
    else:
        assert len(result) == USER_RECORDS
        first = result[1]["kinesis"]
        assert base64.b64decode(first["data"]) == event(1)[0]
        assert first.get("aggregated", False) is WORKLOADS[group]

    assert benchmark.stats is not None
    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        peer=peer_name,
        workload=group,
        events=USER_RECORDS,
        kinesis_records=KINESIS_RECORDS if WORKLOADS[group] else USER_RECORDS,
        body_bytes=len(body),
        lanes=LANES if peer_name in (OURS, OURS_READING) else 1,
        events_per_s_median=USER_RECORDS / stats.median,
        events_per_s_max=USER_RECORDS / stats.min,
    )
