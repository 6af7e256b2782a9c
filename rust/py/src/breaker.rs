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
//! The clock is `CLOCK_MONOTONIC_COARSE` (a few ns a read, a few ms resolution): call durations are compared
//! with `slow_call_s` and deadlines are `open_s` away, both far coarser, and the precise clock would cost a
//! sizeable part of the whole guarded call twice over.
//!
//! Whenever the core queued transitions, the method that notices hands them to the Python subclass's
//! `_on_transitions(list[(from, to, at_s)])`, which logs them and runs the callbacks (never raising).

use std::cell::{Cell, RefCell, UnsafeCell};
use std::ffi::{c_int, c_ulong, c_void, CStr};
use std::panic::AssertUnwindSafe;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, TryLockError};

use pyo3::exceptions::{
    PyBaseException, PyException, PyRuntimeError, PyStopIteration, PySystemError, PyTypeError,
    PyValueError,
};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};
use pyo3::{Borrowed, PyTraverseError, PyVisit};
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
        let py = slf.py();
        let (ty, offset) = guarded_function_type(slf)?;
        if is_async {
            coroutine_type(py)?;
        }
        let obj = ty.bind(py).call1((slf, func, is_async))?;
        let vectorcall: ffi::vectorcallfunc = if is_async {
            async_vectorcall
        } else {
            sync_vectorcall
        };
        // SAFETY: `obj` is a new instance of the subtype made by `guarded_function_type` (its `tp_new` is
        // GuardedFunction's, which allocates the subtype's basicsize, zeroed), whose last `size_of::<usize>()`
        // bytes, at `offset`, are the vectorcall slot that `__vectorcalloffset__` names. Nothing else uses them.
        unsafe {
            obj.as_ptr()
                .byte_add(*offset)
                .cast::<Option<ffi::vectorcallfunc>>()
                .write(Some(vectorcall));
        }
        Ok(obj.cast_into::<GuardedFunction>()?)
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
// Permits of `async with` blocks: a context variable holding an immutable stack (a linked list, so that entering
// and leaving allocate one node at most).

/// One permit of an `async with` block open in a context, over those opened before it.
#[derive(Debug)]
#[pyclass(frozen, module = "treasure_engine._core", name = "HeldPermit")]
struct HeldPermit {
    /// The breaker's address.
    key: usize,
    token: u64,
    start: u64,
    below: Option<Py<HeldPermit>>,
}

fn held_var(py: Python<'_>) -> PyResult<&Py<PyAny>> {
    static VAR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    VAR.get_or_try_init(py, || {
        // SAFETY: the name is a NUL-terminated static string; a NULL default is allowed.
        unsafe {
            Py::from_owned_ptr_or_err(
                py,
                PyContextVar_New(c"treasure_engine.breaker.held".as_ptr(), ptr::null_mut()),
            )
        }
    })
}

/// The top of this context's stack.
fn held_top(py: Python<'_>) -> PyResult<Option<Bound<'_, HeldPermit>>> {
    let var = held_var(py)?;
    let mut value = ptr::null_mut();
    // SAFETY: `var` is a ContextVar; `value` receives a new reference or NULL (no default).
    if unsafe { PyContextVar_Get(var.as_ptr(), ptr::null_mut(), &raw mut value) } < 0 {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `value` is a new reference or NULL.
    let value = unsafe { Bound::from_owned_ptr_or_opt(py, value) };
    Ok(value.and_then(|v| v.cast_into::<HeldPermit>().ok()))
}

fn set_held_top(py: Python<'_>, top: Option<Bound<'_, HeldPermit>>) -> PyResult<()> {
    let var = held_var(py)?;
    let value = top.map_or_else(|| py.None().into_bound(py), Bound::into_any);
    // SAFETY: `var` is a ContextVar; PyContextVar_Set returns a new reference to a Token, or NULL.
    let token = unsafe { PyContextVar_Set(var.as_ptr(), value.as_ptr()) };
    // SAFETY: as above.
    unsafe { Bound::from_owned_ptr_or_err(py, token) }.map(drop)
}

fn push_held(py: Python<'_>, key: usize, token: u64, start: u64) -> PyResult<()> {
    let below = held_top(py)?.map(Bound::unbind);
    let top = Bound::new(
        py,
        HeldPermit {
            key,
            token,
            start,
            below,
        },
    )?;
    set_held_top(py, Some(top))
}

/// Takes the latest permit of breaker `key` off this context's stack (the top one, unless blocks of different
/// breakers were left out of order).
fn pop_held(py: Python<'_>, key: usize) -> PyResult<Option<(u64, u64)>> {
    let mut above = Vec::new();
    let mut node = held_top(py)?;
    while let Some(n) = node {
        let held = n.get();
        if held.key == key {
            let mut top = held.below.as_ref().map(|b| b.bind(py).clone());
            for a in above.into_iter().rev() {
                let a: Bound<'_, HeldPermit> = a;
                let h = a.get();
                top = Some(Bound::new(
                    py,
                    HeldPermit {
                        key: h.key,
                        token: h.token,
                        start: h.start,
                        below: top.map(Bound::unbind),
                    },
                )?);
            }
            set_held_top(py, top)?;
            return Ok(Some((held.token, held.start)));
        }
        node = held.below.as_ref().map(|b| b.bind(py).clone());
        above.push(n);
    }
    Ok(None)
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
            // SAFETY: `into_ptr` hands over the new reference that `new_coroutine` takes.
            let obj = unsafe { new_coroutine(py, breaker, awaitable.into_ptr()) };
            // SAFETY: `new_coroutine` returns a new reference, or NULL with an exception set.
            return unsafe { Py::from_owned_ptr_or_err(py, obj) };
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

// ---------------------------------------------------------------------------------------------------------------
// Hand-made types. CPython runs their slot functions with the GIL held (an abi3 extension never runs
// free-threaded), which is what `Python::assume_attached` and the `Cell`s below rely on.

// Outside the 3.11 limited API, but exported with these signatures by every CPython >= 3.9 (`PyObject_Vectorcall`
// joined the limited API in 3.12); pyo3-ffi declares them only for non-abi3 builds.
extern "C" {
    fn PyContextVar_New(
        name: *const std::ffi::c_char,
        def: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
    fn PyContextVar_Get(
        var: *mut ffi::PyObject,
        default_value: *mut ffi::PyObject,
        value: *mut *mut ffi::PyObject,
    ) -> c_int;
    fn PyContextVar_Set(var: *mut ffi::PyObject, value: *mut ffi::PyObject) -> *mut ffi::PyObject;
    fn PyObject_Vectorcall(
        callable: *mut ffi::PyObject,
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwnames: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
}

/// `sendfunc` (3.10+), the type of `am_send`, missing from pyo3-ffi's abi3 declarations.
type SendFunc = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *mut ffi::PyObject,
    *mut *mut ffi::PyObject,
) -> ffi::PySendResult;

/// `Py_am_send` (3.10+), missing from pyo3-ffi's abi3 slot list.
const PY_AM_SEND: c_int = 81;
/// `Py_TPFLAGS_HAVE_VECTORCALL`: honoured for heap types since 3.8 (in the limited API from 3.12).
const TPFLAGS_HAVE_VECTORCALL: c_ulong = 1 << 11;

/// Runs `f` attached to the interpreter: the raw slot functions go through here for anything that may raise,
/// allocate or drop a Python reference. An error (or a panic, as a `RuntimeError`) is left set as the current
/// exception, and None returned.
#[cold]
#[inline(never)]
fn cold<T>(f: impl FnOnce(Python<'_>) -> PyResult<T>) -> Option<T> {
    Python::attach(
        |py| match std::panic::catch_unwind(AssertUnwindSafe(|| f(py))) {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) => {
                err.restore(py);
                None
            }
            Err(_) => {
                PyRuntimeError::new_err("internal error (a panic) in treasure_engine's breaker")
                    .restore(py);
                None
            }
        },
    )
}

fn slot(slot: c_int, pfunc: *mut c_void) -> ffi::PyType_Slot {
    ffi::PyType_Slot { slot, pfunc }
}

/// Makes a heap type from `slots` (ended here); `name` must be static since 3.11 keeps the pointer.
fn new_type(
    py: Python<'_>,
    name: &'static CStr,
    basicsize: usize,
    flags: c_ulong,
    mut slots: Vec<ffi::PyType_Slot>,
    base: Option<&Bound<'_, PyType>>,
) -> PyResult<Py<PyType>> {
    slots.push(slot(0, ptr::null_mut()));
    let mut spec = ffi::PyType_Spec {
        name: name.as_ptr(),
        basicsize: c_int::try_from(basicsize)?,
        itemsize: 0,
        flags: u32::try_from(flags)?,
        slots: slots.as_mut_ptr(),
    };
    let ty = match base {
        // SAFETY: `spec` and `slots` are valid for the call; the name, members, methods and getsets that the
        // slots point to are static (leaked), as the type keeps pointers to them.
        Some(base) => unsafe {
            let bases = PyTuple::new(py, [base])?;
            ffi::PyType_FromSpecWithBases(&raw mut spec, bases.as_ptr())
        },
        // SAFETY: as above.
        None => unsafe { ffi::PyType_FromSpec(&raw mut spec) },
    };
    // SAFETY: a new reference to a type, or NULL with an exception set.
    Ok(unsafe { Bound::from_owned_ptr_or_err(py, ty) }?
        .cast_into::<PyType>()?
        .unbind())
}

fn method(name: &'static CStr, meth: ffi::PyCFunction, flags: c_int) -> ffi::PyMethodDef {
    ffi::PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: ffi::PyMethodDefPointer { PyCFunction: meth },
        ml_flags: flags,
        ml_doc: ptr::null(),
    }
}

fn leak<T>(items: Vec<T>) -> *mut c_void {
    Box::leak(items.into_boxed_slice()).as_mut_ptr().cast()
}

/// PyO3's `tp_dealloc` of `GuardedFunction`, which the subtype's calls first.
static BASE_DEALLOC: OnceLock<ffi::destructor> = OnceLock::new();
/// Whether the subtype's `tp_dealloc` must release the instance's reference to the subtype after PyO3's: PyO3
/// 0.27 frees a pyclass instance without releasing the reference every heap-type instance holds on its type
/// (PyO3 issue 6223, fixed upstream by PR 6224, which releases it there). Measured once on a probe instance when
/// the subtype is made, so that a PyO3 with the fix is not released from twice.
static SUBTYPE_DECREF: AtomicBool = AtomicBool::new(false);

/// `tp_dealloc` of the `GuardedFunction` subtype: PyO3's (which untracks the instance, drops its fields and frees
/// it with the subtype's `tp_free`), then the reference to the subtype unless PyO3 released it.
unsafe extern "C" fn guarded_subtype_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: the last reference is gone, GIL held; `obj` is an instance of the subtype, whose heap type it owns a
    // reference to, read before the memory is freed. BASE_DEALLOC is set before the subtype exists.
    unsafe {
        let ty = ffi::Py_TYPE(obj);
        if let Some(dealloc) = BASE_DEALLOC.get() {
            dealloc(obj);
        }
        if SUBTYPE_DECREF.load(Ordering::Relaxed) {
            ffi::Py_DECREF(ty.cast());
        }
    }
}

/// The subtype of `GuardedFunction` whose instances `_guard` makes, and the offset of its vectorcall slot. It
/// adds only that slot (plus `Py_TPFLAGS_METHOD_DESCRIPTOR`, so that `obj.method(...)` calls it unbound with
/// `obj` first instead of making a bound method), and a `tp_dealloc` that releases the type (see
/// `SUBTYPE_DECREF`); `breaker` serves the probe instance.
fn guarded_function_type<'py>(
    breaker: &Bound<'py, CircuitBreakerPy>,
) -> PyResult<&'py (Py<PyType>, usize)> {
    static TYPE: PyOnceLock<(Py<PyType>, usize)> = PyOnceLock::new();
    let py = breaker.py();
    TYPE.get_or_try_init(py, || {
        let base = py.get_type::<GuardedFunction>();
        // SAFETY: reading a slot of a live type; a PyO3 class's `tp_dealloc` is set and is a destructor.
        let base_dealloc = unsafe {
            let f = ffi::PyType_GetSlot(base.as_type_ptr(), ffi::Py_tp_dealloc);
            if f.is_null() {
                return Err(PySystemError::new_err("GuardedFunction has no tp_dealloc"));
            }
            std::mem::transmute::<*mut c_void, ffi::destructor>(f)
        };
        BASE_DEALLOC.get_or_init(|| base_dealloc);
        let base_size: usize = base.getattr("__basicsize__")?.extract()?;
        let offset = base_size.next_multiple_of(align_of::<ffi::vectorcallfunc>());
        let members = leak(vec![
            ffi::PyMemberDef {
                name: c"__vectorcalloffset__".as_ptr(),
                type_code: ffi::Py_T_PYSSIZET,
                offset: ffi::Py_ssize_t::try_from(offset)?,
                flags: ffi::Py_READONLY,
                doc: ptr::null(),
            },
            ffi::PyMemberDef::default(),
        ]);
        // Without it, the subtype's own `__doc__` (None) would hide the base's forwarding getter.
        let getsets = leak(vec![
            ffi::PyGetSetDef {
                name: c"__doc__".as_ptr(),
                get: Some(guarded_doc),
                set: None,
                doc: ptr::null(),
                closure: ptr::null_mut(),
            },
            ffi::PyGetSetDef::default(),
        ]);
        let ty = new_type(
            py,
            c"treasure_engine._core.GuardedFunction",
            offset + size_of::<ffi::vectorcallfunc>(),
            // Not immutable: its base, a PyO3 class, is not, and 3.12 deprecates (3.14 refuses) that mix.
            ffi::Py_TPFLAGS_DEFAULT | TPFLAGS_HAVE_VECTORCALL | ffi::Py_TPFLAGS_METHOD_DESCRIPTOR,
            vec![
                slot(ffi::Py_tp_members, members),
                slot(ffi::Py_tp_getset, getsets),
                slot(ffi::Py_tp_dealloc, guarded_subtype_dealloc as *mut c_void),
            ],
            Some(&base),
        )?;
        // The probe: nothing else can hold or free an instance of the subtype yet, and freeing this one runs no
        // Python code (the breaker stays alive, None is the function), so the type's count moves only by what
        // PyO3's dealloc did or did not release.
        // SAFETY: reading the reference count of a live type.
        let before = unsafe { ffi::Py_REFCNT(ty.as_ptr()) };
        drop(ty.bind(py).call1((breaker, py.None(), false))?);
        // SAFETY: as above.
        let after = unsafe { ffi::Py_REFCNT(ty.as_ptr()) };
        SUBTYPE_DECREF.store(after > before, Ordering::Relaxed);
        Ok((ty, offset))
    })
}

/// `__doc__` of the subtype: the function's.
unsafe extern "C" fn guarded_doc(obj: *mut ffi::PyObject, _: *mut c_void) -> *mut ffi::PyObject {
    cold(|py| {
        // SAFETY: the getter is the subtype's, so `obj` is one of its instances, borrowed for the call.
        let this = unsafe { Borrowed::from_ptr(py, obj).cast_unchecked::<GuardedFunction>() };
        Ok(this
            .get()
            .forward(py, pyo3::intern!(py, "__doc__"))?
            .into_ptr())
    })
    .unwrap_or(ptr::null_mut())
}

/// Vectorcall of a guarded sync function: permit, call (the arguments passed on as they came), outcome.
unsafe extern "C" fn sync_vectorcall(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls vectorcall slots with the GIL held.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: only instances of the subtype of GuardedFunction have this slot set (by `_guard`); `callable` is
    // borrowed for the call.
    let this = unsafe { Borrowed::from_ptr(py, callable).cast_unchecked::<GuardedFunction>() };
    let me = this.get();
    let breaker = me.breaker.bind(py);
    let Some((permit, start)) = CircuitBreakerPy::acquire_raw(breaker) else {
        return ptr::null_mut();
    };
    // SAFETY: the caller's vectorcall arguments, passed on unchanged; with PY_VECTORCALL_ARGUMENTS_OFFSET the
    // slot before `args[0]` is the caller's to lend, and we lend it on.
    let result = unsafe { PyObject_Vectorcall(me.func.as_ptr(), args, nargsf, kwnames) };
    if CircuitBreakerPy::complete_raw(breaker, permit, start, result.is_null()) {
        result
    } else {
        // SAFETY: a non-NULL result is a new reference we own.
        unsafe { ffi::Py_XDECREF(result) };
        ptr::null_mut()
    }
}

/// Vectorcall of a guarded async function: calls it and wraps what it returns in a guarded coroutine.
unsafe extern "C" fn async_vectorcall(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls vectorcall slots with the GIL held.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: only instances of the subtype of GuardedFunction have this slot set (by `_guard`); `callable` is
    // borrowed for the call.
    let this = unsafe { Borrowed::from_ptr(py, callable).cast_unchecked::<GuardedFunction>() };
    let me = this.get();
    // SAFETY: as in `sync_vectorcall`.
    let awaitable = unsafe { PyObject_Vectorcall(me.func.as_ptr(), args, nargsf, kwnames) };
    if awaitable.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: `awaitable` is a new reference, handed over.
    unsafe { new_coroutine(py, me.breaker.bind(py), awaitable) }
}

// ---------------------------------------------------------------------------------------------------------------
// The guarded coroutine: what calling a guarded async function returns.

const NEW: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// Layout of a guarded coroutine (allocated zeroed by `PyType_GenericAlloc`: NULLs, `NEW`, not executing).
#[repr(C)]
struct GuardedCoroutine {
    ob_base: ffi::PyObject,
    /// Owned: the `CircuitBreaker`.
    breaker: Cell<*mut ffi::PyObject>,
    /// Owned: what the function returned, replaced by what its `__await__` returned when that is not itself a
    /// coroutine (or a generator).
    inner: Cell<*mut ffi::PyObject>,
    /// The permit (while `RUNNING`).
    token: Cell<u64>,
    start: Cell<u64>,
    state: Cell<u8>,
    /// Set while the inner coroutine runs, to refuse re-entry.
    executing: Cell<bool>,
}

/// `types.CoroutineType` and its `am_send`, called directly when the inner awaitable is a native coroutine (as
/// `PyIter_Send` would).
struct NativeCoroutine {
    ty: Py<PyType>,
    send: SendFunc,
}

fn native_coroutine(py: Python<'_>) -> PyResult<&NativeCoroutine> {
    static NATIVE: PyOnceLock<NativeCoroutine> = PyOnceLock::new();
    NATIVE.get_or_try_init(py, || {
        let ty = py
            .import("types")?
            .getattr("CoroutineType")?
            .cast_into::<PyType>()?;
        // SAFETY: reading a slot of a live type (any type, from 3.10).
        let send = unsafe { ffi::PyType_GetSlot(ty.as_type_ptr(), PY_AM_SEND) };
        if send.is_null() {
            return Err(PySystemError::new_err("coroutines have no am_send"));
        }
        Ok(NativeCoroutine {
            ty: ty.unbind(),
            // SAFETY: a non-NULL `am_send` slot is a sendfunc.
            send: unsafe { std::mem::transmute::<*mut c_void, SendFunc>(send) },
        })
    })
}

/// Guarded coroutines freed and kept for reuse: allocating and freeing them is a sizeable part of a guarded
/// async call. Only touched with the GIL held (abi3 builds never run free-threaded and PyO3 modules refuse
/// subinterpreters), which is what makes the `Sync` below sound.
struct FreeList {
    items: UnsafeCell<[*mut ffi::PyObject; FREE_MAX]>,
    len: Cell<usize>,
}

const FREE_MAX: usize = 32;

// SAFETY: see above: every access holds the GIL.
unsafe impl Sync for FreeList {}

static FREE: FreeList = FreeList {
    items: UnsafeCell::new([ptr::null_mut(); FREE_MAX]),
    len: Cell::new(0),
};

impl FreeList {
    /// # Safety
    /// The GIL is held.
    unsafe fn pop(&self) -> Option<*mut ffi::PyObject> {
        let n = self.len.get().checked_sub(1)?;
        self.len.set(n);
        // SAFETY: the GIL is held, so nothing else touches the array; `n < FREE_MAX`.
        Some(unsafe { (*self.items.get())[n] })
    }

    /// # Safety
    /// The GIL is held; `obj` is an untracked, torn-down guarded coroutine whose type reference was released.
    unsafe fn push(&self, obj: *mut ffi::PyObject) -> bool {
        let n = self.len.get();
        if n == FREE_MAX {
            return false;
        }
        // SAFETY: as in `pop`.
        unsafe { (*self.items.get())[n] = obj };
        self.len.set(n + 1);
        true
    }
}

fn coroutine_type(py: Python<'_>) -> PyResult<&Py<PyType>> {
    static TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    native_coroutine(py)?;
    TYPE.get_or_try_init(py, || {
        let getter = |name: &'static CStr| ffi::PyGetSetDef {
            name: name.as_ptr(),
            get: Some(coro_forward),
            set: None,
            doc: ptr::null(),
            closure: name.as_ptr().cast_mut().cast(),
        };
        let getsets = leak(vec![
            getter(c"__name__"),
            getter(c"__qualname__"),
            getter(c"cr_code"),
            getter(c"cr_frame"),
            getter(c"cr_running"),
            getter(c"cr_await"),
            ffi::PyGetSetDef::default(),
        ]);
        let methods = leak(vec![
            method(c"send", coro_send_method, ffi::METH_O),
            method(c"throw", coro_throw, ffi::METH_VARARGS),
            method(c"close", coro_close, ffi::METH_NOARGS),
            ffi::PyMethodDef::zeroed(),
        ]);
        new_type(
            py,
            c"treasure_engine._core.GuardedCoroutine",
            size_of::<GuardedCoroutine>(),
            ffi::Py_TPFLAGS_DEFAULT
                | ffi::Py_TPFLAGS_HAVE_GC
                | ffi::Py_TPFLAGS_IMMUTABLETYPE
                | ffi::Py_TPFLAGS_DISALLOW_INSTANTIATION,
            vec![
                slot(ffi::Py_tp_dealloc, coro_dealloc as *mut c_void),
                slot(ffi::Py_tp_traverse, coro_traverse as *mut c_void),
                slot(ffi::Py_tp_clear, coro_clear as *mut c_void),
                slot(ffi::Py_tp_iter, self_iter as *mut c_void),
                slot(ffi::Py_tp_iternext, coro_iternext as *mut c_void),
                slot(ffi::Py_am_await, self_iter as *mut c_void),
                slot(PY_AM_SEND, coro_am_send as *mut c_void),
                slot(ffi::Py_tp_methods, methods),
                slot(ffi::Py_tp_getset, getsets),
                slot(
                    ffi::Py_tp_doc,
                    c"What calling a guarded async function returns: awaiting it takes the permit, awaits the \
                      function's coroutine and records its outcome."
                        .as_ptr()
                        .cast_mut()
                        .cast(),
                ),
            ],
            None,
        )
    })
}

/// A guarded coroutine around `awaitable`.
///
/// # Safety
/// The GIL is held; `awaitable` is a new reference, which this takes over (released on failure).
unsafe fn new_coroutine(
    py: Python<'_>,
    breaker: &Bound<'_, CircuitBreakerPy>,
    awaitable: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let Some(ty) = coroutine_type(py).map_err(|e| e.restore(py)).ok() else {
        // SAFETY: ours to release.
        unsafe { ffi::Py_DECREF(awaitable) };
        // The error of making the type is set.
        return ptr::null_mut();
    };
    let ty = ty.as_ptr().cast::<ffi::PyTypeObject>();
    // SAFETY: GIL held.
    let obj = if let Some(obj) = unsafe { FREE.pop() } {
        // SAFETY: the memory of a guarded coroutine that `coro_dealloc` tore down (untracked, fields cleared, no
        // reference to it anywhere): made an object of `ty` again (refcount 1, a new reference to the type),
        // reset to NEW, then tracked.
        unsafe {
            ffi::PyObject_Init(obj, ty);
            let c = coro(obj);
            c.state.set(NEW);
            c.executing.set(false);
            ffi::PyObject_GC_Track(obj.cast());
        }
        obj
    } else {
        // SAFETY: `ty` is a ready heap type with our basicsize; GenericAlloc zero-fills and tracks the object.
        let obj = unsafe { ffi::PyType_GenericAlloc(ty, 0) };
        if obj.is_null() {
            // SAFETY: ours to release.
            unsafe { ffi::Py_DECREF(awaitable) };
            return obj;
        }
        obj
    };
    // SAFETY: `obj` is a GuardedCoroutine in state NEW with NULL references.
    let c = unsafe { coro(obj) };
    // SAFETY: the breaker is alive (borrowed); we keep a new reference.
    unsafe { ffi::Py_INCREF(breaker.as_ptr()) };
    c.breaker.set(breaker.as_ptr());
    c.inner.set(awaitable);
    obj
}

/// # Safety
/// The GIL is held and `obj` is a live guarded coroutine.
unsafe fn coro<'a>(obj: *mut ffi::PyObject) -> &'a GuardedCoroutine {
    // SAFETY: per the contract; the fields are `Cell`s, so a shared reference may coexist with re-entrant calls.
    unsafe { &*obj.cast::<GuardedCoroutine>() }
}

impl GuardedCoroutine {
    /// The breaker, borrowed; None once cleared by the garbage collector.
    fn breaker<'a, 'py>(&'a self, py: Python<'py>) -> Option<Borrowed<'a, 'py, CircuitBreakerPy>> {
        let b = self.breaker.get();
        // SAFETY: a non-NULL `breaker` is an owned reference to a CircuitBreaker, alive as long as `self` holds
        // it.
        (!b.is_null()).then(|| unsafe { Borrowed::from_ptr(py, b).cast_unchecked() })
    }

    /// Gives the permit back unrecorded if one is held (closed, cancelled or dropped before the end).
    fn release_ignored(&self, py: Python<'_>) {
        if self.state.replace(DONE) == RUNNING {
            if let Some(b) = self.breaker(py) {
                b.get()
                    .core
                    .on_ignored(Permit::from_token(self.token.get()), coarse_ns());
            }
        }
    }

    /// First resumption: makes sure `inner` can be sent to, then takes the permit. False with an exception set
    /// (the call is then done: a refused call's coroutine is closed, so it never warns it was not awaited).
    fn start(&self, py: Python<'_>) -> bool {
        let inner = self.inner.get();
        // SAFETY: `inner` is an owned, live reference (NULL only after `tp_clear`, checked by the caller).
        let sendable = unsafe {
            let ty = ffi::Py_TYPE(inner);
            native_coroutine(py).is_ok_and(|n| ty == n.ty.as_ptr().cast())
                || !ffi::PyType_GetSlot(ty, PY_AM_SEND).is_null()
        };
        if !sendable && !self.resolve() {
            self.state.set(DONE);
            return false;
        }
        let Some(breaker) = self.breaker(py) else {
            self.state.set(DONE);
            return cold(|_| Err::<(), _>(PyRuntimeError::new_err("breaker cleared"))).is_some();
        };
        let Some((permit, start)) = CircuitBreakerPy::acquire_raw(&breaker) else {
            self.state.set(DONE);
            // Refused: close the coroutine (it never ran), keeping CircuitOpen as the exception.
            cold(|py| {
                let refused = PyErr::fetch(py);
                // SAFETY: `inner` is an owned, live reference.
                let inner = unsafe { Borrowed::from_ptr(py, self.inner.get()) };
                if inner.hasattr("close").unwrap_or(false) {
                    let _ = inner.call_method0("close");
                }
                Err::<(), _>(refused)
            });
            return false;
        };
        self.token.set(permit.into_token());
        self.start.set(start);
        self.state.set(RUNNING);
        true
    }

    /// Replaces a non-coroutine awaitable by the iterator its `__await__` returns.
    #[cold]
    fn resolve(&self) -> bool {
        cold(|py| {
            // SAFETY: `inner` is an owned, live reference.
            let inner = unsafe { Borrowed::from_ptr(py, self.inner.get()) };
            let ty = inner.get_type();
            // SAFETY: reading a slot of a live type.
            let await_slot = unsafe { ffi::PyType_GetSlot(ty.as_type_ptr(), ffi::Py_am_await) };
            if await_slot.is_null() {
                // A bare iterator (a generator-based coroutine) is driven as it is.
                // SAFETY: a live object.
                if unsafe { ffi::PyIter_Check(inner.as_ptr()) } != 0 {
                    return Ok(());
                }
                return Err(PyTypeError::new_err(format!(
                    "object {} can't be used in 'await' expression",
                    ty.name()?
                )));
            }
            // SAFETY: `am_await` is a unaryfunc; it returns a new reference or NULL with an exception set.
            let iter = unsafe {
                let f: ffi::unaryfunc =
                    std::mem::transmute::<*mut c_void, ffi::unaryfunc>(await_slot);
                Bound::from_owned_ptr_or_err(py, f(inner.as_ptr()))?
            };
            // SAFETY: a live object.
            if unsafe { ffi::PyIter_Check(iter.as_ptr()) } == 0 {
                return Err(PyTypeError::new_err(format!(
                    "__await__() returned non-iterator of type '{}'",
                    iter.get_type().name()?
                )));
            }
            let old = self.inner.replace(iter.into_ptr());
            // SAFETY: the reference `inner` held, now released (the Borrowed above is not used after this).
            unsafe { ffi::Py_DECREF(old) };
            Ok(())
        })
        .is_some()
    }

    /// One resumption with `arg`: the core of `am_send`, `__next__` and `send`.
    fn send(
        &self,
        py: Python<'_>,
        arg: *mut ffi::PyObject,
        result: &mut *mut ffi::PyObject,
    ) -> ffi::PySendResult {
        if self.executing.get() {
            return raise(|| PyValueError::new_err("coroutine already executing"));
        }
        match self.state.get() {
            NEW => {
                if self.inner.get().is_null() {
                    self.state.set(DONE);
                    return raise(|| {
                        PyRuntimeError::new_err("cannot reuse already awaited coroutine")
                    });
                }
                if !self.start(py) {
                    return ffi::PySendResult::PYGEN_ERROR;
                }
            }
            RUNNING => {}
            _ => {
                return raise(|| PyRuntimeError::new_err("cannot reuse already awaited coroutine"))
            }
        }
        self.executing.set(true);
        let inner = self.inner.get();
        // SAFETY: `inner` is an owned, live reference (RUNNING) and `arg` a borrowed one; `result` receives a new
        // reference on NEXT and RETURN. A native coroutine's `am_send` is what PyIter_Send would call.
        let status = unsafe {
            match native_coroutine(py) {
                Ok(native) if ffi::Py_TYPE(inner) == native.ty.as_ptr().cast() => {
                    (native.send)(inner, arg, result)
                }
                _ => ffi::PyIter_Send(inner, arg, result),
            }
        };
        self.executing.set(false);
        match status {
            ffi::PySendResult::PYGEN_NEXT => status,
            ffi::PySendResult::PYGEN_RETURN => {
                if self.finish(py, false) {
                    status
                } else {
                    // SAFETY: the new reference PyIter_Send returned, released as we raise instead.
                    unsafe { ffi::Py_DECREF(*result) };
                    *result = ptr::null_mut();
                    ffi::PySendResult::PYGEN_ERROR
                }
            }
            ffi::PySendResult::PYGEN_ERROR => {
                self.finish(py, true);
                status
            }
        }
    }

    /// Records the outcome of the call (RUNNING -> DONE): a success, or the exception currently set (`failed`).
    /// Returns false when an exception is set on return.
    fn finish(&self, py: Python<'_>, failed: bool) -> bool {
        if self.state.replace(DONE) != RUNNING {
            return !failed;
        }
        let Some(breaker) = self.breaker(py) else {
            return !failed;
        };
        let permit = Permit::from_token(self.token.get());
        CircuitBreakerPy::complete_raw(&breaker, permit, self.start.get(), failed)
    }
}

/// Sets the exception `f` makes and returns `PYGEN_ERROR`.
#[cold]
fn raise(f: impl FnOnce() -> PyErr) -> ffi::PySendResult {
    cold(|_| Err::<(), _>(f()));
    ffi::PySendResult::PYGEN_ERROR
}

/// `am_send`: what `await` uses (3.10+ through `PyIter_Send`, and asyncio's tasks): a return comes back as
/// `PYGEN_RETURN` with the value, no `StopIteration` made.
unsafe extern "C" fn coro_am_send(
    obj: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    // SAFETY: CPython calls type slots with the GIL held, on a live instance; `result` is a valid out pointer.
    unsafe {
        let py = Python::assume_attached();
        coro(obj).send(py, arg, &mut *result)
    }
}

/// Ends a `__next__` / `send` that returned `value` (a new reference): `StopIteration(value)`, or for `__next__`
/// and None, NULL without an exception, which means the same. (What `await` uses from 3.12 on, so kept off the
/// `cold` path: as `_PyGen_SetStopIterationValue`, the value is wrapped in a tuple only when `PyErr_SetObject`
/// would otherwise unpack it or take it for the exception.)
fn stop_iteration(value: *mut ffi::PyObject, bare_none: bool) -> *mut ffi::PyObject {
    // SAFETY: GIL held; `value` is a new reference we own and release; the tuple too.
    unsafe {
        if value == ffi::Py_None() {
            ffi::Py_DECREF(value);
            if !bare_none {
                ffi::PyErr_SetNone(ffi::PyExc_StopIteration);
            }
            return ptr::null_mut();
        }
        let flags = ffi::PyType_GetFlags(ffi::Py_TYPE(value));
        if flags & (ffi::Py_TPFLAGS_TUPLE_SUBCLASS | ffi::Py_TPFLAGS_BASE_EXC_SUBCLASS) == 0 {
            ffi::PyErr_SetObject(ffi::PyExc_StopIteration, value);
        } else {
            let args = ffi::PyTuple_Pack(1, value);
            if !args.is_null() {
                ffi::PyErr_SetObject(ffi::PyExc_StopIteration, args);
                ffi::Py_DECREF(args);
            }
        }
        ffi::Py_DECREF(value);
    }
    ptr::null_mut()
}

fn from_send(
    status: ffi::PySendResult,
    result: *mut ffi::PyObject,
    bare_none: bool,
) -> *mut ffi::PyObject {
    match status {
        ffi::PySendResult::PYGEN_NEXT => result,
        ffi::PySendResult::PYGEN_RETURN => stop_iteration(result, bare_none),
        ffi::PySendResult::PYGEN_ERROR => ptr::null_mut(),
    }
}

/// `__next__` (what `await` uses from 3.12 on): a return raises `StopIteration(value)`.
unsafe extern "C" fn coro_iternext(obj: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: GIL held, live instance; Py_None is a borrowed reference for the call.
    unsafe {
        let py = Python::assume_attached();
        let mut result = ptr::null_mut();
        let status = coro(obj).send(py, ffi::Py_None(), &mut result);
        from_send(status, result, true)
    }
}

/// `send(value)`.
unsafe extern "C" fn coro_send_method(
    obj: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: GIL held, live instance; `arg` borrowed for the call.
    unsafe {
        let py = Python::assume_attached();
        let mut result = ptr::null_mut();
        let status = coro(obj).send(py, arg, &mut result);
        from_send(status, result, false)
    }
}

/// `throw(exc)` (or the deprecated `throw(type, value, traceback)`): into the inner coroutine. Its outcome is
/// recorded as for a resumption: a return is a success, a raise is classified (a `CancelledError` is not a
/// failure unless `record` or the predicate says so, and its permit is given back).
unsafe extern "C" fn coro_throw(
    obj: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: GIL held, live instance.
    let c = unsafe { coro(obj) };
    if c.executing.get() {
        raise(|| PyValueError::new_err("coroutine already executing"));
        return ptr::null_mut();
    }
    if c.inner.get().is_null() {
        raise(|| PyRuntimeError::new_err("cannot reuse already awaited coroutine"));
        return ptr::null_mut();
    }
    if c.state.get() == NEW {
        // SAFETY: `inner` is live.
        let sendable =
            unsafe { !ffi::PyType_GetSlot(ffi::Py_TYPE(c.inner.get()), PY_AM_SEND).is_null() };
        if !sendable && !c.resolve() {
            c.state.set(DONE);
            return ptr::null_mut();
        }
    }
    cold(|py| {
        // SAFETY: `inner` is an owned, live reference; `args` the call's argument tuple, borrowed.
        let (inner, args) = unsafe {
            (
                Borrowed::from_ptr(py, c.inner.get()),
                Borrowed::from_ptr(py, args).cast_unchecked::<PyTuple>(),
            )
        };
        c.executing.set(true);
        let thrown = inner
            .getattr(pyo3::intern!(py, "throw"))
            .and_then(|throw| throw.call1(args.to_owned()));
        c.executing.set(false);
        if c.state.get() != RUNNING {
            // Thrown in before the call started: nothing to record, and nothing more to run.
            c.state.set(DONE);
            return thrown.map(Bound::into_ptr);
        }
        match thrown {
            // The coroutine caught it and awaits again.
            Ok(value) => Ok(value.into_ptr()),
            Err(err) => {
                c.state.set(DONE);
                if let Some(breaker) = c.breaker(py) {
                    let me = breaker.get();
                    let permit = Permit::from_token(c.token.get());
                    // StopIteration: the coroutine caught it and returned.
                    let exc = err.value(py);
                    let failed = (!exc.is_instance_of::<PyStopIteration>()).then_some(exc.as_any());
                    me.finish(py, permit, c.start.get(), failed)?;
                    CircuitBreakerPy::dispatch(&breaker)?;
                }
                Err(err)
            }
        }
    })
    .unwrap_or(ptr::null_mut())
}

/// `close()`: closes the inner coroutine; a permit held is given back unrecorded.
unsafe extern "C" fn coro_close(
    obj: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: GIL held, live instance.
    let c = unsafe { coro(obj) };
    if c.executing.get() {
        raise(|| PyValueError::new_err("coroutine already executing"));
        return ptr::null_mut();
    }
    cold(|py| {
        let inner = c.inner.get();
        let closed = if inner.is_null() {
            Ok(())
        } else {
            // SAFETY: `inner` is an owned, live reference.
            let inner = unsafe { Borrowed::from_ptr(py, inner) };
            c.executing.set(true);
            let closed = inner.hasattr(pyo3::intern!(py, "close")).and_then(|has| {
                if has {
                    inner.call_method0(pyo3::intern!(py, "close")).map(drop)
                } else {
                    Ok(())
                }
            });
            c.executing.set(false);
            closed
        };
        c.release_ignored(py);
        closed.map(|()| py.None().into_ptr())
    })
    .unwrap_or(ptr::null_mut())
}

/// Forwards `__name__`, `__qualname__`, `cr_code`, `cr_frame`, ... to the inner coroutine (for reprs, asyncio's
/// task descriptions and debuggers).
unsafe extern "C" fn coro_forward(
    obj: *mut ffi::PyObject,
    name: *mut c_void,
) -> *mut ffi::PyObject {
    // SAFETY: GIL held, live instance; `name` is the static C string given as the getset's closure.
    let (c, name) = unsafe { (coro(obj), CStr::from_ptr(name.cast())) };
    cold(|py| {
        let inner = c.inner.get();
        if inner.is_null() {
            return Ok(py.None().into_ptr());
        }
        // SAFETY: `inner` is an owned, live reference.
        let inner = unsafe { Borrowed::from_ptr(py, inner) };
        Ok(inner.getattr(name.to_str()?)?.into_ptr())
    })
    .unwrap_or(ptr::null_mut())
}

unsafe extern "C" fn self_iter(obj: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: GIL held, live instance: a new reference to it.
    unsafe { ffi::Py_INCREF(obj) };
    obj
}

unsafe extern "C" fn coro_traverse(
    obj: *mut ffi::PyObject,
    visit: ffi::visitproc,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: called by the collector on a live instance; heap-type instances visit their type.
    unsafe {
        let c = coro(obj);
        for o in [ffi::Py_TYPE(obj).cast(), c.breaker.get(), c.inner.get()] {
            if !o.is_null() {
                let r = visit(o, arg);
                if r != 0 {
                    return r;
                }
            }
        }
    }
    0
}

unsafe extern "C" fn coro_clear(obj: *mut ffi::PyObject) -> c_int {
    // SAFETY: called with the GIL held on a live instance; the references are ours to release.
    unsafe {
        let py = Python::assume_attached();
        let c = coro(obj);
        c.release_ignored(py);
        let (inner, breaker) = (
            c.inner.replace(ptr::null_mut()),
            c.breaker.replace(ptr::null_mut()),
        );
        ffi::Py_XDECREF(inner);
        ffi::Py_XDECREF(breaker);
    }
    0
}

unsafe extern "C" fn coro_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: the last reference is gone, GIL held; untrack before tearing down, keep the memory for reuse or free
    // it with the type's `tp_free`, and release the reference every heap-type instance holds on its type.
    unsafe {
        ffi::PyObject_GC_UnTrack(obj.cast());
        coro_clear(obj);
        let ty = ffi::Py_TYPE(obj);
        if !FREE.push(obj) {
            let free: Option<ffi::freefunc> =
                std::mem::transmute(ffi::PyType_GetSlot(ty, ffi::Py_tp_free));
            if let Some(free) = free {
                free(obj.cast());
            }
        }
        ffi::Py_DECREF(ty.cast());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A ready awaitable: what `__aenter__` and `__aexit__` return (their work is done when they are called).

fn ready(py: Python<'_>) -> PyResult<Py<PyAny>> {
    static READY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    READY
        .get_or_try_init(py, || {
            // `send`, `throw` and `close` make it a `collections.abc.Coroutine`, as `async def __aenter__` returns.
            let methods = leak(vec![
                method(c"send", ready_send, ffi::METH_O),
                method(c"throw", ready_throw, ffi::METH_VARARGS),
                method(c"close", ready_close, ffi::METH_NOARGS),
                ffi::PyMethodDef::zeroed(),
            ]);
            let ty = new_type(
                py,
                c"treasure_engine._core.Ready",
                size_of::<ffi::PyObject>(),
                ffi::Py_TPFLAGS_DEFAULT
                    | ffi::Py_TPFLAGS_IMMUTABLETYPE
                    | ffi::Py_TPFLAGS_DISALLOW_INSTANTIATION,
                vec![
                    slot(ffi::Py_tp_dealloc, ready_dealloc as *mut c_void),
                    slot(ffi::Py_tp_iter, self_iter as *mut c_void),
                    slot(ffi::Py_tp_iternext, ready_iternext as *mut c_void),
                    slot(ffi::Py_am_await, self_iter as *mut c_void),
                    slot(PY_AM_SEND, ready_am_send as *mut c_void),
                    slot(ffi::Py_tp_methods, methods),
                    slot(
                        ffi::Py_tp_doc,
                        c"An awaitable already done (with None): what `CircuitBreaker.__aenter__` and \
                          `__aexit__` return, since their work is done when they are called."
                            .as_ptr()
                            .cast_mut()
                            .cast(),
                    ),
                ],
                None,
            )?;
            // SAFETY: a ready heap type whose instances are bare objects.
            unsafe {
                Py::from_owned_ptr_or_err(py, ffi::PyType_GenericAlloc(ty.as_ptr().cast(), 0))
            }
        })
        .map(|r| r.clone_ref(py))
}

unsafe extern "C" fn ready_am_send(
    _: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    // SAFETY: GIL held; `result` is a valid out pointer and receives a new reference to None.
    unsafe {
        *result = ffi::Py_None();
        ffi::Py_INCREF(*result);
    }
    ffi::PySendResult::PYGEN_RETURN
}

/// `send(value)`: already done, so `StopIteration` (with None).
unsafe extern "C" fn ready_send(
    _: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: GIL held.
    unsafe { ffi::PyErr_SetNone(ffi::PyExc_StopIteration) };
    ptr::null_mut()
}

/// `throw(exc)` (or `throw(type[, value[, traceback]])`): raises it, as a finished coroutine does.
unsafe extern "C" fn ready_throw(
    _: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    cold(|py| {
        // SAFETY: the call's argument tuple, borrowed.
        let args = unsafe { Borrowed::from_ptr(py, args).cast_unchecked::<PyTuple>() };
        let first = args.get_item(0)?;
        if first.is_instance_of::<PyBaseException>() {
            return Err::<(), _>(PyErr::from_value(first));
        }
        let exc = match args.get_item(1).ok().filter(|v| !v.is_none()) {
            Some(v) if v.is_instance_of::<PyBaseException>() => v,
            Some(v) => first.call1((v,))?,
            None => first.call0()?,
        };
        Err(PyErr::from_value(exc))
    });
    ptr::null_mut()
}

/// `close()`: nothing to close.
unsafe extern "C" fn ready_close(
    _: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: GIL held: a new reference to None.
    unsafe {
        let none = ffi::Py_None();
        ffi::Py_INCREF(none);
        none
    }
}

unsafe extern "C" fn ready_iternext(_: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // Exhausted, without an exception: StopIteration with None.
    ptr::null_mut()
}

unsafe extern "C" fn ready_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: the last reference is gone, GIL held.
    unsafe {
        let ty = ffi::Py_TYPE(obj);
        let free: Option<ffi::freefunc> =
            std::mem::transmute(ffi::PyType_GetSlot(ty, ffi::Py_tp_free));
        if let Some(free) = free {
            free(obj.cast());
        }
        ffi::Py_DECREF(ty.cast());
    }
}
