//! What the log reports: recovery at open, stats, the items a reader returns, corruption.

use std::path::PathBuf;

/// What [`Log::open`] found in the active segment and did about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The segment that was validated (the last one on disk); `None` for a new log.
    pub segment: Option<PathBuf>,
    /// Valid frames found in it.
    pub frames: u64,
    /// Damaged ranges before its last valid frame, left in place for readers to report.
    pub damaged_ranges: u64,
    /// Bytes cut from its end (a torn or damaged tail).
    pub truncated_bytes: u64,
    /// Global position where its valid data now ends (where the cut was made, if one was).
    pub position: u64,
    /// What was done and why; `None` when the segment was clean.
    pub reason: Option<String>,
}

impl Recovery {
    /// True when the active segment had nothing to repair or report.
    pub fn is_clean(&self) -> bool {
        self.reason.is_none()
    }
}

/// Counters and sizes of a [`Log`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Segment files, the active one included.
    pub segments: u64,
    /// Bytes in segment files (written to the kernel, not the buffer).
    pub disk_bytes: u64,
    /// Bytes appended but not yet written to the kernel.
    pub buffered_bytes: u64,
    pub start: u64,
    pub end: u64,
    /// Position up to which the active segment is known to be fsynced.
    pub synced: u64,
    pub appended_frames: u64,
    pub appended_bytes: u64,
    /// Positional writes of the buffer.
    pub writes: u64,
    pub fsyncs: u64,
    pub rolls: u64,
    pub deleted_segments: u64,
    pub deleted_bytes: u64,
    /// The writer failed (see [`LogError::Failed`]).
    pub failed: bool,
}

/// One thing a [`LogReader`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A frame that passed every check.
    Frame { position: u64, payload: Vec<u8> },
    /// A damaged range that was skipped.
    Corrupt(Corruption),
}

/// A damaged range of the log: `length` bytes from `position` (global), in `segment`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub segment: PathBuf,
    pub position: u64,
    pub length: u64,
    pub reason: String,
}
