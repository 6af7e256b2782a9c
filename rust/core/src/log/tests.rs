//! Unit tests of the segment log's private helpers and its writer/reader round trips.

use super::config::{FsyncPolicy, LogConfig};
use super::cursor::{decode_cursor, encode_cursor, valid_cursor_name};
use super::error::LogError;
use super::format::{
    classify_header, le32, parse_segment_name, push_frame, segment_path, Damage, Header,
};
use super::handle::Log;
use super::{
    CURSOR_LEN, MAX_CURSOR_NAME, MAX_FRAME_BYTES_LIMIT, MAX_POSITION, MAX_SEGMENT_BYTES,
    MIN_SEGMENT_BYTES, PAGE_BYTES, WRITEBACK_BYTES,
};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn segment_names_round_trip_and_reject_others() {
    let dir = Path::new("/x");
    for base in [0, 16, 123_456, MAX_POSITION - 1] {
        let path = segment_path(dir, base);
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(name.len(), 24);
        assert_eq!(parse_segment_name(name), Some(base));
    }
    for bad in [
        "1.seg",
        "0000000000000000001a.seg",
        "00000000000000000016.seg.tmp",
        "99999999999999999999.seg", // above u64::MAX
        "18446744073709551615.seg", // above MAX_POSITION
        "00000000000000000016",
        "LOCK",
    ] {
        assert_eq!(parse_segment_name(bad), None, "{bad}");
    }
}

#[test]
fn frame_header_classification() {
    let mut frame = Vec::new();
    push_frame(&mut frame, b"hello");
    assert_eq!(frame.len(), 12 + 5);
    assert!(matches!(
        classify_header(&frame, 16),
        Header::Complete { len: 5, .. }
    ));
    assert!(matches!(classify_header(&[], 16), Header::Empty));
    for cut in 1..12 {
        assert!(
            matches!(classify_header(&frame[..cut], 16), Header::Partial),
            "{cut}"
        );
    }
    assert!(matches!(
        classify_header(&frame, 4),
        Header::Bad(Damage::TooLong { len: 5, max: 4 })
    ));
    assert!(matches!(
        classify_header(&frame[..9], 4),
        Header::Bad(Damage::TooLong { .. })
    ));
    let mut bad = frame.clone();
    bad[0] ^= 1;
    assert!(matches!(
        classify_header(&bad, 16),
        Header::Bad(Damage::Sync)
    ));
    assert!(matches!(
        classify_header(&bad[..1], 16),
        Header::Bad(Damage::Sync)
    ));
    // The CRC covers the length bytes and the payload.
    assert_eq!(
        le32(&frame, 8),
        crc32c::crc32c(&[5, 0, 0, 0, b'h', b'e', b'l', b'l', b'o'])
    );
}

#[test]
fn interval_flusher_starts_writeback_of_whole_pages_written() {
    let payload = [7u8; 1000];
    for (fsync, expect_writeback) in [
        (FsyncPolicy::Interval(Duration::from_secs(3600)), true),
        (FsyncPolicy::Never, false),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let config = LogConfig {
            fsync,
            ..LogConfig::default()
        };
        let (log, _) = Log::open(tmp.path(), config).unwrap();
        for _ in 0..(2 * WRITEBACK_BYTES as usize / payload.len()) {
            log.append(&payload).unwrap();
        }
        log.commit().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let started = loop {
            let (started, len) = {
                let w = log.writer();
                (w.active.writeback, w.active.len)
            };
            assert!(
                started <= len && started % PAGE_BYTES == 0,
                "{started} of {len}"
            );
            if started >= WRITEBACK_BYTES || Instant::now() > deadline || !expect_writeback {
                break started;
            }
            thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(
            started >= WRITEBACK_BYTES,
            expect_writeback,
            "{fsync:?}: {started}"
        );
        // It is no fsync: none happened (the interval is an hour away).
        assert_eq!(log.stats().fsyncs, 0, "{fsync:?}");
        log.close().unwrap();
    }
}

#[test]
fn cursor_encoding_round_trips_and_detects_damage() {
    for position in [0, 16, u64::MAX] {
        assert_eq!(decode_cursor(&encode_cursor(position)), Ok(position));
    }
    let good = encode_cursor(4242);
    for i in 0..CURSOR_LEN {
        let mut bad = good;
        bad[i] ^= 0x10;
        assert!(decode_cursor(&bad).is_err(), "flip in byte {i}");
    }
    assert!(decode_cursor(&good[..11]).is_err());
    assert!(decode_cursor(&[good.as_slice(), &[0]].concat()).is_err());
}

#[test]
fn cursor_names() {
    for good in [
        "a",
        "dlq-consumer_1.v2",
        &"x".repeat(MAX_CURSOR_NAME),
        "...",
        ".a",
    ] {
        assert!(valid_cursor_name(good), "{good}");
    }
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a b",
        "é",
        "x.tmp",
        &"x".repeat(MAX_CURSOR_NAME + 1),
        "a\0",
    ] {
        assert!(!valid_cursor_name(bad), "{bad:?}");
    }
}

#[test]
fn config_validation_names_the_field() {
    assert!(LogConfig::default().validate().is_ok());
    let cases = [
        (
            LogConfig {
                segment_bytes: MIN_SEGMENT_BYTES - 1,
                ..LogConfig::default()
            },
            "segment_bytes",
        ),
        (
            LogConfig {
                segment_bytes: MAX_SEGMENT_BYTES + 1,
                ..LogConfig::default()
            },
            "segment_bytes",
        ),
        (
            LogConfig {
                max_frame_bytes: 0,
                ..LogConfig::default()
            },
            "max_frame_bytes",
        ),
        (
            LogConfig {
                max_frame_bytes: MAX_FRAME_BYTES_LIMIT + 1,
                ..LogConfig::default()
            },
            "max_frame_bytes",
        ),
        (
            LogConfig {
                fsync: FsyncPolicy::Interval(Duration::ZERO),
                ..LogConfig::default()
            },
            "fsync_interval",
        ),
    ];
    for (config, expected) in cases {
        match config.validate() {
            Err(LogError::Config { field, .. }) => assert_eq!(field, expected),
            other => panic!("{config:?}: {other:?}"),
        }
    }
}
