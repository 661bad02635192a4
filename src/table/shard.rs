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
//! briefly, then sleeps on the word (shared futex) with a bounded timeout.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::pool::ListHead;
use crate::shm::sys::{futex_wait, futex_wake};

/// Per-shard header (256 bytes, 128-aligned so no two shards share a line or a line pair).
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub struct ShardHdr {
    /// The latch word (see the module docs).
    pub latch: AtomicU32,
    _pad0: AtomicU32,
    /// Last fencing token granted in this shard. Written under the latch.
    pub token: AtomicU64,
    /// Entry pool list heads (FREE, IDLE, HELD).
    pub entry_lists: [ListHead; 3],
    /// Hold pool list heads (FREE, HELD, WAITING, GRANTED).
    pub hold_lists: [ListHead; 4],
    /// Statistics, written under the latch: grants, contended requests, timeouts, handoffs.
    pub stats: [AtomicU64; 4],
    _reserved: [AtomicU64; 4],
}

// SAFETY: repr(C), atomics only, valid at zero, no pointers.
crate::impl_shm_safe!(ShardHdr);
const _: () = assert!(std::mem::size_of::<ShardHdr>() == 256 && std::mem::align_of::<ShardHdr>() == 128);

/// Index of `ShardHdr::stats`.
pub const STAT_GRANTS: usize = 0;
/// Index of `ShardHdr::stats`.
pub const STAT_WAITS: usize = 1;
/// Index of `ShardHdr::stats`.
pub const STAT_TIMEOUTS: usize = 2;
/// Index of `ShardHdr::stats`.
pub const STAT_HANDOFFS: usize = 3;

const WAITERS: u32 = 1 << 31;
const SPINS: u32 = 64;
/// Longest single sleep on a latch; after it the waiter re-examines the word.
const LATCH_SLEEP: Duration = Duration::from_millis(10);

/// A latch over an `AtomicU32` in the segment.
#[derive(Debug, Clone, Copy)]
pub struct Latch<'a> {
    word: &'a AtomicU32,
}

/// Holds a latch; unlocks on drop.
#[derive(Debug)]
#[must_use]
pub struct LatchGuard<'a> {
    word: &'a AtomicU32,
}

impl<'a> Latch<'a> {
    /// A latch over `word`.
    pub fn new(word: &'a AtomicU32) -> Self {
        Latch { word }
    }

    /// Takes the latch for `id` (non-zero, below bit 31).
    #[inline]
    pub fn lock(self, id: u32) -> LatchGuard<'a> {
        debug_assert!(id != 0 && id & WAITERS == 0);
        if self
            .word
            .compare_exchange(0, id, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_slow(id);
        }
        LatchGuard { word: self.word }
    }

    #[cold]
    fn lock_slow(self, id: u32) {
        for _ in 0..SPINS {
            std::hint::spin_loop();
            if self.word.load(Ordering::Relaxed) == 0
                && self
                    .word
                    .compare_exchange(0, id, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
        }
        loop {
            let v = self.word.load(Ordering::Relaxed);
            if v == 0 {
                // Keep WAITERS: others may still sleep (as glibc's lock_wait does).
                if self
                    .word
                    .compare_exchange(0, id | WAITERS, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
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
    pub fn holder(self) -> u32 {
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
