//! libshmlock: shmlock's C ABI, a thin layer over the Rust API (`Client`, `RemoteClient`, the
//! `Locker` contract and its guards). The header, `include/shmlock.h`, is generated from
//! this file by cbindgen (`bindings/c/cbindgen.toml`); the doc comments here are the header's.
//!
//! One client type, `shmlock_client`, stands for both backends (a local segment or a gateway),
//! as the `Locker` trait does in Rust: C code written once runs on both, and every call but
//! `shmlock_open` / `shmlock_connect` is the same.
//!
//! Every entry point catches panics (`SHMLOCK_PANIC`), checks its pointers
//! (`SHMLOCK_INVALID_ARGUMENT`), and records a failure's message and errno thread-locally.

#![allow(non_camel_case_types)]

mod status;

use std::ffi::{c_char, c_void, CStr};
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use shmlock_core::remote::{ConnectOptions, RemoteClient, RemoteLockGuard};
use shmlock_core::{Client, LocalGuard, LockTable, Locker, Mode, Wait};

pub use status::shmlock_status;
use status::{invalid, record, Failure};

/// The version of this ABI: changed whenever a type or a function's signature changes
/// incompatibly. Compare it with `shmlock_abi_version()` at run time.
pub const SHMLOCK_ABI_VERSION: u32 = 1;

/// Lock mode: one holder at a time.
pub const SHMLOCK_EXCLUSIVE: u32 = 1;
/// Lock mode: any number of shared holders at once, none while an exclusive one holds.
pub const SHMLOCK_SHARED: u32 = 2;

/// Timeout: do not wait; `SHMLOCK_WOULD_BLOCK` if the lock is not free at once.
pub const SHMLOCK_NO_WAIT: i64 = 0;
/// Timeout: wait as long as it takes. (Any negative timeout waits forever.)
pub const SHMLOCK_FOREVER: i64 = -1;

/// What a grant tells its holder (in the manner of libdlm's lock status block): filled by
/// `shmlock_lock()` on success and by `shmlock_guard_grant()`. The caller owns it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmlock_grant {
    /// The fencing token of this grant: strictly increasing across the grants of one name.
    pub token: u64,
    /// The mode granted: `SHMLOCK_EXCLUSIVE` or `SHMLOCK_SHARED`.
    pub mode: u32,
    /// True if the previous holder died (or was forced out) holding the lock: check the data it
    /// protects. Information only; the lock is not poisoned.
    pub owner_died: bool,
}

/// A client: one owner of locks, in a local segment (`shmlock_open`) or through a gateway
/// (`shmlock_connect`). Opaque; free it with `shmlock_close()`.
pub struct shmlock_client {
    backend: Backend,
}

enum Backend {
    Local(Local),
    Remote(RemoteClient),
}

/// A local client and the spare allocation of its guard handles.
struct Local {
    client: Client,
    home: spare::Home,
}

/// A held lock (from `shmlock_lock()`). Opaque; `shmlock_unlock()` releases it and frees the
/// handle.
//
// Never made as such: a handle is the address of the guard itself, a `LocalHeld` or (with bit 0
// set) a `RemoteHeld` (see `Handle`). No tag word in front of the guard: the C loop's unlock
// reads the guard right after the lock wrote it, and a copy from an offset other than the one
// written misses the store buffer's forwarding (see `spare`).
pub struct shmlock_guard {
    _opaque: [u8; 0],
}

/// A held local lock, as a `shmlock_guard` points to it (see `spare`).
type LocalHeld = LocalGuard<ClientRef<Client>>;
/// A held remote lock, as a `shmlock_guard` (bit 0 set) points to it.
type RemoteHeld = RemoteLockGuard<ClientRef<RemoteClient>>;

/// A guard handle decoded: the guard it points to (a local one through `spare`).
enum Handle {
    Local(NonNull<shmlock_guard>),
    Remote(NonNull<RemoteHeld>),
}

/// The tag of a remote guard's handle (both guards are aligned to at least 2).
const REMOTE_TAG: usize = 1;

const _: () = assert!(std::mem::align_of::<LocalHeld>() > REMOTE_TAG);
const _: () = assert!(std::mem::align_of::<RemoteHeld>() > REMOTE_TAG);

impl Handle {
    #[inline(always)]
    fn remote(g: RemoteHeld) -> *mut shmlock_guard {
        Box::into_raw(Box::new(g)).map_addr(|a| a | REMOTE_TAG).cast()
    }

    /// The guard a non-null handle points to.
    #[inline(always)]
    fn of(p: NonNull<shmlock_guard>) -> Handle {
        if p.addr().get() & REMOTE_TAG == 0 {
            Handle::Local(p)
        } else {
            // SAFETY: a tagged address is a Box's address plus 1, so not 0 once untagged.
            Handle::Remote(unsafe { NonNull::new_unchecked(p.as_ptr().map_addr(|a| a & !REMOTE_TAG).cast()) })
        }
    }
}

/// A guard's reference to its client: the C form of a borrow (the Rust API's `LockGuard<'a>`),
/// which costs nothing per lock where an `Arc` clone and drop cost two atomic read-modify-writes
/// (as much as the lock itself). The header's rule that makes it sound: a client is not closed
/// while guards of it are held.
struct ClientRef<C>(NonNull<C>);

impl<C> Clone for ClientRef<C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for ClientRef<C> {}

impl<C> Deref for ClientRef<C> {
    type Target = C;

    #[inline(always)]
    fn deref(&self) -> &C {
        // SAFETY: points into a `shmlock_client` box, which the caller keeps open (not passed to
        // shmlock_close) while this guard is held: the header's rule for shmlock_close.
        unsafe { self.0.as_ref() }
    }
}

// SAFETY: a shared reference to a `Sync` client (`Client` and `RemoteClient` are Sync), as
// `&C: Send` is.
unsafe impl<C: Sync> Send for ClientRef<C> {}

/// An interrupt check for `shmlock_lock_interruptible()`: returns true to give the wait up.
pub type shmlock_interrupt_fn = Option<unsafe extern "C" fn(arg: *mut c_void) -> bool>;

// The threads promise of the header: a client may be shared by threads, a lock unlocked from
// any thread.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<shmlock_client>();
    send::<LocalHeld>();
    send::<RemoteHeld>();
};

/// Runs an entry point's body: its failure or its panic becomes the status (and this thread's
/// last error).
#[inline(always)]
fn entry(f: impl FnOnce() -> Result<(), Failure>) -> shmlock_status {
    // Every arm moves the result out, so no drop of it is left on the success path.
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => shmlock_status::SHMLOCK_OK,
        Ok(Err(e)) => failed(e),
        Err(payload) => panicked(payload),
    }
}

/// An entry point's failure, recorded: out of line, so that the success path of a hot entry
/// point (lock, unlock) keeps a small frame.
#[cold]
#[inline(never)]
fn failed(e: Failure) -> shmlock_status {
    record(e)
}

/// An entry point's panic, recorded (out of line, as `failed`).
#[cold]
#[inline(never)]
fn panicked(payload: Box<dyn std::any::Any + Send>) -> shmlock_status {
    record(Failure::Panic(panic_text(payload.as_ref())))
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// A C string argument as UTF-8; None for a null pointer.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that lives for `'a`.
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: not null, and NUL-terminated and alive by the caller's promise.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// The bytes `(ptr, len)`: empty for (NULL, 0).
///
/// # Safety
/// `ptr` is null with `len` 0, or valid for reads of `len` bytes for `'a`.
unsafe fn bytes<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    if ptr.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(invalid(format!("{what} is NULL with a length of {len}")))
        };
    }
    if len > isize::MAX as usize {
        return Err(invalid(format!("{what} length {len} is too large")));
    }
    // SAFETY: not null, `len` readable bytes by the caller's promise, and `len <= isize::MAX`.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// The label a client gets when none is given: the program's file name.
fn program_label() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default()
}

/// The mode of a `SHMLOCK_EXCLUSIVE` / `SHMLOCK_SHARED` code; None for any other value.
#[inline(always)]
fn mode_known(mode: u32) -> Option<Mode> {
    match mode {
        SHMLOCK_EXCLUSIVE => Some(Mode::Exclusive),
        SHMLOCK_SHARED => Some(Mode::Shared),
        _ => None,
    }
}

fn mode_of(mode: u32) -> Result<Mode, Failure> {
    mode_known(mode).ok_or_else(|| invalid(format!("mode {mode} (use SHMLOCK_EXCLUSIVE or SHMLOCK_SHARED)")))
}

fn mode_code(mode: Mode) -> u32 {
    match mode {
        Mode::Exclusive => SHMLOCK_EXCLUSIVE,
        Mode::Shared => SHMLOCK_SHARED,
    }
}

#[inline(always)]
fn wait_of(timeout_ns: i64) -> Wait {
    match timeout_ns {
        0 => Wait::No,
        t if t < 0 => Wait::Forever,
        t => Wait::for_duration(Duration::from_nanos(t as u64)),
    }
}

/// Stores a new client at `out`.
///
/// # Safety
/// `out` is valid for a write.
unsafe fn give_client(out: *mut *mut shmlock_client, backend: Backend) {
    let c = Box::into_raw(Box::new(shmlock_client { backend }));
    // SAFETY: the caller checked `out` is not null; it is writable by its promise.
    unsafe { out.write(c) };
}

/// Returns `SHMLOCK_ABI_VERSION` as this library was built with it.
///
/// Thread-safe, never blocks, never fails.
#[no_mangle]
pub extern "C" fn shmlock_abi_version() -> u32 {
    SHMLOCK_ABI_VERSION
}

/// Returns the library's version, e.g. "0.1.0" (a static string).
///
/// Thread-safe, never blocks, never fails.
#[no_mangle]
pub extern "C" fn shmlock_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Opens a client on the local segment `segment` (e.g. "/shmlock"), which must exist (`shmlockd`
/// creates it): one new owner in the lock table, shown by `shmlock locks` under `label`.
///
/// - `segment`: a NUL-terminated name, or NULL for `$SHMLOCK_SEGMENT`, else "/shmlock".
/// - `label`: a NUL-terminated label (up to 24 bytes are kept), or NULL for the program's name.
/// - `out`: where the new client is stored; set to NULL on failure.
///
/// Thread-safe. Does not block on locks (it maps the segment and registers an owner).
///
/// Returns `SHMLOCK_OK`; `SHMLOCK_SEGMENT_MISSING` (no such segment: start `shmlockd`);
/// `SHMLOCK_BAD_SEGMENT_NAME`; `SHMLOCK_TABLE_FULL` (no owner record left);
/// `SHMLOCK_SEGMENT_INVALID`, `SHMLOCK_SEGMENT_VERSION`, `SHMLOCK_SEGMENT_REFUSED`,
/// `SHMLOCK_SEGMENT_RETIRED`, `SHMLOCK_CORRUPT`; `SHMLOCK_IO` (see `shmlock_last_os_error()`);
/// `SHMLOCK_INVALID_ARGUMENT` (`out` is NULL, or a string is not UTF-8).
///
/// # Safety
/// `segment` and `label` are NULL or NUL-terminated strings; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn shmlock_open(
    segment: *const c_char,
    label: *const c_char,
    out: *mut *mut shmlock_client,
) -> shmlock_status {
    entry(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: checked not null; writable by the caller's promise.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: NULL or NUL-terminated, by the caller's promise.
        let segment = unsafe { opt_str(segment, "segment") }?;
        // SAFETY: as above.
        let label = unsafe { opt_str(label, "label") }?;
        let segment = segment
            .map(str::to_string)
            .unwrap_or_else(shmlock_core::shm::default_segment_name);
        let label = label.map(str::to_string).unwrap_or_else(program_label);
        let table = Arc::new(LockTable::open(&segment)?);
        let client = Client::with_table(table, &label)?;
        // SAFETY: `out` checked above.
        unsafe {
            give_client(
                out,
                Backend::Local(Local {
                    client,
                    home: spare::Home::new(),
                }),
            )
        };
        Ok(())
    })
}

/// Connects a client to the `shmlockd` gateway at `addr` (e.g. "127.0.0.1:7411"): one session,
/// one owner, whose locks the gateway releases when the client is closed, when this process
/// dies, or when the connection breaks.
///
/// - `addr`: a NUL-terminated "host:port".
/// - `auth_token`: the gateway's shared secret (NUL-terminated), or NULL for none.
/// - `out`: where the new client is stored; set to NULL on failure.
///
/// Thread-safe. Blocks while it connects and reads the greeting (and authenticates).
///
/// Returns `SHMLOCK_OK`; `SHMLOCK_CONNECTION` (cannot resolve, connect, or the gateway closed);
/// `SHMLOCK_AUTH` (a wrong token); `SHMLOCK_PROTOCOL_VERSION`; `SHMLOCK_INVALID_ARGUMENT`
/// (`addr` or `out` is NULL, or a string is not UTF-8).
///
/// # Safety
/// `addr` and `auth_token` are NULL or NUL-terminated strings; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn shmlock_connect(
    addr: *const c_char,
    auth_token: *const c_char,
    out: *mut *mut shmlock_client,
) -> shmlock_status {
    entry(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: checked not null; writable by the caller's promise.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: NULL or NUL-terminated, by the caller's promise.
        let addr = unsafe { opt_str(addr, "addr") }?.ok_or_else(|| invalid("addr is NULL"))?;
        // SAFETY: as above.
        let token = unsafe { opt_str(auth_token, "auth_token") }?;
        let options = ConnectOptions {
            auth_token: token.map(str::to_string),
            ..Default::default()
        };
        let client = RemoteClient::connect_with(addr, &options)?;
        // SAFETY: `out` checked above.
        unsafe { give_client(out, Backend::Remote(client)) };
        Ok(())
    })
}

/// Closes a client and frees it; NULL is ignored. Unlock its guards first: closing releases
/// whatever the client still holds (its owner leaves the table), and the guards of a closed
/// client are dangling, not to be used again (not even unlocked; their small allocations are
/// not reclaimed). A guard borrows its client, as in the Rust API, so a lock costs no reference
/// count.
///
/// In a child made by `fork()`, closing the parent's client frees the child's copy and releases
/// nothing of the parent's.
///
/// Thread-safe for distinct clients; no other call may use `client` during or after this one.
/// A remote client waits for its background thread to stop (a moment).
///
/// # Safety
/// `client` is NULL or a client from `shmlock_open()` / `shmlock_connect()` not closed yet; no
/// guard of it is used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmlock_close(client: *mut shmlock_client) {
    let _ = entry(|| {
        if !client.is_null() {
            // SAFETY: made by Box::into_raw in give_client and not freed yet (caller's promise).
            drop(unsafe { Box::from_raw(client) });
        }
        Ok(())
    });
}

/// The one lock path of `shmlock_lock()` and `shmlock_lock_interruptible()`.
///
/// # Safety
/// As `shmlock_lock()`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lock_impl(
    client: *const shmlock_client,
    name: *const u8,
    name_len: usize,
    mode: u32,
    timeout_ns: i64,
    interrupted: Option<&mut dyn FnMut() -> bool>,
    grant: *mut shmlock_grant,
    out: *mut *mut shmlock_guard,
) -> Result<(), Failure> {
    if out.is_null() {
        return Err(invalid("lock (the out pointer) is NULL"));
    }
    // SAFETY: checked not null; writable by the caller's promise.
    unsafe { out.write(std::ptr::null_mut()) };
    if client.is_null() {
        return Err(invalid("client is NULL"));
    }
    // SAFETY: a live client by the caller's promise; only shared access is taken.
    let client = unsafe { &*client };
    // SAFETY: (NULL, 0) or `name_len` readable bytes, by the caller's promise.
    let name = unsafe { bytes(name, name_len, "name") }?;
    let mode = mode_of(mode)?;
    let wait = wait_of(timeout_ns);
    // One small function per path, so the local one, the hot one, is compiled as tight as the
    // Rust API's own loop (one large function of all four gets the table's helpers out of line).
    // The handle and the grant are written there, not returned: a returned pair goes through a
    // stack copy whose reads (8 bytes over the grant's 4- and 1-byte fields) wait on the stores.
    let to = Out { grant, lock: out };
    match (&client.backend, interrupted) {
        (Backend::Local(l), None) => lock_local(l, name, mode, wait, to),
        (Backend::Remote(c), None) => lock_remote(c, name, mode, wait, to),
        (Backend::Local(l), Some(f)) => lock_local_interruptible(l, name, mode, wait, f, to),
        (Backend::Remote(c), Some(f)) => lock_remote_interruptible(c, name, mode, wait, f, to),
    }
}

/// Where a lock path stores what it made: `grant` (NULL: not wanted) and `lock` (checked not
/// null), both writable by the caller's promise.
#[derive(Clone, Copy)]
struct Out {
    grant: *mut shmlock_grant,
    lock: *mut *mut shmlock_guard,
}

impl Out {
    #[inline(always)]
    fn put(self, handle: *mut shmlock_guard, g: shmlock_core::Grant) {
        if !self.grant.is_null() {
            // SAFETY: not null, and writable by the promise of shmlock_lock's caller.
            unsafe { self.grant.write(grant_of(g)) };
        }
        // SAFETY: checked not null by lock_impl; writable by the caller's promise.
        unsafe { self.lock.write(handle) };
    }
}

/// A local guard's memory: the handle given to C. Each client has one guard cell inline, for one
/// lock at a time of one thread: the first that locks through it (by its thread pointer, the
/// cell's owner). The owner's lock takes the cell and its unlock, from any thread, gives it back,
/// with an atomic flag but no read-modify-write; other guards (other threads, or more than one
/// lock held at once) are allocated, and freed by their unlock. So a loop of lock and unlock pairs
/// does not call malloc and free (they cost as much as the rest of the pair), nor the
/// `__tls_get_addr` of a thread-local spare (two calls per pair from a shared library).
///
/// The guard goes into its cell and out again as whole 8-byte words, each written by one store
/// and read by one load of the same address and size. The unlock of a C loop reads the guard a
/// few dozen cycles after the lock wrote it, while the stores are still in the store buffer: a
/// load that spans two stores (a 16-byte copy over 4-byte fields, as the compiler copies a
/// struct) cannot be forwarded from them and waits until they reach the cache, which cost as much
/// as the lock's own atomic (measured with `perf annotate`). Volatile accesses, so the compiler
/// neither merges nor splits them.
mod spare {
    use super::{shmlock_guard, LocalHeld};
    use std::cell::UnsafeCell;
    use std::mem::{align_of, size_of, MaybeUninit};
    use std::ptr::{addr_of, NonNull};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

    /// A guard as words (any bytes, padding included, may be held by `MaybeUninit`).
    type Words = [MaybeUninit<u64>; WORDS];
    const WORDS: usize = size_of::<LocalHeld>() / 8;
    const _: () = assert!(size_of::<LocalHeld>() == size_of::<Words>());
    const _: () = assert!(align_of::<LocalHeld>() == align_of::<Words>());

    /// Bit 1 of a local handle: the guard is in its client's inline cell (else in a `Box<Words>`).
    /// Bit 0 is the remote tag (`super::REMOTE_TAG`), clear here.
    const INLINE: usize = 2;
    const _: () = assert!(align_of::<Words>() > INLINE | super::REMOTE_TAG);

    /// One client's inline guard cell.
    #[repr(C)]
    pub(super) struct Home {
        /// The guard of the owner's lock while `in_use`. First, so that the cell's address is the
        /// `Home`'s.
        cell: UnsafeCell<Words>,
        /// Set (Relaxed) by the owner when its lock takes the cell; cleared (Release) by the
        /// unlock that gives it back, after reading the guard out; read (Acquire) by the owner
        /// before taking it. Only the owner sets it and only the guard's unlock clears it, so
        /// neither needs a read-modify-write.
        in_use: AtomicBool,
        /// The thread pointer of the thread that may take the cell, 0 until one claims it (once,
        /// by a compare-exchange; Relaxed: nothing is published through it).
        owner: AtomicUsize,
    }

    // SAFETY: the cell is written only by the owner, one thread for the `Home`'s whole life
    // (live threads have distinct thread pointers; one is reused only by a thread made after the
    // one that had it ended, an end that happens-before the reuse, as the reuse of its memory
    // does), while `in_use` is clear; then read by the one unlock of the guard written there,
    // which clears `in_use` with Release after it; the owner's Acquire load orders that read
    // before the next write. The rest is atomic.
    unsafe impl Sync for Home {}

    impl Home {
        pub(super) const fn new() -> Home {
            Home {
                cell: UnsafeCell::new([MaybeUninit::uninit(); WORDS]),
                in_use: AtomicBool::new(false),
                owner: AtomicUsize::new(0),
            }
        }

        /// May the calling thread take the cell now (claiming it if nobody has)?
        #[inline(always)]
        fn free_for_me(&self) -> bool {
            let me = this_thread();
            let mine = match self.owner.load(Relaxed) {
                o if o == me => true,
                0 => self.owner.compare_exchange(0, me, Relaxed, Relaxed).is_ok(),
                _ => false,
            };
            mine && !self.in_use.load(Acquire)
        }
    }

    /// The calling thread's id, never 0: its thread pointer, which the ELF TLS ABI keeps at
    /// `%fs:0` on x86-64 (what `pthread_self()` returns there, without the call).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn this_thread() -> usize {
        let tp: usize;
        // SAFETY: reads the word at %fs:0, the thread control block's pointer to itself, which
        // every thread of an x86-64 Linux process has (glibc and musl alike).
        unsafe {
            std::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags, pure));
        }
        tp
    }

    /// The calling thread's id: `pthread_self()`, never 0.
    #[cfg(not(target_arch = "x86_64"))]
    #[inline(always)]
    fn this_thread() -> usize {
        // SAFETY: no preconditions; it cannot fail.
        (unsafe { libc::pthread_self() }) as usize
    }

    /// Memory for a guard of the client whose cell is `home`, not filled yet: the cell, if it is
    /// free for this thread (else `reserve_box`). Taken once the lock is had, right before
    /// `fill` (see `local_handle`); it calls nothing.
    #[inline(always)]
    pub(super) fn reserve_cell(home: &Home) -> Option<Reserved> {
        if home.free_for_me() {
            home.in_use.store(true, Relaxed);
            let base: *const Home = home;
            // SAFETY: `base` points to a live `Home`; the cell is its first field, inside an
            // `UnsafeCell`, so writable through a pointer made from a shared reference.
            let cell = unsafe { UnsafeCell::raw_get(addr_of!((*base).cell)) };
            // SAFETY: a field of a live `Home`, not null.
            return Some(Reserved(unsafe { NonNull::new_unchecked(cell) }, INLINE));
        }
        None
    }

    /// Memory for a guard that does not get its client's cell: a new allocation.
    #[inline(always)]
    pub(super) fn reserve_box() -> Reserved {
        Reserved(NonNull::from(Box::leak(Box::new([MaybeUninit::uninit(); WORDS]))), 0)
    }

    /// Reserved memory (from `reserve_cell` or `reserve_box`), empty, and its tag; `fill` it.
    pub(super) struct Reserved(NonNull<Words>, usize);

    /// Moves `g` into its reserved memory: the handle of the guard.
    #[inline(always)]
    pub(super) fn fill(r: Reserved, g: LocalHeld) -> *mut shmlock_guard {
        // SAFETY: `LocalHeld` and `Words` have one size (asserted above), and `Words` holds any
        // bytes.
        let w: Words = unsafe { std::mem::transmute::<LocalHeld, Words>(g) };
        let words = r.0.cast::<MaybeUninit<u64>>();
        for (i, w) in w.into_iter().enumerate() {
            // SAFETY: `r` is `WORDS` writable words owned here (the free cell, or a new box).
            unsafe { words.add(i).write_volatile(w) };
        }
        r.0.as_ptr().map_addr(|a| a | r.1).cast()
    }

    /// The guard of a local handle, to read.
    ///
    /// # Safety
    /// `h` is a live local handle (from `fill`, not taken yet); the reference does not outlive
    /// it.
    #[inline(always)]
    pub(super) unsafe fn peek<'a>(h: NonNull<shmlock_guard>) -> &'a LocalHeld {
        // SAFETY: untagged, the address of the guard `fill` wrote, alive (the caller's promise).
        unsafe { &*h.as_ptr().map_addr(|a| a & !INLINE).cast::<LocalHeld>() }
    }

    /// Is the guard of local handle `h` in its client's cell (else in a box)?
    #[inline(always)]
    pub(super) fn is_inline(h: NonNull<shmlock_guard>) -> bool {
        h.addr().get() & INLINE != 0
    }

    /// Moves the guard out of a local handle, and gives its memory back.
    ///
    /// # Safety
    /// `h` is a live local handle (from `fill`, not taken yet), not used again; its client is
    /// open.
    #[inline(always)]
    pub(super) unsafe fn take(h: NonNull<shmlock_guard>) -> LocalHeld {
        let tag = h.addr().get() & INLINE;
        // SAFETY: untagged, the address of the guard `fill` wrote (not null: a cell or a box).
        let p = unsafe { NonNull::new_unchecked(h.as_ptr().map_addr(|a| a & !INLINE).cast::<Words>()) };
        let words = p.cast::<MaybeUninit<u64>>();
        let mut w: Words = [MaybeUninit::uninit(); WORDS];
        for (i, w) in w.iter_mut().enumerate() {
            // SAFETY: `p` holds the guard `fill` wrote (the caller's promise): `WORDS` words as
            // written.
            *w = unsafe { words.add(i).read_volatile() };
        }
        // SAFETY: the memory of `h`, whose guard was just read out; its client is open.
        unsafe { release(p, tag) };
        // SAFETY: the bytes of the guard `fill` was given, moved out once (the caller's
        // promise).
        unsafe { std::mem::transmute::<Words, LocalHeld>(w) }
    }

    /// Gives guard memory back: clears the cell's flag, or frees the box.
    ///
    /// # Safety
    /// `p` with `tag` is a cell of an open client or a `Box<Words>`, owned by the caller and
    /// holding no guard.
    #[inline(always)]
    unsafe fn release(p: NonNull<Words>, tag: usize) {
        if tag == INLINE {
            // SAFETY: the cell is the first field of its `Home` (repr(C)), which is alive, and
            // `p` was made from a pointer to the whole `Home` (in `reserve`).
            let home = unsafe { &*p.as_ptr().cast::<Home>() };
            home.in_use.store(false, Release);
        } else {
            // SAFETY: a `Box<Words>` made by `reserve` and owned by the caller.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
    }
}

/// The handle of a local lock just had: its memory is reserved only now, after the lock's CAS,
/// so that neither the cell's pointer nor its flag's store sits in the lock path ahead of the CAS
/// (a locked instruction, which waits for every earlier store to drain), and a failed lock
/// reserves nothing.
#[inline(always)]
fn local_handle(r: Result<LocalHeld, shmlock_core::Error>, home: &spare::Home, to: Out) -> Result<(), Failure> {
    match r {
        Ok(g) => {
            match spare::reserve_cell(home) {
                Some(cell) => {
                    let grant = g.grant();
                    to.put(spare::fill(cell, g), grant);
                }
                None => boxed_handle(g, to),
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The handle of a local lock that does not get its client's cell, in a box of its own. Out of
/// line, with the guard given to it: allocating is a call, and a guard kept across it inline
/// would take callee-saved registers, which the lock path would then save and restore on every
/// call (stores ahead of the lock's CAS).
#[cold]
#[inline(never)]
fn boxed_handle(g: LocalHeld, to: Out) {
    let grant = g.grant();
    to.put(spare::fill(spare::reserve_box(), g), grant);
}

#[inline(always)]
fn remote_handle(g: RemoteHeld, to: Out) {
    let grant = g.grant();
    to.put(Handle::remote(g), grant);
}

#[inline(always)]
fn lock_local_body(l: &Local, name: &[u8], mode: Mode, wait: Wait, to: Out) -> Result<(), Failure> {
    local_handle(
        Client::acquire_with(ClientRef((&l.client).into()), name, mode, wait),
        &l.home,
        to,
    )
}

#[inline(never)]
fn lock_local(l: &Local, name: &[u8], mode: Mode, wait: Wait, to: Out) -> Result<(), Failure> {
    lock_local_body(l, name, mode, wait, to)
}

#[inline(never)]
fn lock_remote(c: &RemoteClient, name: &[u8], mode: Mode, wait: Wait, to: Out) -> Result<(), Failure> {
    remote_handle(RemoteClient::acquire_with(ClientRef(c.into()), name, mode, wait)?, to);
    Ok(())
}

#[inline(never)]
fn lock_local_interruptible(
    l: &Local,
    name: &[u8],
    mode: Mode,
    wait: Wait,
    f: &mut dyn FnMut() -> bool,
    to: Out,
) -> Result<(), Failure> {
    local_handle(
        Client::acquire_interruptible_with(ClientRef((&l.client).into()), name, mode, wait, f),
        &l.home,
        to,
    )
}

#[inline(never)]
fn lock_remote_interruptible(
    c: &RemoteClient,
    name: &[u8],
    mode: Mode,
    wait: Wait,
    f: &mut dyn FnMut() -> bool,
    to: Out,
) -> Result<(), Failure> {
    let g = RemoteClient::acquire_interruptible_with(ClientRef(c.into()), name, mode, wait, f)?;
    remote_handle(g, to);
    Ok(())
}

#[inline(always)]
fn unlock_local(g: LocalHeld) -> Result<(), Failure> {
    Ok(g.unlock()?)
}

#[inline(never)]
fn unlock_remote(g: RemoteHeld) -> Result<(), Failure> {
    Ok(g.unlock()?)
}

/// Locks the name `(name, name_len)` in `mode`, waiting at most `timeout_ns` nanoseconds:
/// `SHMLOCK_NO_WAIT` (0) tries once, `SHMLOCK_FOREVER` (or any negative value) waits as long as
/// it takes. Waiters are granted in FIFO order. A name is any bytes, 1 to the segment's
/// `max_name_len` of them (64 by default).
///
/// - `grant`: NULL, or filled with the grant's token, mode and owner-died flag on success.
/// - `lock`: where the handle of the held lock is stored (NULL on failure); `shmlock_unlock()`
///   releases it, before the client is closed.
///
/// The lock is held by the client (one owner): the same client asking again for a name it holds
/// gets `SHMLOCK_ALREADY_HELD` at once, from any thread, never a self-deadlock. Two threads that
/// must exclude each other open a client each.
///
/// Thread-safe: any thread may lock through a shared client. Blocks up to `timeout_ns` (a remote
/// client also waits for the gateway's answer). A remote timeout is sent in whole milliseconds,
/// rounded up.
///
/// Returns `SHMLOCK_OK`; `SHMLOCK_WOULD_BLOCK` (no wait, busy); `SHMLOCK_TIMED_OUT` (the message
/// names the holder); `SHMLOCK_ALREADY_HELD`; `SHMLOCK_BAD_NAME` (empty, too long, or through a
/// gateway with a space or control byte); `SHMLOCK_TABLE_FULL`; `SHMLOCK_FORKED` (the client
/// belongs to the parent of this forked process: open one of your own); `SHMLOCK_CANCELLED`;
/// `SHMLOCK_CORRUPT`; remote only: `SHMLOCK_CONNECTION`, `SHMLOCK_AUTH`, `SHMLOCK_LIMIT`,
/// `SHMLOCK_REMOTE`; `SHMLOCK_INVALID_ARGUMENT` (`client` or `lock` NULL, `name` NULL with a
/// length, an unknown `mode`).
///
/// # Safety
/// `client` is NULL or a live client; `name` is NULL with `name_len` 0 or points to `name_len`
/// readable bytes; `grant` and `lock` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn shmlock_lock(
    client: *const shmlock_client,
    name: *const u8,
    name_len: usize,
    mode: u32,
    timeout_ns: i64,
    grant: *mut shmlock_grant,
    lock: *mut *mut shmlock_guard,
) -> shmlock_status {
    // The common call (an exclusive lock on a local client, arguments that pass) runs the local
    // path here; the rest (a shared lock, which the lock word cannot grant anyway, a remote
    // client, or a bad argument, which lock_impl names) the general one, out of line. With the
    // mode a constant, the path keeps one value fewer (a stack slot stored on every call).
    if !lock.is_null() && !client.is_null() && !name.is_null() && name_len <= isize::MAX as usize {
        // SAFETY: a live client by the caller's promise; only shared access is taken.
        if let Backend::Local(l) = unsafe { &(*client).backend } {
            if mode == SHMLOCK_EXCLUSIVE {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    // SAFETY: not null, `name_len <= isize::MAX` (both checked), and readable by
                    // the caller's promise.
                    let name = unsafe { std::slice::from_raw_parts(name, name_len) };
                    lock_local_body(l, name, Mode::Exclusive, wait_of(timeout_ns), Out { grant, lock })
                }));
                // `lock` is NULL on failure: stored only then (a grant stores the handle), so
                // that no store of it comes ahead of the lock's CAS, a locked instruction that
                // waits for every earlier store to drain.
                return match r {
                    Ok(Ok(())) => shmlock_status::SHMLOCK_OK,
                    Ok(Err(e)) => {
                        // SAFETY: checked not null; writable by the caller's promise.
                        unsafe { lock.write(std::ptr::null_mut()) };
                        failed(e)
                    }
                    Err(payload) => {
                        // SAFETY: as above.
                        unsafe { lock.write(std::ptr::null_mut()) };
                        panicked(payload)
                    }
                };
            }
        }
    }
    // SAFETY: the caller's promises.
    unsafe { lock_general(client, name, name_len, mode, timeout_ns, grant, lock) }
}

/// `shmlock_lock()` on a remote client, or with an argument that does not pass: out of line, so
/// that it does not widen the frame of the common call.
///
/// # Safety
/// As `shmlock_lock()`.
#[cold]
#[inline(never)]
unsafe fn lock_general(
    client: *const shmlock_client,
    name: *const u8,
    name_len: usize,
    mode: u32,
    timeout_ns: i64,
    grant: *mut shmlock_grant,
    lock: *mut *mut shmlock_guard,
) -> shmlock_status {
    // SAFETY: the caller's promises are lock_impl's.
    entry(|| unsafe { lock_impl(client, name, name_len, mode, timeout_ns, None, grant, lock) })
}

/// Like `shmlock_lock()`, but while it waits it calls `interrupted(arg)` every 50 ms at most
/// (from the waiting thread, holding nothing of the library's); when that returns true the
/// request is withdrawn, nothing is held, and the result is `SHMLOCK_INTERRUPTED`. Meant for
/// programs that must see a signal while a thread waits: a handler sets a flag, the callback
/// reads it. A local request keeps its place in the queue across the checks.
///
/// `interrupted` must not unwind or `longjmp` out. Same threads, blocking and statuses as
/// `shmlock_lock()`, plus `SHMLOCK_INTERRUPTED`, and `SHMLOCK_INVALID_ARGUMENT` for a NULL
/// `interrupted`.
///
/// # Safety
/// As `shmlock_lock()`; `interrupted` is NULL or a function that may be called with `arg` from
/// this thread during the call.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn shmlock_lock_interruptible(
    client: *const shmlock_client,
    name: *const u8,
    name_len: usize,
    mode: u32,
    timeout_ns: i64,
    interrupted: shmlock_interrupt_fn,
    arg: *mut c_void,
    grant: *mut shmlock_grant,
    lock: *mut *mut shmlock_guard,
) -> shmlock_status {
    entry(|| {
        let Some(f) = interrupted else {
            if !lock.is_null() {
                // SAFETY: not null; writable by the caller's promise.
                unsafe { lock.write(std::ptr::null_mut()) };
            }
            return Err(invalid("interrupted is NULL"));
        };
        // SAFETY: the caller gives a function callable with `arg` on this thread now.
        let mut check = || unsafe { f(arg) };
        // SAFETY: the caller's promises are lock_impl's.
        unsafe { lock_impl(client, name, name_len, mode, timeout_ns, Some(&mut check), grant, lock) }
    })
}

/// A critical section for `shmlock_with_lock()`: called with the caller's `arg` and the grant
/// while the lock is held; what it returns is handed back through `shmlock_with_lock()`'s
/// `result`.
pub type shmlock_locked_fn = Option<unsafe extern "C" fn(arg: *mut c_void, grant: *const shmlock_grant) -> i32>;

/// Locks like `shmlock_lock()`, calls `locked(arg, &grant)` while the lock is held, then unlocks:
/// a scoped lock that cannot be left held, with no handle. `locked` must return (not `longjmp` or
/// unwind out); it may call the library, but not unlock this lock.
///
/// - `result`: NULL, or where `locked`'s return value is stored when it ran.
///
/// Thread safety and blocking as `shmlock_lock()`, plus the time `locked` takes.
///
/// Returns `SHMLOCK_OK` (`locked` ran and the lock was released); the statuses of
/// `shmlock_lock()` when the lock was not had (`locked` did not run); `SHMLOCK_NOT_HELD` (it ran,
/// but the lock was taken away meanwhile); `SHMLOCK_INVALID_ARGUMENT` (`client` or `locked`
/// NULL, `name` NULL with a length, an unknown `mode`).
///
/// # Safety
/// `client` is NULL or a live client; `name` is NULL with `name_len` 0 or points to `name_len`
/// readable bytes; `locked` is NULL or a function that may be called with `arg` on this thread
/// during the call; `result` is NULL or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn shmlock_with_lock(
    client: *const shmlock_client,
    name: *const u8,
    name_len: usize,
    mode: u32,
    timeout_ns: i64,
    locked: shmlock_locked_fn,
    arg: *mut c_void,
    result: *mut i32,
) -> shmlock_status {
    // The common call (a local client, arguments that pass) in one frame here, with_local
    // inlined; the rest (a remote client, or a bad argument, which with_lock_general names) out
    // of line, as in shmlock_lock.
    if let Some(f) = locked {
        if !client.is_null() && !name.is_null() && name_len <= isize::MAX as usize {
            // SAFETY: a live client by the caller's promise; only shared access is taken.
            if let Backend::Local(l) = unsafe { &(*client).backend } {
                if let Some(m) = mode_known(mode) {
                    return entry(|| {
                        // SAFETY: not null, `name_len <= isize::MAX` (both checked), and readable
                        // by the caller's promise.
                        let name = unsafe { std::slice::from_raw_parts(name, name_len) };
                        // SAFETY: the caller gives a function callable with `arg` on this thread
                        // now.
                        let run = |g: &shmlock_grant| unsafe { f(arg, g) };
                        let r = with_local(&l.client, name, m, wait_of(timeout_ns), run)?;
                        if !result.is_null() {
                            // SAFETY: not null, and writable by the caller's promise.
                            unsafe { result.write(r) };
                        }
                        Ok(())
                    });
                }
            }
        }
    }
    // SAFETY: the caller's promises.
    unsafe { with_lock_general(client, name, name_len, mode, timeout_ns, locked, arg, result) }
}

/// `shmlock_with_lock()` on a remote client, or with an argument that does not pass: out of
/// line, so that it does not widen the frame of the common call.
///
/// # Safety
/// As `shmlock_with_lock()`.
#[cold]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
unsafe fn with_lock_general(
    client: *const shmlock_client,
    name: *const u8,
    name_len: usize,
    mode: u32,
    timeout_ns: i64,
    locked: shmlock_locked_fn,
    arg: *mut c_void,
    result: *mut i32,
) -> shmlock_status {
    entry(|| {
        let Some(f) = locked else {
            return Err(invalid("locked is NULL"));
        };
        if client.is_null() {
            return Err(invalid("client is NULL"));
        }
        // SAFETY: a live client by the caller's promise; only shared access is taken.
        let client = unsafe { &*client };
        // SAFETY: (NULL, 0) or `name_len` readable bytes, by the caller's promise.
        let name = unsafe { bytes(name, name_len, "name") }?;
        let mode = mode_of(mode)?;
        let wait = wait_of(timeout_ns);
        // SAFETY: the caller gives a function callable with `arg` on this thread now.
        let run = |g: &shmlock_grant| unsafe { f(arg, g) };
        let r = match &client.backend {
            Backend::Local(l) => with_local(&l.client, name, mode, wait, run)?,
            Backend::Remote(c) => with_remote(c, name, mode, wait, run)?,
        };
        if !result.is_null() {
            // SAFETY: not null, and writable by the caller's promise.
            unsafe { result.write(r) };
        }
        Ok(())
    })
}

fn grant_of(g: shmlock_core::Grant) -> shmlock_grant {
    shmlock_grant {
        token: g.token.0,
        mode: mode_code(g.mode),
        owner_died: g.owner_died,
    }
}

/// The scoped lock on a local client: the guard stays in this frame, never in memory of the
/// caller's. Inlined into `shmlock_with_lock`'s common call: one frame, one set of saved
/// registers (each save a store ahead of the lock's CAS).
#[inline(always)]
fn with_local(
    c: &Client,
    name: &[u8],
    mode: Mode,
    wait: Wait,
    run: impl FnOnce(&shmlock_grant) -> i32,
) -> Result<i32, Failure> {
    let g = c.acquire(name, mode, wait)?;
    let r = run(&grant_of(g.grant()));
    g.unlock()?;
    Ok(r)
}

#[inline(never)]
fn with_remote(
    c: &RemoteClient,
    name: &[u8],
    mode: Mode,
    wait: Wait,
    run: impl FnOnce(&shmlock_grant) -> i32,
) -> Result<i32, Failure> {
    let g = c.acquire(name, mode, wait)?;
    let r = run(&grant_of(g.grant()));
    g.unlock()?;
    Ok(r)
}

/// Unlocks a held lock and frees its handle, whatever the result (do not use `lock` again).
///
/// Thread-safe: any thread may unlock a lock, but only one call may use a given handle. Does not
/// block locally; a remote client waits for the gateway's answer.
///
/// Returns `SHMLOCK_OK`; `SHMLOCK_NOT_HELD` (the lock was taken away meanwhile:
/// `shmlock release --force`, a remote session that ended); `SHMLOCK_FORKED` (called in a child
/// made by `fork()` on its parent's lock: the parent's lock stays held, the child's copy of the
/// handle is freed); remote only: `SHMLOCK_CONNECTION`; `SHMLOCK_INVALID_ARGUMENT` (`lock` is
/// NULL).
///
/// # Safety
/// `lock` is NULL or a handle from `shmlock_lock()` not unlocked yet.
#[no_mangle]
pub unsafe extern "C" fn shmlock_unlock(lock: *mut shmlock_guard) -> shmlock_status {
    // The common call, a local guard, in a function of its own; the rest out of line.
    match NonNull::new(lock).map(Handle::of) {
        // SAFETY: a live local handle, not unlocked yet, of an open client (the caller's
        // promises).
        Some(Handle::Local(p)) => unsafe { unlock_local_entry(p) },
        // SAFETY: a live remote handle, not unlocked yet (the caller's promise).
        Some(Handle::Remote(p)) => unsafe { unlock_remote_entry(p) },
        None => unlock_null(),
    }
}

/// `extern "C"`, as the other two paths of `shmlock_unlock`: none can unwind (`entry` catches),
/// so `shmlock_unlock` needs no frame (not even the push that aligns one) and jumps to each.
#[cold]
#[inline(never)]
extern "C" fn unlock_null() -> shmlock_status {
    entry(|| Err(invalid("lock is NULL")))
}

/// `shmlock_unlock()` of a local guard: a guard in its client's cell here, a boxed one out of
/// line. Freeing a box is a call, and the guard read out before it would be kept across it in
/// callee-saved registers, which this function would then save and restore (stores ahead of the
/// release's CAS, a locked instruction that waits for earlier stores to drain). `extern "C"` (it
/// cannot unwind: `entry` catches), so that `shmlock_unlock` can jump to it.
///
/// # Safety
/// `p` is a live local handle made by spare::fill, not unlocked yet, of an open client.
#[inline(never)]
unsafe extern "C" fn unlock_local_entry(p: NonNull<shmlock_guard>) -> shmlock_status {
    if spare::is_inline(p) {
        // SAFETY: the caller's promises.
        entry(|| unlock_local(unsafe { spare::take(p) }))
    } else {
        // SAFETY: the caller's promises.
        unsafe { unlock_boxed_entry(p) }
    }
}

/// `shmlock_unlock()` of a local guard in a box of its own (see `unlock_local_entry`).
///
/// # Safety
/// As `unlock_local_entry`.
#[inline(never)]
unsafe extern "C" fn unlock_boxed_entry(p: NonNull<shmlock_guard>) -> shmlock_status {
    // SAFETY: the caller's promises.
    entry(|| unlock_local(unsafe { spare::take(p) }))
}

/// `shmlock_unlock()` of a remote guard.
///
/// # Safety
/// `p` is a live guard boxed by Handle::remote, not unlocked yet; the box is freed here.
#[cold]
#[inline(never)]
unsafe extern "C" fn unlock_remote_entry(p: NonNull<RemoteHeld>) -> shmlock_status {
    entry(|| {
        // SAFETY: the caller's promise.
        let g = unsafe { Box::from_raw(p.as_ptr()) };
        unlock_remote(*g)
    })
}

/// Fills `grant` with what the grant of a held lock said (token, mode, owner-died flag).
///
/// Thread-safe; never blocks. Returns `SHMLOCK_OK`, or `SHMLOCK_INVALID_ARGUMENT` (a NULL
/// argument).
///
/// # Safety
/// `lock` is NULL or a live handle; `grant` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn shmlock_guard_grant(lock: *const shmlock_guard, grant: *mut shmlock_grant) -> shmlock_status {
    entry(|| {
        if lock.is_null() || grant.is_null() {
            return Err(invalid("lock or grant is NULL"));
        }
        // SAFETY: not null; a live handle by the caller's promise.
        let g = match Handle::of(unsafe { NonNull::new_unchecked(lock.cast_mut()) }) {
            // SAFETY: a live guard (the caller's promise), only read.
            Handle::Local(p) => unsafe { spare::peek(p) }.grant(),
            // SAFETY: as above.
            Handle::Remote(p) => unsafe { p.as_ref() }.grant(),
        };
        // SAFETY: a writable grant, by the caller's promise.
        unsafe { grant.write(grant_of(g)) };
        Ok(())
    })
}

/// True if a held lock is known to be gone without an unlock, so that it may be another's now:
/// a remote guard whose gateway connection ended (the client saw it end at a request, or at a
/// keep-alive exchange of its background thread), when the gateway released the session's locks.
/// Stop using what the lock protects; `shmlock_unlock()` still frees the handle. False for a
/// local guard (a local lock taken away, by `shmlock release --force`, shows only when unlocking:
/// `SHMLOCK_NOT_HELD`), and for NULL. The Rust API's `Guard::lost`.
///
/// Thread-safe; never blocks; cannot fail.
///
/// # Safety
/// `lock` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmlock_guard_lost(lock: *const shmlock_guard) -> bool {
    let Some(lock) = NonNull::new(lock.cast_mut()) else {
        return false;
    };
    catch_unwind(|| match Handle::of(lock) {
        // SAFETY: a live guard (the caller's promise), only read.
        Handle::Local(p) => shmlock_core::Guard::lost(unsafe { spare::peek(p) }),
        // SAFETY: as above.
        Handle::Remote(p) => shmlock_core::Guard::lost(unsafe { p.as_ref() }),
    })
    .unwrap_or(false)
}

/// Copies the message of this thread's last failed call into `buf` (`len` bytes), cut to fit and
/// always NUL-terminated when `len > 0`. Returns the message's full length without the NUL (as
/// `snprintf` does), so a caller can size a buffer: `shmlock_last_error_message(NULL, 0) + 1`.
/// An empty message (0) if no call on this thread has failed.
///
/// Thread-safe (each thread has its own last error; successful calls leave it as it was). Never
/// blocks.
///
/// # Safety
/// `buf` is NULL with `len` 0, or writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmlock_last_error_message(buf: *mut c_char, len: usize) -> usize {
    // SAFETY: the caller's promise is copy_message's.
    catch_unwind(|| unsafe { status::copy_message(buf, len) }).unwrap_or(0)
}

/// The OS error (an errno value) of this thread's last failed call, where it had one
/// (`SHMLOCK_IO`); else 0. The library never sets `errno` itself.
///
/// Thread-safe; never blocks.
#[no_mangle]
pub extern "C" fn shmlock_last_os_error() -> i32 {
    catch_unwind(status::last_os_error).unwrap_or(0)
}

/// The name of a status, e.g. "SHMLOCK_TIMED_OUT" (a static string); "SHMLOCK_UNKNOWN" for a
/// value this library does not know.
///
/// Thread-safe; never blocks.
#[no_mangle]
pub extern "C" fn shmlock_status_name(status: i32) -> *const c_char {
    status::name_of(status).as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soname_carries_the_abi_version() {
        let build = include_str!("../build.rs");
        assert!(build.contains(&format!("\"libshmlock.so.{SHMLOCK_ABI_VERSION}\"")));
    }

    #[test]
    fn a_panic_is_a_status_and_a_message() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let s = entry(|| panic!("boom {}", 42));
        std::panic::set_hook(prev);
        assert_eq!(s, shmlock_status::SHMLOCK_PANIC);
        let mut buf = [0 as c_char; 128];
        // SAFETY: `buf` has 128 writable bytes.
        let n = unsafe { shmlock_last_error_message(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: NUL-terminated by shmlock_last_error_message.
        let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        assert!(n > 0 && msg.contains("boom 42"), "{msg}");
    }

    #[test]
    fn timeouts_map_to_waits() {
        assert_eq!(wait_of(SHMLOCK_NO_WAIT), Wait::No);
        assert_eq!(wait_of(SHMLOCK_FOREVER), Wait::Forever);
        assert_eq!(wait_of(i64::MIN), Wait::Forever);
        assert!(matches!(wait_of(1), Wait::Until(_)));
        // Beyond what an Instant can hold: forever, not a panic.
        assert!(matches!(wait_of(i64::MAX), Wait::Until(_) | Wait::Forever));
    }
}
