"""Group "submit": what handing one event to the producer costs the calling thread.

Peers, each a loop over the same pre-built list of 10,000 ``(bytes, str)`` tuples (100-byte payloads,
10,000 keys):

- ``queue.SimpleQueue.put``: the fastest thread-safe hand-off in the standard library, handed the same event
  in the same loop shape as ``submit`` (``for data, key in events: put((data, key))``): a service replacing
  a queue hand-off with ``submit`` writes exactly this, so it is the peer the targets are measured against;
- ``queue.SimpleQueue.put (pre-built tuple)``: ``put(event)`` with the tuple already made, for reference
  (it skips the unpacking and packing every real caller does);
- ``Pipeline.submit``: ``submit(data, key)`` per event (``Producer.submit`` *is* this method once started);
- ``Pipeline.submit_many``: one call taking the whole list.

The pipeline is a started ``_core.Pipeline`` with a 64 MiB ring whose requests a background thread completes
with a canned success response (conftest ``canned_pipeline``), so the batcher runs and the ring never fills;
the ring is warmed first. Each round starts from a drained pipeline (the untimed setup flushes it).

Targets (from the issue; checked by bench/run.py, not asserted here): submit <= 2x put,
submit_many <= 0.5x put, per event, medians of the same run.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from conftest import EVENTS, CannedPipeline

ROUNDS = 200
PEERS = [
    "queue.SimpleQueue.put",
    "Pipeline.submit",
    "Pipeline.submit_many",
    "queue.SimpleQueue.put (pre-built tuple)",
]


@pytest.mark.bench
@pytest.mark.parametrize("peer", PEERS)
def test_submit(
    benchmark: BenchmarkFixture,
    peer: str,
    submit_events: list[tuple[bytes, str]],
    canned_pipeline: CannedPipeline,
) -> None:
    benchmark.group = "submit"
    events = submit_events
    pipeline = canned_pipeline.pipeline
    holder: list[queue.SimpleQueue[tuple[bytes, str]]] = [queue.SimpleQueue()]
    accepted: list[int] = []

    def put() -> None:
        put = holder[0].put
        for data, key in events:
            put((data, key))

    def put_prebuilt() -> None:
        put = holder[0].put
        for event in events:
            put(event)

    def submit() -> None:
        submit = pipeline.submit
        for data, key in events:
            submit(data, key)

    def submit_many() -> None:
        accepted.append(pipeline.submit_many(events))

    run: Callable[[], None] = {PEERS[0]: put, PEERS[1]: submit, PEERS[2]: submit_many, PEERS[3]: put_prebuilt}[peer]

    def setup() -> None:
        holder[0] = queue.SimpleQueue()
        canned_pipeline.drain()

    before = pipeline.stats()
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=5, iterations=1)
    canned_pipeline.drain()
    after = pipeline.stats()

    if peer in (PEERS[0], PEERS[3]):
        assert holder[0].qsize() == EVENTS
    else:
        # Every event was accepted (the ring never filled) and delivered to the canned endpoint.
        assert after["refused"] == before["refused"]
        assert after["accepted"] - before["accepted"] == EVENTS * (ROUNDS + 5)
        assert after["delivered"] - before["delivered"] == EVENTS * (ROUNDS + 5)
        assert all(n == EVENTS for n in accepted)

    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        peer=peer,
        events_per_round=EVENTS,
        per_event_ns_median=stats.median / EVENTS * 1e9,
        per_event_ns_min=stats.min / EVENTS * 1e9,
        per_event_ns_mean=stats.mean / EVENTS * 1e9,
    )
