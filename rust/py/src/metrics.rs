//! `Metrics`, `Counter`, `Gauge` and `Histogram`: the Python face of `treasure_core::metrics`.
//!
//! A handle is a frozen object around an `Arc` of atomics, so `inc` / `observe` are one Rust call with no lock.
//! Each series keeps its Python objects beside it in the registry (the handle, the name, help and kind
//! strings, the labels tuple, the histogram bounds), made once, so that get-or-create returns the same handle
//! and `snapshot()` only makes the values. No Python code runs while the registry's lock is held: the objects
//! are made after the core returns the series, and removed series are dropped after the lock is released.

use std::sync::{Arc, Mutex, PoisonError};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use treasure_core::metrics::{
    Counter, Gauge, Histogram, HistogramLayout, Kind, Metric, Registry, Series,
};
use treasure_core::CoreError;

use crate::errors::IntoPy;

/// The Python objects of one series, made the first time it is seen from Python.
#[derive(Debug)]
struct Cached {
    handle: Py<PyAny>,
    name: Py<PyString>,
    help: Py<PyString>,
    kind: Py<PyString>,
    labels: Py<PyTuple>,
    /// Histograms only: the exported upper bounds.
    bounds: Option<Py<PyTuple>>,
    /// The item of the last snapshot and what it was made from (the value's bits; for a histogram its count
    /// and the bits of its sum, since buckets only grow, an equal count means equal buckets): a series that
    /// did not change since is given the same (immutable) tuple again.
    last: Mutex<Option<(u64, u64, Py<PyTuple>)>>,
}

/// What the registry keeps beside each series for Python: empty until the series is first seen from Python.
struct Extra(PyOnceLock<Cached>);

impl std::fmt::Debug for Extra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Extra")
    }
}

impl Default for Extra {
    fn default() -> Self {
        Self(PyOnceLock::new())
    }
}

fn cached<'a>(py: Python<'_>, series: &'a Series<Extra>) -> PyResult<&'a Cached> {
    series.extra.0.get_or_try_init(py, || {
        let handle = match &series.metric {
            Metric::Counter(c) => Py::new(py, CounterPy(Arc::clone(c)))?.into_any(),
            Metric::Gauge(g) => Py::new(py, GaugePy(Arc::clone(g)))?.into_any(),
            Metric::Histogram(h) => Py::new(py, HistogramPy(Arc::clone(h)))?.into_any(),
        };
        let labels = PyTuple::new(
            py,
            series
                .labels
                .iter()
                .map(|(k, v)| PyTuple::new(py, [PyString::new(py, k), PyString::new(py, v)]))
                .collect::<PyResult<Vec<_>>>()?,
        )?;
        let bounds = match &series.metric {
            Metric::Histogram(h) => Some(PyTuple::new(py, h.bounds().iter().copied())?.unbind()),
            _ => None,
        };
        Ok::<_, PyErr>(Cached {
            handle,
            name: PyString::new(py, &series.name).unbind(),
            help: PyString::new(py, &series.help).unbind(),
            kind: PyString::intern(py, series.metric.kind().as_str()).unbind(),
            labels: labels.unbind(),
            bounds,
            last: Mutex::new(None),
        })
    })
}

/// Label pairs from a `dict[str, str]`, as Python strings (the `&str`s borrow from them).
fn label_strings<'py>(
    labels: Option<&Bound<'py, PyDict>>,
) -> PyResult<Vec<(Bound<'py, PyString>, Bound<'py, PyString>)>> {
    let Some(labels) = labels else {
        return Ok(Vec::new());
    };
    labels
        .iter()
        .map(|(k, v)| Ok((k.cast_into::<PyString>()?, v.cast_into::<PyString>()?)))
        .collect()
}

fn label_strs<'a>(
    strings: &'a [(Bound<'_, PyString>, Bound<'_, PyString>)],
) -> PyResult<Vec<(&'a str, &'a str)>> {
    strings
        .iter()
        .map(|(k, v)| Ok((k.to_str()?, v.to_str()?)))
        .collect()
}

/// A number argument: an `int` that fits in 64 bits stays an integer (PyO3's `f64` extraction turns an `int`
/// into a `float` object first, a third of the cost of the whole call), anything else goes through `float`.
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    #[inline]
    fn extract(v: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(f) = v.cast_exact::<PyFloat>() {
            return Ok(Self::Float(f.value()));
        }
        if v.is_instance_of::<PyInt>() {
            if let Ok(i) = v.extract::<i64>() {
                return Ok(Self::Int(i));
            }
        }
        Ok(Self::Float(v.extract::<f64>()?))
    }

    #[inline]
    fn as_f64(&self) -> f64 {
        match *self {
            Self::Int(i) => i as f64,
            Self::Float(f) => f,
        }
    }
}

/// A registry of metrics by name and labels; thread-safe.
#[derive(Debug)]
#[pyclass(frozen, module = "treasure_engine._core", name = "Metrics")]
pub struct MetricsPy {
    registry: Registry<Extra>,
}

impl MetricsPy {
    fn get(
        &self,
        py: Python<'_>,
        name: &str,
        help: &str,
        labels: Option<&Bound<'_, PyDict>>,
        kind: Kind,
    ) -> PyResult<Py<PyAny>> {
        let strings = label_strings(labels)?;
        let pairs = label_strs(&strings)?;
        let series = self
            .registry
            .register(name, help, &pairs, kind)
            .py_err(py)?;
        Ok(cached(py, &series)?.handle.clone_ref(py))
    }
}

#[pymethods]
impl MetricsPy {
    #[new]
    fn new() -> Self {
        Self {
            registry: Registry::new(),
        }
    }

    /// The counter of `name` and `labels`, made if missing.
    #[pyo3(signature = (name, help, labels = None))]
    fn counter(
        &self,
        py: Python<'_>,
        name: &str,
        help: &str,
        labels: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        self.get(py, name, help, labels, Kind::Counter)
    }

    /// The gauge of `name` and `labels`, made if missing.
    #[pyo3(signature = (name, help, labels = None))]
    fn gauge(
        &self,
        py: Python<'_>,
        name: &str,
        help: &str,
        labels: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        self.get(py, name, help, labels, Kind::Gauge)
    }

    /// The histogram of `name` and `labels`, made if missing: `kind="seconds"` covers 1 µs to an hour,
    /// `kind="count"` 1 to a million.
    #[pyo3(signature = (name, help, labels = None, *, kind = "seconds"))]
    fn histogram(
        &self,
        py: Python<'_>,
        name: &str,
        help: &str,
        labels: Option<&Bound<'_, PyDict>>,
        kind: &str,
    ) -> PyResult<Py<PyAny>> {
        let layout = match kind {
            "seconds" => HistogramLayout::SECONDS,
            "count" => HistogramLayout::COUNT,
            other => {
                return Err(CoreError::Config {
                    field: "kind",
                    reason: format!("must be \"seconds\" or \"count\" (got {other:?})"),
                })
                .py_err(py)
            }
        };
        self.get(py, name, help, labels, Kind::Histogram(layout))
    }

    /// Every series, by name then labels: `(name, help, kind, labels, value)`; a histogram's value is
    /// `(upper bounds ending with inf, cumulative counts, sum, count)`.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let all = self.registry.series();
        let list = PyList::empty(py);
        let mut buf = Vec::new();
        for series in &all {
            let c = cached(py, series)?;
            let key = match &series.metric {
                Metric::Counter(m) => (m.value().to_bits(), 0),
                Metric::Gauge(m) => (m.value().to_bits(), 0),
                Metric::Histogram(m) => {
                    let (sum, count) = m.export_into(&mut buf);
                    (count, sum.to_bits())
                }
            };
            // The lock is never held while Python runs (an allocation may collect garbage, and a finalizer may
            // switch threads or snapshot again): taken once to look, once to store.
            let unchanged = c
                .last
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .filter(|(k0, k1, _)| (*k0, *k1) == key)
                .map(|(_, _, item)| item.clone_ref(py));
            if let Some(item) = unchanged {
                list.append(item)?;
                continue;
            }
            let value = match &series.metric {
                Metric::Counter(_) | Metric::Gauge(_) => {
                    PyFloat::new(py, f64::from_bits(key.0)).into_any()
                }
                Metric::Histogram(m) => {
                    let bounds = c.bounds.as_ref().map_or_else(
                        || PyTuple::new(py, m.bounds().iter().copied()),
                        |b| Ok(b.bind(py).clone()),
                    )?;
                    (
                        bounds,
                        PyTuple::new(py, buf.iter().copied())?,
                        PyFloat::new(py, f64::from_bits(key.1)),
                        key.0,
                    )
                        .into_pyobject(py)?
                        .into_any()
                }
            };
            let item = (
                c.name.bind(py),
                c.help.bind(py),
                c.kind.bind(py),
                c.labels.bind(py),
                value,
            )
                .into_pyobject(py)?;
            list.append(&item)?;
            let old = c
                .last
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .replace((key.0, key.1, item.unbind()));
            // Dropped here, after the lock.
            drop(old);
        }
        Ok(list)
    }

    /// Forgets a series (a shard no longer owned); its handles keep working, unseen. Returns whether it was
    /// there.
    #[pyo3(signature = (name, labels = None))]
    fn remove(
        &self,
        py: Python<'_>,
        name: &str,
        labels: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<bool> {
        let strings = label_strings(labels)?;
        let pairs = label_strs(&strings)?;
        self.registry.remove(name, &pairs).py_err(py)
    }

    fn __len__(&self) -> usize {
        self.registry.len()
    }
}

/// A monotonic counter.
#[derive(Debug)]
#[pyclass(frozen, module = "treasure_engine._core", name = "Counter")]
pub struct CounterPy(Arc<Counter>);

#[pymethods]
impl CounterPy {
    /// Adds `n` (>= 0; a negative, NaN or infinite `n` raises `ValueError`).
    #[pyo3(signature = (n = None), text_signature = "($self, n=1.0)")]
    fn inc(&self, n: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let ok = match n.map(Number::extract).transpose()? {
            None => {
                self.0.inc();
                true
            }
            Some(Number::Int(i)) => u64::try_from(i).map(|i| self.0.inc_by(i)).is_ok(),
            Some(Number::Float(f)) => self.0.add(f),
        };
        if ok {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!(
                "a counter only goes up by a finite amount >= 0 (got {})",
                n.map_or_else(String::new, ToString::to_string)
            )))
        }
    }

    #[getter]
    fn value(&self) -> f64 {
        self.0.value()
    }
}

/// A value that goes up and down.
#[derive(Debug)]
#[pyclass(frozen, module = "treasure_engine._core", name = "Gauge")]
pub struct GaugePy(Arc<Gauge>);

#[pymethods]
impl GaugePy {
    fn set(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.0.set(Number::extract(v)?.as_f64());
        Ok(())
    }

    #[pyo3(signature = (v = None), text_signature = "($self, v=1.0)")]
    fn inc(&self, v: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        match v {
            None => self.0.add(1.0),
            Some(v) => self.0.add(Number::extract(v)?.as_f64()),
        }
        Ok(())
    }

    #[pyo3(signature = (v = None), text_signature = "($self, v=1.0)")]
    fn dec(&self, v: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        match v {
            None => self.0.sub(1.0),
            Some(v) => self.0.sub(Number::extract(v)?.as_f64()),
        }
        Ok(())
    }

    #[getter]
    fn value(&self) -> f64 {
        self.0.value()
    }
}

/// A log-linear histogram of positive values (negative and NaN values are counted in `rejected` only).
#[derive(Debug)]
#[pyclass(frozen, module = "treasure_engine._core", name = "Histogram")]
pub struct HistogramPy(Arc<Histogram>);

#[pymethods]
impl HistogramPy {
    fn observe(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.0.record(Number::extract(v)?.as_f64());
        Ok(())
    }

    #[getter]
    fn count(&self) -> u64 {
        self.0.count()
    }

    #[getter]
    fn sum(&self) -> f64 {
        self.0.sum()
    }

    #[getter]
    fn rejected(&self) -> u64 {
        self.0.rejected()
    }
}
