//! Bounded lock-free many-to-one ring of variable-length byte records.
//!
//! The model is Aeron/Agrona's `ManyToOneRingBuffer`: one power-of-two byte buffer, producers claim space by a
//! CAS on a monotonically increasing `tail`, write their payload, then commit by a release-store of the record's
//! length word; the single consumer reads committed records in order, zeroes what it consumed (so every future
//! header slot reads as "not committed") and release-stores `head`.
//!
//! # Record layout
//!
//! ```text
//! 0        4        8                     8 + len        align8
//! | length | type   | payload (len bytes) | zero padding |
//! ```
//!
//! `length` is the header plus the payload (so a committed record is never 0, even with an empty payload) and is
//! written last. `type` is [`TYPE_DATA`] or [`TYPE_PADDING`]; a padding record fills the space from the tail to
//! the end of the buffer when a record does not fit there, and is claimed in the same CAS as the record that
//! then starts at index 0. Records never straddle the end of the buffer.
//!
//! # Synchronisation
//!
//! * Producers read a shared `head_cache` (written by producers) and only load the consumer's `head` when the
//!   cached value says the ring is full, as Agrona does, so the consumer's cache line is not pulled on every push.
//! * Bit 63 of `tail` is the *closed* bit: [`RingProducer::close`] sets it with one `fetch_or`, after which every
//!   claim fails (the CAS expects a tail without it). The tail is therefore frozen at close: every record claimed
//!   before is eventually committed, and the consumer has drained the ring exactly when
//!   `is_closed() && used_bytes() == 0`. Bit 62 is the consumer's *parked* bit (below); positions use the rest.
//! * Parking uses one `Mutex<()>` + `Condvar` pair per side plus atomic state, so the hot path never takes a
//!   lock. See [Parking the consumer](#parking-the-consumer) for the consumer's side; a producer blocked on a full
//!   ring increments `producer_waiters` (`SeqCst` RMW) then loads `head` (`SeqCst`), and the consumer stores
//!   `head` (`SeqCst`) then loads `producer_waiters` (`SeqCst`): all four are in the single `SeqCst` order, so
//!   either the producer sees the freed space or the consumer sees the waiter and notifies under the mutex.
//!
//! # Parking the consumer
//!
//! The consumer parks ([`RingConsumer::park_until`]) until the *wake condition* holds: the used bytes
//! (`tail - head`, claimed records included) reach the wake threshold **and** the record at `head` is committed.
//! The consumer's "parked" flag is bit 62 of `tail` itself, so the handshake is about one location, whose
//! read-modify-writes are totally ordered, instead of a Dekker pair of store-then-load on two locations (which
//! needs a full fence on both sides, on every push on the producer's: a locked instruction, +4.5 ns on a 14 ns
//! push here):
//!
//! ```text
//! producer                                     consumer (park_until)
//!   CAS tail -> new_tail | parked bit            t = fetch_or(tail, PARKED)
//!   (the CAS reads the bit: parked)              t closed, or used(t) >= threshold and len[head] != 0: return
//!   write the payload, store len (Release)       used(t) >= threshold, len[head] == 0: wait for the commit
//!   if parked and used(tail) >= threshold:         (spin, then yield; no sleep)
//!     fetch_and(tail, !PARKED) had the bit:      else: lock; if the bit is still set: wait
//!       lock; notify                             fetch_and(tail, !PARKED)
//! ```
//!
//! Every claim's CAS is either before the consumer's `fetch_or` (the claim is in `t`) or after it (the CAS reads
//! the bit). So when the consumer sleeps (`used(t)` below the threshold), the claim that takes the used bytes to
//! the threshold is after it, sees the bit, and its producer wakes the consumer after its commit: it judges by
//! the *current* tail (a stale `head` only over-estimates). When the threshold is reached but the head record is
//! still being written ("filling"), its producer may have claimed before the bit was set and would not wake the
//! consumer, so the consumer does not sleep: it spins, then yields, until the commit, which is a payload copy
//! away. A producer whose write closure panics publishes its claim as padding through the same path. The
//! wake-up itself cannot be lost: the waker clears the bit before notifying under the mutex, and the consumer
//! checks the bit under the mutex before waiting. [`RingProducer::wake_consumer`] and `close` store their own
//! flag (`wake_pending`, the closed bit) first and then clear the parked bit with a release RMW, which the
//! consumer's `fetch_or` (acquire) reads from or precedes. The producers' fast path pays almost nothing for this
//! (a mask, +0.2 ns here): the bit comes with the CAS they already do, which carries it over.
//!
//! Every wait also has a timeout (`SAFETY_WAIT`, 50 ms), as a safety net only: under loom a wait never times
//! out, and the loom models in `tests/ring_loom.rs` check that the consumer is woken without it.
//!
//! # Errors and panics
//!
//! [`channel`] rejects capacities below 4096 bytes or above 4 GiB with [`CoreError::Config`] naming
//! `ring_bytes`. A push fails with [`PushError::TooLarge`] for payloads above [`RingProducer::max_payload`],
//! [`PushError::Full`] when the ring has no room (or a blocking push timed out) and [`PushError::Closed`] after
//! [`RingProducer::close`] (or once the consumer was dropped). If a producer's `write` closure panics, the claimed
//! space is committed as padding so the consumer never stalls (and the panic goes on); if the consumer's callback
//! panics, the records read so far (including the one being processed) are released.

use std::fmt;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::CoreError;

mod run;
pub use run::ClaimedRun;

use self::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use self::sync::{thread, Arc, Condvar, Mutex, MutexGuard};

/// `std` or `loom` primitives, so the claim/commit/read protocol can be model-checked with `--cfg loom`.
mod sync {
    #[cfg(loom)]
    pub(super) use loom::sync::{atomic, Arc, Condvar, Mutex, MutexGuard};
    #[cfg(loom)]
    pub(super) use loom::thread;
    #[cfg(not(loom))]
    pub(super) use std::sync::{atomic, Arc, Condvar, Mutex, MutexGuard};
    #[cfg(not(loom))]
    pub(super) use std::thread;
}

/// Smallest capacity [`channel`] accepts.
pub const MIN_CAPACITY: usize = 4096;
/// Largest capacity [`channel`] accepts (record lengths are `u32`, the largest record is a quarter of the ring).
pub const MAX_CAPACITY: u64 = 1 << 32;
/// Bytes of the record header (length word + type word).
pub const HEADER_LEN: usize = 8;
/// Alignment of every record.
pub const ALIGNMENT: usize = 8;
/// Type word of a data record.
pub const TYPE_DATA: u32 = 1;
/// Type word of a padding record (skipped by the consumer).
pub const TYPE_PADDING: u32 = 0xFFFF_FFFF;

/// Set in `tail` by `close`; positions never reach 2^62 bytes.
const CLOSED_BIT: u64 = 1 << 63;
/// Set in `tail` while the consumer is parked (or about to wait): see the module docs.
const PARKED_BIT: u64 = 1 << 62;
/// The position bits of `tail`.
const POSITION: u64 = !(CLOSED_BIT | PARKED_BIT);
/// Claim retries of a blocking push before it parks.
const SPIN_TRIES: u32 = 16;
/// Safety-net timeout of every condvar wait: the parking protocol wakes every waiter without it (see the module
/// docs); it only bounds the damage of a bug.
const SAFETY_WAIT: Duration = Duration::from_millis(50);

#[inline]
const fn align8(n: usize) -> usize {
    (n + (ALIGNMENT - 1)) & !(ALIGNMENT - 1)
}

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// No room in the ring (for a blocking push: none freed before the deadline).
    Full,
    /// The payload is larger than [`RingProducer::max_payload`].
    TooLarge,
    /// The ring was closed.
    Closed,
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "ring buffer full",
            Self::TooLarge => "record larger than the ring's max_payload",
            Self::Closed => "ring closed",
        })
    }
}

impl std::error::Error for PushError {}

/// Creates a ring of `capacity` bytes (rounded up to a power of two, at least 4096).
pub fn channel(capacity: usize) -> Result<(RingProducer, RingConsumer), CoreError> {
    if capacity < MIN_CAPACITY {
        return Err(CoreError::Config {
            field: "ring_bytes",
            reason: format!("must be at least {MIN_CAPACITY} bytes, got {capacity}"),
        });
    }
    match capacity.checked_next_power_of_two() {
        Some(cap) if cap as u64 <= MAX_CAPACITY => Ok(channel_unchecked(cap)),
        _ => Err(CoreError::Config {
            field: "ring_bytes",
            reason: format!("must be at most {MAX_CAPACITY} bytes, got {capacity}"),
        }),
    }
}

/// Test-only constructor that allows tiny rings (loom models); `capacity` must be a power of two in `32..=2^32`.
#[doc(hidden)]
pub fn channel_unchecked(capacity: usize) -> (RingProducer, RingConsumer) {
    assert!(
        capacity.is_power_of_two() && capacity >= 32 && capacity as u64 <= MAX_CAPACITY,
        "ring capacity must be a power of two in 32..=2^32, got {capacity}"
    );
    let shared = Arc::new(Shared::new(capacity));
    (
        RingProducer {
            shared: Arc::clone(&shared),
        },
        RingConsumer { shared, head: 0 },
    )
}

/// The byte buffer. Header length words are accessed atomically, everything else through raw pointers whose
/// exclusive use the claim/commit/head protocol guarantees.
/// How far past a record's start [`RingProducer`] starts loading the ring's lines for writing.
const WRITE_AHEAD: usize = 1024;

struct Buffer {
    /// 8-aligned, zero-initialised storage.
    words: Box<[std::cell::UnsafeCell<u64>]>,
    /// Under loom the length words live in loom atomics (one per 8-byte slot) so loom sees every access ...
    #[cfg(loom)]
    lens: Box<[atomic::AtomicU32]>,
    /// ... and each slot's plain bytes are tracked by a loom cell, so loom reports racy payload accesses.
    #[cfg(loom)]
    cells: Box<[loom::cell::UnsafeCell<()>]>,
}

#[cfg(loom)]
use self::sync::atomic;

// SAFETY: the buffer is shared between producers and the consumer; every plain access to its bytes is to a
// region that the ring protocol gives to exactly one thread at a time (a claimed, uncommitted record to its
// producer; committed, unreleased records to the consumer), with happens-before edges through the release/acquire
// pairs on the length word, `head` and `head_cache`. Length words are only accessed atomically while shared.
unsafe impl Sync for Buffer {}
// SAFETY: `Buffer` owns its allocation; nothing in it is tied to a thread.
unsafe impl Send for Buffer {}

impl Buffer {
    fn new(capacity: usize) -> Self {
        let slots = capacity / ALIGNMENT;
        Self {
            words: (0..slots).map(|_| std::cell::UnsafeCell::new(0)).collect(),
            #[cfg(loom)]
            lens: (0..slots).map(|_| atomic::AtomicU32::new(0)).collect(),
            #[cfg(loom)]
            cells: (0..slots)
                .map(|_| loom::cell::UnsafeCell::new(()))
                .collect(),
        }
    }

    #[inline]
    fn base(&self) -> *mut u8 {
        std::cell::UnsafeCell::raw_get(self.words.as_ptr()).cast::<u8>()
    }

    /// Pointer to the 4-byte word at byte `index` (a multiple of 4), derived from the 8-aligned storage.
    #[inline]
    fn word32(&self, index: usize) -> *mut u32 {
        debug_assert!(index.is_multiple_of(4));
        // `wrapping_add` keeps this safe; callers only dereference in-bounds indexes.
        std::cell::UnsafeCell::raw_get(self.words.as_ptr())
            .cast::<u32>()
            .wrapping_add(index / 4)
    }

    #[cfg(not(loom))]
    #[inline]
    fn length_word(&self, index: usize) -> &std::sync::atomic::AtomicU32 {
        debug_assert!(index.is_multiple_of(ALIGNMENT) && index < self.words.len() * ALIGNMENT);
        // SAFETY: `index` is 8-aligned and inside the allocation (records never straddle its end), so the pointer
        // is valid and aligned for `AtomicU32`, which has the layout of `u32`; the bytes are inside an
        // `UnsafeCell`, so shared mutation through the atomic is allowed, and while shared they are only accessed
        // atomically (the consumer's plain zeroing happens-before any producer reuse via `head`).
        unsafe { &*self.word32(index).cast::<std::sync::atomic::AtomicU32>() }
    }

    #[cfg(not(loom))]
    #[inline]
    fn load_len(&self, index: usize, order: Ordering) -> u32 {
        self.length_word(index).load(order)
    }

    #[cfg(not(loom))]
    #[inline]
    fn store_len(&self, index: usize, len: u32, order: Ordering) {
        self.length_word(index).store(len, order);
    }

    #[cfg(loom)]
    fn load_len(&self, index: usize, order: Ordering) -> u32 {
        self.lens[index / ALIGNMENT].load(order)
    }

    #[cfg(loom)]
    fn store_len(&self, index: usize, len: u32, order: Ordering) {
        self.lens[index / ALIGNMENT].store(len, order);
    }

    /// Tells loom about a plain access to `[index, index + len)`.
    #[cfg(loom)]
    fn track(&self, index: usize, len: usize, write: bool) {
        for cell in &self.cells[index / ALIGNMENT..(index + len).div_ceil(ALIGNMENT)] {
            if write {
                cell.with_mut(|_| ());
            } else {
                cell.with(|_| ());
            }
        }
    }

    /// Writes the type word of the record at `index`.
    ///
    /// # Safety
    /// The caller owns the record at `index` (claimed, not committed).
    #[inline]
    unsafe fn write_type(&self, index: usize, record_type: u32) {
        debug_assert!(
            index.is_multiple_of(ALIGNMENT) && index + HEADER_LEN <= self.words.len() * ALIGNMENT
        );
        #[cfg(loom)]
        self.track(index, HEADER_LEN, true);
        // SAFETY: in bounds and 4-aligned (index is 8-aligned); the caller owns these bytes.
        unsafe { self.word32(index + 4).write(record_type) }
    }

    /// Reads the type word of the record at `index`.
    ///
    /// # Safety
    /// The record at `index` is committed and not yet released by the consumer (the caller is the consumer).
    #[inline]
    unsafe fn read_type(&self, index: usize) -> u32 {
        #[cfg(loom)]
        self.track(index, HEADER_LEN, false);
        // SAFETY: in bounds and 4-aligned; the record is committed (acquire on its length word), so its producer's
        // writes happen-before this read and nobody writes it until the consumer releases it.
        unsafe { self.word32(index + 4).read() }
    }

    /// Starts loading for writing the lines [`WRITE_AHEAD`] past the `len` bytes claimed at `index`, as many as
    /// they span: records of about two lines would otherwise leave every other line to a miss.
    #[inline]
    fn prefetch_ahead(&self, index: usize, len: usize) {
        for line in (0..len).step_by(64) {
            self.prefetch_write(index + WRITE_AHEAD + line);
        }
    }

    /// Starts loading the cache line at byte `index` (any value: it is wrapped into the buffer, whose length is a
    /// power of two) for writing, so that the copy into a record claimed later finds its line already owned (a
    /// hint: it changes nothing).
    #[inline]
    fn prefetch_write(&self, index: usize) {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        // SAFETY: a prefetch is only a hint; it never faults and changes nothing (PREFETCHW; a NOP on CPUs that
        // predate it). The address is inside the buffer anyway.
        unsafe {
            let at = self.base().add(index & (self.words.len() * ALIGNMENT - 1));
            std::arch::asm!("prefetchw [{0}]", in(reg) at, options(nostack, preserves_flags, readonly));
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
        let _ = index;
    }

    /// The payload bytes of the record at `index`, for its producer to fill.
    ///
    /// # Safety
    /// The caller owns the claimed record `[index, index + HEADER_LEN + len)` and holds no other reference to it.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    unsafe fn payload_mut(&self, index: usize, len: usize) -> &mut [u8] {
        debug_assert!(index + HEADER_LEN + len <= self.words.len() * ALIGNMENT);
        #[cfg(loom)]
        self.track(index + HEADER_LEN, len, true);
        // SAFETY: in bounds (checked by the claim); the bytes are in an `UnsafeCell` and exclusively owned by the
        // caller until it commits, so a unique reference for that time is sound.
        unsafe { std::slice::from_raw_parts_mut(self.base().add(index + HEADER_LEN), len) }
    }

    /// The payload bytes of the committed record at `index`.
    ///
    /// # Safety
    /// The record is committed and not released; the caller is the consumer.
    #[inline]
    unsafe fn payload(&self, index: usize, len: usize) -> &[u8] {
        debug_assert!(index + HEADER_LEN + len <= self.words.len() * ALIGNMENT);
        #[cfg(loom)]
        self.track(index + HEADER_LEN, len, false);
        // SAFETY: in bounds; committed (its producer's writes happen-before via the acquire of the length word)
        // and nobody writes these bytes until the consumer releases them, after the borrow ends.
        unsafe { std::slice::from_raw_parts(self.base().add(index + HEADER_LEN), len) }
    }

    /// Zeroes `[index, index + len)` before the consumer releases it.
    ///
    /// # Safety
    /// The caller is the consumer and the range holds only records it has read and not yet released.
    #[inline]
    unsafe fn zero(&self, index: usize, len: usize) {
        debug_assert!(index + len <= self.words.len() * ALIGNMENT);
        #[cfg(loom)]
        {
            self.track(index, len, true);
            for slot in index / ALIGNMENT..(index + len) / ALIGNMENT {
                self.lens[slot].store(0, Ordering::Relaxed);
            }
        }
        // SAFETY: in bounds; the consumer owns these bytes until it stores `head` (after this call), and no
        // producer accesses them before acquiring that store.
        unsafe { std::ptr::write_bytes(self.base().add(index), 0, len) }
    }
}

/// State shared by all producers and the consumer.
struct Shared {
    /// Next position to claim (monotonic, in bytes); bit 63 = closed, bit 62 = consumer parked.
    tail: CachePadded<AtomicU64>,
    /// A recent value of `head`, refreshed by producers that found the ring full by it.
    head_cache: CachePadded<AtomicU64>,
    /// Position up to which the consumer released space (written by the consumer only).
    head: CachePadded<AtomicU64>,
    /// Consumer-side park state (written rarely: when the consumer parks or is woken).
    park: CachePadded<ParkState>,
    capacity: usize,
    buffer: Buffer,
    consumer_lock: Mutex<()>,
    consumer_cv: Condvar,
    producer_lock: Mutex<()>,
    producer_cv: Condvar,
}

struct ParkState {
    /// A `wake_consumer` not yet observed by `park_until`.
    wake_pending: AtomicBool,
    /// Used bytes at which producers wake a parked consumer.
    wake_threshold: AtomicUsize,
    /// Producers waiting on `producer_cv` for space.
    producer_waiters: AtomicUsize,
}

impl Shared {
    fn new(capacity: usize) -> Self {
        Self {
            tail: CachePadded::new(AtomicU64::new(0)),
            head_cache: CachePadded::new(AtomicU64::new(0)),
            head: CachePadded::new(AtomicU64::new(0)),
            park: CachePadded::new(ParkState {
                wake_pending: AtomicBool::new(false),
                wake_threshold: AtomicUsize::new(1),
                producer_waiters: AtomicUsize::new(0),
            }),
            capacity,
            buffer: Buffer::new(capacity),
            consumer_lock: Mutex::new(()),
            consumer_cv: Condvar::new(),
            producer_lock: Mutex::new(()),
            producer_cv: Condvar::new(),
        }
    }

    #[inline]
    fn max_payload(&self) -> usize {
        (self.capacity / 4 - HEADER_LEN) & !(ALIGNMENT - 1)
    }

    fn used_bytes(&self) -> usize {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed) & POSITION;
        (tail.saturating_sub(head) as usize).min(self.capacity)
    }

    fn is_closed(&self) -> bool {
        self.tail.load(Ordering::Relaxed) & CLOSED_BIT != 0
    }

    /// Padding needed before a record of `record_len` bytes claimed at `tail`, and the tail after the claim.
    #[inline]
    fn claim_span(&self, tail: u64, record_len: u64) -> (u64, u64) {
        let cap = self.capacity as u64;
        let to_end = cap - (tail & (cap - 1));
        let padding = if record_len > to_end { to_end } else { 0 };
        (padding, tail + padding + record_len)
    }

    fn close(&self) {
        self.tail.fetch_or(CLOSED_BIT, Ordering::SeqCst);
        self.wake_consumer();
        let _guard = lock(&self.producer_lock);
        self.producer_cv.notify_all();
    }

    fn wake_consumer(&self) {
        self.park.wake_pending.store(true, Ordering::SeqCst);
        self.unpark_consumer();
    }

    /// Clears the parked bit and, if this call cleared it, notifies the consumer (under the mutex, which it
    /// holds from its check of the bit until it waits).
    fn unpark_consumer(&self) {
        if self.tail.fetch_and(!PARKED_BIT, Ordering::SeqCst) & PARKED_BIT != 0 {
            let _guard = lock(&self.consumer_lock);
            self.consumer_cv.notify_one();
        }
    }

    /// Commits the record at `index` (its length word, the record's last write); `parked` is whether its claim
    /// found the consumer parked, in which case the record may be what the consumer waits for (module docs).
    #[inline]
    fn publish(&self, index: usize, record_len: u32, parked: bool) {
        self.buffer.store_len(index, record_len, Ordering::Release);
        if parked {
            self.wake_parked_consumer();
        }
    }

    /// Called after its commit by a producer whose claim found the consumer parked: wakes it if the used bytes by
    /// the *current* tail reach the threshold (not by this record's end: a later claim may have made it). A stale
    /// `head` only over-estimates.
    #[cold]
    #[inline(never)]
    fn wake_parked_consumer(&self) {
        let tail = self.tail.load(Ordering::Relaxed);
        let used = (tail & POSITION).saturating_sub(self.head.load(Ordering::Relaxed));
        if tail & PARKED_BIT != 0 && used >= self.park.wake_threshold.load(Ordering::Relaxed) as u64
        {
            self.unpark_consumer();
        }
    }
}

fn lock(mutex: &Mutex<()>) -> MutexGuard<'_, ()> {
    // The mutexes guard no data, so a poisoned one is as good as any.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wait_timeout<'a>(
    cv: &Condvar,
    guard: MutexGuard<'a, ()>,
    timeout: Duration,
) -> MutexGuard<'a, ()> {
    match cv.wait_timeout(guard, timeout) {
        Ok((guard, _)) => guard,
        Err(poisoned) => poisoned.into_inner().0,
    }
}

/// The writing side of a ring; cheap to clone, one per thread or shared.
#[derive(Clone)]
pub struct RingProducer {
    shared: Arc<Shared>,
}

/// The reading side of a ring (exactly one). Dropping it closes the ring.
pub struct RingConsumer {
    shared: Arc<Shared>,
    /// The consumer's own copy of `shared.head`.
    head: u64,
}

impl fmt::Debug for RingProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingProducer")
            .field("capacity", &self.capacity())
            .field("used_bytes", &self.used_bytes())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl fmt::Debug for RingConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingConsumer")
            .field("capacity", &self.shared.capacity)
            .field("head", &self.head)
            .field("used_bytes", &self.used_bytes())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl RingProducer {
    /// Capacity of the ring in bytes (a power of two).
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Largest payload a push accepts: a quarter of the ring minus the header, so a record plus wrap padding always
    /// fits in half the ring.
    pub fn max_payload(&self) -> usize {
        self.shared.max_payload()
    }

    /// Claims `len` payload bytes, calls `write` with exactly that many (zeroed) bytes, and commits. Lock-free.
    #[inline]
    pub fn try_push_with<F: FnOnce(&mut [u8])>(
        &self,
        len: usize,
        write: F,
    ) -> Result<(), PushError> {
        if len > self.shared.max_payload() {
            return Err(PushError::TooLarge);
        }
        let record_len = align8(HEADER_LEN + len);
        let claimed = self.claim(record_len as u64)?;
        self.commit(claimed, len, write);
        Ok(())
    }

    /// Whether a push of `len` payload bytes would find room now. Exact when no other producer pushes in
    /// between (the WAL path serialises its producers); the consumer only ever frees room.
    pub fn has_room(&self, len: usize) -> bool {
        let shared = &*self.shared;
        if len > shared.max_payload() {
            return false;
        }
        let tail = shared.tail.load(Ordering::Acquire);
        if tail & CLOSED_BIT != 0 {
            return false;
        }
        let (_, new_tail) = shared.claim_span(tail & POSITION, align8(HEADER_LEN + len) as u64);
        // Saturating: `head` is loaded last and may have passed `new_tail` meanwhile (as in `claim`).
        new_tail.saturating_sub(shared.head.load(Ordering::Acquire)) <= shared.capacity as u64
    }

    /// Copies `payload` into the ring as one record.
    #[inline]
    pub fn try_push(&self, payload: &[u8]) -> Result<(), PushError> {
        self.try_push_with(payload.len(), |dst| dst.copy_from_slice(payload))
    }

    /// As [`try_push_with`](Self::try_push_with), but when the ring is full retries a few times, then parks until
    /// the consumer frees space, the ring is closed, or `deadline` passes ([`PushError::Full`]).
    pub fn push_with_deadline<F: FnOnce(&mut [u8])>(
        &self,
        len: usize,
        deadline: Instant,
        write: F,
    ) -> Result<(), PushError> {
        let shared = &*self.shared;
        if len > shared.max_payload() {
            return Err(PushError::TooLarge);
        }
        let record_len = align8(HEADER_LEN + len) as u64;
        let mut tries = 0;
        loop {
            match self.claim(record_len) {
                Ok(claimed) => {
                    self.commit(claimed, len, write);
                    return Ok(());
                }
                Err(PushError::Full) => {}
                Err(err) => return Err(err),
            }
            if tries < SPIN_TRIES {
                tries += 1;
                for _ in 0..(1u32 << tries.min(6)) {
                    std::hint::spin_loop();
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PushError::Full);
            }
            shared.park.producer_waiters.fetch_add(1, Ordering::SeqCst);
            {
                let guard = lock(&shared.producer_lock);
                let tail = shared.tail.load(Ordering::SeqCst);
                let head = shared.head.load(Ordering::SeqCst);
                let (_, new_tail) = shared.claim_span(tail & POSITION, record_len);
                let fits = new_tail.saturating_sub(head) <= shared.capacity as u64;
                if tail & CLOSED_BIT == 0 && !fits {
                    drop(wait_timeout(
                        &shared.producer_cv,
                        guard,
                        (deadline - now).min(SAFETY_WAIT),
                    ));
                }
            }
            shared.park.producer_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Claims `record_len` (aligned) bytes, writing a padding record first if they do not fit before the end of
    /// the buffer. Returns the record's index and whether the consumer was parked at the claim.
    #[inline]
    fn claim(&self, record_len: u64) -> Result<(usize, bool), PushError> {
        let shared = &*self.shared;
        let cap = shared.capacity as u64;
        let mut head = shared.head_cache.load(Ordering::Acquire);
        let mut tail = shared.tail.load(Ordering::Relaxed);
        loop {
            if tail & CLOSED_BIT != 0 {
                return Err(PushError::Closed);
            }
            // Adding to `tail` keeps its parked bit (positions never reach bit 62): the CAS carries it over.
            let (padding, new_tail) = shared.claim_span(tail, record_len);
            let new_position = new_tail & POSITION;
            if new_position - head > cap {
                // Full by the cached head: look at the real one (Acquire: the consumer zeroed what it freed).
                head = shared.head.load(Ordering::Acquire);
                // `head` can be past `new_tail` when this producer was preempted since it loaded `tail` (the
                // others claimed and the consumer read past it): not full then, and the CAS below fails and
                // retries with the current tail. (The cached head is never past `tail`: it was loaded first.)
                if new_position.saturating_sub(head) > cap {
                    return Err(PushError::Full);
                }
                shared.head_cache.store(head, Ordering::Release);
            }
            let parked = tail & PARKED_BIT;
            match shared.tail.compare_exchange_weak(
                tail,
                new_tail,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    let index = (tail & (cap - 1)) as usize;
                    shared
                        .buffer
                        .prefetch_ahead(index, (new_tail - tail) as usize);
                    if padding == 0 {
                        return Ok((index, parked != 0));
                    }
                    // SAFETY: the CAS gave this producer `[tail, new_tail)`, whose start is the padding record.
                    unsafe { shared.buffer.write_type(index, TYPE_PADDING) };
                    shared
                        .buffer
                        .store_len(index, padding as u32, Ordering::Release);
                    return Ok((0, parked != 0));
                }
                Err(actual) => tail = actual,
            }
        }
    }

    // Always inlined: called out of line, its caller shuffled the pushed result through the stack.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn commit<F: FnOnce(&mut [u8])>(&self, (index, parked): (usize, bool), len: usize, write: F) {
        let shared = &*self.shared;
        let record_len = (HEADER_LEN + len) as u32;
        // SAFETY: `claim` returned `index` for a record of `HEADER_LEN + len` bytes owned by this producer until
        // it publishes the record's length; the slice does not outlive `write`.
        let written = unsafe {
            shared.buffer.write_type(index, TYPE_DATA);
            let payload = shared.buffer.payload_mut(index, len);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(payload)))
        };
        if let Err(panic) = written {
            // `write` panicked: hand the space to the consumer as padding, so it does not stall, and wake it like a
            // commit would (it may be parked waiting for this very record). Done after catching the panic rather
            // than in a drop guard, so the wake-up's lock is not taken while unwinding (loom's mutex cannot be).
            // SAFETY: this producer still owns the claimed record at `index`.
            unsafe { shared.buffer.write_type(index, TYPE_PADDING) };
            shared.publish(index, record_len, parked);
            std::panic::resume_unwind(panic);
        }
        shared.publish(index, record_len, parked);
    }

    /// Bytes claimed and not yet released by the consumer (approximate: relaxed loads).
    pub fn used_bytes(&self) -> usize {
        self.shared.used_bytes()
    }

    /// Closes the ring: further pushes fail with [`PushError::Closed`]; wakes the consumer and blocked producers.
    /// Records claimed before are still committed and readable. Idempotent.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Whether [`close`](Self::close) was called (or the consumer dropped).
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Wakes the consumer unconditionally: a parked one returns, otherwise its next `park_until` returns at once.
    pub fn wake_consumer(&self) {
        self.shared.wake_consumer();
    }
}

/// Releases what the consumer read, also when its callback unwinds: zeroes, stores `head`, wakes producers.
struct Release<'a> {
    shared: &'a Shared,
    head: &'a mut u64,
    index: usize,
    bytes: usize,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        // SAFETY: `[index, index + bytes)` holds exactly the records this consumer read since its last release.
        unsafe { self.shared.buffer.zero(self.index, self.bytes) };
        *self.head += self.bytes as u64;
        // SeqCst: releases the zeroed bytes to producers, and pairs with a blocked producer's SeqCst increment of
        // `producer_waiters` then load of `head`.
        self.shared.head.store(*self.head, Ordering::SeqCst);
        if self.shared.park.producer_waiters.load(Ordering::SeqCst) != 0 {
            let _guard = lock(&self.shared.producer_lock);
            self.shared.producer_cv.notify_all();
        }
    }
}

/// Where the consumer's wake condition stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WakeState {
    /// Closed, or the threshold is reached and the head record committed.
    Ready,
    /// The threshold is reached but the head record is still being written.
    Filling,
    /// Below the threshold.
    Idle,
}

/// Most payloads [`RingConsumer::read_grouped`] hands over at once.
pub const READ_GROUP: usize = 16;

impl RingConsumer {
    /// Reads committed records in order until about `max_bytes` of ring space (headers and padding included) was
    /// consumed or an uncommitted record is reached, calling `f` with each payload; frees the space and returns
    /// the number of records read. If `f` panics, the records up to the one it panicked on are freed.
    pub fn read<F: FnMut(&[u8])>(&mut self, max_bytes: usize, mut f: F) -> usize {
        self.read_in_groups::<1>(max_bytes, |group| f(group[0]))
    }

    /// Like [`read`](Self::read), handing the payloads to `f` in groups of up to [`READ_GROUP`] (all from
    /// the same contiguous block, valid together): lets the caller look ahead, e.g. prefetch what the next
    /// few records will need before handling the first. If `f` panics, its whole group is freed.
    pub fn read_grouped<F: FnMut(&[&[u8]])>(&mut self, max_bytes: usize, f: F) -> usize {
        self.read_in_groups::<READ_GROUP>(max_bytes, f)
    }

    /// [`read`](Self::read) and [`read_grouped`](Self::read_grouped): payloads handed over `N` at a time (fewer
    /// at the end of a block). A record's space is counted for release before it is handed over.
    #[inline]
    fn read_in_groups<const N: usize>(
        &mut self,
        max_bytes: usize,
        mut f: impl FnMut(&[&[u8]]),
    ) -> usize {
        let shared = &*self.shared;
        let capacity = shared.capacity;
        let mut records = 0;
        let mut consumed = 0;
        while consumed < max_bytes {
            let start = (self.head as usize) & (capacity - 1);
            // Records never straddle the end: read a contiguous block, release it, then go on from index 0.
            let block_end = capacity;
            let mut release = Release {
                shared,
                head: &mut self.head,
                index: start,
                bytes: 0,
            };
            // The group's borrows end with this block, before the release.
            {
                let mut group: [&[u8]; N] = [&[]; N];
                let mut n = 0;
                while start + release.bytes < block_end && consumed + release.bytes < max_bytes {
                    let index = start + release.bytes;
                    let len = shared.buffer.load_len(index, Ordering::Acquire) as usize;
                    if len == 0 {
                        break;
                    }
                    release.bytes += align8(len);
                    debug_assert!(start + release.bytes <= capacity);
                    // SAFETY: the acquire load saw the record committed; it stays ours until `release` drops.
                    if unsafe { shared.buffer.read_type(index) } == TYPE_DATA {
                        records += 1;
                        // SAFETY: as above; the group is handed on and its borrows end before the release.
                        group[n] = unsafe { shared.buffer.payload(index, len - HEADER_LEN) };
                        n += 1;
                        if n == N {
                            f(&group);
                            n = 0;
                        }
                    }
                }
                if n > 0 {
                    f(&group[..n]);
                }
            }
            let read = release.bytes;
            drop(release);
            consumed += read;
            if read == 0 || start + read < capacity {
                break;
            }
        }
        records
    }

    /// Parks until the used bytes reach the wake threshold (and the first record is committed), `wake_consumer`
    /// or `close` is called, or `deadline` passes. Returns at once if any of that already holds.
    pub fn park_until(&mut self, deadline: Instant) {
        let shared = &*self.shared;
        let park = &*shared.park;
        loop {
            if park.wake_pending.swap(false, Ordering::SeqCst) {
                return;
            }
            match self.wake_state(shared.tail.load(Ordering::SeqCst)) {
                WakeState::Ready => return,
                WakeState::Filling => {
                    if !self.wait_for_head_commit(deadline) {
                        return;
                    }
                    continue;
                }
                WakeState::Idle => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            // Setting the bit and reading the tail are one RMW: every claim is before it (and in `tail`) or after
            // it (and sees the bit).
            let tail = shared.tail.fetch_or(PARKED_BIT, Ordering::SeqCst);
            if !park.wake_pending.load(Ordering::SeqCst) && self.wake_state(tail) == WakeState::Idle
            {
                let guard = lock(&shared.consumer_lock);
                // A waker clears the bit before it notifies under the lock: if it is still set, the notification
                // has not happened yet and will find us waiting.
                if shared.tail.load(Ordering::SeqCst) & PARKED_BIT != 0 {
                    drop(wait_timeout(
                        &shared.consumer_cv,
                        guard,
                        (deadline - now).min(SAFETY_WAIT),
                    ));
                }
            }
            shared.tail.fetch_and(!PARKED_BIT, Ordering::SeqCst);
        }
    }

    /// Waits (spinning, then yielding) for the head record, claimed and being written, to be committed: its
    /// producer may have claimed it before the consumer parked, so it would not wake it. False if `deadline`
    /// passed first.
    fn wait_for_head_commit(&self, deadline: Instant) -> bool {
        let shared = &*self.shared;
        let index = (self.head as usize) & (shared.capacity - 1);
        let mut spins = 0u32;
        while shared.buffer.load_len(index, Ordering::Acquire) == 0 {
            if spins < 8 && cfg!(not(loom)) {
                for _ in 0..(1u32 << spins) {
                    std::hint::spin_loop();
                }
                spins += 1;
            } else {
                thread::yield_now();
                if Instant::now() >= deadline {
                    return false;
                }
            }
        }
        true
    }

    /// Where the wake condition stands, by `tail` (as loaded or swapped).
    fn wake_state(&self, tail: u64) -> WakeState {
        let shared = &*self.shared;
        if tail & CLOSED_BIT != 0 {
            return WakeState::Ready;
        }
        let used = (tail & POSITION) - self.head;
        if used == 0 || used < shared.park.wake_threshold.load(Ordering::Relaxed) as u64 {
            return WakeState::Idle;
        }
        let committed = shared.buffer.load_len(
            (self.head as usize) & (shared.capacity - 1),
            Ordering::Acquire,
        ) != 0;
        if committed {
            WakeState::Ready
        } else {
            WakeState::Filling
        }
    }

    /// Used bytes at which producers wake a parked consumer; clamped to `1..=capacity/2` (a full ring always
    /// holds more than half the capacity). Default 1: wake on any record.
    pub fn set_wake_threshold(&self, bytes: usize) {
        let clamped = bytes.clamp(1, self.shared.capacity / 2);
        self.shared
            .park
            .wake_threshold
            .store(clamped, Ordering::Relaxed);
    }

    /// Producers never wake a parked consumer for data (only [`wake_consumer`](RingProducer::wake_consumer),
    /// `close` or the park's deadline do), until the next [`set_wake_threshold`](Self::set_wake_threshold).
    /// For a consumer that could not take records in anyway: parking on a full ring would return at once.
    pub fn set_wake_on_data_off(&self) {
        self.shared
            .park
            .wake_threshold
            .store(usize::MAX, Ordering::Relaxed);
    }

    /// Bytes claimed by producers and not yet read (approximate).
    pub fn used_bytes(&self) -> usize {
        let tail = self.shared.tail.load(Ordering::Relaxed) & POSITION;
        (tail.saturating_sub(self.head) as usize).min(self.shared.capacity)
    }

    /// Whether the ring was closed. Once closed, the ring is drained when `used_bytes() == 0`.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }
}

impl Drop for RingConsumer {
    fn drop(&mut self) {
        // Nobody will read any more: fail pushes instead of letting producers block on a full ring.
        self.shared.close();
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
