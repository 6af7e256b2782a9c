//! The writer: [`MappedLog`] (open with recovery, appends by a copy into the mapping, rolls, sync policy),
//! and the recovery of the last segment.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::mapping::{
    allocate, prefetch_write, prepare, remove_prepared, Mapping, Prepared, Segment,
};
use super::shared::{MappedHandle, Prep, Shared, SyncState};
use super::{
    round_to_page, MappedConfig, POPULATE_AHEAD, PREFETCH_AHEAD, PREPARED_PREFIX, PREPARED_SUFFIX,
    PREP_THREAD, SYNC_THREAD, TAIL_CHUNK,
};
use crate::log::config::FsyncPolicy;
use crate::log::error::{io_error, LogError};
use crate::log::flusher::lock;
use crate::log::format::{
    frame_header, frame_header_of, header_version, list_segments, read_full_at, segment_path,
    sync_dir, zero_run,
};
use crate::log::report::Recovery;
use crate::log::scan::SegmentScan;
use crate::log::writer::{
    ensure_dir, recover_last, take_lock, validate_frames, ClosedSegment, Tail,
};
use crate::log::{FRAME_HEADER_LEN, PREALLOCATED_VERSION, SEGMENT_HEADER_LEN};

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
        self.append_frame(len, None, write)
    }

    /// As [`append_with`](Self::append_with), with `crc` the CRC32C of the frame `write` writes (its length
    /// bytes, then the payload), computed by the caller from the pieces it copies (see
    /// [`frame_crc_of_pieces`](crate::log::frame_crc_of_pieces)), so that the copy is not read back. A wrong
    /// `crc` makes the frame damage that readers skip.
    #[inline]
    pub fn append_with_crc(
        &mut self,
        len: usize,
        crc: u32,
        write: impl FnOnce(&mut [u8]),
    ) -> Result<u64, LogError> {
        self.append_frame(len, Some(crc), write)
    }

    #[inline]
    fn append_frame(
        &mut self,
        len: usize,
        crc: Option<u32>,
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
            let header = match crc {
                Some(crc) => {
                    debug_assert_eq!(frame_header(payload)[8..], crc.to_le_bytes());
                    frame_header_of(len as u32, crc)
                }
                None => frame_header(payload),
            };
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
