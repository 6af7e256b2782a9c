"""Hand-written stubs of the Rust extension `treasure_engine._core` (checked by mypy.stubtest)."""

import os
from collections.abc import Callable, Coroutine, Iterable, Iterator
from types import CodeType, TracebackType
from typing import Any, Literal, Self, TypedDict, TypeVar, final

from typing_extensions import disjoint_base

_T = TypeVar("_T")

__all__ = [
    "BadRecord",
    "BufferFull",
    "CircuitBreaker",
    "CircuitOpen",
    "ConfigError",
    "Corruption",
    "Counter",
    "DeadRecord",
    "Gauge",
    "GetRecordsPage",
    "GuardedFunction",
    "Histogram",
    "InvalidHashKey",
    "InvalidPartitionKey",
    "LogError",
    "LogLocked",
    "LogNotFound",
    "LogReader",
    "MalformedRecord",
    "Metrics",
    "Overloaded",
    "Permit",
    "Pipeline",
    "ProducerClosed",
    "Record",
    "RecordTooLarge",
    "Request",
    "SegmentLog",
    "TreasureEngineError",
    "_NoopSubmit",
    "__version__",
    "kpl_decode",
    "kpl_encode",
    "kpl_is_aggregated",
    "parse_get_records",
    "partition_key_hash",
    "seal_offline",
]

__version__: str

class TreasureEngineError(Exception): ...
class ConfigError(TreasureEngineError, ValueError): ...
class RecordTooLarge(TreasureEngineError, ValueError): ...
class InvalidPartitionKey(TreasureEngineError, ValueError): ...
class InvalidHashKey(TreasureEngineError, ValueError): ...
class MalformedRecord(TreasureEngineError, ValueError): ...
class BufferFull(TreasureEngineError): ...
class Overloaded(BufferFull): ...
class ProducerClosed(TreasureEngineError): ...

class CircuitOpen(TreasureEngineError):
    name: str
    remaining_s: float
    state: str

class LogError(TreasureEngineError, OSError): ...
class LogLocked(LogError): ...
class LogNotFound(LogError): ...

_Data = bytes | bytearray | memoryview
_Shards = Iterable[tuple[str, int, int]]

@final
class DeadRecord:
    """A record that reached a terminal failure (`Pipeline.take_dead`); unpacks as the 8-tuple of its fields."""

    @property
    def data(self) -> bytes: ...
    @property
    def partition_key(self) -> str: ...
    @property
    def explicit_hash_key(self) -> str | None: ...
    @property
    def attempts(self) -> int: ...
    @property
    def error_code(self) -> str: ...
    @property
    def error_message(self) -> str: ...
    @property
    def age_s(self) -> float: ...
    @property
    def failed_age_s(self) -> float | None: ...
    def __iter__(self) -> Iterator[bytes | str | int | float | None]: ...

@final
class Request:
    @property
    def id(self) -> int: ...
    @property
    def records(self) -> int: ...
    @property
    def events(self) -> int: ...
    @property
    def shard_ids(self) -> list[str]: ...
    @property
    def payload_bytes(self) -> int: ...
    @property
    def body(self) -> bytes: ...
    @property
    def body_sha256(self) -> str:
        """The body's SHA-256 (hex), for SigV4: computed in Rust, without the GIL."""
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...

class _PipelineStats(TypedDict):
    """What `Pipeline.stats()` returns: counters since start and gauges, every one an int."""

    accepted: int
    refused: int
    delivered: int
    dead_lettered: int
    in_flight: int
    retried: int
    throttled: int
    requests: int
    requests_failed: int
    records_sent: int
    shard_mismatches: int
    wrong_shard_records: int
    batcher_wakeups: int
    ring_bytes_used: int
    buffered_bytes: int
    ready_requests: int
    outstanding_requests: int
    dead_pending: int
    spilled: int
    spill_recovered: int
    spill_errors: int
    spill_backlog_bytes: int
    wal_recovered: int
    wal_replay_pending: int
    wal_errors: int

class _SegmentLogStats(TypedDict):
    """What `SegmentLog.stats()` returns."""

    segments: int
    disk_bytes: int
    buffered_bytes: int
    start: int
    end: int
    synced: int
    appended_frames: int
    appended_bytes: int
    writes: int
    fsyncs: int
    rolls: int
    deleted_segments: int
    deleted_bytes: int
    failed: int

_FailureKind = Literal["throttled", "transient", "auth", "not_sent"]
"""How a request failed as a whole, for `Pipeline.fail`."""

@final
class Pipeline:
    def __new__(
        cls,
        stream: str,
        shards: _Shards,
        *,
        stream_is_arn: bool = False,
        ring_bytes: int = ...,
        aggregate: bool = True,
        aggregation_max_bytes: int = 51200,
        linger_ms: float = 50.0,
        rate_limit_linger_ms: float = 200.0,
        max_request_records: int = 500,
        max_request_bytes: int = ...,
        max_record_bytes: int = ...,
        shard_records_per_s: float = 1000.0,
        shard_bytes_per_s: float = 1048576.0,
        ordered: bool = False,
        max_attempts: int = 10,
        record_ttl_s: float = 300.0,
        max_buffered_bytes: int = ...,
        max_ready_requests: int = 8,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
        overflow: str = "reject",
        block_timeout_s: float = 1.0,
        spill_dir: str | os.PathLike[str] | None = None,
        spill_max_bytes: int = ...,
        spill_segment_bytes: int = ...,
        wal_dir: str | os.PathLike[str] | None = None,
        wal_fsync: str = "interval",
        wal_fsync_interval_ms: int = 100,
        wal_segment_bytes: int = ...,
        shed_at_bytes: int = 0,
    ) -> Pipeline: ...
    def submit(self, data: _Data, partition_key: str, explicit_hash_key: str | int | None = None) -> None: ...
    def submit_many(self, records: Iterable[tuple[Any, ...]]) -> int: ...
    def wakeup_fd(self) -> int: ...
    def clear_wakeup(self) -> None: ...
    def poll(self, max: int) -> list[Request]: ...
    def complete(self, request: Request, response: bytes) -> tuple[int, int, int]: ...
    def fail(self, request: Request, kind: _FailureKind, message: str) -> None: ...
    def set_shards(self, shards: _Shards) -> None: ...
    def refresh_wanted(self) -> bool: ...
    def take_dead(self, max: int = 10000) -> list[DeadRecord]: ...
    def confirm_dead(self, n: int) -> None: ...
    def finish_wal(self) -> None: ...
    def close_storage(self) -> None: ...
    def dead_pending(self) -> int: ...
    def begin_flush(self) -> None: ...
    def end_flush(self) -> None: ...
    def close(self) -> None: ...
    def is_closed(self) -> bool: ...
    def shutdown(self, abandon: bool, dead_bound_bytes: int | None = None) -> None: ...
    def lift_dead_bound(self) -> None: ...
    def stats(self) -> _PipelineStats: ...

def seal_offline(
    stream: str,
    shards: _Shards,
    events: list[tuple[bytes, str]],
    *,
    aggregate: bool = True,
    aggregation_max_bytes: int = 51200,
) -> list[bytes]: ...
def partition_key_hash(partition_key: str) -> int: ...
def kpl_encode(records: list[tuple[bytes, str, str | None]]) -> bytes: ...
def kpl_decode(blob: bytes) -> list[tuple[bytes, str, str | None]]: ...
def kpl_is_aggregated(blob: bytes) -> bool: ...
def parse_get_records(
    body: _Data,
    shard_id: str,
    *,
    hash_key_range: tuple[int, int] | None = None,
    out_of_range_aggregates: Literal["deliver", "skip"] = "deliver",
) -> GetRecordsPage:
    """Parses a GetRecords response body into user records, de-aggregating KPL aggregates; raises
    `MalformedRecord` when the body is not a GetRecords response. Releases the GIL while it parses.

    With `hash_key_range`, the shard's (starting, ending) hash keys, both included, every aggregate's
    sub-records are checked against it (by explicit hash key, else MD5 of the partition key); an aggregate
    with one outside is delivered whole and its sub-records counted (`out_of_range_records`, "deliver"), or skipped
    whole and its sub-records counted (`skipped_out_of_range_records`, "skip", the KCL's rule). Plain records
    are never checked. `InvalidHashKey` when the range starts after its end; `ValueError` for another policy."""

@final
class Record:
    """One user record read from a Kinesis shard, de-aggregated when it came in a KPL aggregate.

    Equal (and hashed) by shard id, sequence number and sub-sequence number; picklable. It stays valid after
    the page it came from is gone, and keeps that page's decoded buffer alive while it lives."""

    def __new__(
        cls,
        data: _Data,
        partition_key: str,
        sequence_number: str,
        shard_id: str,
        sub_sequence_number: int = 0,
        explicit_hash_key: str | None = None,
        approximate_arrival: float = 0.0,
        aggregated: bool = False,
    ) -> Record: ...
    @property
    def data(self) -> bytes:
        """The payload (a new `bytes` object on each access)."""
    @property
    def partition_key(self) -> str: ...
    @property
    def explicit_hash_key(self) -> str | None: ...
    @property
    def sequence_number(self) -> str:
        """Sequence number of the Kinesis record it came in (shared by the records of one aggregate)."""
    @property
    def sub_sequence_number(self) -> int:
        """Index in its KPL aggregate; 0 when it was not aggregated."""
    @property
    def shard_id(self) -> str: ...
    @property
    def approximate_arrival(self) -> float:
        """ApproximateArrivalTimestamp, seconds since the epoch (0.0 when the response had none)."""
    @property
    def aggregated(self) -> bool: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __reduce__(self) -> tuple[type[Record], tuple[bytes, str, str, str, int, str | None, float, bool]]: ...

@final
class BadRecord:
    """A Kinesis record with the KPL magic that does not decode (bad MD5, truncated or invalid protobuf), or
    whose Data is not base64: reported in stream order, `position` user records into the page."""

    @property
    def data(self) -> bytes: ...
    @property
    def partition_key(self) -> str: ...
    @property
    def sequence_number(self) -> str: ...
    @property
    def sub_sequence_number(self) -> int: ...
    @property
    def shard_id(self) -> str: ...
    @property
    def approximate_arrival(self) -> float: ...
    @property
    def reason(self) -> str: ...
    @property
    def position(self) -> int: ...

@final
class GetRecordsPage:
    """The user records of one GetRecords response, in stream order, with its paging fields."""

    @property
    def records(self) -> list[Record]: ...
    @property
    def malformed(self) -> list[BadRecord]: ...
    def lanes(self, n: int) -> list[list[Record]]:
        """The records in `n` lists by a stable hash of the partition key, stream order kept in each list."""
    @property
    def shard_id(self) -> str: ...
    @property
    def next_shard_iterator(self) -> str | None: ...
    @property
    def millis_behind_latest(self) -> int | None: ...
    @property
    def child_shards(self) -> list[tuple[str, list[str]]]: ...
    @property
    def kinesis_records(self) -> int: ...
    @property
    def last_sequence_number(self) -> str | None: ...
    @property
    def last_sub_sequence_number(self) -> int:
        """Sub-sequence number of the last user record of the last Kinesis record, delivered or skipped."""
    @property
    def out_of_range_records(self) -> int:
        """Sub-records delivered from aggregates with any sub-record outside the shard's range, all of them
        (policy "deliver")."""
    @property
    def skipped_out_of_range_records(self) -> int:
        """Sub-records of the aggregates skipped whole for straying outside the range (policy "skip")."""
    def __len__(self) -> int: ...

class _Recovery(TypedDict):
    segment: str | None
    position: int
    truncated_bytes: int
    frames: int
    damaged_ranges: int
    reason: str

@final
class Corruption:
    @property
    def segment(self) -> str: ...
    @property
    def position(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def reason(self) -> str: ...

@final
class SegmentLog:
    def __new__(
        cls,
        path: str | os.PathLike[str],
        *,
        fsync: Literal["always", "interval", "never"] = "interval",
        fsync_interval_ms: int = 100,
        segment_bytes: int = ...,
        retention_bytes: int | None = None,
        retention_s: float | None = None,
        max_frame_bytes: int = ...,
    ) -> SegmentLog: ...
    @property
    def path(self) -> str: ...
    @property
    def recovery(self) -> _Recovery | None: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    def append(self, payload: _Data) -> int: ...
    def append_many(self, payloads: Iterable[_Data]) -> list[int]: ...
    def flush(self) -> None: ...
    def commit(self) -> None: ...
    def sync(self) -> None: ...
    def cursor(self, name: str) -> int | None: ...
    def set_cursor(self, name: str, position: int) -> None: ...
    def delete_before(self, position: int) -> int: ...
    def enforce_retention(self) -> int: ...
    def stats(self) -> _SegmentLogStats: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

@final
class LogReader:
    def __new__(
        cls,
        path: str | os.PathLike[str],
        start: int = 0,
        *,
        max_frame_bytes: int = ...,
        strict_tail: bool = False,
    ) -> LogReader: ...
    @property
    def position(self) -> int: ...
    @property
    def corruptions(self) -> list[Corruption]: ...
    def __iter__(self) -> Self: ...
    def __next__(self) -> tuple[int, bytes]: ...
    def read(self, max: int) -> list[tuple[int, bytes]]: ...

@disjoint_base
class CircuitBreaker:
    def __new__(
        cls,
        name: str,
        *,
        window: str = "count",
        window_size: int = 100,
        minimum_calls: int = 100,
        failure_rate: float = 0.5,
        slow_call_s: float = 60.0,
        slow_call_rate: float = 1.0,
        open_s: float = 60.0,
        open_backoff: float = 1.0,
        open_max_s: float = 600.0,
        half_open_calls: int = 10,
        half_open_max_wait_s: float = 0.0,
        auto_half_open: bool = False,
        record: tuple[type[BaseException], ...] | None = None,
        ignore: tuple[type[BaseException], ...] | None = None,
        predicate: Callable[[BaseException], object] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Self: ...
    @property
    def name(self) -> str: ...
    @property
    def _state(self) -> str: ...
    def _metrics(self) -> dict[str, Any]: ...
    def __enter__(self) -> None: ...
    def __exit__(
        self, _exc_type: type[BaseException] | None, exc: BaseException | None, _traceback: TracebackType | None
    ) -> bool: ...
    def __aenter__(self) -> Coroutine[Any, Any, None]: ...
    def __aexit__(
        self, _exc_type: type[BaseException] | None, exc: BaseException | None, _traceback: TracebackType | None
    ) -> Coroutine[Any, Any, None]: ...
    def call(self, func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T: ...
    def _guard(self, func: Callable[..., Any], is_async: bool = False) -> GuardedFunction: ...
    def _acquire(self) -> Permit: ...
    def _release(self, permit: Permit, exc: BaseException | None = None) -> None: ...
    def force_open(self) -> None: ...
    def disable(self) -> None: ...
    def metrics_only(self) -> None: ...
    def close(self) -> None: ...
    def reset(self) -> None: ...

@disjoint_base
class GuardedFunction:
    def __new__(cls, breaker: CircuitBreaker, func: Callable[..., Any], is_async: bool = False) -> Self: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, obj: object, _owner: type | None = None, /) -> Any: ...
    @property
    def __wrapped__(self) -> Callable[..., Any]: ...
    @property
    def breaker(self) -> CircuitBreaker: ...
    @property
    def __name__(self) -> str: ...
    @property
    def __qualname__(self) -> str: ...
    @property
    def __doc__(self) -> str | None: ...  # type: ignore[override]
    @property
    def __code__(self) -> CodeType: ...
    @property
    def __defaults__(self) -> tuple[Any, ...] | None: ...
    @property
    def __kwdefaults__(self) -> dict[str, Any] | None: ...
    @property
    def __annotations__(self) -> dict[str, Any]: ...  # type: ignore[override]

@final
class Permit: ...

_HistogramValue = tuple[tuple[float, ...], tuple[int, ...], float, int]
_Sample = tuple[str, str, str, tuple[tuple[str, str], ...], float | _HistogramValue]

@final
class Metrics:
    """A registry of counters, gauges and histograms by name and labels; thread-safe. Creating a series takes
    a lock, recording on its handle never does."""

    def __init__(self) -> None: ...
    def counter(self, name: str, help: str, labels: dict[str, str] | None = None) -> Counter:
        """The counter of `name` and `labels` (in any order), made if missing: the same object each time. A bad
        metric or label name, or a name already registered with another kind, raises `ConfigError`."""
    def gauge(self, name: str, help: str, labels: dict[str, str] | None = None) -> Gauge: ...
    def histogram(
        self,
        name: str,
        help: str,
        labels: dict[str, str] | None = None,
        *,
        kind: Literal["seconds", "count"] = "seconds",
    ) -> Histogram:
        """A log-linear histogram (8 buckets per power of two, values known to 1/8): `kind="seconds"` spans
        2**-20 s (about 1 µs) to 2**12 s (over an hour), `kind="count"` 1 to 2**20."""
    def snapshot(self) -> list[_Sample]:
        """Every series by name then labels: `(name, help, kind, labels sorted by name, value)`; a histogram's
        value is `(upper bounds, one per power of two then inf, cumulative counts, sum, count)`."""
    def remove(self, name: str, labels: dict[str, str] | None = None) -> bool:
        """Forgets a series (its handles keep working, unseen); returns whether it was there."""
    def __len__(self) -> int: ...

@final
class Counter:
    def inc(self, n: float = 1.0) -> None:
        """Adds `n`; a negative, NaN or infinite `n` raises `ValueError`. Integral increments are exact."""
    @property
    def value(self) -> float: ...

@final
class Gauge:
    def set(self, v: float) -> None: ...
    def inc(self, v: float = 1.0) -> None: ...
    def dec(self, v: float = 1.0) -> None: ...
    @property
    def value(self) -> float: ...

@final
class Histogram:
    def observe(self, v: float) -> None:
        """Records `v`; negative and NaN values are only counted in `rejected`."""
    @property
    def count(self) -> int: ...
    @property
    def sum(self) -> float: ...
    @property
    def rejected(self) -> int: ...

@final
class _NoopSubmit:
    """A benchmark reference only (bench/test_submit.py): `Pipeline.submit`'s signature, doing nothing, so timing
    it measures the floor of a PyO3 method call with these arguments. Not for applications."""

    def __init__(self) -> None: ...
    def submit(self, data: _Data, partition_key: str, explicit_hash_key: str | int | None = None) -> None: ...
