//! The batcher's inbox: completions and shard-map changes; requeueing, dead-lettering and abandoning.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::clock;
use crate::kpl;
use crate::ring::RingConsumer;
use crate::shards::{self, ShardMap};

use super::{sub_hash, Batcher, Misplaced, OpenAggregate, ShardState, MAP_WAIT, READ_CHUNK};
use crate::batch::pipeline::rebuild;
use crate::batch::request::{Completion, Entry, Inbox, Request};
use crate::batch::shared::lock;
use crate::batch::stats::DeadRecord;

impl Batcher {
    pub(super) fn apply_inbox(&mut self, now: u64) {
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

    fn apply_completion(&mut self, c: Completion, now: u64) {
        // Its records are delivered, or about to be queued again below (and held there).
        self.wal_requests.remove(&c.request_id);
        self.buffered = self.buffered.saturating_sub(c.mem);
        self.unanswered = self.unanswered.saturating_sub(1);
        if c.generation != self.generation {
            self.before_remap = self.before_remap.saturating_sub(1);
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
            // Throttling is the shard's rate, which the token bucket paces (emptied above): a throttled record
            // is sent again after the base delay, and does not spend one of its attempts (its age, `record_ttl`,
            // still bounds it), as the KPL does. Backing each one off exponentially by its attempts left an
            // ordered shard waiting on its oldest record's backoff: 74-94 events/s delivered in a 50 % storm
            // (chaos case 1) where this gives about 440, and it dead-lettered records for being throttled.
            let throttled = entry
                .last_error
                .as_ref()
                .is_some_and(|(code, _)| code == crate::wire::THROTTLED);
            if c.count_attempt && !throttled {
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
            let backoff_attempts = if throttled { 1 } else { entry.attempts.max(1) };
            entry.not_before_ns = now + self.backoff_ns(backoff_attempts);
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
    pub(super) fn judge_overdue_misplaced(&mut self, now: u64) {
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
        self.before_remap = self.unanswered;
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
    pub(super) fn abandon_all(&mut self, ring: &mut RingConsumer) {
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
}
