//! `pyshmlock._pyshmlock`: the Python module, a thin layer on the Rust library's [`Locker`]
//! contract. `Client` and `RemoteClient` are the library's clients behind an `Arc`; a `Guard` owns
//! the library's owned guard (`ArcLockGuard` / `ArcRemoteGuard`), so it lives as long as Python
//! keeps it and unlocks when released, when its `with` block ends, or when it is collected.
//!
//! Three rules shape it:
//! - An uncontended lock never gives up the GIL: it is tried at once, under the GIL; only a lock
//!   that must wait releases the GIL for the wait.
//! - A wait runs through [`Locker::acquire_interruptible_with`]: after each of its sleeps (at
//!   most 50 ms apart, and at once when a signal interrupts it) it takes the GIL back for a moment
//!   to run Python's signal handlers. A handler that raises (Ctrl-C: `KeyboardInterrupt`)
//!   withdraws the request, and the exception propagates with nothing held or queued.
//! - Errors become the exceptions of `pyshmlock/_errors.py` (one per variant of the library's
//!   `Error`), looked up by name there, so their hierarchy (`Timeout` is also a `TimeoutError`)
//!   is plain Python.

use std::cell::Cell;
use std::ffi::{c_int, CStr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyString};
use pyo3::IntoPyObjectExt;
use shmlock::remote::{ArcRemoteGuard, ConnectOptions, RemoteClient as Remote};
use shmlock::{ArcLockGuard, Capacities, Client as Local, Error, LockTable, Locker, Mode, Wait};

/// A lock held through either backend.
enum Held {
    Local(ArcLockGuard),
    Remote(ArcRemoteGuard),
}

impl Held {
    fn grant(&self) -> shmlock::Grant {
        match self {
            Held::Local(g) => g.grant(),
            Held::Remote(g) => g.grant(),
        }
    }

    fn lost(&self) -> bool {
        match self {
            Held::Local(g) => shmlock::Guard::lost(g),
            Held::Remote(g) => shmlock::Guard::lost(g),
        }
    }
}

/// What the module needs of a backend besides the contract.
trait Backend: Locker + Send + Sync + 'static {
    /// Waits for the gateway's answers (so: without the GIL) rather than for memory.
    const REMOTE: bool;
    fn held(g: Self::Guard<Arc<Self>>) -> Held;
}

impl Backend for Local {
    const REMOTE: bool = false;
    fn held(g: ArcLockGuard) -> Held {
        Held::Local(g)
    }
}

impl Backend for Remote {
    const REMOTE: bool = true;
    fn held(g: ArcRemoteGuard) -> Held {
        Held::Remote(g)
    }
}

// ---- errors ----------------------------------------------------------------------------------

/// `pyshmlock._errors`, imported once.
static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The exception of class `class` (in `pyshmlock._errors`) with `message` and attributes.
fn exception(py: Python<'_>, class: &str, message: String, attrs: &[(&str, Py<PyAny>)]) -> PyErr {
    let make = || -> PyResult<PyErr> {
        let module = ERRORS.get_or_try_init(py, || py.import("pyshmlock._errors").map(Bound::unbind))?;
        let exc = module.bind(py).getattr(class)?.call1((message.clone(),))?;
        for (k, v) in attrs {
            exc.setattr(*k, v)?;
        }
        Ok(PyErr::from_value(exc))
    };
    // The error module missing is a broken install: say that rather than lose the error.
    make().unwrap_or_else(|e| e)
}

fn obj<'py, T: IntoPyObject<'py>>(py: Python<'py>, v: T) -> Py<PyAny> {
    v.into_py_any(py).unwrap_or_else(|_| py.None())
}

/// The Python exception for a library error; `name` is the lock concerned, where one is.
fn raise(py: Python<'_>, e: Error, name: Option<&Py<PyAny>>) -> PyErr {
    let message = e.to_string();
    let name_attr = || name.map_or_else(|| py.None(), |n| n.clone_ref(py));
    let secs = |d: Duration| obj(py, d.as_secs_f64());
    let segment = |s: &str| vec![("segment", obj(py, s))];
    let (class, attrs): (&str, Vec<(&str, Py<PyAny>)>) = match &e {
        Error::TimedOut { waited, holder } => {
            let mut a = vec![("name", name_attr()), ("waited", secs(*waited))];
            if let Some(h) = holder {
                a.extend([
                    ("holder_pid", obj(py, h.pid)),
                    ("holder_label", obj(py, h.label.as_str())),
                    ("held_for", secs(h.held_for)),
                    ("holders", obj(py, h.holders)),
                ]);
            }
            ("Timeout", a)
        }
        Error::WouldBlock => ("WouldBlock", vec![("name", name_attr())]),
        Error::AlreadyHeld => ("AlreadyHeld", vec![("name", name_attr())]),
        Error::NotHeld => ("NotHeld", vec![("name", name_attr())]),
        Error::NameInvalid { .. } => ("BadName", vec![("name", name_attr())]),
        Error::PoolFull { .. } => ("TableFull", vec![]),
        Error::Cancelled => ("Cancelled", vec![]),
        Error::Interrupted => ("Interrupted", vec![]),
        Error::ForkedClient { opened_by, pid } => (
            "ForkedClient",
            vec![("opened_by", obj(py, *opened_by)), ("pid", obj(py, *pid))],
        ),
        Error::SupervisorRunning { .. } => ("SupervisorRunning", vec![]),
        Error::Config { .. } => ("ConfigError", vec![]),
        Error::SegmentMissing { name } => {
            let message = format!(
                "segment {name} does not exist: start shmlockd to create it (`shmlockd --segment {name}`, \
                 or `cargo run --release --bin shmlockd -- --segment {name}` in the shmlock source tree), \
                 or open the client with create=True"
            );
            return exception(py, "SegmentMissing", message, &segment(name));
        }
        Error::SegmentExists { name } => ("SegmentExists", segment(name)),
        Error::SegmentNameInvalid { name, .. } => ("BadSegmentName", segment(name)),
        Error::SegmentWrongOwner { name, .. } => ("SegmentWrongOwner", segment(name)),
        Error::SegmentSymlink { name, .. } => ("SegmentSymlink", segment(name)),
        Error::SegmentNotRegular { name, .. } => ("SegmentNotRegular", segment(name)),
        Error::SegmentLinked { name, .. } => ("SegmentLinked", segment(name)),
        Error::SegmentModeTooWide { name, .. } => ("SegmentModeTooWide", segment(name)),
        Error::SegmentInUse { name, .. } => ("SegmentInUse", segment(name)),
        Error::SegmentRemoved { name, .. } => ("SegmentRemoved", segment(name)),
        Error::WrongMagic { .. } => ("WrongMagic", vec![]),
        Error::WrongVersion { .. } => ("WrongVersion", vec![]),
        Error::SegmentTooSmall { .. } => ("SegmentTooSmall", vec![]),
        Error::Corrupt { .. } => ("Corrupt", vec![]),
        Error::WrongState { .. } => ("WrongState", vec![]),
        Error::Remote { code, .. } => ("RemoteError", vec![("code", obj(py, code.to_string()))]),
        Error::ProtocolVersion { .. } => ("ProtocolVersionError", vec![]),
        Error::Connection { .. } => ("GatewayConnectionError", vec![]),
        Error::Io { source, segment: s, .. } => {
            // OSError(errno, strerror) sets .errno and .strerror.
            let errno = source.raw_os_error().unwrap_or(0);
            let make = || -> PyResult<PyErr> {
                let module = ERRORS.get_or_try_init(py, || py.import("pyshmlock._errors").map(Bound::unbind))?;
                let exc = module
                    .bind(py)
                    .getattr("ShmlockOSError")?
                    .call1((errno, message.clone()))?;
                if !s.is_empty() {
                    exc.setattr("segment", s.as_str())?;
                }
                Ok(PyErr::from_value(exc))
            };
            return make().unwrap_or_else(|e| e);
        }
        // A variant this build does not know of (the library's Error is non_exhaustive).
        _ => ("ShmlockError", vec![]),
    };
    exception(py, class, message, &attrs)
}

// ---- arguments -------------------------------------------------------------------------------

unsafe extern "C" {
    /// CPython's UTF-8 view of a `str`, cached in the object (no copy). In the limited API only
    /// from 3.10, but exported with this signature by every CPython 3 (part of the full API
    /// before), so this abi3 module for 3.9+ may call it; PyO3 under `abi3-py39` copies instead.
    fn PyUnicode_AsUTF8AndSize(unicode: *mut pyo3::ffi::PyObject, size: *mut pyo3::ffi::Py_ssize_t) -> *const u8;
}

/// The bytes of a name given as `str` (its UTF-8) or `bytes` (any bytes).
fn name_bytes<'a>(name: &'a Bound<'_, PyAny>) -> PyResult<&'a [u8]> {
    if let Ok(s) = name.cast::<PyString>() {
        let mut len: pyo3::ffi::Py_ssize_t = 0;
        // SAFETY: `s` is a live `str` (checked by the cast) and we hold the GIL (`Bound`). The
        // function returns null with an exception set (a lone surrogate: not UTF-8), or a
        // pointer to `len` bytes owned by the object and valid while it lives and is not
        // modified (`str` is immutable), which the borrow `'a` of `name` guarantees.
        let p = unsafe { PyUnicode_AsUTF8AndSize(s.as_ptr(), &mut len) };
        if p.is_null() {
            return Err(PyErr::fetch(name.py()));
        }
        // SAFETY: as above: `p` points at `len` (>= 0) initialised bytes that outlive `'a`.
        return Ok(unsafe { std::slice::from_raw_parts(p, len as usize) });
    }
    if let Ok(b) = name.cast::<PyBytes>() {
        return Ok(b.as_bytes());
    }
    Err(PyTypeError::new_err(format!(
        "a lock name is a str or bytes, not {}",
        name.get_type().name()?
    )))
}

/// The wait of `timeout` (seconds: None or negative, as long as it takes; 0, one try) and
/// `blocking` (False: one try).
fn wait_of(timeout: Option<f64>, blocking: bool) -> PyResult<Wait> {
    match timeout {
        _ if !blocking => Ok(Wait::No),
        None => Ok(Wait::Forever),
        Some(t) if t.is_nan() => Err(PyValueError::new_err("timeout is NaN")),
        Some(t) if t < 0.0 => Ok(Wait::Forever),
        Some(0.0) => Ok(Wait::No),
        // Beyond what a Duration holds: as good as forever.
        Some(t) => Ok(Duration::try_from_secs_f64(t).map_or(Wait::Forever, Wait::for_duration)),
    }
}

fn mode_of(shared: bool) -> Mode {
    if shared {
        Mode::Shared
    } else {
        Mode::Exclusive
    }
}

/// What a Python process is called in `shmlock owners`: its script's file name (`worker.py`),
/// or `python` when it runs none (`-c`, the REPL).
fn default_label(py: Python<'_>) -> String {
    let argv0: Option<String> = py
        .import("sys")
        .and_then(|sys| sys.getattr("argv"))
        .and_then(|argv| argv.get_item(0))
        .and_then(|a| a.extract())
        .ok();
    let script = argv0
        .as_deref()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .filter(|a| !a.is_empty() && *a != "-c" && *a != "-m");
    let label = script.unwrap_or("python");
    truncate(label, shmlock::owner::LABEL_MAX).to_string()
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- locking, for both backends --------------------------------------------------------------

/// Locks `name` on `client`: `Ok(None)` only for a one-try request (`try_lock`) that found the
/// lock busy.
fn acquire<L: Backend>(
    py: Python<'_>,
    client: &Arc<L>,
    name: &Bound<'_, PyAny>,
    mode: Mode,
    wait: Wait,
    busy_is_none: bool,
) -> PyResult<Option<Guard>> {
    let bytes = name_bytes(name)?;
    match take(py, client, bytes, mode, wait)? {
        Ok(g) => {
            let grant = g.grant();
            Ok(Some(Guard {
                held: Mutex::new(Some(g)),
                name: name.clone().unbind(),
                token: grant.token.0,
                owner_died: grant.owner_died,
                shared: grant.mode == Mode::Shared,
            }))
        }
        Err(Error::WouldBlock) if busy_is_none => Ok(None),
        Err(e) => Err(raise(py, e, Some(&name.clone().unbind()))),
    }
}

/// Locks `name` on `client`. The outer `Err` is an exception a signal handler raised during the
/// wait (nothing held); the inner one the library's answer.
fn take<L: Backend>(
    py: Python<'_>,
    client: &Arc<L>,
    name: &[u8],
    mode: Mode,
    wait: Wait,
) -> PyResult<shmlock::Result<Held>> {
    // Tried at once under the GIL: an uncontended lock costs no release of the GIL. (Not for a
    // remote client, whose every request is a round trip.)
    let first = (!L::REMOTE).then(|| L::acquire_with(Arc::clone(client), name, mode, Wait::No).map(L::held));
    match first {
        Some(Err(Error::WouldBlock)) if wait != Wait::No => wait_for(py, client, name, mode, wait),
        Some(r) => Ok(r),
        None => wait_for(py, client, name, mode, wait),
    }
}

/// Waits for `name` without the GIL, taking it back after every sleep to run signal handlers;
/// `Err` is the exception one of them raised (the request withdrawn, nothing held).
fn wait_for<L: Backend>(
    py: Python<'_>,
    client: &Arc<L>,
    name: &[u8],
    mode: Mode,
    wait: Wait,
) -> PyResult<shmlock::Result<Held>> {
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut interrupted = || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => false,
                Err(e) => {
                    raised = Some(e);
                    true
                }
            })
        };
        L::acquire_interruptible_with(Arc::clone(client), name, mode, wait, &mut interrupted).map(L::held)
    });
    match raised {
        // Granted after all, in a race with the handler: given back here, before raising.
        Some(e) => {
            drop(result);
            Err(e)
        }
        None => Ok(result),
    }
}

/// The methods `Client` and `RemoteClient` share, written once: `$class` wraps `Arc<$backend>`
/// in a field `inner`; `$extra` are the class's own methods.
macro_rules! locker_class {
    ($class:ident; $($extra:tt)*) => {
        #[pymethods]
        impl $class {
            /// Locks `name` (str or bytes) and returns its Guard, waiting as long as it takes, or
            /// `timeout` seconds at most (raising Timeout; 0: one try), or not at all with
            /// blocking=False (raising WouldBlock). shared=True takes a shared (read) lock.
            #[pyo3(signature = (name, timeout=None, shared=false, blocking=true))]
            fn lock(
                &self,
                py: Python<'_>,
                name: &Bound<'_, PyAny>,
                timeout: Option<f64>,
                shared: bool,
                blocking: bool,
            ) -> PyResult<Guard> {
                let wait = wait_of(timeout, blocking)?;
                Ok(acquire(py, &self.inner, name, mode_of(shared), wait, false)?.expect("only try_lock gives None"))
            }

            /// The same as `lock` (the name `threading` and `filelock` use).
            #[pyo3(signature = (name, timeout=None, shared=false, blocking=true))]
            fn acquire(
                &self,
                py: Python<'_>,
                name: &Bound<'_, PyAny>,
                timeout: Option<f64>,
                shared: bool,
                blocking: bool,
            ) -> PyResult<Guard> {
                self.lock(py, name, timeout, shared, blocking)
            }

            /// Locks `name` only if that is possible at once: its Guard, or None if it is busy.
            #[pyo3(signature = (name, shared=false))]
            fn try_lock(&self, py: Python<'_>, name: &Bound<'_, PyAny>, shared: bool) -> PyResult<Option<Guard>> {
                acquire(py, &self.inner, name, mode_of(shared), Wait::No, true)
            }

            /// Unlocks `name`, held by this client, whose Guard was lost track of.
            fn unlock(&self, py: Python<'_>, name: &Bound<'_, PyAny>) -> PyResult<()> {
                let bytes = name_bytes(name)?;
                let inner = &self.inner;
                let r = if <$class>::REMOTE { py.detach(|| inner.unlock(bytes)) } else { inner.unlock(bytes) };
                r.map_err(|e| raise(py, e, Some(&name.clone().unbind())))
            }

            $($extra)*
        }
    };
}

// ---- the classes -----------------------------------------------------------------------------

/// A client of a shmlock segment on this machine: one owner of locks.
#[pyclass(module = "pyshmlock", frozen)]
struct Client {
    inner: Arc<Local>,
    segment: String,
}

impl Client {
    const REMOTE: bool = false;
}

locker_class! {
    Client;
    #[new]
    #[pyo3(signature = (segment=None, *, label=None, create=false))]
    fn new(py: Python<'_>, segment: Option<String>, label: Option<String>, create: bool) -> PyResult<Client> {
        let segment = segment.unwrap_or_else(shmlock::shm::default_segment_name);
        let label = label.unwrap_or_else(|| default_label(py));
        let label = truncate(&label, shmlock::owner::LABEL_MAX).to_string();
        let seg = segment.clone();
        let opened = py.detach(move || {
            let table = if create {
                LockTable::create_or_open(&seg, &Capacities::default())?
            } else {
                LockTable::open(&seg)?
            };
            Local::with_table(Arc::new(table), &label)
        });
        let inner = opened.map_err(|e| raise(py, e, None))?;
        Ok(Client {
            inner: Arc::new(inner),
            segment,
        })
    }

    /// The segment's name.
    #[getter]
    fn segment(&self) -> &str {
        &self.segment
    }

    fn __repr__(&self) -> String {
        format!("<pyshmlock.Client segment={:?}>", self.segment)
    }
}

/// A client of a shmlock gateway (`shmlockd`'s TCP listener): one session, one owner.
#[pyclass(module = "pyshmlock", frozen)]
struct RemoteClient {
    inner: Arc<Remote>,
    addr: String,
}

impl RemoteClient {
    const REMOTE: bool = true;
}

locker_class! {
    RemoteClient;
    #[new]
    #[pyo3(signature = (addr, auth_token=None, *, connect_timeout=None))]
    fn new(
        py: Python<'_>,
        addr: String,
        auth_token: Option<String>,
        connect_timeout: Option<f64>,
    ) -> PyResult<RemoteClient> {
        let connect_timeout = match connect_timeout {
            None => None,
            Some(t) => Some(
                Duration::try_from_secs_f64(t)
                    .map_err(|_| PyValueError::new_err("connect_timeout must be a positive number of seconds"))?,
            ),
        };
        let options = ConnectOptions {
            auth_token,
            connect_timeout,
            ..ConnectOptions::default()
        };
        let a = addr.clone();
        let inner = py
            .detach(move || Remote::connect_with(a.as_str(), &options))
            .map_err(|e| raise(py, e, None))?;
        Ok(RemoteClient {
            inner: Arc::new(inner),
            addr,
        })
    }

    /// A round trip to the gateway; returns how long it took, in seconds.
    fn ping(&self, py: Python<'_>) -> PyResult<f64> {
        let inner = &self.inner;
        py.detach(|| inner.ping())
            .map(|d| d.as_secs_f64())
            .map_err(|e| raise(py, e, None))
    }

    /// The gateway's address.
    #[getter]
    fn addr(&self) -> &str {
        &self.addr
    }

    fn __repr__(&self) -> String {
        format!("<pyshmlock.RemoteClient addr={:?}>", self.addr)
    }
}

/// A held lock. Unlocks with `release()`, at the end of its `with` block, or when collected.
#[pyclass(module = "pyshmlock", frozen)]
struct Guard {
    held: Mutex<Option<Held>>,
    name: Py<PyAny>,
    token: u64,
    owner_died: bool,
    shared: bool,
}

impl Guard {
    fn held(&self) -> MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn give_back(&self, py: Python<'_>, held: shmlock::Result<Held>) -> PyResult<()> {
        give_back(py, held, &self.name)
    }
}

/// Unlocks `held` (taken out of its guard or Lock), waiting for a gateway's answer without the
/// GIL; `name` is for the exception.
fn give_back(py: Python<'_>, held: shmlock::Result<Held>, name: &Py<PyAny>) -> PyResult<()> {
    let r = match held {
        Err(e) => Err(e),
        Ok(Held::Local(g)) => g.unlock(),
        Ok(Held::Remote(g)) => py.detach(|| g.unlock()),
    };
    r.map_err(|e| raise(py, e, Some(name)))
}

/// What `__exit__` does with the outcome of its release: a lock lost meanwhile raises NotHeld,
/// unless the block is raising already.
fn exit_outcome(released: PyResult<()>, exc_type: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
    match released {
        Err(e) if exc_type.is_none_or(|t| t.is_none()) => Err(e),
        _ => Ok(false),
    }
}

#[pymethods]
impl Guard {
    /// The fencing token: strictly increasing across the grants of this name. Pass it to the
    /// storage the lock protects, which rejects writes with an older one.
    #[getter]
    fn token(&self) -> u64 {
        self.token
    }

    /// True if the previous holder died holding the lock: check the data it protects.
    #[getter]
    fn owner_died(&self) -> bool {
        self.owner_died
    }

    /// "exclusive" or "shared".
    #[getter]
    fn mode(&self) -> &'static str {
        if self.shared {
            "shared"
        } else {
            "exclusive"
        }
    }

    /// The name, as it was given (str or bytes).
    #[getter]
    fn name(&self, py: Python<'_>) -> Py<PyAny> {
        self.name.clone_ref(py)
    }

    /// True until it is released.
    #[getter]
    fn locked(&self) -> bool {
        self.held().is_some()
    }

    /// True once the lock is known to be gone without a release, so it may be another's: a
    /// RemoteClient whose gateway connection ended (seen at its next request or keep-alive).
    /// A local lock taken away (`shmlock release --force`) shows only at release (NotHeld).
    #[getter]
    fn lost(&self) -> bool {
        self.held().as_ref().is_some_and(Held::lost)
    }

    /// Unlocks. NotHeld if it was released already, or taken away meanwhile (`shmlock release
    /// --force`, a gateway session that ended).
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        let held = self.held().take();
        self.give_back(py, held.ok_or(Error::NotHeld))
    }

    /// The same as `release`.
    fn unlock(&self, py: Python<'_>) -> PyResult<()> {
        self.release(py)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Releases. A lock lost meanwhile raises NotHeld, unless the block is raising already; a
    /// lock released inside the block is fine.
    #[pyo3(signature = (exc_type=None, _exc=None, _tb=None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let Some(held) = self.held().take() else {
            return Ok(false);
        };
        exit_outcome(self.give_back(py, Ok(held)), exc_type)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let name = self
            .name
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| "?".into());
        let state = if self.held().is_some() { "held" } else { "released" };
        format!("<pyshmlock.Guard {name} {} token={} {state}>", self.mode(), self.token)
    }
}

/// The client behind a [`Lock`].
enum Backing {
    Local(Arc<Local>),
    Remote(Arc<Remote>),
}

/// A value touched only with the GIL held, which the `Python` token each access takes proves.
/// Values go in and out whole (no reference escapes), so Python code that runs meanwhile (a
/// finaliser calling back into the same object) never sees it half-changed.
struct GilCell<T>(Cell<T>);

// SAFETY: every access takes a `Python<'_>` token, so it happens with the GIL held, and the GIL
// lets one thread at a time run: this module is built for the limited API (`abi3`), which no
// free-threaded CPython loads (PyO3 refuses to build abi3 for one), so accesses from two threads
// never overlap. `T: Send` because the value may be put in by one thread and taken by another.
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T> GilCell<T> {
    fn new(v: T) -> Self {
        GilCell(Cell::new(v))
    }

    fn replace(&self, _py: Python<'_>, v: T) -> T {
        self.0.replace(v)
    }
}

impl<T: Copy> GilCell<T> {
    fn get(&self, _py: Python<'_>) -> T {
        self.0.get()
    }
}

/// One name on one client, locked and unlocked as often as needed, like `threading.Lock` or
/// `filelock.FileLock`: the name is checked and kept once, and a pair allocates nothing.
#[pyclass(module = "pyshmlock", frozen)]
struct Lock {
    backing: Backing,
    client: Py<PyAny>,
    name: Py<PyAny>,
    bytes: Box<[u8]>,
    mode: Mode,
    timeout: Option<f64>,
    /// What it holds now (the GIL guards it: a wait gives the GIL up, so the lock taken is put
    /// here only once the wait is over).
    held: GilCell<Option<Held>>,
    /// The last grant's.
    token: GilCell<u64>,
    owner_died: GilCell<bool>,
}

impl Lock {
    /// Tries a local lock once, under the GIL, creating no Python object: the guard goes from
    /// the library's answer straight into the cell (each move of it through a wrapping Result
    /// is a store and a reload that stalls; they were a fifth of a pair). The caller has
    /// checked that this Lock holds nothing.
    #[inline]
    fn try_local(&self, py: Python<'_>, c: &Arc<Local>) -> Result<(), Error> {
        let g = Local::acquire_with(Arc::clone(c), &self.bytes, self.mode, Wait::No)?;
        self.token.replace(py, g.token().0);
        self.owner_died.replace(py, g.owner_died());
        self.held.replace(py, Some(Held::Local(g)));
        Ok(())
    }

    /// Takes a local lock that is free: true when it did; false, with nothing changed, for
    /// anything else (busy, held by this Lock, remote, an error), which `take` then does whole.
    #[inline]
    fn take_free(&self, py: Python<'_>) -> bool {
        match &self.backing {
            Backing::Local(c) => !self.is_held(py) && self.try_local(py, c).is_ok(),
            Backing::Remote(_) => false,
        }
    }

    /// Locks with the Lock's timeout (raising Timeout, or WouldBlock for a timeout of 0), and
    /// returns the Lock itself: `__enter__`'s general path (see [`lock_enter`]).
    fn enter(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let this = slf.get();
        let wait = wait_of(this.timeout, true)?;
        if !this.take(slf.py(), wait)? {
            return Err(raise(slf.py(), Error::WouldBlock, Some(&this.name)));
        }
        Ok(slf.clone().unbind())
    }

    fn is_held(&self, py: Python<'_>) -> bool {
        let held = self.held.replace(py, None);
        let is = held.is_some();
        self.held.replace(py, held);
        is
    }

    /// Takes the lock; false when a one-try request found it busy.
    fn take(&self, py: Python<'_>, wait: Wait) -> PyResult<bool> {
        if self.is_held(py) {
            return Err(raise(py, Error::AlreadyHeld, Some(&self.name)));
        }
        let taken = match &self.backing {
            Backing::Local(c) => match self.try_local(py, c) {
                Ok(()) => return Ok(true),
                Err(Error::WouldBlock) if wait == Wait::No => return Ok(false),
                Err(Error::WouldBlock) => wait_for(py, c, &self.bytes, self.mode, wait)?,
                Err(e) => return Err(raise(py, e, Some(&self.name))),
            },
            Backing::Remote(c) => take(py, c, &self.bytes, self.mode, wait)?,
        };
        match taken {
            Ok(held) => {
                let grant = held.grant();
                if let Some(other) = self.held.replace(py, Some(held)) {
                    // Another thread took it through this Lock while this one waited (a
                    // gateway session answers ALREADY_HELD only to a request it sees second).
                    let ours = self.held.replace(py, Some(other));
                    give_back(py, ours.ok_or(Error::NotHeld), &self.name)?;
                    return Err(raise(py, Error::AlreadyHeld, Some(&self.name)));
                }
                self.token.replace(py, grant.token.0);
                self.owner_died.replace(py, grant.owner_died);
                Ok(true)
            }
            Err(Error::WouldBlock) if wait == Wait::No => Ok(false),
            Err(e) => Err(raise(py, e, Some(&self.name))),
        }
    }
}

#[pymethods]
impl Lock {
    /// `Lock(client, name, *, shared=False, timeout=None)`: the lock `name` (str or bytes) of
    /// `client` (a Client or RemoteClient). `timeout` is the default wait of `acquire` and
    /// `with` in seconds (None or negative: as long as it takes; 0: one try).
    #[new]
    #[pyo3(signature = (client, name, *, shared=false, timeout=None))]
    fn new(client: &Bound<'_, PyAny>, name: &Bound<'_, PyAny>, shared: bool, timeout: Option<f64>) -> PyResult<Lock> {
        let backing = if let Ok(c) = client.cast::<Client>() {
            Backing::Local(Arc::clone(&c.get().inner))
        } else if let Ok(c) = client.cast::<RemoteClient>() {
            Backing::Remote(Arc::clone(&c.get().inner))
        } else {
            return Err(PyTypeError::new_err(format!(
                "a Lock's client is a pyshmlock.Client or RemoteClient, not {}",
                client.get_type().name()?
            )));
        };
        wait_of(timeout, true)?;
        // Checked against the segment's limits at the first acquire (BadName).
        let bytes = name_bytes(name)?;
        Ok(Lock {
            backing,
            client: client.clone().unbind(),
            name: name.clone().unbind(),
            bytes: bytes.into(),
            mode: mode_of(shared),
            timeout,
            held: GilCell::new(None),
            token: GilCell::new(0),
            owner_died: GilCell::new(false),
        })
    }

    /// Locks, waiting `timeout` seconds at most (None: the Lock's timeout; negative: as long as
    /// it takes; 0: one try) and raising Timeout when that runs out. Returns True, or False
    /// when blocking=False (or a timeout of 0) found it busy. AlreadyHeld if this Lock holds it.
    ///
    /// (The general path: `acquire` is [`lock_acquire`], which does a call without arguments
    /// itself and calls this for one with arguments.)
    #[pyo3(name = "_acquire", signature = (blocking=true, timeout=None))]
    fn acquire(&self, py: Python<'_>, blocking: bool, timeout: Option<f64>) -> PyResult<bool> {
        let wait = wait_of(timeout.or(self.timeout), blocking)?;
        self.take(py, wait)
    }

    /// Unlocks. NotHeld if this Lock does not hold it, or it was taken away meanwhile.
    ///
    /// (The general path: `release` is [`lock_release`], which unlocks a local lock itself and
    /// calls this for anything else.)
    #[pyo3(name = "_release")]
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        // `give_back`'s match, without putting the guard through a Result first (see `take`).
        let r = match self.held.replace(py, None) {
            Some(Held::Local(g)) => g.unlock(),
            Some(Held::Remote(g)) => py.detach(|| g.unlock()),
            None => Err(Error::NotHeld),
        };
        r.map_err(|e| raise(py, e, Some(&self.name)))
    }

    /// True while this Lock holds it.
    #[getter]
    fn locked(&self, py: Python<'_>) -> bool {
        self.is_held(py)
    }

    /// True once the lock is known to be gone without a release (see Guard.lost).
    #[getter]
    fn lost(&self, py: Python<'_>) -> bool {
        let held = self.held.replace(py, None);
        let lost = held.as_ref().is_some_and(Held::lost);
        self.held.replace(py, held);
        lost
    }

    /// The fencing token of the last grant (0 before the first).
    #[getter]
    fn token(&self, py: Python<'_>) -> u64 {
        self.token.get(py)
    }

    /// True if the previous holder died holding the lock, at the last grant.
    #[getter]
    fn owner_died(&self, py: Python<'_>) -> bool {
        self.owner_died.get(py)
    }

    /// "exclusive" or "shared".
    #[getter]
    fn mode(&self) -> &'static str {
        match self.mode {
            Mode::Shared => "shared",
            _ => "exclusive",
        }
    }

    /// The name, as it was given (str or bytes).
    #[getter]
    fn name(&self, py: Python<'_>) -> Py<PyAny> {
        self.name.clone_ref(py)
    }

    /// The client it locks through.
    #[getter]
    fn client(&self, py: Python<'_>) -> Py<PyAny> {
        self.client.clone_ref(py)
    }

    /// The default wait of `acquire` and `with`, in seconds (None: as long as it takes).
    #[getter]
    fn timeout(&self) -> Option<f64> {
        self.timeout
    }

    /// Releases, as Guard's `__exit__` does. (The general path of `__exit__`, [`lock_exit`].)
    #[pyo3(name = "_exit", signature = (exc_type=None, _exc=None, _tb=None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let Some(held) = self.held.replace(py, None) else {
            return Ok(false);
        };
        exit_outcome(give_back(py, Ok(held), &self.name), exc_type)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let name = self
            .name
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| "?".into());
        let state = if self.is_held(py) { "held" } else { "not held" };
        format!("<pyshmlock.Lock {name} {} {state}>", self.mode())
    }
}

// ---- Lock's acquire, release, __enter__ and __exit__ as CPython's own methods --------------
//
// A PyO3 method costs ~35 ns a call before its body runs (its trampoline counts the GIL in a
// thread-local, checks the deferred reference pool and the type, and, under abi3 for 3.9, parses
// arguments from a tuple and a dict): two of them were more than `multiprocessing.Lock`'s whole
// pair. These four are plain `PyMethodDef`s put on the class (method descriptors, as C extensions
// make them), whose bodies do the common case without Python objects, exceptions or PyO3's
// accounting, and hand anything else to the general code (the PyO3 methods `_acquire`,
// `_release` and `_exit`, and `Lock::enter`), which does the whole of it (that case tried
// again from the start).

/// `self` of a `Lock` method.
///
/// # Safety
/// With the GIL held, `slf` is a live `Lock`: CPython's method descriptor checks `self`'s type
/// before it calls the method, and `Lock` cannot be subclassed (no `subclass` in its pyclass).
unsafe fn lock_of<'a>(py: Python<'a>, slf: *mut ffi::PyObject) -> Borrowed<'a, 'a, Lock> {
    // SAFETY: as the caller promises: a live object of type `Lock`, borrowed for the call.
    unsafe { Borrowed::from_ptr(py, slf).cast_unchecked::<Lock>() }
}

/// Calls `self.<name>(*args, **kwargs)` (`args` null: no arguments): the general path.
///
/// # Safety
/// With the GIL held; `slf` live; `args` null or a tuple, `kwargs` null or a dict.
unsafe fn general(
    slf: *mut ffi::PyObject,
    name: &CStr,
    args: *mut ffi::PyObject,
    kwargs: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the caller's promises are these functions' preconditions; `m` is a new reference
    // (or null with an exception set), released after the call.
    unsafe {
        let m = ffi::PyObject_GetAttrString(slf, name.as_ptr());
        if m.is_null() {
            return std::ptr::null_mut();
        }
        let r = if args.is_null() {
            ffi::PyObject_CallObject(m, std::ptr::null_mut())
        } else {
            ffi::PyObject_Call(m, args, kwargs)
        };
        ffi::Py_DECREF(m);
        r
    }
}

/// Runs `f`, turning a panic into Python's `PanicException` (as PyO3's own methods do): no
/// unwinding leaves an `extern "C"` function.
fn guarded(f: impl FnOnce() -> *mut ffi::PyObject) -> *mut ffi::PyObject {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Python::attach(|py| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic in pyshmlock".into());
            pyo3::panic::PanicException::new_err(message).restore(py);
            std::ptr::null_mut()
        }),
    }
}

/// Runs `f` attached through PyO3 (which then counts the GIL as held, so the objects `f` makes
/// and drops are accounted as in any PyO3 method): its value as a new reference, or null with
/// its exception set.
fn attached(f: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>>) -> *mut ffi::PyObject {
    Python::attach(|py| match f(py) {
        Ok(o) => o.into_ptr(),
        Err(e) => {
            e.restore(py);
            std::ptr::null_mut()
        }
    })
}

/// A new reference to `o` (`True`, `None`: immortal or not, as the running CPython has them).
///
/// # Safety
/// With the GIL held; `o` live.
unsafe fn new_ref(o: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: the caller's promise.
    unsafe { ffi::Py_INCREF(o) };
    o
}

/// The number of positional arguments of a METH_VARARGS | METH_KEYWORDS call, or None when it
/// has keyword arguments.
///
/// # Safety
/// With the GIL held; `args` a tuple, `kwargs` null or a dict (as CPython passes them).
unsafe fn positional_only(args: *mut ffi::PyObject, kwargs: *mut ffi::PyObject) -> Option<ffi::Py_ssize_t> {
    // SAFETY: the caller's promise.
    unsafe { (kwargs.is_null() || ffi::PyDict_Size(kwargs) == 0).then(|| ffi::PyTuple_Size(args)) }
}

/// `Lock.acquire(blocking=True, timeout=None)` (METH_VARARGS | METH_KEYWORDS): called with no
/// arguments, a local lock found free is taken here, and a wait is `_acquire`'s body called
/// directly; a call with arguments is `_acquire`'s.
unsafe extern "C" fn lock_acquire(
    slf: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
    kwargs: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    guarded(|| {
        // SAFETY: CPython calls a method with the GIL held, `self` checked to be a `Lock`
        // (`lock_of`), `args` a tuple and `kwargs` null or a dict.
        unsafe {
            let py = Python::assume_attached();
            if positional_only(args, kwargs) != Some(0) {
                return general(slf, c"_acquire", args, kwargs);
            }
            let this = lock_of(py, slf);
            let lock = this.get();
            if lock.take_free(py) {
                return new_ref(ffi::Py_True());
            }
            // Busy (or anything else): `_acquire()`'s body, without looking it up and parsing
            // its (absent) arguments.
            attached(|py| {
                let taken = lock.take(py, wait_of(lock.timeout, true)?)?;
                Ok(PyBool::new(py, taken).to_owned().into_any().unbind())
            })
        }
    })
}

/// `Lock.release()` (METH_NOARGS): a local lock is unlocked here; anything else (a remote
/// lock, nothing held) is `_release`'s.
unsafe extern "C" fn lock_release(slf: *mut ffi::PyObject, _noargs: *mut ffi::PyObject) -> *mut ffi::PyObject {
    guarded(|| {
        // SAFETY: as in `lock_acquire`.
        unsafe {
            let py = Python::assume_attached();
            let this = lock_of(py, slf);
            let lock = this.get();
            match lock.held.replace(py, None) {
                Some(Held::Local(g)) => match g.unlock() {
                    Ok(()) => new_ref(ffi::Py_None()),
                    // Taken away meanwhile (NotHeld), or the segment's own failure.
                    Err(e) => attached(|py| Err(raise(py, e, Some(&lock.name)))),
                },
                other => {
                    lock.held.replace(py, other);
                    general(slf, c"_release", std::ptr::null_mut(), std::ptr::null_mut())
                }
            }
        }
    })
}

/// `with lock:`'s `Lock.__enter__()` (METH_NOARGS): a local lock found free is taken here and
/// the Lock returned; anything else is `Lock::enter`'s.
unsafe extern "C" fn lock_enter(slf: *mut ffi::PyObject, _noargs: *mut ffi::PyObject) -> *mut ffi::PyObject {
    guarded(|| {
        // SAFETY: as in `lock_acquire`.
        unsafe {
            let py = Python::assume_attached();
            let this = lock_of(py, slf);
            if this.get().take_free(py) {
                return new_ref(slf);
            }
            attached(|_| Lock::enter(&this).map(Py::into_any))
        }
    })
}

/// `Lock.__exit__(exc_type=None, exc=None, tb=None)` (METH_VARARGS | METH_KEYWORDS): a local
/// lock is unlocked here, as `_exit` would (`exit_outcome`); anything else is `_exit`'s.
unsafe extern "C" fn lock_exit(
    slf: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
    kwargs: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    guarded(|| {
        // SAFETY: as in `lock_acquire`; `PyTuple_GetItem` of an index below the tuple's size
        // is a borrowed reference to a live item, kept alive by the tuple for the call.
        unsafe {
            let py = Python::assume_attached();
            let this = lock_of(py, slf);
            let lock = this.get();
            if let Some(n @ 0..=3) = positional_only(args, kwargs) {
                match lock.held.replace(py, None) {
                    Some(Held::Local(g)) => {
                        return match g.unlock() {
                            Ok(()) => new_ref(ffi::Py_False()),
                            Err(e) => attached(|py| {
                                let exc_type = (n > 0).then(|| Borrowed::from_ptr(py, ffi::PyTuple_GetItem(args, 0)));
                                let released = Err(raise(py, e, Some(&lock.name)));
                                let suppress = exit_outcome(released, exc_type.as_deref())?;
                                Ok(PyBool::new(py, suppress).to_owned().into_any().unbind())
                            }),
                        };
                    }
                    other => {
                        lock.held.replace(py, other);
                    }
                }
            }
            general(slf, c"_exit", args, kwargs)
        }
    })
}

/// A `PyMethodDef` for the class `Lock`, made once and never freed (CPython keeps a pointer to
/// it in the method descriptor, which the class keeps).
fn method_def(
    name: &'static CStr,
    meth: ffi::PyMethodDefPointer,
    flags: c_int,
    doc: &'static CStr,
) -> *mut ffi::PyMethodDef {
    Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: meth,
        ml_flags: flags,
        ml_doc: doc.as_ptr(),
    }))
}

/// Puts `acquire`, `release`, `__enter__` and `__exit__` on the class `Lock` (over nothing: its
/// PyO3 methods are named `_acquire`, `_release` and `_exit`).
fn add_lock_methods(py: Python<'_>) -> PyResult<()> {
    let ty = py.get_type::<Lock>();
    let defs = [
        (
            "acquire",
            method_def(
                c"acquire",
                ffi::PyMethodDefPointer {
                    PyCFunctionWithKeywords: lock_acquire,
                },
                ffi::METH_VARARGS | ffi::METH_KEYWORDS,
                c"acquire($self, /, blocking=True, timeout=None)\n--\n\nLocks, waiting `timeout` seconds \
                at most (None: the Lock's timeout; negative: as long as it takes; 0: one try) and raising \
                Timeout when that runs out. Returns True, or False when blocking=False (or a timeout of 0) \
                found it busy. AlreadyHeld if this Lock holds it.",
            ),
        ),
        (
            "release",
            method_def(
                c"release",
                ffi::PyMethodDefPointer {
                    PyCFunction: lock_release,
                },
                ffi::METH_NOARGS,
                c"release($self, /)\n--\n\nUnlocks. NotHeld if this Lock does not hold it, or it was \
                taken away meanwhile.",
            ),
        ),
        (
            "__enter__",
            method_def(
                c"__enter__",
                ffi::PyMethodDefPointer {
                    PyCFunction: lock_enter,
                },
                ffi::METH_NOARGS,
                c"__enter__($self, /)\n--\n\nLocks with the Lock's timeout (raising Timeout, or \
                WouldBlock for a timeout of 0), and returns the Lock itself.",
            ),
        ),
        (
            "__exit__",
            method_def(
                c"__exit__",
                ffi::PyMethodDefPointer {
                    PyCFunctionWithKeywords: lock_exit,
                },
                ffi::METH_VARARGS | ffi::METH_KEYWORDS,
                c"__exit__($self, exc_type=None, exc=None, tb=None, /)\n--\n\nUnlocks; a lock \
                taken away meanwhile raises NotHeld, unless the block is raising already.",
            ),
        ),
    ];
    for (name, def) in defs {
        // SAFETY: the GIL is held (`py`); `ty` is a live type object and `def` a valid
        // PyMethodDef that lives for ever. The result is a new reference or null with an
        // exception set, which `from_owned_ptr_or_err` takes either way.
        let descr = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyDescr_NewMethod(ty.as_type_ptr(), def))? };
        ty.setattr(name, descr)?;
    }
    Ok(())
}

/// The module.
#[pymodule]
fn _pyshmlock(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_class::<RemoteClient>()?;
    m.add_class::<Guard>()?;
    m.add_class::<Lock>()?;
    add_lock_methods(m.py())?;
    m.add("DEFAULT_SEGMENT", shmlock::shm::DEFAULT_SEGMENT)?;
    m.add("INTERRUPT_CHECK", shmlock::lock::INTERRUPT_CHECK.as_secs_f64())?;
    Ok(())
}
