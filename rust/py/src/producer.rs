//! `Pipeline`: the Python face of `treasure_core::batch` (what it hands out is in `request.rs`).
//!
//! `submit` holds the GIL (releasing it per call costs more than the push) and copies straight from the
//! `bytes`/`str` buffers into the ring; only a full ring (a wait for room, a write to the spill) releases it.
//! With a WAL, whose lock, writes and fdatasyncs wait on the disk, `submit` runs without the GIL, and
//! `submit_many` takes its events with the GIL and pushes them without it, a chunk at a time.
//! Every release goes through [`detached`].

use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::marker::Ungil;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyIterator, PyList, PyString, PyTuple};
use treasure_core::batch::{self, BatcherConfig, Overflow, Pipeline, RequestFailure};
use treasure_core::log::FsyncPolicy;
use treasure_core::shards::{self, Shard, ShardMap};
use treasure_core::spill::SpillConfig;
use treasure_core::wal::WalConfig;
use treasure_core::{clock, CoreError};

use crate::errors::{self, IntoPy};
use crate::request::{DeadRecordPy, RequestPy};

/// Runs `f` with the GIL released, so that other Python threads run meanwhile: for work or waits longer than
/// a few microseconds (the disk, a lock held across disk writes, room in the ring), never per event where none
/// can happen (a release and re-acquire costs more than a push, and hands the GIL to whoever waits for it).
#[inline]
fn detached<T: Ungil>(py: Python<'_>, f: impl Ungil + FnOnce() -> T) -> T {
    py.detach(f)
}

/// The bytes of a `bytes` object borrowed in place, or a copy of any other contiguous buffer.
enum Data<'a> {
    Borrowed(&'a [u8]),
    Copied(Vec<u8>),
}

impl Data<'_> {
    #[inline]
    fn as_slice(&self) -> &[u8] {
        match self {
            Data::Borrowed(b) => b,
            Data::Copied(v) => v,
        }
    }
}

#[inline]
fn extract_data<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Data<'a>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Data::Borrowed(b.as_bytes()));
    }
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "data must be bytes-like, not str (encode it first)",
        ));
    }
    match PyBuffer::<u8>::get(obj) {
        Ok(buf) => Ok(Data::Copied(buf.to_vec(obj.py())?)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "data must be bytes-like (bytes, bytearray, memoryview), not {}",
            obj.get_type().name()?
        ))),
    }
}

const KEY_NOT_UNICODE: &str = "partition key is not valid Unicode (it holds a lone surrogate)";

#[inline]
fn extract_key<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    match obj.cast::<PyString>() {
        // A str that is not valid Unicode (a lone surrogate) cannot be sent: a bad key, not a bad type.
        Ok(s) => s
            .to_str()
            .map_err(|_| errors::InvalidPartitionKey(obj.py(), KEY_NOT_UNICODE)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "partition_key must be str, not {}",
            obj.get_type().name()?
        ))),
    }
}

fn extract_ehk(py: Python<'_>, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u128>> {
    let Some(obj) = obj else { return Ok(None) };
    if obj.is_none() {
        return Ok(None);
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return shards::parse_hash_key(s.to_str()?).py_err(py).map(Some);
    }
    if let Ok(v) = obj.extract::<u128>() {
        return Ok(Some(v));
    }
    Err(errors::InvalidHashKey(
        py,
        "explicit_hash_key must be a decimal string or an int in [0, 2**128)",
    ))
}

fn shard_map(list: &Bound<'_, PyAny>) -> PyResult<ShardMap> {
    let mut shards = Vec::new();
    for item in list.try_iter()? {
        let (id, start, end): (String, u128, u128) = item?.extract()?;
        shards.push(Shard { id, start, end });
    }
    ShardMap::new(shards).py_err(list.py())
}

fn secs(field: &'static str, value: f64) -> Result<Duration, CoreError> {
    if value.is_finite() && value >= 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(CoreError::Config {
            field,
            reason: format!("{value} is not a non-negative number of seconds"),
        })
    }
}

/// The ring, the batcher thread and the accounting of one producer.
#[derive(Debug)]
#[pyclass(frozen, name = "Pipeline", module = "treasure_engine._core")]
pub struct PipelinePy {
    inner: Pipeline,
    overflow: Overflow,
}

#[pymethods]
impl PipelinePy {
    #[new]
    #[pyo3(signature = (
        stream, shards, *, stream_is_arn=false, ring_bytes=64 << 20, aggregate=true,
        aggregation_max_bytes=51_200, linger_ms=50.0, rate_limit_linger_ms=200.0, max_request_records=500, max_request_bytes=5 << 20,
        max_record_bytes=1 << 20, shard_records_per_s=1000.0, shard_bytes_per_s=1_048_576.0, ordered=false,
        max_attempts=10, record_ttl_s=300.0, max_buffered_bytes=16 << 20, max_ready_requests=8,
        backoff_base_s=0.1, backoff_max_s=5.0, overflow="reject", block_timeout_s=1.0, spill_dir=None,
        spill_max_bytes=1 << 30, spill_segment_bytes=64 << 20, wal_dir=None, wal_fsync="interval",
        wal_fsync_interval_ms=100, wal_segment_bytes=64 << 20, shed_at_bytes=0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        stream: String,
        shards: &Bound<'_, PyAny>,
        stream_is_arn: bool,
        ring_bytes: usize,
        aggregate: bool,
        aggregation_max_bytes: usize,
        linger_ms: f64,
        rate_limit_linger_ms: f64,
        max_request_records: usize,
        max_request_bytes: usize,
        max_record_bytes: usize,
        shard_records_per_s: f64,
        shard_bytes_per_s: f64,
        ordered: bool,
        max_attempts: u32,
        record_ttl_s: f64,
        max_buffered_bytes: usize,
        max_ready_requests: usize,
        backoff_base_s: f64,
        backoff_max_s: f64,
        overflow: &str,
        block_timeout_s: f64,
        spill_dir: Option<std::path::PathBuf>,
        spill_max_bytes: u64,
        spill_segment_bytes: u64,
        wal_dir: Option<std::path::PathBuf>,
        wal_fsync: &str,
        wal_fsync_interval_ms: u64,
        wal_segment_bytes: u64,
        shed_at_bytes: usize,
    ) -> PyResult<Self> {
        let wal = match wal_dir {
            None => None,
            Some(dir) => Some(WalConfig {
                dir,
                fsync: match wal_fsync {
                    "always" => FsyncPolicy::Always,
                    "interval" => FsyncPolicy::Interval(Duration::from_millis(wal_fsync_interval_ms)),
                    "never" => FsyncPolicy::Never,
                    other => {
                        return Err(errors::ConfigError(
                            py,
                            format!("invalid configuration: wal_fsync: {other:?} is not one of 'always', 'interval', 'never'"),
                        ))
                    }
                },
                segment_bytes: wal_segment_bytes,
            }),
        };
        let map = shard_map(shards)?;
        let config = BatcherConfig {
            stream,
            stream_is_arn,
            ring_bytes,
            aggregate,
            aggregation_max_bytes,
            linger: secs("linger_ms", linger_ms / 1000.0).py_err(py)?,
            rate_limit_linger: secs("rate_limit_linger_ms", rate_limit_linger_ms / 1000.0)
                .py_err(py)?,
            max_request_records,
            max_request_bytes,
            max_record_bytes,
            shard_records_per_s,
            shard_bytes_per_s,
            ordered,
            max_attempts,
            record_ttl: secs("record_ttl_s", record_ttl_s).py_err(py)?,
            max_buffered_bytes,
            max_ready_requests,
            backoff_base: secs("backoff_base_s", backoff_base_s).py_err(py)?,
            backoff_max: secs("backoff_max_s", backoff_max_s).py_err(py)?,
            spill: spill_dir.map(|dir| SpillConfig {
                dir,
                max_bytes: spill_max_bytes,
                segment_bytes: spill_segment_bytes,
            }),
            wal,
            shed_at_bytes,
        };
        let overflow = match overflow {
            "reject" => Overflow::Reject,
            "block" => Overflow::Block(secs("block_timeout_s", block_timeout_s).py_err(py)?),
            "spill" if config.spill.is_some() => Overflow::Spill,
            "spill" => {
                return Err(errors::ConfigError(
                    py,
                    "invalid configuration: overflow: 'spill' needs spill_dir",
                ))
            }
            other => {
                return Err(errors::ConfigError(
                    py,
                    format!(
                    "invalid configuration: overflow: {other:?} is not one of 'reject', 'block', 'spill'"
                ),
                ))
            }
        };
        let inner = detached(py, || Pipeline::start(config, map)).py_err(py)?;
        Ok(Self { inner, overflow })
    }

    /// Accepts one event or raises; nothing is half-accepted.
    #[pyo3(signature = (data, partition_key, explicit_hash_key=None))]
    fn submit(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        partition_key: &Bound<'_, PyAny>,
        explicit_hash_key: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let data = extract_data(data)?;
        let key = extract_key(partition_key)?;
        let ehk = extract_ehk(py, explicit_hash_key)?;
        let now = clock::coarse_ns();
        if self.inner.is_durable() {
            return self.submit_durable(py, data.as_slice(), key, ehk, now);
        }
        match self.push(py, data.as_slice(), key, ehk, now)? {
            Pushed::Accepted => {
                // With the GIL held, as every call of it here.
                self.inner.count_accepted_serialised(1);
                Ok(())
            }
            Pushed::Full(why) => Err(errors::BufferFull(py, why)),
        }
    }

    /// Accepts events in order until one is refused for lack of room; returns how many were accepted.
    /// An invalid event raises (its `accepted` attribute says how many before it were taken).
    fn submit_many(&self, py: Python<'_>, records: &Bound<'_, PyAny>) -> PyResult<usize> {
        let now = clock::coarse_ns();
        let mut accepted = 0usize;
        let durable = self.inner.is_durable();
        let mut result: PyResult<()> = if durable {
            self.submit_many_durable(py, records, now, &mut accepted)
        } else if let Ok(list) = records.cast::<PyList>() {
            self.submit_seq(py, list.as_any(), true, now, &mut accepted)
        } else if let Ok(tuple) = records.cast_exact::<PyTuple>() {
            // Exact tuples only: a subclass may override `__iter__`, which other iterables go through.
            self.submit_seq(py, tuple.as_any(), false, now, &mut accepted)
        } else {
            (|| {
                for item in iter_events(records)? {
                    if !self.submit_item(py, &item?, now)? {
                        return Ok(());
                    }
                    accepted += 1;
                }
                Ok(())
            })()
        };
        self.inner.count_accepted(accepted as u64);
        if durable && accepted > 0 {
            // What was accepted is committed even when an invalid event ends the call: the exception's
            // `accepted` says those events were taken. A commit that fails is the error to report.
            let committed = detached(py, || self.inner.commit_wal()).py_err(py);
            result = committed.and(result);
        }
        match result {
            Ok(()) => Ok(accepted),
            Err(e) => {
                let _ = e.value(py).setattr("accepted", accepted);
                Err(e)
            }
        }
    }

    /// The eventfd that turns readable when sealed requests wait in the ready queue.
    fn wakeup_fd(&self) -> i32 {
        self.inner.wakeup_fd()
    }

    /// Clears the wake-up signal; call it on every wake-up (the eventfd is level-triggered).
    fn clear_wakeup(&self) {
        self.inner.clear_wakeup();
    }

    /// Takes up to `max` sealed requests.
    fn poll(&self, max: usize) -> Vec<RequestPy> {
        self.inner
            .poll(max)
            .into_iter()
            .map(RequestPy::new)
            .collect()
    }

    /// Applies a PutRecords 200 response; returns (delivered events, failed records, throttled records).
    fn complete(
        &self,
        py: Python<'_>,
        request: &RequestPy,
        response: &[u8],
    ) -> PyResult<(u64, u64, u64)> {
        let req = request.take_for(&self.inner)?;
        let summary = detached(py, || self.inner.complete(req, response)).py_err(py)?;
        Ok((summary.delivered, summary.failed, summary.throttled))
    }

    /// The whole request failed. `kind`: "throttled", "transient", "auth" or "not_sent".
    fn fail(
        &self,
        py: Python<'_>,
        request: &RequestPy,
        kind: &str,
        message: String,
    ) -> PyResult<()> {
        let failure = match kind {
            "throttled" => RequestFailure::Throttled(message),
            "transient" => RequestFailure::Transient(message),
            "auth" => RequestFailure::Auth(message),
            "not_sent" => RequestFailure::NotSent(message),
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown failure kind {other:?}"
                )))
            }
        };
        let req = request.take_for(&self.inner)?;
        detached(py, || self.inner.fail(req, failure));
        Ok(())
    }

    /// Replaces the shard map: a list of (shard_id, starting_hash_key, ending_hash_key).
    fn set_shards(&self, shards: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.set_shards(shard_map(shards)?);
        Ok(())
    }

    fn refresh_wanted(&self) -> bool {
        self.inner.refresh_wanted()
    }

    /// Records that reached a terminal failure, as [`DeadRecordPy`]s, oldest first. Call `confirm_dead(n)` once
    /// they are stored.
    #[pyo3(signature = (max=10_000))]
    fn take_dead(&self, py: Python<'_>, max: usize) -> PyResult<Vec<Py<DeadRecordPy>>> {
        let now = clock::coarse_ns();
        self.inner
            .take_dead(max)
            .into_iter()
            .map(|d| {
                let record = DeadRecordPy {
                    data: PyBytes::new(py, &d.data).unbind(),
                    partition_key: PyString::new(py, &d.partition_key).unbind(),
                    explicit_hash_key: d.explicit_hash_key.map(|k| PyString::new(py, &k).unbind()),
                    attempts: d.attempts,
                    error_code: PyString::new(py, &d.error_code).unbind(),
                    error_message: PyString::new(py, &d.error_message).unbind(),
                    age_s: now.saturating_sub(d.enqueued_ns) as f64 / 1e9,
                    failed_age_s: (d.first_failure_ns != 0)
                        .then(|| now.saturating_sub(d.first_failure_ns) as f64 / 1e9),
                };
                Py::new(py, record)
            })
            .collect()
    }

    fn confirm_dead(&self, n: u64) {
        self.inner.confirm_dead(n);
    }

    fn dead_pending(&self) -> u64 {
        self.inner.dead_pending()
    }

    /// At close, after the last dead letters are confirmed: acknowledges the whole WAL when nothing is held.
    fn finish_wal(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, || self.inner.finish_wal()).py_err(py)
    }

    /// Last at close: writes out and closes the spill and the WAL, freeing their directories.
    fn close_storage(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, || self.inner.close_storage()).py_err(py)
    }

    fn begin_flush(&self) {
        self.inner.begin_flush();
    }

    fn end_flush(&self) {
        self.inner.end_flush();
    }

    /// Stops accepting events (submit raises ProducerClosed); what was accepted is still delivered.
    fn close(&self) {
        self.inner.close();
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Stops the batcher thread; with `abandon`, everything undelivered moves to the dead list. With
    /// `dead_bound_bytes`, an abandoning stop reads no more of the ring while the dead list holds more than
    /// that: another thread must take dead records meanwhile (or call `lift_dead_bound`).
    #[pyo3(signature = (abandon, dead_bound_bytes=None))]
    fn shutdown(&self, py: Python<'_>, abandon: bool, dead_bound_bytes: Option<u64>) {
        detached(py, || {
            self.inner.shutdown_bounded(abandon, dead_bound_bytes);
        });
    }

    /// Lets an abandoning stop finish without waiting for the dead list to be taken.
    fn lift_dead_bound(&self) {
        self.inner.lift_dead_bound();
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("accepted", s.accepted)?;
        d.set_item("refused", s.refused)?;
        d.set_item("delivered", s.delivered)?;
        d.set_item("dead_lettered", s.dead_lettered)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("retried", s.retried)?;
        d.set_item("throttled", s.throttled)?;
        d.set_item("requests", s.requests)?;
        d.set_item("requests_failed", s.requests_failed)?;
        d.set_item("records_sent", s.records_sent)?;
        d.set_item("shard_mismatches", s.shard_mismatches)?;
        d.set_item("wrong_shard_records", s.wrong_shard_records)?;
        d.set_item("batcher_wakeups", s.batcher_wakeups)?;
        d.set_item("ring_bytes_used", s.ring_bytes_used)?;
        d.set_item("buffered_bytes", s.buffered_bytes)?;
        d.set_item("ready_requests", s.ready_requests)?;
        d.set_item("outstanding_requests", s.outstanding_requests)?;
        d.set_item("dead_pending", self.inner.dead_pending())?;
        d.set_item("spilled", s.spilled)?;
        d.set_item("spill_recovered", s.spill_recovered)?;
        d.set_item("spill_errors", s.spill_errors)?;
        d.set_item("spill_backlog_bytes", s.spill_backlog_bytes)?;
        d.set_item("wal_recovered", s.wal_recovered)?;
        d.set_item("wal_replay_pending", s.wal_replay_pending)?;
        d.set_item("wal_errors", s.wal_errors)?;
        Ok(d)
    }
}

/// How many events `submit_many` takes from a list or tuple with the GIL before pushing them without it under a
/// WAL: one release per chunk, each pushing some tens of microseconds' worth.
const WAL_CHUNK: usize = 256;

/// An event `submit_many` took from its input with the GIL and checked: a strong reference to its tuple, and a
/// copy of its data when that is not a `bytes` object (the pushing thread must not read a buffer Python code
/// may change). A tuple's items never change, so holding the tuple keeps its `bytes` data, its `str` key and
/// the UTF-8 form CPython caches with the key alive and unchanged: one reference per event instead of three.
struct HeldEvent<'py> {
    item: Bound<'py, PyAny>,
    _copy: Option<Vec<u8>>,
}

/// The data, key and hash key of a [`HeldEvent`], for the thread that pushes it without the GIL: pointers into
/// the objects (or the copy) the `HeldEvent` keeps alive and unchanged.
#[derive(Clone, Copy)]
struct RawEvent {
    data: *const u8,
    data_len: usize,
    key: *const u8,
    key_len: usize,
    ehk: Option<u128>,
}

// SAFETY: a `RawEvent` points only at bytes that nothing changes or frees while its `HeldEvent` is held, and
// `submit_many_durable` reads them only then; reading such bytes from another thread needs no GIL.
unsafe impl Send for RawEvent {}
// SAFETY: as for `Send`: shared reads of unchanging bytes.
unsafe impl Sync for RawEvent {}

impl RawEvent {
    fn parts(&self) -> (&[u8], &str, Option<u128>) {
        // SAFETY: the bytes of the event's data (or its copy) and the UTF-8 form of its key, checked by
        // `to_str`, both alive and unchanged while its `HeldEvent` is held (see `RawEvent`'s `Send`).
        unsafe {
            (
                std::slice::from_raw_parts(self.data, self.data_len),
                std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.key, self.key_len)),
                self.ehk,
            )
        }
    }
}

/// Where `submit_many` takes its events from under a WAL.
enum Source<'py> {
    List(Bound<'py, PyList>),
    Tuple(Bound<'py, PyTuple>),
    Iter(Bound<'py, PyIterator>),
}

impl<'py> Source<'py> {
    fn new(records: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(list) = records.cast::<PyList>() {
            return Ok(Self::List(list.clone()));
        }
        if let Ok(tuple) = records.cast_exact::<PyTuple>() {
            return Ok(Self::Tuple(tuple.clone()));
        }
        Ok(Self::Iter(iter_events(records)?))
    }

    /// Item `at` (read from the list as it is now: Python code may have changed it), or the iterator's next.
    fn next(&mut self, at: usize) -> Option<PyResult<Bound<'py, PyAny>>> {
        match self {
            Self::List(list) => (at < list.len()).then(|| list.get_item(at)),
            Self::Tuple(tuple) => (at < tuple.len()).then(|| tuple.get_item(at)),
            Self::Iter(iter) => iter.next(),
        }
    }

    /// Whether item `at` is still `item` (another thread may have changed a list).
    fn holds(&self, at: usize, item: &Bound<'py, PyAny>) -> bool {
        match self {
            Self::List(list) => list.get_item(at).is_ok_and(|now| now.is(item)),
            Self::Tuple(_) => true,
            Self::Iter(_) => false,
        }
    }

    /// A list or tuple, for reading by borrowed pointers; `None` for an iterator.
    fn sequence(&self) -> Option<Sequence> {
        match self {
            Self::List(list) => Some(Sequence {
                ptr: list.as_ptr(),
                is_list: true,
            }),
            Self::Tuple(tuple) => Some(Sequence {
                ptr: tuple.as_ptr(),
                is_list: false,
            }),
            Self::Iter(_) => None,
        }
    }

    /// How many events to take before pushing them. One from an iterator: it is not read past an event the
    /// ring refuses, as without a WAL.
    fn chunk(&self) -> usize {
        match self {
            Self::Iter(_) => 1,
            Self::List(_) | Self::Tuple(_) => WAL_CHUNK,
        }
    }
}

/// A list or tuple `submit_many` reads by borrowed pointers (it holds a strong reference to it meanwhile).
struct Sequence {
    ptr: *mut pyo3::ffi::PyObject,
    is_list: bool,
}

impl Sequence {
    /// Its current length and a reader of its items (borrowed references).
    fn view(&self) -> (usize, impl Fn(usize) -> *mut pyo3::ffi::PyObject) {
        use pyo3::ffi;
        let (ptr, is_list) = (self.ptr, self.is_list);
        // SAFETY: `ptr` is a live list or tuple (held by the `Source`); `Py_SIZE` reads its `ob_size`.
        let len = unsafe { ffi::Py_SIZE(ptr) } as usize;
        // SAFETY: the GIL is held and callers pass indexes below the current size (`Lookahead::advance`'s
        // contract), so the calls cannot fail; they return references borrowed from the sequence.
        let get = move |index: usize| unsafe {
            if is_list {
                ffi::PyList_GetItem(ptr, index as ffi::Py_ssize_t)
            } else {
                ffi::PyTuple_GetItem(ptr, index as ffi::Py_ssize_t)
            }
        };
        (len, get)
    }
}

const NOT_AN_EVENT: &str = "submit_many takes (data, partition_key[, explicit_hash_key]) tuples";

/// `records.try_iter()`, its `TypeError` saying what `submit_many` takes rather than "'int' object is not
/// iterable".
fn iter_events<'py>(records: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyIterator>> {
    records.try_iter().map_err(|e| {
        if !e.is_instance_of::<PyTypeError>(records.py()) {
            return e;
        }
        match records.get_type().name() {
            Ok(name) => PyTypeError::new_err(format!(
                "submit_many takes an iterable of (data, partition_key[, explicit_hash_key]) tuples, not {name}"
            )),
            Err(e) => e,
        }
    })
}

/// `item` as one event of `submit_many`: a tuple of 2 or 3 items, and its length.
fn event_tuple<'a, 'py>(item: &'a Bound<'py, PyAny>) -> PyResult<(&'a Bound<'py, PyTuple>, usize)> {
    let tuple = item
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err(NOT_AN_EVENT))?;
    let n = tuple.len();
    if !(2..=3).contains(&n) {
        return Err(PyTypeError::new_err(NOT_AN_EVENT));
    }
    Ok((tuple, n))
}

/// Checks one item of `submit_many` as [`PipelinePy::submit_item`] does (and in the same order), holding its
/// objects. Python code may run here (a buffer exporter, a hash key's `__index__`).
fn hold_event<'py>(
    py: Python<'py>,
    item: Bound<'py, PyAny>,
    held: &mut Vec<HeldEvent<'py>>,
    events: &mut Vec<RawEvent>,
) -> PyResult<()> {
    let (tuple, n) = event_tuple(&item)?;
    let data_obj = tuple.get_borrowed_item(0)?;
    // A copy's bytes stay where they are when the `Vec` moves into the `HeldEvent`.
    let (data, data_len, copy) = if let Ok(bytes) = data_obj.cast::<PyBytes>() {
        let b = bytes.as_bytes();
        (b.as_ptr(), b.len(), None)
    } else {
        let v = match extract_data(&data_obj)? {
            Data::Copied(v) => v,
            Data::Borrowed(b) => b.to_vec(),
        };
        (v.as_ptr(), v.len(), Some(v))
    };
    let key_obj = tuple.get_borrowed_item(1)?;
    let key = extract_key(&key_obj)?;
    let ehk = if n == 3 {
        extract_ehk(py, Some(&*tuple.get_borrowed_item(2)?))?
    } else {
        None
    };
    // Pushed where they are built (a struct built on the stack and then copied is read back in wider loads than
    // it was stored with, which waits for the stores).
    events.push(RawEvent {
        data,
        data_len,
        key: key.as_ptr(),
        key_len: key.len(),
        ehk,
    });
    held.push(HeldEvent { item, _copy: copy });
    Ok(())
}

/// Takes events from `source` at `at + held.len()` on into `held` and `events` until `chunk` are held, one is
/// invalid (its error goes to `invalid`) or the source ends (`exhausted`). A list or tuple is read as
/// `submit_seq` reads it, the objects of the events ahead loaded early; an event that is not an exact
/// `(bytes, str)` pair goes through `hold_event`, which may run Python code (then the pointers read ahead are
/// read again).
fn hold_chunk<'py>(
    py: Python<'py>,
    source: &mut Source<'py>,
    at: usize,
    chunk: usize,
    (held, events): (&mut Vec<HeldEvent<'py>>, &mut Vec<RawEvent>),
    invalid: &mut Option<PyErr>,
    exhausted: &mut bool,
) {
    let seq = source.sequence();
    let mut ahead = Lookahead::new();
    ahead.reset(at + held.len());
    while held.len() < chunk && invalid.is_none() && !*exhausted {
        let j = at + held.len();
        if let Some((len, get)) = seq.as_ref().map(Sequence::view) {
            if j < len {
                // SAFETY: the GIL is held since `ahead` was made, and it is reset whenever Python code may have
                // run (after `hold_event`).
                unsafe { ahead.advance(j, len, get) };
                let slot = j % WINDOW;
                // SAFETY: the data and key pointers are live items of a live item of the sequence.
                match unsafe { borrow_event(py, ahead.datas[slot], ahead.keys[slot]) } {
                    Some(Ok((data, key))) => {
                        events.push(RawEvent {
                            data: data.as_ptr(),
                            data_len: data.len(),
                            key: key.as_ptr(),
                            key_len: key.len(),
                            ehk: None,
                        });
                        // SAFETY: a live item of the sequence; `Bound` takes its own strong reference.
                        held.push(HeldEvent {
                            item: unsafe { Bound::from_borrowed_ptr(py, ahead.tuples[slot]) },
                            _copy: None,
                        });
                        continue;
                    }
                    Some(Err(e)) => {
                        *invalid = Some(e);
                        continue;
                    }
                    None => {}
                }
            }
        }
        match source.next(j) {
            None => *exhausted = true,
            Some(item) => {
                if let Err(e) = item.and_then(|item| hold_event(py, item, held, events)) {
                    *invalid = Some(e);
                }
            }
        }
        ahead.reset(j + 1);
    }
}

impl PipelinePy {
    /// `submit` with a WAL: all of it without the GIL. The WAL's lock (held by other submitters and the batcher
    /// across disk writes), the frame's `write(2)` and, under `wal_fsync="always"`, its fdatasync may each wait
    /// on the disk.
    fn submit_durable(
        &self,
        py: Python<'_>,
        data: &[u8],
        key: &str,
        ehk: Option<u128>,
        now: u64,
    ) -> PyResult<()> {
        let done = detached(py, || {
            self.inner
                .offer(data, key, ehk, now, self.overflow, |push| push())?;
            self.inner.count_accepted(1);
            self.inner.commit_wal()
        });
        match done {
            Ok(()) => Ok(()),
            Err(CoreError::BufferFull) => Err(errors::BufferFull(py, self.full_reason())),
            Err(e) => Err(errors::to_py(py, e)),
        }
    }

    /// `submit_many` with a WAL. Events are taken and checked with the GIL, a chunk at a time, holding strong
    /// references to their objects; then pushed (WAL frame, ring entry, a wait for room) without it. The
    /// caller commits once at the end. Stops at the first refused event; an invalid one raises once the events
    /// before it are pushed. A list or tuple is read by index, afresh for every chunk and after every wait for
    /// room, so Python code that changes it (an item's `__index__`, another thread) has the same effect as
    /// without a WAL.
    fn submit_many_durable(
        &self,
        py: Python<'_>,
        records: &Bound<'_, PyAny>,
        now: u64,
        accepted: &mut usize,
    ) -> PyResult<()> {
        let mut source = Source::new(records)?;
        let chunk = source.chunk();
        let mut at = 0usize;
        // Events taken from `records[at..]` and not pushed yet; then the error of the one after them, if any.
        let mut held: Vec<HeldEvent<'_>> = Vec::with_capacity(chunk);
        let mut events: Vec<RawEvent> = Vec::with_capacity(chunk);
        let mut invalid = None;
        let mut exhausted = false;
        loop {
            hold_chunk(
                py,
                &mut source,
                at,
                chunk,
                (&mut held, &mut events),
                &mut invalid,
                &mut exhausted,
            );
            let (taken, waited, pushed) = if events.is_empty() {
                (0, false, Ok(()))
            } else {
                detached(py, || {
                    // As many as go in at once under one hold of the WAL's lock; then one at a time from the
                    // first that does not (each refused, waiting for room, or reporting the WAL's error).
                    let run = self.inner.offer_wal_run(&events, RawEvent::parts, now);
                    for (i, (data, key, ehk)) in
                        events.iter().map(RawEvent::parts).enumerate().skip(run)
                    {
                        let mut waited = false;
                        let pushed = self
                            .inner
                            .offer(data, key, ehk, now, self.overflow, |push| {
                                waited = true;
                                push()
                            });
                        if pushed.is_err() || waited {
                            return (i + usize::from(pushed.is_ok()), waited, pushed);
                        }
                    }
                    (events.len(), false, Ok(()))
                })
            };
            *accepted += taken;
            at += taken;
            match pushed {
                Ok(()) => {}
                Err(CoreError::BufferFull) => return Ok(()),
                Err(e) => return Err(errors::to_py(py, e)),
            }
            held.drain(..taken);
            events.drain(..taken);
            if waited {
                // Other Python threads ran during the wait for room: as without a WAL, what comes next is read
                // from `records` as it is now. Events still in their places are kept (their checks, which may
                // have run Python code, are not run twice).
                let still = held
                    .iter()
                    .enumerate()
                    .take_while(|(j, h)| source.holds(at + j, &h.item))
                    .count();
                if still < held.len() {
                    held.truncate(still);
                    events.truncate(still);
                    invalid = None;
                }
                exhausted = false;
                continue;
            }
            if let Some(e) = invalid {
                return Err(e);
            }
            if exhausted {
                return Ok(());
            }
        }
    }

    /// Why a refused event was refused, for `BufferFull`.
    fn full_reason(&self) -> String {
        match self.overflow {
            Overflow::Reject => "ring buffer full (overflow='reject')".into(),
            Overflow::Block(timeout) => format!(
                "ring buffer still full after blocking {:.3}s (overflow='block')",
                timeout.as_secs_f64()
            ),
            Overflow::Spill => {
                "ring buffer and spill both full (overflow='spill', spill_max_bytes)".into()
            }
        }
    }
}

/// How far ahead of the event being pushed `submit_seq` loads the next events' tuples, and their data and key
/// objects: the cache misses of one event's three objects then overlap with the pushes of the ones before it.
const AHEAD_TUPLE: usize = 8;
const AHEAD_ITEMS: usize = 4;
const WINDOW: usize = 16;

/// Starts loading the cache line at `p` (a hint: it never faults).
#[inline]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Borrowed pointers to the objects of the events ahead of the one being pushed, for `submit_seq`. Items
/// `[at, fetched)` have their tuple in `tuples`; items `[at, split)` also their data and key objects, or a null
/// data pointer when the item is not an exact `(bytes, str)` tuple.
struct Lookahead {
    tuples: [*mut pyo3::ffi::PyObject; WINDOW],
    datas: [*mut pyo3::ffi::PyObject; WINDOW],
    keys: [*mut pyo3::ffi::PyObject; WINDOW],
    fetched: usize,
    split: usize,
}

impl Lookahead {
    fn new() -> Self {
        Self {
            tuples: [std::ptr::null_mut(); WINDOW],
            datas: [std::ptr::null_mut(); WINDOW],
            keys: [std::ptr::null_mut(); WINDOW],
            fetched: 0,
            split: 0,
        }
    }

    /// Loads what item `at` needs and starts loading the items after it.
    ///
    /// # Safety
    /// The GIL is held, `get(j)` returns a live (borrowed) item for every `j < len`, and no Python code ran
    /// since the pointers held for items from `at` on were read (else call [`reset`](Self::reset) first).
    #[inline]
    unsafe fn advance(
        &mut self,
        at: usize,
        len: usize,
        get: impl Fn(usize) -> *mut pyo3::ffi::PyObject,
    ) {
        use pyo3::ffi;
        while self.fetched < len && self.fetched < at + AHEAD_TUPLE {
            let tuple = get(self.fetched);
            prefetch(tuple.cast());
            self.tuples[self.fetched % WINDOW] = tuple;
            self.fetched += 1;
        }
        while self.split < self.fetched && self.split < at + AHEAD_ITEMS {
            let slot = self.split % WINDOW;
            let tuple = self.tuples[slot];
            // SAFETY: `tuple` is live (the caller's contract); an exact tuple of two has items 0 and 1.
            unsafe {
                if ffi::Py_TYPE(tuple) == &raw mut ffi::PyTuple_Type && ffi::Py_SIZE(tuple) == 2 {
                    let data = ffi::PyTuple_GetItem(tuple, 0);
                    let key = ffi::PyTuple_GetItem(tuple, 1);
                    // A 100-byte bytes object spans three lines; a short str's characters follow its header.
                    prefetch(data.cast());
                    prefetch(data.cast::<u8>().wrapping_add(64));
                    prefetch(data.cast::<u8>().wrapping_add(128));
                    prefetch(key.cast());
                    prefetch(key.cast::<u8>().wrapping_add(48));
                    self.datas[slot] = data;
                    self.keys[slot] = key;
                } else {
                    self.datas[slot] = std::ptr::null_mut();
                }
            }
            self.split += 1;
        }
    }

    /// Forgets the items from `from` on (Python code may have changed the sequence).
    fn reset(&mut self, from: usize) {
        self.fetched = from;
        self.split = from;
    }
}

/// The data and key of an exact `(bytes, str)` event, borrowed from their objects; `None` for other types.
///
/// # Safety
/// The GIL is held; `data` is null or live, `key` live when `data` is not null, and both outlive `'a`.
#[inline]
unsafe fn borrow_event<'a>(
    py: Python<'_>,
    data: *mut pyo3::ffi::PyObject,
    key: *mut pyo3::ffi::PyObject,
) -> Option<PyResult<(&'a [u8], &'a str)>> {
    use pyo3::ffi;
    // SAFETY: `data` and `key` are live when `data` is not null (the caller's contract).
    let exact = !data.is_null()
        && unsafe {
            ffi::Py_TYPE(data) == &raw mut ffi::PyBytes_Type
                && ffi::Py_TYPE(key) == &raw mut ffi::PyUnicode_Type
        };
    if !exact {
        return None;
    }
    let mut buf: *mut std::ffi::c_char = std::ptr::null_mut();
    let mut len: ffi::Py_ssize_t = 0;
    let mut key_len: ffi::Py_ssize_t = 0;
    // SAFETY: `data` is an exact bytes object, so this cannot fail; it points `buf` at its `len` bytes, which
    // live as long as `data`.
    let bytes = unsafe {
        ffi::PyBytes_AsStringAndSize(data, &raw mut buf, &raw mut len);
        std::slice::from_raw_parts(buf.cast::<u8>(), len as usize)
    };
    // SAFETY: `key` is an exact str; a null result means an error was set (lone surrogates).
    let utf8 = unsafe { ffi::PyUnicode_AsUTF8AndSize(key, &raw mut key_len) };
    if utf8.is_null() {
        drop(PyErr::fetch(py)); // the UnicodeEncodeError: a bad key, said as `submit` says it
        return Some(Err(errors::InvalidPartitionKey(py, KEY_NOT_UNICODE)));
    }
    // SAFETY: CPython returns the str's UTF-8 form, `key_len` bytes, cached with (and living as long as) it.
    let key = unsafe {
        std::str::from_utf8_unchecked(std::slice::from_raw_parts(
            utf8.cast::<u8>(),
            key_len as usize,
        ))
    };
    Some(Ok((bytes, key)))
}

impl PipelinePy {
    /// One item of `submit_many`: a `(data, partition_key[, explicit_hash_key])` tuple of any buffer type.
    fn submit_item(&self, py: Python<'_>, item: &Bound<'_, PyAny>, now: u64) -> PyResult<bool> {
        let (tuple, n) = event_tuple(item)?;
        let data_obj = tuple.get_borrowed_item(0)?;
        let data = extract_data(&data_obj)?;
        let key_obj = tuple.get_borrowed_item(1)?;
        let key = extract_key(&key_obj)?;
        let ehk = if n == 3 {
            extract_ehk(py, Some(&*tuple.get_borrowed_item(2)?))?
        } else {
            None
        };
        Ok(matches!(
            self.push(py, data.as_slice(), key, ehk, now)?,
            Pushed::Accepted
        ))
    }

    /// `submit_many` over a list (`is_list`) or a tuple. Exact `(bytes, str)` tuples take a fast path on
    /// borrowed references, loading the objects a few events ahead; anything else goes through
    /// [`submit_item`](Self::submit_item). Borrowed references stay valid because no Python code runs on the
    /// fast path; after anything that may run some (another item type, a wait without the GIL) the items
    /// ahead are read from `seq` again.
    fn submit_seq(
        &self,
        py: Python<'_>,
        seq: &Bound<'_, PyAny>,
        is_list: bool,
        now: u64,
        accepted: &mut usize,
    ) -> PyResult<()> {
        use pyo3::ffi;
        let seq_ptr = seq.as_ptr();
        // SAFETY: `seq` is a live list or tuple; `Py_SIZE` reads its `ob_size` (part of the limited API).
        let size = || unsafe { ffi::Py_SIZE(seq_ptr) } as usize;
        // SAFETY: the GIL is held and callers pass indexes below the current size, so the calls cannot fail;
        // they return references borrowed from `seq`.
        let get = |index: usize| unsafe {
            if is_list {
                ffi::PyList_GetItem(seq_ptr, index as ffi::Py_ssize_t)
            } else {
                ffi::PyTuple_GetItem(seq_ptr, index as ffi::Py_ssize_t)
            }
        };
        let mut len = size();
        let mut ahead = Lookahead::new();
        let released = std::cell::Cell::new(false);
        let mut at = 0usize;
        while at < len {
            // SAFETY: the lookahead is reset below whenever Python code may have run.
            unsafe { ahead.advance(at, len, get) };
            let slot = at % WINDOW;
            let tuple = ahead.tuples[slot];
            // SAFETY: the data and key pointers are live items of a live item of `seq`, and nothing that could
            // drop them runs while they are used (a wait without the GIL holds `tuple`).
            let event = unsafe { borrow_event(py, ahead.datas[slot], ahead.keys[slot]) };
            let ok = if let Some(event) = event {
                let (data, key) = event?;
                // Waiting releases the GIL, and other threads may then drop the tuple from `seq`: hold it, and so
                // its data and key, until `offer` returns (it reads them again after the wait, under a WAL).
                let mut held = None;
                let pushed = self
                    .inner
                    .offer(data, key, None, now, self.overflow, |push| {
                        // SAFETY: `tuple` is live; `Bound` takes its own strong reference.
                        held = Some(unsafe { Bound::from_borrowed_ptr(py, tuple) });
                        released.set(true);
                        detached(py, push)
                    });
                drop(held);
                match pushed {
                    Ok(()) => true,
                    Err(CoreError::BufferFull) => false,
                    Err(e) => return Err(errors::to_py(py, e)),
                }
            } else {
                // SAFETY: `tuple` is a live item of `seq`; `Bound` takes its own strong reference.
                let item = unsafe { Bound::from_borrowed_ptr(py, tuple) };
                // Python code may run in there (a buffer exporter, `__index__`).
                released.set(true);
                self.submit_item(py, &item, now)?
            };
            if !ok {
                return Ok(());
            }
            if released.replace(false) {
                len = size();
                ahead.reset(at + 1);
            }
            *accepted += 1;
            at += 1;
        }
        Ok(())
    }
}

enum Pushed {
    Accepted,
    Full(String),
}

impl PipelinePy {
    #[inline]
    fn push(
        &self,
        py: Python<'_>,
        data: &[u8],
        key: &str,
        ehk: Option<u128>,
        now: u64,
    ) -> PyResult<Pushed> {
        // Only a full ring waits (for room, or on the spill's disk), and it waits without the GIL.
        match self
            .inner
            .offer(data, key, ehk, now, self.overflow, |push| {
                detached(py, push)
            }) {
            Ok(()) => Ok(Pushed::Accepted),
            Err(CoreError::BufferFull) => Ok(Pushed::Full(self.full_reason())),
            Err(e) => Err(errors::to_py(py, e)),
        }
    }
}

/// Runs the batcher over `events` on this thread (no ring, no rate limits, no sender) and returns the sealed
/// PutRecords bodies. Used by benchmarks and compatibility tests.
#[pyfunction]
#[pyo3(signature = (stream, shards, events, *, aggregate=true, aggregation_max_bytes=51_200))]
pub fn seal_offline<'py>(
    py: Python<'py>,
    stream: String,
    shards: &Bound<'py, PyAny>,
    events: Vec<(Vec<u8>, String)>,
    aggregate: bool,
    aggregation_max_bytes: usize,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let map = shard_map(shards)?;
    let config = BatcherConfig {
        stream,
        aggregate,
        aggregation_max_bytes,
        ..BatcherConfig::default()
    };
    let bodies = detached(py, || {
        batch::seal_offline(
            config,
            map,
            events.iter().map(|(d, k)| (d.as_slice(), k.as_str(), None)),
        )
    })
    .py_err(py)?;
    Ok(bodies.iter().map(|b| PyBytes::new(py, b)).collect())
}

/// `MD5(partition_key)` as an int: the hash key Kinesis routes the key by.
#[pyfunction]
pub fn partition_key_hash(partition_key: &str) -> u128 {
    shards::hash_key(partition_key.as_bytes())
}
