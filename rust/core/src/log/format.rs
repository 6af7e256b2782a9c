//! Format helpers: segment headers and names, frame headers, damage classification, positional I/O.

use super::crc;
use super::error::{io_error, LogError};
use super::{
    FORMAT_VERSION, FRAME_HEADER_LEN, MAX_POSITION, PREALLOCATED_VERSION, SEGMENT_MAGIC, SYNC_BYTES,
};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(super) fn segment_header() -> [u8; 16] {
    segment_header_of(FORMAT_VERSION)
}

pub(super) fn segment_header_of(version: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h
}

/// The version of a valid segment header ([`FORMAT_VERSION`] or [`PREALLOCATED_VERSION`]), `None` otherwise.
pub(super) fn header_version(head: &[u8]) -> Option<u32> {
    [FORMAT_VERSION, PREALLOCATED_VERSION]
        .into_iter()
        .find(|&v| head == segment_header_of(v))
}

/// Length of the run of zero bytes at the start of `b` (64 bytes at a time where it can: zeroed tails of
/// preallocated segments are megabytes long).
pub(super) fn zero_run(b: &[u8]) -> usize {
    let mut i = 0;
    for block in b.chunks_exact(64) {
        if block.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            break;
        }
        i += 64;
    }
    i + b[i..].iter().position(|&x| x != 0).unwrap_or(b.len() - i)
}

pub(super) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

/// The base of a segment file name (`<20 digits>.seg`), or `None` for any other name.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok().filter(|&base| base < MAX_POSITION)
    } else {
        None
    }
}

/// Segment files of `dir`, sorted by base.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((base, entry.path()));
        }
    }
    out.sort_unstable_by_key(|s| s.0);
    Ok(out)
}

/// CRC32C of a frame's length bytes followed by its payload.
pub(super) fn frame_crc(len_bytes: &[u8], payload: &[u8]) -> u32 {
    crc::compute(len_bytes, payload)
}

/// The header of the frame of `payload` (at most `u32::MAX` bytes, checked by the caller): sync marker, length,
/// CRC32C of the length bytes and the payload. The payload follows it.
pub fn frame_header(payload: &[u8]) -> [u8; FRAME_HEADER_LEN as usize] {
    let len = payload.len() as u32;
    frame_header_of(len, frame_crc(&len.to_le_bytes(), payload))
}

/// The header of a frame of `len` payload bytes whose CRC is `crc`.
pub(super) fn frame_header_of(len: u32, crc: u32) -> [u8; FRAME_HEADER_LEN as usize] {
    let mut header = [0u8; FRAME_HEADER_LEN as usize];
    header[..4].copy_from_slice(&SYNC_BYTES);
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Appends the frame of `payload` (at most `u32::MAX` bytes, checked by the caller) to `out`.
pub(super) fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&frame_header(payload));
    out.extend_from_slice(payload);
}

pub(super) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Why a range was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Damage {
    Sync,
    TooLong {
        len: u32,
        max: u32,
    },
    Checksum,
    Truncated,
    /// Zeros where a frame should start, before the end of a preallocated segment's written part: frames the
    /// kernel never wrote back before a crash of the machine.
    Zeroed,
}

impl Damage {
    pub(super) fn describe(self) -> String {
        match self {
            Self::Sync => "bad sync marker".into(),
            Self::TooLong { len, max } => {
                format!("frame length {len} exceeds max_frame_bytes={max}")
            }
            Self::Checksum => "checksum mismatch".into(),
            Self::Truncated => "truncated frame".into(),
            Self::Zeroed => "zeroed range".into(),
        }
    }
}

/// The first bytes of a would-be frame, classified.
pub(super) enum Header {
    /// No bytes at all.
    Empty,
    /// Fewer than 12 bytes, consistent with a frame still being written.
    Partial,
    Bad(Damage),
    Complete {
        len: u32,
        crc: u32,
    },
}

pub(super) fn classify_header(h: &[u8], max: u32) -> Header {
    if h.is_empty() {
        return Header::Empty;
    }
    let k = h.len().min(4);
    if h[..k] != SYNC_BYTES[..k] {
        return Header::Bad(Damage::Sync);
    }
    if h.len() >= 8 {
        let len = le32(h, 4);
        if len > max {
            return Header::Bad(Damage::TooLong { len, max });
        }
    }
    if h.len() < 12 {
        return Header::Partial;
    }
    Header::Complete {
        len: le32(h, 4),
        crc: le32(h, 8),
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
pub(super) fn read_full_at(file: &File, buf: &mut [u8], mut at: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}
