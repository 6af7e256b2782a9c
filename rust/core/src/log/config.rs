//! The log's configuration: fsync policy, segment and frame sizes, retention.

use super::error::LogError;
use super::{
    DEFAULT_FSYNC_INTERVAL, DEFAULT_MAX_FRAME_BYTES, DEFAULT_SEGMENT_BYTES, MAX_FRAME_BYTES_LIMIT,
    MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES,
};
use std::time::Duration;

/// When appended frames are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every [`Log::commit`] fdatasyncs before it returns.
    Always,
    /// A background thread flushes and fdatasyncs every interval when anything is unsynced.
    Interval(Duration),
    /// Never fsync (the kernel writes back when it likes); for data that may be lost on a power failure.
    Never,
}

/// Configuration of a [`Log`]; checked by [`LogConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment is closed when the next frame would make it larger (a larger frame goes alone in one).
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    /// [`Log::enforce_retention`] deletes the oldest closed segments while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// [`Log::enforce_retention`] deletes closed segments last modified longer ago than this.
    pub retention_age: Option<Duration>,
    /// Largest payload; a longer `len` read back is damage.
    pub max_frame_bytes: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            fsync: FsyncPolicy::Interval(DEFAULT_FSYNC_INTERVAL),
            retention_bytes: None,
            retention_age: None,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

impl LogConfig {
    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), LogError> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(LogError::Config {
                field: "segment_bytes",
                reason: format!(
                    "{} is outside [{MIN_SEGMENT_BYTES}, {MAX_SEGMENT_BYTES}]",
                    self.segment_bytes
                ),
            });
        }
        if let FsyncPolicy::Interval(every) = self.fsync {
            if every.is_zero() {
                return Err(LogError::Config {
                    field: "fsync_interval",
                    reason: "must be longer than zero".into(),
                });
            }
        }
        check_max_frame(self.max_frame_bytes)
    }

    pub(super) fn fsyncs(&self) -> bool {
        self.fsync != FsyncPolicy::Never
    }
}

pub(super) fn check_max_frame(max: u32) -> Result<(), LogError> {
    if (1..=MAX_FRAME_BYTES_LIMIT).contains(&max) {
        Ok(())
    } else {
        Err(LogError::Config {
            field: "max_frame_bytes",
            reason: format!("{max} is outside [1, {MAX_FRAME_BYTES_LIMIT}]"),
        })
    }
}
