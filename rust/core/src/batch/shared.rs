//! The state the pipeline handle and the batcher thread share.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ring::RingProducer;
use crate::spill::Spill;
use crate::wal::Wal;
use crate::CoreError;

use super::config::BatcherConfig;
use super::event::largest_event;
use super::pipeline::rebuild;
use super::request::{Completion, Entry, Inbox, Request};
use super::stats::{Counters, DeadRecord, RequestFailure};
use super::waker::Waker;

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: BatcherConfig,
    /// A producer handle, only to wake the batcher when outcomes arrive.
    ring: RingProducer,
    pub(super) counters: Counters,
    pub(super) ready: Mutex<VecDeque<Request>>,
    pub(super) inbox: Mutex<Inbox>,
    pub(super) dead: Mutex<Vec<DeadRecord>>,
    pub(super) dead_pending: AtomicU64,
    /// Memory held by the records in `dead` (see [`DeadRecord::mem`]), not counting those handed out.
    pub(super) dead_bytes: AtomicU64,
    /// An abandoning stop reads no more of the ring while `dead_bytes` is above this ([`u64::MAX`]: no bound).
    pub(super) dead_bound: AtomicU64,
    pub(super) waker: Waker,
    pub(super) flushing: AtomicUsize,
    pub(super) stopping: AtomicBool,
    pub(super) abandon: AtomicBool,
    pub(super) refresh_wanted: AtomicBool,
    pub(super) next_request_id: AtomicU64,
    pub(super) wal: Option<Wal>,
    /// WAL positions of dead records handed out by `take_dead` and not yet confirmed (oldest first).
    pub(super) dead_handed: Mutex<VecDeque<u64>>,
    pub(super) spill: Option<Mutex<Spill>>,
    /// Set from the first spilled event until the batcher has replayed the last: `submit` goes to the spill.
    pub(super) spilling: AtomicBool,
}

impl Shared {
    pub(super) fn new(config: BatcherConfig, ring: RingProducer) -> Result<Arc<Self>, CoreError> {
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
    pub(super) fn fail_request(&self, request: &Request, failure: RequestFailure) {
        let c = &self.counters;
        c.requests_failed.fetch_add(1, Ordering::Relaxed);
        let (code, message, count_attempt, throttled) = match failure {
            RequestFailure::Throttled(m) => (crate::wire::THROTTLED, m, true, true),
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

    pub(super) fn send_back(
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
        };
        lock(&self.inbox).completions.push(completion);
        self.ring.wake_consumer();
    }
}

/// Events an earlier process accepted and this one read back from disk: accepted here, and counted as such.
pub(super) fn count_recovered(c: &Counters, recovered: &AtomicU64, n: u64) {
    if n > 0 {
        c.accepted.fetch_add(n, Ordering::Relaxed);
        recovered.fetch_add(n, Ordering::Relaxed);
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going rather than cascade.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
