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
//! `unsafe` here: the mapping (`mmap`, `munmap`, `msync`, `madvise`) and the copy into it; see the `SAFETY`
//! comments. A segment is mapped for as long as an `Arc` of it lives (the writer, a sync in progress, the
//! preparing thread); its file is never shortened while mapped (only [`MappedLog::open`] writes to a segment
//! other than through the mapping, before mapping it). Something outside this process that truncates a segment
//! file under it would make the copy fault (`SIGBUS`): the directory is 0700 and locked by the writer.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::config::{FsyncPolicy, LogConfig};
use super::cursor::{read_cursor, write_cursor};
use super::error::{io_error, LogError};
use super::flusher::lock;
use super::format::{
    frame_header, header_version, list_segments, read_full_at, segment_header_of, segment_path,
    sync_dir, zero_run,
};
use super::report::Recovery;
use super::scan::SegmentScan;
use super::writer::{ensure_dir, recover_last, take_lock, validate_frames, ClosedSegment, Tail};
use super::{FRAME_HEADER_LEN, PREALLOCATED_VERSION, SEGMENT_HEADER_LEN};

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

// ---------------------------------------------------------------------------------------------------------------
// The mapping

/// A shared read-write mapping of a whole segment file; unmapped when dropped.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is memory shared with the page cache, not owned by any thread. The one writer copies into
// it through `MappedLog::append` (`&mut self`, past everything written before); every other use hands an address
// range to the kernel (`msync`, `madvise`) or unmaps it when the last `Arc` of it is dropped. No Rust reference to
// its bytes is ever made, so moving the handle to another thread or sharing it between threads races with nothing.
unsafe impl Send for Mapping {}
// SAFETY: see `Send` above: `&Mapping` only gives out the address for system calls and the writer's raw copies.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file`, which the caller allocated to at least that size.
    fn new(file: &File, len: u64, path: &Path) -> Result<Self, LogError> {
        let fail = |e| io_error("map segment", path)(e);
        let len =
            usize::try_from(len).map_err(|_| fail(io::Error::from_raw_os_error(libc::EFBIG)))?;
        // SAFETY: a new shared mapping of `len` bytes of an open file; nothing else is mapped at the address the
        // kernel picks, and failure is checked below. Its pages are backed by blocks already allocated.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(fail(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| fail(io::Error::from_raw_os_error(libc::ENOMEM)))?;
        Ok(Self { ptr, len })
    }

    fn len(&self) -> u64 {
        self.len as u64
    }

    /// The page-aligned range covering `[from, to)` (clamped to the mapping), as (offset, length).
    fn pages(&self, from: u64, to: u64) -> Option<(usize, usize)> {
        let from = (from & !(page_bytes() - 1)) as usize;
        let to = (to as usize).min(self.len);
        (to > from).then(|| (from, to - from))
    }

    /// Writes `[from, to)` back and waits for it (`msync(MS_SYNC)`: the data and what is needed to read it back,
    /// as `fdatasync` of that range).
    fn sync(&self, from: u64, to: u64) -> io::Result<()> {
        let Some((at, len)) = self.pages(from, to) else {
            return Ok(());
        };
        // SAFETY: `[at, at + len)` lies inside the mapping (`pages` clamps it), which `self` keeps mapped; `at`
        // is page-aligned. msync reads nothing through Rust.
        let rc = unsafe { libc::msync(self.ptr.as_ptr().add(at).cast(), len, libc::MS_SYNC) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Faults the pages of `[from, to)` in writable and dirty without changing them (`MADV_POPULATE_WRITE`), so
    /// the writer's copies into them do not fault. A hint: false when the kernel does not know it (before Linux
    /// 5.14), errors otherwise ignored (the copy faults then, as it would have).
    fn populate(&self, from: u64, to: u64) -> bool {
        #[cfg(target_os = "linux")]
        {
            let Some((at, len)) = self.pages(from, to) else {
                return true;
            };
            // SAFETY: `[at, at + len)` lies inside the mapping, which `self` keeps mapped. MADV_POPULATE_WRITE
            // changes no byte (it faults the pages in as a write would, without writing), and reports a failure
            // (EFAULT, ENOMEM) as an error, never as a signal.
            let rc = unsafe {
                libc::madvise(
                    self.ptr.as_ptr().add(at).cast(),
                    len,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            !(rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (from, to);
            false
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; this is the last handle (the `Arc` holding it is gone), so no
        // copy into it and no system call on its range is in progress.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Starts loading the cache line at `p` for writing (a hint: it never faults, whatever the address).
#[inline]
fn prefetch_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults and changes nothing (PREFETCHW; a NOP on CPUs that
    // predate it).
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Allocates the blocks of `file`'s first `len` bytes (growing it to `len`), so writes into them never need
/// space the disk may not have.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    #[cfg(target_os = "linux")]
    loop {
        // SAFETY: a system call on an open descriptor; it reads only its arguments.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
            0 => return Ok(()),
            libc::EINTR => {}
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        // No posix_fallocate: write the zeros, which allocates them on file systems that are not copy-on-write.
        let zeros = vec![0u8; TAIL_CHUNK];
        let have = file.metadata()?.len();
        let mut at = have.min(len as u64);
        while at < len as u64 {
            let n = (len as u64 - at).min(TAIL_CHUNK as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// A segment being written or written: where it starts, its file and its mapping.
#[derive(Debug)]
struct Segment {
    base: u64,
    path: PathBuf,
    /// Kept open with the mapping (and for the record: msync works on the mapping).
    _file: File,
    map: Mapping,
}

/// A segment made ahead of time under a temporary name: allocated, headed, mapped.
#[derive(Debug)]
struct Prepared {
    path: PathBuf,
    file: File,
    map: Mapping,
    /// Bytes from the start already made writable (see [`Mapping::populate`]).
    populated: u64,
}

impl Prepared {
    /// Removes it (unused at close, or its rename failed).
    fn discard(self) {
        let path = self.path.clone();
        drop(self);
        let _ = fs::remove_file(path);
    }
}

/// Creates, allocates, heads (and fdatasyncs, with `fsync`) and maps a segment file of `cap` bytes at `path`.
/// On failure the file is removed and the error returned: a full disk is `ENOSPC` from the allocation.
fn prepare(path: PathBuf, cap: u64, fsync: bool) -> Result<Prepared, LogError> {
    let made = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_error("create segment", &path))
        .and_then(|file| {
            allocate(&file, cap).map_err(io_error("allocate segment", &path))?;
            file.write_all_at(&segment_header_of(PREALLOCATED_VERSION), 0)
                .map_err(io_error("write segment header", &path))?;
            if fsync {
                file.sync_data().map_err(io_error("fsync", &path))?;
            }
            let map = Mapping::new(&file, cap, &path)?;
            Ok((file, map))
        });
    match made {
        Ok((file, map)) => Ok(Prepared {
            path,
            file,
            map,
            populated: 0,
        }),
        Err(e) => {
            let _ = fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Removes the prepared segments a process left behind (it died before using them).
fn remove_prepared(dir: &Path) -> Result<(), LogError> {
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.starts_with(PREPARED_PREFIX) && name.ends_with(PREPARED_SUFFIX) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &path)(e)),
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// State shared with the threads and the handles

#[derive(Debug)]
struct Shared {
    pub(super) dir: PathBuf,
    pub(super) config: MappedConfig,
    /// Holds the flock until the log is closed (taken then, so the directory is free for the next writer even
    /// while handles live on).
    lock_file: Mutex<Option<File>>,
    /// Position the next frame gets; stored by the writer after each frame (Release), read by syncs.
    end: AtomicU64,
    /// A sync failed (the reason is in `sync`): appends are refused.
    failed: AtomicBool,
    /// Closed: handles refuse everything.
    shut: AtomicBool,
    sync: Mutex<SyncState>,
    /// One sync at a time.
    sync_serial: Mutex<()>,
    /// Closed segments, oldest first, for `delete_before` and `start`.
    closed: Mutex<VecDeque<ClosedSegment>>,
    /// Serialises cursor writes (they share temporary names).
    pub(super) cursors: Mutex<()>,
    prep: Mutex<Prep>,
    /// The preparing thread waits on it.
    prep_wake: Condvar,
    /// A roll waits on it for the segment being prepared.
    prep_done: Condvar,
    sync_stop: Mutex<bool>,
    sync_wake: Condvar,
    prepared_names: AtomicU64,
}

#[derive(Debug)]
struct SyncState {
    /// The segment appends go to.
    active: Arc<Segment>,
    /// Everything below this position is synced.
    synced: u64,
    /// Closed segments with frames not synced yet, each with its end (offset).
    pending: Vec<(Arc<Segment>, u64)>,
    /// A segment was created (renamed into place) since the directory was last fsynced.
    dir_dirty: bool,
    failed: Option<String>,
}

#[derive(Debug, Default)]
struct Prep {
    stop: bool,
    /// The writer passed half its segment: prepare the next one.
    want_next: bool,
    /// The thread is preparing a segment now.
    busy: bool,
    /// The prepared segment, or why preparing it failed.
    next: Option<Result<Prepared, LogError>>,
    /// Ranges of mappings to make writable, in order.
    populate: VecDeque<(Arc<Segment>, u64, u64)>,
    /// Segments to drop (unmap, close) here rather than in the writer's thread.
    retire: Vec<Arc<Segment>>,
}

impl Shared {
    fn failure(&self) -> LogError {
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

    fn retire(&self, segments: impl IntoIterator<Item = Arc<Segment>>) {
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
    fn sync_now(&self) -> Result<(), LogError> {
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
    fn take_prepared(&self, need: u64) -> Result<Prepared, LogError> {
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
    fn prepare_loop(&self) {
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
    fn sync_loop(&self, every: Duration) {
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
pub struct MappedHandle(Arc<Shared>);

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

// ---------------------------------------------------------------------------------------------------------------
// The writer

/// The one writer of a WAL directory; see the module docs. Appends take `&mut self`: the caller serialises them.
#[derive(Debug)]
pub struct MappedLog {
    shared: Arc<Shared>,
    active: Arc<Segment>,
    /// The active segment's base, its bytes written (header and whole frames) and its size.
    base: u64,
    len: u64,
    cap: u64,
    /// Offset up to which the preparing thread was asked to make the active segment writable.
    populate_asked: u64,
    /// The next segment was asked for.
    next_asked: bool,
    /// `len` at which [`MappedLog::ahead`] asks the preparing thread for more.
    mark: u64,
    /// Offset (a cache line's) up to which the lines ahead of the writer were prefetched for writing.
    prefetched: u64,
    threads: Vec<JoinHandle<()>>,
    shut: bool,
}

/// The last segment after recovery.
enum Recovered {
    /// Appends continue in it after `len` bytes.
    Active { segment: Segment, len: u64 },
    /// Closed at `len` bytes; a new segment starts after it.
    Closed { len: u64 },
}

impl MappedLog {
    /// Opens (or creates) the WAL in `dir`: takes the lock, recovers the last segment (see the module docs),
    /// and starts the preparing thread (and the syncing one for `Interval`). A full disk is an error here if the
    /// first segment cannot be allocated.
    pub fn open(dir: &Path, config: MappedConfig) -> Result<(MappedLog, Recovery), LogError> {
        config.validate()?;
        ensure_dir(dir)?;
        let lock_file = take_lock(dir)?;
        remove_prepared(dir)?;
        let fsync = config.fsyncs();
        let mut listed = list_segments(dir).map_err(io_error("list", dir))?;
        let last = listed.pop();
        let mut closed = VecDeque::with_capacity(listed.len() + 1);
        for (i, (base, path)) in listed.iter().enumerate() {
            // A closed segment ends where the next one starts (bytes of it past that are not part of the log).
            let next = listed.get(i + 1).or(last.as_ref()).map_or(*base, |s| s.0);
            closed.push_back(ClosedSegment {
                base: *base,
                path: path.clone(),
                len: next - base,
            });
        }
        let names = AtomicU64::new(0);
        let new_segment = |base: u64| -> Result<Segment, LogError> {
            let n = names.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!("{PREPARED_PREFIX}open-{n}{PREPARED_SUFFIX}"));
            let prepared = prepare(tmp, config.segment_cap(0), fsync)?;
            install(prepared, dir, base, fsync)
        };
        let mut recovery = Recovery::default();
        let (active, len) = match last {
            None => (new_segment(0)?, SEGMENT_HEADER_LEN),
            Some((base, path)) => match recover(base, &path, &config, &mut recovery)? {
                Recovered::Active { segment, len } => (segment, len),
                Recovered::Closed { len } => {
                    closed.push_back(ClosedSegment { base, path, len });
                    (new_segment(base + len)?, SEGMENT_HEADER_LEN)
                }
            },
        };
        if recovery.segment.is_none() {
            recovery.position = active.base + len;
        }
        let (base, cap) = (active.base, active.map.len());
        let active = Arc::new(active);
        let sync_every = match config.fsync {
            FsyncPolicy::Interval(every) => Some(every),
            FsyncPolicy::Always | FsyncPolicy::Never => None,
        };
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            config,
            lock_file: Mutex::new(Some(lock_file)),
            end: AtomicU64::new(base + len),
            failed: AtomicBool::new(false),
            shut: AtomicBool::new(false),
            sync: Mutex::new(SyncState {
                active: Arc::clone(&active),
                synced: base + len,
                pending: Vec::new(),
                dir_dirty: false,
                failed: None,
            }),
            sync_serial: Mutex::new(()),
            closed: Mutex::new(closed),
            cursors: Mutex::new(()),
            prep: Mutex::new(Prep::default()),
            prep_wake: Condvar::new(),
            prep_done: Condvar::new(),
            sync_stop: Mutex::new(false),
            sync_wake: Condvar::new(),
            prepared_names: AtomicU64::new(0),
        });
        let mut log = MappedLog {
            shared: Arc::clone(&shared),
            active,
            base,
            len,
            cap,
            populate_asked: len,
            next_asked: false,
            mark: 0,
            prefetched: len & !63,
            threads: Vec::new(),
            shut: false,
        };
        log.start_threads(sync_every)?;
        log.ahead();
        Ok((log, recovery))
    }

    /// Starts the preparing thread, and the syncing one every `sync_every` if given. On an error, dropping the
    /// log stops whatever was started.
    fn start_threads(&mut self, sync_every: Option<Duration>) -> Result<(), LogError> {
        let dir = &self.shared.dir;
        let for_thread = Arc::clone(&self.shared);
        self.threads.push(
            thread::Builder::new()
                .name(PREP_THREAD.into())
                .spawn(move || for_thread.prepare_loop())
                .map_err(io_error("start the preparing thread for", dir))?,
        );
        if let Some(every) = sync_every {
            let for_thread = Arc::clone(&self.shared);
            self.threads.push(
                thread::Builder::new()
                    .name(SYNC_THREAD.into())
                    .spawn(move || for_thread.sync_loop(every))
                    .map_err(io_error("start the syncing thread for", dir))?,
            );
        }
        Ok(())
    }

    /// A handle for syncs, cursors and deletion outside the writer's lock.
    pub fn handle(&self) -> MappedHandle {
        MappedHandle(Arc::clone(&self.shared))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn config(&self) -> &MappedConfig {
        &self.shared.config
    }

    /// Position of the oldest retained segment's first frame.
    pub fn start(&self) -> u64 {
        lock(&self.shared.closed)
            .front()
            .map_or(self.base, |s| s.base)
            + SEGMENT_HEADER_LEN
    }

    /// Position the next frame will get.
    pub fn end(&self) -> u64 {
        self.base + self.len
    }

    /// Segment files, the active one included.
    pub fn segments(&self) -> usize {
        lock(&self.shared.closed).len() + 1
    }

    /// Appends one frame: copies it into the active segment's mapping (rolling to the next segment first when it
    /// does not fit) and returns its position. Once this returns, the frame is in the page cache (it survives
    /// the process); it is on disk after the sync the policy calls for. An error means it was not appended.
    #[inline]
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, LogError> {
        self.append_with(payload.len(), |buf| buf.copy_from_slice(payload))
    }

    /// Appends one frame of `len` bytes that `write` writes in place, straight into the mapping, as the WAL
    /// encodes an event; otherwise as [`MappedLog::append`]. `write` must fill the whole slice: what it holds
    /// before is unspecified (zeros, as a rule). The header, CRC32C of what `write` left, is written last.
    #[inline]
    pub fn append_with(
        &mut self,
        len: usize,
        write: impl FnOnce(&mut [u8]),
    ) -> Result<u64, LogError> {
        let max = self.shared.config.max_frame_bytes;
        if len > max as usize {
            return Err(LogError::FrameTooLarge { size: len, max });
        }
        if self.shared.failed.load(Ordering::Relaxed) {
            return Err(self.shared.failure());
        }
        let frame = FRAME_HEADER_LEN + len as u64;
        if self.len + frame > self.cap {
            self.roll(frame)?;
        }
        let at = self.len;
        debug_assert!(at + frame <= self.active.map.len());
        // SAFETY: `[at, at + frame)` lies inside the active segment's mapping (`len + frame <= cap`, checked above
        // or made true by the roll, and `cap` is the mapping's length), every byte of it backed by an allocated
        // block, and `self.active` keeps it mapped. This is the only writer (`&mut self`), and it writes only past
        // every frame it wrote before, so nothing else in this process reads or writes these bytes: the slice
        // made here is the only reference to them, and lives only in this block. Readers (other threads, other
        // processes) see the bytes through the page cache and check the CRC; the header goes in last.
        unsafe {
            let dst = self.active.map.ptr.as_ptr().add(at as usize);
            let payload = std::slice::from_raw_parts_mut(dst.add(FRAME_HEADER_LEN as usize), len);
            write(payload);
            let header = frame_header(payload);
            std::ptr::copy_nonoverlapping(header.as_ptr(), dst, header.len());
        }
        self.len = at + frame;
        self.prefetch_ahead();
        self.shared
            .end
            .store(self.base + self.len, Ordering::Release);
        if self.len >= self.mark {
            self.ahead();
        }
        Ok(self.base + at)
    }

    /// Starts loading the cache lines the next frames go to, for writing: a frame's copy then stores into lines
    /// already held, instead of waiting for each (the atomics around an append wait for pending stores).
    #[inline]
    fn prefetch_ahead(&mut self) {
        let want = (self.len + PREFETCH_AHEAD).min(self.cap);
        while self.prefetched < want {
            prefetch_write(
                self.active
                    .map
                    .ptr
                    .as_ptr()
                    .wrapping_add(self.prefetched as usize),
            );
            self.prefetched += 64;
        }
    }

    /// Asks the preparing thread for pages made writable ahead of the writer, and for the next segment once half
    /// of this one is written; sets the next `len` at which to ask again.
    #[cold]
    fn ahead(&mut self) {
        let mut populate = None;
        if self.populate_asked < self.cap && self.len + POPULATE_AHEAD / 2 >= self.populate_asked {
            let to = (self.len + POPULATE_AHEAD).min(self.cap);
            populate = Some((
                Arc::clone(&self.active),
                self.populate_asked.max(self.len),
                to,
            ));
            self.populate_asked = to;
        }
        let next = !self.next_asked && self.len >= self.cap / 2;
        self.next_asked |= next;
        if populate.is_some() || next {
            let mut p = lock(&self.shared.prep);
            p.populate.extend(populate);
            p.want_next |= next;
            drop(p);
            self.shared.prep_wake.notify_one();
        }
        let populate_at = if self.populate_asked < self.cap {
            self.populate_asked
                .saturating_sub(POPULATE_AHEAD / 2)
                .max(self.len + 1)
        } else {
            u64::MAX
        };
        let next_at = if self.next_asked {
            u64::MAX
        } else {
            self.cap / 2
        };
        self.mark = populate_at.min(next_at);
    }

    /// Closes the active segment at its last frame and continues in the next one (prepared ahead, or now).
    #[cold]
    #[inline(never)]
    fn roll(&mut self, frame: u64) -> Result<(), LogError> {
        let prepared = self.shared.take_prepared(SEGMENT_HEADER_LEN + frame)?;
        let base = self.base + self.len;
        let fsync = self.shared.config.fsyncs();
        // The directory is fsynced by the next sync (before anything in the new segment is acknowledged as
        // synced), not here: a roll is a rename on the writer's path.
        let populated = prepared.populated.max(SEGMENT_HEADER_LEN);
        let segment = Arc::new(install(prepared, &self.shared.dir, base, false)?);
        let old = std::mem::replace(&mut self.active, Arc::clone(&segment));
        let old_len = self.len;
        lock(&self.shared.closed).push_back(ClosedSegment {
            base: old.base,
            path: old.path.clone(),
            len: old_len,
        });
        {
            let mut s = lock(&self.shared.sync);
            if fsync {
                if s.synced < old.base + old_len {
                    s.pending.push((Arc::clone(&old), old_len));
                }
                s.dir_dirty = true;
            }
            s.active = Arc::clone(&segment);
        }
        self.base = base;
        self.len = SEGMENT_HEADER_LEN;
        self.cap = segment.map.len();
        self.shared
            .end
            .store(base + SEGMENT_HEADER_LEN, Ordering::Release);
        self.populate_asked = populated;
        self.prefetched = SEGMENT_HEADER_LEN & !63;
        self.next_asked = false;
        self.shared.retire([old]);
        self.ahead();
        Ok(())
    }

    /// Syncs everything appended, whatever the policy.
    pub fn sync(&self) -> Result<(), LogError> {
        self.shared.sync_now()
    }

    /// The position saved under `name`, `None` if never set.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>, LogError> {
        self.handle().cursor(name)
    }

    /// Saves `position` under `name` atomically.
    pub fn set_cursor(&self, name: &str, position: u64) -> Result<(), LogError> {
        self.handle().set_cursor(name, position)
    }

    /// See [`MappedHandle::delete_before`].
    pub fn delete_before(&self, position: u64) -> Result<u64, LogError> {
        self.handle().delete_before(position)
    }

    /// Stops the threads, syncs unless the policy is `Never`, unmaps and releases the lock.
    pub fn close(mut self) -> Result<(), LogError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), LogError> {
        if std::mem::replace(&mut self.shut, true) {
            return Ok(());
        }
        *lock(&self.shared.sync_stop) = true;
        self.shared.sync_wake.notify_all();
        lock(&self.shared.prep).stop = true;
        self.shared.prep_wake.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let synced = if self.shared.config.fsyncs() {
            self.shared.sync_now()
        } else {
            Ok(())
        };
        self.shared.shut.store(true, Ordering::Release);
        lock(&self.shared.lock_file).take();
        synced
    }
}

impl Drop for MappedLog {
    /// Best effort: syncs (unless `Never`), stops the threads, releases the lock.
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Renames a prepared segment to the segment of `base` (fsyncing the directory with `fsync`).
fn install(prepared: Prepared, dir: &Path, base: u64, fsync: bool) -> Result<Segment, LogError> {
    let path = segment_path(dir, base);
    if let Err(e) = fs::rename(&prepared.path, &path) {
        prepared.discard();
        return Err(io_error("rename prepared segment to", &path)(e));
    }
    if fsync {
        sync_dir(dir)?;
    }
    Ok(Segment {
        base,
        path,
        _file: prepared.file,
        map: prepared.map,
    })
}

/// Recovers the last segment; see the module docs.
fn recover(
    base: u64,
    path: &Path,
    config: &MappedConfig,
    recovery: &mut Recovery,
) -> Result<Recovered, LogError> {
    let fsync = config.fsyncs();
    recovery.segment = Some(path.to_path_buf());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error("open segment", path))?;
    let file_len = file.metadata().map_err(io_error("stat", path))?.len();
    let mut scan = SegmentScan::new(
        file.try_clone().map_err(io_error("open segment", path))?,
        None,
    );
    let head = scan.bytes(0, 16).map_err(io_error("read", path))?.to_vec();
    match header_version(&head) {
        Some(PREALLOCATED_VERSION) => {}
        Some(_) => {
            // Written by a build before segments were preallocated: recovered as the segment log does, closed,
            // and continued in a preallocated segment after it.
            drop((scan, file));
            let len = match recover_last(base, path.to_path_buf(), fsync, recovery)? {
                Tail::Active(active) => active.len,
                Tail::Abandoned { len } => len,
            };
            return Ok(Recovered::Closed { len });
        }
        None => {
            let (good_end, frames, _) =
                validate_frames(&mut scan).map_err(io_error("read", path))?;
            if frames > 0 {
                // Left for readers (they report the header and still read the frames), as the segment log does.
                recovery.frames = frames;
                recovery.position = base + good_end;
                recovery.reason = Some(format!(
                    "damaged header in {}: left for readers, a new segment starts at {}",
                    path.display(),
                    base + good_end
                ));
                return Ok(Recovered::Closed { len: good_end });
            }
            // No frame: a segment being created when the machine crashed. Made again.
            drop((scan, file));
            fs::remove_file(path).map_err(io_error("remove", path))?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let tmp = dir.join(format!("{PREPARED_PREFIX}recover{PREPARED_SUFFIX}"));
            let prepared = prepare(tmp, config.segment_cap(0), fsync)?;
            let segment = install(prepared, dir, base, fsync)?;
            recovery.position = base + SEGMENT_HEADER_LEN;
            recovery.reason = Some(format!(
                "made {} again: its {file_len}-byte header was incomplete or damaged and it held no frame",
                path.display()
            ));
            return Ok(Recovered::Active {
                segment,
                len: SEGMENT_HEADER_LEN,
            });
        }
    }
    let (good_end, frames, damaged) = validate_frames(&mut scan).map_err(io_error("read", path))?;
    drop(scan);
    recovery.frames = frames;
    recovery.damaged_ranges = damaged;
    recovery.position = base + good_end;
    if damaged > 0 {
        recovery.reason = Some(format!(
            "{}: {damaged} damaged ranges before the last valid frame left for readers; the segment is closed \
             there and a new one starts at {}",
            path.display(),
            base + good_end
        ));
        return Ok(Recovered::Closed { len: good_end });
    }
    // A frame torn by the crash: non-zero bytes after the last valid one. Zeroed, so that the segment is frames
    // then zeros again and the next append goes where the torn frame was.
    let torn_end = nonzero_end(&file, good_end, file_len).map_err(io_error("read", path))?;
    if torn_end > good_end {
        zero_range(&file, good_end, torn_end)
            .and_then(|()| if fsync { file.sync_data() } else { Ok(()) })
            .map_err(io_error("zero torn tail of", path))?;
        recovery.truncated_bytes = torn_end - good_end;
        recovery.reason = Some(format!(
            "{}: zeroed a torn tail of {} bytes at position {}",
            path.display(),
            torn_end - good_end,
            base + good_end
        ));
    }
    // Allocated again in case a crash lost part of the allocation (blocks, or the size), before it is mapped.
    let cap = file_len.max(round_to_page(good_end));
    allocate(&file, cap).map_err(io_error("allocate segment", path))?;
    let map = Mapping::new(&file, cap, path)?;
    Ok(Recovered::Active {
        segment: Segment {
            base,
            path: path.to_path_buf(),
            _file: file,
            map,
        },
        len: good_end,
    })
}

/// The end of the last non-zero byte of `file` in `[from, to)`, or `from` when they are all zeros.
fn nonzero_end(file: &File, from: u64, to: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; TAIL_CHUNK];
    let (mut at, mut end) = (from, from);
    while at < to {
        let want = (to - at).min(TAIL_CHUNK as u64) as usize;
        let got = read_full_at(file, &mut buf[..want], at)?;
        let chunk = &buf[..got];
        if zero_run(chunk) < got {
            if let Some(i) = chunk.iter().rposition(|&b| b != 0) {
                end = at + i as u64 + 1;
            }
        }
        if got < want {
            break;
        }
        at += got as u64;
    }
    Ok(end)
}

fn zero_range(file: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; TAIL_CHUNK.min((to - from) as usize)];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
