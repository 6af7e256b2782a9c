//! The batcher thread: its state, its loop (`run`) and how long it parks (`next_wait`). What it does is split by
//! concern: `inbox` (completions, shard-map changes, dead letters), `disk` (WAL replay and release, spill),
//! `ingest` (ring -> per-shard KPL aggregates) and `sealing` (shard queues -> requests).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::clock;
use crate::kpl::{self, Aggregator};
use crate::md5x;
use crate::ring::RingConsumer;
use crate::shards::{self, KeyCache, ShardMap};
use crate::wal::NO_WAL;
use crate::wire::{RequestBuilder, Span};

use super::config::{ring_capacity_hint, BatcherConfig};
use super::rate::TokenBucket;
use super::request::{Entry, SentEntry};
use super::shared::{lock, Shared};

mod disk;
mod inbox;
mod ingest;
mod sealing;

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

pub(super) struct Batcher {
    shared: Arc<Shared>,
    map: ShardMap,
    shard_ids: Arc<Vec<String>>,
    generation: u64,
    shards: Vec<ShardState>,
    /// Requests sealed and not answered yet (every sealed request comes back once, as a completion).
    unanswered: u64,
    /// Of those, the ones sealed before the last new shard map. With `ordered`, no shard sends until they are
    /// answered: their retries go wherever the new map puts them, before anything newer of the same key, and a
    /// shard's fresh state does not know about them.
    before_remap: u64,
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
    pub(super) fn new(shared: Arc<Shared>, map: ShardMap) -> Self {
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
            unanswered: 0,
            before_remap: 0,
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

    pub(super) fn run(mut self, mut ring: RingConsumer) {
        loop {
            self.shared
                .counters
                .batcher_wakeups
                .fetch_add(1, Ordering::Relaxed);
            let now = clock::coarse_ns();
            self.apply_inbox(now);
            let flushing = self.shared.flushing.load(Ordering::Acquire) > 0 || ring.is_closed();
            let (read, more) = if self.wal_replay.is_some() {
                // Replayed events are older than anything in the ring: they go first.
                self.drain_wal_replay();
                (false, false)
            } else {
                self.drain_ring(&mut ring)
            };
            self.drain_spill(ring.used_bytes());
            let now = clock::coarse_ns();
            self.judge_overdue_misplaced(now);
            // As after each chunk: what is still to be read fills the aggregates first.
            self.close_and_fill(now, flushing, more);
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
            let wait = self.next_wait(clock::coarse_ns(), ring_used, read, more);
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
    ///
    /// `more`: events wait that the batcher reads before closing anything (see `more_to_read`). With room it
    /// goes on reading; without, the lingers it holds cannot act before the sender's answers bring room back
    /// (which wake it), so they set no deadline: a deadline that has passed would make it spin.
    fn next_wait(&self, now: u64, ring_used: usize, read: bool, more: bool) -> Duration {
        {
            let inbox = lock(&self.shared.inbox);
            if !inbox.completions.is_empty() || inbox.new_map.is_some() {
                return Duration::ZERO;
            }
        }
        let room = self.has_room();
        if room && (more || read && ring_used >= READ_CHUNK.min(self.wake_threshold)) {
            // A read budget ran out with events still waiting: go on reading.
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
        if !more {
            for s in &self.shards {
                if let Some(o) = &s.open {
                    deadline = deadline.min(o.first_ns.saturating_add(linger));
                }
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
                if !self.open.entries.is_empty() && !more {
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
