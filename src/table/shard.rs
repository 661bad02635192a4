//! Shards: per-shard header and the latch that guards a shard's buckets, entries and holds.
//!
//! # The latch word
//! | bits  | meaning                                                   |
//! |-------|-----------------------------------------------------------|
//! | 0..31 | 0 = free, else the holder's latch id (owner index + 1)    |
//! | 31    | WAITERS: someone may sleep on the word; unlock must wake  |
//!
//! The word names its holder so that a survivor can tell whose critical section a dead process
//! left behind. Critical sections never block, allocate or do I/O; a contended latch spins
//! briefly, then sleeps on the word (shared futex) with a bounded timeout. A waiter that has seen
//! the same holder for [`LATCH_SLEEP`] asks whether that holder is dead; if so it takes the latch
//! over with one CAS (which also settles a race between two recoverers) and the guard says whose
//! section it inherited, so the caller repairs what that section may have left half done.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::pool::ListHead;
use crate::shm::sys::{futex_wait, futex_wake};

/// Per-shard header (256 bytes, 128-aligned so no two shards share a line or a line pair).
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub(crate) struct ShardHdr {
    /// The latch word (see the module docs).
    pub latch: AtomicU32,
    _pad0: AtomicU32,
    /// Last fencing token granted in this shard. Written under the latch.
    pub token: AtomicU64,
    /// Entry pool list heads (FREE, IDLE, HELD, DIED).
    pub entry_lists: [ListHead; 4],
    /// Hold pool list heads (FREE, HELD, WAITING, GRANTED).
    pub hold_lists: [ListHead; 4],
    /// Statistics, written under the latch: grants, contended requests, timeouts, handoffs,
    /// repairs after a holder died inside its critical section.
    pub stats: [AtomicU64; 5],
    _reserved: [AtomicU64; 3],
}

// SAFETY: repr(C), atomics only, valid at zero, no pointers.
crate::shm::impl_shm_safe!(ShardHdr);
const _: () = assert!(std::mem::size_of::<ShardHdr>() == 256 && std::mem::align_of::<ShardHdr>() == 128);

/// Index of `ShardHdr::stats`.
pub(crate) const STAT_GRANTS: usize = 0;
/// Index of `ShardHdr::stats`.
pub(crate) const STAT_WAITS: usize = 1;
/// Index of `ShardHdr::stats`.
pub(crate) const STAT_TIMEOUTS: usize = 2;
/// Index of `ShardHdr::stats`.
pub(crate) const STAT_HANDOFFS: usize = 3;
/// Index of `ShardHdr::stats`.
pub(crate) const STAT_REPAIRS: usize = 4;

const WAITERS: u32 = 1 << 31;
const SPINS: u32 = 64;
/// Longest single sleep on a latch; after it the waiter re-examines the word, and a holder seen
/// for this long is checked for death.
pub(crate) const LATCH_SLEEP: Duration = Duration::from_millis(10);

/// A latch over an `AtomicU32` in the segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latch<'a> {
    word: &'a AtomicU32,
}

/// Holds a latch; unlocks on drop.
#[derive(Debug)]
#[must_use]
pub(crate) struct LatchGuard<'a> {
    word: &'a AtomicU32,
    recovered: Option<u32>,
}

impl LatchGuard<'_> {
    /// The id of a dead holder whose latch this guard took over: its critical section may be
    /// half done, and the caller must repair what the latch guards before using it.
    pub(crate) fn recovered(&self) -> Option<u32> {
        self.recovered
    }
}

impl<'a> Latch<'a> {
    /// A latch over `word`.
    pub(crate) fn new(word: &'a AtomicU32) -> Self {
        Latch { word }
    }

    /// Takes the latch for `id` (non-zero, below bit 31). `dead(holder)` tells whether a holder
    /// that has kept the latch for a while is dead; it is asked only on that slow path.
    #[inline]
    pub(crate) fn lock(self, id: u32, dead: &dyn Fn(u32) -> bool) -> LatchGuard<'a> {
        debug_assert!(id != 0 && id & WAITERS == 0);
        let mut recovered = None;
        if self
            .word
            .compare_exchange(0, id, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            recovered = self.lock_slow(id, dead);
        }
        LatchGuard {
            word: self.word,
            recovered,
        }
    }

    /// Takes the latch for `id` only if it is free now: never waits, never takes over a dead
    /// holder's latch (so never leads to a repair). For readers that must see a quiet shard
    /// without changing it ([`LockTable::check_headers`](super::LockTable::check_headers)).
    pub(crate) fn try_lock(self, id: u32) -> Option<LatchGuard<'a>> {
        self.word
            .compare_exchange(0, id, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| LatchGuard {
                word: self.word,
                recovered: None,
            })
    }

    /// Takes the latch over, as `id`, from `holder` if the word still names it: for a holder
    /// known to run no critical section (one named by a garbage word). The guard reports the
    /// holder as `recovered`, so the caller repairs what it guards.
    pub(crate) fn take_over(self, holder: u32, id: u32) -> Option<LatchGuard<'a>> {
        let w = self.word.load(Ordering::Relaxed);
        if w & !WAITERS != holder || holder == 0 {
            return None;
        }
        self.word
            .compare_exchange(w, id | (w & WAITERS), Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| LatchGuard {
                word: self.word,
                recovered: Some(holder),
            })
    }

    #[cold]
    fn lock_slow(self, id: u32, dead: &dyn Fn(u32) -> bool) -> Option<u32> {
        for _ in 0..SPINS {
            std::hint::spin_loop();
            if self.word.load(Ordering::Relaxed) == 0
                && self
                    .word
                    .compare_exchange(0, id, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return None;
            }
        }
        // The holder we have been waiting on, and since when.
        let mut seen = (0, std::time::Instant::now());
        loop {
            let v = self.word.load(Ordering::Relaxed);
            if v == 0 {
                // Keep WAITERS: others may still sleep (as glibc's lock_wait does).
                if self
                    .word
                    .compare_exchange(0, id | WAITERS, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return None;
                }
                continue;
            }
            let holder = v & !WAITERS;
            if holder != seen.0 {
                seen = (holder, std::time::Instant::now());
            } else if seen.1.elapsed() >= LATCH_SLEEP && dead(holder) {
                if self
                    .word
                    .compare_exchange(v, id | (v & WAITERS), Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(holder);
                }
                continue;
            }
            if v & WAITERS == 0
                && self
                    .word
                    .compare_exchange(v, v | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            futex_wait(self.word, v | WAITERS, Some(LATCH_SLEEP));
        }
    }

    /// The current holder's id, 0 if free.
    pub(crate) fn holder(self) -> u32 {
        self.word.load(Ordering::Relaxed) & !WAITERS
    }
}

impl Drop for LatchGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.word.swap(0, Ordering::Release) & WAITERS != 0 {
            futex_wake(self.word, 1);
        }
    }
}
