//! Every failure of the segment log.

use super::MAX_CURSOR_NAME;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Every failure of the segment log.
#[derive(Debug)]
pub enum LogError {
    /// A system call failed; `op` says what was being done to `path`.
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Another writer (this process or another) holds `<dir>/LOCK`; `pid` is what it wrote there.
    Locked { path: PathBuf, pid: Option<u32> },
    /// A reader was pointed at a directory that does not exist.
    NotFound { path: PathBuf },
    /// A cursor name outside `[A-Za-z0-9_.-]{1,64}` (or `.`, `..`, or ending in `.tmp`).
    InvalidName { name: String },
    /// A payload longer than `max_frame_bytes`.
    FrameTooLarge { size: usize, max: u32 },
    /// A configuration value is out of range; names the field.
    Config { field: &'static str, reason: String },
    /// A cursor file whose length or checksum is wrong.
    CorruptCursor { path: PathBuf, reason: String },
    /// An earlier fsync (or the cut after a failed write) failed; the writer takes no more writes.
    Failed { reason: String },
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { op, path, source } => write!(f, "segment log: {op} {}: {source}", path.display()),
            Self::Locked { path, pid } => {
                write!(f, "segment log {} is locked by another writer", path.display())?;
                match pid {
                    Some(pid) => write!(f, " (pid {pid})"),
                    None => f.write_str(" (pid unknown)"),
                }
            }
            Self::NotFound { path } => write!(f, "segment log directory {} does not exist", path.display()),
            Self::InvalidName { name } => write!(
                f,
                "invalid cursor name {name:?}: expected 1 to {MAX_CURSOR_NAME} of [A-Za-z0-9_.-], \
                 not '.' or '..' and not ending in '.tmp'"
            ),
            Self::FrameTooLarge { size, max } => {
                write!(f, "payload of {size} bytes exceeds max_frame_bytes={max}")
            }
            Self::Config { field, reason } => write!(f, "invalid configuration: {field}: {reason}"),
            Self::CorruptCursor { path, reason } => {
                write!(f, "cursor file {} is corrupt: {reason}", path.display())
            }
            Self::Failed { reason } => write!(
                f,
                "segment log writer failed and takes no more writes (reopen the log to recover): {reason}"
            ),
        }
    }
}

impl std::error::Error for LogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub(super) fn io_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
