//! The [`Log`] handle: open (with recovery), append, flush and sync, cursors, retention, close.

use super::config::{FsyncPolicy, LogConfig};
use super::cursor::{read_cursor, write_cursor};
use super::error::{io_error, LogError};
use super::flusher::{lock, FlusherControl, Shared};
use super::format::{list_segments, sync_dir};
use super::report::{LogStats, Recovery};
use super::writer::{
    create_segment, ensure_dir, recover_last, take_buffer, take_lock, ClosedSegment, Counters,
    Tail, Writer,
};
use super::FLUSHER_NAME;
use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::SystemTime;

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

    pub(super) fn writer(&self) -> MutexGuard<'_, Writer> {
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
