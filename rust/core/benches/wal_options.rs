//! What it costs the submitting thread to make an event survive a crash of the process, per 300-byte frame in
//! a burst of 20,000 (about 6 MiB) into a fresh file: the options the WAL of `durability="wal"` could take.
//!
//! - `log_append_flush`: [`Log::append`] then [`Log::flush`] per frame, as `submit` with the WAL does (a
//!   `write(2)` per event; `submit_many` writes once per call);
//! - `pwrite_per_frame`: the frame (header and CRC32C as the log writes them) by one `pwrite(2)` into a file
//!   whose blocks were allocated beforehand: the system call alone, without the log's bookkeeping;
//! - `mmap_copy`: the same frame copied into a shared mapping of such a file. Once copied it is in the page
//!   cache, so it survives the process as a `write(2)` would; the first touch of each page faults;
//! - `mmap_copy_populated`: the same, the mapping's pages faulted in beforehand (`MAP_POPULATE`, untimed), as
//!   a thread preparing the next segment could; the first write to each page still marks it dirty;
//! - `memory_copy`: the frame copied into a buffer in memory, which survives nothing: the floor;
//! - `mapped_log_append`: [`MappedLog::append`] per frame, what `submit` with the WAL does now: the copy into
//!   a preallocated, mapped segment whose pages its own thread makes writable ahead of the writer (the log is
//!   opened, and its first pages made writable, untimed); `mapped_log_append_locked` the same under a `Mutex`
//!   taken and released per frame, as the WAL's submitters hold it.
//!
//! Every option ends its burst with the data in the kernel (nothing is fsynced: machine-crash durability is the
//! fsync policy's, the same for all). Creating, allocating and mapping the file is untimed.
//! `cargo bench -p treasure_core --bench wal_options`

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use std::sync::Mutex;
use treasure_core::log::mapped::{MappedConfig, MappedLog};
use treasure_core::log::{frame_header, FsyncPolicy, Log, LogConfig, FRAME_HEADER_LEN};

const FRAMES: usize = 20_000;
const PAYLOAD: usize = 300;
const FRAME: usize = FRAME_HEADER_LEN as usize + PAYLOAD;
const FILE_BYTES: usize = FRAMES * FRAME;

fn payloads() -> Vec<Vec<u8>> {
    (0..FRAMES)
        .map(|i| {
            let mut p = format!("{i:0>20}").into_bytes();
            p.resize(PAYLOAD, (i % 251) as u8);
            p
        })
        .collect()
}

/// The frame of `payload`, as the segment log writes it, into `out`.
fn frame_into(out: &mut [u8], payload: &[u8]) {
    let header = frame_header(payload);
    out[..header.len()].copy_from_slice(&header);
    out[header.len()..header.len() + payload.len()].copy_from_slice(payload);
}

/// A fresh file of `FILE_BYTES` with its blocks allocated (so writes into it, and into a mapping of it, can
/// not fail for want of space).
fn allocated(dir: &Path, name: &str) -> File {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create the file");
    // SAFETY: plain system call on an open descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, FILE_BYTES as libc::off_t) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    file
}

/// A shared read-write mapping of the whole of `file`, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// `populate`: fault the pages in now (`MAP_POPULATE`), as a thread preparing the next segment could.
    fn new(file: &File, len: usize, populate: bool) -> Self {
        let flags = if populate {
            libc::MAP_SHARED | libc::MAP_POPULATE
        } else {
            libc::MAP_SHARED
        };
        // SAFETY: maps `len` bytes of an open file of at least that size; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and lives as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Times `iters` bursts, each after an untimed `setup` that returns the state `burst` writes into.
fn bursts<S>(iters: u64, mut setup: impl FnMut() -> S, mut burst: impl FnMut(&mut S)) -> Duration {
    let mut elapsed = Duration::ZERO;
    for _ in 0..iters {
        let mut state = setup();
        let t0 = Instant::now();
        burst(&mut state);
        elapsed += t0.elapsed();
        drop(state);
    }
    elapsed
}

/// `MappedLog::append` per frame, alone and under a `Mutex` taken per frame (as the WAL's submitters take one).
fn mapped_log(g: &mut BenchmarkGroup<'_, WallTime>, payloads: &[Vec<u8>], dir: &Path) {
    for (name, locked) in [
        ("mapped_log_append", false),
        ("mapped_log_append_locked", true),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut round = 0u64;
                bursts(
                    iters,
                    || {
                        round += 1;
                        let path = dir.join(format!("mapped-{round}"));
                        let _ = std::fs::remove_dir_all(&path);
                        let config = MappedConfig {
                            segment_bytes: 64 << 20,
                            fsync: FsyncPolicy::Never,
                            max_frame_bytes: 1 << 20,
                        };
                        let log = MappedLog::open(&path, config).expect("open the log").0;
                        // As in a running WAL, the thread has made the pages ahead writable by now.
                        std::thread::sleep(Duration::from_millis(50));
                        Mutex::new(log)
                    },
                    |log| {
                        if locked {
                            let log: &Mutex<MappedLog> = log;
                            for p in payloads {
                                black_box(log.lock().unwrap().append(p).expect("append"));
                            }
                        } else {
                            let log = log.get_mut().unwrap();
                            for p in payloads {
                                black_box(log.append(p).expect("append"));
                            }
                        }
                    },
                )
            });
        });
    }
}

fn wal_options(c: &mut Criterion) {
    let payloads = payloads();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut g = c.benchmark_group("wal_options_300B_burst");
    g.throughput(Throughput::Elements(FRAMES as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));

    g.bench_function("log_append_flush", |b| {
        b.iter_custom(|iters| {
            let mut round = 0u64;
            bursts(
                iters,
                || {
                    round += 1;
                    let config = LogConfig {
                        fsync: FsyncPolicy::Never,
                        ..LogConfig::default()
                    };
                    let path = dir.path().join(format!("log-{round}"));
                    let _ = std::fs::remove_dir_all(&path);
                    (Log::open(&path, config).expect("open the log").0, path)
                },
                |(log, _)| {
                    for p in &payloads {
                        black_box(log.append(p).expect("append"));
                        log.flush().expect("flush");
                    }
                },
            )
        });
    });

    g.bench_function("pwrite_per_frame", |b| {
        b.iter_custom(|iters| {
            let mut frame = vec![0u8; FRAME];
            bursts(
                iters,
                || allocated(dir.path(), "pwrite"),
                |file| {
                    for (i, p) in payloads.iter().enumerate() {
                        frame_into(&mut frame, p);
                        file.write_all_at(&frame, (i * FRAME) as u64)
                            .expect("pwrite");
                    }
                },
            )
        });
    });

    for (name, populate) in [("mmap_copy", false), ("mmap_copy_populated", true)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                bursts(
                    iters,
                    || {
                        let file = allocated(dir.path(), "mmap");
                        Mapping::new(&file, FILE_BYTES, populate)
                    },
                    |map| {
                        let bytes = map.bytes();
                        for (i, p) in payloads.iter().enumerate() {
                            frame_into(&mut bytes[i * FRAME..(i + 1) * FRAME], p);
                        }
                    },
                )
            });
        });
    }

    mapped_log(&mut g, &payloads, dir.path());

    g.bench_function("memory_copy", |b| {
        b.iter_custom(|iters| {
            bursts(
                iters,
                || vec![0u8; FILE_BYTES],
                |buf| {
                    for (i, p) in payloads.iter().enumerate() {
                        frame_into(&mut buf[i * FRAME..(i + 1) * FRAME], p);
                    }
                    black_box(&buf);
                },
            )
        });
    });
    g.finish();
}

criterion_group!(benches, wal_options);
criterion_main!(benches);
