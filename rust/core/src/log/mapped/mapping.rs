//! The mapping: a shared read-write mapping of a whole segment file (`mmap`, `msync`, `madvise`, `munmap`),
//! the segments that own one, and the next segment prepared (allocated, headed, mapped) ahead of time.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::{page_bytes, PREPARED_PREFIX, PREPARED_SUFFIX};
use crate::log::error::{io_error, LogError};
use crate::log::format::segment_header_of;
use crate::log::PREALLOCATED_VERSION;

/// A shared read-write mapping of a whole segment file; unmapped when dropped.
#[derive(Debug)]
pub(super) struct Mapping {
    pub(super) ptr: NonNull<u8>,
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
    pub(super) fn new(file: &File, len: u64, path: &Path) -> Result<Self, LogError> {
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

    pub(super) fn len(&self) -> u64 {
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
    pub(super) fn sync(&self, from: u64, to: u64) -> io::Result<()> {
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
    pub(super) fn populate(&self, from: u64, to: u64) -> bool {
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
pub(super) fn prefetch_write(p: *const u8) {
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
pub(super) fn allocate(file: &File, len: u64) -> io::Result<()> {
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
pub(super) struct Segment {
    pub(super) base: u64,
    pub(super) path: PathBuf,
    /// Kept open with the mapping (and for the record: msync works on the mapping).
    pub(super) _file: File,
    pub(super) map: Mapping,
}

/// A segment made ahead of time under a temporary name: allocated, headed, mapped.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) map: Mapping,
    /// Bytes from the start already made writable (see [`Mapping::populate`]).
    pub(super) populated: u64,
}

impl Prepared {
    /// Removes it (unused at close, or its rename failed).
    pub(super) fn discard(self) {
        let path = self.path.clone();
        drop(self);
        let _ = fs::remove_file(path);
    }
}

/// Creates, allocates, heads (and fdatasyncs, with `fsync`) and maps a segment file of `cap` bytes at `path`.
/// On failure the file is removed and the error returned: a full disk is `ENOSPC` from the allocation.
pub(super) fn prepare(path: PathBuf, cap: u64, fsync: bool) -> Result<Prepared, LogError> {
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
pub(super) fn remove_prepared(dir: &Path) -> Result<(), LogError> {
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
