//! Durable append-only segment log: the storage under the dead-letter queue, the overload spill and the
//! write-ahead log. It never loses acknowledged data, never returns damaged bytes as data and never panics on
//! damaged files. `docs/log-format.md` is the full description; this is the summary the code relies on.
//!
//! # On disk
//!
//! ```text
//! <dir>/LOCK                  flock'ed (LOCK_EX | LOCK_NB) by the one writer, which writes its pid into it
//! <dir>/<base:020>.seg        segments; base = global position of the file's first byte
//! <dir>/cursors/<name>        position u64 LE ++ CRC32C of those 8 bytes, replaced atomically
//!
//! segment = "TESEGLOG" | version u32 LE = 1 | 0u32 | frame*
//!           (version 2: preallocated, frame* then zeros to the end of the file; the WAL's, see [`mapped`])
//! frame   = sync u32 LE = 0x5AFE_C0DE | len u32 LE | crc u32 LE = CRC32C(len bytes ++ payload) | payload
//! ```
//!
//! A *position* is global: segment base plus offset in the file, so the first frame of a new log is at 16 and a
//! new segment's base is the end of the one before. The leaf directory is created 0700 and every file 0600; an
//! existing directory keeps its mode (pointing the log at a shared directory never changes who can list it).
//!
//! # Writer ([`Log`])
//!
//! * Group commit: [`Log::append`] copies the frame into a 256 KiB buffer; the buffer goes to the file in one
//!   positional write when it is full, on [`Log::flush`] / [`Log::commit`] / [`Log::sync`] and from the flusher
//!   thread. The writer only ever writes whole frames, in order, so a torn frame on disk can only come from a
//!   crash.
//! * Background writes (`Interval` only): a full buffer is *sealed* and handed to the flusher thread, which
//!   writes it outside the writer's lock while appends fill the next one (the page-cache copy of a fresh file
//!   is about a third of an append burst's time). Sealed buffers keep their frames' positions; `flush`,
//!   `commit`, `sync`, a roll and close write whatever is still sealed first (waiting for a write in flight),
//!   so they still return with every appended frame in the kernel. At most one buffer waits for the flusher:
//!   when the next one is full and the flusher has not taken it yet (it is slower, or gets no CPU), the
//!   appender waits for the write in flight and writes the waiting buffer itself.
//! * [`FsyncPolicy`]: `Always` fsyncs on every commit; `Interval(d)` leaves it to the `treasure-log-flush`
//!   thread, which flushes and fdatasyncs every `d` when anything is unsynced; `Never` leaves it to the kernel.
//!   The fdatasync runs outside the writer's lock, so appends continue while the disk works.
//! * Early writeback (`Interval` only): once 512 KiB have been written since the last time, the flusher thread asks
//!   the kernel to start writing those pages back (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which waits for
//!   nothing), so the disk works while the appender goes on and the next fdatasync has little left to wait for.
//!   It is a hint: durability still comes from the fdatasync alone, which also reports any write error.
//! * [`Log::open`] validates the active (last) segment from its first frame: everything after the last valid
//!   frame is a torn or damaged tail and is cut off; damage *before* a valid frame is left for readers to report,
//!   and the segment is then closed there (appends go to a new one: see `writer::recover_last`).
//!   A last segment with no frames and a short or damaged header is rewritten; one with frames and a damaged
//!   header is left as it is and a new segment starts after it. Recovery checks frames by their CRC alone (not by
//!   `max_frame_bytes`), so reopening with a smaller limit never cuts valid data.
//!
//! # Failures
//!
//! * An error from [`Log::append`] means the payload was not appended; `Ok` means it has a position and will
//!   be written (durable after the commit the policy calls for). A background write that fails is kept, as a
//!   failed inline write is, and the next flush (or the append that would write it) retries and reports it.
//! * A failed or short write (ENOSPC, EFBIG, EIO) cuts the segment back to the end of the last whole frame
//!   written and keeps the buffered frames, with their positions: the next flush writes them again, so no later
//!   frame ever follows a partial one. If that cut fails too, the writer is *failed*.
//! * A failed fsync marks the writer failed (after a failed fsync the kernel may have dropped the dirty pages,
//!   so nothing can be said about what reached the disk): every later write returns [`LogError::Failed`];
//!   reopening the log, which validates the tail, is the way back.
//!
//! # Reader ([`LogReader`])
//!
//! Takes no lock and sees what the writer flushed. Every frame is checked (sync marker, `len <=
//! max_frame_bytes`, the whole frame inside the segment, CRC). Damage is reported once as a
//! [`Corruption`] covering the skipped range, and reading resumes at the next offset where a frame with a valid
//! CRC starts; the items returned tile the position space (every byte is in a frame, a report or a valid
//! segment header). At the end of the *last* segment an incomplete frame is "not written yet": a live reader
//! (the default) returns `None` there and reports nothing, unless a valid frame follows it (then it was
//! damage); a reader with [`LogReader::strict_tail`] reports it as truncated. A segment is complete once a
//! later one exists, so its bytes past the next segment's base are not part of the log, and missing bytes
//! before the next segment are reported (unless retention deleted the segment being read). A reader opened at a
//! position inside a frame starts at the next frame. In a version 2 (preallocated) segment, zeros where a frame
//! should start end its written part: in the last segment a live reader waits there (and at a frame with a bad
//! checksum that nothing valid follows: the writer copies into a mapping), a strict one reports them only when a
//! valid frame follows; in a closed one, which ends where the next begins, they are damage (`zeroed range`).
//!
//! # Errors and panics
//!
//! Every failure is a [`LogError`]; no file content makes anything here panic, and a reader never allocates
//! more than `12 + max_frame_bytes` (plus a 64 KiB read-ahead) whatever a length field says. Resynchronising
//! costs time proportional to the bytes re-checked, so a deliberately crafted file can be slow to read, never
//! unsafe.

use std::time::Duration;

/// First 8 bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TESEGLOG";
/// Format version in every segment header.
pub const FORMAT_VERSION: u32 = 1;
/// Format version of a *preallocated* segment (the WAL's, [`mapped::MappedLog`]): the same frames, in a file
/// allocated to its full size up front, so the bytes after the last frame are zeros. A reader takes zeros where
/// a frame should start as the end of the written part (see [`LogReader`]).
pub const PREALLOCATED_VERSION: u32 = 2;
/// Bytes of the segment header (magic, version, 4 reserved zero bytes).
pub const SEGMENT_HEADER_LEN: u64 = 16;
/// Sync marker that starts every frame ("safe code"); resynchronisation looks for it.
pub const FRAME_SYNC: u32 = 0x5AFE_C0DE;
/// Bytes of the frame header (sync, len, crc).
pub const FRAME_HEADER_LEN: u64 = 12;
/// Default [`LogConfig::segment_bytes`].
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Default [`LogConfig::max_frame_bytes`].
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 << 20;
/// Default interval of [`FsyncPolicy::Interval`].
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Smallest [`LogConfig::segment_bytes`].
pub const MIN_SEGMENT_BYTES: u64 = 64;
/// Largest [`LogConfig::segment_bytes`].
pub const MAX_SEGMENT_BYTES: u64 = 1 << 40;
/// Largest [`LogConfig::max_frame_bytes`] (a reader holds one whole frame in memory).
pub const MAX_FRAME_BYTES_LIMIT: u32 = 1 << 30;
/// Longest cursor name.
pub const MAX_CURSOR_NAME: usize = 64;
/// Positions stay below this; segment files named above it are not part of the log.
pub const MAX_POSITION: u64 = 1 << 62;

const SYNC_BYTES: [u8; 4] = FRAME_SYNC.to_le_bytes();
/// Soft capacity of the group-commit buffer.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// Emptied write buffers a closed log leaves for the next one this process opens (see [`take_buffer`]).
const POOLED_BUFFERS: usize = 4;
/// Under [`FsyncPolicy::Interval`], the flusher starts writeback of what was written once this much is waiting,
/// so that the disk works while the appender goes on and the next fdatasync has less left to wait for.
const WRITEBACK_BYTES: u64 = 512 << 10;
const PAGE_BYTES: u64 = 4096;
/// Read-ahead of readers and of recovery.
const READ_AHEAD: usize = 64 << 10;
const LOCK_FILE: &str = "LOCK";
const CURSOR_DIR: &str = "cursors";
const CURSOR_LEN: usize = 12;
/// Name of the flusher thread.
const FLUSHER_NAME: &str = "treasure-log-flush";

pub mod mapped;

mod config;
mod crc;
mod cursor;
mod error;
mod flusher;
mod format;
mod handle;
mod reader;
mod report;
mod scan;
#[cfg(test)]
mod tests;
mod writer;

pub use config::{FsyncPolicy, LogConfig};
pub use crc::pieces as frame_crc_of_pieces;
pub use error::LogError;
pub use format::frame_header;
pub use handle::Log;
pub use reader::LogReader;
pub use report::{Corruption, Item, LogStats, Recovery};
