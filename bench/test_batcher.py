"""Group "aggregate": events/s turned into KPL aggregated records, no network.

Peers, over the same 100,000 events (100-byte payloads, 10,000 keys; the events of
rust/core/benches/batch.rs):

- ``treasure_engine.seal_offline``: ``_core.seal_offline(stream, 4 shards, events)``, the batcher's routing
  (MD5 of each key), KPL aggregation (51,200-byte aggregates) and PutRecords request sealing (base64 into
  JSON bodies) on the calling thread. The conversion of the Python list into Rust is included: a user calls
  it the same way.
- ``aws_kinesis_agg.RecordAggregator``: ``add_user_record(partition_key, data)`` for each event with the
  same 51,200-byte aggregate limit, ``get_contents()`` on every completed record and on the final
  ``clear_and_get()``, as a real user does. It does not route by shard nor build request bodies, so it does
  less work than the peer above.

Targets (from the issue; checked by bench/run.py on the pure-Rust criterion figure of the same run,
``cargo bench -p treasure_core --bench batch``): >= 5,000,000 events/s on one core, and >= 30x
aws-kinesis-agg.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aws_kinesis_agg.aggregator import RecordAggregator
from pytest_benchmark.fixture import BenchmarkFixture

from conftest import STREAM, make_events, shard_list
from treasure_engine import _core

N = 100_000
AGGREGATION_MAX_BYTES = 51_200
PEERS = ["treasure_engine.seal_offline", "aws_kinesis_agg.RecordAggregator"]
ROUNDS = {PEERS[0]: 15, PEERS[1]: 5}


@pytest.fixture(scope="module")
def agg_events() -> list[tuple[bytes, str]]:
    return make_events(N)


def seal(events: list[tuple[bytes, str]], shards: list[tuple[str, int, int]]) -> list[bytes]:
    return _core.seal_offline(STREAM, shards, events, aggregation_max_bytes=AGGREGATION_MAX_BYTES)


def aws_kinesis_agg(events: list[tuple[bytes, str]]) -> list[tuple[str, str, bytes]]:
    aggregator = RecordAggregator(max_size=AGGREGATION_MAX_BYTES)
    out = []
    for data, key in events:
        record = aggregator.add_user_record(key, data)
        if record is not None:
            out.append(record.get_contents())
    last = aggregator.clear_and_get()
    if last is not None:
        out.append(last.get_contents())
    return out


def count_sealed_events(bodies: list[bytes]) -> int:
    """Events inside PutRecords bodies (each record a KPL aggregate, or a single event)."""
    n = 0
    for body in bodies:
        for record in orjson.loads(body)["Records"]:
            blob = base64.b64decode(record["Data"])
            n += len(_core.kpl_decode(blob)) if _core.kpl_is_aggregated(blob) else 1
    return n


@pytest.mark.bench
@pytest.mark.parametrize("peer", PEERS)
def test_aggregate(benchmark: BenchmarkFixture, peer: str, agg_events: list[tuple[bytes, str]]) -> None:
    benchmark.group = "aggregate"
    shards = shard_list(4)
    run: Callable[[], Any]
    if peer == PEERS[0]:

        def run() -> list[bytes]:
            return seal(agg_events, shards)

    else:

        def run() -> list[tuple[str, str, bytes]]:
            return aws_kinesis_agg(agg_events)

    result = benchmark.pedantic(run, rounds=ROUNDS[peer], warmup_rounds=1, iterations=1)

    # The work was done: every event is in the output.
    if peer == PEERS[0]:
        assert count_sealed_events(result) == N
        output_bytes = sum(len(b) for b in result)
        outputs = len(result)
    else:
        assert sum(len(_core.kpl_decode(blob)) for _, _, blob in result) == N
        output_bytes = sum(len(blob) for _, _, blob in result)
        outputs = len(result)

    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        peer=peer,
        events=N,
        events_per_s_median=N / stats.median,
        events_per_s_max=N / stats.min,
        outputs=outputs,
        output_bytes=output_bytes,
    )
