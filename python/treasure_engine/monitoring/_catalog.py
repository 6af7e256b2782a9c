"""The metric catalogue: every `treasure_engine_*` family with its type, help and labels, the Rust
registry the hot paths record into, and the `Snapshot` a scrape produces."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from treasure_engine import _core

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
    "storage_errors_total": (
        COUNTER,
        "Failed writes and reads of the producer's disk stores (labels {name, store}: wal, spill): a full or "
        "read-only disk, damaged frames.",
    ),
    "dead_letter_pending": (GAUGE, "Dead letters not yet stored (non-zero for long: the store is failing)."),
    "requests_in_flight": (GAUGE, "PutRecords requests handed to the sender and not yet answered."),
    "requests_total": (COUNTER, "PutRecords requests by result (ok, throttled, transient, auth, missing, error)."),
    "request_duration_seconds": (HISTOGRAM, "PutRecords request latency."),
    "request_records": (HISTOGRAM, "Records per PutRecords request."),
    # consumer, labels {name, shard} unless said
    "consumer_behind_latest_seconds": (GAUGE, "How far the shard's reader is behind the tip (MillisBehindLatest)."),
    "consumer_lag_seconds": (
        GAUGE,
        "The shard's lag: MillisBehindLatest while reading, estimated (that figure plus the time since the last "
        "read) once reading has stopped.",
    ),
    "consumer_lag_estimated": (GAUGE, "1 while consumer_lag_seconds is an estimate (reading has stopped)."),
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


OPEN_STATE_NAMES = frozenset({"open", "forced_open"})


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
