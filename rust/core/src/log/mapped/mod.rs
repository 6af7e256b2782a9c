//! The write-ahead log's storage: a segment log whose segments are allocated to their full size when they are
//! created and written by a copy into a shared mapping, so an append is a CRC and a `memcpy`, no system call.
//!
//! ```text
//! <dir>/<base:020>.seg        segments, header version 2 (PREALLOCATED_VERSION): the same frames as version 1,
//!                             then zeros to the end of the file (allocated up front)
//! <dir>/prepared-<n>.tmp      the next segment, allocated, headed and mapped ahead of time by the preparing
//!                             thread; renamed to <base:020>.seg when the active segment fills (a roll)
//! <dir>/LOCK, <dir>/cursors/  as in every segment log
//! ```
//!
//! * **Allocation.** A segment's blocks are allocated (`posix_fallocate`) before it is mapped, so a full disk is
//!   an error from the allocation ([`LogError::Io`] with `ENOSPC`, op `allocate segment`), never a `SIGBUS` in the
//!   thread that copies a frame into a page the file system cannot back. (Copy-on-write file systems, btrfs
//!   and ZFS, do not keep that promise: a page written there may still need a new block.)
//! * **Appends** ([`MappedLog::append`], `&mut self`: the caller serialises them, the WAL under its mutex) copy
//!   the payload and then its header into the mapping, past every frame written before. Once copied a frame is
//!   in the page cache: it survives the death of the process. A crash can only tear the frame being copied (the
//!   one writer writes in order), which its CRC shows.
//! * **Page faults off the hot path.** The first write to each page of a shared file mapping faults (to
//!   allocate the page, then to mark it dirty); in the VM measured that is ~4 µs a page, more than copying the
//!   ~30 frames it holds. The preparing thread makes the pages ahead of the writer writable beforehand
//!   (`MADV_POPULATE_WRITE`, [`POPULATE_AHEAD`] ahead, asked for every half of that), so appends mostly copy.
//! * **Rollover.** When half the active segment is written, the preparing thread creates the next one
//!   (allocated, header written, fdatasynced unless `never`, mapped, its first pages made writable) under a
//!   temporary name; the roll renames it to its base and goes on. Without a prepared segment (the thread is
//!   behind, or failed: the disk was full) the roll prepares one itself, and its error is the append's. A frame
//!   larger than a segment gets a segment of its own size.
//! * **Fsync policies** act on the frames copied since the last sync: `msync(MS_SYNC)` of that range of the
//!   active segment, of closed segments not yet synced, and of the directory after a roll. `Always`:
//!   [`MappedHandle::sync`] by the caller before it acknowledges (the WAL's `commit`), outside the writer's lock,
//!   one sync at a time (a caller that waited finds its frames synced by the one before); `Interval(d)`: the
//!   `treasure-wal-sync` thread every `d`; `Never`: the kernel's writeback. A failed sync marks the log
//!   failed, as a failed fsync does in [`super::Log`].
//! * **Recovery** ([`MappedLog::open`]) validates the last segment from its first frame. Zeros where a frame
//!   should start end the written part unless a valid frame follows them; non-zero bytes after the last valid
//!   frame (a frame torn by the crash) are zeroed again, so the segment is frames then zeros and the next append
//!   goes where the torn frame was. Damage before a valid frame (zeros or garbage: pages the kernel wrote back
//!   without the ones before them, when the machine crashed) is left for readers to report, and the segment is
//!   closed at its last valid frame; a new one starts there. A last segment of version 1 (a WAL written before
//!   segments were preallocated) is recovered as [`super::Log`] does and closed the same way.
//! * **Readers** ([`super::LogReader`]) read version 2 segments as version 1 ones, with the zeros rule above:
//!   in a closed segment, which ends exactly where the next begins, zeros before its end are damage.
//!
//! `unsafe` here: the mapping (`mmap`, `munmap`, `msync`, `madvise`, in `mapping.rs`), the copy into it
//! ([`MappedLog::append`], in `writer.rs`) and the page size (`sysconf`, below); see the `SAFETY` comments. A segment is mapped for as long as an `Arc` of it lives (the writer, a sync in progress, the
//! preparing thread); its file is never shortened while mapped (only [`MappedLog::open`] writes to a segment
//! other than through the mapping, before mapping it). Something outside this process that truncates a segment
//! file under it would make the copy fault (`SIGBUS`): the directory is 0700 and locked by the writer.

use super::config::{FsyncPolicy, LogConfig};
use super::error::LogError;

/// How far ahead of the writer the preparing thread makes the active segment's pages writable.
pub const POPULATE_AHEAD: u64 = 8 << 20;
/// How far ahead of the writer the lines of the mapping are prefetched for writing.
const PREFETCH_AHEAD: u64 = 1024;
/// Pages made writable per `madvise` call (the thread looks for a stop or a segment to prepare between them).
const POPULATE_CHUNK: u64 = 1 << 20;
const PREPARED_PREFIX: &str = "prepared-";
const PREPARED_SUFFIX: &str = ".tmp";
const PREP_THREAD: &str = "treasure-wal-prep";
const SYNC_THREAD: &str = "treasure-wal-sync";
/// Bytes read at a time when looking for a torn tail, and written when zeroing one.
const TAIL_CHUNK: usize = 1 << 20;

/// Where a [`MappedLog`] keeps its segments and when it syncs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedConfig {
    /// A segment is allocated to this size (rounded up to whole pages); a frame that does not fit in what is left
    /// of the active one goes to the next.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    /// Largest payload.
    pub max_frame_bytes: u32,
}

impl MappedConfig {
    fn validate(&self) -> Result<(), LogError> {
        LogConfig {
            segment_bytes: self.segment_bytes,
            fsync: self.fsync,
            retention_bytes: None,
            retention_age: None,
            max_frame_bytes: self.max_frame_bytes,
        }
        .validate()
    }

    fn fsyncs(&self) -> bool {
        self.fsync != FsyncPolicy::Never
    }

    /// The size a segment is allocated to: `segment_bytes`, or the frame, in whole pages.
    fn segment_cap(&self, need: u64) -> u64 {
        round_to_page(self.segment_bytes.max(need))
    }
}

fn page_bytes() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(page)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096)
    })
}

fn round_to_page(n: u64) -> u64 {
    let page = page_bytes();
    n.div_ceil(page) * page
}

mod mapping;
mod shared;
mod writer;

pub use shared::MappedHandle;
pub use writer::MappedLog;
