//! The writer: the active segment, buffered appends, rollover, the buffer pool, the directory lock, and
//! recovery of the last segment at open.

use super::config::LogConfig;
use super::error::{io_error, LogError};
use super::flusher::lock;
use super::format::{push_frame, segment_header, segment_path, sync_dir};
use super::report::Recovery;
use super::scan::{Probe, Scan, SegmentScan};
use super::{
    FRAME_HEADER_LEN, LOCK_FILE, PAGE_BYTES, POOLED_BUFFERS, SEGMENT_HEADER_LEN, WRITEBACK_BYTES,
    WRITE_BUFFER_BYTES,
};
use std::collections::VecDeque;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub(super) struct ClosedSegment {
    pub(super) base: u64,
    pub(super) path: PathBuf,
    /// File length.
    pub(super) len: u64,
}

#[derive(Debug)]
pub(super) struct Active {
    pub(super) base: u64,
    pub(super) path: PathBuf,
    /// Shared with an fdatasync running outside the lock.
    pub(super) file: Arc<File>,
    /// Bytes in the file: header plus whole frames.
    pub(super) len: u64,
    /// File offset below which writeback was started (see [`Writer::start_writeback`]).
    pub(super) writeback: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) appended_frames: u64,
    pub(super) appended_bytes: u64,
    pub(super) writes: u64,
    pub(super) fsyncs: u64,
    pub(super) rolls: u64,
    pub(super) deleted_segments: u64,
    pub(super) deleted_bytes: u64,
}

#[derive(Debug)]
pub(super) struct Writer {
    /// Holds the flock for the life of the log.
    pub(super) _lock: File,
    pub(super) closed: VecDeque<ClosedSegment>,
    pub(super) active: Active,
    /// Whole frames not yet handed to be written; they follow the sealed buffers (and the write in flight).
    pub(super) buf: Vec<u8>,
    /// Interval policy: full buffers waiting for the flusher thread to write them, oldest first. They follow the
    /// buffer being written outside the lock, if any; the first of them starts at `active.len` otherwise.
    pub(super) sealed: VecDeque<Vec<u8>>,
    /// Bytes of the sealed buffers and of the one being written outside the lock.
    pub(super) pending: u64,
    /// A buffer is being written outside the lock (see [`Shared::write_pending`]); other writes wait for it.
    pub(super) writing: bool,
    /// Emptied buffers kept for reuse (a fresh 256 KiB allocation is page faults on first touch).
    pub(super) spare: Vec<Vec<u8>>,
    /// Global position up to which the active segment was fsynced.
    pub(super) synced: u64,
    pub(super) failed: Option<String>,
    /// The flusher has work: a buffer was sealed for it to write, or enough was written since writeback last
    /// started for it to start it. Set under the lock and taken in the same hold by the caller, which wakes
    /// the flusher once it has let go of the writer.
    pub(super) kick_due: bool,
    /// The policy is [`FsyncPolicy::Interval`]: there is a flusher thread to start writeback early and to write
    /// full buffers while the appender goes on.
    pub(super) early_writeback: bool,
    pub(super) counters: Counters,
}

impl Writer {
    pub(super) fn written_end(&self) -> u64 {
        self.active.base + self.active.len
    }

    pub(super) fn end(&self) -> u64 {
        self.written_end() + self.pending + self.buf.len() as u64
    }

    /// Frames were handed to the flusher and are not all in the file yet.
    pub(super) fn has_pending(&self) -> bool {
        self.pending > 0
    }

    pub(super) fn start(&self) -> u64 {
        self.closed.front().map_or(self.active.base, |s| s.base) + SEGMENT_HEADER_LEN
    }

    pub(super) fn check(&self) -> Result<(), LogError> {
        match &self.failed {
            Some(reason) => Err(LogError::Failed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Writes the buffer at the end of the active segment in one positional write. Only with nothing pending
    /// (the buffer follows the pending frames): callers write those first with [`Shared::write_pending`].
    pub(super) fn write_out(&mut self) -> Result<(), LogError> {
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
    pub(super) fn after_buffer_write(
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
    pub(super) fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < 2 && buf.capacity() <= 2 * WRITE_BUFFER_BYTES {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Enough was written since writeback last started for the flusher to start it.
    pub(super) fn writeback_is_due(&self) -> bool {
        self.early_writeback && self.active.len >= self.active.writeback + WRITEBACK_BYTES
    }

    /// Takes the range of whole pages written since writeback last started, when it is worth starting now.
    pub(super) fn take_writeback(&mut self) -> Option<(Arc<File>, u64, u64)> {
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

    pub(super) fn fsync_failed(&mut self, path: PathBuf, source: io::Error) -> LogError {
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
    pub(super) fn fills_buffer(&self, payload: &[u8]) -> bool {
        let frame = FRAME_HEADER_LEN + payload.len() as u64;
        !self.buf.is_empty() && self.buf.len() as u64 + frame > WRITE_BUFFER_BYTES as u64
    }

    /// The frame of `payload` does not fit in the active segment: it must go to a new one.
    pub(super) fn must_roll(&self, payload: &[u8], config: &LogConfig) -> bool {
        let frame = FRAME_HEADER_LEN + payload.len() as u64;
        let size = self.active.len + self.pending + self.buf.len() as u64;
        size > SEGMENT_HEADER_LEN && size + frame > config.segment_bytes
    }

    /// Appends one frame to the buffer. Only with nothing pending when it must roll (see [`Log::append`]).
    pub(super) fn append_one(
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
    pub(super) fn delete_oldest(&mut self) -> Result<u64, LogError> {
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
    pub(super) fn second_base(&self) -> u64 {
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
pub(super) fn take_buffer() -> Vec<u8> {
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
pub(super) fn create_segment(dir: &Path, base: u64, fsync: bool) -> Result<Active, LogError> {
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
pub(super) fn ensure_dir(dir: &Path) -> Result<(), LogError> {
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
pub(super) fn take_lock(dir: &Path) -> Result<File, LogError> {
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
pub(super) fn validate_frames(scan: &mut SegmentScan) -> io::Result<(u64, u64, u64)> {
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
pub(super) enum Tail {
    Active(Active),
    /// Its header is damaged and it holds frames, or it holds damage before its last valid frame: left for
    /// readers; a new segment starts after its `len` bytes.
    Abandoned {
        len: u64,
    },
}

pub(super) fn recover_last(
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
        // Closed at the last valid frame: a damaged frame header can claim bytes past it, and frames appended
        // there could make that frame's checksum valid again (an append rewrites exactly the bytes the damage
        // changed), so that readers would return the old frame and lose the new one. A later segment limits
        // this one to `good_end`, which the bytes after it can no longer change.
        notes.push(format!(
            "{damaged} damaged ranges before the last valid frame left for readers; the segment is closed there \
             and a new one starts at {}",
            base + good_end
        ));
    }
    if !notes.is_empty() {
        recovery.reason = Some(format!("{}: {}", path.display(), notes.join("; ")));
    }
    if damaged > 0 {
        return Ok(Tail::Abandoned { len: good_end });
    }
    Ok(Tail::Active(Active {
        base,
        path,
        file: Arc::new(file),
        len: good_end,
        writeback: good_end,
    }))
}
