//! The exception hierarchy of `treasure_engine._core` and the conversions from `CoreError` and `LogError`.
//!
//! ```text
//! TreasureEngineError(Exception)
//! ├── ConfigError(TreasureEngineError, ValueError)
//! ├── RecordTooLarge(TreasureEngineError, ValueError)
//! ├── InvalidPartitionKey(TreasureEngineError, ValueError)
//! ├── InvalidHashKey(TreasureEngineError, ValueError)
//! ├── MalformedRecord(TreasureEngineError, ValueError)
//! ├── BufferFull(TreasureEngineError)
//! │   └── Overloaded(BufferFull)
//! ├── ProducerClosed(TreasureEngineError)
//! ├── CircuitOpen(TreasureEngineError)
//! └── LogError(TreasureEngineError, OSError)
//!     ├── LogLocked(LogError)
//!     └── LogNotFound(LogError)
//! ```
//! Bad input is a `ValueError` as well, so callers that already catch `ValueError` keep working; a segment log
//! failure is an `OSError` (with `errno` and `filename` when the system reported it), so `except OSError` works.
//! Types with two bases cannot come from `create_exception!`, so they are made once at import with `type(...)`.

use std::path::Path;

use pyo3::exceptions::{PyException, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use treasure_core::log::LogError as CoreLogError;
use treasure_core::CoreError;

pyo3::create_exception!(
    _core,
    TreasureEngineError,
    PyException,
    "Base class of every error raised by treasure_engine."
);

macro_rules! exceptions {
    ($($name:ident($($base:ident),+): $doc:literal;)*) => {
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[derive(Clone, Copy)]
        enum Kind { $($name,)* }

        /// (name, bases, doc); a base is `TreasureEngineError`, a builtin, or an exception listed before it.
        const NAMES: &[(&str, &[&str], &str)] = &[$((stringify!($name), &[$(stringify!($base)),+], $doc),)*];

        $(
            #[allow(non_snake_case, dead_code)]
            pub fn $name(py: Python<'_>, message: impl Into<String>) -> PyErr {
                raise(py, Kind::$name, message.into())
            }
        )*
    };
}

static TYPES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

/// Creates the exception types and adds them to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let base = py.get_type::<TreasureEngineError>();
    // Public (and picklable) under the package that re-exports it, like its subclasses.
    base.setattr("__module__", "treasure_engine")?;
    m.add("TreasureEngineError", base)?;
    let types = TYPES.get_or_try_init(py, || {
        let mut made = Vec::with_capacity(NAMES.len());
        for &(name, bases, doc) in NAMES {
            let ty = make(py, name, bases, doc, &made)?;
            made.push(ty);
        }
        Ok::<_, PyErr>(made)
    })?;
    for (ty, (name, _, _)) in types.iter().zip(NAMES) {
        m.add(*name, ty.bind(py))?;
    }
    Ok(())
}

fn raise(py: Python<'_>, kind: Kind, message: String) -> PyErr {
    match TYPES.get(py) {
        Some(types) => PyErr::from_type(types[kind as usize].bind(py).clone(), message),
        None => TreasureEngineError::new_err(message),
    }
}

exceptions! {
    ConfigError(TreasureEngineError, ValueError): "A configuration value is out of range or inconsistent; the message names the field.";
    RecordTooLarge(TreasureEngineError, ValueError): "The record (data plus partition key) exceeds max_record_bytes.";
    InvalidPartitionKey(TreasureEngineError, ValueError): "The partition key is empty or longer than 256 characters.";
    InvalidHashKey(TreasureEngineError, ValueError): "The explicit hash key is not a decimal integer in [0, 2**128).";
    MalformedRecord(TreasureEngineError, ValueError): "Bytes that should be a KPL aggregate or a service response do not parse.";
    BufferFull(TreasureEngineError): "The ring buffer is full (overflow policy reject, or the block timed out); the event was not accepted.";
    Overloaded(BufferFull): "The backlog is past its critical level and this producer sheds (shed_when_critical); the event was not accepted.";
    ProducerClosed(TreasureEngineError): "The producer is closed and accepts no more events.";
    CircuitOpen(TreasureEngineError): "A circuit breaker refused the call; `name` is the breaker's, `remaining_s` the time it stays open (inf when forced open, 0 when half-open with every trial call taken), `state` its state.";
    LogError(TreasureEngineError, OSError): "A segment log could not be read or written (disk full, read-only, damaged cursor, closed log).";
    LogLocked(LogError): "Another writer (this process or another) holds the segment log's lock; the message names its pid.";
    LogNotFound(LogError): "The segment log directory does not exist.";
}

fn make(
    py: Python<'_>,
    name: &str,
    bases: &[&str],
    doc: &str,
    made: &[Py<PyType>],
) -> PyResult<Py<PyType>> {
    let bases = bases
        .iter()
        .map(|&base| match base {
            "TreasureEngineError" => Ok(py.get_type::<TreasureEngineError>().into_any()),
            "ValueError" => Ok(py.get_type::<PyValueError>().into_any()),
            "OSError" => Ok(py.get_type::<PyOSError>().into_any()),
            other => NAMES
                .iter()
                .position(|n| n.0 == other)
                .and_then(|i| made.get(i))
                .map(|ty| ty.bind(py).clone().into_any())
                .ok_or_else(|| {
                    PyRuntimeError::new_err(format!("{name}: base {other} is not made yet"))
                }),
        })
        .collect::<PyResult<Vec<_>>>()?;
    let bases = PyTuple::new(py, bases)?;
    let dict = PyDict::new(py);
    dict.set_item("__module__", "treasure_engine")?;
    dict.set_item("__doc__", doc)?;
    let ty = py.get_type::<PyType>().call1((name, bases, dict))?;
    Ok(ty.cast_into::<PyType>()?.unbind())
}

/// Converts a core error into the matching Python exception.
pub fn to_py(py: Python<'_>, e: CoreError) -> PyErr {
    let message = e.to_string();
    match e {
        CoreError::Config { .. } => ConfigError(py, message),
        CoreError::BufferFull => BufferFull(py, message),
        CoreError::RecordTooLarge { .. } => RecordTooLarge(py, message),
        CoreError::InvalidPartitionKey(_) => InvalidPartitionKey(py, message),
        CoreError::InvalidHashKey(_) => InvalidHashKey(py, message),
        CoreError::Closed => ProducerClosed(py, message),
        CoreError::Overloaded { .. } => Overloaded(py, message),
        CoreError::Malformed(_) => MalformedRecord(py, message),
        CoreError::Storage(_) => LogError(py, message),
        CoreError::StorageLocked(_) => LogLocked(py, message),
    }
}

/// `Result<T, CoreError>` -> `PyResult<T>`.
pub trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, CoreError> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

/// `ENOENT` on Linux and macOS (this crate does not link libc).
const ENOENT: i32 = 2;

/// An `OSError`-derived exception with `errno`, `strerror` and `filename` set.
fn os_error(py: Python<'_>, kind: Kind, errno: i32, message: String, path: &Path) -> PyErr {
    match TYPES.get(py) {
        Some(types) => PyErr::from_type(
            types[kind as usize].bind(py).clone(),
            (errno, message, path.to_string_lossy().into_owned()),
        ),
        None => TreasureEngineError::new_err(message),
    }
}

/// Converts a segment log error: `LogError` (an `OSError`), `LogLocked`, `LogNotFound`, or `ConfigError` /
/// `RecordTooLarge` for bad arguments.
pub fn log_to_py(py: Python<'_>, e: CoreLogError) -> PyErr {
    let message = e.to_string();
    match &e {
        CoreLogError::Config { .. } | CoreLogError::InvalidName { .. } => ConfigError(py, message),
        CoreLogError::FrameTooLarge { .. } => RecordTooLarge(py, message),
        CoreLogError::Locked { .. } => LogLocked(py, message),
        CoreLogError::NotFound { path } => os_error(py, Kind::LogNotFound, ENOENT, message, path),
        CoreLogError::Io { path, source, .. } => match source.raw_os_error() {
            Some(errno) => os_error(py, Kind::LogError, errno, message, path),
            None => LogError(py, message),
        },
        CoreLogError::CorruptCursor { .. } | CoreLogError::Failed { .. } => LogError(py, message),
    }
}

impl<T> IntoPy<T> for Result<T, CoreLogError> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| log_to_py(py, e))
    }
}
