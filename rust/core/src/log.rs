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
//!   frame is a torn or damaged tail and is cut off; damage *before* a valid frame is left for readers to report.
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

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

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

// ---------------------------------------------------------------------------------------------------------------
// Errors, configuration, reports

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

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

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

    fn fsyncs(&self) -> bool {
        self.fsync != FsyncPolicy::Never
    }
}

fn check_max_frame(max: u32) -> Result<(), LogError> {
    if (1..=MAX_FRAME_BYTES_LIMIT).contains(&max) {
        Ok(())
    } else {
        Err(LogError::Config {
            field: "max_frame_bytes",
            reason: format!("{max} is outside [1, {MAX_FRAME_BYTES_LIMIT}]"),
        })
    }
}

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

// ---------------------------------------------------------------------------------------------------------------
// Format helpers

fn segment_header() -> [u8; 16] {
    segment_header_of(FORMAT_VERSION)
}

fn segment_header_of(version: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h
}

/// The version of a valid segment header ([`FORMAT_VERSION`] or [`PREALLOCATED_VERSION`]), `None` otherwise.
fn header_version(head: &[u8]) -> Option<u32> {
    [FORMAT_VERSION, PREALLOCATED_VERSION]
        .into_iter()
        .find(|&v| head == segment_header_of(v))
}

/// Length of the run of zero bytes at the start of `b` (64 bytes at a time where it can: zeroed tails of
/// preallocated segments are megabytes long).
fn zero_run(b: &[u8]) -> usize {
    let mut i = 0;
    for block in b.chunks_exact(64) {
        if block.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            break;
        }
        i += 64;
    }
    i + b[i..].iter().position(|&x| x != 0).unwrap_or(b.len() - i)
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

/// The base of a segment file name (`<20 digits>.seg`), or `None` for any other name.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok().filter(|&base| base < MAX_POSITION)
    } else {
        None
    }
}

/// Segment files of `dir`, sorted by base.
fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((base, entry.path()));
        }
    }
    out.sort_unstable_by_key(|s| s.0);
    Ok(out)
}

/// CRC32C of a frame's length bytes followed by its payload.
fn frame_crc(len_bytes: &[u8], payload: &[u8]) -> u32 {
    frame_crc::compute(len_bytes, payload)
}

/// CRC32C for frames. The crc32c crate runs one chain of `crc32` instructions up to 768 bytes, and each
/// instruction waits for the one before (3 cycles of latency, 1 of throughput): for the few-hundred-byte payloads
/// the log mostly holds, this runs three chains over thirds of the payload and joins them with a carry-less
/// multiply, about twice as fast. Longer payloads, shorter ones and CPUs without SSE 4.2 and PCLMULQDQ go to the
/// crate; the result is the same CRC either way (checked against the crate in the tests).
mod frame_crc {
    /// Payloads of at least this many bytes take the three-chain path...
    const MIN: usize = 48;
    /// ...and below this many (from here on the crate interleaves too).
    const MAX: usize = 768;
    /// Reflected CRC32C (Castagnoli) polynomial.
    const POLY: u32 = 0x82F6_3B78;

    /// `a * b` modulo the polynomial, both reflected (bit 31 is x^0).
    const fn mul_mod(a: u32, mut b: u32) -> u32 {
        let mut m: u32 = 1 << 31;
        let mut p = 0;
        while m != 0 {
            if a & m != 0 {
                p ^= b;
            }
            m >>= 1;
            b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        }
        p
    }

    /// x^e modulo the polynomial, reflected.
    const fn x_pow(mut e: u64) -> u32 {
        let mut result: u32 = 1 << 31;
        let mut square: u32 = 1 << 30;
        while e > 0 {
            if e & 1 != 0 {
                result = mul_mod(result, square);
            }
            square = mul_mod(square, square);
            e >>= 1;
        }
        result
    }

    const WORDS: usize = MAX / 24;

    /// `SHIFT[k]` = the constants that move a CRC register past 8k and 16k bytes: x^(64k - 33) and
    /// x^(128k - 33) (the carry-less product is one bit short, and the `crc32` reduction multiplies by x^32).
    const SHIFT: [(u32, u32); WORDS + 1] = {
        let mut table = [(0, 0); WORDS + 1];
        let mut k = 1;
        while k <= WORDS {
            table[k] = (x_pow(64 * k as u64 - 33), x_pow(128 * k as u64 - 33));
            k += 1;
        }
        table
    };

    pub(super) fn compute(len_bytes: &[u8], payload: &[u8]) -> u32 {
        #[cfg(target_arch = "x86_64")]
        if (MIN..MAX).contains(&payload.len())
            && std::arch::is_x86_feature_detected!("sse4.2")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
        {
            // SAFETY: the CPU has the two features the function is compiled for (checked just above).
            return unsafe { three_chains(len_bytes, payload) };
        }
        crc32c::crc32c_append(crc32c::crc32c(len_bytes), payload)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "sse4.2,pclmulqdq")]
    fn three_chains(head: &[u8], data: &[u8]) -> u32 {
        use std::arch::x86_64::{
            _mm_clmulepi64_si128, _mm_crc32_u32, _mm_crc32_u64, _mm_crc32_u8, _mm_cvtsi128_si64,
            _mm_cvtsi32_si128,
        };
        /// The register `c` moved past as many zero bytes as the constant `k` stands for.
        #[target_feature(enable = "sse4.2,pclmulqdq")]
        fn shift(c: u64, k: u32) -> u64 {
            let product = _mm_clmulepi64_si128(
                _mm_cvtsi32_si128(c as u32 as i32),
                _mm_cvtsi32_si128(k as i32),
                0,
            );
            _mm_crc32_u64(0, _mm_cvtsi128_si64(product) as u64)
        }
        fn word(bytes: &[u8]) -> u64 {
            let mut w = [0u8; 8];
            w.copy_from_slice(bytes);
            u64::from_le_bytes(w)
        }
        let mut crc: u64 = u64::from(u32::MAX);
        if let Ok(len) = <[u8; 4]>::try_from(head) {
            crc = u64::from(_mm_crc32_u32(crc as u32, u32::from_le_bytes(len)));
        } else {
            for &b in head {
                crc = u64::from(_mm_crc32_u8(crc as u32, b));
            }
        }
        let k = data.len() / 24;
        let (a, rest) = data.split_at(8 * k);
        let (b, rest) = rest.split_at(8 * k);
        let (c, tail) = rest.split_at(8 * k);
        let (mut c0, mut c1, mut c2) = (crc, 0u64, 0u64);
        for ((wa, wb), wc) in a
            .chunks_exact(8)
            .zip(b.chunks_exact(8))
            .zip(c.chunks_exact(8))
        {
            c0 = _mm_crc32_u64(c0, word(wa));
            c1 = _mm_crc32_u64(c1, word(wb));
            c2 = _mm_crc32_u64(c2, word(wc));
        }
        let (by_one, by_two) = SHIFT[k];
        crc = shift(c0, by_two) ^ shift(c1, by_one) ^ c2;
        let mut words = tail.chunks_exact(8);
        for w in words.by_ref() {
            crc = _mm_crc32_u64(crc, word(w));
        }
        for &b in words.remainder() {
            crc = u64::from(_mm_crc32_u8(crc as u32, b));
        }
        !(crc as u32)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn same_crc_as_the_crate_for_every_length() {
            let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
            let data: Vec<u8> = (0..2 * super::MAX)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            for start in [0, 1, 3, 7] {
                for len in 0..=super::MAX + 64 {
                    let payload = &data[start..start + len];
                    let head = (len as u32).to_le_bytes();
                    let want = crc32c::crc32c_append(crc32c::crc32c(&head), payload);
                    assert_eq!(super::compute(&head, payload), want, "len {len} at {start}");
                }
            }
            assert_eq!(super::x_pow(0), 1 << 31);
            assert_eq!(super::mul_mod(1 << 31, 0x1234_5678), 0x1234_5678);
        }
    }
}

/// The header of the frame of `payload` (at most `u32::MAX` bytes, checked by the caller): sync marker, length,
/// CRC32C of the length bytes and the payload. The payload follows it.
pub fn frame_header(payload: &[u8]) -> [u8; FRAME_HEADER_LEN as usize] {
    let len = (payload.len() as u32).to_le_bytes();
    let crc = frame_crc(&len, payload).to_le_bytes();
    let mut header = [0u8; FRAME_HEADER_LEN as usize];
    header[..4].copy_from_slice(&SYNC_BYTES);
    header[4..8].copy_from_slice(&len);
    header[8..].copy_from_slice(&crc);
    header
}

/// Appends the frame of `payload` (at most `u32::MAX` bytes, checked by the caller) to `out`.
fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&frame_header(payload));
    out.extend_from_slice(payload);
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Why a range was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    Sync,
    TooLong {
        len: u32,
        max: u32,
    },
    Checksum,
    Truncated,
    /// Zeros where a frame should start, before the end of a preallocated segment's written part: frames the
    /// kernel never wrote back before a crash of the machine.
    Zeroed,
}

impl Damage {
    fn describe(self) -> String {
        match self {
            Self::Sync => "bad sync marker".into(),
            Self::TooLong { len, max } => {
                format!("frame length {len} exceeds max_frame_bytes={max}")
            }
            Self::Checksum => "checksum mismatch".into(),
            Self::Truncated => "truncated frame".into(),
            Self::Zeroed => "zeroed range".into(),
        }
    }
}

/// The first bytes of a would-be frame, classified.
enum Header {
    /// No bytes at all.
    Empty,
    /// Fewer than 12 bytes, consistent with a frame still being written.
    Partial,
    Bad(Damage),
    Complete {
        len: u32,
        crc: u32,
    },
}

fn classify_header(h: &[u8], max: u32) -> Header {
    if h.is_empty() {
        return Header::Empty;
    }
    let k = h.len().min(4);
    if h[..k] != SYNC_BYTES[..k] {
        return Header::Bad(Damage::Sync);
    }
    if h.len() >= 8 {
        let len = le32(h, 4);
        if len > max {
            return Header::Bad(Damage::TooLong { len, max });
        }
    }
    if h.len() < 12 {
        return Header::Partial;
    }
    Header::Complete {
        len: le32(h, 4),
        crc: le32(h, 8),
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], mut at: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}

// ---------------------------------------------------------------------------------------------------------------
// Reading one segment file: shared by the reader and by the writer's recovery

/// What [`SegmentScan::probe`] found at an offset.
enum Probe {
    End,
    Valid(u32),
    Bad,
    /// The frame does not fit in the file (yet).
    Incomplete,
}

/// What [`SegmentScan::read_frame`] found at an offset.
enum FrameRead {
    End,
    Frame(Vec<u8>),
    Bad(Damage),
    Incomplete,
}

/// Outcome of resynchronisation.
enum Scan {
    /// A frame with a valid CRC starts here.
    Found(u64),
    /// None until the end of the file (`end`); `tail` is the first offset where a frame could still be being
    /// written (its visible bytes are a plausible beginning of a frame).
    NotFound { tail: Option<u64>, end: u64 },
}

/// One segment file read through a read-ahead window. Offsets are relative to the file.
#[derive(Debug)]
struct SegmentScan {
    file: File,
    /// Bytes at and past this offset are not part of the log (a later segment starts there).
    limit: Option<u64>,
    window: Vec<u8>,
    window_at: u64,
    /// [`SegmentScan::scan`] ends at the first [`ZERO_STOP`] zero bytes: the unwritten tail of the last,
    /// preallocated segment, which a live reader must not read through (megabytes) on every look.
    stop_at_zeros: bool,
}

/// A run of this many zero bytes ends a resynchronising scan of the last preallocated segment for a live reader.
const ZERO_STOP: usize = 4096;

impl SegmentScan {
    fn new(file: File, limit: Option<u64>) -> Self {
        Self {
            file,
            limit,
            window: Vec::new(),
            window_at: 0,
            stop_at_zeros: false,
        }
    }

    /// The (up to 12) bytes at `at` are present and all zero: no frame starts there in a preallocated segment.
    fn zeros_at(&mut self, at: u64) -> io::Result<bool> {
        let head = self.bytes(at, FRAME_HEADER_LEN as usize)?;
        Ok(!head.is_empty() && zero_run(head) == head.len())
    }

    fn invalidate(&mut self) {
        self.window.clear();
    }

    fn set_limit(&mut self, limit: u64) {
        self.limit = Some(limit);
        self.stop_at_zeros = false; // a complete segment is read to its end
        self.invalidate();
    }

    /// `n`, reduced so that `[at, at + n)` stays below the limit.
    fn clamp(&self, at: u64, n: usize) -> usize {
        match self.limit {
            Some(limit) => usize::try_from(limit.saturating_sub(at)).map_or(n, |room| room.min(n)),
            None => n,
        }
    }

    /// Length of the file as far as the log is concerned.
    fn len(&self) -> io::Result<u64> {
        let len = self.file.metadata()?.len();
        Ok(self.limit.map_or(len, |limit| len.min(limit)))
    }

    fn window_end(&self) -> u64 {
        self.window_at + self.window.len() as u64
    }

    fn fill(&mut self, at: u64, want: usize) -> io::Result<()> {
        let want = self.clamp(at, want);
        if self.window.capacity() > want.max(READ_AHEAD) * 2 {
            self.window = Vec::new(); // give back the buffer of a large frame
        }
        self.window.clear();
        self.window.resize(want, 0);
        self.window_at = at;
        match read_full_at(&self.file, &mut self.window, at) {
            Ok(got) => {
                self.window.truncate(got);
                Ok(())
            }
            Err(e) => {
                self.window.clear();
                Err(e)
            }
        }
    }

    /// The bytes `[at, at + n)`, fewer where the file (or the limit) ends first.
    fn bytes(&mut self, at: u64, n: usize) -> io::Result<&[u8]> {
        let n = self.clamp(at, n);
        let cached = self.window_at <= at && at.saturating_add(n as u64) <= self.window_end();
        let start = if cached {
            (at - self.window_at) as usize
        } else {
            self.fill(at, n.max(READ_AHEAD))?;
            0
        };
        let stop = (start + n).min(self.window.len());
        Ok(&self.window[start..stop])
    }

    /// Whatever the window holds from `at` on, refilled when fewer than 16 bytes of it are cached.
    fn chunk(&mut self, at: u64) -> io::Result<&[u8]> {
        let cached = self.window_at <= at && at.saturating_add(16) <= self.window_end();
        let start = if cached {
            (at - self.window_at) as usize
        } else {
            self.fill(at, READ_AHEAD)?;
            0
        };
        Ok(&self.window[start..])
    }

    /// Checks the frame at `at` without keeping its payload (streams the CRC through the window).
    fn probe(&mut self, at: u64, max: u32) -> io::Result<Probe> {
        let (len, crc) = match classify_header(self.bytes(at, 12)?, max) {
            Header::Empty => return Ok(Probe::End),
            Header::Partial => return Ok(Probe::Incomplete),
            Header::Bad(_) => return Ok(Probe::Bad),
            Header::Complete { len, crc } => (len, crc),
        };
        let body = at + FRAME_HEADER_LEN;
        let total = u64::from(len);
        if body + total > self.len()? {
            return Ok(Probe::Incomplete);
        }
        let mut acc = crc32c::crc32c(&len.to_le_bytes());
        let mut done = 0;
        while done < total {
            let want = (total - done).min(READ_AHEAD as u64) as usize;
            let part = self.bytes(body + done, want)?;
            if part.len() < want {
                return Ok(Probe::Incomplete);
            }
            acc = crc32c::crc32c_append(acc, part);
            done += want as u64;
        }
        Ok(if acc == crc {
            Probe::Valid(len)
        } else {
            Probe::Bad
        })
    }

    /// Reads and checks the frame at `at`. Allocates at most `12 + max` bytes.
    fn read_frame(&mut self, at: u64, max: u32) -> io::Result<FrameRead> {
        // The header and the payload are checked from one read; a second try covers a file that was cut and
        // rewritten between the read of the header and the read of the frame.
        for _ in 0..3 {
            let head = self.bytes(at, 12)?;
            let (len, crc) = match classify_header(head, max) {
                Header::Empty => return Ok(FrameRead::End),
                Header::Partial => return Ok(FrameRead::Incomplete),
                Header::Bad(damage) => return Ok(FrameRead::Bad(damage)),
                Header::Complete { len, crc } => (len, crc),
            };
            let total = FRAME_HEADER_LEN as usize + len as usize;
            let owned: Vec<u8>;
            let outcome = {
                let frame: &[u8] = if total <= READ_AHEAD {
                    self.bytes(at, total)?
                } else {
                    if at + total as u64 > self.len()? {
                        return Ok(FrameRead::Incomplete);
                    }
                    let mut buf = vec![0; total];
                    let got = read_full_at(&self.file, &mut buf, at)?;
                    buf.truncate(got);
                    owned = buf;
                    &owned
                };
                if frame.len() < total {
                    Some(FrameRead::Incomplete)
                } else if frame[..4] != SYNC_BYTES || le32(frame, 4) != len || le32(frame, 8) != crc
                {
                    None // changed under us
                } else if frame_crc(&frame[4..8], &frame[12..]) == crc {
                    Some(FrameRead::Frame(frame[12..].to_vec()))
                } else {
                    Some(FrameRead::Bad(Damage::Checksum))
                }
            };
            match outcome {
                Some(read) => return Ok(read),
                None => self.invalidate(),
            }
        }
        self.invalidate();
        Ok(FrameRead::Incomplete)
    }

    /// Resynchronises: the first offset at or after `from` where a frame with a valid CRC starts.
    fn scan(&mut self, from: u64, max: u32) -> io::Result<Scan> {
        let mut at = from;
        let mut tail = None;
        loop {
            let chunk = self.chunk(at)?;
            let n = chunk.len();
            if n < 4 {
                if tail.is_none() {
                    tail = (0..n)
                        .find(|&i| SYNC_BYTES.starts_with(&chunk[i..]))
                        .map(|i| at + i as u64);
                }
                return Ok(Scan::NotFound {
                    tail,
                    end: at + n as u64,
                });
            }
            let zeros = zero_run(chunk);
            if zeros > 0 {
                // Zeros hold no sync marker: skip them whole (a preallocated segment's tail is all zeros).
                if self.stop_at_zeros && zeros < ZERO_STOP && zeros == n {
                    // The window ends inside the run: look at the next ZERO_STOP bytes as a whole.
                    let ahead = self.bytes(at, ZERO_STOP)?;
                    if zero_run(ahead) == ahead.len() {
                        return Ok(Scan::NotFound { tail, end: at });
                    }
                } else if self.stop_at_zeros && zeros >= ZERO_STOP {
                    return Ok(Scan::NotFound { tail, end: at });
                }
                at += zeros as u64;
                continue;
            }
            let Some(i) = chunk.windows(4).position(|w| w == SYNC_BYTES) else {
                at += (n - 3) as u64;
                continue;
            };
            let candidate = at + i as u64;
            match self.probe(candidate, max)? {
                Probe::Valid(_) => return Ok(Scan::Found(candidate)),
                Probe::Incomplete => {
                    tail.get_or_insert(candidate);
                }
                Probe::Bad | Probe::End => {}
            }
            at = candidate + 1;
        }
    }
}

/// Where a reader asked to start at offset `target` begins: `target` itself when a valid frame starts there or
/// it lies in damage (reported from there on), else the end of the valid frame that contains it. Walks the
/// frames from the segment's first one only when no frame starts at `target`.
fn align(scan: &mut SegmentScan, target: u64, max: u32) -> io::Result<u64> {
    if matches!(scan.probe(target, max)?, Probe::Valid(_)) {
        return Ok(target);
    }
    let mut at = SEGMENT_HEADER_LEN;
    while at < target {
        match scan.probe(at, max)? {
            Probe::Valid(len) => at += FRAME_HEADER_LEN + u64::from(len),
            Probe::End | Probe::Incomplete => return Ok(target),
            Probe::Bad => match scan.scan(at + 1, max)? {
                Scan::Found(next) if next <= target => at = next,
                Scan::Found(_) | Scan::NotFound { .. } => return Ok(target),
            },
        }
    }
    Ok(at)
}

// ---------------------------------------------------------------------------------------------------------------
// Reader

/// Reads a log from a position, frame by frame, reporting damage; see the module docs for the rules.
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    max_frame_bytes: u32,
    strict_tail: bool,
    position: u64,
    current: Option<Current>,
}

/// The segment a reader is in.
#[derive(Debug)]
struct Current {
    base: u64,
    path: PathBuf,
    scan: SegmentScan,
    /// Base of the next segment, once one is known to exist.
    next: Option<u64>,
    /// The segment header was checked (or skipped: the reader started past it).
    header_done: bool,
    /// A preallocated segment ([`PREALLOCATED_VERSION`]): zeros where a frame should start end its written part.
    zero_tail: bool,
}

/// What one step of the reader produced.
enum Step {
    Item(Item),
    /// Nothing more now (the live end).
    Wait,
    /// State changed; step again.
    Again,
}

impl LogReader {
    /// A reader of the log in `dir` from the first frame at or after position `from` (a position an append
    /// returned, a cursor, [`LogReader::position`], or anything in between: a position inside a frame starts at
    /// the next one, a position inside damage reports the damage from there). Positions below the first
    /// segment (deleted by retention) start at the first segment. [`LogError::NotFound`] if `dir` is missing.
    pub fn open(dir: &Path, from: u64, max_frame_bytes: u32) -> Result<LogReader, LogError> {
        check_max_frame(max_frame_bytes)?;
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(LogError::Io {
                    op: "open log directory",
                    path: dir.to_path_buf(),
                    source: io::Error::from_raw_os_error(libc::ENOTDIR),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LogError::NotFound {
                    path: dir.to_path_buf(),
                })
            }
            Err(e) => return Err(io_error("open log directory", dir)(e)),
        }
        Ok(LogReader {
            dir: dir.to_path_buf(),
            max_frame_bytes,
            strict_tail: false,
            position: from.min(MAX_POSITION),
            current: None,
        })
    }

    /// With `true`, an incomplete frame (or segment header) at the end of the last segment is reported as
    /// truncated instead of waited for: for reading a log no writer is appending to.
    #[must_use]
    pub fn strict_tail(mut self, strict: bool) -> Self {
        self.strict_tail = strict;
        self
    }

    /// Position of the next frame to read.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next frame or damaged range; `None` at the current end (call again later for more).
    pub fn next_item(&mut self) -> Result<Option<Item>, LogError> {
        loop {
            if self.current.is_none() && !self.enter_segment()? {
                return Ok(None);
            }
            match self.step()? {
                Step::Item(item) => return Ok(Some(item)),
                Step::Wait => return Ok(None),
                Step::Again => {}
            }
        }
    }

    fn list(&self) -> Result<Vec<(u64, PathBuf)>, LogError> {
        list_segments(&self.dir).map_err(io_error("list", &self.dir))
    }

    /// Opens the segment holding the position; false when the log has no segment to read.
    fn enter_segment(&mut self) -> Result<bool, LogError> {
        loop {
            let segments = self.list()?;
            let Some(&(first, _)) = segments.first() else {
                return Ok(false);
            };
            self.position = self.position.max(first);
            let index = segments.partition_point(|s| s.0 <= self.position) - 1;
            let (base, path) = segments[index].clone();
            let next = segments.get(index + 1).map(|s| s.0);
            let file = match File::open(&path) {
                Ok(file) => file,
                // Deleted since the listing (retention): go past it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => match next {
                    Some(next) => {
                        self.position = self.position.max(next);
                        continue;
                    }
                    None => return Ok(false),
                },
                Err(e) => return Err(io_error("open segment", &path)(e)),
            };
            let header_done = if self.position == base {
                false
            } else {
                // Started inside the header of a segment: its frames start after it.
                self.position = self.position.max(base + SEGMENT_HEADER_LEN);
                true
            };
            let mut scan = SegmentScan::new(file, next.map(|n| n - base));
            let zero_tail = header_version(scan.bytes(0, 16).map_err(io_error("read", &path))?)
                == Some(PREALLOCATED_VERSION);
            scan.stop_at_zeros = zero_tail && next.is_none() && !self.strict_tail;
            if self.position > base + SEGMENT_HEADER_LEN {
                let at = align(&mut scan, self.position - base, self.max_frame_bytes)
                    .map_err(io_error("read", &path))?;
                self.position = base + at;
            }
            self.current = Some(Current {
                base,
                path,
                scan,
                next,
                header_done,
                zero_tail,
            });
            return Ok(true);
        }
    }

    fn step(&mut self) -> Result<Step, LogError> {
        let max = self.max_frame_bytes;
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        if !cur.header_done {
            return self.check_segment_header();
        }
        let at = self.position - cur.base;
        if cur.zero_tail && cur.scan.zeros_at(at).map_err(io_error("read", &cur.path))? {
            return self.zeroed(at);
        }
        let read = cur
            .scan
            .read_frame(at, max)
            .map_err(io_error("read", &cur.path))?;
        match read {
            FrameRead::Frame(payload) => {
                let position = self.position;
                self.position += FRAME_HEADER_LEN + payload.len() as u64;
                Ok(Step::Item(Item::Frame { position, payload }))
            }
            FrameRead::End => self.segment_end(),
            FrameRead::Bad(damage) => self.skip_damage(at, damage, false),
            FrameRead::Incomplete => self.skip_damage(at, Damage::Truncated, true),
        }
    }

    /// Looks for a segment after the current one; true when one was found just now (the current segment is
    /// then complete and gets a limit, so the caller should look again).
    fn discover_next(&mut self) -> Result<bool, LogError> {
        let Some(base) = self
            .current
            .as_ref()
            .filter(|c| c.next.is_none())
            .map(|c| c.base)
        else {
            return Ok(false);
        };
        let next = self.list()?.into_iter().map(|s| s.0).find(|&b| b > base);
        match (next, self.current.as_mut()) {
            (Some(next), Some(cur)) => {
                cur.next = Some(next);
                cur.scan.set_limit(next - base);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn check_segment_header(&mut self) -> Result<Step, LogError> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        let head = cur
            .scan
            .bytes(0, 16)
            .map_err(io_error("read", &cur.path))?
            .to_vec();
        if head.len() == 16 {
            cur.header_done = true;
            self.position = cur.base + SEGMENT_HEADER_LEN;
            if let Some(version) = header_version(&head) {
                cur.zero_tail = version == PREALLOCATED_VERSION;
                return Ok(Step::Again);
            }
            return Ok(Step::Item(Item::Corrupt(Corruption {
                segment: cur.path.clone(),
                position: cur.base,
                length: SEGMENT_HEADER_LEN,
                reason: "bad segment header".into(),
            })));
        }
        if self.discover_next()? {
            return Ok(Step::Again);
        }
        let strict = self.strict_tail;
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        if cur.next.is_none() && !strict {
            cur.scan.invalidate();
            return Ok(Step::Wait); // the writer is still creating it
        }
        cur.header_done = true;
        if head.is_empty() {
            return Ok(Step::Again); // the missing bytes are reported at the segment's end
        }
        self.position = cur.base + head.len() as u64;
        Ok(Step::Item(Item::Corrupt(Corruption {
            segment: cur.path.clone(),
            position: cur.base,
            length: head.len() as u64,
            reason: "truncated segment header".into(),
        })))
    }

    fn segment_end(&mut self) -> Result<Step, LogError> {
        if self.discover_next()? {
            return Ok(Step::Again); // look again: the segment was complete when the next one appeared
        }
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        let Some(next) = cur.next else {
            cur.scan.invalidate();
            return Ok(Step::Wait);
        };
        let (base, path) = (cur.base, cur.path.clone());
        self.current = None;
        if next > self.position {
            let position = self.position;
            self.position = next;
            // A segment deleted by retention while it was read ends early on purpose.
            if self.list()?.iter().any(|s| s.0 == base) {
                return Ok(Step::Item(Item::Corrupt(Corruption {
                    segment: path,
                    position,
                    length: next - position,
                    reason: format!("{} bytes missing before the next segment", next - position),
                })));
            }
        }
        Ok(Step::Again)
    }

    /// Zeros where a frame should start in a preallocated segment. In a complete segment (a later one exists)
    /// they are damage up to the next valid frame (the segment ends exactly where the next one starts). In the
    /// last one they are the unwritten tail: a live reader waits there; a strict one reports them only if a
    /// valid frame follows (frames written back without the ones before them, by a crash of the machine).
    fn zeroed(&mut self, at: u64) -> Result<Step, LogError> {
        if self.discover_next()? {
            return Ok(Step::Again);
        }
        let (max, strict) = (self.max_frame_bytes, self.strict_tail);
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        if cur.next.is_some() {
            return self.skip_damage(at, Damage::Zeroed, false);
        }
        if strict {
            let found = cur
                .scan
                .scan(at + 1, max)
                .map_err(io_error("read", &cur.path))?;
            if matches!(found, Scan::Found(_)) {
                return self.skip_damage(at, Damage::Zeroed, false);
            }
        }
        cur.scan.invalidate();
        Ok(Step::Wait)
    }

    fn skip_damage(&mut self, at: u64, damage: Damage, incomplete: bool) -> Result<Step, LogError> {
        if self.discover_next()? {
            return Ok(Step::Again);
        }
        let (max, strict) = (self.max_frame_bytes, self.strict_tail);
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        let live = cur.next.is_none() && !strict;
        // In the last preallocated segment the writer copies frames into a mapping, so a reader may see a frame
        // whose header is there and whose payload is not yet (a checksum mismatch, not only a short frame).
        let in_progress = incomplete || cur.zero_tail;
        if live && in_progress {
            cur.scan.invalidate(); // look at the file as it is now, not as the first read saw it
        }
        let found = cur
            .scan
            .scan(at + 1, max)
            .map_err(io_error("read", &cur.path))?;
        if live && in_progress && matches!(found, Scan::Found(_)) {
            // A frame after this one is there: either this one is damaged, or the writer's pwrite was half
            // visible to the first read and has gone on since (it writes in order, so whatever the scan saw
            // behind this frame was written after it). Read it again before calling it damaged.
            cur.scan.invalidate();
            let again = cur
                .scan
                .read_frame(at, max)
                .map_err(io_error("read", &cur.path))?;
            // Step again if it changed: complete now, or (what was short) found damaged, which is then reported.
            let changed = match again {
                FrameRead::Frame(_) => true,
                FrameRead::Incomplete => false,
                FrameRead::Bad(_) | FrameRead::End => incomplete,
            };
            if changed {
                return Ok(Step::Again);
            }
        }
        let stop = match found {
            Scan::Found(next) => next,
            Scan::NotFound { .. } if live && in_progress => {
                cur.scan.invalidate();
                return Ok(Step::Wait); // a frame still being written
            }
            Scan::NotFound {
                tail: Some(tail), ..
            } if live => tail,
            Scan::NotFound { end, .. } => end.max(at + 1),
        };
        let position = self.position;
        self.position = cur.base + stop;
        Ok(Step::Item(Item::Corrupt(Corruption {
            segment: cur.path.clone(),
            position,
            length: stop - at,
            reason: damage.describe(),
        })))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Writer

#[derive(Debug)]
struct ClosedSegment {
    base: u64,
    path: PathBuf,
    /// File length.
    len: u64,
}

#[derive(Debug)]
struct Active {
    base: u64,
    path: PathBuf,
    /// Shared with an fdatasync running outside the lock.
    file: Arc<File>,
    /// Bytes in the file: header plus whole frames.
    len: u64,
    /// File offset below which writeback was started (see [`Writer::start_writeback`]).
    writeback: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appended_frames: u64,
    appended_bytes: u64,
    writes: u64,
    fsyncs: u64,
    rolls: u64,
    deleted_segments: u64,
    deleted_bytes: u64,
}

#[derive(Debug)]
struct Writer {
    /// Holds the flock for the life of the log.
    _lock: File,
    closed: VecDeque<ClosedSegment>,
    active: Active,
    /// Whole frames not yet handed to be written; they follow the sealed buffers (and the write in flight).
    buf: Vec<u8>,
    /// Interval policy: full buffers waiting for the flusher thread to write them, oldest first. They follow the
    /// buffer being written outside the lock, if any; the first of them starts at `active.len` otherwise.
    sealed: VecDeque<Vec<u8>>,
    /// Bytes of the sealed buffers and of the one being written outside the lock.
    pending: u64,
    /// A buffer is being written outside the lock (see [`Shared::write_pending`]); other writes wait for it.
    writing: bool,
    /// Emptied buffers kept for reuse (a fresh 256 KiB allocation is page faults on first touch).
    spare: Vec<Vec<u8>>,
    /// Global position up to which the active segment was fsynced.
    synced: u64,
    failed: Option<String>,
    /// The flusher has work: a buffer was sealed for it to write, or enough was written since writeback last
    /// started for it to start it. Set under the lock and taken in the same hold by the caller, which wakes
    /// the flusher once it has let go of the writer.
    kick_due: bool,
    /// The policy is [`FsyncPolicy::Interval`]: there is a flusher thread to start writeback early and to write
    /// full buffers while the appender goes on.
    early_writeback: bool,
    counters: Counters,
}

impl Writer {
    fn written_end(&self) -> u64 {
        self.active.base + self.active.len
    }

    fn end(&self) -> u64 {
        self.written_end() + self.pending + self.buf.len() as u64
    }

    /// Frames were handed to the flusher and are not all in the file yet.
    fn has_pending(&self) -> bool {
        self.pending > 0
    }

    fn start(&self) -> u64 {
        self.closed.front().map_or(self.active.base, |s| s.base) + SEGMENT_HEADER_LEN
    }

    fn check(&self) -> Result<(), LogError> {
        match &self.failed {
            Some(reason) => Err(LogError::Failed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Writes the buffer at the end of the active segment in one positional write. Only with nothing pending
    /// (the buffer follows the pending frames): callers write those first with [`Shared::write_pending`].
    fn write_out(&mut self) -> Result<(), LogError> {
        debug_assert!(!self.has_pending() && !self.writing);
        if self.buf.is_empty() {
            return Ok(());
        }
        let at = self.active.len;
        let result = self.active.file.write_all_at(&self.buf, at);
        let written = self.buf.len() as u64;
        self.after_buffer_write(at, written, result)?;
        self.kick_due |= self.writeback_is_due();
        self.buf.clear();
        if self.buf.capacity() > 2 * WRITE_BUFFER_BYTES {
            self.buf = Vec::with_capacity(WRITE_BUFFER_BYTES); // after a large frame
        }
        Ok(())
    }

    /// Books the positional write of `len` bytes at `at` (the end of the active segment): moves the end on, or
    /// after a failure cuts back whatever part of it reached the file, so the next write follows the last
    /// whole frame.
    fn after_buffer_write(
        &mut self,
        at: u64,
        len: u64,
        result: io::Result<()>,
    ) -> Result<(), LogError> {
        match result {
            Ok(()) => {
                self.active.len += len;
                self.counters.writes += 1;
                Ok(())
            }
            Err(source) => {
                if let Err(cut) = self.active.file.set_len(at) {
                    self.failed.get_or_insert(format!(
                        "cannot cut {} back to {at} bytes after a failed write: {cut}",
                        self.active.path.display()
                    ));
                }
                Err(LogError::Io {
                    op: "write",
                    path: self.active.path.clone(),
                    source,
                })
            }
        }
    }

    /// Hands the full buffer to the flusher thread (to be written after what is already pending) and starts a
    /// fresh one.
    fn seal(&mut self) {
        let fresh = self.spare.pop().unwrap_or_else(take_buffer);
        let full = std::mem::replace(&mut self.buf, fresh);
        self.pending += full.len() as u64;
        self.sealed.push_back(full);
        self.kick_due = true;
    }

    /// Keeps an emptied buffer for [`Writer::seal`] (a few of them, and none grown by a large frame).
    fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < 2 && buf.capacity() <= 2 * WRITE_BUFFER_BYTES {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Enough was written since writeback last started for the flusher to start it.
    fn writeback_is_due(&self) -> bool {
        self.early_writeback && self.active.len >= self.active.writeback + WRITEBACK_BYTES
    }

    /// Takes the range of whole pages written since writeback last started, when it is worth starting now.
    fn take_writeback(&mut self) -> Option<(Arc<File>, u64, u64)> {
        let upto = self.active.len & !(PAGE_BYTES - 1);
        let from = self.active.writeback;
        if upto <= from {
            return None;
        }
        self.active.writeback = upto;
        Some((Arc::clone(&self.active.file), from, upto))
    }

    /// fdatasync of the active segment under the lock (used when rolling).
    fn sync_active(&mut self) -> Result<(), LogError> {
        match self.active.file.sync_data() {
            Ok(()) => {
                self.synced = self.synced.max(self.written_end());
                self.counters.fsyncs += 1;
                Ok(())
            }
            Err(source) => Err(self.fsync_failed(self.active.path.clone(), source)),
        }
    }

    fn fsync_failed(&mut self, path: PathBuf, source: io::Error) -> LogError {
        let error = LogError::Io {
            op: "fsync",
            path,
            source,
        };
        self.failed.get_or_insert(error.to_string());
        error
    }

    /// Closes the active segment and starts the next one at the current end. Only with nothing pending.
    fn roll(&mut self, dir: &Path, fsync: bool) -> Result<(), LogError> {
        self.write_out()?;
        if fsync {
            self.sync_active()?;
        }
        let active = create_segment(dir, self.written_end(), fsync)?;
        if fsync {
            self.synced = active.base + active.len;
        }
        let old = std::mem::replace(&mut self.active, active);
        self.closed.push_back(ClosedSegment {
            base: old.base,
            path: old.path,
            len: old.len,
        });
        self.counters.rolls += 1;
        Ok(())
    }

    /// The frame of `payload` does not fit in the buffer: the buffer goes to be written first.
    fn fills_buffer(&self, payload: &[u8]) -> bool {
        let frame = FRAME_HEADER_LEN + payload.len() as u64;
        !self.buf.is_empty() && self.buf.len() as u64 + frame > WRITE_BUFFER_BYTES as u64
    }

    /// The frame of `payload` does not fit in the active segment: it must go to a new one.
    fn must_roll(&self, payload: &[u8], config: &LogConfig) -> bool {
        let frame = FRAME_HEADER_LEN + payload.len() as u64;
        let size = self.active.len + self.pending + self.buf.len() as u64;
        size > SEGMENT_HEADER_LEN && size + frame > config.segment_bytes
    }

    /// Appends one frame to the buffer. Only with nothing pending when it must roll (see [`Log::append`]).
    fn append_one(
        &mut self,
        payload: &[u8],
        dir: &Path,
        config: &LogConfig,
    ) -> Result<u64, LogError> {
        if self.must_roll(payload, config) {
            self.roll(dir, config.fsyncs())?;
        }
        if self.fills_buffer(payload) {
            if self.early_writeback {
                self.seal();
            } else {
                self.write_out()?;
            }
        }
        let position = self.end();
        push_frame(&mut self.buf, payload);
        self.counters.appended_frames += 1;
        self.counters.appended_bytes += payload.len() as u64;
        Ok(position)
    }

    /// Deletes the oldest closed segment; returns its size.
    fn delete_oldest(&mut self) -> Result<u64, LogError> {
        let Some(oldest) = self.closed.front() else {
            return Ok(0);
        };
        match fs::remove_file(&oldest.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("delete segment", &oldest.path)(e)),
        }
        let len = oldest.len;
        self.closed.pop_front();
        self.counters.deleted_segments += 1;
        self.counters.deleted_bytes += len;
        Ok(len)
    }

    /// Base of the segment after the oldest closed one (all of the oldest one's frames are below it).
    fn second_base(&self) -> u64 {
        self.closed.get(1).map_or(self.active.base, |s| s.base)
    }
}

impl Drop for Writer {
    /// Leaves the emptied buffers to the next log (whatever is still in them was never written: the log
    /// failed, or was dropped without a flush that succeeded).
    fn drop(&mut self) {
        give_buffer(std::mem::take(&mut self.buf));
        for buf in self.spare.drain(..) {
            give_buffer(buf);
        }
    }
}

/// Write buffers of closed logs, for the next log this process opens. Each log keeps up to three buffers in
/// use under [`FsyncPolicy::Interval`]; taking them from here instead of the allocator means a log opened
/// after another closed starts without page faults on fresh buffers, and closing one without unmapping them.
static BUFFER_POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty write buffer: a pooled one, or a new one.
fn take_buffer() -> Vec<u8> {
    lock(&BUFFER_POOL)
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(WRITE_BUFFER_BYTES))
}

/// Keeps an emptied write buffer for [`take_buffer`] (up to [`POOLED_BUFFERS`], none grown by a large frame).
fn give_buffer(mut buf: Vec<u8>) {
    if (WRITE_BUFFER_BYTES..=2 * WRITE_BUFFER_BYTES).contains(&buf.capacity()) {
        buf.clear();
        let mut pool = lock(&BUFFER_POOL);
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    }
}

/// Creates the segment starting at global position `base`, header written (and fsynced with its directory
/// entry when `fsync`). On failure the file is removed and the error returned.
fn create_segment(dir: &Path, base: u64, fsync: bool) -> Result<Active, LogError> {
    let path = segment_path(dir, base);
    let made = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_error("create segment", &path))
        .and_then(|file| {
            file.write_all_at(&segment_header(), 0)
                .map_err(io_error("write segment header", &path))?;
            if fsync {
                file.sync_data().map_err(io_error("fsync", &path))?;
                sync_dir(dir)?;
            }
            Ok(file)
        });
    match made {
        Ok(file) => Ok(Active {
            base,
            path,
            file: Arc::new(file),
            len: SEGMENT_HEADER_LEN,
            writeback: 0,
        }),
        Err(e) => {
            let _ = fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Creates the leaf directory 0700 (and its parents as usual) when missing; leaves an existing one as it is.
fn ensure_dir(dir: &Path) -> Result<(), LogError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(LogError::Io {
                op: "open log directory",
                path: dir.to_path_buf(),
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("open log directory", dir)(e)),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_error("create directory", parent))?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        // The umask may have taken bits away; 0700 is what the log wants.
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_error("chmod directory", dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io_error("create directory", dir)(e)),
    }
}

/// Takes `<dir>/LOCK` and writes our pid into it.
fn take_lock(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_error("open lock file", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let pid = (&file)
                .take(32)
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(LogError::Locked {
                path: dir.to_path_buf(),
                pid,
            });
        }
        Err(TryLockError::Error(e)) => return Err(io_error("lock", &path)(e)),
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
        .map_err(io_error("write lock file", &path))?;
    Ok(file)
}

/// Walks the frames of a segment from its first one, resynchronising over damage; returns the end of the last
/// valid frame, the valid frames and the damaged ranges found before it. Checks frames by CRC alone.
fn validate_frames(scan: &mut SegmentScan) -> io::Result<(u64, u64, u64)> {
    let mut at = SEGMENT_HEADER_LEN;
    let (mut good_end, mut frames, mut damaged) = (at, 0, 0);
    loop {
        match scan.probe(at, u32::MAX)? {
            Probe::End => break,
            Probe::Valid(len) => {
                at += FRAME_HEADER_LEN + u64::from(len);
                good_end = at;
                frames += 1;
            }
            Probe::Bad | Probe::Incomplete => match scan.scan(at + 1, u32::MAX)? {
                Scan::Found(next) => {
                    damaged += 1;
                    at = next;
                }
                Scan::NotFound { .. } => break,
            },
        }
    }
    Ok((good_end, frames, damaged))
}

/// The last segment after recovery.
enum Tail {
    Active(Active),
    /// Its header is damaged and it holds frames: left for readers; a new segment starts after its `len` bytes.
    Abandoned {
        len: u64,
    },
}

fn recover_last(
    base: u64,
    path: PathBuf,
    fsync: bool,
    recovery: &mut Recovery,
) -> Result<Tail, LogError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_error("open segment", &path))?;
    let len = file.metadata().map_err(io_error("stat", &path))?.len();
    let mut scan = SegmentScan::new(
        file.try_clone().map_err(io_error("open segment", &path))?,
        None,
    );
    recovery.segment = Some(path.clone());
    let head = scan.bytes(0, 16).map_err(io_error("read", &path))?.to_vec();
    if head != segment_header() {
        if len > SEGMENT_HEADER_LEN {
            recovery.position = base + len;
            recovery.reason = Some(format!(
                "damaged header in {}: left for readers, a new segment starts at {}",
                path.display(),
                base + len
            ));
            return Ok(Tail::Abandoned { len });
        }
        file.set_len(0)
            .and_then(|()| file.write_all_at(&segment_header(), 0))
            .and_then(|()| if fsync { file.sync_data() } else { Ok(()) })
            .map_err(io_error("rewrite segment header", &path))?;
        recovery.position = base + SEGMENT_HEADER_LEN;
        recovery.reason = Some(format!(
            "rewrote the {len}-byte header of {}",
            path.display()
        ));
        return Ok(Tail::Active(Active {
            base,
            path,
            file: Arc::new(file),
            len: SEGMENT_HEADER_LEN,
            writeback: 0,
        }));
    }
    let (good_end, frames, damaged) =
        validate_frames(&mut scan).map_err(io_error("read", &path))?;
    recovery.frames = frames;
    recovery.damaged_ranges = damaged;
    recovery.position = base + good_end;
    let mut notes = Vec::new();
    if good_end < len {
        file.set_len(good_end)
            .and_then(|()| if fsync { file.sync_data() } else { Ok(()) })
            .map_err(io_error("truncate torn tail of", &path))?;
        recovery.truncated_bytes = len - good_end;
        notes.push(format!(
            "cut a torn or damaged tail of {} bytes at position {}",
            len - good_end,
            base + good_end
        ));
    }
    if damaged > 0 {
        notes.push(format!(
            "{damaged} damaged ranges before the last valid frame left for readers"
        ));
    }
    if !notes.is_empty() {
        recovery.reason = Some(format!("{}: {}", path.display(), notes.join("; ")));
    }
    Ok(Tail::Active(Active {
        base,
        path,
        file: Arc::new(file),
        len: good_end,
        writeback: good_end,
    }))
}

/// State shared by the [`Log`] handle and its flusher thread.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    config: LogConfig,
    writer: Mutex<Writer>,
    /// Serialises cursor writes (they share temporary names).
    cursors: Mutex<()>,
    flusher: Mutex<FlusherControl>,
    wake: Condvar,
    /// With `writer`: a write outside the lock ended (see [`Shared::write_pending`]).
    written: Condvar,
}

/// What the flusher thread is asked to do besides its periodic sync.
#[derive(Debug, Default)]
struct FlusherControl {
    stop: bool,
    /// Write the sealed buffers, and start writeback of what was written (see [`WRITEBACK_BYTES`]).
    work: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Writes the sealed buffers in order, each in one positional write outside the lock, after the write
    /// another thread has in flight; then the buffer too when `all` (under the lock). Returns the guard with
    /// the first error, the failed buffer kept in front of the others with its frames' positions.
    fn write_pending<'a>(
        &'a self,
        mut w: MutexGuard<'a, Writer>,
        all: bool,
    ) -> (MutexGuard<'a, Writer>, Result<(), LogError>) {
        loop {
            if let Err(failed) = w.check() {
                return (w, Err(failed));
            }
            if w.writing {
                w = self.written.wait(w).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let Some(buf) = w.sealed.pop_front() else {
                break;
            };
            // Nothing moves the end of the active segment or rolls it while `writing` and `pending` say a
            // buffer is on its way there.
            w.writing = true;
            let (file, at) = (Arc::clone(&w.active.file), w.active.len);
            drop(w);
            let result = file.write_all_at(&buf, at);
            w = lock(&self.writer);
            w.writing = false;
            let len = buf.len() as u64;
            let booked = w.after_buffer_write(at, len, result);
            if booked.is_ok() {
                w.pending -= len;
                w.recycle(buf);
            } else {
                w.sealed.push_front(buf);
            }
            self.written.notify_all();
            if let Err(error) = booked {
                return (w, Err(error));
            }
        }
        let result = if all { w.write_out() } else { Ok(()) };
        (w, result)
    }

    /// The flusher's part of an append burst: writes the sealed buffers, then starts writeback when enough was
    /// written. A failed write is left for the next flush to retry and report.
    fn background_work(&self) {
        let (w, _) = self.write_pending(lock(&self.writer), false);
        let due = w.writeback_is_due();
        drop(w);
        if due {
            self.start_writeback();
        }
    }

    /// Flushes, then fdatasyncs the active segment outside the lock when anything is unsynced.
    fn sync_now(&self) -> Result<(), LogError> {
        let (file, path, upto) = {
            let w = lock(&self.writer);
            w.check()?;
            let (mut w, written) = self.write_pending(w, true);
            written?;
            // The fdatasync below writes back everything written so far.
            w.kick_due = false;
            w.active.writeback = w.active.writeback.max(w.active.len & !(PAGE_BYTES - 1));
            let upto = w.written_end();
            if w.synced >= upto {
                return Ok(());
            }
            (Arc::clone(&w.active.file), w.active.path.clone(), upto)
        };
        let result = file.sync_data();
        let mut w = lock(&self.writer);
        match result {
            Ok(()) => {
                w.synced = w.synced.max(upto);
                w.counters.fsyncs += 1;
                Ok(())
            }
            Err(source) => Err(w.fsync_failed(path, source)),
        }
    }

    /// Asks the flusher thread (if any) to write the sealed buffers and start writeback of what was written.
    fn kick(&self) {
        lock(&self.flusher).work = true;
        self.wake.notify_one();
    }

    /// Starts writeback of the whole pages written since it last started, without waiting for it (a hint to
    /// the kernel: errors are the next fdatasync's to report).
    fn start_writeback(&self) {
        let Some((file, from, upto)) = lock(&self.writer).take_writeback() else {
            return;
        };
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let (Ok(offset), Ok(bytes)) = (i64::try_from(from), i64::try_from(upto - from)) else {
                return;
            };
            // SAFETY: `file` is open for as long as the Arc lives; the call reads only its arguments.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), offset, bytes, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (file, from, upto);
    }

    fn flusher(&self, every: Duration) {
        let mut next_sync = Instant::now() + every;
        let mut control = lock(&self.flusher);
        loop {
            if control.stop {
                return;
            }
            if std::mem::take(&mut control.work) {
                drop(control);
                self.background_work();
            } else {
                let now = Instant::now();
                if now < next_sync {
                    control = self
                        .wake
                        .wait_timeout(control, next_sync - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    continue;
                }
                drop(control);
                // A failed write is retried on the next tick and reported by the next call; a failed fsync
                // marks the writer failed, which every later call reports.
                let _ = self.sync_now();
                next_sync = Instant::now() + every;
            }
            control = lock(&self.flusher);
        }
    }
}

/// The one writer of a log directory; see the module docs. `Send + Sync`: share it behind an `Arc`.
#[derive(Debug)]
pub struct Log {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
    shut: bool,
}

impl Log {
    /// Opens a log that this process replays from the cursor `cursor` (the spill, the WAL): the log, and the
    /// position replay resumes at (the cursor, or the oldest retained frame).
    pub fn open_resuming(
        dir: &Path,
        segment_bytes: u64,
        fsync: FsyncPolicy,
        max_frame_bytes: u32,
        cursor: &str,
    ) -> Result<(Log, u64), LogError> {
        let config = LogConfig {
            segment_bytes,
            fsync,
            retention_bytes: None,
            retention_age: None,
            max_frame_bytes,
        };
        let (log, _recovery) = Log::open(dir, config)?;
        let from = log.cursor(cursor)?.unwrap_or(0).max(log.start());
        Ok((log, from))
    }

    /// Opens (or creates) the log in `dir`: takes the lock, validates the active segment (cutting a torn tail)
    /// and starts the flusher thread for [`FsyncPolicy::Interval`].
    pub fn open(dir: &Path, config: LogConfig) -> Result<(Log, Recovery), LogError> {
        config.validate()?;
        ensure_dir(dir)?;
        let lock_file = take_lock(dir)?;
        let fsync = config.fsyncs();
        let mut listed = list_segments(dir).map_err(io_error("list", dir))?;
        let last = listed.pop();
        let mut closed = VecDeque::with_capacity(listed.len());
        for (base, path) in listed {
            let len = fs::metadata(&path).map_err(io_error("stat", &path))?.len();
            closed.push_back(ClosedSegment { base, path, len });
        }
        let mut recovery = Recovery::default();
        let active = match last {
            None => create_segment(dir, 0, fsync)?,
            Some((base, path)) => match recover_last(base, path.clone(), fsync, &mut recovery)? {
                Tail::Active(active) => active,
                Tail::Abandoned { len } => {
                    closed.push_back(ClosedSegment { base, path, len });
                    create_segment(dir, base + len, fsync)?
                }
            },
        };
        if recovery.segment.is_none() {
            recovery.position = active.base + active.len;
        }
        let writer = Writer {
            _lock: lock_file,
            closed,
            synced: active.base + active.len,
            active,
            buf: take_buffer(),
            sealed: VecDeque::new(),
            pending: 0,
            writing: false,
            spare: Vec::new(),
            failed: None,
            kick_due: false,
            early_writeback: matches!(config.fsync, FsyncPolicy::Interval(_)),
            counters: Counters::default(),
        };
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            config,
            writer: Mutex::new(writer),
            cursors: Mutex::new(()),
            flusher: Mutex::new(FlusherControl::default()),
            wake: Condvar::new(),
            written: Condvar::new(),
        });
        let flusher = match shared.config.fsync {
            FsyncPolicy::Interval(every) => {
                let for_thread = Arc::clone(&shared);
                let handle = thread::Builder::new()
                    .name(FLUSHER_NAME.into())
                    .spawn(move || for_thread.flusher(every))
                    .map_err(io_error("start the flusher thread for", dir))?;
                Some(handle)
            }
            FsyncPolicy::Always | FsyncPolicy::Never => None,
        };
        Ok((
            Log {
                shared,
                flusher,
                shut: false,
            },
            recovery,
        ))
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        lock(&self.shared.writer)
    }

    fn check_size(&self, payload: &[u8]) -> Result<(), LogError> {
        let max = self.shared.config.max_frame_bytes;
        if payload.len() > max as usize {
            return Err(LogError::FrameTooLarge {
                size: payload.len(),
                max,
            });
        }
        Ok(())
    }

    /// Appends one frame to the buffer; returns its position. Written on the next flush (or when the buffer
    /// fills), durable after the commit the policy calls for.
    pub fn append(&self, payload: &[u8]) -> Result<u64, LogError> {
        self.check_size(payload)?;
        let w = self.writer();
        w.check()?;
        let (w, position) = self.append_locked(w, payload);
        self.after_write(w);
        position
    }

    /// Appends one frame. Before it, writes what is pending (after the flusher's write in flight) when the
    /// frame must go to a new segment, or when it fills the buffer while the last sealed one still waits for
    /// the flusher (it is behind or gets no CPU; or its write failed: this append then reports the failure
    /// and is not appended). So at most one sealed buffer waits.
    #[inline]
    fn append_locked<'a>(
        &'a self,
        mut w: MutexGuard<'a, Writer>,
        payload: &[u8],
    ) -> (MutexGuard<'a, Writer>, Result<u64, LogError>) {
        let config = &self.shared.config;
        if w.has_pending()
            && (w.must_roll(payload, config) || (!w.sealed.is_empty() && w.fills_buffer(payload)))
        {
            let (again, written) = self.shared.write_pending(w, false);
            w = again;
            // What this thread wrote in the flusher's place needs writeback started as well.
            w.kick_due |= w.writeback_is_due();
            if let Err(error) = written {
                return (w, Err(error));
            }
        }
        let position = w.append_one(payload, &self.shared.dir, config);
        (w, position)
    }

    /// Wakes the flusher when a buffer was sealed for it to write, or a buffer write left enough for it to
    /// start writeback of (after the writer's lock is released, so the flusher does not wait for it).
    #[inline]
    fn after_write(&self, mut w: MutexGuard<'_, Writer>) {
        if w.kick_due {
            w.kick_due = false;
            drop(w);
            self.shared.kick();
        }
    }

    /// Appends several frames under one lock; returns their positions. On an error the payloads before the
    /// failing one stay appended (a roll or a buffer write failed between them); sizes are checked first.
    pub fn append_many<P: AsRef<[u8]>>(&self, payloads: &[P]) -> Result<Vec<u64>, LogError> {
        for payload in payloads {
            self.check_size(payload.as_ref())?;
        }
        let mut w = self.writer();
        w.check()?;
        let mut positions = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let (again, position) = self.append_locked(w, payload.as_ref());
            w = again;
            match position {
                Ok(position) => positions.push(position),
                Err(error) => {
                    self.after_write(w);
                    return Err(error);
                }
            }
        }
        self.after_write(w);
        Ok(positions)
    }

    /// Writes the buffered frames to the kernel: they survive a crash of this process (not of the machine).
    pub fn flush(&self) -> Result<(), LogError> {
        let w = self.writer();
        w.check()?;
        let (w, written) = self.shared.write_pending(w, true);
        self.after_write(w);
        written
    }

    /// Flushes, then fsyncs as the policy says: `Always` now, `Interval` within the interval (the flusher),
    /// `Never` not at all.
    pub fn commit(&self) -> Result<(), LogError> {
        match self.shared.config.fsync {
            FsyncPolicy::Always => self.shared.sync_now(),
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => self.flush(),
        }
    }

    /// Flushes and fdatasyncs now, whatever the policy.
    pub fn sync(&self) -> Result<(), LogError> {
        self.shared.sync_now()
    }

    /// Position of the oldest retained segment's first frame.
    pub fn start(&self) -> u64 {
        self.writer().start()
    }

    /// Position the next frame will get.
    pub fn end(&self) -> u64 {
        self.writer().end()
    }

    /// The position saved under `name`, `None` if never set; [`LogError::CorruptCursor`] if the file is damaged.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>, LogError> {
        read_cursor(&self.shared.dir, name)
    }

    /// Saves `position` under `name` atomically (temporary file, fsync, rename, fsync of the directory; the
    /// fsyncs are skipped under [`FsyncPolicy::Never`]).
    pub fn set_cursor(&self, name: &str, position: u64) -> Result<(), LogError> {
        let _serial = lock(&self.shared.cursors);
        write_cursor(
            &self.shared.dir,
            name,
            position,
            self.shared.config.fsyncs(),
        )
    }

    /// Deletes the closed segments (oldest first) whose every frame is below `position`; never the active
    /// one. Returns the bytes freed.
    pub fn delete_before(&self, position: u64) -> Result<u64, LogError> {
        let mut w = self.writer();
        let mut freed = 0;
        let mut deleted = false;
        while !w.closed.is_empty() && w.second_base() <= position {
            freed += w.delete_oldest()?;
            deleted = true;
        }
        if deleted && self.shared.config.fsyncs() {
            sync_dir(&self.shared.dir)?;
        }
        Ok(freed)
    }

    /// Deletes the oldest closed segments while the log is larger than `retention_bytes` or while the oldest
    /// was last modified longer than `retention_age` ago; never the active one. Returns the bytes freed.
    pub fn enforce_retention(&self) -> Result<u64, LogError> {
        let config = &self.shared.config;
        let mut w = self.writer();
        let mut freed = 0;
        let mut deleted = false;
        if let Some(max) = config.retention_bytes {
            let mut total: u64 = w.closed.iter().map(|s| s.len).sum::<u64>() + w.active.len;
            while total > max && !w.closed.is_empty() {
                let len = w.delete_oldest()?;
                total -= len;
                freed += len;
                deleted = true;
            }
        }
        if let Some(age) = config.retention_age {
            let now = SystemTime::now();
            while let Some(oldest) = w.closed.front() {
                let modified = match fs::metadata(&oldest.path).and_then(|m| m.modified()) {
                    Ok(modified) => modified,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => SystemTime::UNIX_EPOCH,
                    Err(e) => return Err(io_error("stat", &oldest.path)(e)),
                };
                if now.duration_since(modified).unwrap_or_default() < age {
                    break;
                }
                freed += w.delete_oldest()?;
                deleted = true;
            }
        }
        if deleted && config.fsyncs() {
            sync_dir(&self.shared.dir)?;
        }
        Ok(freed)
    }

    pub fn stats(&self) -> LogStats {
        let w = self.writer();
        LogStats {
            segments: w.closed.len() as u64 + 1,
            disk_bytes: w.closed.iter().map(|s| s.len).sum::<u64>() + w.active.len,
            buffered_bytes: w.pending + w.buf.len() as u64,
            start: w.start(),
            end: w.end(),
            synced: w.synced,
            appended_frames: w.counters.appended_frames,
            appended_bytes: w.counters.appended_bytes,
            writes: w.counters.writes,
            fsyncs: w.counters.fsyncs,
            rolls: w.counters.rolls,
            deleted_segments: w.counters.deleted_segments,
            deleted_bytes: w.counters.deleted_bytes,
            failed: w.failed.is_some(),
        }
    }

    /// Flushes, fsyncs unless the policy is `Never`, stops the flusher and releases the lock.
    pub fn close(mut self) -> Result<(), LogError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), LogError> {
        if std::mem::replace(&mut self.shut, true) {
            return Ok(());
        }
        lock(&self.shared.flusher).stop = true;
        self.shared.wake.notify_all();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
        if self.shared.config.fsyncs() {
            self.shared.sync_now()
        } else {
            self.flush()
        }
    }
}

impl Drop for Log {
    /// Best effort: flushes (and fsyncs unless `Never`), stops the flusher; the lock goes with the last handle.
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn cursor_path(log_dir: &Path, name: &str) -> Result<PathBuf, LogError> {
    if valid_cursor_name(name) {
        Ok(log_dir.join(CURSOR_DIR).join(name))
    } else {
        Err(LogError::InvalidName {
            name: name.to_owned(),
        })
    }
}

/// The position saved under `name` in the log in `log_dir`, `None` if never set.
fn read_cursor(log_dir: &Path, name: &str) -> Result<Option<u64>, LogError> {
    let path = cursor_path(log_dir, name)?;
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("open cursor", &path)(e)),
    };
    let mut bytes = Vec::with_capacity(CURSOR_LEN + 1);
    file.take(CURSOR_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error("read cursor", &path))?;
    decode_cursor(&bytes)
        .map(Some)
        .map_err(|reason| LogError::CorruptCursor { path, reason })
}

/// Saves `position` under `name` in the log in `log_dir` atomically (temporary file, fsync, rename, fsync of the
/// directory; the fsyncs only with `fsync`). Callers serialise the writes of one log (they share temporary names).
fn write_cursor(log_dir: &Path, name: &str, position: u64, fsync: bool) -> Result<(), LogError> {
    let path = cursor_path(log_dir, name)?;
    let dir = log_dir.join(CURSOR_DIR);
    match DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(io_error("chmod directory", &dir))?;
            if fsync {
                sync_dir(log_dir)?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("create directory", &dir)(e)),
    }
    let tmp = dir.join(format!("{name}.tmp"));
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|file| {
            file.write_all_at(&encode_cursor(position), 0)?;
            if fsync {
                file.sync_data()?;
            }
            Ok(())
        })
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("write cursor", &path)(e));
    }
    if fsync {
        sync_dir(&dir)?;
    }
    Ok(())
}

fn valid_cursor_name(name: &str) -> bool {
    (1..=MAX_CURSOR_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && name != "."
        && name != ".."
        && name.strip_suffix(".tmp").is_none() // set_cursor writes `<name>.tmp` next to the cursor
}

fn encode_cursor(position: u64) -> [u8; CURSOR_LEN] {
    let mut out = [0u8; CURSOR_LEN];
    let position = position.to_le_bytes();
    out[..8].copy_from_slice(&position);
    out[8..].copy_from_slice(&crc32c::crc32c(&position).to_le_bytes());
    out
}

fn decode_cursor(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() != CURSOR_LEN {
        return Err(format!("{} bytes instead of {CURSOR_LEN}", bytes.len()));
    }
    if crc32c::crc32c(&bytes[..8]) != le32(bytes, 8) {
        return Err("checksum mismatch".into());
    }
    let mut position = [0u8; 8];
    position.copy_from_slice(&bytes[..8]);
    Ok(u64::from_le_bytes(position))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_reject_others() {
        let dir = Path::new("/x");
        for base in [0, 16, 123_456, MAX_POSITION - 1] {
            let path = segment_path(dir, base);
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(name.len(), 24);
            assert_eq!(parse_segment_name(name), Some(base));
        }
        for bad in [
            "1.seg",
            "0000000000000000001a.seg",
            "00000000000000000016.seg.tmp",
            "99999999999999999999.seg", // above u64::MAX
            "18446744073709551615.seg", // above MAX_POSITION
            "00000000000000000016",
            "LOCK",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn frame_header_classification() {
        let mut frame = Vec::new();
        push_frame(&mut frame, b"hello");
        assert_eq!(frame.len(), 12 + 5);
        assert!(matches!(
            classify_header(&frame, 16),
            Header::Complete { len: 5, .. }
        ));
        assert!(matches!(classify_header(&[], 16), Header::Empty));
        for cut in 1..12 {
            assert!(
                matches!(classify_header(&frame[..cut], 16), Header::Partial),
                "{cut}"
            );
        }
        assert!(matches!(
            classify_header(&frame, 4),
            Header::Bad(Damage::TooLong { len: 5, max: 4 })
        ));
        assert!(matches!(
            classify_header(&frame[..9], 4),
            Header::Bad(Damage::TooLong { .. })
        ));
        let mut bad = frame.clone();
        bad[0] ^= 1;
        assert!(matches!(
            classify_header(&bad, 16),
            Header::Bad(Damage::Sync)
        ));
        assert!(matches!(
            classify_header(&bad[..1], 16),
            Header::Bad(Damage::Sync)
        ));
        // The CRC covers the length bytes and the payload.
        assert_eq!(
            le32(&frame, 8),
            crc32c::crc32c(&[5, 0, 0, 0, b'h', b'e', b'l', b'l', b'o'])
        );
    }

    #[test]
    fn interval_flusher_starts_writeback_of_whole_pages_written() {
        let payload = [7u8; 1000];
        for (fsync, expect_writeback) in [
            (FsyncPolicy::Interval(Duration::from_secs(3600)), true),
            (FsyncPolicy::Never, false),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let config = LogConfig {
                fsync,
                ..LogConfig::default()
            };
            let (log, _) = Log::open(tmp.path(), config).unwrap();
            for _ in 0..(2 * WRITEBACK_BYTES as usize / payload.len()) {
                log.append(&payload).unwrap();
            }
            log.commit().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let started = loop {
                let (started, len) = {
                    let w = log.writer();
                    (w.active.writeback, w.active.len)
                };
                assert!(
                    started <= len && started % PAGE_BYTES == 0,
                    "{started} of {len}"
                );
                if started >= WRITEBACK_BYTES || Instant::now() > deadline || !expect_writeback {
                    break started;
                }
                thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(
                started >= WRITEBACK_BYTES,
                expect_writeback,
                "{fsync:?}: {started}"
            );
            // It is no fsync: none happened (the interval is an hour away).
            assert_eq!(log.stats().fsyncs, 0, "{fsync:?}");
            log.close().unwrap();
        }
    }

    #[test]
    fn cursor_encoding_round_trips_and_detects_damage() {
        for position in [0, 16, u64::MAX] {
            assert_eq!(decode_cursor(&encode_cursor(position)), Ok(position));
        }
        let good = encode_cursor(4242);
        for i in 0..CURSOR_LEN {
            let mut bad = good;
            bad[i] ^= 0x10;
            assert!(decode_cursor(&bad).is_err(), "flip in byte {i}");
        }
        assert!(decode_cursor(&good[..11]).is_err());
        assert!(decode_cursor(&[good.as_slice(), &[0]].concat()).is_err());
    }

    #[test]
    fn cursor_names() {
        for good in [
            "a",
            "dlq-consumer_1.v2",
            &"x".repeat(MAX_CURSOR_NAME),
            "...",
            ".a",
        ] {
            assert!(valid_cursor_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            "x.tmp",
            &"x".repeat(MAX_CURSOR_NAME + 1),
            "a\0",
        ] {
            assert!(!valid_cursor_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn config_validation_names_the_field() {
        assert!(LogConfig::default().validate().is_ok());
        let cases = [
            (
                LogConfig {
                    segment_bytes: MIN_SEGMENT_BYTES - 1,
                    ..LogConfig::default()
                },
                "segment_bytes",
            ),
            (
                LogConfig {
                    segment_bytes: MAX_SEGMENT_BYTES + 1,
                    ..LogConfig::default()
                },
                "segment_bytes",
            ),
            (
                LogConfig {
                    max_frame_bytes: 0,
                    ..LogConfig::default()
                },
                "max_frame_bytes",
            ),
            (
                LogConfig {
                    max_frame_bytes: MAX_FRAME_BYTES_LIMIT + 1,
                    ..LogConfig::default()
                },
                "max_frame_bytes",
            ),
            (
                LogConfig {
                    fsync: FsyncPolicy::Interval(Duration::ZERO),
                    ..LogConfig::default()
                },
                "fsync_interval",
            ),
        ];
        for (config, expected) in cases {
            match config.validate() {
                Err(LogError::Config { field, .. }) => assert_eq!(field, expected),
                other => panic!("{config:?}: {other:?}"),
            }
        }
    }
}
