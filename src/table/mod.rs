//! The lock table: named locks in shards of fixed pools, locked and released by any process.
//!
//! # Layout
//! ```text
//! region 0  TableHdr            owner-pool latch and list heads
//! region 1  ShardHdr   x S      per shard: latch, fencing counter, pool list heads, stats
//! region 2  Entry      x S*E    lock entries; shard s owns [s*E, (s+1)*E)
//! region 3  PoolNode   x S*E    their pool nodes (state, stamp, links)
//! region 4  u64        x S*E*W  their names, W words each
//! region 5  u32        x S*B    hash buckets: head of a chain of entries, by index
//! region 6  Hold       x S*H    shared holds and waiting requests
//! region 7  PoolNode   x S*H    their pool nodes
//! region 8  Owner      x O      owner records
//! region 9  PoolNode   x O      their pool nodes
//! ```
//! A name's hash picks its shard (high bits) and bucket (low bits). Indices stored in a shard's
//! records are local to that shard.
//!
//! # Concurrency
//! Everything in a shard is read and written under the shard's latch, which is held for a few
//! dozen instructions: no syscall, allocation or wait happens under it (except waking a run of
//! shared waiters). Lock waits sleep on the waiter's own `Hold::futex`, outside the latch.
//!
//! # Fairness
//! A free lock may be taken by whoever asks ("barging"), which keeps the uncontended and lightly
//! contended paths fast. A release wakes only the oldest waiter, and until that waiter comes for
//! the lock its word stays open to fast CASes (see `open_to_barging`); a woken waiter that finds
//! the lock taken watches it for [`SPIN`] rounds before it sleeps again. Once the oldest waiter
//! has waited [`FAIR_AFTER`], the release hands the lock to it directly and new requests queue
//! behind it (parking_lot's "eventual fairness"). Shared requests queue behind any waiter, so
//! readers never starve a queued writer; a release that reaches shared waiters grants the whole
//! run of them.
//!
//! # Files
//! `layout.rs` creating, opening and validating the segment; `owners.rs` the owner pool;
//! `index.rs` the name index; `word.rs` the lock word's protocol (its state table is in
//! `entry.rs`, its model check in `model.rs`); `grant.rs` grants and releases under the latch;
//! `wait.rs` waiting; `reap.rs` dead owners, dead latch holders and shard repair; `inspect.rs`,
//! `page.rs`, `check.rs` read-only views; `shard.rs` the shard header and latch. Helpers that need
//! a shard and not the table are methods of `Shard`.

mod check;
mod entry;
mod grant;
mod index;
mod inspect;
mod layout;
#[cfg(test)]
mod model;
mod owners;
mod page;
mod reap;
#[cfg(feature = "gateway")]
mod session_end;
mod shard;
#[cfg(test)]
mod tests;
mod wait;
mod word;

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{self, Nanos};
use crate::config::{Capacities, Geometry};
use crate::error::{Error, HolderInfo, Result};
use crate::name::{self, LockName};
use crate::owner::{Owner, OwnerKind, OwnerState, ProcessId};
use crate::pool::{Idx, ListHead, PoolNode, StatePool};
use crate::shm::sys::futex_wake;
use crate::shm::{Region, RegionSpec, Segment, PARAMS};

pub use check::TableStats;
pub use entry::{
    lock_word, lw_gen, lw_val, Entry, EntryState, Hold, HoldState, Mode, COLLECTED, FAST_OWNER, FORCED, GRANTED,
    MODE_NONE, OWNER_DIED, SLOW, WAIT, WOKEN,
};
pub use inspect::{Activity, Forced, LockInfo, OwnerInfo, Party, PoolCounts};
pub use page::{Cursor, Page, PAGE_SCAN, SCAN_PER_LATCH};
pub use reap::{pid_latch_id, PID_ID};
pub(crate) use shard::{Latch, ShardHdr, STAT_GRANTS, STAT_HANDOFFS, STAT_REPAIRS, STAT_TIMEOUTS, STAT_WAITS};

/// Rounds (one pause each) a woken waiter, or a request about to queue behind a latched
/// exclusive hold, watches the lock before it sleeps.
pub const SPIN: u32 = 200;

/// Polls a fast lock request makes of a lock held fast by another owner before queueing, each
/// after [`SPIN_PAUSES`] pauses: with `pause` at ~25 ns (AMD Zen 4) that is ~40 us, about what a
/// sleep and a cross-CPU wake-up cost (spinning longer than that would waste more than it saves).
pub const SPIN_POLLS: u32 = 100;

/// Pauses between two polls of [`SPIN_POLLS`].
pub const SPIN_PAUSES: u32 = 16;

/// How long the oldest waiter may be passed over by barging requests before a release hands the
/// lock to it directly.
pub const FAIR_AFTER: Duration = Duration::from_micros(200);

pub(crate) const NIL: u32 = u32::MAX;

/// Table-wide header (region 0).
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub struct TableHdr {
    /// Latch over the owner pool and the supervisor fields; its id names a process by pid.
    pub owner_latch: AtomicU32,
    /// Pid of the supervisor (shmlockd), 0 if none has claimed the segment.
    pub supervisor_pid: AtomicU32,
    /// Owner pool list heads (FREE, LIVE, REAPING).
    pub owner_lists: [ListHead; 3],
    /// Start time of the supervisor's process (with its pid, immune to pid reuse).
    pub supervisor_start: AtomicU64,
    /// Bumped (and woken, as a futex) by every registration, so the supervisor watches a new
    /// owner's process at once.
    pub registrations: AtomicU32,
    _pad: AtomicU32,
    /// Owners reaped since creation.
    pub reaps: AtomicU64,
    /// Fast grants of owners no longer registered (see `Owner::fast_grants`).
    pub retired_fast_grants: AtomicU64,
    _reserved: [AtomicU64; 5],
}
// SAFETY: repr(C), atomics only, valid at zero, no pointers.
crate::shm::impl_shm_safe!(TableHdr);
const _: () = assert!(std::mem::size_of::<TableHdr>() == 128);

// Header params (shm::Header::params) owned by the table.
const P_SHARDS: usize = 0;
const P_ENTRIES: usize = 1;
const P_HOLDS: usize = 2;
const P_BUCKETS: usize = 3;
const P_OWNERS: usize = 4;
const P_NAME_LEN: usize = 5;
const P_NAME_WORDS: usize = 6;
const P_SEED: usize = 7;
const P_MAX_LOCKS: usize = 8;
const P_MAX_HOLDS: usize = 9;

/// What `lock` does when the lock is not free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Return `WouldBlock`.
    No,
    /// Wait until this CLOCK_MONOTONIC instant.
    Until(Nanos),
    /// Wait as long as it takes.
    Forever,
}

/// Asked after each of a waiter's sleeps whether its caller wants to give up (a signal arrived,
/// a session was cancelled): true withdraws the request with [`Error::Interrupted`].
pub(crate) type Interrupt<'a> = &'a mut dyn FnMut() -> bool;

/// The [`Interrupt`] of a caller that never gives up early.
pub(crate) fn never() -> bool {
    false
}

/// An owner as the table knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OwnerRef {
    pub(crate) idx: u32,
    pub(crate) gen: u32,
}

impl OwnerRef {
    fn latch_id(self) -> u32 {
        self.idx + 1
    }
}

/// A grant as the table knows it; the client wraps it in a guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawGrant {
    pub(crate) shard: u32,
    pub(crate) entry: u32,
    /// The Hold of a shared grant; NIL for exclusive ones.
    pub(crate) hold: u32,
    pub(crate) token: u64,
    pub(crate) owner_died: bool,
    pub(crate) mode: Mode,
    /// The entry's generation at the grant (a fast unlock CASes the lock word against it).
    pub(crate) gen: u32,
}

impl RawGrant {
    /// The grant of an existing hold, rebuilt from the table (for releases by name or cleanup).
    fn existing(shard: u32, entry: u32, hold: u32, token: u64, mode: Mode) -> RawGrant {
        RawGrant {
            shard,
            entry,
            hold,
            token,
            owner_died: false,
            mode,
            gen: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Regions {
    hdr: Region<TableHdr>,
    shards: Region<ShardHdr>,
    entries: Region<Entry>,
    entry_nodes: Region<PoolNode>,
    names: Region<AtomicU64>,
    buckets: Region<AtomicU16>,
    holds: Region<Hold>,
    hold_nodes: Region<PoolNode>,
    owners: Region<Owner>,
    owner_nodes: Region<PoolNode>,
}

/// One shard, its records resolved on demand (each accessor is a bounds check and an add).
struct Shard<'a> {
    no: u32,
    t: &'a LockTable,
    hdr: &'a ShardHdr,
    words: usize,
}

impl<'a> Shard<'a> {
    #[inline]
    fn span(&self, per: u32) -> std::ops::Range<usize> {
        let (i, per) = (self.no as usize, per as usize);
        i * per..(i + 1) * per
    }
    #[inline]
    fn entries(&self) -> &'a [Entry] {
        &self.t.seg.slice(self.t.r.entries)[self.span(self.t.geo.entries_per_shard)]
    }
    #[inline]
    fn epool(&self) -> StatePool<'a, EntryState> {
        StatePool::new(
            &self.t.seg.slice(self.t.r.entry_nodes)[self.span(self.t.geo.entries_per_shard)],
            &self.hdr.entry_lists,
        )
    }
    #[inline]
    fn names(&self) -> &'a [AtomicU64] {
        &self.t.seg.slice(self.t.r.names)[self.span(self.t.geo.entries_per_shard * self.t.geo.name_words)]
    }
    #[inline]
    fn buckets(&self) -> &'a [AtomicU16] {
        &self.t.seg.slice(self.t.r.buckets)[self.span(self.t.geo.buckets_per_shard)]
    }
    #[inline]
    fn holds(&self) -> &'a [Hold] {
        &self.t.seg.slice(self.t.r.holds)[self.span(self.t.geo.holds_per_shard)]
    }
    #[inline]
    fn hpool(&self) -> StatePool<'a, HoldState> {
        StatePool::new(
            &self.t.seg.slice(self.t.r.hold_nodes)[self.span(self.t.geo.holds_per_shard)],
            &self.hdr.hold_lists,
        )
    }
}

impl<'a> Shard<'a> {
    #[inline]
    fn entry(&self, e: u32) -> Result<&'a Entry> {
        self.entries()
            .get(e as usize)
            .ok_or_else(|| corrupt(format!("shard {} entry {e} out of range", self.no)))
    }
    #[inline]
    fn hold(&self, h: u32) -> Result<&'a Hold> {
        self.holds()
            .get(h as usize)
            .ok_or_else(|| corrupt(format!("shard {} hold {h} out of range", self.no)))
    }
    /// The next fencing token for entry `e` (latch held): above the shard's counter, which is
    /// the floor for entries inserted later, and above the entry's own last token, which fast
    /// grants raise without the latch.
    ///
    /// Both are read from the segment: a counter at `u64::MAX` (only a corruption gets there; a
    /// real one would need centuries) is an error, never an overflow or a repeated token.
    fn next_token(&self, e: &Entry) -> Result<u64> {
        let last = self.hdr.token.load(Relaxed).max(e.last_token());
        let t = last.checked_add(1).ok_or_else(|| {
            corrupt(format!(
                "shard {} fencing token counter {last} cannot grow (run `shmlock check`)",
                self.no
            ))
        })?;
        self.hdr.token.store(t, Relaxed);
        Ok(t)
    }
    fn bump(&self, stat: usize) {
        let s = &self.hdr.stats[stat];
        s.store(s.load(Relaxed).wrapping_add(1), Relaxed);
    }
}

/// A bucket's chain head: an entry index, or NIL for an empty bucket (stored as `u16::MAX`).
#[inline(always)]
fn head(b: &AtomicU16, order: std::sync::atomic::Ordering) -> u32 {
    match b.load(order) {
        u16::MAX => NIL,
        v => u32::from(v),
    }
}

/// Makes entry `i` (below [`MAX_ENTRIES_PER_SHARD`](crate::config::MAX_ENTRIES_PER_SHARD), or
/// NIL for none) the head of bucket `b`.
#[inline(always)]
fn set_head(b: &AtomicU16, i: u32, order: std::sync::atomic::Ordering) {
    debug_assert!(i == NIL || i < crate::config::MAX_ENTRIES_PER_SHARD);
    b.store(if i == NIL { u16::MAX } else { i as u16 }, order);
}

fn corrupt(what: String) -> Error {
    Error::Corrupt { what }
}

/// The lock table over a mapped segment.
#[derive(Debug)]
pub struct LockTable {
    seg: Arc<Segment>,
    geo: Geometry,
    seed: u64,
    r: Regions,
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(clock::now().0);
    h.write_u32(std::process::id());
    h.finish()
}
