//! `durability = "wal"` in-process: what a pipeline accepted and never saw acknowledged is replayed by the next
//! pipeline on the same directory; what was acknowledged is not. Then the WAL's storage (`log::mapped`):
//! preallocated segments, a full disk, zeroed and torn tails, rollover under concurrent submitters, a crash in
//! the middle of a segment (a child process killed while it copies a frame). The SIGKILL of a whole producer is
//! tested from Python (tests/integration/test_wal.py).

mod common;
use common::{events_in, ok_response};

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use treasure_core::batch::{BatcherConfig, Overflow, Pipeline};
use treasure_core::log::mapped::{MappedConfig, MappedLog};
use treasure_core::log::{
    FsyncPolicy, Item, Log, LogConfig, LogError, LogReader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use treasure_core::shards::ShardMap;
use treasure_core::wal::WalConfig;
use treasure_core::CoreError;

fn config(dir: &Path) -> BatcherConfig {
    BatcherConfig {
        stream: "s".into(),
        ring_bytes: 1 << 20,
        max_record_bytes: 64 << 10,
        max_request_bytes: 1 << 20,
        aggregation_max_bytes: 16 << 10,
        max_buffered_bytes: 4 << 20,
        linger: Duration::from_millis(2),
        shard_records_per_s: 1e9,
        shard_bytes_per_s: 1e12,
        wal: Some(WalConfig {
            dir: dir.to_path_buf(),
            fsync: FsyncPolicy::Never,
            segment_bytes: 64 << 10,
        }),
        ..BatcherConfig::default()
    }
}

fn ids_in(body: &[u8]) -> Vec<u64> {
    events_in(body)
        .iter()
        .map(|d| std::str::from_utf8(d).unwrap().parse().unwrap())
        .collect()
}

fn deliver_all(p: &Pipeline) -> Vec<u64> {
    let end = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    p.begin_flush();
    loop {
        let s = p.stats();
        if s.in_flight == 0 && s.wal_replay_pending == 0 {
            break;
        }
        assert!(Instant::now() < end, "not delivered in time: {s:?}");
        for req in p.poll(64) {
            seen.extend(ids_in(req.body()));
            let n = req.records();
            p.complete(req, &ok_response(n)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    p.end_flush();
    seen
}

fn submit_range(p: &Pipeline, ids: std::ops::Range<u64>) {
    for i in ids {
        p.submit(
            i.to_string().as_bytes(),
            &format!("k{}", i % 31),
            None,
            Overflow::Reject,
        )
        .unwrap();
    }
}

#[test]
fn unacknowledged_events_are_replayed_and_acknowledged_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pipeline::start(config(dir.path()), ShardMap::even(3)).unwrap();
    submit_range(&first, 0..5_000);
    let delivered: HashSet<u64> = deliver_all(&first).into_iter().collect();
    assert_eq!(delivered.len(), 5_000);
    std::thread::sleep(Duration::from_millis(250)); // the cursor moves at most every 200 ms
    submit_range(&first, 5_000..8_000);
    // The endpoint is gone: stop, leaving the rest in the dead list, never confirmed as stored.
    first.shutdown(true);
    let dead = first.take_dead(usize::MAX).len();
    assert_eq!(dead, 3_000);
    drop(first);

    let second = Pipeline::start(config(dir.path()), ShardMap::even(3)).unwrap();
    let replayed = deliver_all(&second);
    let s = second.stats();
    let replayed_set: HashSet<u64> = replayed.iter().copied().collect();
    assert!(
        (5_000..8_000).all(|i| replayed_set.contains(&i)),
        "every unacknowledged event is replayed"
    );
    assert_eq!(
        s.wal_recovered, 3_000,
        "acknowledged events are not replayed"
    );
    assert_eq!((s.accepted, s.delivered), (3_000, 3_000));
    second.shutdown(false);
    drop(second);

    let third = Pipeline::start(config(dir.path()), ShardMap::even(3)).unwrap();
    assert_eq!(
        third.stats().wal_replay_pending,
        0,
        "everything was acknowledged"
    );
    assert!(deliver_all(&third).is_empty());
    third.shutdown(false);
}

#[test]
fn confirmed_dead_letters_are_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pipeline::start(config(dir.path()), ShardMap::even(1)).unwrap();
    submit_range(&first, 0..1_000);
    first.shutdown(true);
    let n = first.take_dead(usize::MAX).len() as u64;
    first.confirm_dead(n);
    first.finish_wal().unwrap();
    drop(first);
    let second = Pipeline::start(config(dir.path()), ShardMap::even(1)).unwrap();
    assert!(deliver_all(&second).is_empty());
    assert_eq!(second.stats().wal_recovered, 0);
}

#[test]
fn a_full_ring_refuses_before_writing_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_buffered_bytes = 2 << 20;
    cfg.max_ready_requests = 1;
    let first = Pipeline::start(cfg.clone(), ShardMap::even(1)).unwrap();
    let mut accepted = 0u64;
    for i in 0..200_000u64 {
        let data = format!("{i}{}", " ".repeat(200));
        match first.submit(data.trim_end().as_bytes(), "k", None, Overflow::Reject) {
            Ok(()) => accepted += 1,
            Err(CoreError::BufferFull) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(accepted < 200_000, "the ring filled");
    first.shutdown(true);
    let _ = first.take_dead(usize::MAX);
    drop(first);
    let second = Pipeline::start(cfg, ShardMap::even(1)).unwrap();
    let replayed = deliver_all(&second);
    assert_eq!(
        replayed.len() as u64,
        accepted,
        "the refused event never reached the WAL"
    );
}

#[test]
fn a_run_under_one_lock_stops_at_an_invalid_event_and_at_a_full_ring_and_is_replayed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_buffered_bytes = 2 << 20;
    cfg.max_ready_requests = 1;
    let first = Pipeline::start(cfg.clone(), ShardMap::even(1)).unwrap();
    let data: Vec<String> = (0..200_000u64).map(|i| format!("{i:0>200}")).collect();
    let mut events: Vec<(&[u8], &str, Option<u128>)> =
        data.iter().map(|d| (d.as_bytes(), "k", None)).collect();
    events[3].1 = ""; // an empty key: not the run's to judge
    assert_eq!(
        first.offer_wal_run(&events, |e| *e, 1),
        3,
        "stops before the invalid event"
    );
    assert!(matches!(
        first.offer(events[3].0, events[3].1, None, 1, Overflow::Reject, |p| p()),
        Err(CoreError::InvalidPartitionKey(_))
    ));
    let rest = &events[4..];
    let mut run = 0;
    // Runs until the ring is full for good: nobody polls, so the batcher stops taking events once its one ready
    // request and its buffer are full. How long it takes to get there depends on the machine's load: until two
    // waits in a row found no room freed.
    let mut quiet = 0;
    for _ in 0..100 {
        let before = run;
        loop {
            let n = first.offer_wal_run(&rest[run..], |e| *e, 1);
            if n == 0 {
                break;
            }
            run += n;
        }
        quiet = if run == before { quiet + 1 } else { 0 };
        if quiet == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(quiet, 2, "the batcher kept taking events");
    assert!(
        run > 0 && run < rest.len(),
        "stops where the ring is full ({run})"
    );
    let pushed = 3 + run;
    assert!(matches!(
        first.offer(rest[run].0, "k", None, 1, Overflow::Reject, |p| p()),
        Err(CoreError::BufferFull)
    ));
    first.shutdown(true);
    let _ = first.take_dead(usize::MAX);
    drop(first);
    let second = Pipeline::start(cfg, ShardMap::even(1)).unwrap();
    let replayed = deliver_all(&second);
    let expected: Vec<u64> = (0..3).chain(4..4 + run as u64).collect();
    assert_eq!(replayed.len(), pushed);
    assert_eq!(
        replayed, expected,
        "every event of the runs, once, in WAL order"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// The WAL's storage: preallocated, mapped segments

const MAX_FRAME: u32 = 4 << 20;

fn mapped(segment_bytes: u64, fsync: FsyncPolicy) -> MappedConfig {
    MappedConfig {
        segment_bytes,
        fsync,
        max_frame_bytes: MAX_FRAME,
    }
}

/// A payload of `len` bytes for frame `i`, none of them zero (so a torn copy is told from the zeroed tail).
fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| 1 + ((i.wrapping_mul(31) ^ j.wrapping_mul(7)) % 255) as u8)
        .collect()
}

/// Everything a reader finds from the start: frames (position, payload) and the reasons of the damage reported.
fn read_log(dir: &Path, strict: bool) -> (Vec<(u64, Vec<u8>)>, Vec<String>) {
    let mut reader = LogReader::open(dir, 0, MAX_FRAME)
        .unwrap()
        .strict_tail(strict);
    let (mut frames, mut damage) = (Vec::new(), Vec::new());
    while let Some(item) = reader.next_item().unwrap() {
        match item {
            Item::Frame { position, payload } => frames.push((position, payload)),
            Item::Corrupt(c) => damage.push(c.reason),
        }
    }
    (frames, damage)
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    out
}

fn base_of(segment: &Path) -> u64 {
    segment
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn segments_are_allocated_up_front_and_zeros_end_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let (mut log, recovery) = MappedLog::open(&dir, mapped(256 << 10, FsyncPolicy::Never)).unwrap();
    assert!(recovery.is_clean());
    let positions: Vec<u64> = (0..100)
        .map(|i| log.append(&payload(i, 100 + i)).unwrap())
        .collect();
    assert_eq!(positions[0], SEGMENT_HEADER_LEN);
    let end = log.end();
    // The whole segment is allocated: its size is the segment's, zeros after the frames.
    let (seg,) = <[PathBuf; 1]>::try_from(segments(&dir)).unwrap().into();
    let bytes = std::fs::read(&seg).unwrap();
    assert_eq!(bytes.len(), 256 << 10);
    assert!(bytes[end as usize..].iter().all(|&b| b == 0));
    // A live reader sees the frames and nothing more while the writer is open, a strict one the same.
    for strict in [false, true] {
        let (frames, damage) = read_log(&dir, strict);
        assert_eq!(frames.len(), 100);
        assert!(damage.is_empty(), "{damage:?}");
    }
    drop(log);
    assert!(
        std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")),
        "no prepared segment left behind at close"
    );
}

#[test]
fn recovery_stops_at_the_zeroed_tail_and_appends_continue_there() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let (mut log, _) = MappedLog::open(
        &dir,
        mapped(1 << 20, FsyncPolicy::Interval(Duration::from_millis(5))),
    )
    .unwrap();
    for i in 0..500 {
        log.append(&payload(i, 200)).unwrap();
    }
    let end = log.end();
    log.close().unwrap();

    let (mut log, recovery) = MappedLog::open(&dir, mapped(1 << 20, FsyncPolicy::Never)).unwrap();
    assert!(recovery.is_clean(), "{recovery:?}");
    assert_eq!(
        (recovery.frames, recovery.position, log.end()),
        (500, end, end)
    );
    assert_eq!(
        log.append(b"after").unwrap(),
        end,
        "the next frame goes where the frames end"
    );
    drop(log);
    let (frames, damage) = read_log(&dir, true);
    assert!(damage.is_empty(), "{damage:?}");
    assert_eq!(frames.len(), 501);
    assert_eq!(frames[500], (end, b"after".to_vec()));
}

#[test]
fn a_torn_frame_at_the_tail_is_zeroed_and_written_over() {
    // The frame being copied when the process died: its payload partly there, its header written or not.
    for header_written in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let (mut log, _) = MappedLog::open(&dir, mapped(1 << 20, FsyncPolicy::Never)).unwrap();
        for i in 0..50 {
            log.append(&payload(i, 300)).unwrap();
        }
        let end = log.end();
        drop(log);
        let seg = segments(&dir).pop().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        let torn = payload(99, 150); // half of a 300-byte payload
        file.write_all_at(&torn, end + FRAME_HEADER_LEN).unwrap();
        if header_written {
            let mut header = Vec::new();
            header.extend_from_slice(&0x5AFE_C0DE_u32.to_le_bytes());
            header.extend_from_slice(&300u32.to_le_bytes());
            header.extend_from_slice(&0x1234_5678_u32.to_le_bytes());
            file.write_all_at(&header, end).unwrap();
        }
        drop(file);

        let (mut log, recovery) =
            MappedLog::open(&dir, mapped(1 << 20, FsyncPolicy::Never)).unwrap();
        let torn_bytes = FRAME_HEADER_LEN + 150; // from where the torn frame starts to its last byte written
        assert_eq!(recovery.frames, 50);
        assert_eq!(recovery.position, end);
        assert_eq!(recovery.truncated_bytes, torn_bytes, "{recovery:?}");
        assert!(recovery.reason.as_deref().unwrap().contains("torn tail"));
        assert_eq!(log.end(), end);
        // A shorter frame where the torn one was: nothing of the torn one is left behind it.
        assert_eq!(log.append(b"short").unwrap(), end);
        drop(log);
        let bytes = std::fs::read(&seg).unwrap();
        let after = (end + FRAME_HEADER_LEN + 5) as usize;
        assert!(
            bytes[after..].iter().all(|&b| b == 0),
            "the torn bytes are zeroed"
        );
        for strict in [false, true] {
            let (frames, damage) = read_log(&dir, strict);
            assert!(damage.is_empty(), "{damage:?}");
            assert_eq!(frames.len(), 51);
        }
    }
}

#[test]
fn a_zeroed_hole_before_valid_frames_is_reported_and_the_segment_closed_there() {
    // Pages written back without the ones before them (a crash of the machine): zeros, then valid frames.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let (mut log, _) = MappedLog::open(&dir, mapped(1 << 20, FsyncPolicy::Never)).unwrap();
    let positions: Vec<u64> = (0..40)
        .map(|i| log.append(&payload(i, 200)).unwrap())
        .collect();
    let end = log.end();
    drop(log);
    let seg = segments(&dir).pop().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    file.write_all_at(&[0u8; 212 * 3], positions[10]).unwrap(); // frames 10, 11, 12
    drop(file);

    let (mut log, recovery) = MappedLog::open(&dir, mapped(1 << 20, FsyncPolicy::Never)).unwrap();
    assert_eq!(
        (recovery.frames, recovery.damaged_ranges),
        (37, 1),
        "{recovery:?}"
    );
    // Closed at its last valid frame: the next segment starts there.
    assert_eq!(log.end(), end + SEGMENT_HEADER_LEN);
    let after = log.append(b"next").unwrap();
    drop(log);
    let segs = segments(&dir);
    assert_eq!(segs.len(), 2);
    assert_eq!(base_of(&segs[1]), end);
    for strict in [false, true] {
        let (frames, damage) = read_log(&dir, strict);
        assert_eq!(
            damage,
            vec!["zeroed range".to_string()],
            "reported once, as zeros"
        );
        assert_eq!(frames.len(), 38);
        assert_eq!(frames.last().unwrap(), &(after, b"next".to_vec()));
    }
}

#[test]
fn a_zeroed_range_in_a_closed_segment_is_damage_and_reading_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let (mut log, _) = MappedLog::open(&dir, mapped(64 << 10, FsyncPolicy::Never)).unwrap();
    let positions: Vec<u64> = (0..400)
        .map(|i| log.append(&payload(i, 500)).unwrap())
        .collect();
    drop(log);
    let segs = segments(&dir);
    assert!(segs.len() >= 3);
    // The last frame of the first segment never reached the disk.
    let second = base_of(&segs[1]);
    let last_of_first = *positions.iter().filter(|&&p| p < second).max().unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[0])
        .unwrap();
    file.write_all_at(&[0u8; 512], last_of_first).unwrap();
    drop(file);
    for strict in [false, true] {
        let (frames, damage) = read_log(&dir, strict);
        assert_eq!(damage, vec!["zeroed range".to_string()]);
        assert_eq!(frames.len(), 399);
    }
}

#[test]
fn a_wal_of_version_1_segments_is_continued_in_preallocated_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let config = LogConfig {
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    };
    let (old, _) = Log::open(&dir, config).unwrap();
    for i in 0..20 {
        old.append(&payload(i, 100)).unwrap();
    }
    old.set_cursor("acked", 16).unwrap();
    let end = old.end();
    old.close().unwrap();
    let (mut log, recovery) = MappedLog::open(&dir, mapped(1 << 20, FsyncPolicy::Never)).unwrap();
    assert_eq!(recovery.frames, 20);
    assert_eq!(
        log.end(),
        end + SEGMENT_HEADER_LEN,
        "a new segment after the old one"
    );
    assert_eq!(log.cursor("acked").unwrap(), Some(16));
    log.append(b"new").unwrap();
    drop(log);
    let (frames, damage) = read_log(&dir, true);
    assert!(damage.is_empty(), "{damage:?}");
    assert_eq!(frames.len(), 21);
}

#[test]
fn rollover_under_concurrent_writers_keeps_every_frame_once_in_order() {
    for fsync in [
        FsyncPolicy::Never,
        FsyncPolicy::Interval(Duration::from_millis(2)),
        FsyncPolicy::Always,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let (log, _) = MappedLog::open(&dir, mapped(32 << 10, fsync)).unwrap();
        let handle = log.handle();
        let log = Arc::new(Mutex::new(log));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (log, handle) = (Arc::clone(&log), handle.clone());
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..1_500 {
                        let p = format!("{t}:{i}:{}", "x".repeat(i % 200)).into_bytes();
                        mine.push((log.lock().unwrap().append(&p).unwrap(), p));
                        if fsync == FsyncPolicy::Always && i % 100 == 0 {
                            handle.sync().unwrap(); // outside the writer's lock, as the WAL's commit
                        }
                    }
                    mine
                })
            })
            .collect();
        let mut written: Vec<(u64, Vec<u8>)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let log = Arc::try_unwrap(log).unwrap().into_inner().unwrap();
        assert!(log.segments() > 20, "rolled: {} segments", log.segments());
        log.close().unwrap();
        written.sort();
        let (frames, damage) = read_log(&dir, true);
        assert!(damage.is_empty(), "{fsync:?}: {damage:?}");
        assert_eq!(
            frames, written,
            "{fsync:?}: every frame once, at the position its append returned"
        );
    }
}

#[test]
fn rollover_under_concurrent_submitters_replays_every_event_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    if let Some(wal) = cfg.wal.as_mut() {
        wal.segment_bytes = 16 << 10;
        wal.fsync = FsyncPolicy::Interval(Duration::from_millis(2));
    }
    cfg.ring_bytes = 8 << 20;
    let first = Arc::new(Pipeline::start(cfg.clone(), ShardMap::even(3)).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let p = Arc::clone(&first);
            std::thread::spawn(move || submit_range(&p, t * 10_000..t * 10_000 + 3_000))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        segments(tmp.path()).len() > 3,
        "rolled while four threads submitted"
    );
    first.shutdown(true);
    assert_eq!(first.take_dead(usize::MAX).len(), 12_000);
    drop(first);
    let second = Pipeline::start(cfg, ShardMap::even(3)).unwrap();
    let replayed = deliver_all(&second);
    let unique: HashSet<u64> = replayed.iter().copied().collect();
    assert_eq!(replayed.len(), 12_000, "each once");
    assert!((0..4u64).all(|t| (t * 10_000..t * 10_000 + 3_000).all(|i| unique.contains(&i))));
    assert_eq!(second.stats().wal_errors, 0);
}

/// A child process (this test binary again) appends frames and is killed (SIGKILL) while it copies the next one
/// into the mapping: its payload half there, its header not.
#[test]
fn recovery_after_a_crash_in_the_middle_of_a_segment() {
    const CHILD: &str = "TREASURE_WAL_CRASH_CHILD";
    const FRAMES: usize = 300;
    if let Some(dir) = std::env::var_os(CHILD) {
        let (mut log, _) =
            MappedLog::open(Path::new(&dir), mapped(1 << 20, FsyncPolicy::Never)).unwrap();
        for i in 0..FRAMES {
            log.append(&payload(i, 400)).unwrap();
        }
        log.append_with(400, |frame| {
            frame[..200].copy_from_slice(&payload(FRAMES, 200));
            // SAFETY: kill(2) on this process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_secs(10));
        })
        .unwrap();
        unreachable!("killed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "recovery_after_a_crash_in_the_middle_of_a_segment",
            "--nocapture",
        ])
        .env(CHILD, &dir)
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert_eq!(segments(&dir).len(), 1, "mid-segment");

    let (mut log, recovery) = MappedLog::open(&dir, mapped(1 << 20, FsyncPolicy::Never)).unwrap();
    let end = SEGMENT_HEADER_LEN + FRAMES as u64 * (FRAME_HEADER_LEN + 400);
    assert_eq!(recovery.frames, FRAMES as u64);
    assert_eq!((recovery.position, log.end()), (end, end));
    assert_eq!(
        recovery.truncated_bytes,
        FRAME_HEADER_LEN + 200,
        "the torn frame (its header never written, half its payload) zeroed"
    );
    assert_eq!(log.append(b"after the crash").unwrap(), end);
    drop(log);
    let (frames, damage) = read_log(&dir, true);
    assert!(damage.is_empty(), "{damage:?}");
    assert_eq!(frames.len(), FRAMES + 1);
    assert!(frames[..FRAMES]
        .iter()
        .enumerate()
        .all(|(i, (_, p))| *p == payload(i, 400)));
}

/// Runs `check` with a directory on a file system of `bytes`: a tmpfs of that size mounted for the test when
/// this process may mount one (root), else in a child process (this test again) whose largest file is `bytes`
/// (RLIMIT_FSIZE, with SIGXFSZ ignored so that an allocation past it is an error, EFBIG). `check` learns which.
fn on_a_small_disk(test: &str, bytes: u64, check: impl FnOnce(&Path, bool)) {
    const CHILD: &str = "TREASURE_SMALL_DISK_CHILD";
    if std::env::var(CHILD).as_deref() == Ok(test) {
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: plain system calls on this (child) process.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &raw const limit), 0);
        }
        let tmp = tempfile::tempdir().unwrap();
        check(tmp.path(), false);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let target = std::ffi::CString::new(tmp.path().to_str().unwrap()).unwrap();
    let options = std::ffi::CString::new(format!("size={bytes},mode=0700")).unwrap();
    // SAFETY: mount(2) with valid C strings; fails (EPERM) unless this process may mount.
    let mounted = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    } == 0;
    if mounted {
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(tmp.path(), true)));
        // SAFETY: unmounts what was mounted just above.
        unsafe {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(CHILD, test)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the child ended with {status:?} (a SIGBUS would show here)"
    );
}

fn is_allocation_error(e: &LogError) -> bool {
    matches!(e, LogError::Io { op: "allocate segment", source, .. }
        if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EFBIG)))
}

#[test]
fn a_full_disk_is_an_error_when_a_segment_is_allocated_not_a_sigbus() {
    on_a_small_disk(
        "a_full_disk_is_an_error_when_a_segment_is_allocated_not_a_sigbus",
        1 << 20,
        |tmp, tmpfs| {
            // A first segment larger than the disk: opening fails, typed.
            let too_big = MappedLog::open(&tmp.join("big"), mapped(2 << 20, FsyncPolicy::Never));
            assert!(
                matches!(&too_big, Err(e) if is_allocation_error(e)),
                "{too_big:?}"
            );

            // Through the pipeline: an event whose frame needs a segment of its own larger than the disk is
            // refused with the storage error (Python: LogError), the pipeline goes on, and nothing it accepted
            // is lost.
            let dir = tmp.join("wal");
            let mut cfg = config(&dir);
            cfg.ring_bytes = 16 << 20;
            cfg.max_record_bytes = 2 << 20;
            cfg.max_request_bytes = 2 << 20;
            cfg.max_buffered_bytes = 8 << 20;
            cfg.wal = Some(WalConfig {
                dir: dir.clone(),
                fsync: FsyncPolicy::Never,
                segment_bytes: 128 << 10,
            });
            let first = Pipeline::start(cfg.clone(), ShardMap::even(1)).unwrap();
            submit_range(&first, 0..100);
            let huge = format!("100{}", " ".repeat(1_500_000));
            match first.submit(huge.as_bytes(), "k", None, Overflow::Reject) {
                Err(CoreError::Storage(why)) => assert!(why.contains("allocate segment"), "{why}"),
                other => panic!("{other:?}"),
            }
            submit_range(&first, 101..200);
            let mut accepted: HashSet<u64> = (0..200).filter(|&i| i != 100).collect();
            if tmpfs {
                // Fill the disk with ordinary events: the roll that finds no room refuses the event, typed.
                let mut i = 1_000u64;
                loop {
                    let data = format!("{i:0>4000}"); // 4,000 bytes that still parse as the id
                    match first.submit(data.as_bytes(), "k", None, Overflow::Reject) {
                        Ok(()) => {
                            accepted.insert(i);
                        }
                        Err(CoreError::Storage(why)) => {
                            assert!(why.contains("allocate segment"), "{why}");
                            break;
                        }
                        Err(e) => panic!("{e}"),
                    }
                    i += 1;
                    assert!(i < 1_000 + 1_000, "the disk never filled");
                }
            }
            first.shutdown(true);
            let _ = first.take_dead(usize::MAX);
            drop(first);
            let second = Pipeline::start(cfg, ShardMap::even(1)).unwrap();
            let replayed: HashSet<u64> = deliver_all(&second).into_iter().collect();
            assert_eq!(replayed, accepted, "every accepted event, and only those");
        },
    );
}
