//! The pipeline handle: what `submit` and the sender talk to.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::clock;
use crate::ring::{self, PushError, RingProducer};
use crate::shards::ShardMap;
use crate::wal::{Wal, WalWriter};
use crate::wire::{self, RecordOutcome, RequestBuilder};
use crate::CoreError;

use super::batcher::Batcher;
use super::config::{bad, ring_capacity_hint, BatcherConfig};
use super::event::{
    check_partition_key, event_frame_crc, event_len, write_event, Wait, EVENT_HEADER, WAL_FIELD,
};
use super::request::{Entry, Request, SentEntry};
use super::shared::{lock, Shared};
use super::stats::{DeadRecord, RequestFailure, Stats};

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
            match &pushed {
                Err(CoreError::BufferFull) => self.count_refused(),
                // The WAL could not take the frame (a full disk): refused, and counted where the monitor
                // looks for storage failures.
                Err(CoreError::Storage(_)) => {
                    self.count_refused();
                    self.shared
                        .counters
                        .wal_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            return pushed;
        }
        if overflow == Overflow::Spill && self.shared.spilling.load(Ordering::Acquire) {
            // Until the spill is empty again, events queue behind it: one thread's events stay in order.
            let spilled = wait(&|| self.spill(data, key, ehk, now));
            if let Err(e) = &spilled {
                self.count_refused();
                self.count_spill_error(e);
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
        match &pushed {
            Err(CoreError::BufferFull) => self.count_refused(),
            // Only the spill's write reports a storage error here.
            Err(e @ CoreError::Storage(_)) => {
                self.count_refused();
                self.count_spill_error(e);
            }
            _ => {}
        }
        pushed
    }

    /// A spill write that failed on the disk, counted where the monitor looks for storage failures.
    fn count_spill_error(&self, e: &CoreError) {
        if matches!(e, CoreError::Storage(_)) {
            self.shared
                .counters
                .spill_errors
                .fetch_add(1, Ordering::Relaxed);
        }
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
        let len = wal_record_len(data, key, ehk);
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
                    return self.append_and_push(&mut writer, len, data, key, ehk, now);
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
    pub fn offer_wal_run<T>(
        &self,
        events: &[T],
        parts: impl Fn(&T) -> (&[u8], &str, Option<u128>),
        now: u64,
    ) -> usize {
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
        // The ring lengths of the valid events from `from` on.
        let lens = |from: usize| {
            events[from..]
                .iter()
                .map(&parts)
                .map_while(|(data, key, ehk)| {
                    self.plainly_valid(data.len(), key)
                        .then(|| wal_record_len(data, key, ehk))
                })
        };
        let mut done = 0;
        while done < events.len() {
            // As many as there is room for, claimed in the ring at once.
            let Ok((mut run, n)) = self.ring.claim_run(lens(done)) else {
                return done;
            };
            if n == 0 {
                // Invalid, no room, or the ring's end reached: one event the single way, which pads the end.
                let (data, key, ehk) = parts(&events[done]);
                let len = wal_record_len(data, key, ehk);
                if !self.plainly_valid(data.len(), key)
                    || !self.ring.has_room(len)
                    || self
                        .append_and_push(&mut writer, len, data, key, ehk, now)
                        .is_err()
                {
                    return done;
                }
                done += 1;
                continue;
            }
            for (data, key, ehk) in events[done..done + n].iter().map(&parts) {
                let len = wal_record_len(data, key, ehk);
                // A failed append (a full disk, a closed WAL) is `offer`'s to report, for this same event; the
                // run's unfilled rest goes to the consumer as padding.
                let Ok(pos) = append_frame(&mut writer, len, data, key, ehk, now) else {
                    return done;
                };
                let pushed = run.push_with(len, |buf| {
                    write_event(buf, now, key.as_bytes(), ehk, Some(pos), data);
                });
                debug_assert!(pushed.is_ok(), "the run was claimed for these lengths");
                done += 1;
            }
        }
        done
    }

    /// Under the WAL's lock, with room in the ring checked: encodes the event into its WAL frame, then pushes
    /// it with the frame's position. The one place both WAL paths (`offer_wal`, `offer_wal_run`) write an event.
    fn append_and_push(
        &self,
        writer: &mut WalWriter,
        len: usize,
        data: &[u8],
        key: &str,
        ehk: Option<u128>,
        now: u64,
    ) -> Result<(), CoreError> {
        let pos = append_frame(writer, len, data, key, ehk, now)?;
        let write = |buf: &mut [u8]| write_event(buf, now, key.as_bytes(), ehk, Some(pos), data);
        match self.ring.try_push_with(len, write) {
            Ok(()) => Ok(()),
            // Closed after the frame went in: the frame is replayed at the next start.
            Err(PushError::Closed) => Err(CoreError::Closed),
            // Only holders of the WAL lock push, and the consumer only frees room.
            Err(PushError::Full | PushError::TooLarge) => {
                unreachable!("the ring had room under the WAL lock")
            }
        }
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

    /// As [`count_accepted`](Self::count_accepted), for callers that never call it at the same time as each
    /// other (the Python binding: only with the GIL held). A load and a store instead of a locked add: a locked
    /// instruction waits for every store before it to leave the store buffer, the event's copy into the ring
    /// included, which cost `submit` about a tenth of its time. Calls that overlap would lose counts (nothing
    /// else).
    #[inline]
    pub fn count_accepted_serialised(&self, n: u64) {
        let c = &self.shared.counters.accepted_serialised;
        c.store(c.load(Ordering::Relaxed) + n, Ordering::Release);
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
                    if error_code == wire::THROTTLED {
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
        let accepted =
            c.accepted.load(Ordering::Acquire) + c.accepted_serialised.load(Ordering::Acquire);
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

pub(super) fn rebuild(request: &Request, sent: &SentEntry) -> Result<Entry, CoreError> {
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

/// Ring payload length of an event pushed under a WAL (its record carries the frame's position).
#[inline]
fn wal_record_len(data: &[u8], key: &str, ehk: Option<u128>) -> usize {
    event_len(key.len(), ehk.is_some(), data.len()) + WAL_FIELD
}

/// Encodes an event whose ring record takes `len` bytes into its WAL frame; returns the frame's position.
#[inline]
fn append_frame(
    writer: &mut WalWriter,
    len: usize,
    data: &[u8],
    key: &str,
    ehk: Option<u128>,
    now: u64,
) -> Result<u64, CoreError> {
    let crc = event_frame_crc(len - WAL_FIELD, now, key.as_bytes(), ehk, data);
    writer.append_with_crc(len - WAL_FIELD, crc, |frame| {
        write_event(frame, now, key.as_bytes(), ehk, None, data);
    })
}
