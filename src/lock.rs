//! The locking contract every backend implements: [`Locker`] (lock a name) and [`Guard`] (a held
//! lock), in the manner of `lock_api`: a backend writes one method, [`Locker::acquire_with`], and
//! every std-named method (`lock`, `try_lock`, `try_lock_for`, `try_lock_until` and their
//! `_shared` twins) is written once, here, for all of them.
//!
//! ```
//! # let seg = shmlock::doc_segment();
//! use shmlock::{Client, Guard, Locker};
//!
//! /// Works the same on a local `Client` and on a `RemoteClient`.
//! fn bump<L: Locker>(locks: &L) -> shmlock::Result<u64> {
//!     let g = locks.lock("counter")?;
//!     Ok(g.token().0)
//! }
//! let client = Client::open(&seg)?;
//! assert!(bump(&client)? < bump(&client)?);
//! # shmlock::Segment::unlink(&seg)?;
//! # Ok::<(), shmlock::Error>(())
//! ```
//!
//! # Borrowed and owned guards
//! A guard holds its lock through a handle to its client, of a type `H` that derefs to the client:
//! `&Client` for the guards of [`Locker::lock`] and friends (the guard borrows the client), or
//! `Arc<Client>` for those of [`Locker::lock_arc`] and [`Locker::acquire_arc`], which own a
//! reference to the client and so can live in a struct or move to another thread (like
//! `lock_api`'s `ArcMutexGuard`). The lock is held by the client's owner either way.

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{FencingToken, Grant};
use crate::error::{Error, Result};
use crate::table::Mode;

/// How often an interruptible wait ([`Locker::acquire_interruptible`]) asks whether to give up,
/// at least.
pub const INTERRUPT_CHECK: Duration = Duration::from_millis(50);

/// What a lock request does when the lock is not free at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Give up at once: [`Error::WouldBlock`].
    No,
    /// Wait until this instant at most: then [`Error::TimedOut`]. A
    /// deadline already past makes one attempt.
    Until(Instant),
    /// Wait as long as it takes.
    Forever,
}

impl Wait {
    /// Waits at most `timeout` from now.
    pub fn for_duration(timeout: Duration) -> Wait {
        // An instant beyond what `Instant` can hold is as good as forever.
        Instant::now().checked_add(timeout).map_or(Wait::Forever, Wait::Until)
    }
}

/// A held lock. Dropping it unlocks (without reporting); [`Guard::unlock`] unlocks and reports.
pub trait Guard {
    /// Everything the grant said: token, owner-died notice, mode.
    fn grant(&self) -> Grant;

    /// The name locked. (A local guard reads it back from the table, so it costs nothing on the
    /// lock path.)
    fn name(&self) -> Cow<'_, [u8]>;

    /// Unlocks now; [`Error::NotHeld`] if the lock was taken away
    /// meanwhile (`shmlock release --force`, a remote session that ended).
    fn unlock(self) -> Result<()>
    where
        Self: Sized;

    /// The fencing token of this grant: strictly increasing across the grants of one name.
    fn token(&self) -> FencingToken {
        self.grant().token
    }

    /// True if the previous holder died (or was forced out) holding the lock: check the data it
    /// protects. Information only; the lock is not poisoned.
    fn owner_died(&self) -> bool {
        self.grant().owner_died
    }

    /// The mode held.
    fn mode(&self) -> Mode {
        self.grant().mode
    }

    /// True once the backend knows the lock is gone without an unlock, so it may be another's
    /// (an etcd session whose lease expired or could not be renewed in time): stop using what
    /// it protects. A backend that learns of a loss only when unlocking (a local lock taken by
    /// `shmlock release --force`: the unlock returns [`Error::NotHeld`]) says false.
    fn lost(&self) -> bool {
        false
    }
}

/// Locks by name: the one contract of [`Client`](crate::Client) (in shared memory) and
/// [`RemoteClient`](crate::remote::RemoteClient) (through a gateway), so an API gap between them
/// is a compile error and code written over `Locker` runs on both.
///
/// A client is **one owner**: a request for a name it already holds fails at once with
/// [`Error::AlreadyHeld`], from any thread, instead of deadlocking.
pub trait Locker {
    /// A grant held through the handle `H` (`&Self`, or `Arc<Self>` for an owned guard).
    type Guard<H: Deref<Target = Self>>: Guard;

    /// Locks `name` in `mode`, waiting as `wait` says; the guard keeps `this`. The one method a
    /// backend writes.
    ///
    /// Errors: [`WouldBlock`](crate::Error::WouldBlock) (`Wait::No`, busy),
    /// [`TimedOut`](crate::Error::TimedOut) (the deadline passed; names the holder where known),
    /// [`AlreadyHeld`](crate::Error::AlreadyHeld), [`NameInvalid`](crate::Error::NameInvalid),
    /// [`PoolFull`](crate::Error::PoolFull) (a full table), and the backend's own failures.
    fn acquire_with<H: Deref<Target = Self>>(this: H, name: &[u8], mode: Mode, wait: Wait) -> Result<Self::Guard<H>>;

    /// Like [`acquire_with`](Locker::acquire_with), but while it waits it calls `interrupted`
    /// every [`INTERRUPT_CHECK`] at most, never while it holds anything of the backend's;
    /// when that returns true the request is withdrawn, nothing is held, and the result is
    /// [`Error::Interrupted`]. Meant for bindings whose runtime must
    /// see signals while a thread waits (Python's Ctrl-C).
    ///
    /// The provided version waits in slices of [`INTERRUPT_CHECK`] (each a request of its own,
    /// so between slices the request has no place in the backend's queue); a backend that can
    /// ask while its request stays queued overrides it ([`Client`](crate::Client) does).
    fn acquire_interruptible_with<H: Deref<Target = Self> + Clone>(
        this: H,
        name: &[u8],
        mode: Mode,
        wait: Wait,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<Self::Guard<H>> {
        let start = Instant::now();
        loop {
            let now = Instant::now();
            let (slice, last) = match wait {
                Wait::No => (Wait::No, true),
                Wait::Until(d) if d <= now + INTERRUPT_CHECK => (wait, true),
                _ => (Wait::Until(now + INTERRUPT_CHECK), false),
            };
            match Self::acquire_with(this.clone(), name, mode, slice) {
                Err(Error::TimedOut { .. }) if !last => {}
                Err(Error::TimedOut { holder, .. }) => {
                    return Err(Error::TimedOut {
                        waited: start.elapsed(),
                        holder,
                    })
                }
                r => return r,
            }
            if interrupted() {
                return Err(Error::Interrupted);
            }
        }
    }

    /// [`acquire_interruptible_with`](Locker::acquire_interruptible_with), borrowing the client.
    fn acquire_interruptible(
        &self,
        name: impl AsRef<[u8]>,
        mode: Mode,
        wait: Wait,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<Self::Guard<&Self>> {
        Self::acquire_interruptible_with(self, name.as_ref(), mode, wait, interrupted)
    }

    /// Locks `name` in `mode`, waiting as `wait` says.
    #[inline(always)]
    fn acquire(&self, name: impl AsRef<[u8]>, mode: Mode, wait: Wait) -> Result<Self::Guard<&Self>> {
        Self::acquire_with(self, name.as_ref(), mode, wait)
    }

    /// Like [`acquire`](Locker::acquire), with a guard that owns a reference to the client: it
    /// can be stored or sent to another thread.
    #[inline]
    fn acquire_arc(self: &Arc<Self>, name: impl AsRef<[u8]>, mode: Mode, wait: Wait) -> Result<Self::Guard<Arc<Self>>>
    where
        Self: Sized,
    {
        Self::acquire_with(Arc::clone(self), name.as_ref(), mode, wait)
    }

    /// Locks `name` exclusively, waiting as long as it takes.
    #[inline(always)]
    fn lock(&self, name: impl AsRef<[u8]>) -> Result<Self::Guard<&Self>> {
        Self::acquire_with(self, name.as_ref(), Mode::Exclusive, Wait::Forever)
    }

    /// Locks `name` exclusively if that is possible at once; else
    /// [`Error::WouldBlock`].
    #[inline]
    fn try_lock(&self, name: impl AsRef<[u8]>) -> Result<Self::Guard<&Self>> {
        Self::acquire_with(self, name.as_ref(), Mode::Exclusive, Wait::No)
    }

    /// Locks `name` exclusively, waiting at most `timeout`; else
    /// [`Error::TimedOut`].
    #[inline]
    fn try_lock_for(&self, name: impl AsRef<[u8]>, timeout: Duration) -> Result<Self::Guard<&Self>> {
        Self::acquire_with(self, name.as_ref(), Mode::Exclusive, Wait::for_duration(timeout))
    }

    /// Locks `name` exclusively, waiting until `deadline` at most.
    #[inline]
    fn try_lock_until(&self, name: impl AsRef<[u8]>, deadline: Instant) -> Result<Self::Guard<&Self>> {
        Self::acquire_with(self, name.as_ref(), Mode::Exclusive, Wait::Until(deadline))
    }

    /// Locks `name` in shared mode, waiting as long as it takes.
    #[inline]
    fn lock_shared(&self, name: impl AsRef<[u8]>) -> Result<Self::Guard<&Self>> {
        Self::acquire_with(self, name.as_ref(), Mode::Shared, Wait::Forever)
    }

    /// Locks `name` in shared mode if that is possible at once; else
    /// [`Error::WouldBlock`].
    #[inline]
    fn try_lock_shared(&self, name: impl AsRef<[u8]>) -> Result<Self::Guard<&Self>> {
        Self::acquire_with(self, name.as_ref(), Mode::Shared, Wait::No)
    }

    /// Locks `name` in shared mode, waiting at most `timeout`.
    #[inline]
    fn try_lock_shared_for(&self, name: impl AsRef<[u8]>, timeout: Duration) -> Result<Self::Guard<&Self>> {
        Self::acquire_with(self, name.as_ref(), Mode::Shared, Wait::for_duration(timeout))
    }

    /// Locks `name` in shared mode, waiting until `deadline` at most.
    #[inline]
    fn try_lock_shared_until(&self, name: impl AsRef<[u8]>, deadline: Instant) -> Result<Self::Guard<&Self>> {
        Self::acquire_with(self, name.as_ref(), Mode::Shared, Wait::Until(deadline))
    }

    /// Locks `name` exclusively, waiting as long as it takes, with an owned guard.
    #[inline]
    fn lock_arc(self: &Arc<Self>, name: impl AsRef<[u8]>) -> Result<Self::Guard<Arc<Self>>>
    where
        Self: Sized,
    {
        Self::acquire_with(Arc::clone(self), name.as_ref(), Mode::Exclusive, Wait::Forever)
    }

    /// Locks `name` in shared mode, waiting as long as it takes, with an owned guard.
    #[inline]
    fn lock_shared_arc(self: &Arc<Self>, name: impl AsRef<[u8]>) -> Result<Self::Guard<Arc<Self>>>
    where
        Self: Sized,
    {
        Self::acquire_with(Arc::clone(self), name.as_ref(), Mode::Shared, Wait::Forever)
    }
}

/// Makes the contract's std-named methods inherent methods of a backend `$client` and of its
/// guard type `$guard<H>` too, forwarding to the trait (the bodies stay the trait's, written
/// once), so code that names `client.lock(..)` or `guard.token()` without importing [`Locker`]
/// and [`Guard`] keeps working. Generic code uses the traits.
macro_rules! forward_contract {
    ($client:ty, $guard:ident) => {
        /// The [`Locker`](crate::Locker) contract's methods, callable without importing it.
        impl $client {
            /// Locks `name` exclusively, waiting as long as it takes. See [`Locker::lock`](crate::Locker::lock).
            #[inline(always)]
            pub fn lock(&self, name: impl AsRef<[u8]>) -> $crate::Result<$guard<&Self>> {
                <Self as $crate::Locker>::lock(self, name)
            }
            /// Locks `name` exclusively if possible at once. See [`Locker::try_lock`](crate::Locker::try_lock).
            #[inline]
            pub fn try_lock(&self, name: impl AsRef<[u8]>) -> $crate::Result<$guard<&Self>> {
                <Self as $crate::Locker>::try_lock(self, name)
            }
            /// Locks `name` exclusively, waiting at most `timeout`. See
            /// [`Locker::try_lock_for`](crate::Locker::try_lock_for).
            #[inline]
            pub fn try_lock_for(
                &self,
                name: impl AsRef<[u8]>,
                timeout: std::time::Duration,
            ) -> $crate::Result<$guard<&Self>> {
                <Self as $crate::Locker>::try_lock_for(self, name, timeout)
            }
            /// Locks `name` exclusively, waiting until `deadline` at most. See
            /// [`Locker::try_lock_until`](crate::Locker::try_lock_until).
            #[inline]
            pub fn try_lock_until(
                &self,
                name: impl AsRef<[u8]>,
                deadline: std::time::Instant,
            ) -> $crate::Result<$guard<&Self>> {
                <Self as $crate::Locker>::try_lock_until(self, name, deadline)
            }
            /// Locks `name` in shared mode, waiting as long as it takes. See
            /// [`Locker::lock_shared`](crate::Locker::lock_shared).
            #[inline]
            pub fn lock_shared(&self, name: impl AsRef<[u8]>) -> $crate::Result<$guard<&Self>> {
                <Self as $crate::Locker>::lock_shared(self, name)
            }
            /// Locks `name` in shared mode if possible at once. See
            /// [`Locker::try_lock_shared`](crate::Locker::try_lock_shared).
            #[inline]
            pub fn try_lock_shared(&self, name: impl AsRef<[u8]>) -> $crate::Result<$guard<&Self>> {
                <Self as $crate::Locker>::try_lock_shared(self, name)
            }
            /// Locks `name` in shared mode, waiting at most `timeout`. See
            /// [`Locker::try_lock_shared_for`](crate::Locker::try_lock_shared_for).
            #[inline]
            pub fn try_lock_shared_for(
                &self,
                name: impl AsRef<[u8]>,
                timeout: std::time::Duration,
            ) -> $crate::Result<$guard<&Self>> {
                <Self as $crate::Locker>::try_lock_shared_for(self, name, timeout)
            }
            /// Locks `name` in shared mode, waiting until `deadline` at most. See
            /// [`Locker::try_lock_shared_until`](crate::Locker::try_lock_shared_until).
            #[inline]
            pub fn try_lock_shared_until(
                &self,
                name: impl AsRef<[u8]>,
                deadline: std::time::Instant,
            ) -> $crate::Result<$guard<&Self>> {
                <Self as $crate::Locker>::try_lock_shared_until(self, name, deadline)
            }
        }

        /// The [`Guard`](crate::Guard) contract's methods, callable without importing it.
        impl<H: std::ops::Deref<Target = $client>> $guard<H> {
            /// The fencing token of this grant. See [`Guard::token`](crate::Guard::token).
            #[inline]
            pub fn token(&self) -> $crate::FencingToken {
                <Self as $crate::Guard>::token(self)
            }
            /// True if the previous holder died holding the lock. See
            /// [`Guard::owner_died`](crate::Guard::owner_died).
            #[inline]
            pub fn owner_died(&self) -> bool {
                <Self as $crate::Guard>::owner_died(self)
            }
            /// The mode held. See [`Guard::mode`](crate::Guard::mode).
            #[inline]
            pub fn mode(&self) -> $crate::Mode {
                <Self as $crate::Guard>::mode(self)
            }
            /// Everything the grant said. See [`Guard::grant`](crate::Guard::grant).
            #[inline]
            pub fn grant(&self) -> $crate::Grant {
                <Self as $crate::Guard>::grant(self)
            }
            /// The name locked. See [`Guard::name`](crate::Guard::name).
            pub fn name(&self) -> std::borrow::Cow<'_, [u8]> {
                <Self as $crate::Guard>::name(self)
            }
            /// Unlocks now, reporting. See [`Guard::unlock`](crate::Guard::unlock).
            #[inline(always)]
            pub fn unlock(self) -> $crate::Result<()> {
                <Self as $crate::Guard>::unlock(self)
            }
        }
    };
}
pub(crate) use forward_contract;
