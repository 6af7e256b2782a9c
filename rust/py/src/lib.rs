//! `treasure_engine._core`: thin PyO3 wrappers over `treasure_core`; no logic that the core could hold.

use pyo3::prelude::*;

mod bench_floor;
mod breaker;
mod errors;
mod kpl;
mod log;
mod metrics;
mod producer;
mod records;
mod request;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<producer::PipelinePy>()?;
    m.add_class::<request::RequestPy>()?;
    m.add_class::<request::DeadRecordPy>()?;
    m.add_function(wrap_pyfunction!(producer::seal_offline, m)?)?;
    m.add_function(wrap_pyfunction!(producer::partition_key_hash, m)?)?;
    m.add_function(wrap_pyfunction!(kpl::kpl_encode, m)?)?;
    m.add_function(wrap_pyfunction!(kpl::kpl_decode, m)?)?;
    m.add_function(wrap_pyfunction!(kpl::kpl_is_aggregated, m)?)?;
    m.add_class::<log::SegmentLogPy>()?;
    m.add_class::<log::LogReaderPy>()?;
    m.add_class::<log::CorruptionPy>()?;
    m.add_class::<breaker::CircuitBreakerPy>()?;
    m.add_class::<breaker::GuardedFunction>()?;
    m.add_class::<breaker::PermitPy>()?;
    m.add_function(wrap_pyfunction!(records::parse_get_records, m)?)?;
    m.add_class::<records::GetRecordsPagePy>()?;
    m.add_class::<records::RecordPy>()?;
    m.add_class::<records::BadRecordPy>()?;
    m.add_class::<metrics::MetricsPy>()?;
    m.add_class::<metrics::CounterPy>()?;
    m.add_class::<metrics::GaugePy>()?;
    m.add_class::<metrics::HistogramPy>()?;
    m.add_class::<bench_floor::NoopSubmit>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
