//! The bench's only unsafe code: shared mappings of `/dev/shm` objects it makes itself (the
//! start/stop control block and the pthread peer's mutex array), robust process-shared pthread
//! mutexes, flock(2), CPU pinning and the open-files limit.
//!
//! shmlock itself maps memory only through `shmlock::shm`; the bench cannot, because its peers'
//! objects (`pthread_mutex_t`) are not shmlock records. So this module carries its own
//! `#![allow(unsafe_code)]` and one `#[allow(clippy::disallowed_methods)]` on [`SharedMap::map`].
//!
//! # The mapping contract
//! A [`SharedMap`] is a `MAP_SHARED`, read-write mapping of a whole `/dev/shm` object of `len`
//! bytes (`len > 0`), page aligned, alive from `map` until `Drop` unmaps it; nothing else in this
//! process unmaps it. The creator sizes the object with `ftruncate`, so every byte starts zero.
//! Other processes (the bench's workers) map the same object and touch it only through the
//! atomics of [`Control`] or through pthread calls on [`MutexArray`] slots.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use anyhow::{bail, Context, Result};
use nix::fcntl::OFlag;
use nix::sys::mman::{self, MapFlags, ProtFlags};
use nix::sys::stat::Mode;

/// A shared, read-write mapping of a whole `/dev/shm` object (see the module docs).
pub(crate) struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

impl SharedMap {
    /// Creates `/dev/shm{name}` (which must not exist) of `len` zero bytes and maps it.
    pub(crate) fn create(name: &str, len: usize) -> Result<SharedMap> {
        let fd = mman::shm_open(
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .with_context(|| format!("shm_open {name} (create)"))?;
        let file = File::from(fd);
        let made = file
            .set_len(len as u64)
            .with_context(|| format!("ftruncate {name} to {len} bytes"))
            .and_then(|()| Self::map(&file, len).with_context(|| format!("mmap {name}")));
        if made.is_err() {
            let _ = Self::unlink(name);
        }
        made
    }

    /// Maps the existing object `/dev/shm{name}`, whole.
    pub(crate) fn open(name: &str) -> Result<SharedMap> {
        let fd = mman::shm_open(name, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .with_context(|| format!("shm_open {name}"))?;
        let file = File::from(fd);
        let len = file.metadata().with_context(|| format!("fstat {name}"))?.len();
        let len = usize::try_from(len).with_context(|| format!("{name} is {len} bytes"))?;
        Self::map(&file, len).with_context(|| format!("mmap {name}"))
    }

    /// Removes `/dev/shm{name}`; mappings stay valid until dropped.
    pub(crate) fn unlink(name: &str) -> nix::Result<()> {
        mman::shm_unlink(name)
    }

    #[allow(
        clippy::disallowed_methods,
        reason = "the bench's own objects are not shmlock records; see the module docs"
    )]
    fn map(file: &File, len: usize) -> Result<SharedMap> {
        let Some(nz) = NonZeroUsize::new(len) else {
            bail!("object is empty");
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr None) overlaps no Rust object; the
        // fd is open and at least `len` bytes long (we sized it, or `len` came from fstat). The
        // mapping outlives the fd, as mmap(2) allows, and is unmapped only by `Drop`.
        let ptr = unsafe {
            mman::mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file,
                0,
            )
        }?;
        Ok(SharedMap { ptr: ptr.cast(), len })
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// `&T` at the start of the mapping, if `T` fits and needs no more than page alignment.
    ///
    /// Only for `T` made of atomics (valid when all bytes are zero, shared through `&`).
    fn head<T: ZeroValid>(&self) -> Option<&T> {
        if size_of::<T>() > self.len || align_of::<T>() > 4096 {
            return None;
        }
        // SAFETY: the mapping is page aligned, at least size_of::<T>() long and alive for the
        // borrow of `self` (module contract); `T: ZeroValid` is valid for any bytes it can
        // hold (zero at creation, later only written through its atomics), and is accessed
        // only through `&`, so sharing it with other processes is the same as sharing atomics
        // between threads.
        Some(unsafe { self.ptr.cast::<T>().as_ref() })
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, which nothing else unmaps,
        // and no borrow of it outlives `&self` (every accessor borrows `self`).
        let _ = unsafe { mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// Types that are valid when all bytes are zero and only have atomic (interior) mutability.
///
/// # Safety
/// Implementors must be `repr(C)`, contain only atomics (and padding), and hold no pointers.
unsafe trait ZeroValid {}

/// A cache line of its own for `T`.
#[repr(C, align(64))]
pub(crate) struct Line<T>(pub(crate) T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The start barrier, stop flag and shared counter of a multi-process run.
#[repr(C)]
pub(crate) struct Control {
    /// Workers that are set up and waiting for `go`.
    pub(crate) ready: Line<AtomicU32>,
    /// Set to 1 by the parent: start the timed loop.
    pub(crate) go: Line<AtomicU32>,
    /// Set to 1 by the parent: stop a duration-bound loop.
    pub(crate) stop: Line<AtomicU32>,
    /// Incremented (load + store, not an atomic RMW) inside the contention critical section:
    /// at the end it equals the total grants only if the lock excluded.
    pub(crate) counter: Line<AtomicU64>,
}

// SAFETY: repr(C), only atomics and alignment padding, no pointers.
unsafe impl ZeroValid for Control {}

/// A mapped [`Control`] block.
pub(crate) struct ControlMap(SharedMap);

impl ControlMap {
    /// Creates `/dev/shm{name}` holding a zeroed [`Control`].
    pub(crate) fn create(name: &str) -> Result<ControlMap> {
        Ok(ControlMap(SharedMap::create(name, size_of::<Control>())?))
    }

    /// Maps an existing control block.
    pub(crate) fn open(name: &str) -> Result<ControlMap> {
        let m = SharedMap::open(name)?;
        if m.head::<Control>().is_none() {
            bail!("{name} is {} bytes, too small for a control block", m.len());
        }
        Ok(ControlMap(m))
    }

    /// The control block.
    pub(crate) fn get(&self) -> &Control {
        self.0.head().expect("size checked at create/open")
    }
}

/// One robust mutex per 64-byte slot, so neighbours never share a cache line.
#[repr(C, align(64))]
struct Slot(libc::pthread_mutex_t);

const _: () = assert!(size_of::<Slot>() == 64);

/// An array of robust, process-shared pthread mutexes in a shared mapping.
pub(crate) struct MutexArray {
    map: SharedMap,
    n: usize,
}

impl MutexArray {
    /// Creates `/dev/shm{name}` with `n` initialized mutexes (`PTHREAD_PROCESS_SHARED`,
    /// `PTHREAD_MUTEX_ROBUST`), before any other process maps it.
    pub(crate) fn create(name: &str, n: usize) -> Result<MutexArray> {
        let map = SharedMap::create(name, n.max(1) * size_of::<Slot>())?;
        let arr = MutexArray { map, n };
        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: pthread_mutexattr_init initializes the attribute object it is given.
        check("pthread_mutexattr_init", unsafe {
            libc::pthread_mutexattr_init(attr.as_mut_ptr())
        })?;
        // SAFETY: initialized by the call above and checked.
        let mut attr = unsafe { attr.assume_init() };
        // SAFETY: `attr` is an initialized attribute object (above).
        check("pthread_mutexattr_setpshared", unsafe {
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED)
        })?;
        // SAFETY: as above.
        check("pthread_mutexattr_setrobust", unsafe {
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST)
        })?;
        for i in 0..n {
            // SAFETY: `slot(i)` is in bounds (i < n) and no other process has mapped the object
            // yet, so nothing else can be using the mutex being initialized.
            check("pthread_mutex_init", unsafe {
                libc::pthread_mutex_init(arr.slot(i), &attr)
            })?;
        }
        // SAFETY: `attr` was initialized above and is not used after this.
        unsafe { libc::pthread_mutexattr_destroy(&mut attr) };
        Ok(arr)
    }

    /// Maps an array made by [`MutexArray::create`].
    pub(crate) fn open(name: &str) -> Result<MutexArray> {
        let map = SharedMap::open(name)?;
        let n = map.len() / size_of::<Slot>();
        Ok(MutexArray { map, n })
    }

    /// Number of mutexes.
    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// Pointer to mutex `i`; the caller checks `i < n`.
    #[inline]
    fn slot(&self, i: usize) -> *mut libc::pthread_mutex_t {
        debug_assert!(i < self.n);
        self.map.ptr.as_ptr().cast::<Slot>().wrapping_add(i).cast()
    }

    /// Locks mutex `i`. Returns true if its previous owner died holding it (EOWNERDEAD): the
    /// mutex is then marked consistent again and is held by us.
    #[inline]
    pub(crate) fn lock(&self, i: usize) -> io::Result<bool> {
        if i >= self.n {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "mutex index out of range"));
        }
        let m = self.slot(i);
        // SAFETY: `m` points into the live mapping (i < n, module contract) at a mutex that the
        // creator initialized before any worker was started; pthread mutexes are made to be
        // shared this way (PTHREAD_PROCESS_SHARED).
        match unsafe { libc::pthread_mutex_lock(m) } {
            0 => Ok(false),
            libc::EOWNERDEAD => {
                // SAFETY: as above; after EOWNERDEAD we hold the mutex, as consistent() needs.
                check("pthread_mutex_consistent", unsafe { libc::pthread_mutex_consistent(m) })?;
                Ok(true)
            }
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Unlocks mutex `i`, held by this thread.
    #[inline]
    pub(crate) fn unlock(&self, i: usize) -> io::Result<()> {
        if i >= self.n {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "mutex index out of range"));
        }
        // SAFETY: as in `lock`; unlocking a mutex we do not hold is reported as EPERM (robust
        // mutexes check the owner), not undefined behaviour.
        check("pthread_mutex_unlock", unsafe {
            libc::pthread_mutex_unlock(self.slot(i))
        })
    }
}

fn check(op: &'static str, rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::from_raw_os_error(rc);
        Err(io::Error::new(e.kind(), format!("{op}: {e}")))
    }
}

/// flock(fd, LOCK_EX), waiting as long as it takes (EINTR retried).
#[inline]
pub(crate) fn flock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Pins the calling process to `cpu`.
pub(crate) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array, valid when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * size_of::<libc::cpu_set_t>() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "cpu number too large"));
    }
    // SAFETY: `cpu` is within the set's bits (checked above); `set` is a valid cpu_set_t.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread, which
    // in a single-threaded worker is the process.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises the soft open-files limit to the hard limit; returns the soft limit now in force.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// One slot of [`ProbeTable`]: a name and its lock word in one cache line.
#[repr(C, align(64))]
pub(crate) struct ProbeSlot {
    /// 0 free, 1 held.
    pub(crate) word: AtomicU64,
    /// The name's hash with the low bit set (0 = empty slot); claimed by CAS.
    pub(crate) hash: AtomicU64,
    /// The name's length in bytes (at most [`PROBE_NAME_LEN`]) with bit 63 set, stored once the
    /// name is written; 0 while the claimer is still writing it.
    pub(crate) len: AtomicU64,
    /// The name, little-endian words, zero padded.
    pub(crate) name: [AtomicU64; 5],
}

/// Longest name a [`ProbeSlot`] holds.
pub(crate) const PROBE_NAME_LEN: usize = 40;

const _: () = assert!(size_of::<ProbeSlot>() == 64);
// SAFETY: repr(C), only atomics, no pointers.
unsafe impl ZeroValid for ProbeSlot {}

/// The `probe` peer's table: an open-addressing hash table of [`ProbeSlot`]s (linear probing,
/// a power of two at least twice the names) in a shared mapping.
pub(crate) struct ProbeTable {
    map: SharedMap,
}

impl ProbeTable {
    /// Creates `/dev/shm{name}` with room for `n` names (all slots empty: zero).
    pub(crate) fn create(name: &str, n: usize) -> Result<ProbeTable> {
        let slots = (2 * n.max(1)).next_power_of_two();
        let map = SharedMap::create(name, slots * size_of::<ProbeSlot>())?;
        let table = ProbeTable { map };
        // Fault every page in now, as shmlock's segment is (MAP_POPULATE) and the pthread
        // mutexes are (initialized): the timed loops must not pay first-touch page faults.
        for s in table.slots().iter().step_by(4096 / size_of::<ProbeSlot>()) {
            s.word.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(table)
    }

    /// Maps a table made by [`ProbeTable::create`].
    pub(crate) fn open(name: &str) -> Result<ProbeTable> {
        let map = SharedMap::open(name)?;
        let slots = map.len() / size_of::<ProbeSlot>();
        if slots == 0 || !slots.is_power_of_two() || map.len() % size_of::<ProbeSlot>() != 0 {
            bail!("{name} is {} bytes, not a probe table", map.len());
        }
        Ok(ProbeTable { map })
    }

    /// The slots (a power of two of them).
    #[inline]
    pub(crate) fn slots(&self) -> &[ProbeSlot] {
        let n = self.map.len / size_of::<ProbeSlot>();
        // SAFETY: the mapping is page aligned (so 64-aligned), `n * 64` bytes of it are inside
        // it, and it stays mapped for the borrow of `self` (module contract). `ProbeSlot` is
        // valid for any bytes (zero at creation, later written only through its atomics) and is
        // reached only through `&`, so sharing it with other processes is sharing atomics.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr().cast::<ProbeSlot>(), n) }
    }
}
