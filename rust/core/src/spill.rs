//! The overload spill: with `overflow = spill`, events that find the ring full go to a segment log on disk,
//! and the batcher replays them, oldest first, once it has caught up with the ring.
//!
//! Order: from the first spilled event until the spill is empty again, every `submit` goes to the spill (not
//! only those that found the ring full), so one thread's events never overtake each other. The batcher reads
//! the spill only when the ring is empty, and clears the spilling flag under the spill's lock at the moment it
//! has read the last frame, so nothing can be appended in between.
//!
//! Durability: the spill is written to the kernel before the batcher reads it, and never fsynced: it absorbs
//! overload, it is not the write-ahead log. What is left in it when the producer stops (endpoint down at
//! close) stays on disk and is replayed by the next producer that opens the same directory; its cursor
//! (`replay`) records how far replay got.

use std::path::PathBuf;

use crate::error::CoreError;
use crate::log::{FsyncPolicy, Item, Log, LogReader};

const CURSOR: &str = "replay";

/// Where the spill lives and how much it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpillConfig {
    pub dir: PathBuf,
    /// Bytes of spilled, not yet replayed events; past it `submit` raises `BufferFull`.
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

/// The spill log, its replay reader, and what it holds. Guarded by a mutex in the pipeline.
#[derive(Debug)]
pub(crate) struct Spill {
    /// `None` once closed (the directory is free for the next producer).
    log: Option<Log>,
    /// The log's end when it was closed.
    closed_end: u64,
    reader: LogReader,
    max_bytes: u64,
    max_frame: u32,
    /// Frames before this position were written by an earlier process: their timestamps mean nothing here.
    recovered_end: u64,
    pub(crate) corrupt_frames: u64,
    released_at: u64,
}

/// One replayed event, and whether an earlier process spilled it.
pub(crate) struct Replayed {
    pub payload: Vec<u8>,
    pub recovered: bool,
}

impl Spill {
    pub(crate) fn open(config: &SpillConfig, max_frame: u32) -> Result<Self, CoreError> {
        let (log, from) = Log::open_resuming(
            &config.dir,
            config.segment_bytes,
            FsyncPolicy::Never,
            max_frame,
            CURSOR,
        )?;
        let reader = LogReader::open(&config.dir, from, max_frame)?;
        let recovered_end = log.end();
        Ok(Self {
            log: Some(log),
            closed_end: 0,
            reader,
            max_bytes: config.max_bytes,
            max_frame,
            recovered_end,
            corrupt_frames: 0,
            released_at: from,
        })
    }

    fn log(&self) -> Result<&Log, CoreError> {
        self.log
            .as_ref()
            .ok_or_else(|| CoreError::Storage("the spill is closed".into()))
    }

    fn end(&self) -> u64 {
        self.log.as_ref().map_or(self.closed_end, Log::end)
    }

    /// Whether an earlier process left events to replay.
    pub(crate) fn has_backlog(&self) -> bool {
        self.end() > self.reader.position()
    }

    /// Bytes spilled and not yet replayed.
    pub(crate) fn backlog_bytes(&self) -> u64 {
        self.end().saturating_sub(self.reader.position())
    }

    /// Records how far replay got, writes what is buffered, and releases the directory.
    pub(crate) fn close(&mut self) -> Result<(), CoreError> {
        self.release(true)?;
        if let Some(log) = self.log.take() {
            self.closed_end = log.end();
            log.close()?;
        }
        Ok(())
    }

    /// Appends one encoded event; `BufferFull` when the spill is at its size limit.
    pub(crate) fn push(&mut self, event: &[u8]) -> Result<(), CoreError> {
        if self.backlog_bytes() + event.len() as u64 + 12 > self.max_bytes
            || event.len() > self.max_frame as usize
        {
            return Err(CoreError::BufferFull);
        }
        self.log()?.append(event)?;
        Ok(())
    }

    /// Reads up to `max_bytes` of events into `out`; true when it has read everything spilled so far.
    pub(crate) fn read(
        &mut self,
        max_bytes: usize,
        out: &mut Vec<Replayed>,
    ) -> Result<bool, CoreError> {
        self.log()?.flush()?;
        let mut taken = 0;
        while taken < max_bytes {
            match self.reader.next_item()? {
                None => return Ok(true),
                Some(Item::Frame { position, payload }) => {
                    taken += payload.len();
                    let recovered = position < self.recovered_end;
                    out.push(Replayed { payload, recovered });
                }
                Some(Item::Corrupt(_)) => self.corrupt_frames += 1,
            }
        }
        Ok(false)
    }

    /// Deletes replayed segments and records how far replay got (cheap unless a segment was finished).
    pub(crate) fn release(&mut self, force: bool) -> Result<(), CoreError> {
        let at = self.reader.position();
        if at == self.released_at || (!force && at - self.released_at < 4 << 20) {
            return Ok(());
        }
        let log = self.log()?;
        log.set_cursor(CURSOR, at)?;
        log.delete_before(at)?;
        self.released_at = at;
        Ok(())
    }
}
