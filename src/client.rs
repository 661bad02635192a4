//! Client handles and lock guards: the library's front door.
//!
//! A [`Client`] is one owner in the table. It locks through the [`Locker`] contract (`lock`,
//! `try_lock`, `try_lock_for`, ..., written once for every backend). Every lock it takes is held
//! by that owner until the guard is dropped (or [`Guard::unlock`] is called), or the client
//! itself is dropped.
//!
//! # Threads
//! A `Client` is `Send + Sync` and may be shared between threads, but it is **one owner**: a lock
//! request for a name the client already holds, from any thread, fails at once with
//! [`Error::AlreadyHeld`] instead of deadlocking; two threads that must exclude each other should
//! each open their own `Client`. While one thread's request is queued, another thread's request
//! for the same name queues behind it.
//!
//! # fork()
//! A client belongs to the process that opened it. In a child made by `fork()` (Python's
//! `os.fork` and `multiprocessing`'s fork start method included), every call on the inherited
//! client and its guards fails with [`Error::ForkedClient`], and dropping them there gives back
//! nothing: the parent's locks stay the parent's. The child opens a client of its own. (The
//! check is one load: a `pthread_atfork` handler counts forks.) The same holds for a
//! [`RemoteClient`](crate::remote::RemoteClient), whose session stays the parent's.

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::clock;
use crate::config::Capacities;
use crate::error::{Error, Result};
use crate::lock::{Guard, Locker, Wait};
use crate::owner::{OpenedBy, OwnerKind};
use crate::table::{never, Interrupt, LockTable, Mode, OwnerRef, RawGrant, Wait as RawWait};

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
    /// The process that opened it: a forked child may not use it (see [`Error::ForkedClient`]).
    opened_by: OpenedBy,
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
            opened_by: OpenedBy::now(),
        })
    }

    /// The table this client locks in.
    pub fn table(&self) -> &Arc<LockTable> {
        &self.table
    }

    /// The fast path inline (the grant goes from registers straight into the guard), the rest
    /// out of line.
    #[inline(always)]
    fn acquire_raw(&self, name: &[u8], mode: Mode, wait: RawWait, interrupted: Interrupt<'_>) -> Result<RawGrant> {
        self.opened_by.check()?;
        let g = match self.table.acquire_fast(self.me, name, mode, wait) {
            Some(r) => r?,
            None => self.acquire_slow(name, mode, wait, interrupted)?,
        };
        self.touch(g.shard);
        Ok(g)
    }

    #[inline(never)]
    fn acquire_slow(&self, name: &[u8], mode: Mode, wait: RawWait, interrupted: Interrupt<'_>) -> Result<RawGrant> {
        self.table.acquire_slow(self.me, name, mode, wait, interrupted)
    }

    /// A timed request: `waited` in a timeout error counts from this call, not from the
    /// moment the request was queued, so it is never less than the time the caller allowed.
    #[inline(never)]
    fn acquire_until(
        &self,
        name: &[u8],
        mode: Mode,
        deadline: Instant,
        interrupted: Interrupt<'_>,
    ) -> Result<RawGrant> {
        self.opened_by.check()?;
        let start = clock::now();
        let timeout = deadline.saturating_duration_since(Instant::now());
        let wait = RawWait::Until(start.plus(timeout));
        let fast = self.table.acquire_fast(self.me, name, mode, wait);
        match fast.unwrap_or_else(|| self.table.acquire_slow(self.me, name, mode, wait, interrupted)) {
            Ok(g) => {
                self.touch(g.shard);
                Ok(g)
            }
            Err(Error::TimedOut { holder, .. }) => Err(Error::TimedOut {
                waited: clock::now().since(start),
                holder,
            }),
            Err(e) => Err(e),
        }
    }

    /// Marks `shard` as one this client was granted a lock in (searched when it is dropped).
    #[inline]
    fn touch(&self, shard: u32) {
        let (w, bit) = (&self.touched[shard as usize / 64], 1u64 << (shard % 64));
        if w.load(Ordering::Relaxed) & bit == 0 {
            w.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Unlocks `name`, held by this client in either mode, whose guard was forgotten
    /// (`std::mem::forget`) or leaked. [`Error::NotHeld`] if this client does not hold it.
    pub fn unlock(&self, name: impl AsRef<[u8]>) -> Result<()> {
        self.opened_by.check()?;
        self.table.release_by_name(self.me, name.as_ref())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // In a forked child the owner and its locks are the parent's: leave them be.
        if self.opened_by.forked() {
            return;
        }
        // Guards borrow the client or own a reference to it, so only forgotten guards can still
        // hold anything.
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

impl Locker for Client {
    type Guard<H: Deref<Target = Client>> = LocalGuard<H>;

    #[inline(always)]
    fn acquire_with<H: Deref<Target = Client>>(this: H, name: &[u8], mode: Mode, wait: Wait) -> Result<LocalGuard<H>> {
        let raw = match wait {
            Wait::No => this.acquire_raw(name, mode, RawWait::No, &mut never)?,
            Wait::Forever => this.acquire_raw(name, mode, RawWait::Forever, &mut never)?,
            Wait::Until(deadline) => this.acquire_until(name, mode, deadline, &mut never)?,
        };
        Ok(LocalGuard {
            client: this,
            raw,
            released: false,
        })
    }

    /// The request keeps its place in the queue across the checks.
    fn acquire_interruptible_with<H: Deref<Target = Client> + Clone>(
        this: H,
        name: &[u8],
        mode: Mode,
        wait: Wait,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<LocalGuard<H>> {
        let raw = match wait {
            Wait::No => this.acquire_raw(name, mode, RawWait::No, &mut never)?,
            Wait::Forever => this.acquire_raw(name, mode, RawWait::Forever, interrupted)?,
            Wait::Until(deadline) => this.acquire_until(name, mode, deadline, interrupted)?,
        };
        Ok(LocalGuard {
            client: this,
            raw,
            released: false,
        })
    }
}

/// A lock held in a local segment, through the handle `H` to its [`Client`]; unlocks when
/// dropped. [`LockGuard`] borrows its client, [`ArcLockGuard`] owns a reference to it.
#[must_use = "the lock is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct LocalGuard<H: Deref<Target = Client>> {
    client: H,
    raw: RawGrant,
    released: bool,
}

crate::lock::forward_contract!(Client, LocalGuard);

/// A lock held in a local segment, borrowing its client (from [`Locker::lock`] and friends).
pub type LockGuard<'a> = LocalGuard<&'a Client>;

/// A lock held in a local segment, owning a reference to its client (from [`Locker::lock_arc`]
/// and [`Locker::acquire_arc`]): it can live in a struct or move to another thread.
pub type ArcLockGuard = LocalGuard<Arc<Client>>;

impl<H: Deref<Target = Client>> Guard for LocalGuard<H> {
    #[inline]
    fn grant(&self) -> Grant {
        Grant {
            token: FencingToken(self.raw.token),
            owner_died: self.raw.owner_died,
            mode: self.raw.mode,
        }
    }

    fn name(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.client.table.grant_name(&self.raw))
    }

    #[inline(always)]
    fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.client.opened_by.check()?;
        self.client.table.release(self.client.me, &self.raw)
    }

    #[inline]
    fn token(&self) -> FencingToken {
        FencingToken(self.raw.token)
    }

    #[inline]
    fn owner_died(&self) -> bool {
        self.raw.owner_died
    }

    #[inline]
    fn mode(&self) -> Mode {
        self.raw.mode
    }
}

impl<H: Deref<Target = Client>> Drop for LocalGuard<H> {
    #[inline(always)]
    fn drop(&mut self) {
        if !self.released {
            release_on_drop(&self.client, self.raw);
        }
    }
}

/// The release of a guard dropped without [`Guard::unlock`]. Out of line, and given copies
/// rather than the guard: so the drop left at the end of `unlock` is a flag test that folds away,
/// and the guard can stay in registers. (The whole release inlined into the drop made the drop
/// glue too large to inline, and `unlock` called it, with the guard copied to the stack for it:
/// seven stores ahead of the release's CAS, a locked instruction, which waits for every earlier
/// store to drain.)
#[inline(never)]
fn release_on_drop(client: &Client, raw: RawGrant) {
    // A guard dropped in a forked child is the parent's lock: not the child's to release.
    if !client.opened_by.forked() {
        let _ = client.table.release(client.me, &raw);
    }
}
