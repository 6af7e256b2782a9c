//! The reader: a log read from a position, frame by frame, damage reported; see the module docs for the rules.

use super::config::check_max_frame;
use super::error::{io_error, LogError};
use super::format::{header_version, list_segments, Damage};
use super::report::{Corruption, Item};
use super::scan::{align, FrameRead, Scan, SegmentScan};
use super::{FRAME_HEADER_LEN, MAX_POSITION, PREALLOCATED_VERSION, SEGMENT_HEADER_LEN};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// Reads a log from a position, frame by frame, reporting damage; see the module docs for the rules.
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    max_frame_bytes: u32,
    strict_tail: bool,
    position: u64,
    current: Option<Current>,
}

/// The segment a reader is in.
#[derive(Debug)]
struct Current {
    base: u64,
    path: PathBuf,
    scan: SegmentScan,
    /// Base of the next segment, once one is known to exist.
    next: Option<u64>,
    /// The segment header was checked (or skipped: the reader started past it).
    header_done: bool,
    /// A preallocated segment ([`PREALLOCATED_VERSION`]): zeros where a frame should start end its written part.
    zero_tail: bool,
}

/// What one step of the reader produced.
enum Step {
    Item(Item),
    /// Nothing more now (the live end).
    Wait,
    /// State changed; step again.
    Again,
}

impl LogReader {
    /// A reader of the log in `dir` from the first frame at or after position `from` (a position an append
    /// returned, a cursor, [`LogReader::position`], or anything in between: a position inside a frame starts at
    /// the next one, a position inside damage reports the damage from there). Positions below the first
    /// segment (deleted by retention) start at the first segment. [`LogError::NotFound`] if `dir` is missing.
    pub fn open(dir: &Path, from: u64, max_frame_bytes: u32) -> Result<LogReader, LogError> {
        check_max_frame(max_frame_bytes)?;
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(LogError::Io {
                    op: "open log directory",
                    path: dir.to_path_buf(),
                    source: io::Error::from_raw_os_error(libc::ENOTDIR),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LogError::NotFound {
                    path: dir.to_path_buf(),
                })
            }
            Err(e) => return Err(io_error("open log directory", dir)(e)),
        }
        Ok(LogReader {
            dir: dir.to_path_buf(),
            max_frame_bytes,
            strict_tail: false,
            position: from.min(MAX_POSITION),
            current: None,
        })
    }

    /// With `true`, an incomplete frame (or segment header) at the end of the last segment is reported as
    /// truncated instead of waited for: for reading a log no writer is appending to.
    #[must_use]
    pub fn strict_tail(mut self, strict: bool) -> Self {
        self.strict_tail = strict;
        self
    }

    /// Position of the next frame to read.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next frame or damaged range; `None` at the current end (call again later for more).
    pub fn next_item(&mut self) -> Result<Option<Item>, LogError> {
        loop {
            if self.current.is_none() && !self.enter_segment()? {
                return Ok(None);
            }
            match self.step()? {
                Step::Item(item) => return Ok(Some(item)),
                Step::Wait => return Ok(None),
                Step::Again => {}
            }
        }
    }

    fn list(&self) -> Result<Vec<(u64, PathBuf)>, LogError> {
        list_segments(&self.dir).map_err(io_error("list", &self.dir))
    }

    /// Opens the segment holding the position; false when the log has no segment to read.
    fn enter_segment(&mut self) -> Result<bool, LogError> {
        loop {
            let segments = self.list()?;
            let Some(&(first, _)) = segments.first() else {
                return Ok(false);
            };
            self.position = self.position.max(first);
            let index = segments.partition_point(|s| s.0 <= self.position) - 1;
            let (base, path) = segments[index].clone();
            let next = segments.get(index + 1).map(|s| s.0);
            let file = match File::open(&path) {
                Ok(file) => file,
                // Deleted since the listing (retention): go past it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => match next {
                    Some(next) => {
                        self.position = self.position.max(next);
                        continue;
                    }
                    None => return Ok(false),
                },
                Err(e) => return Err(io_error("open segment", &path)(e)),
            };
            let header_done = if self.position == base {
                false
            } else {
                // Started inside the header of a segment: its frames start after it.
                self.position = self.position.max(base + SEGMENT_HEADER_LEN);
                true
            };
            let mut scan = SegmentScan::new(file, next.map(|n| n - base));
            let zero_tail = header_version(scan.bytes(0, 16).map_err(io_error("read", &path))?)
                == Some(PREALLOCATED_VERSION);
            scan.stop_at_zeros = zero_tail && next.is_none() && !self.strict_tail;
            if self.position > base + SEGMENT_HEADER_LEN {
                let at = align(&mut scan, self.position - base, self.max_frame_bytes)
                    .map_err(io_error("read", &path))?;
                self.position = base + at;
            }
            self.current = Some(Current {
                base,
                path,
                scan,
                next,
                header_done,
                zero_tail,
            });
            return Ok(true);
        }
    }

    fn step(&mut self) -> Result<Step, LogError> {
        let max = self.max_frame_bytes;
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        if !cur.header_done {
            return self.check_segment_header();
        }
        let at = self.position - cur.base;
        if cur.zero_tail && cur.scan.zeros_at(at).map_err(io_error("read", &cur.path))? {
            return self.zeroed(at);
        }
        let read = cur
            .scan
            .read_frame(at, max)
            .map_err(io_error("read", &cur.path))?;
        match read {
            FrameRead::Frame(payload) => {
                let position = self.position;
                self.position += FRAME_HEADER_LEN + payload.len() as u64;
                Ok(Step::Item(Item::Frame { position, payload }))
            }
            FrameRead::End => self.segment_end(),
            FrameRead::Bad(damage) => self.skip_damage(at, damage, false),
            FrameRead::Incomplete => self.skip_damage(at, Damage::Truncated, true),
        }
    }

    /// Looks for a segment after the current one; true when one was found just now (the current segment is
    /// then complete and gets a limit, so the caller should look again).
    fn discover_next(&mut self) -> Result<bool, LogError> {
        let Some(base) = self
            .current
            .as_ref()
            .filter(|c| c.next.is_none())
            .map(|c| c.base)
        else {
            return Ok(false);
        };
        let next = self.list()?.into_iter().map(|s| s.0).find(|&b| b > base);
        match (next, self.current.as_mut()) {
            (Some(next), Some(cur)) => {
                cur.next = Some(next);
                cur.scan.set_limit(next - base);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn check_segment_header(&mut self) -> Result<Step, LogError> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        let head = cur
            .scan
            .bytes(0, 16)
            .map_err(io_error("read", &cur.path))?
            .to_vec();
        if head.len() == 16 {
            cur.header_done = true;
            self.position = cur.base + SEGMENT_HEADER_LEN;
            if let Some(version) = header_version(&head) {
                cur.zero_tail = version == PREALLOCATED_VERSION;
                return Ok(Step::Again);
            }
            return Ok(Step::Item(Item::Corrupt(Corruption {
                segment: cur.path.clone(),
                position: cur.base,
                length: SEGMENT_HEADER_LEN,
                reason: "bad segment header".into(),
            })));
        }
        if self.discover_next()? {
            return Ok(Step::Again);
        }
        let strict = self.strict_tail;
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        if cur.next.is_none() && !strict {
            cur.scan.invalidate();
            return Ok(Step::Wait); // the writer is still creating it
        }
        cur.header_done = true;
        if head.is_empty() {
            return Ok(Step::Again); // the missing bytes are reported at the segment's end
        }
        self.position = cur.base + head.len() as u64;
        Ok(Step::Item(Item::Corrupt(Corruption {
            segment: cur.path.clone(),
            position: cur.base,
            length: head.len() as u64,
            reason: "truncated segment header".into(),
        })))
    }

    fn segment_end(&mut self) -> Result<Step, LogError> {
        if self.discover_next()? {
            return Ok(Step::Again); // look again: the segment was complete when the next one appeared
        }
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        let Some(next) = cur.next else {
            cur.scan.invalidate();
            return Ok(Step::Wait);
        };
        let (base, path) = (cur.base, cur.path.clone());
        self.current = None;
        if next > self.position {
            let position = self.position;
            self.position = next;
            // A segment deleted by retention while it was read ends early on purpose.
            if self.list()?.iter().any(|s| s.0 == base) {
                return Ok(Step::Item(Item::Corrupt(Corruption {
                    segment: path,
                    position,
                    length: next - position,
                    reason: format!("{} bytes missing before the next segment", next - position),
                })));
            }
        }
        Ok(Step::Again)
    }

    /// Zeros where a frame should start in a preallocated segment. In a complete segment (a later one exists)
    /// they are damage up to the next valid frame (the segment ends exactly where the next one starts). In the
    /// last one they are the unwritten tail: a live reader waits there; a strict one reports them only if a
    /// valid frame follows (frames written back without the ones before them, by a crash of the machine).
    fn zeroed(&mut self, at: u64) -> Result<Step, LogError> {
        if self.discover_next()? {
            return Ok(Step::Again);
        }
        let (max, strict) = (self.max_frame_bytes, self.strict_tail);
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        if cur.next.is_some() {
            return self.skip_damage(at, Damage::Zeroed, false);
        }
        if strict {
            let found = cur
                .scan
                .scan(at + 1, max)
                .map_err(io_error("read", &cur.path))?;
            if matches!(found, Scan::Found(_)) {
                return self.skip_damage(at, Damage::Zeroed, false);
            }
        }
        cur.scan.invalidate();
        Ok(Step::Wait)
    }

    fn skip_damage(&mut self, at: u64, damage: Damage, incomplete: bool) -> Result<Step, LogError> {
        if self.discover_next()? {
            return Ok(Step::Again);
        }
        let (max, strict) = (self.max_frame_bytes, self.strict_tail);
        let Some(cur) = self.current.as_mut() else {
            return Ok(Step::Again);
        };
        let live = cur.next.is_none() && !strict;
        // In the last preallocated segment the writer copies frames into a mapping, so a reader may see a frame
        // whose header is there and whose payload is not yet (a checksum mismatch, not only a short frame).
        let in_progress = incomplete || cur.zero_tail;
        if live && in_progress {
            cur.scan.invalidate(); // look at the file as it is now, not as the first read saw it
        }
        let found = cur
            .scan
            .scan(at + 1, max)
            .map_err(io_error("read", &cur.path))?;
        if live && in_progress && matches!(found, Scan::Found(_)) {
            // A frame after this one is there: either this one is damaged, or the writer's pwrite was half
            // visible to the first read and has gone on since (it writes in order, so whatever the scan saw
            // behind this frame was written after it). Read it again before calling it damaged.
            cur.scan.invalidate();
            let again = cur
                .scan
                .read_frame(at, max)
                .map_err(io_error("read", &cur.path))?;
            // Step again if it changed: complete now, or (what was short) found damaged, which is then reported.
            let changed = match again {
                FrameRead::Frame(_) => true,
                FrameRead::Incomplete => false,
                FrameRead::Bad(_) | FrameRead::End => incomplete,
            };
            if changed {
                return Ok(Step::Again);
            }
        }
        let stop = match found {
            Scan::Found(next) => next,
            Scan::NotFound { .. } if live && in_progress => {
                cur.scan.invalidate();
                return Ok(Step::Wait); // a frame still being written
            }
            Scan::NotFound {
                tail: Some(tail), ..
            } if live => tail,
            Scan::NotFound { end, .. } => end.max(at + 1),
        };
        let position = self.position;
        self.position = cur.base + stop;
        Ok(Step::Item(Item::Corrupt(Corruption {
            segment: cur.path.clone(),
            position,
            length: stop - at,
            reason: damage.describe(),
        })))
    }
}
