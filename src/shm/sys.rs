//! The syscall shim: mmap/munmap, the shared (non-private) futex, and the fork counter.
//!
//! Everything else that touches the OS goes through `nix`'s safe wrappers.

#![allow(clippy::disallowed_methods)] // The one module allowed to call mmap and raw syscalls (.clippy.toml).

use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Once;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

/// Whether [`map_shared`] populates the page tables (see `shm::populate_on_map`).
static POPULATE: AtomicBool = AtomicBool::new(true);

/// Sets whether [`map_shared`] populates the page tables from now on in this process.
pub(super) fn set_populate(on: bool) {
    POPULATE.store(on, Ordering::Relaxed);
}

/// Maps `len` bytes of `fd` shared, read-write, with page tables populated up front (unless
/// [`set_populate`] said otherwise) so that the lock path never takes a page fault on first touch.
pub(super) fn map_shared(fd: impl AsFd, len: usize) -> Result<NonNull<u8>, Errno> {
    let len = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
    let populate = match POPULATE.load(Ordering::Relaxed) {
        true => MapFlags::MAP_POPULATE,
        false => MapFlags::empty(),
    };
    // SAFETY: we ask the kernel for a fresh mapping at an address of its choosing (no MAP_FIXED),
    // so no existing Rust object is aliased or invalidated.
    let p = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED | populate,
            fd,
            0,
        )?
    };
    Ok(p.cast())
}

/// Maps `len` bytes of anonymous shared memory (zeroed; shared with children after fork).
pub(super) fn map_anonymous(len: usize) -> Result<NonNull<u8>, Errno> {
    let len = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
    // SAFETY: as in `map_shared`: a fresh mapping, no MAP_FIXED, nothing aliased.
    let p = unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
        )?
    };
    Ok(p.cast())
}

/// Unmaps a mapping made by [`map_shared`] or [`map_anonymous`].
///
/// # Safety
/// - `ptr`/`len` describe exactly one live mapping made by this module;
/// - no reference into it outlives this call.
pub(super) unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: the caller guarantees the bullets above. An error here can only mean a bad
    // argument, which the bullets exclude; there is nothing useful to do with it in a Drop.
    let _ = unsafe { munmap(ptr.cast(), len) };
}

/// Outcome of a futex wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FutexWait {
    /// Woken by a FUTEX_WAKE (or spuriously): re-check the condition.
    Woken,
    /// The word no longer held the expected value when the kernel looked.
    Changed,
    /// The timeout elapsed.
    TimedOut,
}

/// FUTEX_WAIT (shared, never FUTEX_PRIVATE_FLAG) on `word` while it holds `expected`.
///
/// `timeout` is relative and measured on CLOCK_MONOTONIC by the kernel. EINTR counts as a
/// wake-up: callers always loop and re-check their condition.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> FutexWait {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live AtomicU32 (aligned 4-byte word) for the whole call; the kernel only
    // reads it. `ts_ptr` is null or points at a timespec on this stack frame with tv_nsec < 1e9.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            0usize,
            0u32,
        )
    };
    if r == 0 {
        return FutexWait::Woken;
    }
    match Errno::last() {
        Errno::EAGAIN => FutexWait::Changed,
        Errno::ETIMEDOUT => FutexWait::TimedOut,
        // EINTR, and anything unexpected: report a wake-up so the caller re-checks.
        _ => FutexWait::Woken,
    }
}

/// FUTEX_WAKE (shared) of up to `n` waiters on `word`; returns how many were woken.
pub(crate) fn futex_wake(word: &AtomicU32, n: u32) -> usize {
    // SAFETY: `word` is a live AtomicU32; FUTEX_WAKE only uses its address as a key.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n as i32,
            0usize,
            0usize,
            0u32,
        )
    };
    r.max(0) as usize
}

/// Reads clock `id` in nanoseconds (0 if the clock is unavailable, which CLOCK_MONOTONIC never is).
#[inline]
pub(crate) fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec on this stack frame; clock_gettime writes only it.
    let r = unsafe { libc::clock_gettime(id, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A pidfd for process `pid` (Linux 5.3+): it becomes readable when the process exits, even if
/// nobody waits for it, and it never names a later process that reuses the pid.
pub(crate) fn pidfd_open(pid: u32) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).map_err(|_| Errno::ESRCH)?;
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: on success the syscall returned a new file descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
}

/// Hints the CPU to bring the cache line holding `r` into the cache (a prefetch: it never
/// faults and orders no load or store; but on x86 a locked instruction issued while it is in
/// flight may wait for it, so issue it where no atomic RMW follows at once). A no-op off x86_64.
#[inline(always)]
pub(crate) fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 only hints the cache hierarchy; it reads no memory architecturally and
    // cannot fault, and `r` is a live reference anyway. SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((r as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// Forks this process has gone through (as seen in the child: each child's count is one more
/// than its parent's was at the fork).
static FORKS: AtomicU32 = AtomicU32::new(0);

/// Counts a fork in the child. Runs in the child between `fork()` and its return, where only
/// async-signal-safe work is allowed: one atomic add is.
extern "C" fn count_fork_in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// This process's fork count: a handle that records it when opened knows, by comparing, that it
/// is being used in a child of the process that opened it (whatever called `fork()`: Rust,
/// Python's `os.fork`, `multiprocessing`, C). The first call installs the `pthread_atfork`
/// handler; forks before it are not counted, and none need to be (no handle existed yet).
/// A raw `clone` or `vfork` syscall that bypasses libc's `fork()` is not seen.
#[inline]
pub(crate) fn forks() -> u32 {
    static WATCH: Once = Once::new();
    WATCH.call_once(|| {
        // SAFETY: pthread_atfork only records the three handler pointers; the child handler is
        // a plain `extern "C" fn` without arguments that does only an atomic add. It stays valid
        // as long as this code is mapped: in a shared object (the C library, the Python
        // module) glibc's pthread_atfork registers it under that object's `__dso_handle` and
        // removes it when the object is unloaded. A failure (ENOMEM) leaves forks uncounted,
        // which a debug build would rather say than hide.
        let r = unsafe { libc::pthread_atfork(None, None, Some(count_fork_in_child)) };
        debug_assert_eq!(r, 0, "pthread_atfork failed");
    });
    FORKS.load(Ordering::Relaxed)
}

/// [`forks`] without installing the handler: for a handle's checks on the lock path, once
/// [`forks`] has installed it (when the handle was opened). No `Once` test, whose out-of-line
/// call would make the callers keep their values in callee-saved registers.
#[inline(always)]
pub(crate) fn forks_watched() -> u32 {
    FORKS.load(Ordering::Relaxed)
}
