//! Shard queues -> requests: what is sendable (rate limits, ordering, retries first) and sealing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::shards;
use crate::wal::NO_WAL;

use super::{Batcher, RAW_POOL_CAPACITY, RAW_POOL_MAX};
use crate::batch::request::{Entry, Request, SentEntry};
use crate::batch::shared::lock;

impl Batcher {
    /// Takes sendable records into the open request and seals it when full, or when due: flushing, or its
    /// oldest event past the linger. `more_to_read` (events waiting in the ring that the batcher has room to
    /// read at once) holds a due request back until it is full: those events are its company, and sealing at
    /// every chunk would send a backlog in requests of a chunk's share each.
    pub(in crate::batch) fn fill(&mut self, now: u64, flushing: bool, more_to_read: bool) {
        let n = self.shards.len();
        for st in &mut self.shards {
            st.records.refill(now);
            st.bytes.refill(now);
        }
        let limit = self.payload_limit();
        loop {
            let mut progressed = false;
            for k in 0..n {
                let i = (self.cursor + k) % n;
                while let Some(from_retry) = self.candidate(i, now) {
                    if !self.take_into_request(i, from_retry, now, limit) {
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
            let due = !more_to_read
                && (flushing || now >= self.open.first_ns.saturating_add(linger))
                && self.rate_hold_until(now).is_none();
            if !self.open.entries.is_empty()
                && (due || !progressed && self.request_is_full_enough(limit))
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

    /// Whether the open request is as full as it is worth waiting for: the record limit, or within a record
    /// (up to 256 KiB) of `limit` bytes.
    fn request_is_full_enough(&self, limit: usize) -> bool {
        let cfg = self.config();
        self.open.entries.len() >= cfg.max_request_records
            || self.open.builder.payload_bytes() + cfg.max_record_bytes.min(256 * 1024) > limit
    }

    /// The most payload bytes the requests sealed now take. While the rate limits bind (some shard's tokens
    /// below half its bucket), they size the requests (see [`rate_hold_until`](Self::rate_hold_until)) and
    /// requests complete as fast as the tokens let them be sent: `max_request_bytes`. Otherwise what binds is
    /// the endpoint and the buffer budget: the budget's share per request
    /// ([`BatcherConfig::request_payload_cap`]).
    fn payload_limit(&self) -> usize {
        let cfg = self.config();
        if self
            .shards
            .iter()
            .any(|st| st.records.drawn() || st.bytes.drawn())
        {
            cfg.max_request_bytes
        } else {
            cfg.request_payload_cap()
        }
    }

    /// The record shard `i` would send next (`true`: from its retry queue) and from when (a retry's backoff),
    /// whatever its tokens; `None` while the shard has nothing to send or waits for something that wakes the
    /// batcher by itself: its request in flight when ordered (and, after a new shard map, every request sealed
    /// before it), the open request, a new shard map.
    fn next_record(&self, i: usize, now: u64) -> Option<(bool, &Entry, u64)> {
        let st = &self.shards[i];
        let cfg = self.config();
        let waits =
            st.outstanding > 0 || self.before_remap > 0 || (cfg.aggregate && st.in_open > 0);
        if st.held || cfg.ordered && waits {
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
    pub(super) fn sendable_at(&self, i: usize, now: u64) -> Option<u64> {
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
    pub(super) fn rate_hold_until(&self, now: u64) -> Option<u64> {
        if self.open.entries.is_empty()
            || self.request_is_full_enough(self.config().max_request_bytes)
        {
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
    pub(super) fn full_request_at(&self, now: u64) -> u64 {
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

    fn take_into_request(
        &mut self,
        i: usize,
        from_retry: bool,
        now: u64,
        max_bytes: usize,
    ) -> bool {
        let max_records = self.config().max_request_records;
        let cost = {
            let st = &self.shards[i];
            let q = if from_retry { &st.retry } else { &st.fresh };
            q.front().map_or(0, Entry::cost)
        };
        // An empty request takes any record: one larger than the request cap still fits max_request_bytes.
        if !self.open.entries.is_empty() && !self.open.builder.fits(cost, max_records, max_bytes) {
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
        // Only this thread adds to `ready`, so room seen here is still there when the request is pushed below;
        // the body is finished without the lock, so the sender never waits on it.
        if lock(&shared.ready).len() >= shared.config.max_ready_requests {
            return false;
        }
        // A recycled body: a fresh multi-megabyte buffer costs a page fault per 4 KiB written.
        let next = self
            .pooled_body()
            .unwrap_or_else(|| Vec::with_capacity(self.open.builder.capacity()));
        let body = self.open.builder.finish_into_next(next);
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
        self.unanswered += 1;
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
