"""Configuration as data: frozen, keyword-only msgspec Structs validated on construction.

Every out-of-range value raises `ConfigError` naming the field, before anything starts.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from treasure_engine._core import ConfigError
from treasure_engine._validate import _check, _check_types
from treasure_engine.breaker import BreakerConfig

__all__ = ["ConsumerConfig", "ProducerConfig"]

KiB = 1024
MiB = 1024 * KiB


_C = TypeVar("_C", bound=msgspec.Struct)


def _convert(data: dict[str, Any], cls: type[_C]) -> _C:
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as e:
        # A check in a struct's __post_init__ already says "invalid configuration: ...".
        raise ConfigError(f"invalid configuration: {str(e).removeprefix('invalid configuration: ')}") from None


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML config file as data; a missing, unreadable or malformed file raises `ConfigError` naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: a NUL in the path
        raise ConfigError(f"cannot read config {path}: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cannot read config {path}: not valid TOML: {e}") from None


def _check_state(state_dir: str | None, app_name: str | None) -> None:
    _check("state_dir", state_dir is None or bool(state_dir), "must not be empty", state_dir)
    _check(
        "app_name",
        app_name is None or re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", app_name) is not None,
        "must be 1-64 characters of letters, digits, '_', '.', '-'",
        app_name,
    )


class ProducerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a `Producer` batches and delivers events to one Kinesis stream.

    Sizes are bytes, durations seconds unless the name says `_ms`. Defaults follow the Kinesis limits and the KPL.
    """

    stream: str
    """Stream name, or its ARN."""
    region: str | None = None
    """AWS region; default from the botocore chain (AWS_REGION, AWS_DEFAULT_REGION, profile), else us-east-1."""
    endpoint_url: str | None = None
    """Kinesis endpoint; default https://kinesis.<region>.amazonaws.com."""
    aggregate: bool = True
    """Pack events into KPL aggregated records (consumers de-aggregate, as the KCL and Lambda do)."""
    aggregation_max_bytes: int = 51_200
    """Largest aggregated record (the KPL's AggregationMaxSize)."""
    linger_ms: float = 50.0
    """Longest an event waits for company before it is sent."""
    rate_limit_linger_ms: float = 200.0
    """While a shard's rate limit holds records back, how long a request waits for the next tokens to join it,
    from when its first record went in: fewer, fuller requests at the limits, for at most this much latency on
    events that wait for tokens anyway (the KPL's RecordMaxBufferedTime trade-off; 0: send what the tokens allow
    at once)."""
    ring_bytes: int = 64 * MiB
    """Bytes of the in-memory ring that absorbs bursts (rounded up to a power of two)."""
    overflow: Literal["reject", "block", "spill"] = "reject"
    """When the ring is full: raise BufferFull at once, wait up to block_timeout_s and then raise, or append to the
    spill log in `<state_dir>/spill` (BufferFull only when it holds spill_max_bytes)."""
    block_timeout_s: float = 1.0
    endpoint_breaker: bool = True
    """Guard the Kinesis endpoint with a circuit breaker: when requests keep failing it opens, nothing is sent
    (the ring, or the spill, absorbs the burst), and single probes resume delivery once it recovers."""
    endpoint_breaker_config: BreakerConfig | None = None
    """The endpoint breaker's settings; None: 5 of the last 20 requests failing at 50% opens it for 1 s, doubling
    on each failed probe up to 30 s (throttling never counts as a failure)."""
    shed_when_critical: bool = False
    """Refuse at once with `Overloaded` (a `BufferFull`) while the backlog is critical: the ring at least
    critical_backlog full, or anything waiting in the spill. For producers of events the service can drop."""
    critical_backlog: float = 0.8
    """The fraction of ring_bytes that makes the backlog critical (shed_when_critical)."""
    spill_max_bytes: int = 1024 * MiB
    """Disk the spill may hold (overflow="spill"): spilled events not yet replayed into the batcher."""
    durability: Literal["memory", "wal"] = "memory"
    """"wal": once `submit` returns, the event is in a write-ahead log in `<state_dir>/wal` and survives a crash of
    the process; a restarted producer replays what was never acknowledged (at-least-once)."""
    wal_fsync: Literal["always", "interval", "never"] = "interval"
    """When the WAL is fsynced, i.e. also survives a crash of the machine: on every submit, every
    wal_fsync_interval_ms, or when the kernel likes."""
    wal_fsync_interval_ms: int = 100
    ordered: bool = False
    """Keep order per partition key through throttling and retries (one request in flight per shard)."""
    max_attempts: int = 10
    """Attempts per record before it is dead-lettered. Throttling spends none: record_ttl_s bounds those."""
    record_ttl_s: float = 300.0
    """Age after which an undelivered record is dead-lettered."""
    max_in_flight: int = 8
    """Concurrent PutRecords requests."""
    max_record_bytes: int = 1 * MiB
    """Largest record, data plus partition key (up to 10 MiB for streams raised with UpdateMaxRecordSize)."""
    max_request_records: int = 500
    max_request_bytes: int = 5 * MiB
    """Data plus partition-key bytes per PutRecords request: 5 MiB, or up to 10 MiB for raised streams."""
    shard_records_per_s: float = 1000.0
    """Per-shard record rate the producer keeps under (the Kinesis shard limit)."""
    shard_bytes_per_s: float = 1.0 * MiB
    """Per-shard byte rate the producer keeps under (the Kinesis shard limit)."""
    max_buffered_bytes: int | None = None
    """Memory the batcher may hold outside the ring: aggregates, queues, request bodies. Default
    (`None`): an eighth of `ring_bytes`, at least two requests' worth (8 MiB with 5 MiB requests), at most
    16 MiB; see `buffered_bytes_limit`."""
    request_timeout_s: float = 10.0
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    shard_refresh_s: float = 60.0
    """How often the shard map is re-read (it is also re-read when a response shows it is stale)."""
    state_dir: str | None = None
    """Where durable state lives: the dead-letter queue in `<state_dir>/dlq`, the spill in `<state_dir>/spill`, the
    WAL in `<state_dir>/wal`. Default
    `$XDG_DATA_HOME/treasure-engine/<app_name>` (`~/.local/share/...`), named in the start-up log line."""
    app_name: str | None = None
    """Names the application in dead letters and in the default state directory; default the program's name."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check("stream", bool(self.stream), "must not be empty", self.stream)
        _check("linger_ms", 0 <= self.linger_ms <= 60_000, "must be in [0, 60000]", self.linger_ms)
        _check(
            "rate_limit_linger_ms",
            0 <= self.rate_limit_linger_ms <= 60_000,
            "must be in [0, 60000]",
            self.rate_limit_linger_ms,
        )
        _check(
            "ring_bytes",
            64 * KiB <= self.ring_bytes <= 1 << 40,
            "must be in [64 KiB, 1 TiB]",
            self.ring_bytes,
        )
        _check("block_timeout_s", self.block_timeout_s >= 0, "must be >= 0", self.block_timeout_s)
        _check("critical_backlog", 0 < self.critical_backlog <= 1, "must be in (0, 1]", self.critical_backlog)
        _check(
            "spill_max_bytes",
            1 * MiB <= self.spill_max_bytes <= 1 << 50,
            "must be in [1 MiB, 1 PiB]",
            self.spill_max_bytes,
        )
        _check("max_attempts", self.max_attempts >= 1, "must be >= 1", self.max_attempts)
        _check("record_ttl_s", self.record_ttl_s > 0, "must be > 0", self.record_ttl_s)
        _check(
            "durability",
            not (self.durability == "wal" and self.overflow == "spill"),
            "'wal' cannot be combined with overflow='spill' (the WAL already holds every event on disk)",
            self.durability,
        )
        _check(
            "wal_fsync_interval_ms",
            1 <= self.wal_fsync_interval_ms <= 60_000,
            "must be in [1, 60000]",
            self.wal_fsync_interval_ms,
        )
        _check("max_in_flight", 1 <= self.max_in_flight <= 1024, "must be in [1, 1024]", self.max_in_flight)
        _check(
            "max_record_bytes",
            1 * KiB <= self.max_record_bytes <= 10 * MiB,
            "must be in [1 KiB, 10 MiB]",
            self.max_record_bytes,
        )
        _check(
            "max_request_records",
            1 <= self.max_request_records <= 500,
            "must be in [1, 500]",
            self.max_request_records,
        )
        _check(
            "max_request_bytes",
            self.max_record_bytes <= self.max_request_bytes <= 10 * MiB,
            "must be in [max_record_bytes, 10 MiB] (over 5 MiB only for streams raised with UpdateMaxRecordSize)",
            self.max_request_bytes,
        )
        _check(
            "aggregation_max_bytes",
            64 <= self.aggregation_max_bytes <= self.max_record_bytes,
            "must be in [64, max_record_bytes]",
            self.aggregation_max_bytes,
        )
        _check("shard_records_per_s", self.shard_records_per_s > 0, "must be > 0", self.shard_records_per_s)
        _check("shard_bytes_per_s", self.shard_bytes_per_s > 0, "must be > 0", self.shard_bytes_per_s)
        _check("request_timeout_s", self.request_timeout_s > 0, "must be > 0", self.request_timeout_s)
        _check("backoff_base_s", self.backoff_base_s >= 0, "must be >= 0", self.backoff_base_s)
        _check(
            "backoff_max_s",
            self.backoff_max_s >= self.backoff_base_s,
            "must be >= backoff_base_s",
            self.backoff_max_s,
        )
        _check("shard_refresh_s", self.shard_refresh_s > 0, "must be > 0", self.shard_refresh_s)
        _check_state(self.state_dir, self.app_name)
        # The Rust side checks the rest (ring large enough for the largest record, buffer room for requests).

    @property
    def buffered_bytes_limit(self) -> int:
        """`max_buffered_bytes`, or its default: an eighth of the ring, within [two requests, 16 MiB].

        The batcher's buffer keeps requests in flight while the ring refills; when the endpoint stalls it is
        a second copy of what the ring already holds back, so it is sized to the ring: the producer's memory
        stays within `ring_bytes` plus a fixed overhead (see docs/internals.md, "Memory")."""
        if self.max_buffered_bytes is not None:
            return self.max_buffered_bytes
        two_requests = 2 * min(self.max_request_bytes, 4 * MiB)
        return min(16 * MiB, max(self.ring_bytes // 8, two_requests))

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Arguments of `_core.Pipeline` derived from this config."""
        return {
            "stream_is_arn": self.stream.startswith("arn:"),
            "ring_bytes": self.ring_bytes,
            "aggregate": self.aggregate,
            "aggregation_max_bytes": self.aggregation_max_bytes,
            "linger_ms": self.linger_ms,
            "rate_limit_linger_ms": self.rate_limit_linger_ms,
            "max_request_records": self.max_request_records,
            "max_request_bytes": self.max_request_bytes,
            "max_record_bytes": self.max_record_bytes,
            "shard_records_per_s": self.shard_records_per_s,
            "shard_bytes_per_s": self.shard_bytes_per_s,
            "ordered": self.ordered,
            "max_attempts": self.max_attempts,
            "record_ttl_s": self.record_ttl_s,
            "max_buffered_bytes": self.buffered_bytes_limit,
            "max_ready_requests": self.max_in_flight,
            "backoff_base_s": self.backoff_base_s,
            "backoff_max_s": self.backoff_max_s,
            "overflow": self.overflow,
            "block_timeout_s": self.block_timeout_s,
            "spill_max_bytes": self.spill_max_bytes,
            "shed_at_bytes": int(self.ring_bytes * self.critical_backlog) if self.shed_when_critical else 0,
            "wal_fsync": self.wal_fsync,
            "wal_fsync_interval_ms": self.wal_fsync_interval_ms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProducerConfig:
        """Builds a config from plain data (TOML, JSON), naming the offending field on error."""
        return _convert(data, cls)


class ConsumerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a `Consumer` reads one Kinesis stream and hands its records to a handler.

    Durations are seconds unless the name says `_ms`. Many processes (on many hosts) with the same `application`
    share the stream's shards through leases in the DynamoDB table named after the application.
    """

    stream: str
    """Stream name, or its ARN."""
    application: str
    """Names the lease table (one per application) and the checkpoints in it; 1-200 of letters, digits, '_.-'."""
    region: str | None = None
    """AWS region; default from the botocore chain, else us-east-1."""
    endpoint_url: str | None = None
    """Kinesis endpoint; default https://kinesis.<region>.amazonaws.com."""
    dynamodb_endpoint_url: str | None = None
    """DynamoDB endpoint of the lease table; default https://dynamodb.<region>.amazonaws.com."""
    create_lease_table: bool = True
    """Create the lease table when it is missing (on-demand capacity); False: a missing table is an error."""
    start_at: Literal["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"] = "TRIM_HORIZON"
    """Where a shard with no checkpoint starts. Child shards of a reshard always start at their beginning."""
    start_timestamp: float | None = None
    """Unix seconds, for start_at="AT_TIMESTAMP"."""
    batch_size: int = 100
    """Most records per handler call."""
    checkpoint_interval_s: float = 5.0
    """Longest handled records wait before their shard's checkpoint is written: at most one DynamoDB write per
    busy shard per interval (plus the lease renewals). A crash repeats at most this long's records, or
    checkpoint_max_records, whichever is fewer (at-least-once); 0 writes after every round. Always written when
    a lease is handed back, at a shard's end and at stop."""
    checkpoint_max_records: int = 100_000
    """Handled records after which a shard's checkpoint is written even before checkpoint_interval_s."""
    max_batch_wait_ms: float = 200.0
    """Longest a read waits for more records to fill a batch when the shard delivers fewer than batch_size."""
    parallelism: int = 1
    """Concurrent handler calls per shard (lanes); a partition key always goes to the same lane, so order per key
    is kept."""
    max_attempts: int = 5
    """Attempts per record before it is dead-lettered."""
    max_record_age_s: float = 3600.0
    """A record still failing this long after it reached the stream is dead-lettered."""
    bisect_on_error: bool = True
    """Split a batch whose handler raised, to isolate the record that fails (splits do not count as attempts)."""
    backoff_base_s: float = 0.1
    """First retry delay of a failed batch; doubles on each attempt, with jitter."""
    backoff_max_s: float = 10.0
    lease_duration_s: float = 10.0
    """A lease not renewed for this long (on the observer's clock) is taken over by another worker."""
    max_leases: int | None = None
    """Most shards this worker holds (None: its fair share, ceil(shards / workers))."""
    worker_id: str | None = None
    """This worker's name in the lease table; default host:pid:random."""
    get_records_limit: int = 10_000
    """Most Kinesis records per GetRecords call."""
    idle_poll_ms: float = 1000.0
    """Delay between reads of a shard that has nothing new."""
    shard_sync_s: float = 30.0
    """How often the shard list is re-read (new shards after a reshard; a reader reaching SHARD_END also
    triggers a re-read)."""
    shutdown_timeout_s: float = 30.0
    """Longest `stop()` waits for batches in flight before it gives up on them (they are read again by the
    next owner: nothing past the last checkpoint is lost)."""
    out_of_range_aggregates: Literal["deliver", "skip"] = "deliver"
    """A KPL aggregate holding records outside its shard's hash-key range (written before a reshard, or by a
    producer that aggregates across shards): "deliver" every record and count the strays (no loss; duplicates
    when a producer re-sent them after a reshard), or "skip" the aggregate whole, as the KCL does (no duplicates
    with producers that repair such aggregates; loss with cross-shard aggregating producers that do not)."""
    request_timeout_s: float = 10.0
    breaker: BreakerConfig | None = None
    """Guard the handler with a circuit breaker named after the application: when it opens, reading pauses (the
    stream is the buffer), nothing is dead-lettered for the outage, and single trial calls resume it."""
    state_dir: str | None = None
    """Where durable state lives: the dead-letter queue in `<state_dir>/dlq`, as the producer's."""
    app_name: str | None = None
    """Names the application in dead letters and in the default state directory; default `application`."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check("stream", bool(self.stream), "must not be empty", self.stream)
        _check(
            "application",
            re.fullmatch(r"[A-Za-z0-9_.-]{3,200}", self.application) is not None,
            "must be 3-200 characters of letters, digits, '_', '.', '-' (it names a DynamoDB table)",
            self.application,
        )
        _check(
            "start_timestamp",
            (self.start_at == "AT_TIMESTAMP") == (self.start_timestamp is not None),
            "is required with start_at='AT_TIMESTAMP' and only then",
            self.start_timestamp,
        )
        _check("batch_size", 1 <= self.batch_size <= 10_000, "must be in [1, 10000]", self.batch_size)
        _check(
            "checkpoint_interval_s",
            0 <= self.checkpoint_interval_s <= 3600,
            "must be in [0, 3600]",
            self.checkpoint_interval_s,
        )
        _check("checkpoint_max_records", self.checkpoint_max_records >= 1, "must be >= 1", self.checkpoint_max_records)
        _check(
            "max_batch_wait_ms", 0 <= self.max_batch_wait_ms <= 60_000, "must be in [0, 60000]", self.max_batch_wait_ms
        )
        _check("parallelism", 1 <= self.parallelism <= 1024, "must be in [1, 1024]", self.parallelism)
        _check("max_attempts", self.max_attempts >= 1, "must be >= 1", self.max_attempts)
        _check("max_record_age_s", self.max_record_age_s > 0, "must be > 0", self.max_record_age_s)
        _check("backoff_base_s", self.backoff_base_s >= 0, "must be >= 0", self.backoff_base_s)
        _check(
            "backoff_max_s", self.backoff_max_s >= self.backoff_base_s, "must be >= backoff_base_s", self.backoff_max_s
        )
        _check("lease_duration_s", 1 <= self.lease_duration_s <= 3600, "must be in [1, 3600]", self.lease_duration_s)
        _check("max_leases", self.max_leases is None or self.max_leases >= 1, "must be >= 1", self.max_leases)
        _check("worker_id", self.worker_id is None or bool(self.worker_id), "must not be empty", self.worker_id)
        _check(
            "get_records_limit", 1 <= self.get_records_limit <= 10_000, "must be in [1, 10000]", self.get_records_limit
        )
        _check("idle_poll_ms", 0 <= self.idle_poll_ms <= 60_000, "must be in [0, 60000]", self.idle_poll_ms)
        _check("shard_sync_s", self.shard_sync_s > 0, "must be > 0", self.shard_sync_s)
        _check("shutdown_timeout_s", self.shutdown_timeout_s >= 0, "must be >= 0", self.shutdown_timeout_s)
        _check("request_timeout_s", self.request_timeout_s > 0, "must be > 0", self.request_timeout_s)
        _check_state(self.state_dir, self.app_name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConsumerConfig:
        """Builds a config from plain data (TOML, JSON), naming the offending field on error."""
        return _convert(data, cls)
