//! A benchmark reference only, not part of the API: the floor of a call from Python into a PyO3 method.
//!
//! `_core._NoopSubmit().submit(data, partition_key, explicit_hash_key=None)` has `Pipeline.submit`'s
//! signature and does nothing with its arguments (no extraction, no clock, no ring), so timing it measures
//! only what any PyO3 method taking these arguments costs: the vectorcall, argument parsing and the return.
//! bench/test_submit.py times it in the same rounds as `Pipeline.submit` to report submit against this floor.

use pyo3::prelude::*;

/// The FFI floor of `Pipeline.submit` (bench/test_submit.py); a benchmark reference, not for applications.
#[pyclass(frozen, name = "_NoopSubmit", module = "treasure_engine._core")]
#[derive(Debug, Default)]
pub struct NoopSubmit;

#[pymethods]
impl NoopSubmit {
    #[new]
    fn new() -> Self {
        Self
    }

    /// Takes `Pipeline.submit`'s arguments and does nothing with them.
    #[pyo3(signature = (data, partition_key, explicit_hash_key=None))]
    #[allow(clippy::unused_self)] // the point is a method call, like `Pipeline.submit`
    fn submit(
        &self,
        data: &Bound<'_, PyAny>,
        partition_key: &Bound<'_, PyAny>,
        explicit_hash_key: Option<&Bound<'_, PyAny>>,
    ) {
        let _ = (data, partition_key, explicit_hash_key);
    }
}
