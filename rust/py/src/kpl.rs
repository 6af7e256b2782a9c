//! The KPL aggregated-record codec, for the consumer and for compatibility tests.

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use treasure_core::kpl::{self, Aggregator};

use crate::errors::IntoPy;

/// Encodes (data, partition_key, explicit_hash_key or None) records into one KPL aggregate.
#[pyfunction]
pub fn kpl_encode(
    py: Python<'_>,
    records: Vec<(Vec<u8>, String, Option<String>)>,
) -> Bound<'_, PyBytes> {
    let mut agg = Aggregator::new();
    for (data, key, ehk) in &records {
        agg.add(key.as_bytes(), ehk.as_deref().map(str::as_bytes), data);
    }
    let mut out = Vec::with_capacity(agg.encoded_len());
    agg.finish_into(&mut out);
    PyBytes::new(py, &out)
}

/// One de-aggregated record as Python sees it: (data, partition_key, explicit_hash_key).
type PySubRecord<'py> = (Bound<'py, PyBytes>, String, Option<String>);

/// Decodes a KPL aggregate into (data, partition_key, explicit_hash_key or None) records; raises
/// `MalformedRecord` on a bad magic, MD5, length or index.
#[pyfunction]
pub fn kpl_decode<'py>(py: Python<'py>, blob: &[u8]) -> PyResult<Vec<PySubRecord<'py>>> {
    let subs = kpl::decode_vec(blob).py_err(py)?;
    Ok(subs
        .into_iter()
        .map(|s| {
            (
                PyBytes::new(py, s.data),
                s.partition_key.to_owned(),
                s.explicit_hash_key.map(str::to_owned),
            )
        })
        .collect())
}

/// Whether `blob` starts with the KPL magic and is long enough to be an aggregate.
#[pyfunction]
pub fn kpl_is_aggregated(blob: &[u8]) -> bool {
    kpl::is_aggregated(blob)
}
