//! Fuzzes the segment log reader and the writer's recovery: `cargo +nightly fuzz run log_read` from `rust/core`.
//!
//! The first input byte picks a mode; the rest becomes a segment file:
//! * bit 0 clear: after a valid segment header (so the fuzzer spends its time on frames), set: as it comes;
//! * bit 1: split into chunks (a length byte, then that many bytes) that the log writes as valid frames, then
//!   damaged by XOR-ing the byte at the position given by the first two bytes with the third;
//! * bit 2: a second segment follows, `mode >> 3` bytes after the first one's end (so the first is read as a
//!   closed segment: limited to the next base, missing bytes reported).
//!
//! Reading must not panic; strict reading must return items that tile the segment file and frames whose
//! payloads are the bytes at their positions; a live reader returns the same frames. Then `Log::open` must
//! not panic, must keep every frame, and a frame appended after recovery must read back last.
//!
//! A first segment whose header is a valid version 2 one (preallocated, docs/log-format.md; the damage or
//! the raw bytes can make one) is a header all the same, and as the last segment its zeros where a frame
//! would start end the log for a strict reader when no valid frame follows: the items then end at those
//! zeros instead of at the end of the file, and a live reader stops at the first zeros even when valid frames
//! follow them (docs/log-format.md), so its frames are a prefix of the strict reader's.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use treasure_core::log::{FsyncPolicy, Item, Log, LogConfig, LogReader, SEGMENT_HEADER_LEN};

const HEADER: &[u8; 16] = b"TESEGLOG\x01\0\0\0\0\0\0\0";
/// The header of a preallocated (version 2) segment.
const HEADER_V2: &[u8; 16] = b"TESEGLOG\x02\0\0\0\0\0\0\0";
const MAX_FRAME: u32 = 1 << 16;

fn config() -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Never,
        max_frame_bytes: MAX_FRAME,
        ..LogConfig::default()
    }
}

/// An empty directory of this process, reused by every run.
fn fresh_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("treasure-fuzz-log-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The bytes of the first segment file.
fn first_segment(dir: &Path, mode: u8, rest: &[u8]) -> Vec<u8> {
    let path = dir.join("00000000000000000000.seg");
    if mode & 2 == 0 {
        let mut bytes = if mode & 1 == 0 {
            HEADER.to_vec()
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(rest);
        fs::write(&path, &bytes).unwrap();
        return bytes;
    }
    let (damage, mut chunks) = rest.split_at(rest.len().min(3));
    let (log, _) = Log::open(
        dir,
        LogConfig {
            segment_bytes: 1 << 30,
            ..config()
        },
    )
    .unwrap();
    while let Some((&n, tail)) = chunks.split_first() {
        let (chunk, after) = tail.split_at(tail.len().min(usize::from(n)));
        log.append(chunk).unwrap();
        chunks = after;
    }
    log.close().unwrap();
    let mut bytes = fs::read(&path).unwrap();
    if let [hi, lo, xor] = *damage {
        let at = usize::from(u16::from_be_bytes([hi, lo])) % bytes.len();
        bytes[at] ^= xor;
        fs::write(&path, &bytes).unwrap();
    }
    bytes
}

fn read(dir: &Path, strict: bool) -> Vec<Item> {
    let mut reader = LogReader::open(dir, 0, MAX_FRAME)
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

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let dir = fresh_dir();
    let bytes = first_segment(&dir, mode, rest);
    let len = bytes.len() as u64;
    // A second segment with only its header, at `next`: the log ends after that header.
    let next = (mode & 4 != 0).then(|| len + u64::from(mode >> 3));
    if let Some(next) = next {
        fs::write(dir.join(format!("{next:020}.seg")), HEADER).unwrap();
    }
    let end = next.map_or(len, |next| next + SEGMENT_HEADER_LEN);

    let strict = read(&dir, true);
    let preallocated = bytes.starts_with(HEADER_V2);
    let mut at = if bytes.starts_with(HEADER) || preallocated {
        SEGMENT_HEADER_LEN
    } else {
        0
    };
    for item in &strict {
        if Some(at) == next {
            at += SEGMENT_HEADER_LEN; // skipped: a valid header
        }
        let (position, length) = match item {
            Item::Frame { position, payload } => {
                let start = *position as usize + 12;
                assert_eq!(&bytes[start..start + payload.len()], &payload[..]);
                (*position, 12 + payload.len() as u64)
            }
            Item::Corrupt(c) => (c.position, c.length),
        };
        assert_eq!(position, at, "items do not tile the log");
        assert!(length > 0);
        at = position + length;
    }
    if Some(at) == next {
        at += SEGMENT_HEADER_LEN;
    }
    if preallocated && next.is_none() && at < end {
        // The unwritten tail of the last preallocated segment: zeros where the next frame would start.
        let zeros = &bytes[at as usize..bytes.len().min(at as usize + 12)];
        assert!(zeros.iter().all(|&b| b == 0), "the items end before the log does, not at zeros");
    } else {
        assert_eq!(at, end, "the items end before the log does");
    }
    let found = frames(&strict);
    let live = frames(&read(&dir, false));
    if preallocated && next.is_none() {
        // A live reader stops at the zeros of the last preallocated segment even when frames follow them (the
        // writer may still be filling them in); a strict one reads on to those frames.
        assert!(found.starts_with(&live), "a live reader's frames are not a prefix of the strict reader's");
    } else {
        assert_eq!(live, found);
    }

    let (log, _) = Log::open(&dir, config()).unwrap();
    let after = log.append(b"after recovery").unwrap();
    log.close().unwrap();
    let mut expected = found;
    expected.push((after, b"after recovery".to_vec()));
    assert_eq!(frames(&read(&dir, true)), expected);
});
