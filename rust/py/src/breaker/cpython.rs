//! Every raw CPython call of the breaker bindings, in one file to read and review: the context variable that
//! holds the permits of `async with` blocks, and the hand-made types (`PyType_FromSpec`) that PyO3 cannot
//! express: the vectorcall subtype of `GuardedFunction`, the guarded coroutine and the ready awaitable. See
//! the parent module's docs for why they exist; each `unsafe` block carries its `SAFETY` comment.

use std::cell::{Cell, UnsafeCell};
use std::ffi::{c_int, c_ulong, c_void, CStr};
use std::panic::AssertUnwindSafe;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use pyo3::exceptions::{
    PyBaseException, PyRuntimeError, PyStopIteration, PySystemError, PyTypeError, PyValueError,
};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyTuple, PyType};
use pyo3::Borrowed;
use treasure_core::breaker::Permit;
use treasure_core::clock::coarse_ns;

use super::{CircuitBreakerPy, GuardedFunction};

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

pub(super) fn push_held(py: Python<'_>, key: usize, token: u64, start: u64) -> PyResult<()> {
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
pub(super) fn pop_held(py: Python<'_>, key: usize) -> PyResult<Option<(u64, u64)>> {
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
pub(super) fn cold<T>(f: impl FnOnce(Python<'_>) -> PyResult<T>) -> Option<T> {
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

/// What `CircuitBreaker._guard` returns: a new instance of the subtype of `GuardedFunction` made by
/// [`guarded_function_type`], its vectorcall slot set to the sync or the async entry point.
pub(super) fn new_guarded_function<'py>(
    slf: &Bound<'py, CircuitBreakerPy>,
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

/// What calling an async `GuardedFunction` returns: the guarded coroutine of `breaker` over `awaitable`.
pub(super) fn guarded_coroutine(
    py: Python<'_>,
    breaker: &Bound<'_, CircuitBreakerPy>,
    awaitable: Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    // SAFETY: `into_ptr` hands over the new reference that `new_coroutine` takes.
    let obj = unsafe { new_coroutine(py, breaker, awaitable.into_ptr()) };
    // SAFETY: `new_coroutine` returns a new reference, or NULL with an exception set.
    unsafe { Py::from_owned_ptr_or_err(py, obj) }
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

pub(super) fn ready(py: Python<'_>) -> PyResult<Py<PyAny>> {
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
