//! State shared with the threads (`treasure-wal-prep`, `treasure-wal-sync`) and the handles: the active
//! segment, what is synced, the prepared segment; [`MappedHandle`], the sync handle.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::mapping::{prepare, Prepared, Segment};
use super::{MappedConfig, POPULATE_AHEAD, POPULATE_CHUNK, PREPARED_PREFIX, PREPARED_SUFFIX};
use crate::log::cursor::{read_cursor, write_cursor};
use crate::log::error::{io_error, LogError};
use crate::log::flusher::lock;
use crate::log::format::sync_dir;
use crate::log::writer::ClosedSegment;

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) config: MappedConfig,
    /// Holds the flock until the log is closed (taken then, so the directory is free for the next writer even
    /// while handles live on).
    pub(super) lock_file: Mutex<Option<File>>,
    /// Position the next frame gets; stored by the writer after each frame (Release), read by syncs.
    pub(super) end: AtomicU64,
    /// A sync failed (the reason is in `sync`): appends are refused.
    pub(super) failed: AtomicBool,
    /// Closed: handles refuse everything.
    pub(super) shut: AtomicBool,
    pub(super) sync: Mutex<SyncState>,
    /// One sync at a time.
    pub(super) sync_serial: Mutex<()>,
    /// Closed segments, oldest first, for `delete_before` and `start`.
    pub(super) closed: Mutex<VecDeque<ClosedSegment>>,
    /// Serialises cursor writes (they share temporary names).
    pub(super) cursors: Mutex<()>,
    pub(super) prep: Mutex<Prep>,
    /// The preparing thread waits on it.
    pub(super) prep_wake: Condvar,
    /// A roll waits on it for the segment being prepared.
    pub(super) prep_done: Condvar,
    pub(super) sync_stop: Mutex<bool>,
    pub(super) sync_wake: Condvar,
    pub(super) prepared_names: AtomicU64,
}

#[derive(Debug)]
pub(super) struct SyncState {
    /// The segment appends go to.
    pub(super) active: Arc<Segment>,
    /// Everything below this position is synced.
    pub(super) synced: u64,
    /// Closed segments with frames not synced yet, each with its end (offset).
    pub(super) pending: Vec<(Arc<Segment>, u64)>,
    /// A segment was created (renamed into place) since the directory was last fsynced.
    pub(super) dir_dirty: bool,
    pub(super) failed: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct Prep {
    pub(super) stop: bool,
    /// The writer passed half its segment: prepare the next one.
    pub(super) want_next: bool,
    /// The thread is preparing a segment now.
    busy: bool,
    /// The prepared segment, or why preparing it failed.
    next: Option<Result<Prepared, LogError>>,
    /// Ranges of mappings to make writable, in order.
    pub(super) populate: VecDeque<(Arc<Segment>, u64, u64)>,
    /// Segments to drop (unmap, close) here rather than in the writer's thread.
    retire: Vec<Arc<Segment>>,
}

impl Shared {
    pub(super) fn failure(&self) -> LogError {
        let reason = lock(&self.sync)
            .failed
            .clone()
            .unwrap_or_else(|| "the write-ahead log is closed".into());
        LogError::Failed { reason }
    }

    fn check_open(&self) -> Result<(), LogError> {
        if self.shut.load(Ordering::Acquire) {
            return Err(LogError::Failed {
                reason: "the write-ahead log is closed".into(),
            });
        }
        Ok(())
    }

    fn next_prepared_path(&self) -> PathBuf {
        let n = self.prepared_names.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{PREPARED_PREFIX}{n}{PREPARED_SUFFIX}"))
    }

    /// Marks the log failed (every later append and sync says why) and returns the error.
    fn fail(&self, error: LogError) -> LogError {
        lock(&self.sync).failed.get_or_insert(error.to_string());
        self.failed.store(true, Ordering::Release);
        error
    }

    pub(super) fn retire(&self, segments: impl IntoIterator<Item = Arc<Segment>>) {
        let mut p = lock(&self.prep);
        let before = p.retire.len();
        p.retire.extend(segments);
        if p.retire.len() > before {
            drop(p);
            self.prep_wake.notify_one();
        }
    }

    /// Syncs every frame copied so far: closed segments not synced yet, the directory after a roll, then the
    /// active segment up to the end. One at a time; the one that waited finds its frames synced already.
    pub(super) fn sync_now(&self) -> Result<(), LogError> {
        let _serial = lock(&self.sync_serial);
        let end = self.end.load(Ordering::Acquire);
        let (active, from, pending, dir_dirty) = {
            let mut s = lock(&self.sync);
            if let Some(reason) = &s.failed {
                return Err(LogError::Failed {
                    reason: reason.clone(),
                });
            }
            if s.synced >= end && s.pending.is_empty() && !s.dir_dirty {
                return Ok(());
            }
            (
                Arc::clone(&s.active),
                s.synced,
                std::mem::take(&mut s.pending),
                std::mem::take(&mut s.dir_dirty),
            )
        };
        for (segment, upto) in &pending {
            let start = from.saturating_sub(segment.base);
            if let Err(e) = segment.map.sync(start, *upto) {
                return Err(self.fail(io_error("msync", &segment.path)(e)));
            }
        }
        if dir_dirty {
            if let Err(e) = sync_dir(&self.dir) {
                return Err(self.fail(e));
            }
        }
        if end > active.base {
            let start = from.max(active.base) - active.base;
            if let Err(e) = active.map.sync(start, end - active.base) {
                return Err(self.fail(io_error("msync", &active.path)(e)));
            }
        }
        {
            let mut s = lock(&self.sync);
            s.synced = s.synced.max(end);
        }
        drop(active);
        self.retire(pending.into_iter().map(|(segment, _)| segment));
        Ok(())
    }

    /// A segment for a roll that needs `need` bytes: the one prepared ahead (waiting for it if it is being
    /// prepared), or one prepared now (after a failed try: the disk may have room again).
    pub(super) fn take_prepared(&self, need: u64) -> Result<Prepared, LogError> {
        let mut p = lock(&self.prep);
        loop {
            match p.next.take() {
                Some(Ok(prepared)) if prepared.map.len() >= need => return Ok(prepared),
                Some(Ok(prepared)) => {
                    p.next = Some(Ok(prepared)); // for the next roll: this frame needs a larger one
                    break;
                }
                None if p.busy => {
                    p = self
                        .prep_done
                        .wait(p)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                // Nothing prepared, or preparing it failed (the disk was full?): try now, and report this try.
                Some(Err(_)) | None => break,
            }
        }
        drop(p);
        prepare(
            self.next_prepared_path(),
            self.config.segment_cap(need),
            self.config.fsyncs(),
        )
    }

    /// The preparing thread: the next segment when asked, pages made writable ahead of the writer, segments
    /// retired by the writer unmapped.
    pub(super) fn prepare_loop(&self) {
        let mut populate_works = true;
        let mut p = lock(&self.prep);
        loop {
            if p.stop {
                break;
            }
            if p.want_next && !matches!(p.next, Some(Ok(_))) {
                p.want_next = false;
                p.busy = true;
                drop(p);
                let cap = self.config.segment_cap(0);
                let mut made = prepare(self.next_prepared_path(), cap, self.config.fsyncs());
                if let Ok(prepared) = &mut made {
                    // Its first pages writable before the writer gets it.
                    let to = POPULATE_AHEAD.min(cap);
                    if populate_works {
                        populate_works = prepared.map.populate(0, to);
                        prepared.populated = to;
                    }
                }
                p = lock(&self.prep);
                p.busy = false;
                p.next = Some(made);
                self.prep_done.notify_all();
                continue;
            }
            if !p.retire.is_empty() {
                let retired = std::mem::take(&mut p.retire);
                drop(p);
                drop(retired);
                p = lock(&self.prep);
                continue;
            }
            if let Some((segment, from, to)) = p.populate.pop_front() {
                let upto = to.min(from + POPULATE_CHUNK);
                if upto < to {
                    p.populate.push_front((Arc::clone(&segment), upto, to));
                }
                drop(p);
                // Not for a segment nobody writes any more (only this job holds it).
                if populate_works && Arc::strong_count(&segment) > 1 {
                    populate_works = segment.map.populate(from, upto);
                }
                drop(segment);
                p = lock(&self.prep);
                continue;
            }
            p = self
                .prep_wake
                .wait(p)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let next = p.next.take();
        let populate = std::mem::take(&mut p.populate);
        let retired = std::mem::take(&mut p.retire);
        drop(p);
        if let Some(Ok(prepared)) = next {
            prepared.discard();
        }
        drop((populate, retired));
    }

    /// The `Interval` policy's thread: syncs every `every` while anything is unsynced.
    pub(super) fn sync_loop(&self, every: Duration) {
        let mut next = Instant::now() + every;
        let mut stop = lock(&self.sync_stop);
        loop {
            if *stop {
                return;
            }
            let now = Instant::now();
            if now < next {
                stop = self
                    .sync_wake
                    .wait_timeout(stop, next - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            drop(stop);
            // A failure marks the log failed; every later append and sync reports it.
            let _ = self.sync_now();
            next = Instant::now() + every;
            stop = lock(&self.sync_stop);
        }
    }

    fn delete_before(&self, position: u64) -> Result<u64, LogError> {
        let mut closed = lock(&self.closed);
        let (mut freed, mut deleted) = (0, false);
        while let Some(oldest) = closed.front() {
            if oldest.base + oldest.len > position {
                break;
            }
            match fs::remove_file(&oldest.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("delete segment", &oldest.path)(e)),
            }
            freed += oldest.len;
            deleted = true;
            closed.pop_front();
        }
        drop(closed);
        if deleted && self.config.fsyncs() {
            sync_dir(&self.dir)?;
        }
        Ok(freed)
    }
}

/// What the WAL keeps outside its writer's lock: syncs (the `Always` policy's commit), cursors and deletion of
/// acknowledged segments, none of which need the writer. Refuses everything once the log is closed.
#[derive(Debug, Clone)]
pub struct MappedHandle(pub(super) Arc<Shared>);

impl MappedHandle {
    /// Syncs every frame appended so far (`msync`), whatever the policy.
    pub fn sync(&self) -> Result<(), LogError> {
        self.0.check_open()?;
        self.0.sync_now()
    }

    /// Whether the log was closed (or failed: a sync failed, appends are refused).
    pub fn check(&self) -> Result<(), LogError> {
        self.0.check_open()?;
        if self.0.failed.load(Ordering::Acquire) {
            return Err(self.0.failure());
        }
        Ok(())
    }

    /// The position saved under `name`, `None` if never set.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>, LogError> {
        read_cursor(&self.0.dir, name)
    }

    /// Saves `position` under `name` atomically (fsynced unless the policy is `Never`).
    pub fn set_cursor(&self, name: &str, position: u64) -> Result<(), LogError> {
        self.0.check_open()?;
        let _serial = lock(&self.0.cursors);
        write_cursor(&self.0.dir, name, position, self.0.config.fsyncs())
    }

    /// Deletes the closed segments (oldest first) whose every frame is below `position`; returns the bytes of
    /// log they held.
    pub fn delete_before(&self, position: u64) -> Result<u64, LogError> {
        self.0.check_open()?;
        self.0.delete_before(position)
    }
}
