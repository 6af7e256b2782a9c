//! Runs: consecutive records claimed with one compare-and-swap ([`RingProducer::claim_run`]) and filled in
//! order ([`ClaimedRun`]), for producers that push many records at once (the WAL path of `submit_many`).

use super::sync::atomic::Ordering;
use super::{
    align8, PushError, RingProducer, Shared, CLOSED_BIT, HEADER_LEN, PARKED_BIT, POSITION,
    TYPE_DATA, TYPE_PADDING,
};

impl RingProducer {
    /// Claims, with one compare-and-swap, the records of the longest prefix of `lens` (payload lengths) that fits
    /// now: room by the consumer's head, and no wrap past the ring's end (a record that would wrap ends the run;
    /// [`try_push_with`](Self::try_push_with) pads the end for it). Returns the run and how many records it holds
    /// (0: none claimed). The caller fills them in order with [`ClaimedRun::push_with`]; what it leaves unfilled
    /// is handed to the consumer as padding when the run is dropped.
    ///
    /// One CAS per run instead of one per record: a locked instruction waits for every earlier store to leave
    /// the store buffer, the copies of the records before it included. Exact only when no other producer
    /// pushes meanwhile (the WAL path's producers take turns).
    pub fn claim_run(
        &self,
        lens: impl Iterator<Item = usize> + Clone,
    ) -> Result<(ClaimedRun<'_>, usize), PushError> {
        let shared = &*self.shared;
        let cap = shared.capacity as u64;
        let max = shared.max_payload();
        let mut tail = shared.tail.load(Ordering::Relaxed);
        loop {
            if tail & CLOSED_BIT != 0 {
                return Err(PushError::Closed);
            }
            let start = tail & POSITION;
            let to_end = cap - (start & (cap - 1));
            // Room by the real head (Acquire: the consumer zeroed what it freed), loaded once per run.
            let room =
                (cap - start.saturating_sub(shared.head.load(Ordering::Acquire))).min(to_end);
            let (mut count, mut bytes) = (0usize, 0u64);
            for len in lens.clone() {
                let record = align8(HEADER_LEN + len) as u64;
                if len > max || bytes + record > room {
                    break;
                }
                bytes += record;
                count += 1;
            }
            let run = |parked| ClaimedRun {
                shared,
                index: (start & (cap - 1)) as usize,
                left: bytes as usize,
                parked,
            };
            if count == 0 {
                return Ok((run(false), 0));
            }
            match shared.tail.compare_exchange_weak(
                tail,
                tail + bytes,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok((run(tail & PARKED_BIT != 0), count)),
                Err(actual) => tail = actual,
            }
        }
    }
}

/// Consecutive records claimed at once by [`RingProducer::claim_run`], filled in order.
pub struct ClaimedRun<'a> {
    shared: &'a Shared,
    /// Where the next record starts, and the claimed bytes from there on.
    index: usize,
    left: usize,
    /// The claim found the consumer parked: wake it once the run is published.
    parked: bool,
}

impl ClaimedRun<'_> {
    /// Writes the next record, of `len` payload bytes, and publishes it; [`PushError::TooLarge`] (nothing
    /// written) when the rest of the run is smaller than that record.
    pub fn push_with<F: FnOnce(&mut [u8])>(
        &mut self,
        len: usize,
        write: F,
    ) -> Result<(), PushError> {
        let record = align8(HEADER_LEN + len);
        if len > self.shared.max_payload() || record > self.left {
            return Err(PushError::TooLarge);
        }
        let index = self.index;
        self.shared.buffer.prefetch_ahead(index, record);
        // SAFETY: `[index, index + record)` lies in the run this producer claimed and has not published; the
        // slice does not outlive `write`.
        let written = unsafe {
            self.shared.buffer.write_type(index, TYPE_DATA);
            let payload = self.shared.buffer.payload_mut(index, len);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(payload)))
        };
        if let Err(panic) = written {
            // As `commit` does: the record and the rest of the run go to the consumer as padding, and it is woken
            // like a publish would, before unwinding (so the drop has nothing left to do).
            self.finish();
            std::panic::resume_unwind(panic);
        }
        self.shared
            .buffer
            .store_len(index, (HEADER_LEN + len) as u32, Ordering::Release);
        self.index += record;
        self.left -= record;
        Ok(())
    }

    /// Publishes what is left unfilled as one padding record, and wakes a parked consumer.
    fn finish(&mut self) {
        if self.left > 0 {
            // SAFETY: this producer still owns the unpublished rest of its run, at least a header long (records
            // are 8-aligned and at least a header each).
            unsafe { self.shared.buffer.write_type(self.index, TYPE_PADDING) };
            self.shared
                .buffer
                .store_len(self.index, self.left as u32, Ordering::Release);
            self.index += self.left;
            self.left = 0;
        }
        if std::mem::take(&mut self.parked) {
            self.shared.wake_parked_consumer();
        }
    }
}

impl std::fmt::Debug for ClaimedRun<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedRun")
            .field("index", &self.index)
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

impl Drop for ClaimedRun<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}
