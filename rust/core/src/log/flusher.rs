//! State shared by the [`Log`] handle and its flusher thread (`treasure-log-flush`): writes outside the
//! writer's lock, periodic fsync, writeback.

use super::config::LogConfig;
use super::error::LogError;
use super::writer::Writer;
use super::PAGE_BYTES;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// State shared by the [`Log`] handle and its flusher thread.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) config: LogConfig,
    pub(super) writer: Mutex<Writer>,
    /// Serialises cursor writes (they share temporary names).
    pub(super) cursors: Mutex<()>,
    pub(super) flusher: Mutex<FlusherControl>,
    pub(super) wake: Condvar,
    /// With `writer`: a write outside the lock ended (see [`Shared::write_pending`]).
    pub(super) written: Condvar,
}

/// What the flusher thread is asked to do besides its periodic sync.
#[derive(Debug, Default)]
pub(super) struct FlusherControl {
    pub(super) stop: bool,
    /// Write the sealed buffers, and start writeback of what was written (see [`WRITEBACK_BYTES`]).
    work: bool,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Writes the sealed buffers in order, each in one positional write outside the lock, after the write
    /// another thread has in flight; then the buffer too when `all` (under the lock). Returns the guard with
    /// the first error, the failed buffer kept in front of the others with its frames' positions.
    pub(super) fn write_pending<'a>(
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
    pub(super) fn sync_now(&self) -> Result<(), LogError> {
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
    pub(super) fn kick(&self) {
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

    pub(super) fn flusher(&self, every: Duration) {
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
