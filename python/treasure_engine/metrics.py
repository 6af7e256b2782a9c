"""Metrics: the process-wide registry, and the state of producers, consumers, breakers and dead-letter queues
collected into one `Snapshot` per scrape or evaluation.

Two sources make a snapshot:

- `REGISTRY`, a Rust `_core.Metrics`: counters and histograms recorded as things happen (request latency, batch
  sizes, handler latency), read with one `snapshot()` call;
- the components' own counters, read once each: `Producer.stats_dict()` (one FFI call), the consumer's shard
  statistics, each breaker's metrics, and the dead-letter queues' figures, which a background task refreshes
  (`DeadLetterQueue.stats()` scans the log, so it never runs on the scrape path).

Names here carry no prefix; the exposition adds `treasure_engine_`. `CATALOG` lists every name this module
makes, with its kind and help; rules are checked against it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from treasure_engine import _core

if TYPE_CHECKING:
    from treasure_engine.breaker import CircuitBreaker
    from treasure_engine.dlq import DeadLetterQueue, DeadLetterStats

__all__ = [
    "CATALOG",
    "PREFIX",
    "REGISTRY",
    "ConsumerMetrics",
    "Family",
    "ProducerMetrics",
    "Snapshot",
    "SnapshotCollector",
    "encode",
]

REGISTRY: Final = _core.Metrics()
"""The process-wide registry of counters, gauges and histograms recorded as things happen (thread-safe)."""

PREFIX: Final = "treasure_engine_"
"""Added to every name in the exposition."""

Labels = tuple[tuple[str, str], ...]
HistogramValue = tuple[tuple[float, ...], tuple[int, ...], float, int]
Value = float | HistogramValue

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# name -> (kind, help). The order is the exposition's.
CATALOG: Final[dict[str, tuple[str, str]]] = {
    # producer, labels {name}
    "events_accepted_total": (COUNTER, "Events accepted by submit."),
    "events_refused_total": (COUNTER, "Events refused by submit (ring full, shedding, or closed)."),
    "events_delivered_total": (COUNTER, "Events Kinesis acknowledged."),
    "events_retried_total": (COUNTER, "Event retries after a throttled or failed request."),
    "events_spilled_total": (COUNTER, "Events written to the spill because the ring was full."),
    "dead_lettered_total": (
        COUNTER,
        "Events (source=producer) or records (source=consumer) handed to the dead-letter queue.",
    ),
    "records_throttled_total": (COUNTER, "Records Kinesis throttled (ProvisionedThroughputExceeded)."),
    "producer_wrong_shard_records_total": (
        COUNTER,
        "Events sent again because their aggregate landed in a shard whose hash range does not hold them "
        "(a reshard; the KCL would drop that aggregate).",
    ),
    "backlog_events": (GAUGE, "Events accepted and not yet delivered or dead-lettered."),
    "backlog_critical": (
        GAUGE,
        "1 while the backlog is critical: the ring at least critical_backlog full, or events waiting in the spill.",
    ),
    "oldest_event_age_seconds": (
        GAUGE,
        "Age of the oldest event not yet delivered or dead-lettered (estimated in acceptance order).",
    ),
    "ring_bytes": (GAUGE, "Bytes of the ring in use."),
    "ring_capacity_bytes": (GAUGE, "Bytes of the ring (ProducerConfig.ring_bytes)."),
    "batcher_buffered_bytes": (GAUGE, "Bytes the batcher holds outside the ring: aggregates, request bodies."),
    "spill_bytes": (GAUGE, "Bytes in the spill not yet replayed."),
    "dead_letter_pending": (GAUGE, "Dead letters not yet stored (non-zero for long: the store is failing)."),
    "requests_in_flight": (GAUGE, "PutRecords requests handed to the sender and not yet answered."),
    "requests_total": (COUNTER, "PutRecords requests by result (ok, throttled, transient, auth, missing, error)."),
    "request_duration_seconds": (HISTOGRAM, "PutRecords request latency."),
    "request_records": (HISTOGRAM, "Records per PutRecords request."),
    # consumer, labels {name, shard} unless said
    "consumer_behind_latest_seconds": (GAUGE, "How far the shard's reader is behind the tip (MillisBehindLatest)."),
    "consumer_records_read_total": (COUNTER, "User records read from the shard."),
    "consumer_records_handled_total": (COUNTER, "Records the handler handled."),
    "consumer_records_failed_total": (COUNTER, "Failed handler attempts, per record."),
    "consumer_records_malformed_total": (COUNTER, "Records that did not de-aggregate (dead-lettered raw)."),
    "consumer_out_of_range_records_total": (
        COUNTER,
        "Records delivered from KPL aggregates holding any record outside the shard's hash-key range (all of "
        "their records: those the KCL skips).",
    ),
    "consumer_skipped_out_of_range_records_total": (
        COUNTER,
        "Records of KPL aggregates skipped whole for holding records outside the shard's hash-key range.",
    ),
    "consumer_paused": (GAUGE, "1 while the shard waits for the downstream breaker."),
    "consumer_lag_status": (GAUGE, "Lag status over the window: 0 OK, 1 WARN, 2 STALL, 3 STOP."),
    "consumer_leases": (GAUGE, "Shards this worker holds (labels {name})."),
    "consumer_handler_duration_seconds": (HISTOGRAM, "Handler call latency (labels {name})."),
    "consumer_batch_records": (HISTOGRAM, "Records per handler call (labels {name})."),
    # breakers, labels {name}
    "breaker_state": (GAUGE, "0 closed, 1 open, 2 half_open, 3 disabled, 4 forced_open, 5 metrics_only."),
    "breaker_open": (GAUGE, "1 while the breaker refuses calls (open or forced_open)."),
    "breaker_failure_rate": (GAUGE, "Failure rate in the window (absent below minimum_calls)."),
    "breaker_transitions_total": (COUNTER, "State transitions."),
    "breaker_calls_not_permitted_total": (COUNTER, "Calls refused (since creation or the last reset)."),
    # dead-letter queues, labels {name}
    "dlq_entries": (GAUGE, "Entries waiting: neither redriven nor purged."),
    "dlq_bytes": (GAUGE, "Payload bytes of the waiting entries."),
    "dlq_oldest_entry_age_seconds": (GAUGE, "Age of the oldest waiting entry (0 when empty)."),
    "dlq_writes_per_second": (GAUGE, "Entries written per second over the last 60 s."),
    "dlq_log_bytes": (GAUGE, "Bytes of the log on disk, including redriven and purged entries not yet deleted."),
    # the monitor, labels {alertname, severity}
    "alerts_firing": (GAUGE, "Firing alerts of each rule."),
}

BREAKER_STATE_CODES: Final = {
    "closed": 0,
    "open": 1,
    "half_open": 2,
    "disabled": 3,
    "forced_open": 4,
    "metrics_only": 5,
}
_OPEN = frozenset({"open", "forced_open"})
REQUEST_RESULTS: Final = ("ok", "throttled", "transient", "auth", "missing", "error")


class Family:
    """The series of one metric in a snapshot, as two parallel lists: `labels` (each a tuple of (name, value)
    pairs sorted by name) and `values`. (Parallel lists rather than a tuple per series: a snapshot is taken four
    times a second, and every tuple would be one more object for the garbage collector to track.)"""

    __slots__ = ("help", "kind", "labels", "name", "values")

    def __init__(self, name: str, help: str, kind: str) -> None:
        self.name = name
        self.help = help
        self.kind = kind
        self.labels: list[Labels] = []
        self.values: list[Value] = []

    def add(self, labels: Labels, value: Value) -> None:
        self.labels.append(labels)
        self.values.append(value)

    @property
    def series(self) -> list[tuple[Labels, Value]]:
        """`(labels, value)` pairs (a new list)."""
        return list(zip(self.labels, self.values, strict=True))

    def __repr__(self) -> str:
        return f"<Family {self.name} {self.kind} {len(self.values)} series>"


class Snapshot:
    """Every metric at one instant, by name (no prefix). `at` is monotonic seconds, `wall` Unix seconds."""

    __slots__ = ("at", "families", "wall")

    def __init__(self, families: dict[str, Family], at: float, wall: float) -> None:
        self.families = families
        self.at = at
        self.wall = wall

    def get(self, name: str) -> Family | None:
        return self.families.get(name)

    def value(self, name: str, **labels: str) -> Value | None:
        """The value of the series of `name` whose labels include `labels` (the first one), or None."""
        family = self.families.get(name)
        if family is None:
            return None
        want = set(labels.items())
        for series_labels, value in zip(family.labels, family.values, strict=True):
            if want.issubset(series_labels):
                return value
        return None

    def __iter__(self) -> Iterator[Family]:
        return iter(self.families.values())


# --- what the components record -------------------------------------------------------------------------


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


# --- what is watched --------------------------------------------------------------------------------------


class ProducerLike(Protocol):
    """What the collector reads from a producer (`Producer` is one)."""

    config: Any
    _metrics: ProducerMetrics | None

    def stats_dict(self) -> dict[str, int]: ...
    @property
    def endpoint_breaker(self) -> CircuitBreaker | None: ...
    @property
    def dead_letter_queue(self) -> DeadLetterQueue | None: ...


class ConsumerLike(Protocol):
    """What the collector reads from a consumer (`Consumer` is one)."""

    config: Any
    _metrics: ConsumerMetrics | None

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
    raw = getattr(consumer, "_stats", None)
    if isinstance(raw, dict):
        return list(raw.values())
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
            metrics = producer._metrics = ProducerMetrics(name)
        self.producers[name] = _ProducerWatch(name, producer, metrics)

    def add_consumer(self, name: str, consumer: ConsumerLike, *, record: bool = True) -> None:
        if name in self.consumers:
            raise ValueError(f"a consumer named {name!r} is already watched")
        metrics = None
        if record:
            metrics = consumer._metrics = ConsumerMetrics(name)
        self.consumers[name] = _ConsumerWatch(name, consumer, metrics)

    def add_dlq(self, name: str, get: Callable[[], DeadLetterQueue | None]) -> None:
        if name in self.dlqs:
            raise ValueError(f"a dead-letter queue named {name!r} is already watched")
        self.dlqs[name] = _DlqWatch(name, get)

    def detach(self) -> None:
        """Stops recording into the registry: the components' handles are dropped and their series removed."""
        for pw in self.producers.values():
            if pw.metrics is not None:
                if pw.producer._metrics is pw.metrics:
                    pw.producer._metrics = None
                pw.metrics.remove()
                pw.metrics = None
        for cw in self.consumers.values():
            if cw.metrics is not None:
                if cw.consumer._metrics is cw.metrics:
                    cw.consumer._metrics = None
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
        family("consumer_leases").add(cw.labels, owned)

    def _collect_breakers(self, family: Callable[[str], Family]) -> None:
        state = family("breaker_state")
        open_ = family("breaker_open")
        rate = family("breaker_failure_rate")
        transitions = family("breaker_transitions_total")
        refused = family("breaker_calls_not_permitted_total")
        cache = self._breaker_labels
        for name, b in self.breakers():
            m = b._metrics()
            labels = cache.get(name)
            if labels is None:
                labels = cache[name] = (("name", name),)
            s = str(m["state"])
            state.add(labels, BREAKER_STATE_CODES.get(s, -1))
            open_.add(labels, 1.0 if s in _OPEN else 0.0)
            if m["failure_rate"] is not None:
                rate.add(labels, m["failure_rate"])
            transitions.add(labels, m["transitions"])
            refused.add(labels, m["not_permitted"])

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


_go_float: Callable[[float], str] = floatToGoString
"""prometheus_client's float formatting (Go's), for values and bucket bounds."""


def _le(bound: float) -> str:
    return _go_float(bound)


def families_of(snapshot: Snapshot) -> Iterator[Metric]:
    """A snapshot as prometheus_client metric families (names prefixed)."""
    for f in snapshot:
        if f.kind == COUNTER:
            base = f.name[: -len("_total")] if f.name.endswith("_total") else f.name
            m = Metric(PREFIX + base, f.help, COUNTER)
            sample = PREFIX + base + "_total"
            for labels, value in zip(f.labels, f.values, strict=True):
                m.add_sample(sample, dict(labels), float(cast("float", value)))
        elif f.kind == HISTOGRAM:
            m = Metric(PREFIX + f.name, f.help, HISTOGRAM)
            for labels, value in zip(f.labels, f.values, strict=True):
                bounds, counts, total, count = cast("HistogramValue", value)
                plain = dict(labels)
                for bound, c in zip(bounds, counts, strict=True):
                    m.add_sample(PREFIX + f.name + "_bucket", {**plain, "le": _le(bound)}, float(c))
                m.add_sample(PREFIX + f.name + "_count", plain, float(count))
                m.add_sample(PREFIX + f.name + "_sum", plain, float(total))
        else:
            m = Metric(PREFIX + f.name, f.help, GAUGE if f.kind == GAUGE else "unknown")
            for labels, value in zip(f.labels, f.values, strict=True):
                m.add_sample(PREFIX + f.name, dict(labels), float(cast("float", value)))
        yield m


# --- exposition -------------------------------------------------------------------------------------------


def _escape_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(h: str) -> str:
    return h.replace("\\", r"\\").replace("\n", r"\n")


def _value(value: float) -> str:
    """`floatToGoString(value)`, without its function calls for the common cases: it is `repr(float(value))`
    for every finite value below 1e6 (Go switches to exponents from there)."""
    if type(value) is int and -(1 << 53) < value < 1_000_000:
        return f"{value}.0"
    if type(value) is float and -1e300 < value < 1e6:
        return repr(value)
    return _go_float(value)


class Encoder:
    """Prometheus text format (0.0.4), byte for byte what `prometheus_client.generate_latest` writes for
    `families_of(snapshot)` (a test holds it to that), several times faster: the text before each value
    (name, labels, escaping) is made once per series and kept, a line (or a whole family) whose values did not
    change since the last scrape is reused, and values are formatted as prometheus_client's `floatToGoString`
    does."""

    MAX_CACHED = 50_000

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str, str], str] = {}
        self._prefixes: dict[str, dict[Labels, str]] = {}
        self._buckets: dict[tuple[str, Labels, tuple[float, ...]], list[str]] = {}
        self._last: dict[str, dict[Labels, tuple[float, str]]] = {}
        self._chunks: dict[str, tuple[list[Labels], list[Value], str]] = {}
        """sample -> (labels, values, text) of the whole family at the last scrape."""
        """sample -> labels -> (value, line) of the last scrape: a value that did not change is not formatted."""
        self._cached = 0

    def _head(self, name: str, help: str, kind: str) -> str:
        key = (name, help, kind)
        head = self._heads.get(key)
        if head is None:
            shown = PREFIX + name
            typ = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}.get(kind, "untyped")
            head = self._heads[key] = f"# HELP {shown} {_escape_help(help)}\n# TYPE {shown} {typ}\n"
        return head

    def _cache(self, sample: str) -> dict[Labels, str]:
        cache = self._prefixes.get(sample)
        if cache is None:
            cache = self._prefixes[sample] = {}
        return cache

    def _prefix(self, sample: str, labels: Labels) -> str:
        cache = self._cache(sample)
        prefix = cache.get(labels)
        if prefix is None:
            if labels:
                inner = ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(labels))
                prefix = f"{PREFIX}{sample}{{{inner}}} "
            else:
                prefix = f"{PREFIX}{sample} "
            cache[labels] = prefix
            self._cached += 1
        return prefix

    def _bucket_prefixes(self, name: str, labels: Labels, bounds: tuple[float, ...]) -> list[str]:
        key = (name, labels, bounds)
        found = self._buckets.get(key)
        if found is None:
            found = self._buckets[key] = [self._prefix(name + "_bucket", (*labels, ("le", _le(b)))) for b in bounds]
        return found

    def _lines(self, out: list[str], sample: str, family: Family) -> None:
        chunk = self._chunks.get(sample)
        # A family whose series and values are all as at the last scrape (a paused flag, a lag status, a
        # counter that did not move) is the same text: two list comparisons in C instead of a line per series.
        if chunk is not None and chunk[1] == family.values and chunk[0] == family.labels:
            out.append(chunk[2])
            return
        lines = self._last.get(sample)
        if lines is None:
            lines = self._last[sample] = {}
        last = lines.get
        mine: list[str] = []
        append = mine.append
        for labels, value in zip(family.labels, family.values, strict=True):
            v = cast("float", value)
            hit = last(labels)
            if hit is not None and hit[0] == v:  # unchanged since the last scrape (NaN never is)
                append(hit[1])
                continue
            prefix = self._prefix(sample, labels)
            if type(v) is int and -(1 << 53) < v < 1_000_000:
                line = f"{prefix}{v}.0\n"
            elif type(v) is float and -1e300 < v < 1e6:
                line = f"{prefix}{v!r}\n"
            else:
                line = f"{prefix}{_go_float(v)}\n"
            lines[labels] = (v, line)
            append(line)
        text = "".join(mine)
        self._chunks[sample] = (family.labels, family.values, text)
        out.append(text)

    def encode(self, snapshot: Snapshot) -> bytes:
        if self._cached > self.MAX_CACHED:  # series come and go (shards): start afresh now and then
            self._prefixes.clear()
            self._buckets.clear()
            self._last.clear()
            self._chunks.clear()
            self._cached = 0
        out: list[str] = []
        append = out.append
        for f in snapshot:
            name, kind = f.name, f.kind
            if kind == COUNTER:
                sample = name if name.endswith("_total") else name + "_total"
                append(self._head(sample, f.help, kind))
                self._lines(out, sample, f)
            elif kind == HISTOGRAM:
                append(self._head(name, f.help, kind))
                for labels, value in zip(f.labels, f.values, strict=True):
                    bounds, counts, total, count = cast("HistogramValue", value)
                    for p, c in zip(self._bucket_prefixes(name, labels, bounds), counts, strict=True):
                        append(p + _value(c) + "\n")
                    append(self._prefix(name + "_count", labels) + _value(count) + "\n")
                    append(self._prefix(name + "_sum", labels) + _value(total) + "\n")
            else:
                append(self._head(name, f.help, kind))
                self._lines(out, name, f)
        return "".join(out).encode()


def encode(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of `snapshot` (a fresh `Encoder`; keep one to reuse its caches)."""
    return Encoder().encode(snapshot)
