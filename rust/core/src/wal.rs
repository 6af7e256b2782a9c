//! The write-ahead log of `durability = "wal"`: once `submit` returns, the event survives a crash of the
//! process (SIGKILL), and with `fsync = always` a crash of the machine.
//!
//! ```text
//! submit ─► [WAL mutex: copy frame into the mapped segment of <dir>, push event + its WAL position into the
//!            ring] ─► (fsync = always: msync before returning)
//!                                                            batcher ─► ... ─► Kinesis acknowledges
//! batcher: watermark = lowest WAL position still held anywhere ─► cursor "acked", whole segments deleted
//! start:   frames from the cursor on are replayed (oldest first, before anything new) ─► at-least-once
//! ```
//!
//! Submitters take one mutex so that ring order is WAL order (and frames are claimed one after the other), and
//! the ring is checked for room before the append, so a refused event is never in the WAL. The storage is a
//! [`MappedLog`]: segments allocated up front and mapped, so the append is a copy into the page cache, which
//! survives the process, and no system call; `fsync = always` msyncs in `commit` (outside the mutex),
//! `interval` leaves it to the log's thread, `never` to the kernel. A full disk is an error when a segment is
//! allocated, before anything is copied. The batcher tracks, for every record it holds, the lowest WAL
//! position it carries (aggregates carry the lowest of their events), and so do sealed requests, the dead list
//! and the replay reader; the lowest of all is the watermark, below which nothing needs replaying.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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

/// What submitters hold while they append: the log and a scratch buffer for encoding the event.
#[derive(Debug)]
pub(crate) struct WalWriter {
    pub(crate) scratch: Vec<u8>,
    /// `None` once closed (the directory is free for the next producer).
    log: Option<MappedLog>,
    closed_end: u64,
}

fn closed() -> CoreError {
    CoreError::Storage("the WAL is closed".into())
}

impl WalWriter {
    /// Appends one encoded event (the one in `scratch`); returns its position. Once this returns the frame
    /// is in the page cache: it survives the process.
    #[inline]
    pub(crate) fn append_scratch(&mut self) -> Result<u64, CoreError> {
        let log = self.log.as_mut().ok_or_else(closed)?;
        Ok(log.append(&self.scratch)?)
    }

    fn end(&self) -> u64 {
        self.log.as_ref().map_or(self.closed_end, MappedLog::end)
    }
}

/// The WAL: submitters hold [`Wal::writer`] around append + ring push, so ring order is WAL order.
#[derive(Debug)]
pub(crate) struct Wal {
    pub(crate) writer: Mutex<WalWriter>,
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
            writer: Mutex::new(WalWriter {
                scratch: Vec::new(),
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
        lock(&self.writer).end()
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
        let mut writer = lock(&self.writer);
        if let Some(log) = writer.log.take() {
            writer.closed_end = log.end();
            log.close()?;
        }
        Ok(())
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
