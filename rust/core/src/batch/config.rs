//! The pipeline's configuration and its validation.

use std::time::Duration;

use crate::spill::SpillConfig;
use crate::wal::WalConfig;
use crate::wire;
use crate::CoreError;

use super::event::largest_event;

/// Everything the pipeline needs to know; validated by [`BatcherConfig::validate`].
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// Stream name, or its ARN when `stream_is_arn`.
    pub stream: String,
    pub stream_is_arn: bool,
    pub ring_bytes: usize,
    /// Aggregate events into KPL records.
    pub aggregate: bool,
    /// Largest KPL aggregate (the KPL's `AggregationMaxSize`).
    pub aggregation_max_bytes: usize,
    /// Longest an event waits for company before it is sent.
    pub linger: Duration,
    /// While a shard's token bucket holds records back, how long the open request waits for more tokens to
    /// join it, from when its first record went in (see `Batcher::rate_hold_until`).
    pub rate_limit_linger: Duration,
    pub max_request_records: usize,
    pub max_request_bytes: usize,
    /// Largest Kinesis record (data plus partition key).
    pub max_record_bytes: usize,
    pub shard_records_per_s: f64,
    pub shard_bytes_per_s: f64,
    /// Keep order per partition key through retries (one request in flight per shard).
    pub ordered: bool,
    pub max_attempts: u32,
    pub record_ttl: Duration,
    /// Memory the batcher may hold outside the ring (aggregates, queues, request bodies).
    pub max_buffered_bytes: usize,
    /// Where events go when the ring is full under [`Overflow::Spill`] (see [`crate::spill`]).
    pub spill: Option<SpillConfig>,
    /// The write-ahead log of `durability = "wal"` (see [`crate::wal`]).
    pub wal: Option<WalConfig>,
    /// Refuse at once with [`CoreError::Overloaded`] while the ring holds at least this many bytes, or the spill
    /// holds anything (0: never shed). For producers of events the service can drop under pressure.
    pub shed_at_bytes: usize,
    /// Most sealed requests waiting for the sender.
    pub max_ready_requests: usize,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            stream: String::new(),
            stream_is_arn: false,
            ring_bytes: 64 << 20,
            aggregate: true,
            aggregation_max_bytes: 51_200,
            linger: Duration::from_millis(50),
            rate_limit_linger: Duration::from_millis(200),
            max_request_records: wire::MAX_REQUEST_RECORDS,
            max_request_bytes: wire::MAX_REQUEST_BYTES,
            max_record_bytes: wire::DEFAULT_MAX_RECORD_BYTES,
            shard_records_per_s: 1000.0,
            shard_bytes_per_s: 1_048_576.0,
            ordered: false,
            max_attempts: 10,
            record_ttl: Duration::from_secs(300),
            max_buffered_bytes: 16 << 20,
            spill: None,
            wal: None,
            shed_at_bytes: 0,
            max_ready_requests: 8,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

pub(super) fn bad(field: &'static str, reason: impl Into<String>) -> CoreError {
    CoreError::Config {
        field,
        reason: reason.into(),
    }
}

impl BatcherConfig {
    /// Checks every field against the Kinesis limits and against each other.
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.stream.is_empty() {
            return Err(bad("stream", "must not be empty"));
        }
        if !(1..=wire::MAX_REQUEST_RECORDS).contains(&self.max_request_records) {
            return Err(bad("max_request_records", "must be in 1..=500"));
        }
        if !(1024..=wire::MAX_LARGE_REQUEST_BYTES).contains(&self.max_request_bytes) {
            return Err(bad("max_request_bytes", "must be in 1 KiB..=10 MiB"));
        }
        if !(1024..=10 << 20).contains(&self.max_record_bytes) {
            return Err(bad("max_record_bytes", "must be in 1 KiB..=10 MiB"));
        }
        if self.max_record_bytes > self.max_request_bytes {
            return Err(bad("max_record_bytes", "must not exceed max_request_bytes"));
        }
        if self.aggregation_max_bytes < 64 || self.aggregation_max_bytes > self.max_record_bytes {
            return Err(bad(
                "aggregation_max_bytes",
                "must be in 64..=max_record_bytes",
            ));
        }
        let need = (largest_event(self.max_record_bytes) + 8).next_power_of_two() * 4;
        if self.ring_bytes < need.max(4096) {
            return Err(bad(
                "ring_bytes",
                format!("must be at least {need} to hold the largest record four times over"),
            ));
        }
        if self.ring_bytes > 1 << 40 {
            return Err(bad("ring_bytes", "must be at most 1 TiB"));
        }
        if !(self.shard_records_per_s.is_finite() && self.shard_records_per_s > 0.0) {
            return Err(bad("shard_records_per_s", "must be a positive number"));
        }
        if !(self.shard_bytes_per_s.is_finite() && self.shard_bytes_per_s > 0.0) {
            return Err(bad("shard_bytes_per_s", "must be a positive number"));
        }
        if self.shed_at_bytes > self.ring_bytes {
            return Err(bad("shed_at_bytes", "must not exceed ring_bytes"));
        }
        if self.spill.is_some() && self.wal.is_some() {
            return Err(bad(
                "overflow",
                "'spill' cannot be combined with durability 'wal' (the WAL already holds every event on disk)",
            ));
        }
        if self.rate_limit_linger > Duration::from_secs(60) {
            return Err(bad("rate_limit_linger_ms", "must be at most 60000"));
        }
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1"));
        }
        if self.record_ttl.is_zero() {
            return Err(bad("record_ttl_s", "must be positive"));
        }
        if self.max_buffered_bytes < 2 * self.max_request_bytes.min(4 << 20) {
            return Err(bad("max_buffered_bytes", "must hold at least two requests"));
        }
        if self.max_ready_requests == 0 {
            return Err(bad("max_ready_requests", "must be at least 1"));
        }
        if self.backoff_base > self.backoff_max {
            return Err(bad("backoff_base", "must not exceed backoff_max"));
        }
        Ok(())
    }

    /// The most data-plus-key bytes the batcher puts in one request (a larger record still goes alone):
    /// `max_request_bytes`, or less when requests that large would hold most of the buffer budget. The budget
    /// is shared by the requests ready and in flight (as many of each) and the aggregates being filled; a burst
    /// sealed into requests of the largest size leaves the ones after it only the crumbs of the budget (7-record
    /// requests behind a 6.8 MB one, measured), and an endpoint takes longest over the largest bodies. So: an
    /// even share of the budget per request ready or in flight (the body is base64, four thirds of the payload).
    pub(super) fn request_payload_cap(&self) -> usize {
        let share = self.max_buffered_bytes / (2 * self.max_ready_requests) / 4 * 3;
        self.max_request_bytes.min(share.max(64 << 10))
    }
}

pub(super) fn ring_capacity_hint(config: &BatcherConfig) -> usize {
    (config.ring_bytes.next_power_of_two() / 4).max(4096)
}
