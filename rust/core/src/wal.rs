//! The write-ahead log of `durability = "wal"`: once `submit` returns, the event survives a crash of the
//! process (SIGKILL), and with `fsync = always` a crash of the machine.
//!
//! ```text
//! submit ─► [WAL mutex: append frame to <dir>, push event + its WAL position into the ring] ─► write(2)
//!                                                            batcher ─► ... ─► Kinesis acknowledges
//! batcher: watermark = lowest WAL position still held anywhere ─► cursor "acked", whole segments deleted
//! start:   frames from the cursor on are replayed (oldest first, before anything new) ─► at-least-once
//! ```
//!
//! Submitters take one mutex so that ring order is WAL order, and the ring is checked for room before the
//! append, so a refused event is never in the WAL. The frame reaches the kernel (`write(2)`) before `submit`
//! returns; `submit_many` writes once per call. The batcher tracks, for every record it holds, the lowest WAL
//! position it carries (aggregates carry the lowest of their events), and so do sealed requests, the dead list
//! and the replay reader; the lowest of all is the watermark, below which nothing needs replaying.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::CoreError;
use crate::log::{FsyncPolicy, Item, Log, LogReader};

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
    log: Option<Log>,
    closed_end: u64,
}

impl WalWriter {
    fn log(&self) -> Result<&Log, CoreError> {
        self.log
            .as_ref()
            .ok_or_else(|| CoreError::Storage("the WAL is closed".into()))
    }

    /// Appends one encoded event (the one in `scratch`); returns its position.
    pub(crate) fn append_scratch(&mut self) -> Result<u64, CoreError> {
        Ok(self.log()?.append(&self.scratch)?)
    }

    fn end(&self) -> u64 {
        self.log.as_ref().map_or(self.closed_end, Log::end)
    }
}

/// The WAL: submitters hold [`Wal::writer`] around append + ring push, so ring order is WAL order.
#[derive(Debug)]
pub(crate) struct Wal {
    pub(crate) writer: Mutex<WalWriter>,
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
        let (log, from) = Log::open_resuming(
            &config.dir,
            config.segment_bytes,
            config.fsync,
            max_frame,
            CURSOR,
        )?;
        let end = log.end();
        Ok(Self {
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

    /// Makes what was appended survive a crash of the process (and of the machine under `fsync = always`).
    pub(crate) fn commit(&self) -> Result<(), CoreError> {
        Ok(lock(&self.writer).log()?.commit()?)
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
        {
            let writer = lock(&self.writer);
            let log = writer.log()?;
            log.set_cursor(CURSOR, watermark)?;
            log.delete_before(watermark)?;
        }
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
