//! The core crate's general error type. It is not the only one: the segment log reports
//! [`crate::log::LogError`] (converted into [`CoreError::Storage`] or [`CoreError::StorageLocked`] below when it
//! reaches the pipeline), and a ring push fails with [`crate::ring::PushError`] (which the pipeline turns into a
//! `CoreError`). `rust/py/src/errors.rs` maps `CoreError` and `LogError` to Python exceptions.

use std::fmt;

/// Every failure the core reports to its callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// A configuration value is out of range; names the field.
    Config { field: &'static str, reason: String },
    /// The ring has no room for the record (policy reject, or a block timed out).
    BufferFull,
    /// A record is larger than the configured maximum.
    RecordTooLarge { size: usize, max: usize },
    /// A partition key is empty or longer than 256 characters.
    InvalidPartitionKey(String),
    /// An explicit hash key is not a decimal integer in `[0, 2**128)`.
    InvalidHashKey(String),
    /// The pipeline was closed.
    Closed,
    /// Bytes that should be a KPL aggregate, or a service response, do not parse.
    Malformed(String),
    /// The spill or the WAL could not be read or written (disk full, read-only); the message names the path.
    Storage(String),
    /// Another writer holds a disk-backed part's lock.
    StorageLocked(String),
    /// The backlog passed its critical level and the pipeline sheds (`shed_when_critical`).
    Overloaded { used: usize, critical: usize },
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config { field, reason } => write!(f, "invalid configuration: {field}: {reason}"),
            Self::BufferFull => f.write_str("ring buffer full"),
            Self::RecordTooLarge { size, max } => {
                write!(f, "record of {size} bytes exceeds max_record_bytes={max}")
            }
            Self::InvalidPartitionKey(why) => write!(f, "invalid partition key: {why}"),
            Self::InvalidHashKey(why) => write!(f, "invalid explicit hash key: {why}"),
            Self::Closed => f.write_str("producer is closed"),
            Self::Malformed(why) => write!(f, "malformed input: {why}"),
            Self::Storage(why) | Self::StorageLocked(why) => f.write_str(why),
            Self::Overloaded { used, critical } => write!(
                f,
                "overloaded: backlog of {used} bytes is past its critical level of {critical} bytes; \
                 the event was shed (shed_when_critical)"
            ),
        }
    }
}

impl std::error::Error for CoreError {}

impl From<crate::log::LogError> for CoreError {
    fn from(e: crate::log::LogError) -> Self {
        match e {
            crate::log::LogError::Locked { .. } => Self::StorageLocked(e.to_string()),
            _ => Self::Storage(e.to_string()),
        }
    }
}
