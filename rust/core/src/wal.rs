//! The write-ahead log of `durability = "wal"`: once `submit` returns, the event survives a crash of the
//! process (SIGKILL), and with `fsync = always` a crash of the machine.
//!
//! ```text
//! submit ─► [WAL lock: encode the event into its frame in the mapped segment of <dir>, push it + its WAL
//!            position into the ring] ─► (fsync = always: msync before returning)
//!                                                            batcher ─► ... ─► Kinesis acknowledges
//! batcher: watermark = lowest WAL position still held anywhere ─► cursor "acked", whole segments deleted
//! start:   frames from the cursor on are replayed (oldest first, before anything new) ─► at-least-once
//! ```
//!
//! Submitters take one lock (`WalLock`) so that ring order is WAL order (and frames are claimed one after the
//! other), and the ring is checked for room before the append, so a refused event is never in the WAL; the event
//! is encoded straight into its frame in the mapping (`WalWriter::append_with_crc`). The storage is a
//! [`MappedLog`]: segments allocated up front and mapped, so the append is a copy into the page cache, which
//! survives the process, and no system call; `fsync = always` msyncs in `commit` (outside the mutex),
//! `interval` leaves it to the log's thread, `never` to the kernel. A full disk is an error when a segment is
//! allocated, before anything is copied. The batcher tracks, for every record it holds, the lowest WAL
//! position it carries (aggregates carry the lowest of their events), and so do sealed requests, the dead list
//! and the replay reader; the lowest of all is the watermark, below which nothing needs replaying.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[cfg(loom)]
use loom::{cell::UnsafeCell, sync::atomic::AtomicBool};
use std::sync::atomic::Ordering;
#[cfg(not(loom))]
use std::{cell::UnsafeCell, sync::atomic::AtomicBool};

use crate::error::CoreError;
use crate::log::mapped::{MappedConfig, MappedHandle, MappedLog};
use crate::log::{FsyncPolicy, Item, LogReader};

const CURSOR: &str = "acked";
/// Positions of events without a WAL frame.
pub const NO_WAL: u64 = u64::MAX;

/// Where the WAL lives and when it is fsynced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalConfig {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
}

/// What submitters hold while they append: the log.
#[derive(Debug)]
pub(crate) struct WalWriter {
    /// `None` once closed (the directory is free for the next producer).
    log: Option<MappedLog>,
    closed_end: u64,
}

fn closed() -> CoreError {
    CoreError::Storage("the WAL is closed".into())
}

impl WalWriter {
    /// Appends one event of `len` bytes, which `write` encodes straight into its frame (it must fill the
    /// slice), `crc` the frame's CRC computed by the caller (see [`MappedLog::append_with_crc`]); returns its
    /// position. Once this returns the frame is in the page cache: it survives the process.
    #[inline]
    pub(crate) fn append_with_crc(
        &mut self,
        len: usize,
        crc: u32,
        write: impl FnOnce(&mut [u8]),
    ) -> Result<u64, CoreError> {
        let log = self.log.as_mut().ok_or_else(closed)?;
        Ok(log.append_with_crc(len, crc, write)?)
    }

    fn end(&self) -> u64 {
        self.log.as_ref().map_or(self.closed_end, MappedLog::end)
    }
}

/// The WAL: submitters hold [`Wal::writer`] around append + ring push, so ring order is WAL order.
#[derive(Debug)]
pub(crate) struct Wal {
    pub(crate) writer: WalLock<WalWriter>,
    /// Syncs, the cursor and deletion, without the writer's mutex.
    store: MappedHandle,
    /// `fsync = always`: [`Wal::commit`] syncs.
    sync_on_commit: bool,
    dir: PathBuf,
    /// Frames from here to `recovered_end` were written by an earlier process and are replayed.
    pub(crate) recovered_from: u64,
    pub(crate) recovered_end: u64,
    max_frame: u32,
    persisted: Mutex<(u64, Instant)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Wal {
    pub(crate) fn open(config: &WalConfig, max_frame: u32) -> Result<Self, CoreError> {
        let (log, _recovery) = MappedLog::open(
            &config.dir,
            MappedConfig {
                segment_bytes: config.segment_bytes,
                fsync: config.fsync,
                max_frame_bytes: max_frame,
            },
        )?;
        let from = log.cursor(CURSOR)?.unwrap_or(0).max(log.start());
        let end = log.end();
        Ok(Self {
            store: log.handle(),
            sync_on_commit: config.fsync == FsyncPolicy::Always,
            writer: WalLock::new(WalWriter {
                log: Some(log),
                closed_end: 0,
            }),
            dir: config.dir.clone(),
            recovered_from: from,
            recovered_end: end,
            max_frame,
            persisted: Mutex::new((from, Instant::now())),
        })
    }

    /// A reader over what an earlier process left unacknowledged, if anything.
    pub(crate) fn replay_reader(&self) -> Result<Option<LogReader>, CoreError> {
        if self.recovered_end <= self.recovered_from {
            return Ok(None);
        }
        Ok(Some(LogReader::open(
            &self.dir,
            self.recovered_from,
            self.max_frame,
        )?))
    }

    /// Makes what was appended survive a crash of the machine under `fsync = always` (an msync, without the
    /// writer's mutex); a crash of the process it survives already. Otherwise only reports a closed or failed
    /// WAL (a background sync failed): no system call.
    #[inline]
    pub(crate) fn commit(&self) -> Result<(), CoreError> {
        if self.sync_on_commit {
            self.store.sync()?;
        } else {
            self.store.check()?;
        }
        Ok(())
    }

    /// The position the next frame would get: with nothing held, everything before it is acknowledged.
    pub(crate) fn end(&self) -> u64 {
        self.writer.lock().end()
    }

    /// Records that nothing below `watermark` needs replaying, and deletes the segments wholly below it. Cheap
    /// unless it moved: the cursor is written at most every `every`, or at once with `force`.
    pub(crate) fn release(
        &self,
        watermark: u64,
        every: Duration,
        force: bool,
    ) -> Result<(), CoreError> {
        let mut persisted = lock(&self.persisted);
        if watermark <= persisted.0 || (!force && persisted.1.elapsed() < every) {
            return Ok(());
        }
        // Without the writer's mutex: submitters go on while the cursor is written and fsynced.
        self.store.set_cursor(CURSOR, watermark)?;
        self.store.delete_before(watermark)?;
        *persisted = (watermark, Instant::now());
        Ok(())
    }

    /// Writes what is buffered (fsyncing as the policy says) and releases the directory.
    pub(crate) fn close(&self) -> Result<(), CoreError> {
        let mut writer = self.writer.lock();
        if let Some(log) = writer.log.take() {
            writer.closed_end = log.end();
            log.close()?;
        }
        Ok(())
    }
}

/// The submitters' lock around append + ring push. A test-and-set lock whose release is a plain store: std's
/// `Mutex` releases with a swap (it must see whether a waiter needs waking), and on the WAL's path, which takes the
/// lock for every event, that locked instruction waits for the event's ring and frame stores to drain: ~14 ns of
/// the ~100 ns per event of `submit_many` with the WAL (bench/test_wal.py, paired runs). Waiters spin briefly,
/// then yield, then sleep (~50 µs at a time, the timer slack), so a holder that is descheduled or rolls a segment
/// (a rename; preparing the segment itself when the preparing thread is behind: milliseconds) costs them little
/// CPU; none is woken, they look again. Not fair. Not poisoned by a panic (the log's state is valid between
/// appends: a frame counts once its header is written, the last step).
pub(crate) struct WalLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out access to `value` to one holder at a time (acquired by a compare-exchange from
// `false` to `true` with `Acquire`, released by a `Release` store of `false`, so each holder's accesses happen
// after the previous holder's), which is what `Mutex<T>: Sync` needs of `T`: `Send`.
unsafe impl<T: Send> Sync for WalLock<T> {}

impl<T> WalLock<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Waits for the lock and returns its guard; the lock is released when the guard is dropped.
    #[inline]
    pub(crate) fn lock(&self) -> WalGuard<'_, T> {
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        WalGuard::new(self)
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        let mut waits = 0u32;
        loop {
            // Only reads while it is held: the holder keeps its cache line.
            while self.locked.load(Ordering::Relaxed) {
                waits += 1;
                backoff(waits);
            }
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }
}

/// Spin 64 times, then yield 16 times, then sleep.
fn backoff(waits: u32) {
    #[cfg(loom)]
    {
        let _ = waits;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    if waits <= 64 {
        std::hint::spin_loop();
    } else if waits <= 80 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(1));
    }
}

impl<T: fmt::Debug> fmt::Debug for WalLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalLock")
            .field("locked", &self.locked.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Access to a [`WalLock`]'s value while it is held.
pub(crate) struct WalGuard<'a, T> {
    lock: &'a WalLock<T>,
    /// Under loom, the tracked access to the cell, until the guard releases the lock.
    #[cfg(loom)]
    access: Option<loom::cell::MutPtr<T>>,
}

impl<'a, T> WalGuard<'a, T> {
    fn new(lock: &'a WalLock<T>) -> Self {
        Self {
            lock,
            #[cfg(loom)]
            access: Some(lock.value.get_mut()),
        }
    }

    fn ptr(&self) -> *mut T {
        #[cfg(loom)]
        {
            let access = self.access.as_ref().expect("held until dropped");
            // SAFETY: loom's tracked pointer to the cell; dereferenced only as `ptr`'s callers do (see there).
            unsafe { std::ptr::from_mut(access.deref()) }
        }
        #[cfg(not(loom))]
        {
            self.lock.value.get()
        }
    }
}

impl<T> Deref for WalGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while this thread holds the lock, so no other reference to the value
        // exists until it is dropped; the borrow of `self` bounds this one.
        unsafe { &*self.ptr() }
    }
}

impl<T> DerefMut for WalGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference made through the guard.
        unsafe { &mut *self.ptr() }
    }
}

impl<T> Drop for WalGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        #[cfg(loom)]
        drop(self.access.take()); // the access ends before the next holder's can begin
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// Reads the next recovered frame below `end`: its position and payload; `None` when done. Damaged frames are
/// skipped (counted by the caller through `corrupt`).
pub(crate) fn next_recovered(
    reader: &mut LogReader,
    end: u64,
    corrupt: &mut u64,
) -> Result<Option<(u64, Vec<u8>)>, CoreError> {
    loop {
        if reader.position() >= end {
            return Ok(None);
        }
        match reader.next_item()? {
            None => return Ok(None),
            Some(Item::Frame { position, payload }) => {
                if position >= end {
                    return Ok(None);
                }
                return Ok(Some((position, payload)));
            }
            Some(Item::Corrupt(_)) => *corrupt += 1,
        }
    }
}

/// A loom model of [`WalLock`]: one holder at a time, and each holder sees what the one before wrote (loom
/// checks every access to the value through its cell).
///
/// ```text
/// LOOM_MAX_PREEMPTIONS=3 RUSTFLAGS="--cfg loom" cargo test -p treasure_core --lib --release wal::loom_model
/// ```
#[cfg(all(test, loom))]
mod loom_model {
    use super::WalLock;
    use loom::sync::Arc;
    use loom::thread;

    #[test]
    fn one_holder_at_a_time_and_every_update_seen() {
        loom::model(|| {
            let lock = Arc::new(WalLock::new(0u32));
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let lock = Arc::clone(&lock);
                    thread::spawn(move || {
                        for _ in 0..2 {
                            let mut value = lock.lock();
                            let seen = *value;
                            *value = seen + 1;
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(*lock.lock(), 4);
        });
    }
}
