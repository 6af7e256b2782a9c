//! `CircuitBreaker`, `GuardedFunction` and `Permit`: the Python face of `treasure_core::breaker`.
//!
//! The hot paths are here so that a guarded call costs two Rust calls and no Python frame: `with breaker:`
//! (`__enter__` / `__exit__`; the permit waits on a per-thread stack, since a `with` block on one thread is
//! strictly nested), `breaker.call(fn, ...)`, and `GuardedFunction`, what `@breaker` makes of a sync function.
//! The async paths (`async with`, `@breaker` on a coroutine function) live in Python (`treasure_engine.breaker`)
//! on `_acquire` / `_release`, with the permit in a context variable, since tasks interleave on one thread.
//!
//! The clock is `CLOCK_MONOTONIC_COARSE` (a few ns a read, a few ms resolution): call durations are compared
//! with `slow_call_s` and deadlines are `open_s` away, both far coarser, and the precise clock would cost a
//! fifth of the whole guarded call twice over.
//!
//! Whenever the core queued transitions, the method that notices hands them to the Python subclass's
//! `_on_transitions(list[(from, to, at_s)])`, which logs them and runs the callbacks (never raising).

use std::cell::RefCell;

use pyo3::exceptions::{PyException, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};
use treasure_core::breaker::{Breaker, BreakerConfig, Permit, Refused, State, WindowKind};
use treasure_core::clock::coarse_ns;
use treasure_core::CoreError;

use crate::errors::{self, IntoPy};

thread_local! {
    /// Permits of the `with` blocks open on this thread: (breaker address, permit token, start ns).
    static HELD: RefCell<Vec<(usize, u64, u64)>> = const { RefCell::new(Vec::new()) };
}

fn ns(field: &'static str, seconds: f64) -> Result<u64, CoreError> {
    if seconds.is_finite() && seconds >= 0.0 {
        Ok((seconds * 1e9).round() as u64)
    } else {
        Err(CoreError::Config {
            field,
            reason: format!("must be a finite number >= 0 (got {seconds})"),
        })
    }
}

enum Outcome {
    Success,
    Failure,
    Ignored,
}

/// A circuit breaker (the public class is `treasure_engine.CircuitBreaker`, a subclass).
#[derive(Debug)]
#[pyclass(
    frozen,
    subclass,
    module = "treasure_engine._core",
    name = "CircuitBreaker"
)]
pub struct CircuitBreakerPy {
    name: Py<PyString>,
    core: Breaker,
    record: Py<PyTuple>,
    ignore: Py<PyTuple>,
    predicate: Option<Py<PyAny>>,
    /// Test hook: a callable returning monotonic seconds, instead of `CLOCK_MONOTONIC_COARSE`.
    clock: Option<Py<PyAny>>,
}

impl CircuitBreakerPy {
    #[inline]
    fn now(&self, py: Python<'_>) -> PyResult<u64> {
        match &self.clock {
            None => Ok(coarse_ns()),
            Some(clock) => {
                let s: f64 = clock.call0(py)?.extract(py)?;
                Ok((s * 1e9) as u64)
            }
        }
    }

    fn open_error(&self, py: Python<'_>, r: Refused) -> PyErr {
        let remaining = if r.remaining_ns == u64::MAX {
            f64::INFINITY
        } else {
            r.remaining_ns as f64 / 1e9
        };
        let name = self.name.bind(py);
        let message = match r.state {
            State::HalfOpen => {
                format!("circuit breaker {name} is half-open and its trial calls are taken")
            }
            State::ForcedOpen => format!("circuit breaker {name} is forced open"),
            _ => format!("circuit breaker {name} is open for {remaining:.3} s more"),
        };
        let err = errors::CircuitOpen(py, message);
        let value = err.value(py);
        // Setting attributes on a fresh exception instance cannot fail.
        let _ = value.setattr("name", name);
        let _ = value.setattr("remaining_s", remaining);
        let _ = value.setattr("state", r.state.as_str());
        err
    }

    #[inline]
    fn acquire(&self, py: Python<'_>) -> PyResult<(Permit, u64)> {
        let now = self.now(py)?;
        match self.core.try_acquire(now) {
            Ok(p) => Ok((p, now)),
            Err(r) => Err(self.open_error(py, r)),
        }
    }

    fn classify(&self, py: Python<'_>, exc: &Bound<'_, PyAny>) -> Outcome {
        let ignore = self.ignore.bind(py);
        if !ignore.is_empty() && exc.is_instance(ignore).unwrap_or(false) {
            return Outcome::Ignored;
        }
        let is_exception = exc.is_instance_of::<PyException>();
        if let Some(predicate) = &self.predicate {
            // A predicate that raises counts the call as failed: the guarded call failed anyway.
            let failed = predicate
                .call1(py, (exc,))
                .and_then(|r| r.is_truthy(py))
                .unwrap_or(true);
            return match (failed, is_exception) {
                (true, _) => Outcome::Failure,
                (false, true) => Outcome::Success,
                (false, false) => Outcome::Ignored,
            };
        }
        if exc.is_instance(self.record.bind(py)).unwrap_or(false) {
            Outcome::Failure
        } else if is_exception {
            Outcome::Success
        } else {
            Outcome::Ignored
        }
    }

    #[inline]
    fn finish(
        &self,
        py: Python<'_>,
        permit: Permit,
        start: u64,
        exc: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let now = self.now(py)?;
        let duration = now.saturating_sub(start);
        match exc.map_or(Outcome::Success, |e| self.classify(py, e)) {
            Outcome::Success => self.core.on_success(permit, duration, now),
            Outcome::Failure => self.core.on_failure(permit, duration, now),
            Outcome::Ignored => self.core.on_ignored(permit, now),
        }
        Ok(())
    }

    /// Hands queued transitions to the subclass's `_on_transitions` (the base class only counts them).
    fn dispatch(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        if !me.core.has_transitions() {
            return Ok(());
        }
        let py = slf.py();
        let items: Vec<(&str, &str, f64)> = me
            .core
            .take_transitions()
            .into_iter()
            .map(|t| (t.from.as_str(), t.to.as_str(), t.at_ns as f64 / 1e9))
            .collect();
        if slf.hasattr(pyo3::intern!(py, "_on_transitions"))? {
            slf.call_method1(pyo3::intern!(py, "_on_transitions"), (items,))?;
        }
        Ok(())
    }

    fn key(&self) -> usize {
        std::ptr::from_ref(&self.core) as usize
    }
}

#[pymethods]
impl CircuitBreakerPy {
    #[new]
    #[pyo3(signature = (
        name, *, window = "count", window_size = 100, minimum_calls = 100, failure_rate = 0.5,
        slow_call_s = 60.0, slow_call_rate = 1.0, open_s = 60.0, open_backoff = 1.0, open_max_s = 600.0,
        half_open_calls = 10, half_open_max_wait_s = 0.0, auto_half_open = false, record = None, ignore = None,
        predicate = None, clock = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: Bound<'_, PyString>,
        window: &str,
        window_size: u32,
        minimum_calls: u32,
        failure_rate: f64,
        slow_call_s: f64,
        slow_call_rate: f64,
        open_s: f64,
        open_backoff: f64,
        open_max_s: f64,
        half_open_calls: u32,
        half_open_max_wait_s: f64,
        auto_half_open: bool,
        record: Option<Bound<'_, PyTuple>>,
        ignore: Option<Bound<'_, PyTuple>>,
        predicate: Option<Py<PyAny>>,
        clock: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let config = (|| {
            let window = match window {
                "count" => WindowKind::Count,
                "time" => WindowKind::Time,
                other => {
                    return Err(CoreError::Config {
                        field: "window",
                        reason: format!("must be 'count' or 'time' (got {other:?})"),
                    })
                }
            };
            Ok(BreakerConfig {
                window,
                window_size,
                minimum_calls,
                failure_rate,
                slow_call_ns: ns("slow_call_s", slow_call_s)?,
                slow_call_rate,
                open_ns: ns("open_s", open_s)?,
                open_backoff,
                open_max_ns: ns("open_max_s", open_max_s)?,
                half_open_calls,
                half_open_max_wait_ns: ns("half_open_max_wait_s", half_open_max_wait_s)?,
                auto_half_open,
            })
        })()
        .py_err(py)?;
        let core = Breaker::new(config).py_err(py)?;
        let record = match record {
            Some(r) => r.unbind(),
            None => PyTuple::new(py, [py.get_type::<PyException>()])?.unbind(),
        };
        let ignore = ignore.map_or_else(|| PyTuple::empty(py).unbind(), Bound::unbind);
        Ok(Self {
            name: name.unbind(),
            core,
            record,
            ignore,
            predicate,
            clock,
        })
    }

    #[getter]
    fn name(&self, py: Python<'_>) -> Py<PyString> {
        self.name.clone_ref(py)
    }

    /// The state's name ("closed", "open", "half_open", "disabled", "forced_open", "metrics_only").
    #[getter]
    fn _state(slf: &Bound<'_, Self>) -> PyResult<&'static str> {
        let me = slf.get();
        let state = me.core.state(me.now(slf.py())?);
        Self::dispatch(slf)?;
        Ok(state.as_str())
    }

    /// The metrics as a dict (the subclass makes a `BreakerMetrics` of it).
    fn _metrics<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let py = slf.py();
        let me = slf.get();
        let m = me.core.metrics(me.now(py)?);
        Self::dispatch(slf)?;
        let d = PyDict::new(py);
        d.set_item("state", m.state.as_str())?;
        d.set_item(
            "failure_rate",
            (m.failure_rate >= 0.0).then_some(m.failure_rate),
        )?;
        d.set_item(
            "slow_call_rate",
            (m.slow_call_rate >= 0.0).then_some(m.slow_call_rate),
        )?;
        d.set_item("calls", m.calls)?;
        d.set_item("failed", m.failed)?;
        d.set_item("slow", m.slow)?;
        d.set_item("slow_failed", m.slow_failed)?;
        d.set_item("not_permitted", m.not_permitted)?;
        d.set_item("transitions", m.transitions)?;
        let remaining = if m.open_remaining_ns == u64::MAX {
            f64::INFINITY
        } else {
            m.open_remaining_ns as f64 / 1e9
        };
        d.set_item("open_remaining_s", remaining)?;
        Ok(d)
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        let (permit, start) = match me.acquire(slf.py()) {
            Ok(p) => p,
            Err(e) => {
                Self::dispatch(slf)?;
                return Err(e);
            }
        };
        let key = me.key();
        HELD.with_borrow_mut(|held| held.push((key, permit.into_token(), start)));
        Self::dispatch(slf)
    }

    #[pyo3(signature = (_exc_type, exc, _traceback))]
    fn __exit__(
        slf: &Bound<'_, Self>,
        _exc_type: &Bound<'_, PyAny>,
        exc: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let me = slf.get();
        let key = me.key();
        let held = HELD.with_borrow_mut(|held| {
            let i = held.iter().rposition(|h| h.0 == key)?;
            Some(held.remove(i))
        });
        let Some((_, token, start)) = held else {
            return Err(PyRuntimeError::new_err(
                "CircuitBreaker.__exit__ without __enter__ on this thread",
            ));
        };
        let exc = (!exc.is_none()).then_some(exc);
        me.finish(slf.py(), Permit::from_token(token), start, exc)?;
        Self::dispatch(slf)?;
        Ok(false)
    }

    /// Calls `fn(*args, **kwargs)` through the breaker; raises `CircuitOpen` when the call is not permitted.
    #[pyo3(signature = (func, /, *args, **kwargs))]
    fn call(
        slf: &Bound<'_, Self>,
        func: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        guarded_call(slf, func, args, kwargs)
    }

    /// `fn` wrapped so that every call goes through the breaker (what `@breaker` makes of a sync function).
    fn _guard(slf: &Bound<'_, Self>, func: Py<PyAny>) -> GuardedFunction {
        GuardedFunction {
            breaker: slf.clone().unbind(),
            func,
        }
    }

    /// Takes a permit for an async call; raises `CircuitOpen` when not permitted.
    fn _acquire(slf: &Bound<'_, Self>) -> PyResult<PermitPy> {
        let me = slf.get();
        let acquired = me.acquire(slf.py());
        Self::dispatch(slf)?;
        let (permit, start) = acquired?;
        Ok(PermitPy {
            token: permit.into_token(),
            start,
        })
    }

    /// Reports the outcome of `_acquire`'s call: `exc` is None for a success, else the exception it raised.
    #[pyo3(signature = (permit, exc = None))]
    fn _release(
        slf: &Bound<'_, Self>,
        permit: &PermitPy,
        exc: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        slf.get().finish(
            slf.py(),
            Permit::from_token(permit.token),
            permit.start,
            exc,
        )?;
        Self::dispatch(slf)
    }

    /// FORCED_OPEN: refuse every call until `reset()` (or another manual transition).
    fn force_open(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        me.core.force_open(me.now(slf.py())?);
        Self::dispatch(slf)
    }

    /// DISABLED: permit every call and record nothing.
    fn disable(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        me.core.disable(me.now(slf.py())?);
        Self::dispatch(slf)
    }

    /// METRICS_ONLY: permit and record every call, never trip.
    fn metrics_only(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        me.core.metrics_only(me.now(slf.py())?);
        Self::dispatch(slf)
    }

    /// CLOSED with an empty window and no backoff.
    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        me.core.close(me.now(slf.py())?);
        Self::dispatch(slf)
    }

    /// CLOSED with an empty window, no backoff and the refusal count at 0.
    fn reset(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        me.core.reset(me.now(slf.py())?);
        Self::dispatch(slf)
    }
}

#[inline]
fn guarded_call(
    breaker: &Bound<'_, CircuitBreakerPy>,
    func: &Bound<'_, PyAny>,
    args: &Bound<'_, PyTuple>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<Py<PyAny>> {
    let py = breaker.py();
    let me = breaker.get();
    let (permit, start) = match me.acquire(py) {
        Ok(p) => p,
        Err(e) => {
            CircuitBreakerPy::dispatch(breaker)?;
            return Err(e);
        }
    };
    let result = func.call(args, kwargs);
    match &result {
        Ok(_) => me.finish(py, permit, start, None)?,
        Err(e) => me.finish(py, permit, start, Some(e.value(py).as_any()))?,
    }
    CircuitBreakerPy::dispatch(breaker)?;
    result.map(Bound::unbind)
}

/// A sync function guarded by a breaker: calling it acquires, calls, and records the outcome.
#[derive(Debug)]
#[pyclass(frozen, module = "treasure_engine._core", name = "GuardedFunction")]
pub struct GuardedFunction {
    breaker: Py<CircuitBreakerPy>,
    func: Py<PyAny>,
}

#[pymethods]
impl GuardedFunction {
    #[pyo3(signature = (*args, **kwargs))]
    fn __call__(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        guarded_call(self.breaker.bind(py), self.func.bind(py), args, kwargs)
    }

    /// Binds like a function when used as a method.
    fn __get__(
        slf: &Bound<'_, Self>,
        obj: Option<&Bound<'_, PyAny>>,
        _owner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        match obj {
            None => Ok(slf.clone().into_any().unbind()),
            Some(obj) if obj.is_none() => Ok(slf.clone().into_any().unbind()),
            Some(obj) => Ok(py
                .import("types")?
                .getattr("MethodType")?
                .call1((slf, obj))?
                .unbind()),
        }
    }

    #[getter]
    fn __wrapped__(&self, py: Python<'_>) -> Py<PyAny> {
        self.func.clone_ref(py)
    }

    #[getter]
    fn breaker(&self, py: Python<'_>) -> Py<CircuitBreakerPy> {
        self.breaker.clone_ref(py)
    }

    #[getter]
    fn __name__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.func.bind(py).getattr("__name__")?.unbind())
    }

    #[getter]
    fn __qualname__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.func.bind(py).getattr("__qualname__")?.unbind())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<guarded {} by {}>",
            self.func.bind(py).repr()?,
            self.breaker.get().name.bind(py)
        ))
    }
}

/// A permit taken by `CircuitBreaker._acquire`, to hand back once to `_release`.
#[derive(Debug)]
#[pyclass(frozen, module = "treasure_engine._core", name = "Permit")]
pub struct PermitPy {
    token: u64,
    start: u64,
}
