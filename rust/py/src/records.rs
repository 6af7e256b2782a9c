//! `parse_get_records`, `GetRecordsPage`, `Record` and `BadRecord`: the Python face of
//! `treasure_core::records`.
//!
//! A page's decoded buffer lives once, in an `Arc` shared by the page and every `Record` made from it; a
//! `Record` is that `Arc` and an index, so making one costs an allocation of a small object, and it stays
//! valid after the page is gone (keeping the page's buffer alive: a consumer that keeps a few records for
//! long should copy what it needs, or pickle them). Its getters build their Python values on access (`data`
//! copies the bytes into a new `bytes` object each time). The page makes its `Record` objects once, on the
//! first call of `records` or `lanes`, and hands out the same objects afterwards.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple, PyType};
use treasure_core::records::{
    self, HashKeyRange, OutOfRange, Page, RangeCheck, RecordParts, UserRecord,
};

use crate::errors::IntoPy;

/// What a page and its records share: the parsed page and the shard it was read from.
#[derive(Debug)]
struct Shared {
    page: Page,
    shard_id: Py<PyString>,
    /// `shard_id` as Rust sees it, for equality and hashing.
    shard: Box<str>,
}

impl Shared {
    fn new(page: Page, shard_id: Bound<'_, PyString>) -> PyResult<Self> {
        Ok(Self {
            page,
            shard: shard_id.to_str()?.into(),
            shard_id: shard_id.unbind(),
        })
    }
}

/// One user record read from a Kinesis shard (de-aggregated when it came in a KPL aggregate).
#[derive(Debug)]
#[pyclass(frozen, name = "Record", module = "treasure_engine._core")]
pub struct RecordPy {
    shared: Arc<Shared>,
    index: usize,
}

impl RecordPy {
    #[inline]
    fn get(&self) -> UserRecord<'_> {
        self.shared
            .page
            .get(self.index)
            .expect("a Record's index is within its page")
    }
}

/// The bytes of a `bytes` object in place, or a copy of any other contiguous buffer.
fn bytes_like<R>(obj: &Bound<'_, PyAny>, what: &str, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(f(b.as_bytes()));
    }
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be bytes-like, not str"
        )));
    }
    match PyBuffer::<u8>::get(obj) {
        Ok(buf) => Ok(f(&buf.to_vec(obj.py())?)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{what} must be bytes-like (bytes, bytearray, memoryview), not {}",
            obj.get_type().name()?
        ))),
    }
}

#[pymethods]
impl RecordPy {
    #[new]
    #[pyo3(signature = (
        data, partition_key, sequence_number, shard_id, sub_sequence_number=0, explicit_hash_key=None,
        approximate_arrival=0.0, aggregated=false,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        partition_key: &str,
        sequence_number: &str,
        shard_id: Bound<'_, PyString>,
        sub_sequence_number: i64,
        explicit_hash_key: Option<&str>,
        approximate_arrival: f64,
        aggregated: bool,
    ) -> PyResult<Self> {
        let sub_sequence_number = u32::try_from(sub_sequence_number).map_err(|_| {
            PyValueError::new_err(format!(
                "sub_sequence_number must be in [0, 2**32), not {sub_sequence_number}"
            ))
        })?;
        let page = bytes_like(data, "data", |data| {
            Page::from_records(&[RecordParts {
                data,
                partition_key,
                explicit_hash_key,
                sequence_number,
                sub_sequence_number,
                approximate_arrival,
                aggregated,
            }])
        })?
        .py_err(py)?;
        Ok(Self {
            shared: Arc::new(Shared::new(page, shard_id)?),
            index: 0,
        })
    }

    /// The user record's payload (a new `bytes` object on each access).
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.get().data())
    }

    #[getter]
    fn partition_key(&self) -> &str {
        self.get().partition_key()
    }

    #[getter]
    fn explicit_hash_key(&self) -> Option<&str> {
        self.get().explicit_hash_key()
    }

    /// Sequence number of the Kinesis record it came in (shared by the records of one aggregate).
    #[getter]
    fn sequence_number(&self) -> &str {
        self.get().sequence_number()
    }

    /// Index in its KPL aggregate; 0 for a record that was not aggregated.
    #[getter]
    fn sub_sequence_number(&self) -> u64 {
        self.get().sub_sequence_number()
    }

    #[getter]
    fn shard_id(&self, py: Python<'_>) -> Py<PyString> {
        self.shared.shard_id.clone_ref(py)
    }

    /// `ApproximateArrivalTimestamp`, seconds since the epoch (0.0 when the response had none).
    #[getter]
    fn approximate_arrival(&self) -> f64 {
        self.get().approximate_arrival()
    }

    /// Whether it came in a KPL aggregate.
    #[getter]
    fn aggregated(&self) -> bool {
        self.get().aggregated()
    }

    /// Records are equal when they are the same record of the same shard: same shard id, sequence number and
    /// sub-sequence number.
    fn __eq__(&self, other: &Self) -> bool {
        let (a, b) = (self.get(), other.get());
        a.sub_sequence_number() == b.sub_sequence_number()
            && a.sequence_number() == b.sequence_number()
            && self.shared.shard == other.shared.shard
    }

    fn __hash__(&self) -> u64 {
        let r = self.get();
        let mut h = DefaultHasher::new();
        (
            &*self.shared.shard,
            r.sequence_number(),
            r.sub_sequence_number(),
        )
            .hash(&mut h);
        h.finish()
    }

    /// Pickles as a call of the constructor with every field.
    #[allow(clippy::type_complexity)]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyType>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let this = slf.get();
        let r = this.get();
        let args = (
            PyBytes::new(py, r.data()),
            r.partition_key(),
            r.sequence_number(),
            this.shared.shard_id.bind(py),
            r.sub_sequence_number(),
            r.explicit_hash_key(),
            r.approximate_arrival(),
            r.aggregated(),
        )
            .into_pyobject(py)?;
        Ok((slf.get_type(), args))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let r = self.get();
        Ok(format!(
            "Record(shard_id={}, sequence_number={}, sub_sequence_number={}, partition_key={}, \
             data=<{} bytes>)",
            self.shared.shard_id.bind(py).repr()?,
            PyString::new(py, r.sequence_number()).repr()?,
            r.sub_sequence_number(),
            PyString::new(py, r.partition_key()).repr()?,
            r.data().len(),
        ))
    }
}

/// A Kinesis record that carries the KPL magic but does not decode (bad MD5, truncated or invalid
/// protobuf), or whose `Data` is not base64: reported in stream order instead of failing the page.
#[derive(Debug)]
#[pyclass(frozen, name = "BadRecord", module = "treasure_engine._core")]
pub struct BadRecordPy {
    /// The record's bytes as received.
    #[pyo3(get)]
    data: Py<PyBytes>,
    #[pyo3(get)]
    partition_key: String,
    #[pyo3(get)]
    sequence_number: String,
    #[pyo3(get)]
    shard_id: Py<PyString>,
    #[pyo3(get)]
    approximate_arrival: f64,
    /// Why it did not decode.
    #[pyo3(get)]
    reason: String,
    /// How many user records of the page come before it.
    #[pyo3(get)]
    position: usize,
}

#[pymethods]
impl BadRecordPy {
    /// Always 0: the Kinesis record as a whole. (A getter, like `Record`'s, for code that reads either.)
    #[getter]
    #[allow(clippy::unused_self)]
    fn sub_sequence_number(&self) -> u64 {
        0
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "BadRecord(shard_id={}, sequence_number={}, position={}, reason={}, data=<{} bytes>)",
            self.shard_id.bind(py).repr()?,
            PyString::new(py, &self.sequence_number).repr()?,
            self.position,
            PyString::new(py, &self.reason).repr()?,
            self.data.bind(py).as_bytes().len(),
        ))
    }
}

/// The records of one GetRecords response, de-aggregated, with the response's paging fields.
#[pyclass(frozen, name = "GetRecordsPage", module = "treasure_engine._core")]
pub struct GetRecordsPagePy {
    shared: Arc<Shared>,
    /// The `Record` objects, made on first use.
    records: PyOnceLock<Vec<Py<RecordPy>>>,
    malformed: Vec<Py<BadRecordPy>>,
}

impl std::fmt::Debug for GetRecordsPagePy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetRecordsPagePy")
            .field("shared", &self.shared)
            .field("malformed", &self.malformed.len())
            .finish_non_exhaustive()
    }
}

impl GetRecordsPagePy {
    fn record_objects(&self, py: Python<'_>) -> PyResult<&Vec<Py<RecordPy>>> {
        self.records.get_or_try_init(py, || {
            (0..self.shared.page.len())
                .map(|index| {
                    Py::new(
                        py,
                        RecordPy {
                            shared: Arc::clone(&self.shared),
                            index,
                        },
                    )
                })
                .collect()
        })
    }
}

#[pymethods]
impl GetRecordsPagePy {
    /// The user records in stream order (a new list of the same `Record` objects on each access).
    #[getter]
    fn records<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.record_objects(py)?)
    }

    /// The records that did not decode, in stream order; `position` says where each falls among `records`.
    #[getter]
    fn malformed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, &self.malformed)
    }

    /// The records grouped into `n` lanes by a stable hash of the partition key (`lane_of`), stream order
    /// kept within each lane: always `n` lists, some possibly empty.
    fn lanes<'py>(&self, py: Python<'py>, n: i64) -> PyResult<Vec<Bound<'py, PyList>>> {
        let lanes = u32::try_from(n)
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| PyValueError::new_err(format!("n must be in [1, 2**32), not {n}")))?;
        let objects = self.record_objects(py)?;
        let page = &self.shared.page;
        let mut grouped: Vec<Vec<&Py<RecordPy>>> = (0..lanes)
            .map(|_| Vec::with_capacity(page.len() / lanes as usize + 1))
            .collect();
        for (rec, obj) in page.records().zip(objects) {
            grouped[records::lane_of(rec.partition_key_bytes(), lanes) as usize].push(obj);
        }
        grouped
            .into_iter()
            .map(|lane| PyList::new(py, lane))
            .collect()
    }

    #[getter]
    fn shard_id(&self, py: Python<'_>) -> Py<PyString> {
        self.shared.shard_id.clone_ref(py)
    }

    /// The iterator for the next GetRecords call; `None` once a closed shard has been read to its end.
    #[getter]
    fn next_shard_iterator(&self) -> Option<&str> {
        self.shared.page.next_shard_iterator()
    }

    #[getter]
    fn millis_behind_latest(&self) -> Option<i64> {
        self.shared.page.millis_behind_latest()
    }

    /// `(shard_id, parent_shard_ids)` of each child shard (present when the shard has ended).
    #[getter]
    fn child_shards(&self) -> Vec<(String, Vec<String>)> {
        self.shared.page.child_shards().to_vec()
    }

    /// Kinesis records in the response, before de-aggregation.
    #[getter]
    fn kinesis_records(&self) -> usize {
        self.shared.page.kinesis_records()
    }

    /// Sequence number of the page's last Kinesis record, whatever became of it: the checkpoint that covers
    /// the whole page.
    #[getter]
    fn last_sequence_number(&self) -> Option<&str> {
        self.shared.page.last_sequence_number()
    }

    /// Sub-sequence number of the last user record of that Kinesis record, delivered or skipped (0 for a
    /// plain or malformed one): with `last_sequence_number`, the checkpoint that covers the whole page.
    #[getter]
    fn last_sub_sequence_number(&self) -> u64 {
        self.shared.page.last_sub_sequence_number()
    }

    /// Sub-records of aggregates delivered although outside the shard's hash-key range (policy "deliver").
    #[getter]
    fn out_of_range_records(&self) -> usize {
        self.shared.page.out_of_range_records()
    }

    /// Sub-records of the aggregates skipped whole for straying outside the shard's range (policy "skip").
    #[getter]
    fn skipped_out_of_range_records(&self) -> usize {
        self.shared.page.skipped_out_of_range_records()
    }

    fn __len__(&self) -> usize {
        self.shared.page.len()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let page = &self.shared.page;
        Ok(format!(
            "GetRecordsPage(shard_id={}, records={}, malformed={}, kinesis_records={}, \
             out_of_range_records={}, skipped_out_of_range_records={}, millis_behind_latest={}, shard_end={})",
            self.shared.shard_id.bind(py).repr()?,
            page.len(),
            self.malformed.len(),
            page.kinesis_records(),
            page.out_of_range_records(),
            page.skipped_out_of_range_records(),
            page.millis_behind_latest()
                .map_or_else(|| "None".to_owned(), |ms| ms.to_string()),
            if page.next_shard_iterator().is_none() {
                "True"
            } else {
                "False"
            },
        ))
    }
}

/// Parses a GetRecords response body into user records (KPL aggregates de-aggregated); raises
/// `MalformedRecord` when the body is not a GetRecords response. With `hash_key_range` (the shard's
/// `(starting, ending)` hash keys), every aggregate's sub-records are checked against it and an aggregate
/// that strays is delivered and counted ("deliver") or skipped whole ("skip"). Runs without the GIL.
#[pyfunction]
#[pyo3(signature = (body, shard_id, *, hash_key_range=None, out_of_range_aggregates="deliver"))]
pub fn parse_get_records(
    py: Python<'_>,
    body: &Bound<'_, PyAny>,
    shard_id: Bound<'_, PyString>,
    hash_key_range: Option<(u128, u128)>,
    out_of_range_aggregates: &str,
) -> PyResult<GetRecordsPagePy> {
    let policy = OutOfRange::from_name(out_of_range_aggregates).ok_or_else(|| {
        PyValueError::new_err(format!(
            "out_of_range_aggregates must be 'deliver' or 'skip', not {out_of_range_aggregates:?}"
        ))
    })?;
    let check = match hash_key_range {
        Some((start, end)) => Some(RangeCheck {
            range: HashKeyRange::new(start, end).py_err(py)?,
            policy,
        }),
        None => None,
    };
    let page = bytes_like(body, "body", |body| {
        py.detach(|| records::parse_get_records_checked(body, check))
    })?
    .py_err(py)?;
    let shared = Arc::new(Shared::new(page, shard_id)?);
    let malformed = shared
        .page
        .malformed()
        .map(|bad| {
            Py::new(
                py,
                BadRecordPy {
                    data: PyBytes::new(py, bad.data()).unbind(),
                    partition_key: bad.partition_key().to_owned(),
                    sequence_number: bad.sequence_number().to_owned(),
                    shard_id: shared.shard_id.clone_ref(py),
                    approximate_arrival: bad.approximate_arrival(),
                    reason: bad.reason().to_owned(),
                    position: bad.position(),
                },
            )
        })
        .collect::<PyResult<_>>()?;
    Ok(GetRecordsPagePy {
        shared,
        records: PyOnceLock::new(),
        malformed,
    })
}
