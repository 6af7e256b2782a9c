//! The segment log against real files: round trips, rolls, reopen and recovery, cursors, the lock, file modes,
//! retention, failed writes, a live reader beside concurrent writers, and a property test that damages segment
//! files at random and checks exactly what a reader returns.
//!
//! Tests that need a process of their own (the lock across processes, a file-size limit, a read-only directory)
//! run this test binary again with `TE_LOG_TEST_CHILD` naming the test; the child does the checks.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use proptest::collection::vec;
use proptest::prelude::*;
use tempfile::TempDir;
use treasure_core::log::{
    Corruption, FsyncPolicy, Item, Log, LogConfig, LogError, LogReader, FRAME_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};

const MAX_FRAME: u32 = 1 << 20;
const CHILD_ENV: &str = "TE_LOG_TEST_CHILD";

fn config() -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

fn small(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        ..config()
    }
}

fn log_dir(tmp: &TempDir) -> PathBuf {
    tmp.path().join("log")
}

fn payload(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (seed.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8)
        .collect()
}

fn read_all(dir: &Path, from: u64, strict: bool) -> Vec<Item> {
    let mut reader = LogReader::open(dir, from, MAX_FRAME)
        .unwrap()
        .strict_tail(strict);
    let mut items = Vec::new();
    while let Some(item) = reader.next_item().unwrap() {
        items.push(item);
    }
    items
}

fn frames(items: &[Item]) -> Vec<(u64, Vec<u8>)> {
    items
        .iter()
        .filter_map(|item| match item {
            Item::Frame { position, payload } => Some((*position, payload.clone())),
            Item::Corrupt(_) => None,
        })
        .collect()
}

fn corruptions(items: &[Item]) -> Vec<Corruption> {
    items
        .iter()
        .filter_map(|item| match item {
            Item::Corrupt(c) => Some(c.clone()),
            Item::Frame { .. } => None,
        })
        .collect()
}

/// Segment files of `dir` with their bases, sorted.
fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| (p.file_stem().unwrap().to_str().unwrap().parse().unwrap(), p))
        .collect();
    out.sort();
    out
}

fn frame_len(payload: &[u8]) -> u64 {
    FRAME_HEADER_LEN + payload.len() as u64
}

/// A reader following the log from position 0 as it is written, until it has read `want` frames (60 s at
/// most); a corruption it meets fails the test.
fn live_reader(dir: &Path, want: usize) -> thread::JoinHandle<Vec<(u64, Vec<u8>)>> {
    let dir = dir.to_path_buf();
    thread::spawn(move || {
        let mut reader = LogReader::open(&dir, 0, MAX_FRAME).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < want {
            assert!(
                Instant::now() < deadline,
                "reader stuck at {}",
                reader.position()
            );
            match reader.next_item().unwrap() {
                Some(Item::Frame { position, payload }) => got.push((position, payload)),
                Some(Item::Corrupt(c)) => panic!("live reader reported {c:?}"),
                None => thread::sleep(Duration::from_micros(200)),
            }
        }
        got
    })
}

/// `threads` threads each make `per_thread` calls of `write(log, thread, call)`, which appends a payload and
/// returns its position and bytes; returns them all, sorted by position.
fn write_from_threads(
    log: &Arc<Log>,
    threads: usize,
    per_thread: usize,
    write: fn(&Log, usize, usize) -> (u64, Vec<u8>),
) -> Vec<(u64, Vec<u8>)> {
    let writers: Vec<_> = (0..threads)
        .map(|t| {
            let log = Arc::clone(log);
            thread::spawn(move || {
                (0..per_thread)
                    .map(|i| write(&log, t, i))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut written: Vec<_> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    written.sort();
    written
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn is_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == name)
}

/// Runs the test `name` of this binary in a new process (which then takes the `is_child` branch).
fn run_child(name: &str, env: &[(&str, String)]) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {name} failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "child {name} did not run the test:\n{text}"
    );
}

fn child_dir() -> PathBuf {
    PathBuf::from(std::env::var("TE_LOG_DIR").unwrap())
}

#[test]
fn log_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}
    assert_send_sync::<Log>();
    assert_send::<LogReader>();
}

#[test]
fn round_trip_with_monotonic_positions() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, recovery) = Log::open(&dir, config()).unwrap();
    assert!(recovery.is_clean());
    assert_eq!(recovery.segment, None);
    assert_eq!(
        (log.start(), log.end()),
        (SEGMENT_HEADER_LEN, SEGMENT_HEADER_LEN)
    );

    let payloads: Vec<Vec<u8>> = (0..200).map(|i| payload(i, i * 7 % 300)).collect();
    let mut expected = Vec::new();
    let mut next = SEGMENT_HEADER_LEN;
    for p in &payloads {
        let position = log.append(p).unwrap();
        assert_eq!(position, next);
        expected.push((position, p.clone()));
        next += frame_len(p);
    }
    assert_eq!(log.end(), next);
    log.flush().unwrap();
    let stats = log.stats();
    assert_eq!(stats.appended_frames, 200);
    assert_eq!(
        stats.appended_bytes,
        payloads.iter().map(|p| p.len() as u64).sum::<u64>()
    );
    assert_eq!(
        (stats.buffered_bytes, stats.disk_bytes, stats.segments),
        (0, next, 1)
    );

    let items = read_all(&dir, 0, true);
    assert_eq!(frames(&items), expected);
    assert!(corruptions(&items).is_empty());
}

#[test]
fn append_many_gives_consecutive_positions() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    let first = log.append_many(&[b"a".as_slice(), b"", b"ccc"]).unwrap();
    assert_eq!(first, vec![16, 16 + 13, 16 + 13 + 12]);
    let owned = vec![b"dd".to_vec(), b"e".to_vec()];
    let second = log.append_many(&owned).unwrap();
    assert_eq!(second, vec![16 + 13 + 12 + 15, 16 + 13 + 12 + 15 + 14]);
    // A payload over the limit refuses the whole batch before anything is appended.
    let (small_log, _) = Log::open(
        &tmp.path().join("small"),
        LogConfig {
            max_frame_bytes: 4,
            ..config()
        },
    )
    .unwrap();
    assert!(matches!(
        small_log.append_many(&[b"ok".as_slice(), b"too long"]),
        Err(LogError::FrameTooLarge { size: 8, max: 4 })
    ));
    assert_eq!(small_log.end(), 16);
    log.close().unwrap();
    let got: Vec<Vec<u8>> = frames(&read_all(&dir, 0, true))
        .into_iter()
        .map(|f| f.1)
        .collect();
    assert_eq!(
        got,
        vec![
            b"a".to_vec(),
            vec![],
            b"ccc".to_vec(),
            b"dd".to_vec(),
            b"e".to_vec()
        ]
    );
}

#[test]
fn frame_size_limit() {
    let tmp = TempDir::new().unwrap();
    let (log, _) = Log::open(
        &log_dir(&tmp),
        LogConfig {
            max_frame_bytes: 100,
            ..config()
        },
    )
    .unwrap();
    assert_eq!(log.append(&[7; 100]).unwrap(), 16);
    assert!(matches!(
        log.append(&[7; 101]),
        Err(LogError::FrameTooLarge {
            size: 101,
            max: 100
        })
    ));
    assert_eq!(log.end(), 16 + 112);
}

#[test]
fn reader_sees_only_flushed_frames() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    let mut reader = LogReader::open(&dir, 0, MAX_FRAME).unwrap();
    let position = log.append(b"one").unwrap();
    assert_eq!(reader.next_item().unwrap(), None);
    assert_eq!(log.stats().buffered_bytes, 15);
    log.flush().unwrap();
    assert_eq!(
        reader.next_item().unwrap(),
        Some(Item::Frame {
            position,
            payload: b"one".to_vec()
        })
    );
    assert_eq!(reader.position(), position + 15);
    assert_eq!(reader.next_item().unwrap(), None);
    log.append(b"two").unwrap();
    log.commit().unwrap(); // policy Never: commit is a flush
    assert!(
        matches!(reader.next_item().unwrap(), Some(Item::Frame { payload, .. }) if payload == b"two")
    );
}

#[test]
fn rolls_across_segments() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    // 16 + 2 * 112 = 240 <= 256: two 100-byte frames per segment.
    let (log, _) = Log::open(&dir, small(256)).unwrap();
    let positions: Vec<u64> = (0..10)
        .map(|i| log.append(&payload(i, 100)).unwrap())
        .collect();
    log.flush().unwrap();
    let segs = segments(&dir);
    let bases: Vec<u64> = segs.iter().map(|s| s.0).collect();
    assert_eq!(bases, vec![0, 240, 480, 720, 960]);
    for (i, (base, path)) in segs.iter().enumerate() {
        assert_eq!(fs::metadata(path).unwrap().len(), 240, "segment {base}");
        assert_eq!(positions[2 * i], base + 16);
        assert_eq!(positions[2 * i + 1], base + 16 + 112);
    }
    let stats = log.stats();
    assert_eq!(
        (stats.segments, stats.rolls, stats.start, stats.end),
        (5, 4, 16, 1200)
    );
    let items = read_all(&dir, 0, true);
    let expected: Vec<_> = positions
        .iter()
        .enumerate()
        .map(|(i, &p)| (p, payload(i, 100)))
        .collect();
    assert_eq!(frames(&items), expected);
    assert!(corruptions(&items).is_empty());
    // From the middle of the log (a position an append returned).
    assert_eq!(
        frames(&read_all(&dir, positions[5], true)),
        expected[5..].to_vec()
    );
}

#[test]
fn a_frame_larger_than_a_segment_goes_alone_into_a_fresh_one() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, small(256)).unwrap();
    let a = log.append(b"small").unwrap();
    let big = log.append(&[9; 1000]).unwrap();
    let c = log.append(b"after").unwrap();
    log.close().unwrap();
    assert_eq!((a, big, c), (16, 33 + 16, 33 + 16 + 1012 + 16));
    let sizes: Vec<(u64, u64)> = segments(&dir)
        .iter()
        .map(|(b, p)| (*b, fs::metadata(p).unwrap().len()))
        .collect();
    assert_eq!(
        sizes,
        vec![(0, 33), (33, 16 + 1012), (33 + 16 + 1012, 16 + 17)]
    );
    let got: Vec<u64> = frames(&read_all(&dir, 0, true))
        .iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(got, vec![a, big, c]);
}

#[test]
fn reopen_continues_at_the_end() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, small(300)).unwrap();
    for i in 0..7 {
        log.append(&payload(i, 90)).unwrap();
    }
    let end = log.end();
    log.close().unwrap();

    let (log, recovery) = Log::open(&dir, small(300)).unwrap();
    assert!(recovery.is_clean(), "{recovery:?}");
    assert_eq!(recovery.frames, 1); // 16 + 2 * 102 + 102 > 300: the last segment holds one frame
    assert_eq!(recovery.position, end);
    assert_eq!(log.end(), end);
    assert_eq!(log.append(b"later").unwrap(), end);
    drop(log); // drop flushes
    let items = read_all(&dir, 0, true);
    assert_eq!(frames(&items).len(), 8);
    assert_eq!(frames(&items)[7], (end, b"later".to_vec()));
}

#[test]
fn drop_flushes_and_releases_the_lock() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(
        &dir,
        LogConfig {
            fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
            ..config()
        },
    )
    .unwrap();
    log.append(b"kept").unwrap();
    drop(log);
    assert_eq!(
        frames(&read_all(&dir, 0, true)),
        vec![(16, b"kept".to_vec())]
    );
    let (again, _) = Log::open(&dir, config()).unwrap();
    assert_eq!(again.end(), 16 + 16);
}

#[test]
fn torn_tail_is_cut_on_open() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    for i in 0..3 {
        log.append(&payload(i, 40)).unwrap();
    }
    let end = log.end();
    log.close().unwrap();
    let seg = segments(&dir)[0].1.clone();
    let mut bytes = fs::read(&seg).unwrap();
    // A crash in the middle of a write: the first 20 bytes of a copy of the first frame.
    let torn: Vec<u8> = bytes[16..36].to_vec();
    bytes.extend_from_slice(&torn);
    fs::write(&seg, &bytes).unwrap();

    // A live reader waits at the torn frame; a strict one reports it.
    assert!(corruptions(&read_all(&dir, 0, false)).is_empty());
    let strict = corruptions(&read_all(&dir, 0, true));
    assert_eq!(strict.len(), 1);
    assert_eq!(
        (
            strict[0].position,
            strict[0].length,
            strict[0].reason.as_str()
        ),
        (end, 20, "truncated frame")
    );

    let (log, recovery) = Log::open(&dir, config()).unwrap();
    assert_eq!(
        (recovery.truncated_bytes, recovery.position, recovery.frames),
        (20, end, 3)
    );
    assert!(
        recovery.reason.as_deref().unwrap().contains("torn"),
        "{recovery:?}"
    );
    assert_eq!(fs::metadata(&seg).unwrap().len(), end);
    assert_eq!(log.append(b"next").unwrap(), end);
    log.close().unwrap();
    let items = read_all(&dir, 0, true);
    assert!(corruptions(&items).is_empty(), "{items:?}");
    assert_eq!(frames(&items).len(), 4);

    // Garbage that does not even start like a frame is a damaged tail too.
    let mut bytes = fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0xAB; 7]);
    fs::write(&seg, &bytes).unwrap();
    let (log, recovery) = Log::open(&dir, config()).unwrap();
    assert_eq!(recovery.truncated_bytes, 7);
    assert_eq!(log.end(), end + 16);
}

#[test]
fn damage_inside_the_active_segment_is_left_for_readers() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    let positions: Vec<u64> = (0..5)
        .map(|i| log.append(&payload(i, 30)).unwrap())
        .collect();
    let end = log.end();
    log.close().unwrap();
    let seg = segments(&dir)[0].1.clone();
    let mut bytes = fs::read(&seg).unwrap();
    bytes[positions[2] as usize + 20] ^= 0x04; // a payload byte of the third frame
    fs::write(&seg, &bytes).unwrap();

    let (log, recovery) = Log::open(&dir, config()).unwrap();
    assert_eq!(
        (
            recovery.damaged_ranges,
            recovery.truncated_bytes,
            recovery.frames
        ),
        (1, 0, 4)
    );
    assert!(!recovery.is_clean());
    assert!(
        recovery.reason.as_deref().unwrap().contains("closed there"),
        "{recovery:?}"
    );
    // The damaged segment is closed where it ends; appends go to a new one.
    assert_eq!(log.end(), end + SEGMENT_HEADER_LEN);
    let after = log.append(b"after").unwrap();
    log.close().unwrap();
    assert_eq!(fs::read(&seg).unwrap(), bytes);
    assert_eq!(
        segments(&dir).iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![0, end]
    );

    let items = read_all(&dir, 0, true);
    let bad = corruptions(&items);
    assert_eq!(bad.len(), 1);
    assert_eq!((bad[0].position, bad[0].length), (positions[2], 42));
    assert_eq!(bad[0].reason, "checksum mismatch");
    assert_eq!(bad[0].segment, seg);
    let got: Vec<u64> = frames(&items).iter().map(|f| f.0).collect();
    assert_eq!(
        got,
        vec![
            positions[0],
            positions[1],
            positions[3],
            positions[4],
            after
        ]
    );
}

/// Found by the `log_read` fuzz target. A damaged frame whose header claims bytes past the last valid frame
/// (here: a frame holding a whole frame, then the first two bytes of a sync marker, damaged in those two bytes)
/// must not come back to life when recovery cuts the tail and an append writes those same bytes again: readers
/// would then return the old frame and skip the new one.
#[test]
fn an_append_after_recovery_cannot_revive_a_damaged_frame() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    let first = log.append(b"first").unwrap();
    let inner = b"inner frame";
    let mut outer = b"pad".to_vec();
    outer.extend_from_slice(&treasure_core::log::frame_header(inner));
    outer.extend_from_slice(inner);
    let sync = treasure_core::log::FRAME_SYNC.to_le_bytes();
    outer.extend_from_slice(&sync[..2]);
    let at = log.append(&outer).unwrap();
    let end = log.end();
    log.close().unwrap();
    let seg = segments(&dir)[0].1.clone();
    let mut bytes = fs::read(&seg).unwrap();
    bytes[(end - 2) as usize] ^= 0x40; // the outer frame's checksum fails; the inner one is valid
    fs::write(&seg, &bytes).unwrap();

    let (log, recovery) = Log::open(&dir, config()).unwrap();
    assert_eq!(
        (recovery.damaged_ranges, recovery.truncated_bytes),
        (1, 2),
        "{recovery:?}"
    );
    let inner_at = at + FRAME_HEADER_LEN + 3;
    assert_eq!(recovery.position, end - 2);
    let after = log.append(b"after recovery").unwrap();
    log.close().unwrap();

    let got = frames(&read_all(&dir, 0, true));
    assert_eq!(
        got,
        vec![
            (first, b"first".to_vec()),
            (inner_at, inner.to_vec()),
            (after, b"after recovery".to_vec())
        ]
    );
}

#[test]
fn short_header_of_an_empty_last_segment_is_rewritten() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, small(128)).unwrap();
    log.append(&[1; 80]).unwrap();
    log.append(&[2; 80]).unwrap(); // rolls: the second segment starts at 108
    log.close().unwrap();
    let last = segments(&dir)[1].clone();
    assert_eq!(last.0, 108);
    fs::write(&last.1, b"TESEG").unwrap(); // a crash while the segment was being created

    assert!(frames(&read_all(&dir, 0, false)).len() == 1); // live: waits for the header
    let (log, recovery) = Log::open(&dir, small(128)).unwrap();
    assert!(
        recovery.reason.as_deref().unwrap().contains("rewrote"),
        "{recovery:?}"
    );
    assert_eq!(log.end(), 108 + 16);
    assert_eq!(log.append(b"x").unwrap(), 124);
    log.close().unwrap();
    let items = read_all(&dir, 0, true);
    assert!(corruptions(&items).is_empty(), "{items:?}");
    assert_eq!(
        frames(&items).iter().map(|f| f.0).collect::<Vec<_>>(),
        vec![16, 124]
    );
}

#[test]
fn damaged_header_with_frames_starts_a_new_segment() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    log.append(b"first").unwrap();
    log.append(b"second").unwrap();
    let end = log.end();
    log.close().unwrap();
    let seg = segments(&dir)[0].1.clone();
    let mut bytes = fs::read(&seg).unwrap();
    bytes[3] = b'X';
    fs::write(&seg, &bytes).unwrap();

    let (log, recovery) = Log::open(&dir, config()).unwrap();
    assert!(
        recovery
            .reason
            .as_deref()
            .unwrap()
            .contains("damaged header"),
        "{recovery:?}"
    );
    assert_eq!(recovery.position, end);
    assert_eq!(log.append(b"third").unwrap(), end + 16);
    log.close().unwrap();
    assert_eq!(fs::read(&seg).unwrap(), bytes); // left as it was

    let items = read_all(&dir, 0, true);
    let bad = corruptions(&items);
    assert_eq!(bad.len(), 1);
    assert_eq!(
        (bad[0].position, bad[0].length, bad[0].reason.as_str()),
        (0, 16, "bad segment header")
    );
    let got: Vec<Vec<u8>> = frames(&items).into_iter().map(|f| f.1).collect();
    assert_eq!(
        got,
        vec![b"first".to_vec(), b"second".to_vec(), b"third".to_vec()]
    );
}

#[test]
fn live_reader_waits_at_an_incomplete_tail_strict_reader_reports_it() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    log.append(b"whole").unwrap();
    log.close().unwrap();
    let seg = segments(&dir)[0].1.clone();
    let whole = fs::read(&seg).unwrap();
    let frame = whole[16..].to_vec();
    // Every prefix of a second frame: live readers wait (no report); strict readers report exactly the prefix.
    for cut in 1..frame.len() {
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&frame[..cut]);
        fs::write(&seg, &bytes).unwrap();
        let live = read_all(&dir, 0, false);
        assert_eq!(
            live,
            vec![Item::Frame {
                position: 16,
                payload: b"whole".to_vec()
            }],
            "cut {cut}"
        );
        let strict = corruptions(&read_all(&dir, 0, true));
        assert_eq!(strict.len(), 1, "cut {cut}");
        assert_eq!((strict[0].position, strict[0].length), (33, cut as u64));
    }
    // Once the rest arrives, the waiting reader returns the frame.
    let mut reader = LogReader::open(&dir, 0, MAX_FRAME).unwrap();
    assert!(matches!(
        reader.next_item().unwrap(),
        Some(Item::Frame { .. })
    ));
    assert_eq!(reader.next_item().unwrap(), None);
    let mut bytes = whole.clone();
    bytes.extend_from_slice(&frame);
    fs::write(&seg, &bytes).unwrap();
    assert_eq!(
        reader.next_item().unwrap(),
        Some(Item::Frame {
            position: 33,
            payload: b"whole".to_vec()
        })
    );
}

#[test]
fn reader_skips_a_frame_over_its_limit_and_reports_it() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    log.append(&[1; 10]).unwrap();
    let big = log.append(&[2; 500]).unwrap();
    let after = log.append(&[3; 10]).unwrap();
    log.close().unwrap();
    let mut reader = LogReader::open(&dir, 0, 100).unwrap();
    assert!(matches!(
        reader.next_item().unwrap(),
        Some(Item::Frame { position: 16, .. })
    ));
    match reader.next_item().unwrap() {
        Some(Item::Corrupt(c)) => {
            assert_eq!((c.position, c.length), (big, 512));
            assert!(
                c.reason.contains("exceeds max_frame_bytes=100"),
                "{}",
                c.reason
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(reader.next_item().unwrap(), Some(Item::Frame { position, .. }) if position == after)
    );
    // Reopening the writer with the smaller limit does not cut the larger frame.
    let (log, recovery) = Log::open(
        &dir,
        LogConfig {
            max_frame_bytes: 100,
            ..config()
        },
    )
    .unwrap();
    assert!(recovery.is_clean(), "{recovery:?}");
    assert_eq!(recovery.frames, 3);
    drop(log);
}

#[test]
fn reader_opened_inside_a_frame_starts_at_the_next_one() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    let positions: Vec<u64> = (0..6)
        .map(|i| log.append(&payload(i, 40)).unwrap())
        .collect();
    log.close().unwrap();
    for from in [positions[2] + 1, positions[2] + 12, positions[3] - 1] {
        let items = read_all(&dir, from, true);
        assert!(corruptions(&items).is_empty(), "from {from}: {items:?}");
        assert_eq!(
            frames(&items).first().map(|f| f.0),
            Some(positions[3]),
            "from {from}"
        );
    }
    assert!(read_all(&dir, positions[5] + 1, true).is_empty());
    // Inside damage, the damage from there on is reported.
    let seg = segments(&dir)[0].1.clone();
    let mut bytes = fs::read(&seg).unwrap();
    bytes[positions[3] as usize + 30] ^= 0xFF;
    fs::write(&seg, &bytes).unwrap();
    let items = read_all(&dir, positions[3] + 5, true);
    let bad = corruptions(&items);
    assert_eq!(bad.len(), 1, "{items:?}");
    assert_eq!((bad[0].position, bad[0].length), (positions[3] + 5, 52 - 5));
    assert_eq!(
        frames(&items).iter().map(|f| f.0).collect::<Vec<_>>(),
        positions[4..].to_vec()
    );
}

#[test]
fn reader_of_a_missing_directory() {
    let tmp = TempDir::new().unwrap();
    assert!(matches!(
        LogReader::open(&tmp.path().join("nope"), 0, MAX_FRAME),
        Err(LogError::NotFound { path }) if path == tmp.path().join("nope")
    ));
    assert!(matches!(
        LogReader::open(tmp.path(), 0, 0),
        Err(LogError::Config {
            field: "max_frame_bytes",
            ..
        })
    ));
    // An empty directory is an empty log.
    assert_eq!(read_all(tmp.path(), 0, true), vec![]);
}

#[test]
fn cursors_persist_and_survive_reopen() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(
        &dir,
        LogConfig {
            fsync: FsyncPolicy::Always,
            ..config()
        },
    )
    .unwrap();
    assert_eq!(log.cursor("dlq").unwrap(), None);
    log.set_cursor("dlq", 16).unwrap();
    log.set_cursor("replay.v2", 1 << 40).unwrap();
    log.set_cursor("dlq", 4242).unwrap();
    assert_eq!(log.cursor("dlq").unwrap(), Some(4242));
    log.close().unwrap();
    let names: Vec<String> = fs::read_dir(dir.join("cursors"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}"); // no temporary file left behind
    let (log, _) = Log::open(&dir, config()).unwrap();
    assert_eq!(log.cursor("dlq").unwrap(), Some(4242));
    assert_eq!(log.cursor("replay.v2").unwrap(), Some(1 << 40));
    assert_eq!(fs::read(dir.join("cursors/dlq")).unwrap().len(), 12);
}

#[test]
fn corrupt_cursor_is_an_error_not_a_position() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    log.set_cursor("c", 1000).unwrap();
    let path = dir.join("cursors/c");
    let good = fs::read(&path).unwrap();
    let mut flipped = good.clone();
    flipped[1] ^= 0x01;
    fs::write(&path, &flipped).unwrap();
    assert!(
        matches!(log.cursor("c"), Err(LogError::CorruptCursor { path: p, reason }) if p == path && reason.contains("checksum"))
    );
    fs::write(&path, &good[..7]).unwrap();
    assert!(matches!(
        log.cursor("c"),
        Err(LogError::CorruptCursor { .. })
    ));
    fs::write(&path, [good.as_slice(), b"x"].concat()).unwrap();
    assert!(matches!(
        log.cursor("c"),
        Err(LogError::CorruptCursor { .. })
    ));
    log.set_cursor("c", 7).unwrap(); // overwriting repairs it
    assert_eq!(log.cursor("c").unwrap(), Some(7));
}

#[test]
fn bad_cursor_names_are_refused() {
    let tmp = TempDir::new().unwrap();
    let (log, _) = Log::open(&log_dir(&tmp), config()).unwrap();
    for name in [
        "",
        ".",
        "..",
        "../escape",
        "a/b",
        "sp ace",
        "x.tmp",
        &"n".repeat(65),
    ] {
        assert!(
            matches!(log.set_cursor(name, 1), Err(LogError::InvalidName { .. })),
            "{name:?}"
        );
        assert!(
            matches!(log.cursor(name), Err(LogError::InvalidName { .. })),
            "{name:?}"
        );
    }
    assert!(!tmp.path().join("escape").exists());
    log.set_cursor(&"n".repeat(64), 1).unwrap();
}

#[test]
fn second_writer_in_the_same_process_is_locked_out() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    // flock belongs to the open file description: a second open of LOCK in this process conflicts too.
    match Log::open(&dir, config()) {
        Err(LogError::Locked { path, pid }) => {
            assert_eq!(path, dir);
            assert_eq!(pid, Some(std::process::id()));
        }
        other => panic!("{other:?}"),
    }
    let message = Log::open(&dir, config()).unwrap_err().to_string();
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    // Readers take no lock.
    assert!(LogReader::open(&dir, 0, MAX_FRAME).is_ok());
    log.close().unwrap();
    let (again, _) = Log::open(&dir, config()).unwrap();
    drop(again);
}

#[test]
fn lock_is_held_across_processes() {
    const NAME: &str = "lock_is_held_across_processes";
    if is_child(NAME) {
        let expected: u32 = std::env::var("TE_LOG_PID").unwrap().parse().unwrap();
        match Log::open(&child_dir(), config()) {
            Err(LogError::Locked { pid, .. }) => assert_eq!(pid, Some(expected)),
            other => panic!("{other:?}"),
        }
        assert!(frames(&read_all(&child_dir(), 0, true)).len() == 1);
        return;
    }
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(&dir, config()).unwrap();
    log.append(b"held").unwrap();
    log.flush().unwrap();
    run_child(
        NAME,
        &[
            ("TE_LOG_DIR", dir.display().to_string()),
            ("TE_LOG_PID", std::process::id().to_string()),
        ],
    );
    log.close().unwrap();
}

#[test]
fn files_are_0600_in_a_0700_directory() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("a/b/log");
    let (log, _) = Log::open(&dir, small(100)).unwrap();
    log.append(&[0; 60]).unwrap();
    log.append(&[0; 60]).unwrap(); // a second segment
    log.set_cursor("c", 1).unwrap();
    log.close().unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("cursors")), 0o700);
    assert_eq!(mode(&dir.join("LOCK")), 0o600);
    assert_eq!(mode(&dir.join("cursors/c")), 0o600);
    let segs = segments(&dir);
    assert_eq!(segs.len(), 2);
    for (_, path) in segs {
        assert_eq!(mode(&path), 0o600);
    }
    // An existing directory keeps its mode.
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o750)).unwrap();
    drop(Log::open(&shared, config()).unwrap());
    assert_eq!(mode(&shared), 0o750);
    // A file where the directory should be.
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        Log::open(&file, config()),
        Err(LogError::Io { .. })
    ));
}

/// A log of `n` segments of two 100-byte frames each (240 bytes), the last one active.
fn log_of_segments(dir: &Path, n: usize, retention: LogConfig) -> Log {
    let (log, _) = Log::open(
        dir,
        LogConfig {
            segment_bytes: 256,
            ..retention
        },
    )
    .unwrap();
    for i in 0..(2 * n - 1) {
        log.append(&payload(i, 100)).unwrap();
    }
    log.flush().unwrap();
    assert_eq!(segments(dir).len(), n);
    log
}

#[test]
fn retention_by_bytes_keeps_the_newest_and_never_the_active_segment() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    // 4 closed segments of 240 bytes + an active one of 128.
    let log = log_of_segments(
        &dir,
        5,
        LogConfig {
            retention_bytes: Some(600),
            ..config()
        },
    );
    assert_eq!(log.stats().disk_bytes, 4 * 240 + 128);
    assert_eq!(log.enforce_retention().unwrap(), 3 * 240); // down to 240 + 128 <= 600
    assert_eq!(
        segments(&dir).iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![720, 960]
    );
    assert_eq!(log.start(), 720 + 16);
    assert_eq!(log.enforce_retention().unwrap(), 0);
    let stats = log.stats();
    assert_eq!((stats.deleted_segments, stats.deleted_bytes), (3, 720));
    drop(log);

    let log = log_of_segments(
        &tmp.path().join("zero"),
        3,
        LogConfig {
            retention_bytes: Some(0),
            ..config()
        },
    );
    assert_eq!(log.enforce_retention().unwrap(), 2 * 240);
    assert_eq!(segments(&tmp.path().join("zero")).len(), 1); // the active one stays
    assert_eq!(log.end(), 2 * 240 + 128);
}

#[test]
fn retention_by_age_deletes_segments_modified_long_ago() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let log = log_of_segments(
        &dir,
        4,
        LogConfig {
            retention_age: Some(Duration::from_secs(600)),
            ..config()
        },
    );
    assert_eq!(log.enforce_retention().unwrap(), 0); // all fresh
    let old = SystemTime::now() - Duration::from_secs(3600);
    let segs = segments(&dir);
    for (_, path) in &segs[..2] {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    // Even an old active segment is never deleted.
    fs::File::options()
        .write(true)
        .open(&segs[3].1)
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(log.enforce_retention().unwrap(), 2 * 240);
    assert_eq!(
        segments(&dir).iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![480, 720]
    );
    // A reader from position 0 starts at the first remaining segment, with nothing to report.
    let items = read_all(&dir, 0, true);
    assert!(corruptions(&items).is_empty(), "{items:?}");
    assert_eq!(frames(&items).first().map(|f| f.0), Some(480 + 16));
}

#[test]
fn delete_before_deletes_only_whole_closed_segments() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let log = log_of_segments(&dir, 4, config()); // bases 0, 240, 480, 720
    assert_eq!(log.delete_before(239).unwrap(), 0);
    assert_eq!(log.delete_before(240).unwrap(), 240); // every frame of segment 0 is below 240
                                                      // Segment 240's last frame starts at 368, but it is whole only below 480.
    assert_eq!(log.delete_before(479).unwrap(), 0);
    assert_eq!(log.delete_before(480).unwrap(), 240);
    assert_eq!(log.delete_before(u64::MAX).unwrap(), 240);
    assert_eq!(
        segments(&dir).iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![720]
    );
    assert_eq!(log.start(), 736);
    assert_eq!(log.append(b"still writable").unwrap(), 720 + 16 + 112);
    // A reader from a position inside a deleted segment starts at the first one left.
    log.flush().unwrap();
    let items = read_all(&dir, 300, true);
    assert!(corruptions(&items).is_empty());
    assert_eq!(frames(&items)[0].0, 736);
}

#[test]
fn interval_policy_fsyncs_in_the_background() {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(
        &dir,
        LogConfig {
            fsync: FsyncPolicy::Interval(Duration::from_millis(10)),
            ..config()
        },
    )
    .unwrap();
    let position = log.append(b"soon durable").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.stats().fsyncs == 0 {
        assert!(
            Instant::now() < deadline,
            "the flusher never synced: {:?}",
            log.stats()
        );
        thread::sleep(Duration::from_millis(5));
    }
    let stats = log.stats();
    assert_eq!((stats.buffered_bytes, stats.synced), (0, log.end()));
    // Written by the flusher, not by us.
    assert_eq!(
        frames(&read_all(&dir, 0, true)),
        vec![(position, b"soon durable".to_vec())]
    );
    // Nothing new: no more fsyncs.
    thread::sleep(Duration::from_millis(50));
    assert_eq!(log.stats().fsyncs, stats.fsyncs);
    log.close().unwrap();
}

#[test]
fn always_policy_fsyncs_on_commit_only_when_needed() {
    let tmp = TempDir::new().unwrap();
    let (log, _) = Log::open(
        &log_dir(&tmp),
        LogConfig {
            fsync: FsyncPolicy::Always,
            ..config()
        },
    )
    .unwrap();
    let base = log.stats().fsyncs;
    log.append(b"a").unwrap();
    log.append(b"b").unwrap();
    log.commit().unwrap();
    assert_eq!(log.stats().fsyncs, base + 1);
    log.commit().unwrap();
    assert_eq!(log.stats().fsyncs, base + 1);
    log.append(b"c").unwrap();
    log.sync().unwrap();
    let stats = log.stats();
    assert_eq!(
        (stats.fsyncs, stats.synced, stats.writes),
        (base + 2, log.end(), 2)
    );
}

#[test]
fn concurrent_appenders_and_a_live_reader() {
    const PER_THREAD: usize = 400;
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(
        &dir,
        LogConfig {
            segment_bytes: 32 << 10,
            fsync: FsyncPolicy::Interval(Duration::from_millis(2)),
            ..config()
        },
    )
    .unwrap();
    let log = Arc::new(log);
    let reader = live_reader(&dir, 4 * PER_THREAD);
    let written = write_from_threads(&log, 4, PER_THREAD, |log, t, i| {
        let p = payload(t * 100_000 + i, 20 + (i * 37) % 700);
        let position = log.append(&p).unwrap();
        if i % 64 == 0 {
            log.flush().unwrap();
        }
        (position, p)
    });
    let got = reader.join().unwrap();
    assert_eq!(got, written);
    assert!(log.stats().rolls > 0);
}

#[test]
fn interval_flusher_writes_full_buffers_while_appends_go_on() {
    // Under the interval policy a full 256 KiB buffer goes to the flusher thread to write; appends continue into
    // the next one. Frames keep their order and positions across those writes, large frames and rolls (which
    // first write whatever the flusher has not), with a live reader following.
    const PER_THREAD: usize = 1500;
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let (log, _) = Log::open(
        &dir,
        LogConfig {
            segment_bytes: 1 << 20,
            fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
            ..config()
        },
    )
    .unwrap();
    // Nothing flushed, nothing synced: what reaches the file is the flusher's doing.
    let first: Vec<(u64, Vec<u8>)> = (0..700)
        .map(|i| {
            let p = payload(i, 1000);
            (log.append(&p).unwrap(), p)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    // 700 KiB: two full buffers to write.
    while log.stats().writes < 2 {
        assert!(Instant::now() < deadline, "{:?}", log.stats());
        thread::sleep(Duration::from_millis(2));
    }
    let stats = log.stats();
    assert_eq!(stats.fsyncs, 0);
    assert_eq!(stats.disk_bytes + stats.buffered_bytes, log.end());
    let log = Arc::new(log);
    let reader = live_reader(&dir, 700 + 3 * PER_THREAD);
    let mut written = first;
    written.extend(write_from_threads(&log, 3, PER_THREAD, |log, t, i| {
        let len = if i % 500 == 499 {
            300 << 10
        } else {
            20 + (i * 37) % 3000
        };
        let p = payload(t * 100_000 + i, len);
        let position = if i % 3 == 0 {
            log.append_many(&[&p]).unwrap()[0]
        } else {
            log.append(&p).unwrap()
        };
        (position, p)
    }));
    log.commit().unwrap();
    written.sort();
    let got = reader.join().unwrap();
    assert_eq!(got, written);
    let stats = log.stats();
    assert!(stats.rolls > 0, "{stats:?}");
    assert_eq!(stats.buffered_bytes, 0);
    assert_eq!(frames(&read_all(&dir, 0, true)), written);
}

// ---------------------------------------------------------------------------------------------------------------
// Failures that need a process of their own

fn file_size_limit(bytes: Option<u64>) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &raw mut limit) },
        0
    );
    limit.rlim_cur = bytes.map_or(limit.rlim_max, |b| b.min(limit.rlim_max));
    // SAFETY: setrlimit only reads the valid rlimit; it limits this (child) process only.
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &raw const limit) },
        0
    );
}

#[test]
fn failed_write_is_cut_back_and_retried() {
    const NAME: &str = "failed_write_is_cut_back_and_retried";
    if !is_child(NAME) {
        let tmp = TempDir::new().unwrap();
        let dir = log_dir(&tmp);
        run_child(NAME, &[("TE_LOG_DIR", dir.display().to_string())]);
        // What the child left on disk: the six frames, whole, and nothing else.
        let items = read_all(&dir, 0, true);
        assert!(corruptions(&items).is_empty(), "{items:?}");
        let got: Vec<(u64, Vec<u8>)> = frames(&items);
        let expected: Vec<(u64, Vec<u8>)> = (0..6u8)
            .map(|i| (16 + u64::from(i) * 1012, vec![i; 1000]))
            .collect();
        assert_eq!(got, expected);
        return;
    }
    // SAFETY: ignoring SIGXFSZ makes a write past the limit fail with EFBIG instead of killing this child
    // process, which runs this one test.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = child_dir();
    let (log, _) = Log::open(
        &dir,
        LogConfig {
            fsync: FsyncPolicy::Always,
            ..config()
        },
    )
    .unwrap();
    assert_eq!(log.append(&[0; 1000]).unwrap(), 16);
    log.commit().unwrap();
    let seg = segments(&dir)[0].1.clone();
    assert_eq!(fs::metadata(&seg).unwrap().len(), 16 + 1012);

    file_size_limit(Some(4096));
    let later: Vec<u64> = (1..6u8).map(|i| log.append(&[i; 1000]).unwrap()).collect();
    assert_eq!(later, (1..6).map(|i| 16 + i * 1012).collect::<Vec<u64>>());
    // The write of the five buffered frames stops at 4096 bytes (a partial frame), then fails.
    match log.commit() {
        Err(LogError::Io { op, path, source }) => {
            assert_eq!((op, path), ("write", seg.clone()));
            assert_eq!(source.raw_os_error(), Some(libc::EFBIG));
        }
        other => panic!("{other:?}"),
    }
    // Cut back to the last whole frame: readers see exactly the first frame.
    assert_eq!(fs::metadata(&seg).unwrap().len(), 16 + 1012);
    let items = read_all(&dir, 0, true);
    assert_eq!(
        items,
        vec![Item::Frame {
            position: 16,
            payload: vec![0; 1000]
        }]
    );
    // Still failing while the limit holds; the frames and their positions are kept, and the writer is usable.
    assert!(matches!(log.flush(), Err(LogError::Io { .. })));
    assert!(!log.stats().failed);
    assert_eq!(log.end(), 16 + 6 * 1012);

    file_size_limit(None);
    log.commit().unwrap();
    assert_eq!(fs::metadata(&seg).unwrap().len(), 16 + 6 * 1012);
    log.close().unwrap();
}

#[test]
fn failed_flusher_write_is_cut_back_kept_and_reported_by_the_next_flush() {
    const NAME: &str = "failed_flusher_write_is_cut_back_kept_and_reported_by_the_next_flush";
    const LIMIT: u64 = 300 << 10;
    const FRAMES: usize = 800;
    if !is_child(NAME) {
        let tmp = TempDir::new().unwrap();
        let dir = log_dir(&tmp);
        run_child(NAME, &[("TE_LOG_DIR", dir.display().to_string())]);
        // What the child left: every frame it was told was appended, whole and in order, and nothing else.
        let accepted: usize = fs::read_to_string(tmp.path().join("accepted"))
            .unwrap()
            .parse()
            .unwrap();
        assert!(accepted > 259, "{accepted}");
        let items = read_all(&dir, 0, true);
        assert!(corruptions(&items).is_empty());
        let expected: Vec<(u64, Vec<u8>)> = (0..accepted)
            .map(|i| (16 + i as u64 * 1012, payload(i, 1000)))
            .collect();
        assert_eq!(frames(&items), expected);
        return;
    }
    // SAFETY: ignoring SIGXFSZ makes a write past the limit fail with EFBIG instead of killing this child
    // process, which runs this one test.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = child_dir();
    let (log, _) = Log::open(
        &dir,
        LogConfig {
            fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
            ..config()
        },
    )
    .unwrap();
    let seg = segments(&dir)[0].1.clone();
    file_size_limit(Some(LIMIT));
    // Full buffers (259 frames each) go to the flusher; the second one's write fails part way, in the flusher
    // or in the appender when it writes in the flusher's place. An append that fails is not appended; the
    // frames accepted before it keep their positions.
    let mut accepted = 0;
    for i in 0..FRAMES {
        match log.append(&payload(i, 1000)) {
            Ok(position) => {
                assert_eq!(position, 16 + i as u64 * 1012);
                accepted += 1;
            }
            Err(LogError::Io { op, source, .. }) => {
                assert_eq!((op, source.raw_os_error()), ("write", Some(libc::EFBIG)));
                break;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(accepted >= 2 * 259, "{accepted}");
    assert_eq!(log.end(), 16 + accepted as u64 * 1012);
    match log.commit() {
        Err(LogError::Io { op, path, source }) => {
            assert_eq!((op, path), ("write", seg.clone()));
            assert_eq!(source.raw_os_error(), Some(libc::EFBIG));
        }
        other => panic!("{other:?}"),
    }
    // Cut back to the last whole frame of the buffer that was written; a reader sees exactly those frames.
    let len = fs::metadata(&seg).unwrap().len();
    assert!(
        len <= LIMIT && len > 16 && (len - 16).is_multiple_of(1012),
        "{len}"
    );
    let whole = usize::try_from((len - 16) / 1012).unwrap();
    let items = read_all(&dir, 0, true);
    assert!(corruptions(&items).is_empty());
    assert_eq!(
        frames(&items),
        (0..whole)
            .map(|i| (16 + i as u64 * 1012, payload(i, 1000)))
            .collect::<Vec<_>>()
    );
    let stats = log.stats();
    assert!(!stats.failed);
    assert_eq!(stats.disk_bytes + stats.buffered_bytes, log.end());
    assert!(matches!(log.flush(), Err(LogError::Io { .. })));

    file_size_limit(None);
    log.commit().unwrap();
    assert_eq!(fs::metadata(&seg).unwrap().len(), log.end());
    log.close().unwrap();
    fs::write(dir.parent().unwrap().join("accepted"), accepted.to_string()).unwrap();
}

#[test]
fn read_only_directory_is_an_io_error() {
    const NAME: &str = "read_only_directory_is_an_io_error";
    if !is_child(NAME) {
        let tmp = TempDir::new().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let dir = log_dir(&tmp);
        let (log, _) = Log::open(&dir, config()).unwrap();
        log.append(b"before").unwrap();
        log.close().unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        // Read-only files in a read-only directory, as on a read-only mount. The child drops to nobody when we
        // are root (root ignores modes), so it gets the files, as if it had written them.
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if root {
                std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
        }
        if root {
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();
        run_child(NAME, &[("TE_LOG_DIR", dir.display().to_string())]);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        return;
    }
    // Root ignores permissions: this child process (which runs only this test) becomes nobody first.
    // SAFETY: these calls take no pointers except setgroups' empty list; they change this child process only.
    unsafe {
        if libc::geteuid() == 0 {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
            assert_eq!(libc::setgid(65534), 0);
            assert_eq!(libc::setuid(65534), 0);
        }
    }
    let dir = child_dir();
    match Log::open(&dir, config()) {
        Err(LogError::Io { source, path, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
            assert!(path.starts_with(&dir), "{}", path.display());
        }
        other => panic!("{other:?}"),
    }
    // Readers need no write access and take no lock.
    assert_eq!(
        frames(&read_all(&dir, 0, true)),
        vec![(16, b"before".to_vec())]
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Random damage

#[derive(Debug, Clone)]
enum Damage {
    Flip {
        segment: usize,
        at: usize,
        bit: u8,
    },
    Zero {
        segment: usize,
        at: usize,
        len: usize,
    },
    Truncate {
        segment: usize,
        at: usize,
    },
    Append {
        segment: usize,
        bytes: Vec<u8>,
    },
    Insert {
        segment: usize,
        at: usize,
        bytes: Vec<u8>,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<usize>(), 0..8u8).prop_map(|(segment, at, bit)| Damage::Flip {
            segment,
            at,
            bit
        }),
        (any::<usize>(), any::<usize>(), 1..48usize).prop_map(|(segment, at, len)| Damage::Zero {
            segment,
            at,
            len
        }),
        (any::<usize>(), any::<usize>()).prop_map(|(segment, at)| Damage::Truncate { segment, at }),
        (any::<usize>(), vec(any::<u8>(), 1..48))
            .prop_map(|(segment, bytes)| Damage::Append { segment, bytes }),
        (any::<usize>(), any::<usize>(), vec(any::<u8>(), 1..48))
            .prop_map(|(segment, at, bytes)| Damage::Insert { segment, at, bytes }),
    ]
}

/// A written frame: where it is now (None once damage destroyed it) and its bytes on disk.
struct Tracked {
    segment: usize,
    offset: Option<usize>,
    encoded: Vec<u8>,
    payload: Vec<u8>,
}

fn apply(files: &mut [Vec<u8>], tracked: &mut [Tracked], op: &Damage) {
    let n = files.len();
    match op {
        Damage::Flip { segment, at, bit } => {
            let file = &mut files[segment % n];
            if !file.is_empty() {
                let at = at % file.len();
                file[at] ^= 1 << bit;
            }
        }
        Damage::Zero { segment, at, len } => {
            let file = &mut files[segment % n];
            if !file.is_empty() {
                let at = at % file.len();
                let end = (at + len).min(file.len());
                file[at..end].fill(0);
            }
        }
        Damage::Truncate { segment, at } => {
            let s = segment % n;
            let at = at % (files[s].len() + 1);
            files[s].truncate(at);
            for t in tracked.iter_mut().filter(|t| t.segment == s) {
                if t.offset.is_some_and(|o| o + t.encoded.len() > at) {
                    t.offset = None;
                }
            }
        }
        Damage::Append { segment, bytes } => files[segment % n].extend_from_slice(bytes),
        Damage::Insert { segment, at, bytes } => {
            let s = segment % n;
            let at = at % (files[s].len() + 1);
            files[s].splice(at..at, bytes.iter().copied());
            // A frame cut in two by the insertion keeps its offset: if the inserted bytes happen to equal the ones
            // they push away, it is still whole there (the byte comparison decides).
            for t in tracked.iter_mut().filter(|t| t.segment == s) {
                t.offset = t.offset.map(|o| if o >= at { o + bytes.len() } else { o });
            }
        }
    }
}

const HEADER: &[u8] = b"TESEGLOG\x01\0\0\0\0\0\0\0";

/// Every item starts where the one before ended, except for skipping a valid segment header; the items end
/// where the last segment ends. So every byte of the log is a frame, a report or a valid header.
fn assert_tiles(items: &[Item], bases: &[u64], files: &[Vec<u8>]) {
    let valid_header = |at: u64| {
        bases
            .iter()
            .position(|&b| b == at)
            .is_some_and(|s| files[s].starts_with(HEADER))
    };
    let mut expect = bases[0];
    for item in items {
        let (position, length) = match item {
            Item::Frame { position, payload } => (*position, frame_len(payload)),
            Item::Corrupt(c) => (c.position, c.length),
        };
        if position != expect && valid_header(expect) {
            expect += SEGMENT_HEADER_LEN;
        }
        assert_eq!(position, expect, "gap or overlap before {item:?}");
        assert!(length > 0);
        expect += length;
    }
    if valid_header(expect) {
        expect += SEGMENT_HEADER_LEN;
    }
    let last = bases.len() - 1;
    assert_eq!(
        expect,
        bases[last] + files[last].len() as u64,
        "items end before the log does"
    );
}

fn damaged_log_case(payloads: &[Vec<u8>], ops: &[Damage]) {
    let tmp = TempDir::new().unwrap();
    let dir = log_dir(&tmp);
    let cfg = LogConfig {
        segment_bytes: 400,
        max_frame_bytes: 1024,
        ..config()
    };
    let (log, _) = Log::open(&dir, cfg.clone()).unwrap();
    let positions: Vec<u64> = payloads.iter().map(|p| log.append(p).unwrap()).collect();
    log.close().unwrap();

    let segs = segments(&dir);
    let bases: Vec<u64> = segs.iter().map(|s| s.0).collect();
    let mut files: Vec<Vec<u8>> = segs.iter().map(|s| fs::read(&s.1).unwrap()).collect();
    let mut tracked: Vec<Tracked> = positions
        .iter()
        .zip(payloads)
        .map(|(&position, payload)| {
            let segment = bases.partition_point(|&b| b <= position) - 1;
            let offset = (position - bases[segment]) as usize;
            let encoded = files[segment][offset..offset + 12 + payload.len()].to_vec();
            assert_eq!(&encoded[12..], payload.as_slice());
            Tracked {
                segment,
                offset: Some(offset),
                encoded,
                payload: payload.clone(),
            }
        })
        .collect();
    for op in ops {
        apply(&mut files, &mut tracked, op);
    }
    for ((_, path), bytes) in segs.iter().zip(&files) {
        fs::write(path, bytes).unwrap();
    }

    // The frames whose bytes are all still there, where the reader will find them (a segment's bytes past the
    // next segment's base are not part of the log).
    let intact: Vec<(u64, Vec<u8>)> = tracked
        .iter()
        .filter_map(|t| {
            let o = t.offset?;
            let end = o + t.encoded.len();
            let limit = bases
                .get(t.segment + 1)
                .map_or(usize::MAX, |&next| (next - bases[t.segment]) as usize);
            let file = &files[t.segment];
            (end <= file.len() && end <= limit && file[o..end] == t.encoded[..])
                .then(|| (bases[t.segment] + o as u64, t.payload.clone()))
        })
        .collect();

    let strict = read_all(&dir, 0, true);
    assert_eq!(frames(&strict), intact);
    assert_tiles(&strict, &bases, &files);
    let live = read_all(&dir, 0, false);
    assert_eq!(frames(&live), intact);

    // Recovery keeps every intact frame and later appends read back after them.
    let (log, _) = Log::open(&dir, cfg).unwrap();
    let after = log.append(b"after recovery").unwrap();
    log.close().unwrap();
    let mut expected = intact;
    expected.push((after, b"after recovery".to_vec()));
    assert_eq!(frames(&read_all(&dir, 0, true)), expected);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn damaged_segments_never_yield_wrong_data(
        payloads in vec(vec(any::<u8>(), 0..150), 1..40),
        ops in vec(damage(), 0..6),
    ) {
        damaged_log_case(&payloads, &ops);
    }
}
