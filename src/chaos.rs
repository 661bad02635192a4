//! A fault-injection hook for crash tests: kill this process at the N-th chaos point.
//!
//! Chaos points sit inside the table's critical sections, between the steps of multi-word
//! updates (a pool transition between unlinking and relinking, an entry between being filled and
//! being chained, a handoff half done, ...). With `SHMLOCK_CHAOS_KILL_AFTER=N` in the environment
//! of a process that opens a [`Client`](crate::Client), the process SIGKILLs itself at the N-th
//! point it passes, leaving a latch held and a structure half updated for the survivors to repair.
//! Unset, a point costs one relaxed load of a process-local word and a predictable branch.
//!
//! Built only with the `chaos` feature, which this crate's own tests turn on (a dev-dependency on
//! itself) and no default build has: without it `point` is empty, [`arm_from_env`] ignores the
//! environment, and `kill_after` does not exist, so no process of a normal build kills itself
//! because of a variable in its environment.

#[cfg(feature = "chaos")]
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
#[cfg(feature = "chaos")]
use std::sync::Once;

/// The environment variable read by [`arm_from_env`] (with the `chaos` feature).
pub const ENV: &str = "SHMLOCK_CHAOS_KILL_AFTER";

#[cfg(feature = "chaos")]
static COUNTDOWN: AtomicU64 = AtomicU64::new(0);

/// Kills this process at the `n`-th chaos point from now (0 disarms).
#[cfg(feature = "chaos")]
pub fn kill_after(n: u64) {
    COUNTDOWN.store(n, Relaxed);
}

/// Arms the hook from [`ENV`], once per process (with the `chaos` feature; else nothing).
#[cfg(feature = "chaos")]
pub fn arm_from_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Some(n) = std::env::var(ENV).ok().and_then(|v| v.parse().ok()) {
            kill_after(n);
        }
    });
}

/// Without the `chaos` feature: nothing.
#[cfg(not(feature = "chaos"))]
#[inline(always)]
pub fn arm_from_env() {}

/// A chaos point.
#[cfg(feature = "chaos")]
#[inline(always)]
pub(crate) fn point() {
    if COUNTDOWN.load(Relaxed) != 0 {
        fire();
    }
}

/// Without the `chaos` feature: nothing.
#[cfg(not(feature = "chaos"))]
#[inline(always)]
pub(crate) fn point() {}

#[cfg(feature = "chaos")]
#[cold]
#[inline(never)]
fn fire() {
    if COUNTDOWN.fetch_update(Relaxed, Relaxed, |c| c.checked_sub(1)) == Ok(1) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
