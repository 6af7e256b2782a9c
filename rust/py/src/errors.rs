//! The exception hierarchy of `treasure_engine._core` and the one conversion from `CoreError`.
//!
//! ```text
//! TreasureEngineError(Exception)
//! ├── ConfigError(TreasureEngineError, ValueError)
//! ├── RecordTooLarge(TreasureEngineError, ValueError)
//! ├── InvalidPartitionKey(TreasureEngineError, ValueError)
//! ├── InvalidHashKey(TreasureEngineError, ValueError)
//! ├── MalformedRecord(TreasureEngineError, ValueError)
//! ├── BufferFull(TreasureEngineError)
//! └── ProducerClosed(TreasureEngineError)
//! ```
//! Bad input is a `ValueError` as well, so callers that already catch `ValueError` keep working. Types with two
//! bases cannot come from `create_exception!`, so they are made once at import with `type(...)`.

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use treasure_core::CoreError;

pyo3::create_exception!(
    _core,
    TreasureEngineError,
    PyException,
    "Base class of every error raised by treasure_engine."
);

macro_rules! exceptions {
    ($($name:ident: $value_error:literal, $doc:literal;)*) => {
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[derive(Clone, Copy)]
        enum Kind { $($name,)* }

        const NAMES: &[(&str, bool, &str)] = &[$((stringify!($name), $value_error, $doc),)*];

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
        NAMES
            .iter()
            .map(|&(name, value_error, doc)| make(py, name, value_error, doc))
            .collect::<PyResult<Vec<_>>>()
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
    ConfigError: true, "A configuration value is out of range or inconsistent; the message names the field.";
    RecordTooLarge: true, "The record (data plus partition key) exceeds max_record_bytes.";
    InvalidPartitionKey: true, "The partition key is empty or longer than 256 characters.";
    InvalidHashKey: true, "The explicit hash key is not a decimal integer in [0, 2**128).";
    MalformedRecord: true, "Bytes that should be a KPL aggregate or a service response do not parse.";
    BufferFull: false, "The ring buffer is full (overflow policy reject, or the block timed out); the event was not accepted.";
    ProducerClosed: false, "The producer is closed and accepts no more events.";
}

fn make(py: Python<'_>, name: &str, value_error: bool, doc: &str) -> PyResult<Py<PyType>> {
    let base = py.get_type::<TreasureEngineError>();
    let bases = if value_error {
        PyTuple::new(
            py,
            [base.into_any(), py.get_type::<PyValueError>().into_any()],
        )?
    } else {
        PyTuple::new(py, [base.into_any()])?
    };
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
        CoreError::Malformed(_) => MalformedRecord(py, message),
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
