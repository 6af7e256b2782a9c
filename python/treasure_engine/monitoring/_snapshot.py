"""Snapshots of the watched components: the metric handles a producer or consumer records into, and
the collector that turns their stats, the breakers and the dead-letter queues into one `Snapshot` per scrape."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.metrics_core import Metric

from treasure_engine import _core
from treasure_engine.monitoring._catalog import (
    BREAKER_STATE_CODES,
    CATALOG,
    OPEN_STATE_NAMES,
    REGISTRY,
    REQUEST_RESULTS,
    Family,
    Labels,
    Snapshot,
)
from treasure_engine.monitoring._exposition import families_of

if TYPE_CHECKING:
    from treasure_engine.breaker import CircuitBreaker
    from treasure_engine.dlq import DeadLetterQueue, DeadLetterStats


class ProducerMetrics:
    """The registry handles a watched producer records into, labeled with the name it is watched under."""

    __slots__ = ("duration", "labels", "records", "requests")

    def __init__(self, name: str) -> None:
        self.labels = {"name": name}
        self.duration = REGISTRY.histogram(
            "request_duration_seconds", CATALOG["request_duration_seconds"][1], self.labels
        )
        self.records = REGISTRY.histogram("request_records", CATALOG["request_records"][1], self.labels, kind="count")
        self.requests = {
            result: REGISTRY.counter("requests_total", CATALOG["requests_total"][1], {"name": name, "result": result})
            for result in REQUEST_RESULTS
        }

    def request(self, started: float, records: int, result: str) -> None:
        """One PutRecords exchange: `started` is its `time.perf_counter()`, `result` an `Outcome` value or
        "error" (an exception)."""
        self.duration.observe(time.perf_counter() - started)
        self.records.observe(records)
        counter = self.requests.get(result)
        if counter is not None:
            counter.inc()

    def remove(self) -> None:
        REGISTRY.remove("request_duration_seconds", self.labels)
        REGISTRY.remove("request_records", self.labels)
        for result in REQUEST_RESULTS:
            REGISTRY.remove("requests_total", {**self.labels, "result": result})


class ConsumerMetrics:
    """The registry handles a watched consumer records into."""

    __slots__ = ("batch", "duration", "labels")

    def __init__(self, name: str) -> None:
        self.labels = {"name": name}
        self.duration = REGISTRY.histogram(
            "consumer_handler_duration_seconds", CATALOG["consumer_handler_duration_seconds"][1], self.labels
        )
        self.batch = REGISTRY.histogram(
            "consumer_batch_records", CATALOG["consumer_batch_records"][1], self.labels, kind="count"
        )

    def handled(self, started: float, records: int) -> None:
        """One handler call of `records` records that started at `time.perf_counter()` `started`."""
        self.duration.observe(time.perf_counter() - started)
        self.batch.observe(records)

    def remove(self) -> None:
        REGISTRY.remove("consumer_handler_duration_seconds", self.labels)
        REGISTRY.remove("consumer_batch_records", self.labels)


class ProducerLike(Protocol):
    """What the collector reads from a producer (`Producer` is one)."""

    config: Any

    @property
    def attached_metrics(self) -> ProducerMetrics | None: ...
    def attach_metrics(self, metrics: ProducerMetrics | None) -> None: ...

    def stats_dict(self) -> dict[str, int]: ...
    @property
    def endpoint_breaker(self) -> CircuitBreaker | None: ...
    @property
    def dead_letter_queue(self) -> DeadLetterQueue | None: ...


class ConsumerLike(Protocol):
    """What the collector reads from a consumer (`Consumer` is one)."""

    config: Any

    @property
    def attached_metrics(self) -> ConsumerMetrics | None: ...
    def attach_metrics(self, metrics: ConsumerMetrics | None) -> None: ...

    def stats(self) -> dict[str, dict[str, Any]]: ...
    @property
    def breaker(self) -> CircuitBreaker | None: ...
    @property
    def dead_letter_queue(self) -> DeadLetterQueue | None: ...


class OldestAge:
    """Estimates the age of the oldest event in flight from the producer's counters, in acceptance order.

    The pipeline counts events but does not stamp the oldest one for Python. Events complete roughly in the
    order they were accepted, so the oldest event in flight is the `(accepted - in_flight + 1)`-th accepted,
    and it was accepted when the `accepted` counter first went past `accepted - in_flight`. Sampling the counter
    at each evaluation (every 250 ms) dates that moment to within one interval. Retries reorder a little: a
    straggler behind newer deliveries looks younger than it is (the estimate is then a lower bound).
    """

    __slots__ = ("_samples",)

    MAX_SAMPLES = 100_000

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def update(self, now: float, accepted: int, in_flight: int) -> float:
        """Records a sample; returns the estimated age in seconds (0 when nothing is in flight)."""
        samples = self._samples
        if not samples or accepted > samples[-1][1]:
            samples.append((now, accepted))
            if len(samples) > self.MAX_SAMPLES:
                samples.popleft()
        elif accepted < samples[-1][1]:  # a new pipeline behind the same object: start again
            samples.clear()
            samples.append((now, accepted))
        done = accepted - in_flight
        while len(samples) > 1 and samples[0][1] <= done:
            samples.popleft()
        if in_flight <= 0 or not samples:
            return 0.0
        return max(0.0, now - samples[0][0])


class _ProducerWatch:
    __slots__ = ("age", "dead_labels", "labels", "metrics", "name", "producer")

    def __init__(self, name: str, producer: ProducerLike, metrics: ProducerMetrics | None) -> None:
        self.name = name
        self.producer = producer
        self.metrics = metrics
        self.age = OldestAge()
        self.labels: Labels = (("name", name),)
        self.dead_labels: Labels = (("name", name), ("source", "producer"))


class _ConsumerWatch:
    __slots__ = ("consumer", "labels", "metrics", "name", "shard_labels")

    def __init__(self, name: str, consumer: ConsumerLike, metrics: ConsumerMetrics | None) -> None:
        self.name = name
        self.consumer = consumer
        self.metrics = metrics
        self.labels: Labels = (("name", name),)
        self.shard_labels: dict[str, tuple[Labels, Labels]] = {}
        """shard -> (its labels, its labels with source="consumer"), made once."""

    def labels_of(self, shard: str) -> tuple[Labels, Labels]:
        found = self.shard_labels.get(shard)
        if found is None:
            found = self.shard_labels[shard] = (
                (("name", self.name), ("shard", shard)),
                (("name", self.name), ("shard", shard), ("source", "consumer")),
            )
        return found


class _DlqWatch:
    """A dead-letter queue and its last figures (refreshed off the scrape path)."""

    __slots__ = ("get", "labels", "name", "refreshed_at", "stats")

    def __init__(self, name: str, get: Callable[[], DeadLetterQueue | None]) -> None:
        self.name = name
        self.labels: Labels = (("name", name),)
        self.get = get
        self.stats: DeadLetterStats | None = None
        self.refreshed_at = 0.0


def shard_stats(consumer: ConsumerLike) -> Iterable[Any]:
    """The consumer's per-shard statistics as objects with attributes (ShardStats): read in place, since
    `stats()` copies every shard into a dict (about 10 µs each)."""
    live = getattr(consumer, "shard_stats", None)
    if callable(live):
        return list(live())
    return [_Attrs(**{**v, "shard_id": k}) for k, v in consumer.stats().items()]


class _Attrs:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class SnapshotCollector:
    """Watches producers, consumers, breakers and dead-letter queues, and collects them into a `Snapshot`.

    Also a prometheus_client collector: `prometheus_client.REGISTRY.register(collector)` exposes the same
    metrics through an application's own prometheus_client server.
    """

    def __init__(self, *, registry: _core.Metrics = REGISTRY, breakers: Iterable[CircuitBreaker] | None = None) -> None:
        self.registry = registry
        self.producers: dict[str, _ProducerWatch] = {}
        self.consumers: dict[str, _ConsumerWatch] = {}
        self.dlqs: dict[str, _DlqWatch] = {}
        self._breakers = breakers
        self.extra_breakers: list[CircuitBreaker] = []
        """Breakers watched one by one (made without the registry)."""
        self.lag_status: dict[tuple[str, str], int] = {}
        """(consumer name, shard) -> lag status code, kept by the monitor's lag tracker."""
        self.alerts_firing: list[tuple[Labels, float]] = []
        """Set by the monitor's evaluator."""
        self._breaker_labels: dict[str, Labels] = {}

    # --- watching ----------------------------------------------------------------------------------------

    def add_producer(self, name: str, producer: ProducerLike, *, record: bool = True) -> None:
        if name in self.producers:
            raise ValueError(f"a producer named {name!r} is already watched")
        metrics = None
        if record:
            metrics = ProducerMetrics(name)
            producer.attach_metrics(metrics)
        self.producers[name] = _ProducerWatch(name, producer, metrics)

    def add_consumer(self, name: str, consumer: ConsumerLike, *, record: bool = True) -> None:
        if name in self.consumers:
            raise ValueError(f"a consumer named {name!r} is already watched")
        metrics = None
        if record:
            metrics = ConsumerMetrics(name)
            consumer.attach_metrics(metrics)
        self.consumers[name] = _ConsumerWatch(name, consumer, metrics)

    def add_dlq(self, name: str, get: Callable[[], DeadLetterQueue | None]) -> None:
        if name in self.dlqs:
            raise ValueError(f"a dead-letter queue named {name!r} is already watched")
        self.dlqs[name] = _DlqWatch(name, get)

    def detach(self) -> None:
        """Stops recording into the registry: the components' handles are dropped and their series removed."""
        for pw in self.producers.values():
            if pw.metrics is not None:
                if pw.producer.attached_metrics is pw.metrics:
                    pw.producer.attach_metrics(None)
                pw.metrics.remove()
                pw.metrics = None
        for cw in self.consumers.values():
            if cw.metrics is not None:
                if cw.consumer.attached_metrics is cw.metrics:
                    cw.consumer.attach_metrics(None)
                cw.metrics.remove()
                cw.metrics = None

    def breakers(self) -> list[tuple[str, CircuitBreaker]]:
        """Every breaker to report, once each, by a unique name: the registry's (`treasure_engine.breakers`),
        the producers' endpoint breakers and the consumers' breakers."""
        if self._breakers is None:
            from treasure_engine.breaker import breakers as registry

            found: list[CircuitBreaker] = list(registry)
        else:
            found = list(self._breakers)
        found.extend(self.extra_breakers)
        for pw in self.producers.values():
            b = pw.producer.endpoint_breaker
            if b is not None:
                found.append(b)
        for cw in self.consumers.values():
            b = cw.consumer.breaker
            if b is not None:
                found.append(b)
        seen: set[int] = set()
        names: set[str] = set()
        out: list[tuple[str, CircuitBreaker]] = []
        for b in found:
            if id(b) in seen:
                continue
            seen.add(id(b))
            name, n = b.name, 1
            while name in names:
                n += 1
                name = f"{b.name}#{n}"
            names.add(name)
            out.append((name, b))
        return out

    # --- collecting --------------------------------------------------------------------------------------

    def collect_snapshot(self, now: float | None = None) -> Snapshot:
        """Everything, now: one FFI call per producer, per breaker and for the registry."""
        at = time.monotonic() if now is None else now
        wall = time.time()
        families: dict[str, Family] = {}

        def family(name: str) -> Family:
            f = families.get(name)
            if f is None:
                kind, help = CATALOG[name]
                f = families[name] = Family(name, help, kind)
            return f

        for pw in self.producers.values():
            self._collect_producer(pw, at, family)
        for cw in self.consumers.values():
            self._collect_consumer(cw, family)
        self._collect_breakers(family)
        self._collect_dlqs(wall, family)
        if self.alerts_firing:
            firing = family("alerts_firing")
            for alert_labels, count in self.alerts_firing:
                firing.add(alert_labels, count)
        for name, help, kind, labels, value in self.registry.snapshot():
            found = families.get(name)
            if found is None:
                found = families[name] = Family(name, help, kind)
            found.labels.append(labels)
            found.values.append(value)
        return Snapshot(families, at, wall)

    def _collect_producer(self, pw: _ProducerWatch, now: float, family: Callable[[str], Family]) -> None:
        p = pw.producer
        s = p.stats_dict()
        labels = pw.labels
        in_flight = s.get("in_flight", 0)
        accepted = s.get("accepted", 0)
        estimate = pw.age.update(now, accepted, in_flight)
        exact = s.get("oldest_event_age_s")
        age: float = estimate if exact is None else exact
        ring_used = s.get("ring_bytes_used", 0)
        spill = s.get("spill_backlog_bytes", 0)
        cfg = p.config
        ring = getattr(cfg, "ring_bytes", 0) or 0
        critical = ring_used >= ring * getattr(cfg, "critical_backlog", 1.0) or spill > 0
        family("events_accepted_total").add(labels, accepted)
        family("events_refused_total").add(labels, s.get("refused", 0))
        family("events_delivered_total").add(labels, s.get("delivered", 0))
        family("events_retried_total").add(labels, s.get("retried", 0))
        family("events_spilled_total").add(labels, s.get("spilled", 0))
        family("dead_lettered_total").add(pw.dead_labels, s.get("dead_lettered", 0))
        family("records_throttled_total").add(labels, s.get("throttled", 0))
        family("producer_wrong_shard_records_total").add(labels, s.get("wrong_shard_records", 0))
        storage = family("storage_errors_total")
        storage.add((*labels, ("store", "wal")), s.get("wal_errors", 0))
        storage.add((*labels, ("store", "spill")), s.get("spill_errors", 0))
        family("backlog_events").add(labels, in_flight)
        family("backlog_critical").add(labels, 1.0 if critical and ring else 0.0)
        family("oldest_event_age_seconds").add(labels, age)
        family("ring_bytes").add(labels, ring_used)
        family("ring_capacity_bytes").add(labels, ring)
        family("batcher_buffered_bytes").add(labels, s.get("buffered_bytes", 0))
        family("spill_bytes").add(labels, spill)
        family("dead_letter_pending").add(labels, s.get("dead_letter_pending", 0))
        family("requests_in_flight").add(labels, s.get("outstanding_requests", 0))

    def _collect_consumer(self, cw: _ConsumerWatch, family: Callable[[str], Family]) -> None:
        name = cw.name
        behind = family("consumer_behind_latest_seconds")
        lag = family("consumer_lag_seconds")
        estimated = family("consumer_lag_estimated")
        wall = time.time()
        read = family("consumer_records_read_total")
        handled = family("consumer_records_handled_total")
        failed = family("consumer_records_failed_total")
        malformed = family("consumer_records_malformed_total")
        strays = family("consumer_out_of_range_records_total")
        skipped = family("consumer_skipped_out_of_range_records_total")
        dead = family("dead_lettered_total")
        paused = family("consumer_paused")
        status = family("consumer_lag_status")
        lag_status = self.lag_status
        labels_of = cw.labels_of
        owned = 0
        for s in shard_stats(cw.consumer):
            shard = s.shard_id
            labels, dead_labels = labels_of(shard)
            read.labels.append(labels)
            read.values.append(s.records_read)
            handled.labels.append(labels)
            handled.values.append(s.records_handled)
            failed.labels.append(labels)
            failed.values.append(s.records_failed)
            malformed.labels.append(labels)
            malformed.values.append(s.malformed)
            strays.labels.append(labels)
            strays.values.append(s.out_of_range_records)
            skipped.labels.append(labels)
            skipped.values.append(s.skipped_out_of_range_records)
            dead.labels.append(dead_labels)
            dead.values.append(s.records_dead_lettered)
            if not s.owned:
                continue
            owned += 1
            paused.labels.append(labels)
            paused.values.append(1.0 if s.paused else 0.0)
            status.labels.append(labels)
            status.values.append(lag_status.get((name, shard), 0))
            if s.millis_behind_latest is not None and not s.ended:
                behind.labels.append(labels)
                behind.values.append(s.millis_behind_latest / 1000.0)
                lag_ms, guessed = s.lag(wall)
                lag.labels.append(labels)
                lag.values.append((lag_ms or 0) / 1000.0)
                estimated.labels.append(labels)
                estimated.values.append(1.0 if guessed else 0.0)
        family("consumer_leases").add(cw.labels, owned)

    def _collect_breakers(self, family: Callable[[str], Family]) -> None:
        state = family("breaker_state")
        open_ = family("breaker_open")
        rate = family("breaker_failure_rate")
        transitions = family("breaker_transitions_total")
        refused = family("breaker_calls_not_permitted_total")
        cache = self._breaker_labels
        for name, b in self.breakers():
            m = b.metrics()
            labels = cache.get(name)
            if labels is None:
                labels = cache[name] = (("name", name),)
            s = m.state.value
            state.add(labels, BREAKER_STATE_CODES.get(s, -1))
            open_.add(labels, 1.0 if s in OPEN_STATE_NAMES else 0.0)
            if m.failure_rate is not None:
                rate.add(labels, m.failure_rate)
            transitions.add(labels, m.transitions)
            refused.add(labels, m.not_permitted)

    def _collect_dlqs(self, wall: float, family: Callable[[str], Family]) -> None:
        for dw in self.dlqs.values():
            s = dw.stats
            if s is None:
                continue
            labels = dw.labels
            family("dlq_entries").add(labels, s.count)
            family("dlq_bytes").add(labels, s.bytes)
            age = 0.0 if s.oldest_age_s is None else s.oldest_age_s + max(0.0, wall - dw.refreshed_at)
            family("dlq_oldest_entry_age_seconds").add(labels, age)
            family("dlq_writes_per_second").add(labels, s.rate_per_s)
            family("dlq_log_bytes").add(labels, s.log_bytes)

    def refresh_dlqs(self) -> None:
        """Reads every watched dead-letter queue's figures (scans each log: call it off the event loop)."""
        from treasure_engine.dlq import DeadLetterStats

        for dw in list(self.dlqs.values()):
            dlq = dw.get()
            if dlq is None:
                continue
            now = time.time()
            if not dlq.path.is_dir():
                stats = DeadLetterStats(
                    count=0,
                    bytes=0,
                    oldest_age_s=None,
                    rate_per_s=0.0,
                    window_s=60.0,
                    redriven=0,
                    purged=0,
                    corrupted_frames=0,
                    by_error_type={},
                    log_bytes=0,
                )
            else:
                stats = dlq.stats(window_s=60.0)
            dw.stats, dw.refreshed_at = stats, now

    # --- prometheus_client -------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: the snapshot as metric families."""
        yield from families_of(self.collect_snapshot())
