//! `CircuitBreaker`, `GuardedFunction`, `Permit` and the guarded coroutine: the Python face of
//! `treasure_core::breaker`.
//!
//! Every way to guard a call is here, so that a guarded call adds no Python frame:
//! - `with breaker:` (`__enter__` / `__exit__`; the permit waits on a per-thread stack, since `with` blocks on one
//!   thread are strictly nested) and `breaker.call(fn, ...)`;
//! - `async with breaker:` (`__aenter__` / `__aexit__` take and report the permit when called and return a ready
//!   awaitable; the permit waits in a context variable, since tasks interleave on one thread but each runs in
//!   its own context);
//! - `@breaker`, which makes a `GuardedFunction`. Calling one goes through the vectorcall protocol (no argument
//!   tuple is built): a sync function is called between the permit and its outcome; an async one returns a
//!   guarded coroutine, which takes the permit when first resumed (so `CircuitOpen` comes out of the `await`, as
//!   from any coroutine function) and records the outcome when the inner coroutine returns or raises.
//!
//! PyO3 classes cannot implement vectorcall or `am_send`, so three types are made by hand (`PyType_FromSpec`): a
//! subtype of `GuardedFunction` that adds the vectorcall slot, the guarded coroutine, whose `am_send` hands the
//! inner coroutine's result back without raising `StopIteration` (what `await` uses on 3.11; from 3.12 on,
//! `await` goes through `__next__`, which must raise it), and the ready awaitable. Their slot functions run with
//! the GIL held but outside PyO3's bookkeeping: on the success path they touch no Python reference but their
//! arguments; anything that may raise, allocate or drop a Python reference goes through [`cold`], which attaches.
//! Besides the 3.11 stable ABI they use `PyObject_Vectorcall` and `PyContextVar_New/Get/Set`, which every
//! CPython >= 3.9 exports with the same signatures.
//!
//! All of that raw C API, and so every `unsafe` block of the breaker bindings, is in [`cpython`] (the hand-made
//! types, their slot functions and the context variable of `async with` permits); this file is safe PyO3 code.
//!
//! The clock is `CLOCK_MONOTONIC_COARSE` (a few ns a read, a few ms resolution): call durations are compared
//! with `slow_call_s` and deadlines are `open_s` away, both far coarser, and the precise clock would cost a
//! sizeable part of the whole guarded call twice over.
//!
//! Whenever the core queued transitions, the method that notices hands them to the Python subclass's
//! `_on_transitions(list[(from, to, at_s)])`, which logs them and runs the callbacks (never raising).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, TryLockError};

use pyo3::exceptions::{PyException, PyRuntimeError, PySystemError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};
use pyo3::{PyTraverseError, PyVisit};
use treasure_core::breaker::{Breaker, BreakerConfig, Permit, Refused, State, WindowKind};
use treasure_core::clock::coarse_ns;
use treasure_core::CoreError;

use crate::errors::{self, IntoPy};

mod cpython;

use cpython::{cold, guarded_coroutine, new_guarded_function, pop_held, push_held, ready};

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

fn unpoison<T>(r: Result<T, PoisonError<T>>) -> T {
    r.unwrap_or_else(PoisonError::into_inner)
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
    /// Behind a lock only so that `__clear__` can drop it (it may close a reference cycle); read on failures.
    predicate: Mutex<Option<Py<PyAny>>>,
    /// Test hook: a callable returning monotonic seconds, instead of `CLOCK_MONOTONIC_COARSE` (locked as above).
    clock: Mutex<Option<Py<PyAny>>>,
    /// Whether `clock` was given: the hot paths read this, never the lock.
    scripted: bool,
}

impl CircuitBreakerPy {
    #[inline]
    fn now(&self, py: Python<'_>) -> PyResult<u64> {
        if self.scripted {
            self.scripted_now(py)
        } else {
            Ok(coarse_ns())
        }
    }

    #[cold]
    fn scripted_now(&self, py: Python<'_>) -> PyResult<u64> {
        let clock = unpoison(self.clock.lock())
            .as_ref()
            .map(|c| c.clone_ref(py));
        match clock {
            None => Ok(coarse_ns()),
            Some(clock) => {
                let s: f64 = clock.bind(py).call0()?.extract()?;
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

    /// `acquire` and the transitions it caused; a permit is given back if the transitions' handler raises.
    fn acquire_and_dispatch(slf: &Bound<'_, Self>) -> PyResult<(Permit, u64)> {
        let me = slf.get();
        let acquired = me.acquire(slf.py());
        if let Err(e) = Self::dispatch(slf) {
            if let Ok((permit, start)) = acquired {
                me.core.on_ignored(permit, start);
            }
            return Err(e);
        }
        acquired
    }

    fn classify(&self, py: Python<'_>, exc: &Bound<'_, PyAny>) -> Outcome {
        let ignore = self.ignore.bind(py);
        if !ignore.is_empty() && exc.is_instance(ignore).unwrap_or(false) {
            return Outcome::Ignored;
        }
        let is_exception = exc.is_instance_of::<PyException>();
        let predicate = unpoison(self.predicate.lock())
            .as_ref()
            .map(|p| p.clone_ref(py));
        if let Some(predicate) = predicate {
            // A predicate that raises counts the call as failed: the guarded call failed anyway.
            let failed = predicate
                .bind(py)
                .call1((exc,))
                .and_then(|r| r.is_truthy())
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

    /// The permit for a call, from a raw slot function: on the fast path (system clock, permitted) no Python
    /// object is touched. Returns None with the exception set when refused.
    #[inline]
    fn acquire_raw(slf: &Bound<'_, Self>) -> Option<(Permit, u64)> {
        let me = slf.get();
        if me.scripted {
            return cold(|_| Self::acquire_and_dispatch(slf));
        }
        let now = coarse_ns();
        match me.core.try_acquire(now) {
            Ok(permit) => Some((permit, now)),
            Err(refused) => cold(|py| {
                Self::dispatch(slf)?;
                Err(me.open_error(py, refused))
            }),
        }
    }

    /// Reports a permitted call from a raw slot function: a success, or (`failed`) the exception currently set,
    /// which stays set. Returns false when an exception is set on return (the call's own, or one raised by the
    /// transitions' handler).
    #[inline]
    fn complete_raw(slf: &Bound<'_, Self>, permit: Permit, start: u64, failed: bool) -> bool {
        let me = slf.get();
        if !failed && !me.scripted {
            let now = coarse_ns();
            me.core.on_success(permit, now.saturating_sub(start), now);
            return !me.core.has_transitions() || cold(|_| Self::dispatch(slf)).is_some();
        }
        cold(|py| {
            if failed {
                let err = PyErr::take(py).unwrap_or_else(|| {
                    PySystemError::new_err("guarded call failed without setting an exception")
                });
                me.finish(py, permit, start, Some(err.value(py).as_any()))?;
                Self::dispatch(slf)?;
                Err(err)
            } else {
                me.finish(py, permit, start, None)?;
                Self::dispatch(slf)
            }
        })
        .is_some()
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
            predicate: Mutex::new(predicate),
            scripted: clock.is_some(),
            clock: Mutex::new(clock),
        })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.name)?;
        visit.call(&self.record)?;
        visit.call(&self.ignore)?;
        for slot in [&self.predicate, &self.clock] {
            // Only held briefly to clone the reference out, never while Python code runs.
            let guard = match slot.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            visit.call(guard.as_ref())?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        // Taken out of the locks before they are dropped: dropping may run Python code.
        let predicate = unpoison(self.predicate.lock()).take();
        let clock = unpoison(self.clock.lock()).take();
        drop((predicate, clock));
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
        let (permit, start) = Self::acquire_and_dispatch(slf)?;
        let key = me.key();
        HELD.with_borrow_mut(|held| held.push((key, permit.into_token(), start)));
        Ok(())
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

    /// `async with breaker:`: takes the permit now (raising `CircuitOpen`) and returns an awaitable that is
    /// already done. The permit waits in a context variable, so interleaved tasks each keep their own.
    fn __aenter__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let me = slf.get();
        let (permit, start) = Self::acquire_and_dispatch(slf)?;
        let token = permit.into_token();
        if let Err(e) = push_held(py, me.key(), token, start) {
            me.core.on_ignored(Permit::from_token(token), start);
            return Err(e);
        }
        ready(py)
    }

    /// Reports the `async with` block's outcome now and returns an awaitable that is already done (with None:
    /// the exception, if any, propagates).
    #[pyo3(signature = (_exc_type, exc, _traceback))]
    fn __aexit__(
        slf: &Bound<'_, Self>,
        _exc_type: &Bound<'_, PyAny>,
        exc: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let me = slf.get();
        let Some((token, start)) = pop_held(py, me.key())? else {
            return Err(PyRuntimeError::new_err(
                "CircuitBreaker.__aexit__ without __aenter__ in this task",
            ));
        };
        let exc = (!exc.is_none()).then_some(exc);
        me.finish(py, Permit::from_token(token), start, exc)?;
        Self::dispatch(slf)?;
        ready(py)
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

    /// `fn` wrapped so that every call goes through the breaker (what `@breaker` makes of a function);
    /// `is_async`: `fn` returns an awaitable, and the outcome is that of awaiting it.
    #[pyo3(signature = (func, is_async = false))]
    fn _guard<'py>(
        slf: &Bound<'py, Self>,
        func: Py<PyAny>,
        is_async: bool,
    ) -> PyResult<Bound<'py, GuardedFunction>> {
        new_guarded_function(slf, func, is_async)
    }

    /// Takes a permit for an async call; raises `CircuitOpen` when not permitted.
    fn _acquire(slf: &Bound<'_, Self>) -> PyResult<PermitPy> {
        let (permit, start) = Self::acquire_and_dispatch(slf)?;
        Ok(PermitPy {
            breaker: slf.clone().unbind(),
            token: permit.into_token(),
            start,
            released: AtomicBool::new(false),
        })
    }

    /// Reports the outcome of `_acquire`'s call, once: `exc` is None for a success, else the exception it raised.
    #[pyo3(signature = (permit, exc = None))]
    fn _release(
        slf: &Bound<'_, Self>,
        permit: &PermitPy,
        exc: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if !permit.breaker.is(slf) {
            return Err(PyValueError::new_err(
                "this permit was taken from another breaker",
            ));
        }
        if permit.released.swap(true, Ordering::AcqRel) {
            return Err(PyRuntimeError::new_err("this permit was already released"));
        }
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
    let (permit, start) = CircuitBreakerPy::acquire_and_dispatch(breaker)?;
    let result = func.call(args, kwargs);
    match &result {
        Ok(_) => me.finish(py, permit, start, None)?,
        Err(e) => me.finish(py, permit, start, Some(e.value(py).as_any()))?,
    }
    CircuitBreakerPy::dispatch(breaker)?;
    result.map(Bound::unbind)
}

// ---------------------------------------------------------------------------------------------------------------
// GuardedFunction: what `@breaker` makes of a function.

/// A function guarded by a breaker (what `@breaker` makes of one): calling it acquires, calls, and records the
/// outcome; for an async function, the outcome of awaiting what it returns. Binds like a function when used as
/// a method, and shows the function's `__name__`, `__qualname__`, `__doc__`, `__wrapped__`, `__code__`, ...
#[derive(Debug)]
#[pyclass(
    frozen,
    subclass,
    module = "treasure_engine._core",
    name = "GuardedFunction"
)]
pub struct GuardedFunction {
    breaker: Py<CircuitBreakerPy>,
    func: Py<PyAny>,
    is_async: bool,
}

impl GuardedFunction {
    fn forward(&self, py: Python<'_>, name: &Bound<'_, PyString>) -> PyResult<Py<PyAny>> {
        Ok(self.func.bind(py).getattr(name)?.unbind())
    }
}

#[pymethods]
impl GuardedFunction {
    /// `breaker._guard(func, is_async)` makes these (with the vectorcall fast path); this constructor gives the
    /// same behaviour through the slower `tp_call`.
    #[new]
    #[pyo3(signature = (breaker, func, is_async = false))]
    fn new(breaker: Py<CircuitBreakerPy>, func: Py<PyAny>, is_async: bool) -> Self {
        Self {
            breaker,
            func,
            is_async,
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.breaker)?;
        visit.call(&self.func)
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let breaker = self.breaker.bind(py);
        if self.is_async {
            let awaitable = self.func.bind(py).call(args, kwargs)?;
            return guarded_coroutine(py, breaker, awaitable);
        }
        guarded_call(breaker, self.func.bind(py), args, kwargs)
    }

    /// Binds like a function when used as a method.
    fn __get__(
        slf: &Bound<'_, Self>,
        obj: Option<&Bound<'_, PyAny>>,
        _owner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        static METHOD_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        let py = slf.py();
        match obj {
            Some(obj) if !obj.is_none() => Ok(METHOD_TYPE
                .import(py, "types", "MethodType")?
                .call1((slf, obj))?
                .unbind()),
            _ => Ok(slf.clone().into_any().unbind()),
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
        self.forward(py, pyo3::intern!(py, "__name__"))
    }

    #[getter]
    fn __qualname__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "__qualname__"))
    }

    #[getter]
    fn __doc__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "__doc__"))
    }

    /// With `__defaults__` and `__kwdefaults__`, makes `inspect.iscoroutinefunction()` (and
    /// `isgeneratorfunction()`, ...) see through the guard as it does through `functools.wraps`.
    #[getter]
    fn __code__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "__code__"))
    }

    #[getter]
    fn __defaults__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "__defaults__"))
    }

    #[getter]
    fn __kwdefaults__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "__kwdefaults__"))
    }

    #[getter]
    fn __annotations__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "__annotations__"))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<guarded {} by {}>",
            self.func.bind(py).repr()?,
            self.breaker.get().name.bind(py)
        ))
    }
}

/// A permit taken by `CircuitBreaker._acquire`, to hand back once to `_release`; one dropped unreleased gives its
/// permit back unrecorded (as a guarded coroutine dropped unfinished does), so a half-open trial is never lost.
#[derive(Debug)]
#[pyclass(frozen, module = "treasure_engine._core", name = "Permit")]
pub struct PermitPy {
    breaker: Py<CircuitBreakerPy>,
    token: u64,
    start: u64,
    released: AtomicBool,
}

#[pymethods]
impl PermitPy {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.breaker)
    }
}

impl Drop for PermitPy {
    fn drop(&mut self) {
        if !*self.released.get_mut() {
            // No Python code runs: the core only gives the trial permit back (and never transitions doing so).
            self.breaker
                .get()
                .core
                .on_ignored(Permit::from_token(self.token), coarse_ns());
        }
    }
}
