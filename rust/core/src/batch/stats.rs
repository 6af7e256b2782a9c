//! Counters shared between submitters, the batcher and the sender; what they report.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

/// Atomic counters behind [`Stats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    // Written by submitters on every call: each on its own cache line, away from the batcher's gauges, or
    // the batcher's writes to its neighbours would cost every submit a cache miss (measured: half its time).
    pub(super) accepted: CachePadded<AtomicU64>,
    /// Also accepted: counted by [`Pipeline::count_accepted_serialised`](super::Pipeline::count_accepted_serialised)'s
    /// callers, one at a time, with a load and a store.
    pub(super) accepted_serialised: CachePadded<AtomicU64>,
    pub(super) refused: CachePadded<AtomicU64>,
    pub(super) delivered: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) retried: AtomicU64,
    pub(super) throttled: AtomicU64,
    pub(super) requests: AtomicU64,
    pub(super) requests_failed: AtomicU64,
    pub(super) records_sent: AtomicU64,
    pub(super) shard_mismatches: AtomicU64,
    pub(super) wrong_shard_records: AtomicU64,
    pub(super) batcher_wakeups: AtomicU64,
    pub(super) buffered_bytes: AtomicUsize,
    pub(super) ready_requests: AtomicUsize,
    pub(super) outstanding_requests: AtomicUsize,
    pub(super) spilled: AtomicU64,
    pub(super) wal_recovered: AtomicU64,
    pub(super) wal_replay_pending: AtomicU64,
    pub(super) wal_errors: AtomicU64,
    pub(super) spill_recovered: AtomicU64,
    pub(super) spill_errors: AtomicU64,
    pub(super) spill_backlog_bytes: AtomicU64,
}

/// A point-in-time view of the pipeline's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    pub refused: u64,
    pub delivered: u64,
    pub dead_lettered: u64,
    /// Accepted, neither delivered nor dead-lettered yet.
    pub in_flight: u64,
    pub retried: u64,
    pub throttled: u64,
    pub requests: u64,
    pub requests_failed: u64,
    pub records_sent: u64,
    /// Records acknowledged in a shard other than the one the batcher routed them to (a reshard).
    pub shard_mismatches: u64,
    /// User records sent again because their aggregate landed in a shard whose hash range does not hold all of
    /// them: the KCL drops such an aggregate whole, so each of its records goes again, under the new map.
    pub wrong_shard_records: u64,
    /// Rounds of the batcher thread's loop: it sleeps until something it holds can move, so this grows with
    /// the work (reads, requests, completions, deadlines), never with the time spent waiting for tokens.
    pub batcher_wakeups: u64,
    pub ring_bytes_used: usize,
    pub buffered_bytes: usize,
    pub ready_requests: usize,
    pub outstanding_requests: usize,
    /// Events written to the spill because the ring was full (or the spill was still draining).
    pub spilled: u64,
    /// Events an earlier process left in the spill, replayed by this one (counted in `accepted` then).
    pub spill_recovered: u64,
    /// Failed reads of the spill (retried).
    pub spill_errors: u64,
    /// Bytes in the spill not yet replayed.
    pub spill_backlog_bytes: u64,
    /// Events an earlier process accepted but never saw acknowledged, replayed from the WAL by this one.
    pub wal_recovered: u64,
    /// 1 while WAL replay is still reading (events not yet counted in `accepted`).
    pub wal_replay_pending: u64,
    /// Failed WAL reads or cursor writes (retried).
    pub wal_errors: u64,
}

/// An event that reached a terminal failure: handed to the dead-letter hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRecord {
    pub data: Vec<u8>,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub attempts: u32,
    /// Shared by the events of one entry (an aggregate unpacks into many): a stopped producer's whole
    /// backlog is dead-lettered at once, and a copy per event was a third of that memory.
    pub error_code: Arc<str>,
    pub error_message: Arc<str>,
    /// Coarse monotonic nanoseconds when the event was accepted.
    pub enqueued_ns: u64,
    /// Coarse monotonic nanoseconds of its first failed attempt (0 when it never reached Kinesis).
    pub first_failure_ns: u64,
    /// WAL position of the record's lowest event ([`NO_WAL`] without a WAL): held until stored.
    pub wal: u64,
}

impl DeadRecord {
    /// Bytes this record holds: its own size and its buffers (the shared error texts not counted).
    pub fn mem(&self) -> u64 {
        (std::mem::size_of::<Self>()
            + self.data.capacity()
            + self.partition_key.capacity()
            + self.explicit_hash_key.as_ref().map_or(0, String::capacity)) as u64
    }
}

/// Why a whole request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestFailure {
    /// Throttled as a whole (HTTP 400 ProvisionedThroughputExceeded, `LimitExceeded`, 503 SlowDown).
    Throttled(String),
    /// Timeouts, connection errors, 5xx: retried, counting an attempt.
    Transient(String),
    /// Credentials or permissions: held and retried without counting an attempt; nothing is dropped.
    Auth(String),
    /// The request never left (breaker open, producer stopping): retried without counting an attempt.
    NotSent(String),
}
