//! Lock entries and hold/wait records: the per-shard records of the table.
//!
//! # Layout
//! ```text
//! Entry (64 B)                                Hold (40 B)
//!  0 hash        u64  name hash               0 token   u64  fencing token of this grant
//!  8 token_base  u64  last token - gen (lw)   8 entry   u32  entry index (in the shard)
//! 16 next        u32  bucket chain           12 owner   u32  owner index
//! 20 name_len    u16, flags u16 (OWNER_DIED)  16 mode    u32  Mode
//! 24 mode        u32  Mode of the grant      20 futex   u32  WAIT/WOKEN/GRANTED/COLLECTED
//! 28 owner       u32  exclusive holder       24 next    u32  entry's reader list or queue
//! 32 readers     u32  shared holders         28 prev    u32
//! 36 reader_head u32  Hold list              32 flags   u32  OWNER_DIED for this grant
//! 40 wait_head   u32  FIFO queue of Holds    36 _pad
//! 44 wait_tail   u32
//! 48 waiters     u32
//! 52 since       u32  exclusive grant time, coarse ms (wraps in 49 days)
//! 56 lw          u64  lock word: gen (high 32) | SLOW bit | fast holder (owner + 1)
//! ```
//! The name lives in the shard's name region (`name_words` u64s per entry, same index).
//!
//! # Concurrency
//! Every field is written only under the shard latch (Relaxed stores; the latch orders them),
//! except `Hold::futex`, which its waiter also reads without the latch (Acquire) to sleep on, and
//! the entry's lock word `lw`, which a fast grant or unlock CASes without the latch.
//!
//! # The lock word and the fast path
//! `lw` = `gen << 32 | val`. `gen` changes with every grant and whenever the latch opens the word
//! again (publish) or the entry is freed or reused, so a CAS by a process that read the word
//! before any of that fails. `val` is 0 when the lock is free and
//! nothing about it needs the latch (no shared holders, no owner-died notice, entry in the index,
//! and nobody waiting, or only waiters whose head has been woken and is on its way): then an
//! exclusive lock is one CAS `gen|0 -> gen|owner+1` without the latch
//! ("fast hold"), and its unlock the reverse CAS. Anything else sets the [`SLOW`] bit, which makes
//! both CASes fail and sends their callers to the latch. Under the latch, a section first *pins*
//! the entry (`fetch_or(SLOW)`): a fast hold it finds is converted into the latched form (`mode`
//! Exclusive, `owner`, pool state HELD), so every latched code path sees one representation. At
//! the end it *publishes* (`val` back to 0) if the entry is free and needs nothing of the latch.
//! A fast holder is therefore named in exactly one place: `lw` while fast, `owner` once pinned.
//!
//! # The lock word's states
//! `val`, the low 32 bits (`gen` is the high 32):
//!
//! | `val` | state | who is named as holder |
//! |---|---|---|
//! | `0` | free and **open**: a fast CAS may take it | nobody |
//! | `owner + 1` (1..=[`FAST_OWNER`]) | held **fast** by that owner; the latch's records do not know | the word |
//! | [`SLOW`] | **pinned**: the latch manages the lock (held or free, queued, shared, owner-died) | `owner`/`mode`, the reader list |
//! | `SLOW \| owner + 1` | only inside `pin`, between its `fetch_or` and its store | the word, until the store |
//!
//! Every move of the word, who makes it, and with which ordering:
//!
//! | from -> to | by | latch | ordering, and why |
//! |---|---|---|---|
//! | `gen\|0` -> `gen+1\|owner+1` | fast grant (`fast_grant`: CAS from the word `try_fast` loaded) | no | load Acquire, CAS AcqRel: the new holder sees everything the previous holder (fast or latched) wrote before opening the word; the base is read after the load, so a CAS that succeeds fixes the token |
//! | `gen\|owner+1` -> `gen\|0` | fast release (`release`: CAS against the grant's own `gen`) | no | Release: the critical section happens-before the next grant's Acquire; a pinned word (or a newer `gen`) makes it fail, and the release goes to the latch |
//! | any -> `gen\|SLOW` | `pin` (`fetch_or(SLOW)`, then, if a fast holder was found, a Relaxed store of `gen\|SLOW` with the holder moved into `owner`) | yes | fetch_or Acquire: the section sees the fast holder's and releaser's writes; once `SLOW` is set no CAS can succeed, so the stores after it race with nothing |
//! | `gen\|SLOW` -> `gen+1\|0` | `publish` (`set_word(gen + 1, 0)`: store `gen+1\|SLOW`, store the base, store `gen+1\|0`) when the entry is free and needs nothing of the latch | yes | last store Release: a fast locker that loads the open word with Acquire reads the moved base; `publish` stores only over a pinned word (`val == SLOW`), since over an open one it could wipe a fast hold taken meanwhile (the two-holders bug of 504eba6; `model.rs` checks this) |
//! | `gen\|SLOW` -> `gen+1\|owner+1` | a latched grant when nobody waits (`grant_now`): `set_word(gen + 1, owner + 1)`, a fast hold named by the word alone, so its unlock is one CAS | yes | last store Release, as for `publish`; the token is set (base moved) before the word names the holder |
//! | `gen\|SLOW` -> `gen'\|SLOW` | latched code that moves the generation (entry freed or reused, a repair): `set_word(gen', SLOW)` | yes | Relaxed under the latch; the new `gen` fails every CAS that read the old word |
//!
//! Other latched grants (to a queued waiter, shared ones) and latched releases leave the word
//! pinned and change only the latch's records; the word opens again at the end of a section
//! (`publish`), only if the lock is then free.
//! `src/table/model.rs` runs the rows without the latch against latched sections in every
//! interleaving of a few actors.
//!
//! # Fencing tokens
//! The entry's last token is `token_base + gen`, never stored on its own: a fast grant reads
//! the word and the base, then CASes `gen|0 -> gen+1|owner+1`, so its token (`base + gen + 1`)
//! is fixed by the CAS itself. Nothing is written after the CAS, so a latched section that pins
//! the word right after it (a forced release, a reaper) reads exactly the holder's token from
//! the word it pinned, and every later grant is above it. Latched code changes `gen` only while
//! the word is pinned, and moves the base with it ([`Entry::set_word`]), so the last token stays
//! put; since the word's `gen` has changed, a fast CAS that read the word (and so the base)
//! before that fails. (A stale CAS could succeed only after exactly 2^32 changes of the word
//! while its process stood between two instructions.)

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::pool::PoolState;

/// Lock modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Mode {
    /// One holder at a time.
    Exclusive = 1,
    /// Any number of holders, excluding exclusive ones.
    Shared = 2,
}

impl Mode {
    /// The stored number.
    pub fn to_u32(self) -> u32 {
        self as u32
    }
    /// From the stored number; 0 (not held) and garbage give None.
    pub fn from_u32(v: u32) -> Option<Mode> {
        match v {
            1 => Some(Mode::Exclusive),
            2 => Some(Mode::Shared),
            _ => None,
        }
    }
}

/// `Entry::mode` when nobody holds the lock.
pub const MODE_NONE: u32 = 0;

/// Entry flag: the last holder died (or was forced out); told to the next grantee, then cleared.
pub const OWNER_DIED: u32 = 1;

/// `Hold::flags`: a grant that a forced release took away before its waiter collected it; the
/// record (GRANTED) stays the waiter's until it does, and then it returns the forced-out grant.
pub const FORCED: u32 = 2;

/// `Hold::futex`: waiting.
pub const WAIT: u32 = 0;
/// `Hold::futex`: the lock was freed and this (head) waiter was woken to try for it.
pub const WOKEN: u32 = 1;
/// `Hold::futex`: the lock was handed to this waiter.
pub const GRANTED: u32 = 2;
/// `Hold::futex` of a HELD shared hold: in its holder's hands (granted at once, or handed over
/// and collected). Any other value on a HELD hold means a grant its waiter has not collected yet
/// (GRANTED, or WAIT where the granter died before storing GRANTED): a forced release must leave
/// such a record to its waiter rather than free it under it.
pub const COLLECTED: u32 = 3;

/// A lock entry.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Entry {
    /// Seeded hash of the name.
    pub hash: AtomicU64,
    /// Fencing token of the latest grant minus the lock word's `gen` (see the module docs); read
    /// it through [`Entry::last_token`].
    pub token_base: AtomicU64,
    /// Next entry in the bucket chain (NIL ends it).
    pub next: AtomicU32,
    /// Length of the name (at most 1024).
    pub name_len: AtomicU16,
    /// [`OWNER_DIED`] (see [`Entry::died`]).
    pub flags: AtomicU16,
    /// [`MODE_NONE`] or a [`Mode`].
    pub mode: AtomicU32,
    /// Owner index of the exclusive holder, NIL if none.
    pub owner: AtomicU32,
    /// Number of shared holders.
    pub readers: AtomicU32,
    /// First shared holder's Hold (doubly linked through Hold::next/prev).
    pub reader_head: AtomicU32,
    /// Oldest waiter's Hold.
    pub wait_head: AtomicU32,
    /// Newest waiter's Hold.
    pub wait_tail: AtomicU32,
    /// Number of queued waiters.
    pub waiters: AtomicU32,
    /// When the current exclusive grant was made: CLOCK_MONOTONIC_COARSE in milliseconds,
    /// truncated to 32 bits (ages are taken modulo 2^32 ms, so holds past 49 days alias).
    pub since: AtomicU32,
    /// The lock word (see the module docs).
    pub lw: AtomicU64,
}

impl Entry {
    /// Does the entry carry an owner-died notice for its next grantee?
    #[inline]
    pub fn died(&self) -> bool {
        u32::from(self.flags.load(Relaxed)) & OWNER_DIED != 0
    }

    /// Sets or clears the owner-died notice.
    #[inline]
    pub fn set_died(&self, died: bool) {
        self.flags.store(u16::from(died) * OWNER_DIED as u16, Relaxed);
    }

    /// The token of the latest grant, as of lock word `w`.
    #[inline(always)]
    pub fn token_at(&self, w: u64) -> u64 {
        self.token_base.load(Relaxed).wrapping_add(u64::from(lw_gen(w)))
    }

    /// The token of the latest grant (latch held, or for inspection).
    #[inline]
    pub fn last_token(&self) -> u64 {
        self.token_at(self.lw.load(Relaxed))
    }

    /// Makes `t` the token of the latest grant (latch held, word pinned).
    #[inline]
    pub fn set_last_token(&self, t: u64) {
        let gen = lw_gen(self.lw.load(Relaxed));
        self.token_base.store(t.wrapping_sub(u64::from(gen)), Relaxed);
    }

    /// Stores lock word `gen|val` (latch held, word pinned, so no CAS changes it meanwhile),
    /// keeping the latest grant's token: the base moves against the new `gen`. Release: a fast
    /// CAS that reads the new word also reads the new base and whatever the section wrote.
    ///
    /// The new `gen` goes in first, still pinned (`SLOW`), then the base, then `val`: a process
    /// killed between two of these stores leaves the last token reading higher than it is (a
    /// token skipped), never lower (a token the next grant would repeat), and the word pinned
    /// for the repair that follows.
    #[inline]
    pub fn set_word(&self, gen: u32, val: u32) {
        let t = self.last_token();
        self.lw.store(lock_word(gen, SLOW), Relaxed);
        crate::chaos::point();
        self.token_base.store(t.wrapping_sub(u64::from(gen)), Relaxed);
        crate::chaos::point();
        self.lw.store(lock_word(gen, val), std::sync::atomic::Ordering::Release);
    }

    /// Stamps the current exclusive grant with the time `now`.
    #[inline]
    pub fn stamp(&self, now: crate::clock::Nanos) {
        self.since.store((now.0 / 1_000_000) as u32, Relaxed);
    }

    /// When the current exclusive grant was made, as seen from `now`.
    pub fn since(&self, now: crate::clock::Nanos) -> crate::clock::Nanos {
        let age_ms = ((now.0 / 1_000_000) as u32).wrapping_sub(self.since.load(Relaxed));
        crate::clock::Nanos(now.0.saturating_sub(u64::from(age_ms) * 1_000_000))
    }
}

/// `Entry::lw` bit: the latch manages this lock now; fast CASes must fail.
pub const SLOW: u32 = 1 << 31;
/// `Entry::lw` bits naming a fast holder (owner index + 1).
pub const FAST_OWNER: u32 = (1 << 24) - 1;

/// Builds a lock word.
#[inline]
pub fn lock_word(gen: u32, val: u32) -> u64 {
    u64::from(gen) << 32 | u64::from(val)
}

/// The generation of a lock word.
#[inline]
pub fn lw_gen(w: u64) -> u32 {
    (w >> 32) as u32
}

/// The value (SLOW bit and fast holder) of a lock word.
#[inline]
pub fn lw_val(w: u64) -> u32 {
    w as u32
}

/// A shared hold or a waiting request.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Hold {
    /// Fencing token of this grant (once granted).
    pub token: AtomicU64,
    /// Entry index within the shard.
    pub entry: AtomicU32,
    /// Owner index.
    pub owner: AtomicU32,
    /// Requested [`Mode`].
    pub mode: AtomicU32,
    /// [`WAIT`], [`WOKEN`] or [`GRANTED`]; the waiter sleeps on it.
    pub futex: AtomicU32,
    /// Next in the entry's reader list or wait queue.
    pub next: AtomicU32,
    /// Previous in the entry's reader list or wait queue.
    pub prev: AtomicU32,
    /// [`OWNER_DIED`] for a handed-off grant; [`FORCED`].
    pub flags: AtomicU32,
    /// Bumped each time the record is taken, so a waiter can tell its request from a reuse.
    pub gen: AtomicU32,
}

// SAFETY: repr(C), atomics only, valid at zero, no pointers.
crate::shm::impl_shm_safe!(Entry);
// SAFETY: repr(C), atomics only, valid at zero, no pointers.
crate::shm::impl_shm_safe!(Hold);

const _: () = assert!(std::mem::size_of::<Entry>() == 64 && std::mem::align_of::<Entry>() == 8);
const _: () = assert!(std::mem::size_of::<Hold>() == 40 && std::mem::align_of::<Hold>() == 8);

/// Entry pool states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EntryState {
    /// Not in the index.
    Free = 0,
    /// In the index, neither held nor waited on (kept as a cache; evicted oldest first). Its
    /// stamp is the time of its last grant.
    Idle = 1,
    /// Held or waited on.
    Held = 2,
    /// In the index, not held and not waited on, carrying an owner-died notice for its next
    /// holder: not evicted while an IDLE entry can be, so the notice outlives cache pressure.
    Died = 3,
}

impl PoolState for EntryState {
    const COUNT: usize = 4;
    const POOL: &'static str = "lock entry";
    fn to_u32(self) -> u32 {
        self as u32
    }
    fn from_u32(v: u32) -> Option<Self> {
        [EntryState::Free, EntryState::Idle, EntryState::Held, EntryState::Died]
            .get(v as usize)
            .copied()
    }
    fn name(self) -> &'static str {
        ["FREE", "IDLE", "HELD", "DIED"][self as usize]
    }
}

/// Hold/wait pool states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HoldState {
    /// Unused.
    Free = 0,
    /// A shared hold.
    Held = 1,
    /// A queued request.
    Waiting = 2,
    /// An exclusive grant handed to a waiter that has not picked it up yet.
    Granted = 3,
}

impl PoolState for HoldState {
    const COUNT: usize = 4;
    const POOL: &'static str = "hold/wait";
    fn to_u32(self) -> u32 {
        self as u32
    }
    fn from_u32(v: u32) -> Option<Self> {
        [HoldState::Free, HoldState::Held, HoldState::Waiting, HoldState::Granted]
            .get(v as usize)
            .copied()
    }
    fn name(self) -> &'static str {
        ["FREE", "HELD", "WAITING", "GRANTED"][self as usize]
    }
}
