//! Reading one segment file: shared by the reader and by the writer's recovery.

use super::format::{classify_header, frame_crc, le32, read_full_at, zero_run, Damage, Header};
use super::{FRAME_HEADER_LEN, READ_AHEAD, SEGMENT_HEADER_LEN, SYNC_BYTES};
use std::fs::File;
use std::io;

/// What [`SegmentScan::probe`] found at an offset.
pub(super) enum Probe {
    End,
    Valid(u32),
    Bad,
    /// The frame does not fit in the file (yet).
    Incomplete,
}

/// What [`SegmentScan::read_frame`] found at an offset.
pub(super) enum FrameRead {
    End,
    Frame(Vec<u8>),
    Bad(Damage),
    Incomplete,
}

/// Outcome of resynchronisation.
pub(super) enum Scan {
    /// A frame with a valid CRC starts here.
    Found(u64),
    /// None until the end of the file (`end`); `tail` is the first offset where a frame could still be being
    /// written (its visible bytes are a plausible beginning of a frame).
    NotFound { tail: Option<u64>, end: u64 },
}

/// One segment file read through a read-ahead window. Offsets are relative to the file.
#[derive(Debug)]
pub(super) struct SegmentScan {
    file: File,
    /// Bytes at and past this offset are not part of the log (a later segment starts there).
    limit: Option<u64>,
    window: Vec<u8>,
    window_at: u64,
    /// [`SegmentScan::scan`] ends at the first [`ZERO_STOP`] zero bytes: the unwritten tail of the last,
    /// preallocated segment, which a live reader must not read through (megabytes) on every look.
    pub(super) stop_at_zeros: bool,
}

/// A run of this many zero bytes ends a resynchronising scan of the last preallocated segment for a live reader.
const ZERO_STOP: usize = 4096;

impl SegmentScan {
    pub(super) fn new(file: File, limit: Option<u64>) -> Self {
        Self {
            file,
            limit,
            window: Vec::new(),
            window_at: 0,
            stop_at_zeros: false,
        }
    }

    /// The (up to 12) bytes at `at` are present and all zero: no frame starts there in a preallocated segment.
    pub(super) fn zeros_at(&mut self, at: u64) -> io::Result<bool> {
        let head = self.bytes(at, FRAME_HEADER_LEN as usize)?;
        Ok(!head.is_empty() && zero_run(head) == head.len())
    }

    pub(super) fn invalidate(&mut self) {
        self.window.clear();
    }

    pub(super) fn set_limit(&mut self, limit: u64) {
        self.limit = Some(limit);
        self.stop_at_zeros = false; // a complete segment is read to its end
        self.invalidate();
    }

    /// `n`, reduced so that `[at, at + n)` stays below the limit.
    fn clamp(&self, at: u64, n: usize) -> usize {
        match self.limit {
            Some(limit) => usize::try_from(limit.saturating_sub(at)).map_or(n, |room| room.min(n)),
            None => n,
        }
    }

    /// Length of the file as far as the log is concerned.
    fn len(&self) -> io::Result<u64> {
        let len = self.file.metadata()?.len();
        Ok(self.limit.map_or(len, |limit| len.min(limit)))
    }

    fn window_end(&self) -> u64 {
        self.window_at + self.window.len() as u64
    }

    fn fill(&mut self, at: u64, want: usize) -> io::Result<()> {
        let want = self.clamp(at, want);
        if self.window.capacity() > want.max(READ_AHEAD) * 2 {
            self.window = Vec::new(); // give back the buffer of a large frame
        }
        self.window.clear();
        self.window.resize(want, 0);
        self.window_at = at;
        match read_full_at(&self.file, &mut self.window, at) {
            Ok(got) => {
                self.window.truncate(got);
                Ok(())
            }
            Err(e) => {
                self.window.clear();
                Err(e)
            }
        }
    }

    /// The bytes `[at, at + n)`, fewer where the file (or the limit) ends first.
    pub(super) fn bytes(&mut self, at: u64, n: usize) -> io::Result<&[u8]> {
        let n = self.clamp(at, n);
        let cached = self.window_at <= at && at.saturating_add(n as u64) <= self.window_end();
        let start = if cached {
            (at - self.window_at) as usize
        } else {
            self.fill(at, n.max(READ_AHEAD))?;
            0
        };
        let stop = (start + n).min(self.window.len());
        Ok(&self.window[start..stop])
    }

    /// Whatever the window holds from `at` on, refilled when fewer than 16 bytes of it are cached.
    fn chunk(&mut self, at: u64) -> io::Result<&[u8]> {
        let cached = self.window_at <= at && at.saturating_add(16) <= self.window_end();
        let start = if cached {
            (at - self.window_at) as usize
        } else {
            self.fill(at, READ_AHEAD)?;
            0
        };
        Ok(&self.window[start..])
    }

    /// Checks the frame at `at` without keeping its payload (streams the CRC through the window).
    pub(super) fn probe(&mut self, at: u64, max: u32) -> io::Result<Probe> {
        let (len, crc) = match classify_header(self.bytes(at, 12)?, max) {
            Header::Empty => return Ok(Probe::End),
            Header::Partial => return Ok(Probe::Incomplete),
            Header::Bad(_) => return Ok(Probe::Bad),
            Header::Complete { len, crc } => (len, crc),
        };
        let body = at + FRAME_HEADER_LEN;
        let total = u64::from(len);
        if body + total > self.len()? {
            return Ok(Probe::Incomplete);
        }
        let mut acc = crc32c::crc32c(&len.to_le_bytes());
        let mut done = 0;
        while done < total {
            let want = (total - done).min(READ_AHEAD as u64) as usize;
            let part = self.bytes(body + done, want)?;
            if part.len() < want {
                return Ok(Probe::Incomplete);
            }
            acc = crc32c::crc32c_append(acc, part);
            done += want as u64;
        }
        Ok(if acc == crc {
            Probe::Valid(len)
        } else {
            Probe::Bad
        })
    }

    /// Reads and checks the frame at `at`. Allocates at most `12 + max` bytes.
    pub(super) fn read_frame(&mut self, at: u64, max: u32) -> io::Result<FrameRead> {
        // The header and the payload are checked from one read; a second try covers a file that was cut and
        // rewritten between the read of the header and the read of the frame.
        for _ in 0..3 {
            let head = self.bytes(at, 12)?;
            let (len, crc) = match classify_header(head, max) {
                Header::Empty => return Ok(FrameRead::End),
                Header::Partial => return Ok(FrameRead::Incomplete),
                Header::Bad(damage) => return Ok(FrameRead::Bad(damage)),
                Header::Complete { len, crc } => (len, crc),
            };
            let total = FRAME_HEADER_LEN as usize + len as usize;
            let owned: Vec<u8>;
            let outcome = {
                let frame: &[u8] = if total <= READ_AHEAD {
                    self.bytes(at, total)?
                } else {
                    if at + total as u64 > self.len()? {
                        return Ok(FrameRead::Incomplete);
                    }
                    let mut buf = vec![0; total];
                    let got = read_full_at(&self.file, &mut buf, at)?;
                    buf.truncate(got);
                    owned = buf;
                    &owned
                };
                if frame.len() < total {
                    Some(FrameRead::Incomplete)
                } else if frame[..4] != SYNC_BYTES || le32(frame, 4) != len || le32(frame, 8) != crc
                {
                    None // changed under us
                } else if frame_crc(&frame[4..8], &frame[12..]) == crc {
                    Some(FrameRead::Frame(frame[12..].to_vec()))
                } else {
                    Some(FrameRead::Bad(Damage::Checksum))
                }
            };
            match outcome {
                Some(read) => return Ok(read),
                None => self.invalidate(),
            }
        }
        self.invalidate();
        Ok(FrameRead::Incomplete)
    }

    /// Resynchronises: the first offset at or after `from` where a frame with a valid CRC starts.
    pub(super) fn scan(&mut self, from: u64, max: u32) -> io::Result<Scan> {
        let mut at = from;
        let mut tail = None;
        loop {
            let chunk = self.chunk(at)?;
            let n = chunk.len();
            if n < 4 {
                if tail.is_none() {
                    tail = (0..n)
                        .find(|&i| SYNC_BYTES.starts_with(&chunk[i..]))
                        .map(|i| at + i as u64);
                }
                return Ok(Scan::NotFound {
                    tail,
                    end: at + n as u64,
                });
            }
            let zeros = zero_run(chunk);
            if zeros > 0 {
                // Zeros hold no sync marker: skip them whole (a preallocated segment's tail is all zeros).
                if self.stop_at_zeros && zeros < ZERO_STOP && zeros == n {
                    // The window ends inside the run: look at the next ZERO_STOP bytes as a whole.
                    let ahead = self.bytes(at, ZERO_STOP)?;
                    if zero_run(ahead) == ahead.len() {
                        return Ok(Scan::NotFound { tail, end: at });
                    }
                } else if self.stop_at_zeros && zeros >= ZERO_STOP {
                    return Ok(Scan::NotFound { tail, end: at });
                }
                at += zeros as u64;
                continue;
            }
            let Some(i) = chunk.windows(4).position(|w| w == SYNC_BYTES) else {
                at += (n - 3) as u64;
                continue;
            };
            let candidate = at + i as u64;
            match self.probe(candidate, max)? {
                Probe::Valid(_) => return Ok(Scan::Found(candidate)),
                Probe::Incomplete => {
                    tail.get_or_insert(candidate);
                }
                Probe::Bad | Probe::End => {}
            }
            at = candidate + 1;
        }
    }
}

/// Where a reader asked to start at offset `target` begins: `target` itself when a valid frame starts there or
/// it lies in damage (reported from there on), else the end of the valid frame that contains it. Walks the
/// frames from the segment's first one only when no frame starts at `target`.
pub(super) fn align(scan: &mut SegmentScan, target: u64, max: u32) -> io::Result<u64> {
    if matches!(scan.probe(target, max)?, Probe::Valid(_)) {
        return Ok(target);
    }
    let mut at = SEGMENT_HEADER_LEN;
    while at < target {
        match scan.probe(at, max)? {
            Probe::Valid(len) => at += FRAME_HEADER_LEN + u64::from(len),
            Probe::End | Probe::Incomplete => return Ok(target),
            Probe::Bad => match scan.scan(at + 1, max)? {
                Scan::Found(next) if next <= target => at = next,
                Scan::Found(_) | Scan::NotFound { .. } => return Ok(target),
            },
        }
    }
    Ok(at)
}
