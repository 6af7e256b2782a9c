//! What a `Pipeline` hands to Python: sealed PutRecords requests (posted by the sender, their outcomes given
//! back) and the records that reached a terminal failure.

use std::ffi::c_int;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyBufferError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyString};
use treasure_core::batch::{Pipeline, Request};

/// A record that reached a terminal failure, as `Pipeline.take_dead` hands it over: its event, how many attempts
/// it had, the last error, and its ages in seconds since it was accepted and since its first failed attempt
/// (None when it never reached Kinesis). It also unpacks as the 8-tuple of those fields, in that order.
#[derive(Debug)]
#[pyclass(frozen, get_all, name = "DeadRecord", module = "treasure_engine._core")]
pub struct DeadRecordPy {
    pub(crate) data: Py<PyBytes>,
    pub(crate) partition_key: Py<PyString>,
    pub(crate) explicit_hash_key: Option<Py<PyString>>,
    pub(crate) attempts: u32,
    pub(crate) error_code: Py<PyString>,
    pub(crate) error_message: Py<PyString>,
    pub(crate) age_s: f64,
    pub(crate) failed_age_s: Option<f64>,
}

#[pymethods]
impl DeadRecordPy {
    /// The fields in order, so `data, key, ehk, attempts, code, message, age, failed_age = record` works.
    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyIterator>> {
        let fields = (
            self.data.clone_ref(py),
            self.partition_key.clone_ref(py),
            self.explicit_hash_key.as_ref().map(|k| k.clone_ref(py)),
            self.attempts,
            self.error_code.clone_ref(py),
            self.error_message.clone_ref(py),
            self.age_s,
            self.failed_age_s,
        )
            .into_pyobject(py)?;
        fields.try_iter()
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "DeadRecord(partition_key={:?}, attempts={}, error_code={:?}, bytes={})",
            self.partition_key.bind(py).to_string(),
            self.attempts,
            self.error_code.bind(py).to_string(),
            self.data.bind(py).as_bytes().len()
        )
    }
}

/// A sealed PutRecords request. Its body is exported read-only through the buffer protocol
/// (`memoryview(request)`), so the sender posts the bytes the batcher wrote without copying them.
#[derive(Debug)]
#[pyclass(frozen, name = "Request", module = "treasure_engine._core")]
pub struct RequestPy {
    body: Arc<Vec<u8>>,
    inner: Mutex<Option<Request>>,
    #[pyo3(get)]
    id: u64,
    #[pyo3(get)]
    records: usize,
    #[pyo3(get)]
    events: u64,
    #[pyo3(get)]
    shard_ids: Vec<String>,
    #[pyo3(get)]
    payload_bytes: usize,
}

impl RequestPy {
    pub(crate) fn new(r: Request) -> Self {
        Self {
            body: r.body_shared(),
            id: r.id(),
            records: r.records(),
            events: r.events(),
            shard_ids: r.shard_ids(),
            payload_bytes: r.payload_bytes(),
            inner: Mutex::new(Some(r)),
        }
    }

    /// Takes the request out for an outcome, if `pipeline` sealed it (it stays untouched otherwise).
    pub(crate) fn take_for(&self, pipeline: &Pipeline) -> PyResult<Request> {
        let mut slot = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("request lock poisoned"))?;
        match slot.as_ref() {
            None => Err(PyRuntimeError::new_err(
                "request already completed or failed",
            )),
            Some(r) if !pipeline.owns(r) => Err(PyValueError::new_err(
                "this request was sealed by another pipeline; give its outcome to that one",
            )),
            Some(_) => slot
                .take()
                .ok_or_else(|| PyRuntimeError::new_err("request already completed or failed")),
        }
    }
}

#[pymethods]
impl RequestPy {
    /// The body as a new `bytes` object (a copy; prefer `memoryview(request)`).
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.body)
    }

    /// The body's SHA-256 as 64 hex digits, for the SigV4 signature: computed here, in Rust and without the GIL
    /// (the sha2 crate, SHA extensions where the CPU has them), on the sender's thread. Not on the batcher thread:
    /// it is the producer's one serial stage, and hashing every body there halved its throughput (criterion
    /// `batcher/aggregate_4_shards`: 6.9 to 3.2 M events/s) for the same process CPU.
    #[getter]
    fn body_sha256(&self, py: Python<'_>) -> String {
        use sha2::{Digest, Sha256};
        use std::fmt::Write as _;
        let body = Arc::clone(&self.body);
        let digest: [u8; 32] = py.detach(move || Sha256::digest(body.as_slice()).into());
        digest.iter().fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
    }

    fn __len__(&self) -> usize {
        self.body.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Request id={} records={} events={} bytes={}>",
            self.id,
            self.records,
            self.events,
            self.body.len()
        )
    }

    /// Read-only buffer over the body. The body is immutable and owned by this object, which the exported
    /// view keeps alive through `view.obj`.
    unsafe fn __getbuffer__(
        slf: PyRef<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        if flags & pyo3::ffi::PyBUF_WRITABLE == pyo3::ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("Request bodies are read-only"));
        }
        let ptr = slf.body.as_ptr();
        let len = slf.body.len() as isize;
        // SAFETY: `view` is a valid Py_buffer supplied by the interpreter. The pointed-to bytes live in an
        // `Arc<Vec<u8>>` that is never mutated and is owned by `slf`; `view.obj` holds a strong reference to
        // `slf`, so the bytes outlive the view. Shape and strides point into the view itself, as the buffer
        // protocol allows for one-dimensional byte buffers.
        unsafe {
            (*view).obj = slf.into_ptr();
            (*view).buf = ptr.cast_mut().cast();
            (*view).len = len;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if flags & pyo3::ffi::PyBUF_FORMAT == pyo3::ffi::PyBUF_FORMAT {
                c"B".as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & pyo3::ffi::PyBUF_ND == pyo3::ffi::PyBUF_ND {
                &raw mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & pyo3::ffi::PyBUF_STRIDES == pyo3::ffi::PyBUF_STRIDES {
                &raw mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    // Nothing to release: the view's reference to `self` (dropped by the interpreter) keeps the body alive.
    #[allow(clippy::unused_self)]
    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}
}
