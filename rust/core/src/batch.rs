//! The producer pipeline: `submit` into the ring, a batcher thread that turns events into sealed PutRecords
//! requests, and the bookkeeping of what Kinesis said about each record.
//!
//! ```text
//! submit ─► ring ─► batcher thread: route (MD5, cached) ─► per-shard KPL aggregate ─► per-shard queues
//!                                                         (retry queue first)      ─► open request ─► ready
//! sender (Python) ─► poll ready ─► POST ─► complete()/fail() ─► inbox ─► batcher: retry, back off or dead-letter
//! ```
//!
//! Invariant (counted by tests): every accepted event is delivered, dead-lettered or still in flight;
//! `accepted == delivered + dead_lettered + in_flight`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::clock;
use crate::kpl::{self, Aggregator};
use crate::md5x;
use crate::ring::{self, PushError, RingConsumer, RingProducer};
use crate::shards::{self, KeyCache, ShardMap};
use crate::spill::{Spill, SpillConfig};
use crate::wal::{self, Wal, WalConfig, NO_WAL};
use crate::wire::{self, RecordOutcome, RequestBuilder, Span};
use crate::CoreError;
use md5::{Digest, Md5};
use sha2::Sha256;

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

fn bad(field: &'static str, reason: impl Into<String>) -> CoreError {
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
}

// ---------------------------------------------------------------------------------------------------------
// Events in the ring: [enqueued_ns u64][key_len u16][flags u8][pad 5][key][ehk u128 LE if flagged]
// [WAL position u64 LE if flagged][data]. The spill and the WAL store them without the WAL position.

const EVENT_HEADER: usize = 16;
const FLAG_EHK: u8 = 1;
const FLAG_WAL: u8 = 2;
const WAL_FIELD: usize = 8;

/// Ring payload length of one event.
#[inline]
pub fn event_len(key_len: usize, has_ehk: bool, data_len: usize) -> usize {
    EVENT_HEADER + key_len + if has_ehk { 16 } else { 0 } + data_len
}

/// The longest event a config admits (a 256-character key in UTF-8, an explicit hash key, the largest record).
fn largest_event(max_record_bytes: usize) -> usize {
    event_len(256 * 4, true, max_record_bytes)
}

/// How `offer` runs what may block: a wait for room, or a write to the spill (the disk, and the spill's lock,
/// which the batcher holds while it reads the disk). The Python binding releases the GIL around it. The event's
/// `data` and `key` are read after it returns as well (see [`Pipeline::offer`]).
pub type Wait<'a> = &'a (dyn Fn() -> Result<(), CoreError> + Sync);

// Always inlined: a call per event measured as a visible share of submit.
#[allow(clippy::inline_always)]
#[inline(always)]
fn write_event(
    buf: &mut [u8],
    now: u64,
    key: &[u8],
    ehk: Option<u128>,
    wal: Option<u64>,
    data: &[u8],
) {
    buf[..8].copy_from_slice(&now.to_le_bytes());
    buf[8..10].copy_from_slice(&(key.len() as u16).to_le_bytes());
    buf[10] = if ehk.is_some() { FLAG_EHK } else { 0 } | if wal.is_some() { FLAG_WAL } else { 0 };
    let mut at = EVENT_HEADER;
    buf[at..at + key.len()].copy_from_slice(key);
    at += key.len();
    if let Some(h) = ehk {
        buf[at..at + 16].copy_from_slice(&h.to_le_bytes());
        at += 16;
    }
    if let Some(pos) = wal {
        buf[at..at + WAL_FIELD].copy_from_slice(&pos.to_le_bytes());
        at += WAL_FIELD;
    }
    buf[at..].copy_from_slice(data);
}

/// Whether bytes read back from disk hold a whole event (the ring's own events always do).
fn event_is_well_formed(buf: &[u8]) -> bool {
    if buf.len() < EVENT_HEADER {
        return false;
    }
    let key_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
    let ehk = if buf[10] & FLAG_EHK != 0 { 16 } else { 0 };
    let wal = if buf[10] & FLAG_WAL != 0 {
        WAL_FIELD
    } else {
        0
    };
    (1..=1024).contains(&key_len) && EVENT_HEADER + key_len + ehk + wal <= buf.len()
}

struct EventView<'a> {
    enqueued_ns: u64,
    key: &'a [u8],
    ehk: Option<u128>,
    wal: u64,
    data: &'a [u8],
}

#[inline]
fn read_event(buf: &[u8]) -> EventView<'_> {
    let enqueued_ns = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
    let key_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
    let mut at = EVENT_HEADER;
    let key = &buf[at..at + key_len];
    at += key_len;
    let ehk = if buf[10] & FLAG_EHK != 0 {
        let h = u128::from_le_bytes(buf[at..at + 16].try_into().unwrap_or_default());
        at += 16;
        Some(h)
    } else {
        None
    };
    let wal = if buf[10] & FLAG_WAL != 0 {
        let pos = u64::from_le_bytes(buf[at..at + WAL_FIELD].try_into().unwrap_or_default());
        at += WAL_FIELD;
        pos
    } else {
        NO_WAL
    };
    EventView {
        enqueued_ns,
        key,
        ehk,
        wal,
        data: &buf[at..],
    }
}

/// The partition key of a ring event, without parsing the rest.
#[inline]
fn event_key(buf: &[u8]) -> &[u8] {
    let key_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
    &buf[EVENT_HEADER..EVENT_HEADER + key_len]
}

/// Validates a partition key: 1 to 256 Unicode characters.
#[inline]
pub fn check_partition_key(key: &str) -> Result<(), CoreError> {
    if key.is_empty() {
        return Err(CoreError::InvalidPartitionKey("must not be empty".into()));
    }
    // Fast path: 256 bytes can never be more than 256 characters.
    if key.len() > wire::MAX_PARTITION_KEY_CHARS {
        let chars = key.chars().count();
        if chars > wire::MAX_PARTITION_KEY_CHARS {
            return Err(CoreError::InvalidPartitionKey(format!(
                "{chars} characters, at most 256 allowed"
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Counters shared between submitters, the batcher and the sender.

/// Atomic counters behind [`Stats`].
#[derive(Debug, Default)]
struct Counters {
    // Written by submitters on every call: each on its own cache line, away from the batcher's gauges, or
    // the batcher's writes to its neighbours would cost every submit a cache miss (measured: half its time).
    accepted: CachePadded<AtomicU64>,
    refused: CachePadded<AtomicU64>,
    delivered: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
    throttled: AtomicU64,
    requests: AtomicU64,
    requests_failed: AtomicU64,
    records_sent: AtomicU64,
    shard_mismatches: AtomicU64,
    wrong_shard_records: AtomicU64,
    batcher_wakeups: AtomicU64,
    buffered_bytes: AtomicUsize,
    ready_requests: AtomicUsize,
    outstanding_requests: AtomicUsize,
    spilled: AtomicU64,
    wal_recovered: AtomicU64,
    wal_replay_pending: AtomicU64,
    wal_errors: AtomicU64,
    spill_recovered: AtomicU64,
    spill_errors: AtomicU64,
    spill_backlog_bytes: AtomicU64,
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

// ---------------------------------------------------------------------------------------------------------
// Entries: one Kinesis record each (a KPL aggregate or a raw event), waiting in a shard queue.

#[derive(Debug)]
struct Entry {
    /// The record's data is `data[start..]` (an aggregate handed over in its aggregator's buffer starts
    /// after the room the aggregator kept for its tables).
    data: Vec<u8>,
    start: usize,
    key: Box<[u8]>,
    route_hash: u128,
    send_ehk: bool,
    events: u32,
    attempts: u32,
    first_ns: u64,
    /// Coarse monotonic nanoseconds of the first failed attempt; 0 while none has failed.
    first_failure_ns: u64,
    /// Lowest WAL position among its events ([`NO_WAL`] without a WAL).
    wal: u64,
    not_before_ns: u64,
    last_error: Option<(String, String)>,
    /// A KPL aggregate whose MD5 trailer is still zero: digests are computed many at a time (SIMD lanes)
    /// just before records are taken into a request.
    digest_pending: bool,
}

impl Entry {
    fn note_failure(&mut self, code: String, message: String) {
        if self.first_failure_ns == 0 {
            self.first_failure_ns = clock::coarse_ns().max(1);
        }
        self.last_error = Some((code, message));
    }

    /// Writes the digest of an aggregate sealed without one (the rare paths that need it at once).
    fn digest_now(&mut self) {
        if self.digest_pending {
            let digest: [u8; 16] = Md5::digest(kpl::digest_input(self.bytes())).into();
            kpl::set_digest(&mut self.data[self.start..], digest);
            self.digest_pending = false;
        }
    }

    fn cost(&self) -> usize {
        RequestBuilder::record_cost(self.bytes().len(), self.key.len())
    }

    /// The record's data.
    fn bytes(&self) -> &[u8] {
        &self.data[self.start..]
    }
    fn mem(&self) -> usize {
        self.data.capacity() + self.key.len() + std::mem::size_of::<Self>()
    }
}

/// One record of a sealed request: where its data sits in the body, enough to rebuild the entry if it fails.
#[derive(Debug, Clone, Copy)]
struct SentEntry {
    span: Span,
    data_len: u32,
    key_off: u32,
    key_len: u16,
    send_ehk: bool,
    shard: u32,
    route_hash: u128,
    events: u32,
    attempts: u32,
    first_ns: u64,
    first_failure_ns: u64,
    /// Lowest WAL position among its events ([`NO_WAL`] without a WAL).
    wal: u64,
}

/// A sealed PutRecords request, owned by the sender until it calls [`Pipeline::complete`] or
/// [`Pipeline::fail`].
#[derive(Debug)]
pub struct Request {
    id: u64,
    body: Arc<Vec<u8>>,
    keys: Vec<u8>,
    entries: Vec<SentEntry>,
    shard_ids: Arc<Vec<String>>,
    shards: Vec<u32>,
    generation: u64,
    events: u64,
    mem: usize,
    /// SHA-256 of `body`, for the SigV4 signature (computed on the batcher thread when it seals the request).
    sha256: Option<[u8; 32]>,
    /// Set while the request is out with the sender: if it is dropped without an outcome, its records go
    /// back for retry instead of vanishing.
    home: Option<Arc<Shared>>,
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(shared) = self.home.take() {
            shared.fail_request(
                self,
                RequestFailure::NotSent("the sender dropped the request without an outcome".into()),
            );
        }
    }
}

impl Request {
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn body(&self) -> &[u8] {
        &self.body
    }
    /// The body, shared: the sender may keep it alive (e.g. exported to Python) past completion.
    pub fn body_shared(&self) -> Arc<Vec<u8>> {
        Arc::clone(&self.body)
    }
    /// SHA-256 of the body, computed when the request was sealed (what SigV4 signs as the payload's hash).
    pub fn body_sha256(&self) -> Option<[u8; 32]> {
        self.sha256
    }
    /// Kinesis records in the request.
    pub fn records(&self) -> usize {
        self.entries.len()
    }
    /// User events in the request.
    pub fn events(&self) -> u64 {
        self.events
    }
    /// Ids of the shards the request writes to.
    pub fn shard_ids(&self) -> Vec<String> {
        self.shards
            .iter()
            .map(|&s| self.shard_ids[s as usize].clone())
            .collect()
    }
    /// Bytes of data plus partition keys (what Kinesis counts against its limits).
    pub fn payload_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.data_len as usize + e.key_len as usize)
            .sum()
    }
}

/// What the sender reports back, applied by the batcher thread.
#[derive(Debug)]
struct Completion {
    request_id: u64,
    generation: u64,
    shards: Vec<u32>,
    retries: Vec<(u32, Entry)>,
    /// Aggregates acknowledged in another shard than the one they were built for, with that shard's id: not
    /// counted as delivered until the batcher knows whether that shard's range holds every record in them.
    misplaced: Vec<(u32, Entry, String)>,
    throttled_shards: Vec<u32>,
    count_attempt: bool,
    mem: usize,
    /// The request's body, when nobody else holds it any more: reused for the next request.
    body: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Inbox {
    completions: Vec<Completion>,
    new_map: Option<ShardMap>,
}

#[derive(Debug)]
struct Shared {
    config: BatcherConfig,
    /// A producer handle, only to wake the batcher when outcomes arrive.
    ring: RingProducer,
    counters: Counters,
    ready: Mutex<VecDeque<Request>>,
    inbox: Mutex<Inbox>,
    dead: Mutex<Vec<DeadRecord>>,
    dead_pending: AtomicU64,
    /// Memory held by the records in `dead` (see [`DeadRecord::mem`]), not counting those handed out.
    dead_bytes: AtomicU64,
    /// An abandoning stop reads no more of the ring while `dead_bytes` is above this ([`u64::MAX`]: no bound).
    dead_bound: AtomicU64,
    waker: Waker,
    flushing: AtomicUsize,
    stopping: AtomicBool,
    abandon: AtomicBool,
    refresh_wanted: AtomicBool,
    next_request_id: AtomicU64,
    wal: Option<Wal>,
    /// WAL positions of dead records handed out by `take_dead` and not yet confirmed (oldest first).
    dead_handed: Mutex<VecDeque<u64>>,
    spill: Option<Mutex<Spill>>,
    /// Set from the first spilled event until the batcher has replayed the last: `submit` goes to the spill.
    spilling: AtomicBool,
}

impl Shared {
    fn new(config: BatcherConfig, ring: RingProducer) -> Result<Arc<Self>, CoreError> {
        // Spill and WAL frames hold one event each (without the ring's WAL field).
        let max_frame = u32::try_from(largest_event(config.max_record_bytes)).unwrap_or(u32::MAX);
        let spill = match &config.spill {
            Some(sc) => Some(Spill::open(sc, max_frame)?),
            None => None,
        };
        let backlog = spill.as_ref().is_some_and(Spill::has_backlog);
        let wal = match &config.wal {
            Some(wc) => Some(Wal::open(wc, max_frame)?),
            None => None,
        };
        let counters = Counters::default();
        if let Some(sp) = &spill {
            counters
                .spill_backlog_bytes
                .store(sp.backlog_bytes(), Ordering::Relaxed);
        }
        Ok(Arc::new(Self {
            spill: spill.map(Mutex::new),
            wal,
            dead_handed: Mutex::new(VecDeque::new()),
            spilling: AtomicBool::new(backlog),
            ring,
            counters,
            ready: Mutex::new(VecDeque::new()),
            inbox: Mutex::new(Inbox::default()),
            dead: Mutex::new(Vec::new()),
            dead_pending: AtomicU64::new(0),
            dead_bytes: AtomicU64::new(0),
            dead_bound: AtomicU64::new(u64::MAX),
            waker: Waker::new()?,
            flushing: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            refresh_wanted: AtomicBool::new(false),
            next_request_id: AtomicU64::new(1),
            config,
        }))
    }

    /// Sends every record of a failed request back to the batcher (retry, back off or dead-letter).
    fn fail_request(&self, request: &Request, failure: RequestFailure) {
        let c = &self.counters;
        c.requests_failed.fetch_add(1, Ordering::Relaxed);
        let (code, message, count_attempt, throttled) = match failure {
            RequestFailure::Throttled(m) => {
                ("ProvisionedThroughputExceededException", m, true, true)
            }
            RequestFailure::Transient(m) => ("RequestFailed", m, true, false),
            RequestFailure::Auth(m) => ("AuthFailure", m, false, false),
            RequestFailure::NotSent(m) => ("NotSent", m, false, false),
        };
        if throttled {
            c.throttled
                .fetch_add(request.entries.len() as u64, Ordering::Relaxed);
        }
        let mut retries = Vec::with_capacity(request.entries.len());
        for sent in &request.entries {
            // The body was built by us; a span outside it would be a bug, never a reason to drop a record.
            match rebuild(request, sent) {
                Ok(mut entry) => {
                    entry.note_failure(code.to_owned(), message.clone());
                    retries.push((sent.shard, entry));
                }
                Err(e) => unreachable!("request body lost a record: {e}"),
            }
        }
        let throttled_shards = if throttled {
            request.shards.clone()
        } else {
            Vec::new()
        };
        self.send_back(
            request,
            retries,
            Vec::new(),
            throttled_shards,
            count_attempt,
        );
    }

    fn send_back(
        &self,
        request: &Request,
        retries: Vec<(u32, Entry)>,
        misplaced: Vec<(u32, Entry, String)>,
        throttled_shards: Vec<u32>,
        count: bool,
    ) {
        self.counters
            .outstanding_requests
            .fetch_sub(1, Ordering::AcqRel);
        let completion = Completion {
            request_id: request.id,
            generation: request.generation,
            shards: request.shards.clone(),
            retries,
            misplaced,
            throttled_shards,
            count_attempt: count,
            mem: request.mem,
            body: None,
        };
        lock(&self.inbox).completions.push(completion);
        self.ring.wake_consumer();
    }
}

/// Events an earlier process accepted and this one read back from disk: accepted here, and counted as such.
fn count_recovered(c: &Counters, recovered: &AtomicU64, n: u64) {
    if n > 0 {
        c.accepted.fetch_add(n, Ordering::Relaxed);
        recovered.fetch_add(n, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going rather than cascade.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------------------
// Wake-up file descriptor: an eventfd the sender's event loop watches.

#[derive(Debug)]
struct Waker {
    fd: i32,
    armed: AtomicBool,
}

impl Waker {
    fn new() -> Result<Self, CoreError> {
        // SAFETY: eventfd has no memory-safety preconditions; a negative result is handled.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(bad(
                "wakeup_fd",
                std::io::Error::last_os_error().to_string(),
            ));
        }
        Ok(Self {
            fd,
            armed: AtomicBool::new(true),
        })
    }

    /// Signals the sender once per drain: later signals are skipped until it re-arms by draining.
    fn wake(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our own eventfd; EAGAIN (counter full) is harmless.
            unsafe { libc::write(self.fd, (&raw const one).cast(), 8) };
        }
    }

    /// Clears the signal, then re-arms: in that order, a `wake` in between is skipped (the caller looks at
    /// what it would have signalled after draining), never swallowed by the read with the waker left disarmed.
    fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64 from our own non-blocking eventfd.
        unsafe { libc::read(self.fd, (&raw mut value).cast(), 8) };
        self.armed.store(true, Ordering::SeqCst);
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed exactly once.
        unsafe { libc::close(self.fd) };
    }
}

// ---------------------------------------------------------------------------------------------------------
// The pipeline handle: what `submit` and the sender talk to.

/// Overflow policy of `submit` when the ring is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Reject,
    Block(Duration),
    /// Append to the spill log (the pipeline must have one); `BufferFull` only when the spill is full.
    Spill,
}

/// Handle to the ring and the batcher thread.
#[derive(Debug)]
pub struct Pipeline {
    ring: RingProducer,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Whether submits go through the WAL: read on every submit, so kept here, in the submitter's own
    /// read-only memory, not in `Shared`, whose lines the batcher and the sender write.
    durable: bool,
    /// [`BatcherConfig::shed_at_bytes`], likewise.
    shed_at: usize,
}

impl Pipeline {
    /// Validates the config, allocates the ring and starts the batcher thread with the given shard map.
    pub fn start(config: BatcherConfig, map: ShardMap) -> Result<Self, CoreError> {
        config.validate()?;
        let (ring, consumer) = ring::channel(config.ring_bytes)?;
        let shared = Shared::new(config, ring.clone())?;
        consumer.set_wake_threshold(
            shared
                .config
                .max_request_bytes
                .min(ring_capacity_hint(&shared.config)),
        );
        let batcher = Batcher::new(Arc::clone(&shared), map);
        let thread = std::thread::Builder::new()
            .name("treasure-batcher".into())
            .spawn(move || batcher.run(consumer))
            .map_err(|e| bad("batcher", format!("cannot start the batcher thread: {e}")))?;
        Ok(Self {
            durable: shared.wal.is_some(),
            shed_at: shared.config.shed_at_bytes,
            ring,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.shared.config
    }

    /// Whether events go through the WAL (`durability = "wal"`): then [`offer`](Self::offer) and
    /// [`commit_wal`](Self::commit_wal) may wait on the disk.
    #[inline]
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Whether an event passes [`check`](Self::check) on its byte lengths alone (a key of 1 to 256 bytes is 1
    /// to 256 characters): the common case, answered without building an error.
    #[inline]
    fn plainly_valid(&self, data_len: usize, key: &str) -> bool {
        !key.is_empty()
            && key.len() <= wire::MAX_PARTITION_KEY_CHARS
            && RequestBuilder::record_cost(data_len, key.len())
                <= self.shared.config.max_record_bytes
    }

    /// Checks an event without accepting it.
    #[inline]
    pub fn check(&self, data_len: usize, key: &str) -> Result<(), CoreError> {
        if self.plainly_valid(data_len, key) {
            return Ok(());
        }
        check_partition_key(key)?;
        let size = RequestBuilder::record_cost(data_len, key.len());
        let max = self.shared.config.max_record_bytes;
        if size > max {
            return Err(CoreError::RecordTooLarge { size, max });
        }
        Ok(())
    }

    /// Accepts one event or refuses it whole. Never blocks unless `overflow` is `Block`.
    #[inline]
    pub fn submit(
        &self,
        data: &[u8],
        key: &str,
        ehk: Option<u128>,
        overflow: Overflow,
    ) -> Result<(), CoreError> {
        self.offer(data, key, ehk, clock::coarse_ns(), overflow, |push| push())?;
        self.count_accepted(1);
        self.commit_wal()
    }

    /// The one way an event enters the ring: checks it, pushes it, and when the ring is full follows
    /// `overflow`, running the blocking push or the spill's write through `wait` (the Python binding releases
    /// the GIL there). Under a WAL only the wait for room goes through `wait`: the frame's append takes the
    /// WAL's lock, which [`commit_wal`](Self::commit_wal) and the batcher hold across disk writes, so callers
    /// that must not wait on the disk call `offer` whole without the GIL when [`is_durable`](Self::is_durable).
    /// Refusals are counted here; acceptances are not: callers add them with
    /// [`count_accepted`](Self::count_accepted), once per batch (one atomic add instead of one per event).
    ///
    /// `wait` runs at most once, and `data` and `key` are read again after it returns (under a WAL, the frame
    /// and the ring entry are written then): whatever owns them must keep them alive until `offer` returns,
    /// not only while `wait` runs.
    #[inline]
    pub fn offer(
        &self,
        data: &[u8],
        key: &str,
        ehk: Option<u128>,
        now: u64,
        overflow: Overflow,
        wait: impl FnOnce(Wait<'_>) -> Result<(), CoreError>,
    ) -> Result<(), CoreError> {
        // The common case inline, with nothing but a flag to pass back: a valid event, no shedding, no WAL, no
        // spill backlog, and room in the ring. Everything else (including a full ring, which it retries) goes
        // through `offer_general`, which does the same checks again and builds the errors.
        let plain = !self.durable
            && self.shed_at == 0
            && self.plainly_valid(data.len(), key)
            && !(overflow == Overflow::Spill && self.shared.spilling.load(Ordering::Acquire));
        if plain {
            let len = event_len(key.len(), ehk.is_some(), data.len());
            let write = |buf: &mut [u8]| write_event(buf, now, key.as_bytes(), ehk, None, data);
            if self.ring.try_push_with(len, write).is_ok() {
                return Ok(());
            }
        }
        self.offer_general(data, key, ehk, now, overflow, wait)
    }

    /// [`offer`](Self::offer) in full.
    #[inline(never)]
    fn offer_general(
        &self,
        data: &[u8],
        key: &str,
        ehk: Option<u128>,
        now: u64,
        overflow: Overflow,
        wait: impl FnOnce(Wait<'_>) -> Result<(), CoreError>,
    ) -> Result<(), CoreError> {
        if let Err(e) = self.check(data.len(), key) {
            self.count_refused();
            return Err(e);
        }
        if self.shed_at != 0 {
            if let Err(e) = self.shed_if_critical() {
                self.count_refused();
                return Err(e);
            }
        }
        if let (true, Some(w)) = (self.durable, self.shared.wal.as_ref()) {
            let pushed = self.offer_wal(w, data, key, ehk, now, overflow, wait);
            if matches!(pushed, Err(CoreError::BufferFull)) {
                self.count_refused();
            }
            return pushed;
        }
        if overflow == Overflow::Spill && self.shared.spilling.load(Ordering::Acquire) {
            // Until the spill is empty again, events queue behind it: one thread's events stay in order.
            let spilled = wait(&|| self.spill(data, key, ehk, now));
            if spilled.is_err() {
                self.count_refused();
            }
            return spilled;
        }
        let pushed = match self.push(data, key, ehk, now, None) {
            Err(CoreError::BufferFull) => match overflow {
                Overflow::Reject => Err(CoreError::BufferFull),
                Overflow::Spill => wait(&|| self.spill(data, key, ehk, now)),
                Overflow::Block(timeout) => {
                    let deadline = Instant::now() + timeout;
                    wait(&|| self.push(data, key, ehk, now, Some(deadline)))
                }
            },
            other => other,
        };
        if matches!(pushed, Err(CoreError::BufferFull)) {
            self.count_refused();
        }
        pushed
    }

    /// Writes a checked event into the ring, waiting for room until `deadline` when one is given.
    #[inline]
    fn push(
        &self,
        data: &[u8],
        key: &str,
        ehk: Option<u128>,
        now: u64,
        deadline: Option<Instant>,
    ) -> Result<(), CoreError> {
        let len = event_len(key.len(), ehk.is_some(), data.len());
        let write = |buf: &mut [u8]| write_event(buf, now, key.as_bytes(), ehk, None, data);
        let pushed = match deadline {
            None => self.ring.try_push_with(len, write),
            Some(d) => self.ring.push_with_deadline(len, d, write),
        };
        match pushed {
            Ok(()) => Ok(()),
            Err(PushError::Full) => Err(CoreError::BufferFull),
            Err(PushError::Closed) => Err(CoreError::Closed),
            Err(PushError::TooLarge) => Err(CoreError::RecordTooLarge {
                size: len,
                max: self.ring.max_payload().saturating_sub(EVENT_HEADER),
            }),
        }
    }

    /// The WAL path: under the WAL's lock, checks the ring for room, encodes the event into its WAL frame (in
    /// the page cache once written: it survives the process), pushes the event with its position. Durable against
    /// a crash of the machine after [`commit_wal`](Self::commit_wal) under `fsync = always`.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    #[inline(never)]
    fn offer_wal(
        &self,
        w: &Wal,
        data: &[u8],
        key: &str,
        ehk: Option<u128>,
        now: u64,
        overflow: Overflow,
        wait: impl FnOnce(Wait<'_>) -> Result<(), CoreError>,
    ) -> Result<(), CoreError> {
        let len = event_len(key.len(), ehk.is_some(), data.len()) + WAL_FIELD;
        if len > self.ring.max_payload() {
            return Err(CoreError::RecordTooLarge {
                size: len,
                max: self
                    .ring
                    .max_payload()
                    .saturating_sub(EVENT_HEADER + WAL_FIELD),
            });
        }
        let mut wait = Some(wait);
        loop {
            {
                let mut writer = w.writer.lock();
                if self.ring.is_closed() {
                    return Err(CoreError::Closed);
                }
                if self.ring.has_room(len) {
                    let pos = writer.append_with(len - WAL_FIELD, |frame| {
                        write_event(frame, now, key.as_bytes(), ehk, None, data);
                    })?;
                    let write = |buf: &mut [u8]| {
                        write_event(buf, now, key.as_bytes(), ehk, Some(pos), data);
                    };
                    return match self.ring.try_push_with(len, write) {
                        Ok(()) => Ok(()),
                        Err(PushError::Closed) => Err(CoreError::Closed),
                        // Only holders of the WAL lock push, and the consumer only frees room.
                        Err(PushError::Full | PushError::TooLarge) => {
                            unreachable!("the ring had room under the WAL lock")
                        }
                    };
                }
            }
            let Overflow::Block(timeout) = overflow else {
                return Err(CoreError::BufferFull);
            };
            // Wait for room once, without the WAL lock (and, from Python, without the GIL).
            let Some(wait) = wait.take() else {
                return Err(CoreError::BufferFull);
            };
            let deadline = Instant::now() + timeout;
            wait(&|| {
                while !self.ring.has_room(len) {
                    if self.ring.is_closed() {
                        return Err(CoreError::Closed);
                    }
                    if Instant::now() >= deadline {
                        return Err(CoreError::BufferFull);
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                Ok(())
            })?;
        }
    }

    /// Under a WAL, pushes the longest prefix of `events` that goes in without a question: valid, no shedding
    /// configured, and room in the ring now. It holds the WAL's lock once for all of them (so ring order is still
    /// WAL order) instead of once per event, which is what `submit_many` costs per event under a WAL. Returns how
    /// many it pushed; the event after them, if any, goes to [`offer`](Self::offer) alone, which refuses it,
    /// waits for room or reports the WAL's error, as for any other. Without a WAL it pushes nothing. Accepted
    /// events are not counted (see [`count_accepted`](Self::count_accepted)).
    pub fn offer_wal_run(&self, events: &[(&[u8], &str, Option<u128>)], now: u64) -> usize {
        let Some(w) = self.shared.wal.as_ref().filter(|_| self.durable) else {
            return 0;
        };
        if self.shed_at != 0 || events.is_empty() {
            return 0;
        }
        let mut writer = w.writer.lock();
        if self.ring.is_closed() {
            return 0;
        }
        for (i, &(data, key, ehk)) in events.iter().enumerate() {
            let len = event_len(key.len(), ehk.is_some(), data.len()) + WAL_FIELD;
            if !self.plainly_valid(data.len(), key) || !self.ring.has_room(len) {
                return i;
            }
            let frame = writer.append_with(len - WAL_FIELD, |frame| {
                write_event(frame, now, key.as_bytes(), ehk, None, data);
            });
            // An append that fails (a full disk, a closed WAL) is `offer`'s to report, for this same event.
            let Ok(pos) = frame else { return i };
            let write =
                |buf: &mut [u8]| write_event(buf, now, key.as_bytes(), ehk, Some(pos), data);
            match self.ring.try_push_with(len, write) {
                Ok(()) => {}
                // Closed after the frame went in: as in `offer_wal`, the frame is replayed at the next start.
                Err(PushError::Closed) => return i,
                // Only holders of the WAL lock push, and the consumer only frees room.
                Err(PushError::Full | PushError::TooLarge) => {
                    unreachable!("the ring had room under the WAL lock")
                }
            }
        }
        events.len()
    }

    /// Sheds when the backlog is critical: the ring past `shed_at_bytes`, or anything waiting in the spill.
    #[cold]
    fn shed_if_critical(&self) -> Result<(), CoreError> {
        let used = self.ring.used_bytes();
        if used >= self.shed_at || self.shared.spilling.load(Ordering::Acquire) {
            return Err(CoreError::Overloaded {
                used,
                critical: self.shed_at,
            });
        }
        Ok(())
    }

    /// With `durability = "wal"`, syncs what `offer` appended under `fsync = always` (otherwise it only reports a
    /// failed or closed WAL): call it before telling the caller its events are accepted. A no-op without a WAL.
    #[inline]
    pub fn commit_wal(&self) -> Result<(), CoreError> {
        if !self.durable {
            return Ok(());
        }
        match self.shared.wal.as_ref() {
            Some(w) => w.commit(),
            None => Ok(()),
        }
    }

    /// After the final dead letters are confirmed at close: when nothing is held any more, the whole WAL is
    /// acknowledged (the next start replays nothing).
    pub fn finish_wal(&self) -> Result<(), CoreError> {
        let Some(w) = self.shared.wal.as_ref() else {
            return Ok(());
        };
        let s = self.stats();
        if s.in_flight == 0 && s.wal_replay_pending == 0 && self.dead_pending() == 0 {
            w.commit()?;
            w.release(w.end(), Duration::ZERO, true)?;
        }
        Ok(())
    }

    /// After [`shutdown`](Self::shutdown) (and [`finish_wal`](Self::finish_wal)): writes out and closes the
    /// spill and the WAL, releasing their directories for the next producer.
    pub fn close_storage(&self) -> Result<(), CoreError> {
        if let Some(spill) = self.shared.spill.as_ref() {
            lock(spill).close()?;
        }
        if let Some(w) = self.shared.wal.as_ref() {
            w.close()?;
        }
        Ok(())
    }

    /// Appends a checked event to the spill log and marks the pipeline as spilling.
    #[cold]
    fn spill(&self, data: &[u8], key: &str, ehk: Option<u128>, now: u64) -> Result<(), CoreError> {
        let Some(spill) = self.shared.spill.as_ref() else {
            return Err(CoreError::BufferFull);
        };
        let mut event = vec![0u8; event_len(key.len(), ehk.is_some(), data.len())];
        write_event(&mut event, now, key.as_bytes(), ehk, None, data);
        let mut sp = lock(spill);
        sp.push(&event)?;
        self.shared.spilling.store(true, Ordering::Release);
        self.shared
            .counters
            .spill_backlog_bytes
            .store(sp.backlog_bytes(), Ordering::Relaxed);
        drop(sp);
        self.shared.counters.spilled.fetch_add(1, Ordering::Relaxed);
        self.ring.wake_consumer();
        Ok(())
    }

    /// Adds `n` events that [`offer`](Self::offer) accepted to `accepted`.
    #[inline]
    pub fn count_accepted(&self, n: u64) {
        if n > 0 {
            self.shared
                .counters
                .accepted
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    fn count_refused(&self) {
        self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the ring still accepts events.
    pub fn is_closed(&self) -> bool {
        self.ring.is_closed()
    }

    /// The eventfd that becomes readable when sealed requests are ready.
    pub fn wakeup_fd(&self) -> i32 {
        self.shared.waker.fd
    }

    /// Clears the wake-up signal. The sender calls it on every wake-up, whether or not it has room to take
    /// requests: the eventfd is level-triggered, so a signal left set makes the event loop spin.
    pub fn clear_wakeup(&self) {
        self.shared.waker.drain();
    }

    /// Takes up to `max` sealed requests (re-arms the wake-up when the queue runs dry).
    pub fn poll(&self, max: usize) -> Vec<Request> {
        let mut out = Vec::new();
        let mut ready = lock(&self.shared.ready);
        if ready.len() <= max {
            self.shared.waker.drain();
        }
        while out.len() < max {
            match ready.pop_front() {
                Some(r) => out.push(r),
                None => break,
            }
        }
        self.shared
            .counters
            .ready_requests
            .store(ready.len(), Ordering::Relaxed);
        drop(ready);
        if !out.is_empty() {
            // Room in the ready queue: let the batcher seal more.
            self.ring.wake_consumer();
        }
        out
    }

    /// Whether `request` was sealed by this pipeline (outcomes of another pipeline's request are refused).
    pub fn owns(&self, request: &Request) -> bool {
        request
            .home
            .as_ref()
            .is_some_and(|home| Arc::ptr_eq(home, &self.shared))
    }

    /// Applies a PutRecords response (HTTP 200 body). Delivered records are counted here; failed ones go back
    /// to the batcher to be retried or dead-lettered.
    pub fn complete(
        &self,
        mut request: Request,
        response: &[u8],
    ) -> Result<CompleteSummary, CoreError> {
        // An early return below drops `request` with its home still set, which sends every record back.
        let outcomes = wire::parse_put_records(response, request.entries.len())?;
        let mut summary = CompleteSummary::default();
        let mut retries = Vec::new();
        let mut misplaced = Vec::new();
        let mut throttled_shards = Vec::new();
        for (sent, outcome) in request.entries.iter().zip(outcomes) {
            match outcome {
                RecordOutcome::Ok { shard_id, .. } => {
                    if shard_id.is_empty() || request.shard_ids[sent.shard as usize] == shard_id {
                        summary.delivered += u64::from(sent.events);
                        continue;
                    }
                    summary.shard_mismatches += 1;
                    if sent.events > 1 {
                        // An aggregate: Kinesis placed it by its first record, the others may be outside the
                        // shard it landed in. The batcher decides once it knows that shard's range.
                        misplaced.push((sent.shard, rebuild(&request, sent)?, shard_id));
                    } else {
                        // A plain record lands where its own key says: wherever that is, it is right.
                        summary.delivered += 1;
                    }
                }
                RecordOutcome::Failed {
                    error_code,
                    error_message,
                } => {
                    if error_code == "ProvisionedThroughputExceededException" {
                        summary.throttled += 1;
                        if !throttled_shards.contains(&sent.shard) {
                            throttled_shards.push(sent.shard);
                        }
                    }
                    summary.failed += 1;
                    let mut entry = rebuild(&request, sent)?;
                    entry.note_failure(error_code, error_message);
                    retries.push((sent.shard, entry));
                }
            }
        }
        request.home = None;
        let c = &self.shared.counters;
        c.delivered.fetch_add(summary.delivered, Ordering::Relaxed);
        c.throttled.fetch_add(summary.throttled, Ordering::Relaxed);
        if summary.shard_mismatches > 0 {
            c.shard_mismatches
                .fetch_add(summary.shard_mismatches, Ordering::Relaxed);
            self.shared.refresh_wanted.store(true, Ordering::Release);
        }
        self.shared
            .send_back(&request, retries, misplaced, throttled_shards, true);
        Ok(summary)
    }

    /// The whole request failed: every record goes back for retry (see [`RequestFailure`]).
    pub fn fail(&self, mut request: Request, failure: RequestFailure) {
        request.home = None;
        self.shared.fail_request(&request, failure);
    }

    /// Replaces the shard map (after ListShards). Queued records are re-routed by the batcher.
    pub fn set_shards(&self, map: ShardMap) {
        lock(&self.shared.inbox).new_map = Some(map);
        self.shared.refresh_wanted.store(false, Ordering::Release);
        self.ring.wake_consumer();
    }

    /// Whether a response hinted that the shard map is stale (cleared by [`set_shards`](Self::set_shards)).
    pub fn refresh_wanted(&self) -> bool {
        self.shared.refresh_wanted.load(Ordering::Acquire)
    }

    /// Takes the records that reached a terminal failure; call [`confirm_dead`](Self::confirm_dead) once
    /// they are stored so they count as dead-lettered.
    pub fn take_dead(&self, max: usize) -> Vec<DeadRecord> {
        let mut dead = lock(&self.shared.dead);
        let out = if dead.len() <= max {
            std::mem::take(&mut *dead)
        } else {
            // Oldest first, in bounded batches: handing out a whole ring's worth at once costs its size again.
            let rest = dead.split_off(max);
            std::mem::replace(&mut *dead, rest)
        };
        let taken: u64 = out.iter().map(DeadRecord::mem).sum();
        self.shared.dead_bytes.fetch_sub(taken, Ordering::AcqRel);
        if self.shared.wal.is_some() {
            // Until confirmed, their WAL frames stay: a crash before the DLQ has them replays them.
            lock(&self.shared.dead_handed).extend(out.iter().map(|d| d.wal));
        }
        out
    }

    /// Marks `n` events handed out by [`take_dead`](Self::take_dead) as durably dead-lettered.
    pub fn confirm_dead(&self, n: u64) {
        if self.shared.wal.is_some() {
            let mut handed = lock(&self.shared.dead_handed);
            let n = (n as usize).min(handed.len());
            handed.drain(..n);
        }
        self.shared.dead_pending.fetch_sub(n, Ordering::AcqRel);
        self.shared
            .counters
            .dead_lettered
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Records waiting in the dead list (not yet confirmed).
    pub fn dead_pending(&self) -> u64 {
        self.shared.dead_pending.load(Ordering::Acquire)
    }

    /// While at least one flush is active, linger is ignored and everything is sealed at once.
    pub fn begin_flush(&self) {
        self.shared.flushing.fetch_add(1, Ordering::AcqRel);
        self.ring.wake_consumer();
    }

    pub fn end_flush(&self) {
        self.shared.flushing.fetch_sub(1, Ordering::AcqRel);
    }

    /// Stops accepting events; the batcher keeps delivering what it holds.
    pub fn close(&self) {
        self.ring.close();
    }

    /// Stops the batcher thread. With `abandon`, everything not yet delivered goes to the dead list with
    /// reason `ProducerClosed` (requests still held by the sender must be failed or completed first).
    /// Equivalent to [`shutdown_bounded`](Self::shutdown_bounded) without a bound: the whole backlog may be
    /// in the dead list at once.
    pub fn shutdown(&self, abandon: bool) {
        self.shutdown_bounded(abandon, None);
    }

    /// [`shutdown`](Self::shutdown); when abandoning with `dead_bound` bytes, the batcher reads no more of the
    /// ring while the records waiting in the dead list hold more than that, so memory stays bounded by the
    /// ring plus about the bound. Another thread must then take (and confirm) dead records while this call
    /// waits, or call [`lift_dead_bound`](Self::lift_dead_bound) when it cannot: otherwise it waits forever.
    pub fn shutdown_bounded(&self, abandon: bool, dead_bound: Option<u64>) {
        self.shared
            .dead_bound
            .store(dead_bound.unwrap_or(u64::MAX), Ordering::Release);
        self.ring.close();
        self.shared.abandon.store(abandon, Ordering::Release);
        self.shared.stopping.store(true, Ordering::Release);
        self.ring.wake_consumer();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }

    /// Lets an abandoning stop go on without waiting for the dead list to be taken (the DLQ failed).
    pub fn lift_dead_bound(&self) {
        self.shared.dead_bound.store(u64::MAX, Ordering::Release);
    }

    /// Memory held by the records waiting in the dead list.
    pub fn dead_bytes(&self) -> u64 {
        self.shared.dead_bytes.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        // Read the terminal counters before `accepted`, so in_flight never goes negative.
        let delivered = c.delivered.load(Ordering::Acquire);
        let dead_lettered = c.dead_lettered.load(Ordering::Acquire);
        let accepted = c.accepted.load(Ordering::Acquire);
        Stats {
            accepted,
            refused: c.refused.load(Ordering::Relaxed),
            delivered,
            dead_lettered,
            in_flight: accepted.saturating_sub(delivered + dead_lettered),
            retried: c.retried.load(Ordering::Relaxed),
            throttled: c.throttled.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            requests_failed: c.requests_failed.load(Ordering::Relaxed),
            records_sent: c.records_sent.load(Ordering::Relaxed),
            shard_mismatches: c.shard_mismatches.load(Ordering::Relaxed),
            wrong_shard_records: c.wrong_shard_records.load(Ordering::Relaxed),
            batcher_wakeups: c.batcher_wakeups.load(Ordering::Relaxed),
            ring_bytes_used: self.ring.used_bytes(),
            buffered_bytes: c.buffered_bytes.load(Ordering::Relaxed),
            ready_requests: c.ready_requests.load(Ordering::Relaxed),
            outstanding_requests: c.outstanding_requests.load(Ordering::Relaxed),
            spilled: c.spilled.load(Ordering::Relaxed),
            spill_recovered: c.spill_recovered.load(Ordering::Relaxed),
            spill_errors: c.spill_errors.load(Ordering::Relaxed),
            spill_backlog_bytes: c.spill_backlog_bytes.load(Ordering::Relaxed),
            wal_recovered: c.wal_recovered.load(Ordering::Relaxed),
            wal_replay_pending: c.wal_replay_pending.load(Ordering::Acquire),
            wal_errors: c.wal_errors.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Dropped without `shutdown`: no sender is left to deliver what is held, so waiting could hang
        // forever. Stop at once; the owner (the Python Producer) warns when it was never closed.
        self.shutdown(true);
    }
}

/// What one PutRecords response said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompleteSummary {
    pub delivered: u64,
    pub failed: u64,
    pub throttled: u64,
    pub shard_mismatches: u64,
}

fn rebuild(request: &Request, sent: &SentEntry) -> Result<Entry, CoreError> {
    let data = wire::recover_data(&request.body, sent.span)?;
    let key_off = sent.key_off as usize;
    let key = request.keys[key_off..key_off + sent.key_len as usize].into();
    Ok(Entry {
        data,
        start: 0,
        key,
        route_hash: sent.route_hash,
        send_ehk: sent.send_ehk,
        events: sent.events,
        attempts: sent.attempts,
        first_ns: sent.first_ns,
        first_failure_ns: sent.first_failure_ns,
        wal: sent.wal,
        not_before_ns: 0,
        last_error: None,
        digest_pending: false,
    })
}

// ---------------------------------------------------------------------------------------------------------
// The batcher thread.

#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    rate: f64,
    last_ns: u64,
}

impl TokenBucket {
    fn new(rate: f64, now: u64) -> Self {
        Self {
            tokens: rate,
            rate,
            last_ns: now,
        }
    }
    fn refill(&mut self, now: u64) {
        if now > self.last_ns {
            self.tokens =
                (self.tokens + self.rate * (now - self.last_ns) as f64 / 1e9).min(self.rate);
            self.last_ns = now;
        }
    }
    /// A cost above the bucket's size is allowed once the bucket is full.
    fn can_take(&self, cost: f64) -> bool {
        self.tokens >= cost.min(self.rate)
    }
    fn take(&mut self, cost: f64) {
        self.tokens -= cost;
    }
    /// Nanoseconds until `cost` would be available.
    fn wait_ns(&self, cost: f64) -> u64 {
        let missing = cost.min(self.rate) - self.tokens;
        if missing <= 0.0 {
            0
        } else {
            (missing / self.rate * 1e9) as u64 + 1
        }
    }
}

#[derive(Debug)]
struct OpenAggregate {
    agg: Aggregator,
    first_key: Vec<u8>,
    first_hash: u128,
    first_ehk: bool,
    first_ns: u64,
    /// Lowest WAL position of its events.
    wal: u64,
}

#[derive(Debug)]
struct ShardState {
    open: Option<OpenAggregate>,
    retry: VecDeque<Entry>,
    fresh: VecDeque<Entry>,
    records: TokenBucket,
    bytes: TokenBucket,
    /// Sealed requests holding this shard's records, not yet completed.
    outstanding: u32,
    /// Records of this shard in the open request.
    in_open: u32,
    /// An aggregate of this shard landed elsewhere: the map is stale, so nothing more goes out from here until
    /// the new map has re-routed what waits (a copy sent on by the old map would land wrong too, and with
    /// `ordered` the records sent again must go before newer ones).
    held: bool,
}

impl ShardState {
    fn new(config: &BatcherConfig, now: u64) -> Self {
        Self {
            open: None,
            retry: VecDeque::new(),
            fresh: VecDeque::new(),
            records: TokenBucket::new(config.shard_records_per_s, now),
            bytes: TokenBucket::new(config.shard_bytes_per_s, now),
            outstanding: 0,
            in_open: 0,
            held: false,
        }
    }
    fn is_idle(&self) -> bool {
        self.open.is_none() && self.retry.is_empty() && self.fresh.is_empty()
    }
}

/// The request being filled.
#[derive(Debug)]
struct OpenRequest {
    builder: RequestBuilder,
    keys: Vec<u8>,
    entries: Vec<SentEntry>,
    shards: Vec<u32>,
    key_hashes: FxHashSet<u128>,
    first_ns: u64,
    /// When its first record was taken in: under rate limiting, the request waits for company from then on.
    opened_ns: u64,
    events: u64,
    /// Aggregates placed in the body with a zero MD5 trailer, with their spans: hashed a full set of SIMD
    /// lanes at a time (or at seal), then the base64 of the trailer rewritten in place.
    deferred: Vec<(Vec<u8>, usize, Span)>,
}

const KEY_CACHE_MAX: usize = 1 << 17;
/// Most raw-record buffers kept for reuse (about a ring chunk's worth of small events), and the largest kept
/// (small events only, where the allocation weighs most): idle memory stays under 2 MiB.
const RAW_POOL_MAX: usize = 4096;
const RAW_POOL_CAPACITY: usize = 512;
const READ_CHUNK: usize = 256 * 1024;
const IDLE_PARK: Duration = Duration::from_millis(100);
/// Longest the batcher waits for a new shard map after an aggregate landed in an unexpected shard; then what
/// waits is judged by the map it has (and sent again where that map cannot vouch for it).
const MAP_WAIT: Duration = Duration::from_secs(2);

/// An aggregate acknowledged in a shard other than the one it was built for (see [`Completion::misplaced`]).
#[derive(Debug)]
struct Misplaced {
    entry: Entry,
    landed: String,
    since_ns: u64,
}

struct Batcher {
    shared: Arc<Shared>,
    map: ShardMap,
    shard_ids: Arc<Vec<String>>,
    generation: u64,
    shards: Vec<ShardState>,
    key_cache: KeyCache,
    open: OpenRequest,
    cursor: usize,
    buffered: usize,
    rng: u64,
    scratch: Vec<u8>,
    /// Aggregates [`md5x`] hashes side by side: deferred trailers are computed this many at a time.
    md5_lanes: usize,
    spare_aggregators: Vec<Aggregator>,
    /// Request bodies kept for reuse. Their capacity counts against `max_buffered_bytes` (see
    /// [`has_room`](Self::has_room)) and is at most half of it.
    body_pool: Vec<Vec<u8>>,
    /// The capacity held in `body_pool`.
    pooled: usize,
    /// Buffers of aggregates already copied into a request, reused: freeing ~50 KiB blocks lets the
    /// allocator trim its heap and fault the pages back in for the next aggregate (13% of the batcher).
    data_pool: Vec<Vec<u8>>,
    /// Buffers of raw (unaggregated) records already copied into a request, reused for the next events.
    raw_pool: Vec<Vec<u8>>,
    wake_threshold: usize,
    /// The last spill read failed: retry after a pause instead of spinning.
    spill_failing: bool,
    /// WAL position after the last event read from the ring (ring order is WAL order).
    wal_drained_next: u64,
    /// Lowest WAL position of each sealed request not yet back from the sender.
    wal_requests: FxHashMap<u64, u64>,
    /// What an earlier process left unacknowledged in the WAL, replayed before the ring.
    wal_replay: Option<crate::log::LogReader>,
    wal_replay_end: u64,
    wal_released_ns: u64,
    /// Aggregates waiting for a shard map that knows where they landed.
    misplaced: Vec<Misplaced>,
    /// The hash range of every shard of every map this batcher has had: a parent closed by a reshard is no
    /// longer in the map, and an emulator may still place records in it (moto does).
    known_ranges: FxHashMap<String, (u128, u128)>,
}

impl Batcher {
    fn new(shared: Arc<Shared>, map: ShardMap) -> Self {
        let wake_threshold = shared
            .config
            .max_request_bytes
            .min(ring_capacity_hint(&shared.config));
        let now = clock::coarse_ns();
        let shards = (0..map.len())
            .map(|_| ShardState::new(&shared.config, now))
            .collect();
        let shard_ids = Arc::new(map.shards().iter().map(|s| s.id.clone()).collect());
        let known_ranges = map
            .shards()
            .iter()
            .map(|s| (s.id.clone(), (s.start, s.end)))
            .collect();
        let mut builder = RequestBuilder::new(&shared.config.stream, shared.config.stream_is_arn);
        // Room for a full request's base64 at once: growing by doubling copied every body prefix again
        // (megabytes per batcher start). Only address space until written.
        builder.reserve(shared.config.max_request_bytes / 3 * 4 + (64 << 10));
        let wal_end = shared.wal.as_ref().map_or(NO_WAL, |w| w.recovered_end);
        let wal_replay = shared
            .wal
            .as_ref()
            .and_then(|w| w.replay_reader().ok().flatten());
        if wal_replay.is_some() {
            shared
                .counters
                .wal_replay_pending
                .store(1, Ordering::Release);
        }
        Self {
            shared,
            map,
            shard_ids,
            generation: 0,
            shards,
            key_cache: KeyCache::new(),
            open: OpenRequest {
                builder,
                keys: Vec::new(),
                entries: Vec::new(),
                shards: Vec::new(),
                key_hashes: FxHashSet::default(),
                first_ns: u64::MAX,
                opened_ns: u64::MAX,
                events: 0,
                deferred: Vec::new(),
            },
            cursor: 0,
            buffered: 0,
            rng: 0x9E37_79B9_7F4A_7C15 ^ clock::precise_ns(),
            scratch: Vec::new(),
            md5_lanes: md5x::lanes(),
            spare_aggregators: Vec::new(),
            body_pool: Vec::new(),
            pooled: 0,
            data_pool: Vec::new(),
            raw_pool: Vec::new(),
            wake_threshold,
            spill_failing: false,
            wal_drained_next: wal_end,
            wal_requests: FxHashMap::default(),
            wal_replay,
            wal_replay_end: wal_end,
            wal_released_ns: 0,
            misplaced: Vec::new(),
            known_ranges,
        }
    }

    fn note_ranges(&mut self) {
        for s in self.map.shards() {
            self.known_ranges.insert(s.id.clone(), (s.start, s.end));
        }
    }

    fn config(&self) -> &BatcherConfig {
        &self.shared.config
    }

    fn run(mut self, mut ring: RingConsumer) {
        loop {
            self.shared
                .counters
                .batcher_wakeups
                .fetch_add(1, Ordering::Relaxed);
            let now = clock::coarse_ns();
            self.apply_inbox(now);
            let flushing = self.shared.flushing.load(Ordering::Acquire) > 0 || ring.is_closed();
            let read = if self.wal_replay.is_some() {
                // Replayed events are older than anything in the ring: they go first.
                self.drain_wal_replay();
                false
            } else {
                self.drain_ring(&mut ring)
            };
            self.drain_spill(ring.used_bytes());
            let now = clock::coarse_ns();
            self.judge_overdue_misplaced(now);
            self.close_aggregates(now, flushing);
            self.fill(now, flushing);
            self.publish_gauges();
            if self.shared.stopping.load(Ordering::Acquire) {
                if self.shared.abandon.load(Ordering::Acquire) {
                    self.abandon_all(&mut ring);
                    self.keep_spill();
                    self.release_wal(true);
                    return;
                }
                if self.is_drained(ring.used_bytes()) {
                    self.release_wal(true);
                    return;
                }
            }
            self.release_wal(false);
            let ring_used = ring.used_bytes();
            let wait = self.next_wait(clock::coarse_ns(), ring_used, read);
            if !wait.is_zero() {
                if !self.has_room() {
                    // It could not take events in: a full ring must not wake it, or the park returns at once
                    // and the thread spins. Room comes back with a completion, a poll or a token deadline.
                    ring.set_wake_on_data_off();
                } else if ring_used == 0 && self.holds_nothing() {
                    // Holding nothing, the batcher has no linger deadline of its own: the first event must
                    // wake it, or it would wait out the idle park.
                    ring.set_wake_threshold(1);
                } else {
                    // Holding events, it wakes by their deadline (which comes before that of anything that
                    // arrives after them) or when a request's worth has piled up, not once per event.
                    ring.set_wake_threshold(self.wake_threshold);
                }
                ring.park_until(Instant::now() + wait);
            }
        }
    }

    fn holds_nothing(&self) -> bool {
        self.open.entries.is_empty()
            && self.misplaced.is_empty()
            && self.shards.iter().all(ShardState::is_idle)
    }

    /// Nothing left to deliver: not in the ring, the spill, the WAL replay, the queues or with the sender.
    fn is_drained(&self, ring_used: usize) -> bool {
        ring_used == 0
            && !self.shared.spilling.load(Ordering::Acquire)
            && self.wal_replay.is_none()
            && self.holds_nothing()
            && lock(&self.shared.ready).is_empty()
            && self
                .shared
                .counters
                .outstanding_requests
                .load(Ordering::Acquire)
                == 0
    }

    fn publish_gauges(&self) {
        self.shared
            .counters
            .buffered_bytes
            .store(self.buffered, Ordering::Relaxed);
    }

    /// How long the batcher may sleep: until the earliest moment something it holds may move (an aggregate's
    /// linger, the open request's deadline or rate-limit wait, a shard's tokens, a retry's backoff, a misplaced
    /// aggregate's map wait), or not at all while work it can do is waiting. Completions, polls, new maps,
    /// flushes, stops and (see [`run`](Self::run)) new events wake it earlier. Never a fixed short poll: a
    /// deadline that passes without progress would make the thread spin.
    fn next_wait(&self, now: u64, ring_used: usize, read: bool) -> Duration {
        {
            let inbox = lock(&self.shared.inbox);
            if !inbox.completions.is_empty() || inbox.new_map.is_some() {
                return Duration::ZERO;
            }
        }
        let room = self.has_room();
        if room && read && ring_used >= READ_CHUNK.min(self.wake_threshold) {
            // A read budget ran out with a chunk's worth still waiting: go on reading.
            return Duration::ZERO;
        }
        if room && self.wal_replay.is_some() {
            return Duration::ZERO;
        }
        if room && ring_used == 0 && self.shared.spilling.load(Ordering::Acquire) {
            // Spilled events wait on disk: read them now (a failing read is retried after a millisecond).
            return Duration::from_millis(u64::from(self.spill_failing));
        }
        let cfg = self.config();
        let linger = cfg.linger.as_nanos() as u64;
        let mut deadline = now + IDLE_PARK.as_nanos() as u64;
        for s in &self.shards {
            if let Some(o) = &s.open {
                deadline = deadline.min(o.first_ns.saturating_add(linger));
            }
        }
        if let Some(m) = self.misplaced.first() {
            deadline = deadline.min(m.since_ns + MAP_WAIT.as_nanos() as u64);
        }
        // With the ready queue full nothing can be sealed: the sender's next poll wakes the batcher.
        if lock(&self.shared.ready).len() < cfg.max_ready_requests {
            if let Some(until) = self.rate_hold_until(now) {
                // Tokens arriving one shard at a time do not each need a look: the request waits for company.
                deadline = deadline.min(until).min(self.full_request_at(now));
            } else {
                if !self.open.entries.is_empty() {
                    deadline = deadline.min(self.open.first_ns.saturating_add(linger));
                }
                for i in 0..self.shards.len() {
                    if let Some(at) = self.sendable_at(i, now) {
                        deadline = deadline.min(at);
                    }
                }
            }
        }
        Duration::from_nanos(deadline.saturating_sub(now))
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*: jitter only.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn backoff_ns(&mut self, attempts: u32) -> u64 {
        let cfg = self.config();
        let base = cfg.backoff_base.as_nanos() as u64;
        let max = cfg.backoff_max.as_nanos() as u64;
        let exp = base
            .saturating_mul(1u64 << attempts.saturating_sub(1).min(20))
            .min(max);
        // "Equal jitter": half fixed, half random, so retries never bunch up nor collapse to zero.
        exp / 2 + self.rand() % (exp / 2 + 1)
    }

    // --- inbox: completions and shard-map changes -------------------------------------------------------

    fn apply_inbox(&mut self, now: u64) {
        let Inbox {
            completions,
            new_map,
        } = std::mem::take(&mut *lock(&self.shared.inbox));
        for c in completions {
            self.apply_completion(c, now);
        }
        if let Some(map) = new_map {
            self.remap(map, now);
        }
    }

    fn apply_completion(&mut self, mut c: Completion, now: u64) {
        // Its records are delivered, or about to be queued again below (and held there).
        self.wal_requests.remove(&c.request_id);
        self.buffered = self.buffered.saturating_sub(c.mem);
        if let Some(body) = c.body.take() {
            self.recycle_body(body);
        }
        if c.generation == self.generation {
            for &s in &c.shards {
                let st = &mut self.shards[s as usize];
                st.outstanding = st.outstanding.saturating_sub(1);
            }
            for &s in &c.throttled_shards {
                // Someone else is writing to this shard too: give up the burst allowance.
                let st = &mut self.shards[s as usize];
                st.records.tokens = st.records.tokens.min(0.0);
            }
        }
        let ttl = self.config().record_ttl.as_nanos() as u64;
        let max_attempts = self.config().max_attempts;
        let mut per_shard: Vec<(u32, Entry)> = Vec::new();
        for (shard, mut entry) in c.retries {
            if c.count_attempt {
                entry.attempts += 1;
            }
            let expired = now.saturating_sub(entry.first_ns) >= ttl;
            if entry.attempts >= max_attempts || expired {
                let reason = if expired {
                    "RecordTtlExpired"
                } else {
                    "MaxAttemptsExceeded"
                };
                self.dead_letter(entry, reason);
                continue;
            }
            self.shared
                .counters
                .retried
                .fetch_add(u64::from(entry.events), Ordering::Relaxed);
            entry.not_before_ns = now + self.backoff_ns(entry.attempts.max(1));
            per_shard.push((shard, entry));
        }
        // Preserve the request's order per shard when putting retries back at the front.
        for (shard, entry) in per_shard.into_iter().rev() {
            if c.generation == self.generation {
                self.buffered += entry.mem();
                self.shards[shard as usize].retry.push_front(entry);
            } else {
                self.requeue(entry, true);
            }
        }
        for (shard, entry, landed) in c.misplaced {
            // The sender asks for a new map (`refresh_wanted`); until it comes, nothing more leaves the shard
            // this map sent astray.
            if c.generation == self.generation {
                self.shards[shard as usize].held = true;
            }
            self.buffered += entry.mem();
            self.misplaced.push(Misplaced {
                entry,
                landed,
                since_ns: now,
            });
        }
    }

    /// Misplaced aggregates waited [`MAP_WAIT`] and no new map came: judge them by the map the batcher has.
    fn judge_overdue_misplaced(&mut self, now: u64) {
        if self
            .misplaced
            .first()
            .is_some_and(|m| now >= m.since_ns + MAP_WAIT.as_nanos() as u64)
        {
            self.judge_misplaced(now);
        }
    }

    /// Releases the held shards and settles every misplaced aggregate under the current map: delivered when
    /// the shard it landed in holds all of its records; otherwise each of its records goes again (counted in
    /// `wrong_shard_records`, as an attempt), re-aggregated by the current map, ahead of anything newer. The
    /// copy in the wrong shard stays there: a reader that applies the KCL's rule skips it, others read it twice.
    fn judge_misplaced(&mut self, now: u64) {
        for st in &mut self.shards {
            st.held = false;
        }
        let ttl = self.config().record_ttl.as_nanos() as u64;
        let max_attempts = self.config().max_attempts;
        for m in std::mem::take(&mut self.misplaced) {
            let mut entry = m.entry;
            self.buffered = self.buffered.saturating_sub(entry.mem());
            let range = self.known_ranges.get(&m.landed).copied();
            let holds_all = range.is_some_and(|(low, high)| {
                let cache = &mut self.key_cache;
                let mut all = true;
                let decoded = kpl::decode(entry.bytes(), |sub| {
                    all &= (low..=high).contains(&sub_hash(&sub, cache));
                });
                decoded.is_ok() && all
            });
            let c = &self.shared.counters;
            if holds_all {
                c.delivered
                    .fetch_add(u64::from(entry.events), Ordering::Relaxed);
                continue;
            }
            c.wrong_shard_records
                .fetch_add(u64::from(entry.events), Ordering::Relaxed);
            entry.attempts += 1;
            entry.note_failure(
                "WrongShard".into(),
                format!(
                    "the aggregate landed in {}, whose hash range does not hold all of its records",
                    m.landed
                ),
            );
            if now.saturating_sub(entry.first_ns) >= ttl {
                self.dead_letter(entry, "RecordTtlExpired");
            } else if entry.attempts >= max_attempts {
                self.dead_letter(entry, "MaxAttemptsExceeded");
            } else {
                c.retried
                    .fetch_add(u64::from(entry.events), Ordering::Relaxed);
                entry.not_before_ns = now;
                self.requeue(entry, true);
            }
        }
    }

    fn remap(&mut self, map: ShardMap, now: u64) {
        let same = map.len() == self.map.len()
            && map
                .shards()
                .iter()
                .zip(self.map.shards())
                .all(|(a, b)| a == b);
        if same {
            // What the sender asked for after a misplaced aggregate, unchanged: judge by it.
            self.judge_misplaced(now);
            return;
        }
        // Close every open aggregate and requeue everything under the new map. Aggregates whose range was
        // split are re-aggregated per shard, so a KCL consumer never sees a sub-record outside the shard it
        // reads.
        let old_states = std::mem::take(&mut self.shards);
        self.map = map;
        self.note_ranges();
        self.shard_ids = Arc::new(self.map.shards().iter().map(|s| s.id.clone()).collect());
        self.generation += 1;
        self.shards = (0..self.map.len())
            .map(|_| ShardState::new(&self.shared.config, now))
            .collect();
        // Misplaced aggregates are the oldest records held: they go first.
        self.judge_misplaced(now);
        self.seal_open_request_into_retry();
        for mut st in old_states {
            if let Some(open) = st.open.take() {
                let entry = self.finish_aggregate(open);
                st.fresh.push_front(entry);
            }
            for (is_retry, q) in [(true, st.retry), (false, st.fresh)] {
                for entry in q {
                    self.buffered = self.buffered.saturating_sub(entry.mem());
                    self.requeue(entry, is_retry);
                }
            }
        }
    }

    /// Puts an entry back under the current map. An aggregate that now spans several shards is re-aggregated
    /// per shard: unpacked into single records, it would spend one of each shard's 1,000 records/s per event.
    fn requeue(&mut self, mut entry: Entry, is_retry: bool) {
        entry.digest_now();
        let target = self.map.route(entry.route_hash);
        let spans = entry.events > 1 && kpl::is_aggregated(entry.bytes()) && {
            let (map, cache) = (&self.map, &mut self.key_cache);
            let mut spans = false;
            let _ = kpl::decode(entry.bytes(), |sub| {
                spans |= map.route(sub_hash(&sub, cache)) != target;
            });
            spans
        };
        let parts = if spans {
            self.reaggregate(&entry)
        } else {
            vec![(target, entry)]
        };
        for (shard, part) in parts {
            self.buffered += part.mem();
            let st = &mut self.shards[shard];
            if is_retry {
                st.retry.push_back(part);
            } else {
                st.fresh.push_back(part);
            }
        }
    }

    /// The records of an aggregate, aggregated again per shard of the current map (in their order), each new
    /// entry carrying the old one's attempts, age and last error.
    fn reaggregate(&mut self, entry: &Entry) -> Vec<(usize, Entry)> {
        let Ok(subs) = kpl::decode_vec(entry.bytes()) else {
            // Our own aggregate always decodes; if it ever did not, it goes as it is rather than nowhere.
            debug_assert!(false, "our own aggregate failed to decode");
            return Vec::new();
        };
        let max = self.config().aggregation_max_bytes;
        let mut open: Vec<(usize, OpenAggregate)> = Vec::new();
        let mut done: Vec<(usize, OpenAggregate)> = Vec::new();
        for sub in &subs {
            let hash = sub_hash(sub, &mut self.key_cache);
            let shard = self.map.route(hash);
            let key = sub.partition_key.as_bytes();
            let ehk = sub.explicit_hash_key.map(str::as_bytes);
            if let Some(pos) = open.iter().position(|(s, _)| *s == shard) {
                let agg = &mut open[pos].1;
                let limit = max.saturating_sub(agg.first_key.len());
                if agg.agg.try_add(key, ehk, sub.data, limit) {
                    continue;
                }
                done.push(open.swap_remove(pos));
            }
            let mut agg = self.spare_aggregators.pop().unwrap_or_default();
            agg.add(key, ehk, sub.data);
            open.push((
                shard,
                OpenAggregate {
                    agg,
                    first_key: key.to_vec(),
                    first_hash: hash,
                    first_ehk: ehk.is_some(),
                    first_ns: entry.first_ns,
                    wal: entry.wal,
                },
            ));
        }
        done.extend(open);
        done.into_iter()
            .map(|(shard, agg)| {
                // finish_aggregate gives back what an aggregate being filled counted.
                self.buffered += agg.agg.encoded_len();
                let mut part = self.finish_aggregate(agg);
                part.digest_now();
                part.attempts = entry.attempts;
                part.first_failure_ns = entry.first_failure_ns;
                part.not_before_ns = entry.not_before_ns;
                part.last_error.clone_from(&entry.last_error);
                (shard, part)
            })
            .collect()
    }

    fn seal_open_request_into_retry(&mut self) {
        // The open request is not sealed yet: take its records back and requeue them.
        if self.open.entries.is_empty() {
            return;
        }
        self.encode_deferred();
        let next = self.pooled_body().unwrap_or_default();
        let body = Arc::new(self.open.builder.finish_into_next(next));
        let req = Request {
            id: 0,
            body,
            keys: std::mem::take(&mut self.open.keys),
            entries: std::mem::take(&mut self.open.entries),
            shard_ids: Arc::clone(&self.shard_ids),
            shards: std::mem::take(&mut self.open.shards),
            generation: self.generation,
            events: 0,
            mem: 0,
            sha256: None,
            home: None,
        };
        self.open.key_hashes.clear();
        self.open.first_ns = u64::MAX;
        self.open.opened_ns = u64::MAX;
        self.open.events = 0;
        self.buffered = self
            .buffered
            .saturating_sub(req.body.len() - self.open.builder.prefix_len() + req.keys.len());
        for sent in &req.entries {
            if let Ok(entry) = rebuild(&req, sent) {
                self.requeue(entry, true);
            }
        }
    }

    fn dead_letter(&mut self, mut entry: Entry, reason: &str) {
        entry.digest_now();
        let (code, message) = entry.last_error.clone().unwrap_or_default();
        let message: Arc<str> = format!(
            "{reason} after {} attempt(s); last error {code}: {message}",
            entry.attempts
        )
        .into();
        let reason: Arc<str> = reason.into();
        let mut out = Vec::with_capacity(entry.events as usize);
        let mut push = |data: &[u8], key: &str, ehk: Option<&str>| {
            out.push(DeadRecord {
                data: data.to_vec(),
                partition_key: key.to_owned(),
                explicit_hash_key: ehk.map(str::to_owned),
                attempts: entry.attempts,
                error_code: Arc::clone(&reason),
                error_message: Arc::clone(&message),
                enqueued_ns: entry.first_ns,
                first_failure_ns: entry.first_failure_ns,
                wal: entry.wal,
            });
        };
        let unpacked = entry.events > 1
            && kpl::decode(entry.bytes(), |sub| {
                push(sub.data, sub.partition_key, sub.explicit_hash_key);
            })
            .is_ok();
        if !unpacked {
            let key = String::from_utf8_lossy(&entry.key).into_owned();
            let mut buf = [0u8; 40];
            let ehk = entry
                .send_ehk
                .then(|| shards::format_hash_key(entry.route_hash, &mut buf).to_owned());
            push(entry.bytes(), &key, ehk.as_deref());
        }
        let bytes: u64 = out.iter().map(DeadRecord::mem).sum();
        self.shared
            .dead_pending
            .fetch_add(out.len() as u64, Ordering::AcqRel);
        let mut dead = lock(&self.shared.dead);
        self.shared.dead_bytes.fetch_add(bytes, Ordering::AcqRel);
        dead.extend(out);
        drop(dead);
        // The sender takes them on its next wake-up, instead of polling the dead list.
        self.shared.waker.wake();
    }

    /// Dead-letters everything undelivered with reason `ProducerClosed`, oldest first: what came back from the
    /// sender to be retried, the requests sealed for it, the open request, then per shard its fresh entries and
    /// open aggregate, then the ring a chunk at a time, each chunk only once the dead list is back under its
    /// bound.
    fn abandon_all(&mut self, ring: &mut RingConsumer) {
        self.apply_inbox(clock::coarse_ns());
        self.abandon_retries();
        let ready: Vec<Request> = lock(&self.shared.ready).drain(..).collect();
        for mut req in ready {
            req.home = None;
            self.shared
                .counters
                .outstanding_requests
                .fetch_sub(1, Ordering::AcqRel);
            for sent in &req.entries {
                if let Ok(entry) = rebuild(&req, sent) {
                    self.dead_letter(entry, "ProducerClosed");
                }
            }
        }
        self.seal_open_request_into_retry();
        self.abandon_held();
        while ring.used_bytes() > 0 {
            self.wait_for_dead_room();
            ring.read_grouped(READ_CHUNK, |payloads| self.on_events(payloads));
            self.abandon_held();
        }
        // Everything is in the dead list now, which holds the WAL back until the DLQ has it.
        self.wal_requests.clear();
        self.publish_gauges();
    }

    /// Dead-letters every shard's retry queue.
    fn abandon_retries(&mut self) {
        for m in std::mem::take(&mut self.misplaced) {
            // In the stream, but in a shard a KCL consumer skips it in: kept, as anything undelivered.
            self.dead_letter(m.entry, "ProducerClosed");
        }
        for shard in 0..self.shards.len() {
            let retry = std::mem::take(&mut self.shards[shard].retry);
            for entry in retry {
                self.dead_letter(entry, "ProducerClosed");
            }
        }
    }

    /// Dead-letters what every shard holds, oldest first: retries, fresh entries, the open aggregate.
    fn abandon_held(&mut self) {
        self.abandon_retries();
        for shard in 0..self.shards.len() {
            let fresh = std::mem::take(&mut self.shards[shard].fresh);
            let open = self.shards[shard].open.take();
            for entry in fresh {
                self.dead_letter(entry, "ProducerClosed");
            }
            if let Some(open) = open {
                let entry = self.finish_aggregate(open);
                self.dead_letter(entry, "ProducerClosed");
            }
        }
        self.buffered = 0;
    }

    /// Waits (in 1 ms naps: this is the end of the batcher's life) until the dead list is under its bound.
    fn wait_for_dead_room(&self) {
        let shared = &self.shared;
        while shared.dead_bytes.load(Ordering::Acquire) > shared.dead_bound.load(Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    // --- WAL: replay and release ---------------------------------------------------------------------------

    /// Replays what an earlier process left unacknowledged, within the memory budget, oldest first.
    fn drain_wal_replay(&mut self) {
        let shared = Arc::clone(&self.shared);
        let end = self.wal_replay_end;
        let now = clock::coarse_ns();
        let mut replayed = 0u64;
        let mut budget = 4096;
        let mut corrupt = 0u64;
        while self.has_room() && budget > 0 {
            budget -= 1;
            let Some(reader) = self.wal_replay.as_mut() else {
                break;
            };
            match wal::next_recovered(reader, end, &mut corrupt) {
                Ok(Some((position, mut payload))) => {
                    if self.ingest_from_disk(&mut payload, Some(now), position) {
                        replayed += 1;
                    } else {
                        corrupt += 1;
                    }
                }
                Ok(None) => {
                    self.wal_replay = None;
                    shared
                        .counters
                        .wal_replay_pending
                        .store(0, Ordering::Release);
                }
                Err(_) => {
                    // Retried on the next round; the reader's position holds the watermark meanwhile.
                    shared.counters.wal_errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        let c = &shared.counters;
        c.wal_errors.fetch_add(corrupt, Ordering::Relaxed);
        count_recovered(c, &c.wal_recovered, replayed);
        self.seal_after_read(now);
    }

    /// Feeds one event read back from disk (spill or WAL replay) to the aggregates; false when the bytes do not
    /// hold a whole event. `restamp`: written by another process, so its age starts at this time.
    fn ingest_from_disk(&mut self, payload: &mut [u8], restamp: Option<u64>, wal: u64) -> bool {
        if !event_is_well_formed(payload) {
            return false;
        }
        if let Some(now) = restamp {
            payload[..8].copy_from_slice(&now.to_le_bytes());
        }
        let mut ev = read_event(payload);
        ev.wal = wal;
        self.ingest(&ev);
        true
    }

    /// After a read into the aggregates: closes those due and fills requests (as after each ring chunk).
    fn seal_after_read(&mut self, now: u64) {
        let flushing = self.shared.flushing.load(Ordering::Acquire) > 0;
        self.close_aggregates(now, flushing);
        self.fill(now, flushing);
    }

    /// The lowest WAL position anything still holds: nothing below it needs replaying after a crash.
    fn wal_watermark(&self) -> u64 {
        let mut low = self.wal_drained_next;
        if let Some(reader) = &self.wal_replay {
            low = low.min(reader.position());
        }
        for &w in self.wal_requests.values() {
            low = low.min(w);
        }
        for st in &self.shards {
            if let Some(open) = &st.open {
                low = low.min(open.wal);
            }
            for e in st.retry.iter().chain(&st.fresh) {
                low = low.min(e.wal);
            }
        }
        for e in &self.open.entries {
            low = low.min(e.wal);
        }
        for m in &self.misplaced {
            low = low.min(m.entry.wal);
        }
        for d in lock(&self.shared.dead).iter() {
            low = low.min(d.wal);
        }
        for &w in lock(&self.shared.dead_handed).iter() {
            low = low.min(w);
        }
        low
    }

    /// Moves the WAL's cursor to the watermark (every 100 ms at most, unless `force`).
    fn release_wal(&mut self, force: bool) {
        let Some(w) = self.shared.wal.as_ref() else {
            return;
        };
        let now = clock::coarse_ns();
        if !force && now.saturating_sub(self.wal_released_ns) < 100_000_000 {
            return;
        }
        self.wal_released_ns = now;
        let low = self.wal_watermark();
        if low == NO_WAL {
            return;
        }
        let every = if force {
            Duration::ZERO
        } else {
            Duration::from_millis(200)
        };
        if w.release(low, every, force).is_err() {
            self.shared
                .counters
                .wal_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    // --- spill -> shard aggregates -----------------------------------------------------------------------

    /// Replays spilled events once the ring is empty (they are newer than anything in it), within the memory
    /// budget; clears the spilling flag when it has read the last one.
    fn drain_spill(&mut self, ring_used: usize) {
        let shared = Arc::clone(&self.shared);
        let Some(spill) = shared.spill.as_ref() else {
            return;
        };
        if ring_used > 0 || !shared.spilling.load(Ordering::Acquire) {
            return;
        }
        let c = &shared.counters;
        let mut batch = Vec::new();
        let mut budget = 16;
        while self.has_room() && budget > 0 {
            budget -= 1;
            let done = {
                let mut sp = lock(spill);
                let Ok(done) = sp.read(READ_CHUNK, &mut batch) else {
                    c.spill_errors.fetch_add(1, Ordering::Relaxed);
                    self.spill_failing = true;
                    break;
                };
                self.spill_failing = false;
                if done {
                    shared.spilling.store(false, Ordering::Release);
                }
                // Best effort: a cursor not written means replaying more after a crash, never less.
                let _ = sp.release(done);
                c.spill_backlog_bytes
                    .store(sp.backlog_bytes(), Ordering::Relaxed);
                done
            };
            let now = clock::coarse_ns();
            let mut recovered = 0u64;
            for mut ev in batch.drain(..) {
                let restamp = ev.recovered.then_some(now);
                if !self.ingest_from_disk(&mut ev.payload, restamp, NO_WAL) {
                    c.spill_errors.fetch_add(1, Ordering::Relaxed);
                } else if ev.recovered {
                    recovered += 1;
                }
            }
            count_recovered(c, &c.spill_recovered, recovered);
            self.seal_after_read(now);
            if done {
                break;
            }
        }
    }

    /// At an abandoning stop, what is still in the spill stays on disk for the next producer on its directory.
    fn keep_spill(&mut self) {
        if let Some(spill) = self.shared.spill.as_ref() {
            let _ = lock(spill).release(true);
        }
    }

    // --- ring -> shard aggregates ------------------------------------------------------------------------

    /// Reads up to 16 chunks of the ring, as the memory budget allows; whether it read anything.
    fn drain_ring(&mut self, ring: &mut RingConsumer) -> bool {
        let mut budget = 16;
        let mut read = false;
        while self.has_room() && ring.used_bytes() > 0 && budget > 0 {
            // No more than the room left: the budget is not overshot by a whole chunk.
            let max_bytes = READ_CHUNK.min(self.room());
            if ring.read_grouped(max_bytes, |payloads| self.on_events(payloads)) == 0 {
                // The next record is still being written.
                break;
            }
            read = true;
            budget -= 1;
            self.seal_after_read(clock::coarse_ns());
        }
        read
    }

    #[inline]
    fn hash_for(&mut self, key: &[u8], slot_hash: u64) -> u128 {
        if self.key_cache.len() >= KEY_CACHE_MAX {
            self.key_cache.clear();
        }
        self.key_cache.get_or_insert(key, slot_hash)
    }

    /// A group of ring payloads: the key-cache slots of all are fetched first, so their misses overlap
    /// instead of each event waiting on memory in turn.
    fn on_events(&mut self, payloads: &[&[u8]]) {
        let mut hashes = [0u64; ring::READ_GROUP];
        for (p, h) in payloads.iter().zip(hashes.iter_mut()) {
            if p[10] & FLAG_EHK == 0 {
                *h = KeyCache::slot_hash(event_key(p));
                self.key_cache.prefetch(*h);
            }
        }
        for (i, p) in payloads.iter().enumerate() {
            let slot_hash = hashes.get(i).copied();
            self.on_event_hashed(p, slot_hash);
        }
    }

    #[inline]
    fn on_event_hashed(&mut self, payload: &[u8], slot_hash: Option<u64>) {
        let ev = read_event(payload);
        if ev.wal != NO_WAL {
            // Ring order is WAL order: everything below this event has been read from the ring.
            self.wal_drained_next = ev.wal + 1;
        }
        self.ingest_hashed(&ev, slot_hash);
    }

    fn ingest(&mut self, ev: &EventView<'_>) {
        self.ingest_hashed(ev, None);
    }

    #[inline]
    fn ingest_hashed(&mut self, ev: &EventView<'_>, slot_hash: Option<u64>) {
        let route_hash = if let Some(h) = ev.ehk {
            h
        } else {
            let h = slot_hash.unwrap_or_else(|| KeyCache::slot_hash(ev.key));
            self.hash_for(ev.key, h)
        };
        let shard = self.map.route(route_hash);
        let cfg = &self.shared.config;
        let mut ehk_buf = [0u8; 40];
        let ehk_text = ev.ehk.map(|h| shards::format_hash_key(h, &mut ehk_buf));
        let ehk_bytes = ehk_text.map(str::as_bytes);
        let alone =
            kpl::OVERHEAD + ev.data.len() + ev.key.len() + ehk_bytes.map_or(0, <[u8]>::len) + 32;
        if cfg.aggregate && alone + ev.key.len() <= cfg.aggregation_max_bytes {
            let max = cfg.aggregation_max_bytes;
            // The outer record's partition key counts against the record limit too.
            if let Some(open) = self.shards[shard].open.as_mut() {
                let before = open.agg.encoded_len();
                let limit = max - open.first_key.len();
                if open.agg.try_add(ev.key, ehk_bytes, ev.data, limit) {
                    open.wal = open.wal.min(ev.wal);
                    self.buffered += open.agg.encoded_len() - before;
                    return;
                }
                let open = self.shards[shard]
                    .open
                    .take()
                    .unwrap_or_else(|| unreachable!());
                let entry = self.finish_aggregate(open);
                self.buffered += entry.mem();
                self.shards[shard].fresh.push_back(entry);
            }
            // Reuse a cleared aggregator: a new one per aggregate re-grows its key tables every time.
            let mut agg = self.spare_aggregators.pop().unwrap_or_default();
            agg.add(ev.key, ehk_bytes, ev.data);
            self.buffered += agg.encoded_len();
            self.shards[shard].open = Some(OpenAggregate {
                agg,
                first_key: ev.key.to_vec(),
                first_hash: route_hash,
                first_ehk: ev.ehk.is_some(),
                first_ns: ev.enqueued_ns,
                wal: ev.wal,
            });
            return;
        }
        if let Some(open) = self.shards[shard].open.take() {
            // The open aggregate holds earlier events, maybe of this key: it goes first.
            let entry = self.finish_aggregate(open);
            self.buffered += entry.mem();
            self.shards[shard].fresh.push_back(entry);
        }
        // A recycled buffer: one allocation and free less per raw event.
        let mut data = self.raw_pool.pop().unwrap_or_default();
        data.extend_from_slice(ev.data);
        let entry = Entry {
            data,
            start: 0,
            key: ev.key.into(),
            route_hash,
            send_ehk: ev.ehk.is_some(),
            events: 1,
            attempts: 0,
            first_ns: ev.enqueued_ns,
            first_failure_ns: 0,
            wal: ev.wal,
            not_before_ns: 0,
            last_error: None,
            digest_pending: false,
        };
        self.buffered += entry.mem();
        self.shards[shard].fresh.push_back(entry);
    }

    /// Turns an open aggregate into one entry; a lone event is sent as a plain record, as the KPL does.
    /// The aggregate's MD5 trailer is left for [`seal_digests`](Self::seal_digests).
    fn finish_aggregate(&mut self, mut open: OpenAggregate) -> Entry {
        let events = open.agg.len() as u32;
        let before = open.agg.encoded_len();
        self.buffered = self.buffered.saturating_sub(before);
        if events == 1 {
            self.scratch.clear();
            open.agg.finish_into(&mut self.scratch);
            self.recycle(open.agg);
            let mut data = Vec::new();
            let _ = kpl::decode(&self.scratch, |sub| data = sub.data.to_vec());
            return Entry {
                data,
                start: 0,
                key: open.first_key.into_boxed_slice(),
                route_hash: open.first_hash,
                send_ehk: open.first_ehk,
                events: 1,
                attempts: 0,
                first_ns: open.first_ns,
                first_failure_ns: 0,
                wal: open.wal,
                not_before_ns: 0,
                last_error: None,
                digest_pending: false,
            };
        }
        // The aggregator's own buffer when its tables fit the room it kept: no copy of the records.
        // Sized for a whole aggregate: a buffer grown by doubling would copy it over again and again.
        let next = self
            .data_pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.shared.config.aggregation_max_bytes + 4096));
        let (data, start) = match open.agg.take_undigested(next) {
            Ok(taken) => taken,
            Err(mut data) => {
                data.clear();
                data.reserve(before);
                open.agg.finish_undigested_into(&mut data);
                (data, 0)
            }
        };
        self.recycle(open.agg);
        Entry {
            data,
            start,
            key: open.first_key.into_boxed_slice(),
            route_hash: open.first_hash,
            // The outer record is routed by the hash of its first event, so it lands in this shard.
            send_ehk: true,
            events,
            attempts: 0,
            first_ns: open.first_ns,
            first_failure_ns: 0,
            wal: open.wal,
            not_before_ns: 0,
            last_error: None,
            digest_pending: true,
        }
    }

    /// Keeps an aggregate's emptied buffer for the next aggregate: a deferred-trailer group's worth plus two
    /// per shard.
    fn recycle_data(&mut self, mut data: Vec<u8>) {
        if self.data_pool.len() < 2 * self.shards.len() + self.md5_lanes {
            data.clear();
            self.data_pool.push(data);
        }
    }

    fn recycle_body(&mut self, body: Vec<u8>) {
        // Keep a few: enough for the requests in flight, and at most half the buffer budget, which they
        // count against: a kept body's pages stay resident.
        let cap = body.capacity();
        if self.body_pool.len() < 4 && self.pooled + cap <= self.config().max_buffered_bytes / 2 {
            self.pooled += cap;
            self.body_pool.push(body);
        }
    }

    fn pooled_body(&mut self) -> Option<Vec<u8>> {
        let body = self.body_pool.pop()?;
        self.pooled -= body.capacity();
        Some(body)
    }

    /// What the batcher may still take in: `max_buffered_bytes` less what it holds outside the ring
    /// (aggregates, queues, request bodies, kept bodies).
    fn room(&self) -> usize {
        self.config()
            .max_buffered_bytes
            .saturating_sub(self.buffered + self.pooled)
    }

    fn has_room(&self) -> bool {
        self.room() > 0
    }

    fn recycle(&mut self, agg: Aggregator) {
        if self.spare_aggregators.len() < self.shards.len().max(4) {
            self.spare_aggregators.push(agg);
        }
    }

    /// Computes the MD5 trailers of the deferred aggregates of the open request, many at a time in SIMD
    /// lanes (16 with AVX2 or AVX-512, see [`md5x`]): MD5 is serial per message and was 40% of the batcher's time.
    /// Then rewrites the base64 of their trailers in the body and recycles their buffers.
    fn encode_deferred(&mut self) {
        if self.open.deferred.is_empty() {
            return;
        }
        let mut deferred = std::mem::take(&mut self.open.deferred);
        let digests = {
            let inputs: Vec<&[u8]> = deferred
                .iter()
                .map(|(data, start, _)| kpl::digest_input(&data[*start..]))
                .collect();
            md5x::md5_many(&inputs)
        };
        for ((mut data, start, span), digest) in deferred.drain(..).zip(digests) {
            let blob = &mut data[start..];
            kpl::set_digest(blob, digest);
            let trailer = blob.len() - digest.len();
            self.open.builder.rewrite_tail(span, blob, trailer);
            self.buffered = self.buffered.saturating_sub(data.capacity());
            self.recycle_data(data);
        }
        self.open.deferred = deferred;
    }

    fn close_aggregates(&mut self, now: u64, flushing: bool) {
        let linger = self.config().linger.as_nanos() as u64;
        for i in 0..self.shards.len() {
            let due = match &self.shards[i].open {
                Some(o) => flushing || now >= o.first_ns.saturating_add(linger),
                None => false,
            };
            if due {
                let open = self.shards[i].open.take().unwrap_or_else(|| unreachable!());
                let entry = self.finish_aggregate(open);
                self.buffered += entry.mem();
                self.shards[i].fresh.push_back(entry);
            }
        }
    }

    // --- shard queues -> requests ------------------------------------------------------------------------

    fn fill(&mut self, now: u64, flushing: bool) {
        let n = self.shards.len();
        for st in &mut self.shards {
            st.records.refill(now);
            st.bytes.refill(now);
        }
        loop {
            let mut progressed = false;
            for k in 0..n {
                let i = (self.cursor + k) % n;
                while let Some(from_retry) = self.candidate(i, now) {
                    if !self.take_into_request(i, from_retry, now) {
                        break;
                    }
                    progressed = true;
                    if self.open.entries.len() >= self.config().max_request_records && !self.seal()
                    {
                        return;
                    }
                }
            }
            self.cursor = (self.cursor + 1) % n.max(1);
            let linger = self.config().linger.as_nanos() as u64;
            let due = (flushing || now >= self.open.first_ns.saturating_add(linger))
                && self.rate_hold_until(now).is_none();
            if !self.open.entries.is_empty()
                && (due || !progressed && self.request_is_full_enough())
            {
                if !self.seal() {
                    return;
                }
                continue;
            }
            if !progressed {
                return;
            }
        }
    }

    fn request_is_full_enough(&self) -> bool {
        let cfg = self.config();
        self.open.entries.len() >= cfg.max_request_records
            || self.open.builder.payload_bytes() + cfg.max_record_bytes.min(256 * 1024)
                > cfg.max_request_bytes
    }

    /// The record shard `i` would send next (`true`: from its retry queue) and from when (a retry's backoff),
    /// whatever its tokens; `None` while the shard has nothing to send or waits for something that wakes the
    /// batcher by itself: its request in flight when ordered, the open request, a new shard map.
    fn next_record(&self, i: usize, now: u64) -> Option<(bool, &Entry, u64)> {
        let st = &self.shards[i];
        let cfg = self.config();
        if st.held || cfg.ordered && (st.outstanding > 0 || (cfg.aggregate && st.in_open > 0)) {
            return None;
        }
        let (from_retry, entry, at) = match (st.retry.front(), st.fresh.front()) {
            (Some(e), _) if e.not_before_ns <= now => (true, e, now),
            // Ordered, a retry goes before anything newer; unordered, fresh records go meanwhile.
            (Some(e), _) if cfg.ordered => (true, e, e.not_before_ns),
            (Some(e), None) => (true, e, e.not_before_ns),
            (_, Some(f)) => (false, f, now),
            (None, None) => return None,
        };
        if cfg.ordered && !cfg.aggregate && self.open.key_hashes.contains(&entry.route_hash) {
            return None;
        }
        Some((from_retry, entry, at))
    }

    /// Whether shard `i`'s buckets allow `entry` now.
    fn affordable(&self, i: usize, entry: &Entry) -> bool {
        let st = &self.shards[i];
        st.records.can_take(1.0) && st.bytes.can_take(entry.cost() as f64)
    }

    /// Which queue of shard `i` may give the next record now: `Some(true)` retry, `Some(false)` fresh.
    fn candidate(&self, i: usize, now: u64) -> Option<bool> {
        let (from_retry, entry, at) = self.next_record(i, now)?;
        (at <= now && self.affordable(i, entry)).then_some(from_retry)
    }

    /// The record shard `i` would send now if its token buckets let it: `Some` only while they hold it back.
    fn token_bound(&self, i: usize, now: u64) -> Option<&Entry> {
        self.next_record(i, now)
            .filter(|&(_, entry, at)| at <= now && !self.affordable(i, entry))
            .map(|(_, entry, _)| entry)
    }

    /// When shard `i` may next give a record (its backoff passed and its tokens refilled).
    fn sendable_at(&self, i: usize, now: u64) -> Option<u64> {
        let (from_retry, entry, at) = self.next_record(i, now)?;
        let st = &self.shards[i];
        let tokens = st
            .records
            .wait_ns(1.0)
            .max(st.bytes.wait_ns(entry.cost() as f64));
        let mut when = at.max(now + tokens);
        if !from_retry {
            // Unordered fresh records go ahead of a retry still backing off, which may still come first.
            if let Some(r) = st.retry.front() {
                when = when.min(r.not_before_ns.max(now));
            }
        }
        Some(when)
    }

    /// Under rate limiting the open request waits for company until `rate_limit_linger` after it was opened,
    /// while some shard has records that only its tokens hold back: sealing it at once would send a trickle of
    /// small requests that the next tokens could have joined (the KPL's `RecordMaxBufferedTime` trade-off).
    fn rate_hold_until(&self, now: u64) -> Option<u64> {
        if self.open.entries.is_empty() || self.request_is_full_enough() {
            return None;
        }
        let until = self
            .open
            .opened_ns
            .saturating_add(self.config().rate_limit_linger.as_nanos() as u64);
        (now < until && (0..self.shards.len()).any(|i| self.token_bound(i, now).is_some()))
            .then_some(until)
    }

    /// When the buckets of the token-bound shards will together have refilled enough to fill the open request:
    /// an estimate that takes each shard's next record as the size of those to come and ignores how many it
    /// holds (waking early costs one look, no more), and never before one of them can give a record.
    fn full_request_at(&self, now: u64) -> u64 {
        let (mut bytes, mut bytes_rate, mut records, mut records_rate) = (0.0, 0.0, 0.0, 0.0);
        let mut first = u64::MAX;
        for i in 0..self.shards.len() {
            let Some(entry) = self.token_bound(i, now) else {
                continue;
            };
            let st = &self.shards[i];
            let cost = (entry.cost() as f64).max(1.0);
            // What the shard can give now and per second, in bytes, whichever bucket binds.
            let have = st.bytes.tokens.min(st.records.tokens * cost).max(0.0);
            let rate = st.bytes.rate.min(st.records.rate * cost);
            bytes += have;
            bytes_rate += rate;
            records += have / cost;
            records_rate += rate / cost;
            first = first.min(self.sendable_at(i, now).unwrap_or(u64::MAX));
        }
        if bytes_rate <= 0.0 {
            return u64::MAX;
        }
        let cfg = self.config();
        let free_bytes = cfg
            .max_request_bytes
            .saturating_sub(self.open.builder.payload_bytes()) as f64;
        let free_records = cfg
            .max_request_records
            .saturating_sub(self.open.entries.len()) as f64;
        let secs = ((free_bytes - bytes) / bytes_rate)
            .min((free_records - records) / records_rate)
            .max(0.0);
        now.saturating_add((secs * 1e9) as u64).max(first)
    }

    fn take_into_request(&mut self, i: usize, from_retry: bool, now: u64) -> bool {
        let (max_records, max_bytes) = (
            self.config().max_request_records,
            self.config().max_request_bytes,
        );
        let cost = {
            let st = &self.shards[i];
            let q = if from_retry { &st.retry } else { &st.fresh };
            q.front().map_or(0, Entry::cost)
        };
        if !self.open.builder.fits(cost, max_records, max_bytes) {
            if self.open.entries.is_empty() {
                unreachable!("a record of {cost} bytes cannot fit an empty request");
            }
            if !self.seal() {
                return false;
            }
            if self.config().ordered && self.shards[i].outstanding > 0 {
                return false;
            }
        }
        let st = &mut self.shards[i];
        let entry = if from_retry {
            st.retry.pop_front()
        } else {
            st.fresh.pop_front()
        };
        let Some(entry) = entry else { return false };
        if self.open.entries.is_empty() {
            self.open.opened_ns = now;
        }
        let st = &mut self.shards[i];
        st.records.take(1.0);
        st.bytes.take(cost as f64);
        st.in_open += 1;
        self.buffered = self.buffered.saturating_sub(entry.mem());
        let mut ehk_buf = [0u8; 40];
        let ehk = entry
            .send_ehk
            .then(|| shards::format_hash_key(entry.route_hash, &mut ehk_buf));
        let before = self.open.builder.body_len();
        // An aggregate still waiting for its MD5 trailer goes in with a zero one, rewritten later.
        let span = self.open.builder.push(entry.bytes(), &entry.key, ehk);
        let key_off = self.open.keys.len() as u32;
        self.open.keys.extend_from_slice(&entry.key);
        self.buffered += self.open.builder.body_len() - before + entry.key.len();
        self.open.entries.push(SentEntry {
            span,
            data_len: entry.bytes().len() as u32,
            key_off,
            key_len: entry.key.len() as u16,
            send_ehk: entry.send_ehk,
            shard: i as u32,
            route_hash: entry.route_hash,
            events: entry.events,
            attempts: entry.attempts,
            first_ns: entry.first_ns,
            first_failure_ns: entry.first_failure_ns,
            wal: entry.wal,
        });
        if !self.open.shards.contains(&(i as u32)) {
            self.open.shards.push(i as u32);
        }
        if self.config().ordered && !self.config().aggregate {
            self.open.key_hashes.insert(entry.route_hash);
        }
        self.open.first_ns = self.open.first_ns.min(entry.first_ns);
        self.open.events += u64::from(entry.events);
        if entry.digest_pending {
            // Held (and counted) until its trailer is known and its base64 written.
            self.buffered += entry.data.capacity();
            self.open.deferred.push((entry.data, entry.start, span));
            if self.open.deferred.len() >= self.md5_lanes {
                self.encode_deferred();
            }
        } else if entry.events > 1 {
            self.recycle_data(entry.data);
        } else if self.raw_pool.len() < RAW_POOL_MAX && entry.data.capacity() <= RAW_POOL_CAPACITY {
            let mut data = entry.data;
            data.clear();
            self.raw_pool.push(data);
        }
        true
    }

    /// Seals the open request into the ready queue; `false` when the queue is full (try again later).
    fn seal(&mut self) -> bool {
        if self.open.entries.is_empty() {
            return true;
        }
        self.encode_deferred();
        let shared = Arc::clone(&self.shared);
        // Only this thread adds to `ready`, so room seen here is still there after the hashing below, which
        // runs without the lock (about a millisecond for a 600 KB body) so the sender never waits on it.
        if lock(&shared.ready).len() >= shared.config.max_ready_requests {
            return false;
        }
        // A recycled body: a fresh multi-megabyte buffer costs a page fault per 4 KiB written.
        let next = self
            .pooled_body()
            .unwrap_or_else(|| Vec::with_capacity(self.open.builder.capacity()));
        let body = self.open.builder.finish_into_next(next);
        let sha256 = Some(Sha256::digest(&body).into());
        let keys = std::mem::take(&mut self.open.keys);
        let entries = std::mem::take(&mut self.open.entries);
        let shards = std::mem::take(&mut self.open.shards);
        for &s in &shards {
            let st = &mut self.shards[s as usize];
            st.outstanding += 1;
            st.in_open = 0;
        }
        // What take_into_request added to `buffered` for this request; released on completion.
        let mem = body.len() - self.open.builder.prefix_len() + keys.len();
        let c = &self.shared.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.records_sent
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        c.outstanding_requests.fetch_add(1, Ordering::AcqRel);
        let id = self.shared.next_request_id.fetch_add(1, Ordering::Relaxed);
        if self.shared.wal.is_some() {
            let low = entries.iter().map(|e| e.wal).min().unwrap_or(NO_WAL);
            self.wal_requests.insert(id, low);
        }
        let request = Request {
            id,
            body: Arc::new(body),
            keys,
            entries,
            shard_ids: Arc::clone(&self.shard_ids),
            shards,
            generation: self.generation,
            events: self.open.events,
            mem,
            sha256,
            home: Some(Arc::clone(&self.shared)),
        };
        self.open.key_hashes.clear();
        self.open.first_ns = u64::MAX;
        self.open.opened_ns = u64::MAX;
        self.open.events = 0;
        let mut ready = lock(&shared.ready);
        ready.push_back(request);
        c.ready_requests.store(ready.len(), Ordering::Relaxed);
        drop(ready);
        self.shared.waker.wake();
        true
    }
}

fn sub_hash(sub: &kpl::SubRecord<'_>, cache: &mut KeyCache) -> u128 {
    if let Some(h) = sub
        .explicit_hash_key
        .and_then(|t| shards::parse_hash_key(t).ok())
    {
        return h;
    }
    let key = sub.partition_key.as_bytes();
    if cache.len() >= KEY_CACHE_MAX {
        cache.clear();
    }
    cache.get_or_insert(key, KeyCache::slot_hash(key))
}

/// The body of a request handled offline (no sender): it needs no outcome.
fn take_body(mut r: Request) -> Vec<u8> {
    r.home = None;
    let body = std::mem::take(&mut r.body);
    Arc::try_unwrap(body).unwrap_or_else(|b| (*b).clone())
}

fn ring_capacity_hint(config: &BatcherConfig) -> usize {
    (config.ring_bytes.next_power_of_two() / 4).max(4096)
}

/// Runs the batcher's routing, aggregation and request sealing over `events` on the calling thread, without
/// the ring, rate limits or a sender, and returns the sealed request bodies. For benchmarks and tests that
/// compare the batcher with other aggregators on the same events.
pub fn seal_offline<'a>(
    config: BatcherConfig,
    map: ShardMap,
    events: impl IntoIterator<Item = (&'a [u8], &'a str, Option<u128>)>,
) -> Result<Vec<Vec<u8>>, CoreError> {
    let mut out = Vec::new();
    seal_offline_with(config, map, events, |body| out.push(body.to_vec()))?;
    Ok(out)
}

/// [`seal_offline`], lending each body to `sink` as soon as it is sealed; the buffer is then reused.
pub fn seal_offline_with<'a>(
    config: BatcherConfig,
    map: ShardMap,
    events: impl IntoIterator<Item = (&'a [u8], &'a str, Option<u128>)>,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), CoreError> {
    let mut offline = Offline::new(config, map, clock::coarse_ns())?;
    // Events are laid out as in the ring, a group at a time, and handed over as the ring's reader does.
    let mut stage = StagedEvents::at(offline.now);
    for (data, key, ehk) in events {
        stage.push(data, key, ehk)?;
        if stage.len() == ring::READ_GROUP {
            stage.for_each_group(|group| offline.ingest(group, &mut sink));
            stage.clear();
        }
    }
    stage.for_each_group(|group| offline.ingest(group, &mut sink));
    offline.finish(&mut sink);
    Ok(())
}

/// Events laid out exactly as the ring holds them (header, key, payload), as `submit` writes them.
///
/// [`seal_staged`] runs the batcher over them, so that a benchmark of the batcher times the batcher thread's
/// work alone: in the producer, validating and laying out each event is the submitting thread's work.
#[derive(Debug)]
pub struct StagedEvents {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    /// The submit time written into every event.
    at: u64,
}

impl StagedEvents {
    /// Lays out `events`, validating each partition key as `submit` does.
    pub fn new<'a>(
        events: impl IntoIterator<Item = (&'a [u8], &'a str, Option<u128>)>,
    ) -> Result<Self, CoreError> {
        let mut staged = Self::at(clock::coarse_ns());
        for (data, key, ehk) in events {
            staged.push(data, key, ehk)?;
        }
        Ok(staged)
    }

    fn at(at: u64) -> Self {
        Self {
            bytes: Vec::new(),
            ends: Vec::new(),
            at,
        }
    }

    fn push(&mut self, data: &[u8], key: &str, ehk: Option<u128>) -> Result<(), CoreError> {
        check_partition_key(key)?;
        let at = self.bytes.len();
        self.bytes
            .resize(at + event_len(key.len(), ehk.is_some(), data.len()), 0);
        write_event(
            &mut self.bytes[at..],
            self.at,
            key.as_bytes(),
            ehk,
            None,
            data,
        );
        self.ends.push(self.bytes.len());
        Ok(())
    }

    /// How many events are staged.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no event is staged.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Hands the events to `f` in groups of up to [`ring::READ_GROUP`], as the ring's reader does.
    fn for_each_group(&self, mut f: impl FnMut(&[&[u8]])) {
        let mut group: [&[u8]; ring::READ_GROUP] = [&[]; ring::READ_GROUP];
        let mut start = 0;
        for ends in self.ends.chunks(ring::READ_GROUP) {
            for (g, &end) in group.iter_mut().zip(ends) {
                *g = &self.bytes[start..end];
                start = end;
            }
            f(&group[..ends.len()]);
        }
    }
}

/// [`seal_offline_with`] over events already laid out as in the ring: the batcher thread's work alone.
pub fn seal_staged(
    config: BatcherConfig,
    map: ShardMap,
    staged: &StagedEvents,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), CoreError> {
    // The batcher's clock stands at the events' submit time, as it does when they are laid out as it goes.
    let mut offline = Offline::new(config, map, staged.at)?;
    staged.for_each_group(|group| offline.ingest(group, &mut sink));
    offline.finish(&mut sink);
    Ok(())
}

/// A batcher driven on the calling thread, without the ring, rate limits or a sender.
struct Offline {
    shared: Arc<Shared>,
    batcher: Batcher,
    now: u64,
    events: usize,
}

impl Offline {
    fn new(mut config: BatcherConfig, map: ShardMap, now: u64) -> Result<Self, CoreError> {
        config.shard_records_per_s = f64::MAX / 4.0;
        config.shard_bytes_per_s = f64::MAX / 4.0;
        config.max_ready_requests = usize::MAX;
        config.validate()?;
        let (offline_ring, _offline_consumer) = ring::channel(4096)?;
        let shared = Shared::new(config, offline_ring)?;
        let batcher = Batcher::new(Arc::clone(&shared), map);
        Ok(Self {
            shared,
            batcher,
            now,
            events: 0,
        })
    }

    /// One group of up to [`ring::READ_GROUP`] events; every 4,096 events, seals what is due.
    fn ingest(&mut self, group: &[&[u8]], sink: &mut impl FnMut(&[u8])) {
        if group.is_empty() {
            return;
        }
        let before = self.events;
        self.batcher.on_events(group);
        self.events += group.len();
        if self.events / 4096 != before / 4096 {
            self.batcher.fill(self.now, false);
            self.drain(sink);
        }
    }

    fn finish(mut self, sink: &mut impl FnMut(&[u8])) {
        self.batcher.close_aggregates(self.now, true);
        self.batcher.fill(self.now, true);
        self.drain(sink);
    }

    fn drain(&mut self, sink: &mut impl FnMut(&[u8])) {
        let ready: Vec<Request> = lock(&self.shared.ready).drain(..).collect();
        for body in ready.into_iter().map(take_body) {
            sink(&body);
            self.batcher.recycle_body(body);
        }
    }
}
