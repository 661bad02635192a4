//! Client handles and lock guards: the library's front door.
//!
//! A [`Client`] is one owner in the table. Every lock it takes is held by that owner until the
//! guard is dropped (or [`LockGuard::unlock`] is called), or the client itself is dropped.
//!
//! # Threads
//! A `Client` is `Send + Sync` and may be shared between threads, but it is **one owner**: a lock
//! request for a name the client already holds, from any thread, fails at once with
//! [`Error::AlreadyHeld`] instead of deadlocking; two threads that must exclude each other should
//! each open their own `Client`. While one thread's request is queued, another thread's request
//! for the same name queues behind it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock;
use crate::config::Capacities;
use crate::error::{Error, Result};
use crate::owner::OwnerKind;
use crate::table::{LockTable, Mode, OwnerRef, RawGrant, Wait};

/// A fencing token: strictly increasing across the grants of one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a grant tells its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The fencing token of this grant.
    pub token: FencingToken,
    /// The previous holder died (or was forced out) while holding the lock: check the data it
    /// protects. Information only; the lock is not poisoned.
    pub owner_died: bool,
    /// The mode granted.
    pub mode: Mode,
}

/// A handle to a lock table: one owner.
#[derive(Debug)]
pub struct Client {
    table: Arc<LockTable>,
    me: OwnerRef,
    /// One bit per shard this client has been granted a lock in; on drop, those shards are
    /// searched for anything forgotten guards still hold. Set with a load on the hot path.
    touched: Box<[AtomicU64]>,
}

impl Client {
    /// Attaches to the existing segment `segment` (e.g. `/shmlock`).
    pub fn open(segment: &str) -> Result<Client> {
        Self::with_table(Arc::new(LockTable::open(segment)?), "")
    }

    /// Attaches to the segment named by `$SHMLOCK_SEGMENT`, or `/shmlock`.
    pub fn open_default() -> Result<Client> {
        Self::open(&crate::shm::default_segment_name())
    }

    /// Attaches to `segment`, creating it with `caps` if it does not exist.
    pub fn create_or_open(segment: &str, caps: &Capacities) -> Result<Client> {
        Self::with_table(Arc::new(LockTable::create_or_open(segment, caps)?), "")
    }

    /// Registers a new owner, labelled `label` (up to 24 bytes; shown by the CLI), on `table`.
    pub fn with_table(table: Arc<LockTable>, label: &str) -> Result<Client> {
        Self::with_kind(table, OwnerKind::Local, label)
    }

    /// Registers a new owner of `kind`.
    pub fn with_kind(table: Arc<LockTable>, kind: OwnerKind, label: &str) -> Result<Client> {
        crate::chaos::arm_from_env();
        let me = table.register(kind, label.as_bytes())?;
        let words = table.geometry().shards.div_ceil(64) as usize;
        Ok(Client {
            table,
            me,
            touched: (0..words).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The table this client locks in.
    pub fn table(&self) -> &Arc<LockTable> {
        &self.table
    }

    /// The fast path inline (the grant goes from registers straight into the guard), the rest
    /// out of line.
    #[inline(always)]
    fn acquire(&self, name: &[u8], mode: Mode, wait: Wait) -> Result<LockGuard<'_>> {
        match self.table.acquire_fast(self.me, name, mode, wait) {
            Some(Ok(g)) => Ok(self.guard(g)),
            Some(Err(e)) => Err(e),
            None => self.acquire_slow(name, mode, wait),
        }
    }

    #[inline(never)]
    fn acquire_slow(&self, name: &[u8], mode: Mode, wait: Wait) -> Result<LockGuard<'_>> {
        let g = self.table.acquire_slow(self.me, name, mode, wait)?;
        Ok(self.guard(g))
    }

    /// A timed request: `waited` in a timeout error counts from this call, not from the
    /// moment the request was queued, so it is never less than the time the caller allowed.
    fn acquire_for(&self, name: &[u8], mode: Mode, timeout: Duration) -> Result<LockGuard<'_>> {
        let start = clock::now();
        match self
            .table
            .acquire(self.me, name, mode, Wait::Until(start.plus(timeout)))
        {
            Ok(g) => Ok(self.guard(g)),
            Err(Error::TimedOut { holder, .. }) => Err(Error::TimedOut {
                waited: clock::now().since(start),
                holder,
            }),
            Err(e) => Err(e),
        }
    }

    #[inline]
    fn guard(&self, g: RawGrant) -> LockGuard<'_> {
        let (w, bit) = (&self.touched[g.shard as usize / 64], 1u64 << (g.shard % 64));
        if w.load(Ordering::Relaxed) & bit == 0 {
            w.fetch_or(bit, Ordering::Relaxed);
        }
        LockGuard {
            client: self,
            raw: g,
            released: false,
        }
    }

    /// Locks `name` exclusively, waiting as long as it takes.
    #[inline(always)]
    pub fn lock(&self, name: impl AsRef<[u8]>) -> Result<LockGuard<'_>> {
        self.acquire(name.as_ref(), Mode::Exclusive, Wait::Forever)
    }

    /// Locks `name` exclusively if that is possible at once; else [`Error::WouldBlock`].
    pub fn try_lock(&self, name: impl AsRef<[u8]>) -> Result<LockGuard<'_>> {
        self.acquire(name.as_ref(), Mode::Exclusive, Wait::No)
    }

    /// Locks `name` exclusively, waiting at most `timeout`; else [`Error::TimedOut`].
    pub fn try_lock_for(&self, name: impl AsRef<[u8]>, timeout: Duration) -> Result<LockGuard<'_>> {
        self.acquire_for(name.as_ref(), Mode::Exclusive, timeout)
    }

    /// Locks `name` exclusively, waiting until `deadline` at most.
    pub fn try_lock_until(&self, name: impl AsRef<[u8]>, deadline: Instant) -> Result<LockGuard<'_>> {
        self.acquire_for(
            name.as_ref(),
            Mode::Exclusive,
            deadline.saturating_duration_since(Instant::now()),
        )
    }

    /// Locks `name` in shared mode, waiting as long as it takes.
    pub fn lock_shared(&self, name: impl AsRef<[u8]>) -> Result<LockGuard<'_>> {
        self.acquire(name.as_ref(), Mode::Shared, Wait::Forever)
    }

    /// Locks `name` in shared mode if that is possible at once; else [`Error::WouldBlock`].
    pub fn try_lock_shared(&self, name: impl AsRef<[u8]>) -> Result<LockGuard<'_>> {
        self.acquire(name.as_ref(), Mode::Shared, Wait::No)
    }

    /// Locks `name` in shared mode, waiting at most `timeout`.
    pub fn try_lock_shared_for(&self, name: impl AsRef<[u8]>, timeout: Duration) -> Result<LockGuard<'_>> {
        self.acquire_for(name.as_ref(), Mode::Shared, timeout)
    }

    /// Locks `name` in shared mode, waiting until `deadline` at most.
    pub fn try_lock_shared_until(&self, name: impl AsRef<[u8]>, deadline: Instant) -> Result<LockGuard<'_>> {
        self.acquire_for(
            name.as_ref(),
            Mode::Shared,
            deadline.saturating_duration_since(Instant::now()),
        )
    }

    /// Unlocks `name`, held by this client in either mode, whose guard was forgotten
    /// (`std::mem::forget`) or leaked. [`Error::NotHeld`] if this client does not hold it.
    pub fn unlock(&self, name: impl AsRef<[u8]>) -> Result<()> {
        self.table.release_by_name(self.me, name.as_ref())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Guards borrow the client, so only forgotten guards can still hold anything.
        let shards = self.touched.iter().enumerate().flat_map(|(i, w)| {
            let bits = w.load(Ordering::Relaxed);
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| (i * 64 + b) as u32)
        });
        // If releasing fails (a corrupt table), the record stays LIVE and is reaped with the
        // process, rather than freed while it may still be named as a holder.
        if self.table.release_all(self.me, shards).is_ok() {
            let _ = self.table.deregister(self.me);
        }
    }
}

/// A held lock; unlocks when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct LockGuard<'a> {
    client: &'a Client,
    raw: RawGrant,
    released: bool,
}

impl LockGuard<'_> {
    /// The fencing token of this grant.
    pub fn token(&self) -> FencingToken {
        FencingToken(self.raw.token)
    }

    /// True if the previous holder died (or was forced out) holding the lock.
    pub fn owner_died(&self) -> bool {
        self.raw.owner_died
    }

    /// The mode held.
    pub fn mode(&self) -> Mode {
        self.raw.mode
    }

    /// Everything the grant said.
    pub fn grant(&self) -> Grant {
        Grant {
            token: self.token(),
            owner_died: self.owner_died(),
            mode: self.mode(),
        }
    }

    /// Unlocks now, reporting [`Error::NotHeld`] if the lock was taken away meanwhile.
    #[inline(always)]
    pub fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.client.table.release(self.client.me, &self.raw)
    }
}

impl Drop for LockGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if !self.released {
            let _ = self.client.table.release(self.client.me, &self.raw);
        }
    }
}
