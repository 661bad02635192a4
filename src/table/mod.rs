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

mod check;
mod entry;
mod inspect;
#[cfg(test)]
mod model;
mod page;
mod reap;
#[cfg(feature = "gateway")]
mod session_end;
mod shard;
#[cfg(test)]
mod tests;
mod wait;

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
pub use inspect::{Forced, LockInfo, OwnerInfo, Party, PoolCounts};
pub use page::{Cursor, Page, PAGE_SCAN, SCAN_PER_LATCH};
pub use reap::{pid_latch_id, PID_ID};
pub(crate) use shard::{Latch, ShardHdr, STAT_GRANTS, STAT_HANDOFFS, STAT_REPAIRS, STAT_TIMEOUTS, STAT_WAITS};

/// Rounds a fast lock request watches a lock held fast by another owner before queueing.
pub const SPIN: u32 = 200;

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

impl LockTable {
    /// Creates segment `name` sized for `caps`. Fails if it exists.
    pub fn create(name: &str, caps: &Capacities) -> Result<LockTable> {
        let geo = caps.geometry()?;
        let (specs, params) = Self::plan(&geo, caps);
        let seg = Segment::create(name, &specs, &params, caps.mode, caps.owner, |s| Self::init(s, &geo))?;
        Self::from_segment(Arc::new(seg))
    }

    /// Opens an existing segment (owned as `$SHMLOCK_SEGMENT_OWNER` says: see [`Segment::open`]).
    pub fn open(name: &str) -> Result<LockTable> {
        Self::from_segment(Arc::new(Segment::open(name)?))
    }

    /// Opens an existing segment whose file is owned as `owner` requires.
    pub fn open_as(name: &str, owner: crate::shm::SegmentOwner) -> Result<LockTable> {
        Self::from_segment(Arc::new(Segment::open_as(name, owner)?))
    }

    /// Opens segment `name`, creating it with `caps` if it does not exist.
    pub fn create_or_open(name: &str, caps: &Capacities) -> Result<LockTable> {
        match Self::open(name) {
            Err(Error::SegmentMissing { .. }) => match Self::create(name, caps) {
                Err(Error::SegmentExists { .. }) => Self::open(name),
                other => other,
            },
            other => other,
        }
    }

    /// A table in anonymous shared memory (shared with forked children only).
    pub fn anonymous(caps: &Capacities) -> Result<LockTable> {
        let geo = caps.geometry()?;
        let (specs, params) = Self::plan(&geo, caps);
        let seg = Segment::anonymous(&specs, &params, |s| Self::init(s, &geo))?;
        Self::from_segment(Arc::new(seg))
    }

    fn plan(g: &Geometry, caps: &Capacities) -> (Vec<RegionSpec>, [u64; PARAMS]) {
        let (s, e, h, b, o) = (
            u64::from(g.shards),
            u64::from(g.entries_per_shard),
            u64::from(g.holds_per_shard),
            u64::from(g.buckets_per_shard),
            u64::from(g.owners),
        );
        let specs = vec![
            RegionSpec::of::<TableHdr>(1),
            RegionSpec::of::<ShardHdr>(s),
            RegionSpec::of::<Entry>(s * e),
            RegionSpec::of::<PoolNode>(s * e),
            RegionSpec::of::<AtomicU64>(s * e * u64::from(g.name_words)),
            RegionSpec::of::<AtomicU16>(s * b),
            RegionSpec::of::<Hold>(s * h),
            RegionSpec::of::<PoolNode>(s * h),
            RegionSpec::of::<Owner>(o),
            RegionSpec::of::<PoolNode>(o),
        ];
        let mut p = [0u64; PARAMS];
        p[P_SHARDS] = s;
        p[P_ENTRIES] = e;
        p[P_HOLDS] = h;
        p[P_BUCKETS] = b;
        p[P_OWNERS] = o;
        p[P_NAME_LEN] = u64::from(g.max_name_len);
        p[P_NAME_WORDS] = u64::from(g.name_words);
        p[P_SEED] = random_seed();
        p[P_MAX_LOCKS] = u64::from(caps.max_locks);
        p[P_MAX_HOLDS] = u64::from(caps.max_holds);
        (specs, p)
    }

    /// Bytes a segment for `caps` occupies.
    pub fn segment_size(caps: &Capacities) -> Result<u64> {
        let geo = caps.geometry()?;
        let (specs, _) = Self::plan(&geo, caps);
        crate::shm::layout::plan(&specs)
            .map(|(_, total)| total)
            .ok_or(Error::Config {
                key: "capacities",
                why: "segment size overflows".into(),
            })
    }

    fn init(seg: &Segment, g: &Geometry) -> Result<()> {
        let r = Self::regions(seg)?;
        let now = clock::now();
        for e in seg.slice(r.entries) {
            for w in [&e.next, &e.owner, &e.reader_head, &e.wait_head, &e.wait_tail] {
                w.store(NIL, Relaxed);
            }
            e.lw.store(lock_word(0, SLOW), Relaxed); // FREE: no fast CAS may touch it
        }
        for h in seg.slice(r.holds) {
            for w in [&h.entry, &h.owner, &h.next, &h.prev] {
                w.store(NIL, Relaxed);
            }
        }
        for b in seg.slice(r.buckets) {
            set_head(b, NIL, Relaxed);
        }
        let (e, h) = (g.entries_per_shard as usize, g.holds_per_shard as usize);
        let (en, hn) = (seg.slice(r.entry_nodes), seg.slice(r.hold_nodes));
        for (s, hdr) in seg.slice(r.shards).iter().enumerate() {
            StatePool::<EntryState>::new(&en[s * e..(s + 1) * e], &hdr.entry_lists).init(now);
            StatePool::<HoldState>::new(&hn[s * h..(s + 1) * h], &hdr.hold_lists).init(now);
        }
        let hdr = &seg.slice(r.hdr)[0];
        StatePool::<OwnerState>::new(seg.slice(r.owner_nodes), &hdr.owner_lists).init(now);
        Ok(())
    }

    fn regions(seg: &Segment) -> Result<Regions> {
        Ok(Regions {
            hdr: seg.region(0)?,
            shards: seg.region(1)?,
            entries: seg.region(2)?,
            entry_nodes: seg.region(3)?,
            names: seg.region(4)?,
            buckets: seg.region(5)?,
            holds: seg.region(6)?,
            hold_nodes: seg.region(7)?,
            owners: seg.region(8)?,
            owner_nodes: seg.region(9)?,
        })
    }

    fn from_segment(seg: Arc<Segment>) -> Result<LockTable> {
        let p = |i: usize| seg.header().params[i].load(Relaxed);
        let as_u32 = |i: usize, what: &str| {
            u32::try_from(p(i)).map_err(|_| corrupt(format!("{what} parameter {} out of range", p(i))))
        };
        let geo = Geometry {
            shards: as_u32(P_SHARDS, "shards")?,
            entries_per_shard: as_u32(P_ENTRIES, "entries")?,
            holds_per_shard: as_u32(P_HOLDS, "holds")?,
            buckets_per_shard: as_u32(P_BUCKETS, "buckets")?,
            owners: as_u32(P_OWNERS, "owners")?,
            max_name_len: as_u32(P_NAME_LEN, "name length")?,
            name_words: as_u32(P_NAME_WORDS, "name words")?,
        };
        let r = Self::regions(&seg)?;
        let (s, e, h, b, w) = (
            geo.shards as usize,
            geo.entries_per_shard as usize,
            geo.holds_per_shard as usize,
            geo.buckets_per_shard as usize,
            geo.name_words as usize,
        );
        // An owner is named in the lock word as its index + 1 in FAST_OWNER's bits (and in a
        // latch word below PID_ID): more owners than that would make two owners one.
        if geo.owners > FAST_OWNER {
            return Err(corrupt(format!(
                "owner count {} is beyond what the lock word can name ({FAST_OWNER})",
                geo.owners
            )));
        }
        let ok = s.is_power_of_two()
            && b >= 1
            && e <= crate::config::MAX_ENTRIES_PER_SHARD as usize
            && e >= 1
            && e < NIL as usize
            && h < NIL as usize
            && (geo.owners as usize) < NIL as usize - 1
            && w * 8 >= geo.max_name_len as usize
            && r.hdr.len() == 1
            && r.shards.len() == s
            && r.entries.len() == s * e
            && r.entry_nodes.len() == s * e
            && r.names.len() == s * e * w
            && r.buckets.len() == s * b
            && r.holds.len() == s * h
            && r.hold_nodes.len() == s * h
            && r.owners.len() == geo.owners as usize
            && r.owner_nodes.len() == geo.owners as usize;
        if !ok {
            return Err(corrupt(format!("table geometry {geo:?} does not match its regions")));
        }
        Ok(LockTable {
            seed: p(P_SEED),
            seg,
            geo,
            r,
        })
    }

    /// The segment.
    pub fn segment(&self) -> &Segment {
        &self.seg
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The capacities the segment was created with (max_locks and max_holds as requested).
    pub fn requested(&self) -> (u64, u64) {
        let p = &self.seg.header().params;
        (p[P_MAX_LOCKS].load(Relaxed), p[P_MAX_HOLDS].load(Relaxed))
    }

    #[inline]
    fn shard(&self, s: u32) -> Shard<'_> {
        Shard {
            no: s,
            t: self,
            hdr: &self.seg.slice(self.r.shards)[s as usize],
            words: self.geo.name_words as usize,
        }
    }

    pub(crate) fn table_hdr(&self) -> &TableHdr {
        &self.seg.slice(self.r.hdr)[0]
    }

    fn owner_pool(&self) -> StatePool<'_, OwnerState> {
        StatePool::new(self.seg.slice(self.r.owner_nodes), &self.table_hdr().owner_lists)
    }

    #[inline]
    fn owners(&self) -> &[Owner] {
        self.seg.slice(self.r.owners)
    }

    /// Moves owner `idx`'s fast-grant count into the table's (owner latch held).
    fn retire_fast_grants(&self, idx: u32) {
        if let Some(o) = self.owners().get(idx as usize) {
            let hdr = self.table_hdr();
            let n = o.fast_grants.swap(0, Relaxed);
            hdr.retired_fast_grants
                .store(hdr.retired_fast_grants.load(Relaxed).wrapping_add(n), Relaxed);
        }
    }

    pub(crate) fn owners_slice(&self) -> &[Owner] {
        self.owners()
    }

    /// Owner records in state LIVE (read without the latch: a snapshot only when quiet).
    pub(crate) fn live_owners(&self) -> impl Iterator<Item = &Owner> + '_ {
        self.owner_pool()
            .iter(OwnerState::Live)
            .filter_map(|(i, _)| self.owners().get(i.get()))
    }

    /// The shard that `name` lives in (any bytes; an invalid name maps somewhere harmless).
    #[cfg(feature = "gateway")]
    pub(crate) fn shard_of_name(&self, name: &[u8]) -> u32 {
        self.shard_of(name::hash(self.seed, name))
    }

    #[inline]
    fn shard_of(&self, h: u64) -> u32 {
        ((h >> 40) as u32) & (self.geo.shards - 1)
    }

    // ---- owners ----------------------------------------------------------------------------

    pub(crate) fn register(&self, kind: OwnerKind, label: &[u8]) -> Result<OwnerRef> {
        let deadline = clock::now().plus(Duration::from_secs(2));
        loop {
            let registered = {
                let _g = self.lock_owners();
                // Retired under this latch by `remove_if_unused` (shmlockd --remove-on-exit).
                if let Some(pid) = self.seg.retired_by() {
                    return Err(Error::SegmentRemoved {
                        name: self.seg.name().to_string(),
                        pid,
                    });
                }
                self.owner_pool()
                    .newest(OwnerState::Free)
                    .map(|idx| self.register_at(idx, kind, label))
            };
            if let Some(r) = registered {
                if r.is_ok() {
                    // Without shmlockd, nobody else may ever finish the reap of an owner whose
                    // reaper died after releasing its locks (nothing it held is asked for).
                    if let Err(e) = self.finish_abandoned_reaps(pid_latch_id()) {
                        tracing::warn!("finishing abandoned reaps: {e}");
                    }
                }
                return r;
            }
            // Without shmlockd, owners of dead processes that nobody waited on are still
            // registered: reap them before calling the pool full. Processes starting together
            // all get here; one that finds the dead already being reaped by another waits for
            // that reaper to free them.
            let reaped = self.reap_dead(pid_latch_id())? > 0;
            let reaping = self.owner_pool().count(OwnerState::Reaping) > 0;
            if !(reaped || reaping) || clock::now() >= deadline {
                return Err(Error::PoolFull {
                    pool: "owner",
                    shard: None,
                    capacity: self.geo.owners,
                });
            }
            if !reaped {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Fills the FREE owner record `idx` for this process and makes it LIVE (owner latch held).
    fn register_at(&self, idx: Idx, kind: OwnerKind, label: &[u8]) -> Result<OwnerRef> {
        let me = ProcessId::current();
        let pool = self.owner_pool();
        let o = &self.owners()[idx.get()];
        o.pid.store(me.pid, Relaxed);
        o.start_time.store(me.start_time, Relaxed);
        o.kind.store(kind as u32, Relaxed);
        o.fast_grants.store(0, Relaxed);
        // Due for a check as soon as it keeps a lock from someone (it may die at once).
        o.checked.store(
            clock::coarse()
                .millis32()
                .wrapping_sub(reap::CHECK_PERIOD.as_millis() as u32),
            Relaxed,
        );
        o.set_label(label);
        let gen = o.gen.load(Relaxed).wrapping_add(1);
        o.gen.store(gen, Relaxed);
        self.recover_latches_naming(OwnerRef { idx: idx.0, gen }.latch_id());
        // The record is complete; publish it as LIVE last.
        pool.transition(idx, OwnerState::Free, OwnerState::Live, clock::now())?;
        let hdr = self.table_hdr();
        hdr.registrations.store(
            hdr.registrations.load(Relaxed).wrapping_add(1),
            std::sync::atomic::Ordering::Release,
        );
        futex_wake(&hdr.registrations, u32::MAX);
        Ok(OwnerRef { idx: idx.0, gen })
    }

    /// Takes over (and repairs) every shard latch whose word names latch id `id` of a FREE owner
    /// record about to be registered (owner latch held). No real holder leaves such a word (a
    /// dead owner's latches are taken over while it is reaped, before its record is FREE), so
    /// it is garbage; left in place, it would name a live holder, the new owner, that never lets
    /// go, and every process on the shard would wait for ever (the new owner included).
    fn recover_latches_naming(&self, id: u32) {
        for s in 0..self.geo.shards {
            let sh = self.shard(s);
            if Latch::new(&sh.hdr.latch).holder() != id {
                continue;
            }
            if let Some(g) = Latch::new(&sh.hdr.latch).take_over(id, pid_latch_id()) {
                tracing::warn!(
                    shard = sh.no,
                    id,
                    "a shard latch names a free owner record; repairing the shard"
                );
                if let Err(e) = self.repair(&sh) {
                    tracing::error!(shard = sh.no, "shard repair failed: {e}");
                }
                sh.bump(STAT_REPAIRS);
                drop(g);
            }
        }
    }

    pub(crate) fn deregister(&self, me: OwnerRef) -> Result<()> {
        let _g = self.lock_owners();
        self.retire_fast_grants(me.idx);
        self.owner_pool()
            .transition(Idx(me.idx), OwnerState::Live, OwnerState::Free, clock::now())
    }

    // ---- the index -------------------------------------------------------------------------

    /// The bucket of hash `h` in its shard: the low 32 bits scaled to the bucket count
    /// (multiply and shift, so the count need not be a power of two; the shard comes from bits
    /// 40 and up).
    #[inline]
    fn bucket_of(&self, h: u64) -> usize {
        ((u64::from(h as u32) * u64::from(self.geo.buckets_per_shard)) >> 32) as usize
    }

    #[inline(always)]
    fn name_eq(sh: &Shard<'_>, e: usize, name: &[u8]) -> bool {
        let words = &sh.names()[e * sh.words..(e + 1) * sh.words];
        words
            .iter()
            .zip(name.chunks(8))
            .all(|(w, c)| w.load(Relaxed) == name::word(c))
    }

    #[inline]
    fn lookup(&self, sh: &Shard<'_>, h: u64, name: &[u8]) -> Option<u32> {
        let mut cur = head(&sh.buckets()[self.bucket_of(h)], Relaxed);
        let mut steps = sh.entries().len();
        while let Some(e) = sh.entries().get(cur as usize) {
            if e.hash.load(Relaxed) == h
                && e.name_len.load(Relaxed) as usize == name.len()
                && Self::name_eq(sh, cur as usize, name)
            {
                return Some(cur);
            }
            steps = steps.checked_sub(1)?;
            cur = e.next.load(Relaxed);
        }
        None
    }

    /// Removes entry `i` from its bucket chain.
    fn unlink_from_bucket(&self, sh: &Shard<'_>, i: u32) -> Result<()> {
        let e = sh.entry(i)?;
        let b = &sh.buckets()[self.bucket_of(e.hash.load(Relaxed))];
        let mut cur = head(b, Relaxed);
        if cur == i {
            set_head(b, e.next.load(Relaxed), Relaxed);
            return Ok(());
        }
        for _ in 0..sh.entries().len() {
            let c = sh.entry(cur)?;
            let next = c.next.load(Relaxed);
            if next == i {
                c.next.store(e.next.load(Relaxed), Relaxed);
                return Ok(());
            }
            cur = next;
        }
        Err(corrupt(format!("shard {} entry {i} is not on its bucket chain", sh.no)))
    }

    /// Puts `name` in the index as an IDLE entry, taking a free entry or evicting the
    /// least recently used idle one. The entry is filled in while FREE and published (IDLE, then
    /// chained) last, so a process killed half way leaves a FREE entry or a complete unchained
    /// one, which [`repair`](Self::repair) chains.
    fn insert(&self, sh: &Shard<'_>, h: u64, name: &[u8], now: Nanos) -> Result<u32> {
        // Evict: an idle entry first (skipping any that turn out fast-held: pinning makes them
        // HELD), an entry that only carries an owner-died notice only when no idle one is left
        // (its notice is lost with it).
        let mut tries = sh.epool().count(EntryState::Idle);
        // Each round frees an entry or finds one fast-held (which pinning makes HELD), so a
        // consistent shard needs at most one round per entry; lists and counts torn by a
        // corruption must not keep us here, under the latch, for ever.
        let mut rounds = sh.entries().len() + 1;
        while sh.epool().count(EntryState::Free) == 0 {
            rounds = rounds.checked_sub(1).ok_or_else(|| {
                corrupt(format!(
                    "shard {} entry pool: no FREE entry counted and none could be evicted in {} rounds \
                     (its lists are torn; run `shmlock check`)",
                    sh.no,
                    sh.entries().len() + 1
                ))
            })?;
            let idle = if tries > 0 {
                sh.epool().oldest(EntryState::Idle)
            } else {
                None
            };
            tries = tries.saturating_sub(1);
            let victim = idle.map(|v| (v.0, EntryState::Idle));
            let Some((victim, state)) =
                victim.or_else(|| sh.epool().oldest(EntryState::Died).map(|v| (v.0, EntryState::Died)))
            else {
                return Err(Error::PoolFull {
                    pool: "lock entry",
                    shard: Some(sh.no),
                    capacity: sh.entries().len() as u32,
                });
            };
            Self::pin(sh, victim.0)?;
            if sh.epool().state(victim)? != state {
                continue; // it was fast-held
            }
            if state == EntryState::Died {
                tracing::warn!(shard = sh.no, "entry pool full: evicting a lock's owner-died notice");
            }
            let e = sh.entry(victim.0)?;
            self.unlink_from_bucket(sh, victim.0)?;
            // Fast grants raised the entry's token past the shard's counter: keep the counter a
            // floor for the names inserted later.
            sh.hdr
                .token
                .store(sh.hdr.token.load(Relaxed).max(e.last_token()), Relaxed);
            e.set_word(lw_gen(e.lw.load(Relaxed)).wrapping_add(1), SLOW);
            sh.epool().transition(victim, state, EntryState::Free, now)?;
        }
        let i = sh
            .epool()
            .newest(EntryState::Free)
            .ok_or_else(|| corrupt(format!("shard {} entry pool lists are torn", sh.no)))?
            .0;
        let e = sh.entry(i)?;
        let words = &sh.names()[i as usize * sh.words..(i as usize + 1) * sh.words];
        let mut chunks = name.chunks(8);
        for w in words {
            w.store(chunks.next().map_or(0, name::word), Relaxed);
        }
        e.hash.store(h, Relaxed);
        e.name_len.store(name.len() as u16, Relaxed);
        e.mode.store(MODE_NONE, Relaxed);
        e.owner.store(NIL, Relaxed);
        e.readers.store(0, Relaxed);
        e.reader_head.store(NIL, Relaxed);
        e.wait_head.store(NIL, Relaxed);
        e.wait_tail.store(NIL, Relaxed);
        e.waiters.store(0, Relaxed);
        e.set_died(false);
        e.set_word(lw_gen(e.lw.load(Relaxed)).wrapping_add(1), SLOW);
        e.set_last_token(sh.hdr.token.load(Relaxed));
        crate::chaos::point();
        sh.epool().transition(Idx(i), EntryState::Free, EntryState::Idle, now)?;
        crate::chaos::point();
        let b = &sh.buckets()[self.bucket_of(h)];
        e.next.store(head(b, Relaxed), Relaxed);
        // Release: a lookup without the latch that reaches the entry sees its name.
        set_head(b, i, std::sync::atomic::Ordering::Release);
        Ok(i)
    }

    /// Pins entry `i` for a latched section (see [`entry`]): sets SLOW so no fast CAS can change
    /// its lock word, and turns a fast hold into the latched form (mode, owner, pool state HELD).
    fn pin(sh: &Shard<'_>, i: u32) -> Result<()> {
        let e = sh.entry(i)?;
        let old = e.lw.fetch_or(u64::from(SLOW), std::sync::atomic::Ordering::Acquire);
        let holder = lw_val(old) & FAST_OWNER;
        if holder != 0 {
            e.lw.store(lock_word(lw_gen(old), SLOW), Relaxed);
            e.owner.store(holder - 1, Relaxed);
            e.mode.store(Mode::Exclusive.to_u32(), Relaxed);
            // Its grant moved nothing in the pool; the stamp is from when the latch first saw it.
            if let s @ (EntryState::Idle | EntryState::Died) = sh.epool().state(Idx(i))? {
                sh.epool().transition(Idx(i), s, EntryState::Held, clock::coarse())?;
            }
        }
        Ok(())
    }

    /// Pins every fast hold in shard `sh` (of owner `who` only, if given), so that the HELD list
    /// names every holder. For inspection, `check` and reaping; the latch is held.
    fn pin_fast_holds(sh: &Shard<'_>, who: Option<u32>) -> Result<()> {
        // Fast holds sit on IDLE entries, and on HELD ones whose word was opened while their
        // head waiter was awake (see `publish`).
        let fast: Vec<u32> = sh
            .epool()
            .iter(EntryState::Idle)
            .chain(sh.epool().iter(EntryState::Held))
            .map(|(i, _)| i.0)
            .filter(|&i| {
                let holder = sh.entries()[i as usize].lw.load(Relaxed) as u32 & FAST_OWNER;
                holder != 0 && who.is_none_or(|w| holder == w + 1)
            })
            .collect();
        for i in fast {
            Self::pin(sh, i)?;
        }
        Ok(())
    }

    /// Ends a latched section on entry `i`: if the lock is free and needs nothing of the latch,
    /// opens it to fast CASes again. That is when it is IDLE (no holders, waiters or notice), and
    /// also when it is free with exclusive waiters whose head has been woken and has not waited
    /// [`FAIR_AFTER`] yet (see [`open_to_barging`](Self::open_to_barging)).
    fn publish(sh: &Shard<'_>, i: u32) {
        let Some(e) = sh.entries().get(i as usize) else { return };
        let w = e.lw.load(Relaxed);
        if lw_val(w) != SLOW {
            // Granted as a fast hold in this section, or already open (published earlier in
            // it): only a pinned word is safe to store, since no CAS can change it meanwhile.
            // Storing over an open one could wipe out a fast hold taken since it was read.
            return;
        }
        let free = e.mode.load(Relaxed) == MODE_NONE && e.readers.load(Relaxed) == 0 && !e.died();
        let open = free
            && match sh.epool().state(Idx(i)) {
                Ok(EntryState::Idle) => e.waiters.load(Relaxed) == 0,
                Ok(EntryState::Held) => Self::open_to_barging(sh, e),
                _ => false,
            };
        if open {
            // A new generation: a fast CAS that read the word before this section fails, so no
            // fast grant takes a token from a base this section may have moved.
            e.set_word(lw_gen(w).wrapping_add(1), 0);
        }
    }

    /// May the free entry `e`, which has waiters, be taken by fast CASes until its oldest waiter
    /// comes for it? Yes while that waiter wants exclusive mode, is already woken (`WOKEN`: it
    /// will take the latch and look, so no release needs to wake it) and has not waited
    /// [`FAIR_AFTER`]. This is a futex mutex's rule: a release wakes one waiter, and until it
    /// runs (a cross-CPU wake-up is tens of microseconds) the lock goes to whoever asks, at the
    /// price of one CAS instead of two latched sections. The waiter that finds the lock taken
    /// pins the entry again (so the holder's release is latched and wakes it) and sleeps; once it
    /// has waited `FAIR_AFTER` the word stays closed and the next release hands the lock to it.
    fn open_to_barging(sh: &Shard<'_>, e: &Entry) -> bool {
        let head = e.wait_head.load(Relaxed);
        sh.holds().get(head as usize).is_some_and(|h| {
            h.futex.load(Relaxed) == WOKEN
                && h.mode.load(Relaxed) == Mode::Exclusive.to_u32()
                && !Self::starving(sh, head)
        })
    }

    /// The exclusive lock of `me` on `name` by one CAS on the entry's lock word, without the
    /// latch; `None` sends the caller to the latched path (name not indexed, lock not free, or
    /// the entry changed under us). With `spin`, a lock held fast by another owner (so nobody is
    /// queued) is watched for [`SPIN`] rounds before giving up: a critical section is usually far
    /// shorter than the sleep and cross-CPU wake-up that queueing costs.
    #[inline(always)]
    fn try_fast(&self, sh: &Shard<'_>, h: u64, name: &[u8], me: OwnerRef, spin: bool) -> Option<Result<RawGrant>> {
        use std::sync::atomic::Ordering::Acquire;
        let entries = sh.entries();
        let mut cur = head(&sh.buckets()[self.bucket_of(h)], Acquire);
        for _ in 0..entries.len() {
            let Some(e) = entries.get(cur as usize) else {
                // Not in the index: the latched path will insert it.
                Self::prefetch_insert(sh);
                return None;
            };
            if e.hash.load(Relaxed) == h {
                // Read the word before the name: if the CAS below succeeds, the entry was not
                // reused in between (reuse pins, then bumps the generation), so the name held.
                let w = e.lw.load(Acquire);
                if e.name_len.load(Relaxed) as usize == name.len() && Self::name_eq(sh, cur as usize, name) {
                    return match lw_val(w) {
                        0 => self.fast_grant(sh, e, cur, w, me).map(Ok),
                        v if v == me.idx + 1 => Some(Err(Error::AlreadyHeld)),
                        v if spin && v & SLOW == 0 => self.spin_fast(sh, e, cur, w, me).map(Ok),
                        _ => None,
                    };
                }
            }
            cur = e.next.load(Acquire);
        }
        None
    }

    /// Starts the cache misses of an [`insert`](Self::insert): the shard's newest FREE entry (the
    /// one insert takes, if nobody takes it first), its pool node and its name. Called by a
    /// lookup that misses, before it takes the latch, and by each insert for the next one, once
    /// its latch is dropped; so under the latch these lines are found in the cache instead of
    /// fetched one after the other. Reads the FREE list head without the latch: at worst it
    /// prefetches the wrong record.
    #[cold]
    #[inline(never)]
    fn prefetch_insert(sh: &Shard<'_>) {
        if let Some(i) = sh.epool().newest_hint(EntryState::Free) {
            if let Some(e) = sh.entries().get(i.get()) {
                crate::shm::sys::prefetch(e);
            }
            if let Some(w) = sh.names().get(i.get() * sh.words) {
                crate::shm::sys::prefetch(w);
            }
        }
    }

    /// Watches a word `w` held fast by another owner for [`SPIN`] rounds and takes it if it
    /// comes free; `None` once it is held longer, reused, or taken over by the latch. Out of line:
    /// the uncontended path stays small enough to inline.
    #[inline(never)]
    fn spin_fast(&self, sh: &Shard<'_>, e: &Entry, i: u32, w: u64, me: OwnerRef) -> Option<RawGrant> {
        let free = lock_word(lw_gen(w), 0);
        for _ in 0..SPIN {
            std::hint::spin_loop();
            // Acquire, as in `try_fast`: the grant reads the token base after the word.
            match e.lw.load(std::sync::atomic::Ordering::Acquire) {
                x if x == free => return self.fast_grant(sh, e, i, free, me),
                x if lw_gen(x) != lw_gen(w) || lw_val(x) & SLOW != 0 => return None,
                _ => {}
            }
        }
        None
    }

    /// The CAS of [`try_fast`](Self::try_fast) from the free word `w` (read with Acquire), and
    /// the grant it makes. The token is the entry's last token (the base read here, after `w`,
    /// plus `w`'s generation) + 1, and the CAS moves the word to the next generation: so the
    /// token is fixed by the CAS (no other grant can have come between the read and the CAS
    /// without changing the word), and nothing about it is written after it.
    #[inline(always)]
    fn fast_grant(&self, sh: &Shard<'_>, e: &Entry, i: u32, w: u64, me: OwnerRef) -> Option<RawGrant> {
        let gen = lw_gen(w);
        if gen == u32::MAX {
            return None; // the latch moves the base with a wrapping generation
        }
        // A base read from the segment at its limit: the latched path reports it.
        let token = e.token_at(w).checked_add(1)?;
        e.lw.compare_exchange(
            w,
            lock_word(gen + 1, me.idx + 1),
            std::sync::atomic::Ordering::AcqRel,
            Relaxed,
        )
        .ok()?;
        e.stamp(clock::coarse());
        // The owner's own line; load + store, not an RMW (a statistic: threads sharing one
        // Client may lose a count).
        if let Some(o) = self.owners().get(me.idx as usize) {
            o.fast_grants
                .store(o.fast_grants.load(Relaxed).wrapping_add(1), Relaxed);
        }
        Some(RawGrant {
            shard: sh.no,
            entry: i,
            hold: NIL,
            token,
            owner_died: false,
            mode: Mode::Exclusive,
            gen: gen + 1,
        })
    }

    /// The name of entry `e` (for inspection and errors).
    fn name_of(sh: &Shard<'_>, e: u32) -> Vec<u8> {
        let i = e as usize;
        let len = sh
            .entries()
            .get(i)
            .map_or(0, |x| x.name_len.load(Relaxed) as usize)
            .min(sh.words * 8);
        let mut out = Vec::with_capacity(sh.words * 8);
        for w in &sh.names()[i * sh.words..(i + 1) * sh.words] {
            out.extend_from_slice(&w.load(Relaxed).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// The name of a grant's entry, read back from the table (the entry cannot change name
    /// while the grant holds it).
    pub(crate) fn grant_name(&self, g: &RawGrant) -> Vec<u8> {
        if g.shard >= self.geometry().shards {
            return Vec::new();
        }
        Self::name_of(&self.shard(g.shard), g.entry)
    }

    // ---- locking ---------------------------------------------------------------------------

    /// Does `me` hold entry `e` in any mode?
    fn holds_it(sh: &Shard<'_>, e: &Entry, me: OwnerRef) -> bool {
        match e.mode.load(Relaxed) {
            m if m == Mode::Exclusive.to_u32() => e.owner.load(Relaxed) == me.idx,
            m if m == Mode::Shared.to_u32() => Self::readers(sh, e).any(|(_, h)| h.owner.load(Relaxed) == me.idx),
            _ => false,
        }
    }

    fn readers<'a>(sh: &'a Shard<'_>, e: &Entry) -> impl Iterator<Item = (u32, &'a Hold)> + 'a {
        let holds = sh.holds();
        let mut cur = e.reader_head.load(Relaxed);
        let mut left = holds.len();
        std::iter::from_fn(move || {
            let h = holds.get(cur as usize)?;
            left = left.checked_sub(1)?;
            let item = (cur, h);
            cur = h.next.load(Relaxed);
            Some(item)
        })
    }

    fn starving(sh: &Shard<'_>, head: u32) -> bool {
        match sh.hpool().time(Idx(head)) {
            Ok(t) => clock::now().since(t) >= FAIR_AFTER,
            Err(_) => true,
        }
    }

    /// May a new request in `mode` take entry `e` now?
    fn can_take(sh: &Shard<'_>, e: &Entry, mode: Mode) -> bool {
        let waiters = e.waiters.load(Relaxed);
        match e.mode.load(Relaxed) {
            MODE_NONE => waiters == 0 || !Self::starving(sh, e.wait_head.load(Relaxed)),
            m => m == Mode::Shared.to_u32() && mode == Mode::Shared && waiters == 0,
        }
    }

    /// Grants entry `i` to `me` (the caller checked that it may).
    fn grant_now(&self, sh: &Shard<'_>, i: u32, mode: Mode, me: OwnerRef, now: Nanos) -> Result<RawGrant> {
        let e = sh.entry(i)?;
        // First, so a counter that cannot grow fails the grant before anything is changed. (Nothing
        // below moves the word or the base before the token is stored; a process killed in
        // between leaves the counter one ahead, a token never granted.)
        let token = sh.next_token(e)?;
        if mode == Mode::Exclusive && e.waiters.load(Relaxed) == 0 && e.readers.load(Relaxed) == 0 {
            // Nobody waits: grant it as a fast hold (IDLE, named by the lock word alone), so its
            // unlock is one CAS and the pool lists are not touched on either side.
            match sh.epool().state(Idx(i))? {
                EntryState::Idle => {}
                EntryState::Free => return Err(corrupt(format!("shard {} entry {i} granted while FREE", sh.no))),
                s => sh.epool().transition(Idx(i), s, EntryState::Idle, now)?,
            }
            e.set_last_token(token);
            crate::chaos::point();
            let died = e.died();
            e.stamp(now);
            e.mode.store(MODE_NONE, Relaxed);
            e.owner.store(NIL, Relaxed);
            // A new generation, as a fast grant's CAS makes one.
            let gen = lw_gen(e.lw.load(Relaxed)).wrapping_add(1);
            e.set_word(gen, me.idx + 1);
            // Cleared only once the grant that reports it is recorded: a process killed before
            // leaves the notice for whoever comes next (its own grant dies with it).
            crate::chaos::point();
            e.set_died(false);
            sh.bump(STAT_GRANTS);
            return Ok(RawGrant {
                shard: sh.no,
                entry: i,
                hold: NIL,
                token,
                owner_died: died,
                mode,
                gen,
            });
        }
        let mut hold = NIL;
        if mode == Mode::Shared {
            hold = Self::claim_hold(sh, i, me, mode, HoldState::Held, now)?;
            Self::add_reader(sh, e, hold);
        }
        let was_free = e.mode.load(Relaxed) == MODE_NONE;
        match sh.epool().state(Idx(i))? {
            s @ (EntryState::Idle | EntryState::Died) => sh.epool().transition(Idx(i), s, EntryState::Held, now)?,
            EntryState::Held if was_free => sh.epool().touch(Idx(i), now)?,
            EntryState::Held => {}
            EntryState::Free => return Err(corrupt(format!("shard {} entry {i} granted while FREE", sh.no))),
        }
        e.set_last_token(token);
        crate::chaos::point();
        let died = e.died();
        if mode == Mode::Exclusive {
            e.stamp(now);
            e.owner.store(me.idx, Relaxed);
        } else {
            sh.holds()[hold as usize].token.store(token, Relaxed);
        }
        e.mode.store(mode.to_u32(), Relaxed);
        if died {
            // As above: cleared once the grant is recorded.
            crate::chaos::point();
            e.set_died(false);
        }
        sh.bump(STAT_GRANTS);
        Ok(RawGrant {
            shard: sh.no,
            entry: i,
            hold,
            token,
            owner_died: died,
            mode,
            gen: lw_gen(e.lw.load(Relaxed)),
        })
    }

    /// Takes a FREE hold record for a request of `me` on entry `i`: fills it in, then publishes
    /// it in state `to` (so a record that is not FREE is always complete). Returns its index.
    fn claim_hold(sh: &Shard<'_>, i: u32, me: OwnerRef, mode: Mode, to: HoldState, now: Nanos) -> Result<u32> {
        let h = sh.hpool().newest(HoldState::Free).ok_or(Error::PoolFull {
            pool: "hold/wait",
            shard: Some(sh.no),
            capacity: sh.holds().len() as u32,
        })?;
        let hold = &sh.holds()[h.get()];
        hold.entry.store(i, Relaxed);
        hold.owner.store(me.idx, Relaxed);
        hold.mode.store(mode.to_u32(), Relaxed);
        hold.flags.store(0, Relaxed);
        hold.token.store(0, Relaxed);
        // A hold granted at once is in its holder's hands; a request waits.
        hold.futex
            .store(if to == HoldState::Held { COLLECTED } else { WAIT }, Relaxed);
        hold.next.store(NIL, Relaxed);
        hold.prev.store(NIL, Relaxed);
        hold.gen.store(hold.gen.load(Relaxed).wrapping_add(1), Relaxed);
        sh.hpool().transition(h, HoldState::Free, to, now)?;
        Ok(h.0)
    }

    /// Links the filled-in hold `h` into entry `e`'s reader list.
    fn add_reader(sh: &Shard<'_>, e: &Entry, h: u32) {
        let hold = &sh.holds()[h as usize];
        let head = e.reader_head.load(Relaxed);
        hold.prev.store(NIL, Relaxed);
        hold.next.store(head, Relaxed);
        if let Some(hh) = sh.holds().get(head as usize) {
            hh.prev.store(h, Relaxed);
        }
        e.reader_head.store(h, Relaxed);
        e.readers.store(e.readers.load(Relaxed).saturating_add(1), Relaxed);
    }

    fn remove_reader(sh: &Shard<'_>, e: &Entry, h: u32) {
        let hold = &sh.holds()[h as usize];
        let (p, n) = (hold.prev.load(Relaxed), hold.next.load(Relaxed));
        match sh.holds().get(p as usize) {
            Some(ph) => ph.next.store(n, Relaxed),
            None => e.reader_head.store(n, Relaxed),
        }
        if let Some(nh) = sh.holds().get(n as usize) {
            nh.prev.store(p, Relaxed);
        }
        hold.next.store(NIL, Relaxed);
        hold.prev.store(NIL, Relaxed);
        e.readers.store(e.readers.load(Relaxed).saturating_sub(1), Relaxed);
    }

    /// Locks `name` for `me`.
    #[inline]
    pub(crate) fn acquire(&self, me: OwnerRef, name: &[u8], mode: Mode, wait: Wait) -> Result<RawGrant> {
        match self.acquire_fast(me, name, mode, wait) {
            Some(r) => r,
            None => self.acquire_slow(me, name, mode, wait),
        }
    }

    /// The lock-word fast path of [`acquire`](Self::acquire), meant to be inlined into the
    /// caller so that the grant stays in registers; `None` sends the caller to
    /// [`acquire_slow`](Self::acquire_slow). (Merging the two paths' results before the caller
    /// uses them would put the grant through memory, and its reload stalls on store forwarding.)
    #[inline(always)]
    pub(crate) fn acquire_fast(&self, me: OwnerRef, name: &[u8], mode: Mode, wait: Wait) -> Option<Result<RawGrant>> {
        if mode != Mode::Exclusive || name.is_empty() || name.len() > self.geo.max_name_len as usize {
            return None;
        }
        let h = name::hash(self.seed, name);
        self.try_fast(&self.shard(self.shard_of(h)), h, name, me, wait != Wait::No)
    }

    /// Everything [`acquire_fast`](Self::acquire_fast) leaves: name errors, shared mode, and
    /// locks that are not free (or not yet in the index).
    #[inline(never)]
    pub(crate) fn acquire_slow(&self, me: OwnerRef, name: &[u8], mode: Mode, wait: Wait) -> Result<RawGrant> {
        let name = LockName::new(name, self.geo.max_name_len as usize)?.as_bytes();
        let h = name::hash(self.seed, name);
        self.acquire_latched(me, name, h, mode, wait, true)
    }

    /// The latched path of [`acquire`](Self::acquire).
    #[inline(never)]
    fn acquire_latched(
        &self,
        me: OwnerRef,
        name: &[u8],
        h: u64,
        mode: Mode,
        wait: Wait,
        spin: bool,
    ) -> Result<RawGrant> {
        let sh = self.shard(self.shard_of(h));
        let guard = self.lock_shard(&sh, me.latch_id());
        let now = clock::coarse();
        let (i, inserted) = match self.lookup(&sh, h, name) {
            Some(i) => {
                Self::pin(&sh, i)?;
                (i, false)
            }
            // A new entry's word was stored SLOW under this latch: no fast CAS can have changed
            // it, so it needs no pin (which would stall on the new entry's line).
            None => (self.insert(&sh, h, name, now)?, true),
        };
        let e = sh.entry(i)?;
        if Self::holds_it(&sh, e, me) {
            Self::publish(&sh, i);
            return Err(Error::AlreadyHeld);
        }
        if Self::can_take(&sh, e, mode) {
            let g = self.grant_now(&sh, i, mode, me, now);
            Self::publish(&sh, i);
            drop(guard);
            if inserted {
                // The shard's next insert will most likely take the FREE entry that is newest
                // now: fetch its lines while the caller goes on, so that they are in the cache
                // by then. Only after the latch is dropped: a locked instruction (the latch's
                // release) would wait for the prefetches to complete.
                Self::prefetch_insert(&sh);
            }
            return g;
        }
        // Without shmlockd nobody else may notice that the holder died: a caller that finds the
        // lock kept from it by owners nobody has checked lately checks them now,
        // whatever its timeout, reaps the dead and tries again. (Each owner is checked at most
        // once a `CHECK_PERIOD` by all processes together; see `Owner::claim_check`.)
        let due = self.due_suspects(&sh, e, me);
        if due.iter().any(|&o| o != NIL) {
            Self::publish(&sh, i);
            drop(guard);
            self.reap_suspects(due, me)?;
            return self.acquire_latched(me, name, h, mode, wait, spin);
        }
        if wait == Wait::No {
            Self::publish(&sh, i);
            return Err(Error::WouldBlock);
        }
        if spin && e.mode.load(Relaxed) == Mode::Exclusive.to_u32() {
            // Held by one owner (the latch manages it: others wait, or it was pinned). Its
            // critical section is likely shorter than a sleep and a wake-up: watch for the
            // release a few microseconds before queueing.
            Self::publish(&sh, i);
            drop(guard);
            Self::spin_until_free(e);
            return self.acquire_latched(me, name, h, mode, wait, false);
        }
        let w = self.enqueue(&sh, i, mode, me);
        Self::publish(&sh, i);
        let w = w?;
        drop(guard);
        self.wait_for_grant(&sh, i, w, me, mode, wait)
    }

    /// Watches entry `e` for [`SPIN`] rounds at most, until nobody holds it exclusively.
    #[inline(never)]
    fn spin_until_free(e: &Entry) {
        for _ in 0..SPIN {
            std::hint::spin_loop();
            if e.mode.load(Relaxed) != Mode::Exclusive.to_u32() {
                return;
            }
        }
    }

    /// Releases a grant: a fast hold by one CAS (inlined), anything else under the latch.
    #[inline(always)]
    pub(crate) fn release(&self, me: OwnerRef, g: &RawGrant) -> Result<()> {
        if g.hold == NIL {
            // A fast hold: one CAS back, unless the latch has taken the lock over meanwhile.
            // The word's generation names this grant: every later grant, and any latched section
            // that opened the word again, moved it on.
            if let Some(e) = self
                .seg
                .slice(self.r.entries)
                .get((g.shard as usize) * self.geo.entries_per_shard as usize + g.entry as usize)
            {
                if e.lw
                    .compare_exchange(
                        lock_word(g.gen, me.idx + 1),
                        lock_word(g.gen, 0),
                        std::sync::atomic::Ordering::Release,
                        Relaxed,
                    )
                    .is_ok()
                {
                    return Ok(());
                }
            }
        }
        self.release_latched(me, g)
    }

    #[inline(never)]
    fn release_latched(&self, me: OwnerRef, g: &RawGrant) -> Result<()> {
        let sh = self.shard(g.shard);
        let guard = self.lock_shard(&sh, me.latch_id());
        Self::pin(&sh, g.entry)?;
        let wake = self.release_locked(&sh, me, g);
        Self::publish(&sh, g.entry);
        drop(guard);
        if let Some(w) = wake? {
            futex_wake(w, 1);
        }
        Ok(())
    }

    fn release_locked<'a>(&self, sh: &'a Shard<'_>, me: OwnerRef, g: &RawGrant) -> Result<Option<&'a AtomicU32>> {
        let e = sh.entry(g.entry)?;
        match g.mode {
            Mode::Exclusive => {
                if e.mode.load(Relaxed) != Mode::Exclusive.to_u32()
                    || e.owner.load(Relaxed) != me.idx
                    || e.last_token() != g.token
                {
                    return Err(Error::NotHeld);
                }
                e.owner.store(NIL, Relaxed);
                crate::chaos::point();
                e.mode.store(MODE_NONE, Relaxed);
            }
            Mode::Shared => {
                let hold = sh.hold(g.hold)?;
                if sh.hpool().state(Idx(g.hold))? != HoldState::Held
                    || hold.owner.load(Relaxed) != me.idx
                    || hold.token.load(Relaxed) != g.token
                    || hold.entry.load(Relaxed) != g.entry
                    || e.mode.load(Relaxed) != Mode::Shared.to_u32()
                {
                    return Err(Error::NotHeld);
                }
                Self::remove_reader(sh, e, g.hold);
                crate::chaos::point();
                sh.hpool()
                    .transition(Idx(g.hold), HoldState::Held, HoldState::Free, clock::coarse())?;
                if e.readers.load(Relaxed) > 0 {
                    return Ok(None);
                }
                e.mode.store(MODE_NONE, Relaxed);
            }
        }
        self.after_release(sh, g.entry)
    }

    /// The lock on entry `i` just became free: go idle, wake the oldest waiter, or hand over.
    /// Returns a futex to wake once the latch is dropped.
    fn after_release<'a>(&self, sh: &'a Shard<'_>, i: u32) -> Result<Option<&'a AtomicU32>> {
        let e = sh.entry(i)?;
        if e.waiters.load(Relaxed) == 0 {
            Self::settle(sh, i)?;
            return Ok(None);
        }
        let head = e.wait_head.load(Relaxed);
        let hold = sh.hold(head)?;
        if hold.mode.load(Relaxed) == Mode::Shared.to_u32() || Self::starving(sh, head) {
            return self.hand_off(sh, i);
        }
        if hold.futex.load(Relaxed) == WAIT {
            hold.futex.store(WOKEN, std::sync::atomic::Ordering::Release);
            return Ok(Some(&hold.futex));
        }
        Ok(None)
    }

    /// Entry `i`, free and with nobody waiting, goes IDLE (evictable), or DIED if it carries an
    /// OWNER_DIED notice (evicted only when no IDLE entry is left).
    fn settle(sh: &Shard<'_>, i: u32) -> Result<()> {
        let to = if sh.entry(i)?.died() {
            EntryState::Died
        } else {
            EntryState::Idle
        };
        // An IDLE entry's stamp is its last grant's: no clock read on the release path.
        let pool = sh.epool();
        pool.transition(Idx(i), EntryState::Held, to, pool.time(Idx(i))?)
    }

    /// Looks up who holds entry `i`, for a timeout error.
    fn holder_info(&self, sh: &Shard<'_>, i: u32) -> Option<HolderInfo> {
        let e = sh.entries().get(i as usize)?;
        let now = clock::now();
        let (owner, since, holders) = match Mode::from_u32(e.mode.load(Relaxed))? {
            Mode::Exclusive => (e.owner.load(Relaxed), e.since(now), 1),
            Mode::Shared => {
                let (h, hold) = Self::readers(sh, e).last()?;
                (
                    hold.owner.load(Relaxed),
                    sh.hpool().time(Idx(h)).ok()?,
                    e.readers.load(Relaxed),
                )
            }
        };
        let o = self.owners().get(owner as usize)?;
        Some(HolderInfo {
            pid: o.pid.load(Relaxed),
            label: o.label(),
            held_for: now.since(since),
            holders,
        })
    }

    /// Releases `name` held by `me` (explicit unlock by name).
    pub(crate) fn release_by_name(&self, me: OwnerRef, name: &[u8]) -> Result<()> {
        let name = LockName::new(name, self.geo.max_name_len as usize)?.as_bytes();
        let h = name::hash(self.seed, name);
        let sh = self.shard(self.shard_of(h));
        let guard = self.lock_shard(&sh, me.latch_id());
        let i = self.lookup(&sh, h, name).ok_or(Error::NotHeld)?;
        Self::pin(&sh, i)?;
        let e = sh.entry(i)?;
        let g = match Mode::from_u32(e.mode.load(Relaxed)) {
            Some(Mode::Exclusive) if e.owner.load(Relaxed) == me.idx => {
                Ok(RawGrant::existing(sh.no, i, NIL, e.last_token(), Mode::Exclusive))
            }
            Some(Mode::Shared) => Self::readers(&sh, e)
                .find(|(_, h)| h.owner.load(Relaxed) == me.idx)
                .map(|(hi, hold)| RawGrant::existing(sh.no, i, hi, hold.token.load(Relaxed), Mode::Shared))
                .ok_or(Error::NotHeld),
            _ => Err(Error::NotHeld),
        };
        let wake = g.and_then(|g| self.release_locked(&sh, me, &g));
        Self::publish(&sh, i);
        drop(guard);
        if let Some(w) = wake? {
            futex_wake(w, 1);
        }
        Ok(())
    }

    /// Releases every hold and cancels every wait of `me` in `shards` (walking their HELD and
    /// WAITING lists), waking any thread of `me` blocked on a request, which returns
    /// [`Error::Cancelled`]. Returns how many were released. Used when a handle is dropped, to
    /// release what forgotten guards still hold, and when a gateway session ends.
    pub(crate) fn release_all(&self, me: OwnerRef, shards: impl Iterator<Item = u32>) -> Result<usize> {
        self.release_owner(me.latch_id(), me.idx, shards, false)
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(clock::now().0);
    h.write_u32(std::process::id());
    h.finish()
}
