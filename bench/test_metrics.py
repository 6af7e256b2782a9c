"""Groups "metrics_scrape" and "submit_monitored": what the monitor costs.

"metrics_scrape": one full snapshot plus its exposition, i.e. the body of ``GET /metrics`` without the HTTP
round trip (``Monitor.metrics_text()``), for a process watching one producer (a started pipeline: one
``stats()`` FFI call), one consumer holding 64 shards, 10 circuit breakers and a dead-letter queue, with the
request and handler histograms recorded. Between two rounds (untimed) every shard reads and handles records and
its lag moves, so that three of its eight series change from one scrape to the next. Peers:

- ``Monitor.metrics_text (snapshot + exposition)``: ours (the snapshot, then the cached text encoder);
- ``prometheus_client.generate_latest (same snapshot)``: the same snapshot turned into prometheus_client metric
  families and written by prometheus_client itself (the body is byte for byte the same; tests/unit holds them
  equal), the reference the encoder replaces.

"submit_monitored": ns per event of ``Pipeline.submit`` (the same loop as group "submit") with nothing else
running, and while a thread evaluates the monitor's rules and renders /metrics every 250 ms, the monitor's own
cadence (and the completer thread records each request's latency and size into the registry, as the
producer's sender does while watched). A stress peer renders /metrics every 10 ms, and the baseline runs again
last, so that the report shows how much the baseline itself moves between runs on this machine. Each round starts
drained.

Targets (checked by bench/run.py, not asserted here): snapshot + exposition < 1 ms (median); submit monitored /
submit alone reported as a ratio, "within noise": <= 1.10x, or the baseline's own spread if larger.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from pytest_benchmark.fixture import BenchmarkFixture

from conftest import EVENTS, CannedPipeline, success_response
from treasure_engine import BreakerConfig, CircuitBreaker, Consumer, ConsumerConfig, DeadLetterQueue, breakers
from treasure_engine.consumer._types import ShardStats
from treasure_engine.dlq._entries import DeadLetter
from treasure_engine.monitoring._exposition import families_of
from treasure_engine.monitoring._monitor import Monitor, MonitorConfig
from treasure_engine.monitoring._snapshot import ProducerMetrics

SHARDS = 64
BREAKERS = 10
SCRAPE_ROUNDS = 2000
SUBMIT_ROUNDS = 500

OURS = "Monitor.metrics_text (snapshot + exposition)"
REFERENCE = "prometheus_client.generate_latest (same snapshot)"
SCRAPE_PEERS = [OURS, REFERENCE]

ALONE = "Pipeline.submit"
MONITORED = "Pipeline.submit (monitored: rules + /metrics every 250 ms)"
STRESSED = "Pipeline.submit (/metrics every 10 ms, stress)"
ALONE_AGAIN = "Pipeline.submit (again, after the others)"
SUBMIT_PEERS = [ALONE, MONITORED, STRESSED, ALONE_AGAIN]


class PipelineProducer:
    """What the monitor reads from a producer, over a started canned pipeline (`Producer` needs an endpoint)."""

    def __init__(self, canned: CannedPipeline) -> None:
        self.canned = canned
        self.config = _Config(stream="bench", ring_bytes=canned.ring_bytes, critical_backlog=0.8)
        self._metrics: ProducerMetrics | None = None
        self.endpoint_breaker = CircuitBreaker("kinesis:bench", BreakerConfig())
        self.dead_letter_queue: DeadLetterQueue | None = None

    @property
    def attached_metrics(self) -> ProducerMetrics | None:
        """The handles a watching Monitor attached (the `ProducerLike` protocol, as `Producer` has it)."""
        return self._metrics

    def attach_metrics(self, metrics: ProducerMetrics | None) -> None:
        self._metrics = metrics

    def stats_dict(self) -> dict[str, int]:
        s = dict(self.canned.pipeline.stats())
        s["dead_letter_pending"] = 0
        return s


class _Config:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class RecordingPipeline(CannedPipeline):
    """The canned pipeline whose completer also records each request into the registry, as a watched
    producer's sender does."""

    producer: PipelineProducer | None = None

    def _complete(self, requests: list[Any]) -> None:
        producer = self.producer
        metrics = producer.attached_metrics if producer is not None else None
        for req in requests:
            started = time.perf_counter()
            body = self._responses.get(req.records)
            if body is None:
                body = self._responses[req.records] = success_response(req.records)
            records = req.records
            self.pipeline.complete(req, body)
            self.completed_requests += 1
            if metrics is not None:
                metrics.request(started, records, "ok")


async def _noop(records: list[Any]) -> None:
    return None


def monitored(tmp: Path, canned: CannedPipeline) -> tuple[Monitor, Callable[[], None]]:
    """A monitor (no HTTP server, no event loop needed) watching the canned producer, a 64-shard consumer,
    10 breakers in all and a dead-letter queue; returns it and its cleanup."""
    producer = PipelineProducer(canned)
    if isinstance(canned, RecordingPipeline):
        canned.producer = producer
    consumer = Consumer(ConsumerConfig(stream="bench", application="bench-metrics", breaker=BreakerConfig()), _noop)
    for i in range(SHARDS):
        shard = f"shardId-{i:012d}"
        # What the lease loop and the readers keep per shard.
        consumer._stats[shard] = ShardStats(
            shard,
            checkpoint=str(49_590_338_271_490_256_608_559_692_538_361_571_095_921_575_989_136_588_898 + i * 1000),
            millis_behind_latest=i * 37,
            records_read=100_000 + i,
            records_handled=99_000 + i,
            records_failed=i % 3,
            records_dead_lettered=i % 2,
        )
    # 10 breakers: the producer's endpoint breaker, the consumer's, and 8 in the registry.
    names = [f"bench-metrics-{i}" for i in range(BREAKERS - 2)]
    for name in names:
        breakers.get(name, BreakerConfig())
    dlq = DeadLetterQueue(tmp / "dlq")
    dlq.put(
        [
            DeadLetter(
                data=b"x" * 100,
                partition_key="k",
                source="producer",
                stream="bench",
                attempts=3,
                error_type="MaxAttemptsExceeded",
                error_message="bench",
                first_failure_at=time.time(),
                dead_lettered_at=time.time(),
            )
        ]
    )
    monitor = Monitor(MonitorConfig(port=None))
    monitor.watch_producer(producer, name="bench")
    monitor.watch_consumer(consumer, name="bench-metrics")
    monitor.watch_dlq(dlq, name="bench-dlq")
    producer_metrics, consumer_metrics = producer.attached_metrics, consumer.attached_metrics
    assert producer_metrics is not None
    for v in (0.002, 0.01, 0.05, 0.2):
        producer_metrics.request(time.perf_counter() - v, 500, "ok")
    assert consumer_metrics is not None
    for n in (10, 100):
        consumer_metrics.handled(time.perf_counter() - 0.001, n)
    monitor._collector.refresh_dlqs()
    monitor.evaluate()  # lag statuses and alert series in place, as between two evaluations

    def cleanup() -> None:
        asyncio.run(monitor.stop())
        dlq.close()
        for name in names:
            breakers.remove(name)
        breakers.remove("bench-metrics-downstream")

    return monitor, cleanup


@pytest.fixture(scope="module")
def scrape_pipeline() -> Iterator[CannedPipeline]:
    canned = CannedPipeline()
    try:
        yield canned
    finally:
        canned.close()


@pytest.mark.bench
@pytest.mark.parametrize("peer", SCRAPE_PEERS)
def test_metrics_scrape(
    benchmark: BenchmarkFixture, peer: str, scrape_pipeline: CannedPipeline, tmp_path: Path
) -> None:
    benchmark.group = "metrics_scrape"
    monitor, cleanup = monitored(tmp_path, scrape_pipeline)
    collector = monitor.collector()
    consumer = monitor._collector.consumers["bench-metrics"].consumer
    try:
        if peer == OURS:
            run: Callable[[], bytes] = monitor.metrics_text
        else:

            class SameSnapshot:
                def collect(self) -> Any:
                    return families_of(collector.collect_snapshot())

            registry = CollectorRegistry(auto_describe=False)
            registry.register(SameSnapshot())

            def run() -> bytes:
                return generate_latest(registry)

        shard_stats = list(consumer._stats.values())

        def progress() -> None:
            """Between two scrapes every shard read and handled records, and its lag moved (untimed)."""
            for s in shard_stats:
                s.records_read += 7
                s.records_handled += 7
                s.millis_behind_latest = (s.millis_behind_latest or 0) + 1

        body = run()
        rounds = SCRAPE_ROUNDS if peer == OURS else SCRAPE_ROUNDS // 10
        benchmark.pedantic(run, setup=progress, rounds=rounds, warmup_rounds=20)
        snapshot = collector.collect_snapshot()
        shards = {dict(labels)["shard"] for labels, _ in snapshot.families["consumer_records_read_total"].series}
        breaker_names = [dict(labels)["name"] for labels, _ in snapshot.families["breaker_state"].series]
    finally:
        cleanup()
    assert len(shards) == SHARDS
    assert len(breaker_names) == BREAKERS, breaker_names
    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        peer=peer,
        shards=SHARDS,
        breakers=len(breaker_names),
        series=sum(len(f.series) for f in snapshot),
        lines=body.count(b"\n"),
        body_bytes=len(body),
        ms_median=stats.median * 1e3,
        ms_min=stats.min * 1e3,
    )


@pytest.fixture(scope="module")
def recording_pipeline(submit_events: list[tuple[bytes, str]]) -> Iterator[RecordingPipeline]:
    canned = RecordingPipeline()
    try:
        canned.warm(submit_events)
        yield canned
    finally:
        canned.close()


class Scraper:
    """A thread that evaluates the rules every `evaluate_s` and renders /metrics every `scrape_s`."""

    def __init__(self, monitor: Monitor, evaluate_s: float | None, scrape_s: float) -> None:
        self.monitor = monitor
        self.evaluate_s = evaluate_s
        self.scrape_s = scrape_s
        self.scrapes = 0
        self.evaluations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def _run(self) -> None:
        next_eval = next_scrape = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if self.evaluate_s is not None and now >= next_eval:
                self.monitor.evaluate()
                self.evaluations += 1
                next_eval = now + self.evaluate_s
            if now >= next_scrape:
                self.monitor.metrics_text()
                self.scrapes += 1
                next_scrape = now + self.scrape_s
            wake = min(next_scrape, next_eval if self.evaluate_s is not None else next_scrape)
            self._stop.wait(max(0.0, wake - time.monotonic()))

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.bench
@pytest.mark.parametrize("peer", SUBMIT_PEERS)
def test_submit_monitored(
    benchmark: BenchmarkFixture,
    peer: str,
    submit_events: list[tuple[bytes, str]],
    recording_pipeline: RecordingPipeline,
    tmp_path: Path,
) -> None:
    benchmark.group = "submit_monitored"
    events = submit_events
    pipeline = recording_pipeline.pipeline
    monitor, cleanup = monitored(tmp_path, recording_pipeline)

    def submit() -> None:
        submit = pipeline.submit
        for data, key in events:
            submit(data, key)

    before = pipeline.stats()
    scraper = None
    try:
        if peer in (ALONE, ALONE_AGAIN):
            recording_pipeline.producer = None  # nothing recorded, nothing scraped
            benchmark.pedantic(submit, setup=recording_pipeline.drain, rounds=SUBMIT_ROUNDS, warmup_rounds=5)
        else:
            every = 0.25 if peer == MONITORED else 0.01
            with Scraper(monitor, 0.25 if peer == MONITORED else None, every) as scraper:
                benchmark.pedantic(submit, setup=recording_pipeline.drain, rounds=SUBMIT_ROUNDS, warmup_rounds=5)
        recording_pipeline.drain()
    finally:
        cleanup()
    after = pipeline.stats()
    assert after["accepted"] - before["accepted"] == EVENTS * (SUBMIT_ROUNDS + 5)
    assert after["delivered"] - before["delivered"] == EVENTS * (SUBMIT_ROUNDS + 5)
    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        peer=peer,
        events_per_round=EVENTS,
        per_event_ns_median=stats.median / EVENTS * 1e9,
        per_event_ns_min=stats.min / EVENTS * 1e9,
        scrapes=scraper.scrapes if scraper is not None else 0,
        evaluations=scraper.evaluations if scraper is not None else 0,
    )
