//! `SegmentLog`, `LogReader` and `Corruption`: the Python face of `treasure_core::log`.
//!
//! `append` holds the GIL (it only copies into the group-commit buffer); opening, flush, commit, sync, the
//! cursor and retention calls, close and every read release it. A closed `SegmentLog` raises `LogError` from
//! everything but `close`, which may be called any number of times.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use treasure_core::log::{
    Corruption, FsyncPolicy, Item, Log, LogConfig, LogError, LogReader, Recovery,
};

use crate::errors::{self, IntoPy};

/// The bytes of a `bytes` object borrowed in place, or a copy of any other contiguous buffer.
enum Payload<'a> {
    Borrowed(&'a [u8]),
    Copied(Vec<u8>),
}

impl AsRef<[u8]> for Payload<'_> {
    fn as_ref(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Copied(v) => v,
        }
    }
}

fn payload<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Payload<'a>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Payload::Borrowed(b.as_bytes()));
    }
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "payload must be bytes-like, not str (encode it first)",
        ));
    }
    match PyBuffer::<u8>::get(obj) {
        Ok(buf) => Ok(Payload::Copied(buf.to_vec(obj.py())?)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "payload must be bytes-like (bytes, bytearray, memoryview), not {}",
            obj.get_type().name()?
        ))),
    }
}

fn config_error(field: &'static str, reason: impl Into<String>) -> LogError {
    LogError::Config {
        field,
        reason: reason.into(),
    }
}

fn non_negative(field: &'static str, value: i128) -> Result<u64, LogError> {
    u64::try_from(value)
        .map_err(|_| config_error(field, format!("{value} is not a non-negative integer")))
}

#[allow(clippy::too_many_arguments)]
fn log_config(
    fsync: &str,
    fsync_interval_ms: i128,
    segment_bytes: i128,
    retention_bytes: Option<i128>,
    retention_s: Option<f64>,
    max_frame_bytes: i128,
) -> Result<LogConfig, LogError> {
    let fsync = match fsync {
        "always" => FsyncPolicy::Always,
        "never" => FsyncPolicy::Never,
        "interval" => match non_negative("fsync_interval_ms", fsync_interval_ms)? {
            0 => return Err(config_error("fsync_interval_ms", "must be at least 1")),
            ms => FsyncPolicy::Interval(Duration::from_millis(ms)),
        },
        other => {
            return Err(config_error(
                "fsync",
                format!("{other:?} is not one of 'always', 'interval', 'never'"),
            ))
        }
    };
    let retention_age = match retention_s {
        None => None,
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(config_error(
                "retention_s",
                format!("{s} is not a non-negative number of seconds"),
            ))
        }
    };
    let config = LogConfig {
        segment_bytes: non_negative("segment_bytes", segment_bytes)?,
        fsync,
        retention_bytes: retention_bytes
            .map(|b| non_negative("retention_bytes", b))
            .transpose()?,
        retention_age,
        max_frame_bytes: max_frame(max_frame_bytes)?,
    };
    config.validate()?;
    Ok(config)
}

fn max_frame(value: i128) -> Result<u32, LogError> {
    u32::try_from(value)
        .map_err(|_| config_error("max_frame_bytes", format!("{value} is out of range")))
}

/// The one writer of a segment log directory.
#[derive(Debug)]
#[pyclass(frozen, name = "SegmentLog", module = "treasure_engine._core")]
pub struct SegmentLogPy {
    /// `None` once closed. Calls share the read side (so an append is not held up by a commit's fsync);
    /// `close` takes the write side.
    log: RwLock<Option<Log>>,
    path: PathBuf,
    recovery: Recovery,
}

impl SegmentLogPy {
    fn closed(&self, py: Python<'_>) -> PyErr {
        errors::LogError(py, format!("segment log {} is closed", self.path.display()))
    }

    /// Runs `f` with the GIL held.
    fn with<T>(&self, py: Python<'_>, f: impl FnOnce(&Log) -> Result<T, LogError>) -> PyResult<T> {
        let guard = self.log.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(log) => f(log).py_err(py),
            None => Err(self.closed(py)),
        }
    }

    /// Runs `f` with the GIL released (for anything that may wait on the disk).
    fn detached<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Log) -> Result<T, LogError> + Send,
    ) -> PyResult<T> {
        let out = py.detach(|| {
            let guard = self.log.read().unwrap_or_else(PoisonError::into_inner);
            guard.as_ref().map(f)
        });
        match out {
            Some(result) => result.py_err(py),
            None => Err(self.closed(py)),
        }
    }
}

#[pymethods]
impl SegmentLogPy {
    #[new]
    #[pyo3(signature = (
        path, *, fsync="interval", fsync_interval_ms=100, segment_bytes=64 << 20, retention_bytes=None,
        retention_s=None, max_frame_bytes=16 << 20,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        fsync: &str,
        fsync_interval_ms: i128,
        segment_bytes: i128,
        retention_bytes: Option<i128>,
        retention_s: Option<f64>,
        max_frame_bytes: i128,
    ) -> PyResult<Self> {
        let config = log_config(
            fsync,
            fsync_interval_ms,
            segment_bytes,
            retention_bytes,
            retention_s,
            max_frame_bytes,
        )
        .py_err(py)?;
        let (log, recovery) = py.detach(|| Log::open(&path, config)).py_err(py)?;
        Ok(Self {
            log: RwLock::new(Some(log)),
            path,
            recovery,
        })
    }

    #[getter]
    fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// What opening repaired or found damaged in the active segment, or `None` when it was clean.
    #[getter]
    fn recovery<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let r = &self.recovery;
        let Some(reason) = &r.reason else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        let segment = r.segment.as_ref().map(|p| p.to_string_lossy().into_owned());
        d.set_item("segment", segment)?;
        d.set_item("position", r.position)?;
        d.set_item("truncated_bytes", r.truncated_bytes)?;
        d.set_item("frames", r.frames)?;
        d.set_item("damaged_ranges", r.damaged_ranges)?;
        d.set_item("reason", reason)?;
        Ok(Some(d))
    }

    /// Position of the oldest retained frame.
    #[getter]
    fn start(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |log| Ok(log.start()))
    }

    /// Position the next frame will get.
    #[getter]
    fn end(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |log| Ok(log.end()))
    }

    /// Appends one payload; returns its position (durable after `commit`, per the fsync policy).
    fn append(&self, py: Python<'_>, payload: &Bound<'_, PyAny>) -> PyResult<u64> {
        let data = self::payload(payload)?;
        self.with(py, |log| log.append(data.as_ref()))
    }

    /// Appends several payloads under one lock; returns their positions.
    fn append_many(&self, py: Python<'_>, payloads: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
        let objects = payloads.try_iter()?.collect::<PyResult<Vec<_>>>()?;
        let data = objects.iter().map(payload).collect::<PyResult<Vec<_>>>()?;
        self.with(py, |log| log.append_many(&data))
    }

    /// Writes buffered frames to the kernel (they survive a crash of this process).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.detached(py, Log::flush)
    }

    /// Flushes, then fsyncs as the policy says (always: now; interval: within the interval; never: no).
    fn commit(&self, py: Python<'_>) -> PyResult<()> {
        self.detached(py, Log::commit)
    }

    /// Flushes and fsyncs now, whatever the policy.
    fn sync(&self, py: Python<'_>) -> PyResult<()> {
        self.detached(py, Log::sync)
    }

    fn cursor(&self, py: Python<'_>, name: &str) -> PyResult<Option<u64>> {
        self.detached(py, |log| log.cursor(name))
    }

    fn set_cursor(&self, py: Python<'_>, name: &str, position: i128) -> PyResult<()> {
        let position = non_negative("position", position).py_err(py)?;
        self.detached(py, |log| log.set_cursor(name, position))
    }

    /// Deletes closed segments whose every frame is below `position`; returns the bytes freed.
    fn delete_before(&self, py: Python<'_>, position: i128) -> PyResult<u64> {
        let position = non_negative("position", position).py_err(py)?;
        self.detached(py, |log| log.delete_before(position))
    }

    /// Deletes closed segments past `retention_bytes` / `retention_s`; returns the bytes freed.
    fn enforce_retention(&self, py: Python<'_>) -> PyResult<u64> {
        self.detached(py, Log::enforce_retention)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(py, |log| Ok(log.stats()))?;
        let d = PyDict::new(py);
        d.set_item("segments", s.segments)?;
        d.set_item("disk_bytes", s.disk_bytes)?;
        d.set_item("buffered_bytes", s.buffered_bytes)?;
        d.set_item("start", s.start)?;
        d.set_item("end", s.end)?;
        d.set_item("synced", s.synced)?;
        d.set_item("appended_frames", s.appended_frames)?;
        d.set_item("appended_bytes", s.appended_bytes)?;
        d.set_item("writes", s.writes)?;
        d.set_item("fsyncs", s.fsyncs)?;
        d.set_item("rolls", s.rolls)?;
        d.set_item("deleted_segments", s.deleted_segments)?;
        d.set_item("deleted_bytes", s.deleted_bytes)?;
        d.set_item("failed", u64::from(s.failed))?;
        Ok(d)
    }

    /// Flushes, fsyncs (unless the policy is never), stops the flusher and releases the lock. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let taken = self
                .log
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            taken.map_or(Ok(()), Log::close)
        })
        .py_err(py)
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: &Bound<'_, PyAny>,
        exc_value: &Bound<'_, PyAny>,
        traceback: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let _ = (exc_type, exc_value, traceback);
        self.close(py)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let path = PyString::new(py, &self.path.to_string_lossy()).repr()?;
        let guard = self.log.read().unwrap_or_else(PoisonError::into_inner);
        Ok(match guard.as_ref() {
            Some(log) => format!(
                "<SegmentLog {path} start={} end={}>",
                log.start(),
                log.end()
            ),
            None => format!("<SegmentLog {path} closed>"),
        })
    }
}

/// A damaged range a reader skipped.
#[derive(Debug, Clone)]
#[pyclass(frozen, name = "Corruption", module = "treasure_engine._core")]
pub struct CorruptionPy {
    #[pyo3(get)]
    segment: String,
    #[pyo3(get)]
    position: u64,
    #[pyo3(get)]
    length: u64,
    #[pyo3(get)]
    reason: String,
}

impl From<Corruption> for CorruptionPy {
    fn from(c: Corruption) -> Self {
        Self {
            segment: c.segment.to_string_lossy().into_owned(),
            position: c.position,
            length: c.length,
            reason: c.reason,
        }
    }
}

#[pymethods]
impl CorruptionPy {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Corruption(segment={}, position={}, length={}, reason={})",
            PyString::new(py, &self.segment).repr()?,
            self.position,
            self.length,
            PyString::new(py, &self.reason).repr()?,
        ))
    }
}

#[derive(Debug)]
struct ReaderState {
    reader: LogReader,
    corruptions: Vec<Corruption>,
}

impl ReaderState {
    /// The next frame, collecting the damage reported on the way.
    fn next_frame(&mut self) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        loop {
            match self.reader.next_item()? {
                Some(Item::Frame { position, payload }) => return Ok(Some((position, payload))),
                Some(Item::Corrupt(c)) => self.corruptions.push(c),
                None => return Ok(None),
            }
        }
    }
}

/// Reads frames from a position; damaged ranges are collected in `corruptions`, never raised.
#[derive(Debug)]
#[pyclass(frozen, name = "LogReader", module = "treasure_engine._core")]
pub struct LogReaderPy {
    state: Mutex<ReaderState>,
}

impl LogReaderPy {
    fn state(&self) -> std::sync::MutexGuard<'_, ReaderState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[pymethods]
impl LogReaderPy {
    #[new]
    #[pyo3(signature = (path, start=0, *, max_frame_bytes=16 << 20, strict_tail=false))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        start: i128,
        max_frame_bytes: i128,
        strict_tail: bool,
    ) -> PyResult<Self> {
        let start = non_negative("start", start).py_err(py)?;
        let max = max_frame(max_frame_bytes).py_err(py)?;
        let reader = py
            .detach(|| LogReader::open(&path, start, max))
            .py_err(py)?;
        Ok(Self {
            state: Mutex::new(ReaderState {
                reader: reader.strict_tail(strict_tail),
                corruptions: Vec::new(),
            }),
        })
    }

    /// Position of the next frame to read.
    #[getter]
    fn position(&self) -> u64 {
        self.state().reader.position()
    }

    /// Every damaged range reported so far.
    #[getter]
    fn corruptions(&self) -> Vec<CorruptionPy> {
        self.state()
            .corruptions
            .iter()
            .cloned()
            .map(CorruptionPy::from)
            .collect()
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// The next `(position, payload)`; stops at the current end (iterate again later for more).
    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<(u64, Bound<'py, PyBytes>)>> {
        let next = py.detach(|| self.state().next_frame()).py_err(py)?;
        Ok(next.map(|(position, payload)| (position, PyBytes::new(py, &payload))))
    }

    /// Up to `max` frames from the current position (fewer at the end). An error after some frames were read
    /// returns those; the next call raises it.
    fn read<'py>(&self, py: Python<'py>, max: i128) -> PyResult<Vec<(u64, Bound<'py, PyBytes>)>> {
        let max = usize::try_from(max)
            .map_err(|_| config_error("max", format!("{max} is not a non-negative integer")))
            .py_err(py)?;
        let (frames, error) = py.detach(|| {
            let mut state = self.state();
            let mut frames = Vec::new();
            while frames.len() < max {
                match state.next_frame() {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break,
                    Err(e) => return (frames, Some(e)),
                }
            }
            (frames, None)
        });
        if let Some(e) = error.filter(|_| frames.is_empty()) {
            return Err(errors::log_to_py(py, e));
        }
        Ok(frames
            .into_iter()
            .map(|(position, payload)| (position, PyBytes::new(py, &payload)))
            .collect())
    }
}
