//! The batcher and the disk: WAL replay and release; spill -> shard aggregates.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::clock;
use crate::wal::{self, NO_WAL};

use super::{Batcher, READ_CHUNK};
use crate::batch::event::{event_is_well_formed, read_event};
use crate::batch::shared::{count_recovered, lock};

impl Batcher {
    /// Replays what an earlier process left unacknowledged, within the memory budget, oldest first.
    pub(super) fn drain_wal_replay(&mut self) {
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
        self.seal_after_read(now, false);
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
    /// `more_to_read`: events are waiting that the batcher has room to read at once. They are the company an
    /// aggregate waits for, so neither a flush nor an old first event closes one that they could still fill:
    /// a backlog read chunk by chunk would otherwise go out in aggregates of a chunk's share each.
    pub(super) fn seal_after_read(&mut self, now: u64, more_to_read: bool) {
        let flushing = self.shared.flushing.load(Ordering::Acquire) > 0;
        self.close_and_fill(now, flushing, more_to_read);
    }

    /// Closes the aggregates that are due, unless `more_to_read` (see [`seal_after_read`](Self::seal_after_read)),
    /// then fills and seals requests.
    pub(super) fn close_and_fill(&mut self, now: u64, flushing: bool, more_to_read: bool) {
        if !more_to_read {
            self.close_aggregates(now, flushing);
        }
        self.fill(now, flushing, more_to_read);
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
    pub(super) fn release_wal(&mut self, force: bool) {
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
    pub(super) fn drain_spill(&mut self, ring_used: usize) {
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
            self.seal_after_read(now, false);
            if done {
                break;
            }
        }
    }

    /// At an abandoning stop, what is still in the spill stays on disk for the next producer on its directory.
    pub(super) fn keep_spill(&mut self) {
        if let Some(spill) = self.shared.spill.as_ref() {
            let _ = lock(spill).release(true);
        }
    }
}
