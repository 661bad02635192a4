//! Read-only snapshots of the table for the admin CLI, and [`LockTable::force_release`].
//!
//! # Concurrency
//! Each shard is copied under its own latch (taken by pid, as [`pid_latch_id`], repairing a shard whose latch holder died), so every lock is seen at
//! one instant, consistent with itself; different shards are seen at slightly different
//! instants. Under a latch the snapshot only copies words into vectors reserved beforehand: no
//! syscall, no wait, and no allocation unless the shard grew meanwhile. Owner records, labels
//! and process liveness (`/proc/PID/stat`) are looked up after the latch is dropped, so an owner
//! that deregisters in between may show with the next owner's details; a display, not a proof.
//!
//! # Forced release
//! [`LockTable::force_release`] takes a lock away from its holder(s) as if they had released it,
//! with the entry's `OWNER_DIED` flag set first, so the next grantee (the oldest waiter, or the
//! next process to lock the name) is told. A forced-out holder learns it when it next uses its
//! guard: the guard's token no longer matches and `unlock` reports [`Error::NotHeld`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::*;
use crate::pool::PoolState;

/// A holder or a waiter of a lock, as the snapshot saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// Owner record index.
    pub owner: u32,
    /// The owner's process id.
    pub pid: u32,
    /// The owner's kind (`None` if the record holds an unknown number).
    pub kind: Option<OwnerKind>,
    /// The owner's label (a program name, or a remote address for gateway sessions).
    pub label: String,
    /// The mode held or asked for.
    pub mode: Mode,
    /// Fencing token of this holder's grant (0 for a waiter).
    pub token: u64,
    /// How long it has held the lock, or waited for it, when the snapshot was taken.
    pub age: Duration,
}

/// One lock (an entry that is held or waited on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// The name, as stored (any bytes).
    pub name: Vec<u8>,
    /// The shard the name hashes to.
    pub shard: u32,
    /// The mode it is held in; `None` while it is free but waited on (a waiter is picking it up).
    pub mode: Option<Mode>,
    /// Holders: the exclusive one, or every shared one (longest held first).
    pub holders: Vec<Party>,
    /// Waiters in queue order (oldest first).
    pub waiters: Vec<Party>,
    /// Fencing token of the latest grant.
    pub token: u64,
    /// The previous holder died or was forced out, and the next grantee has not been told yet.
    pub owner_died: bool,
}

impl LockInfo {
    /// How long the longest holder has held it (zero if nobody holds it).
    pub fn held_for(&self) -> Duration {
        self.holders.iter().map(|p| p.age).max().unwrap_or_default()
    }

    /// How long the oldest waiter has waited, if anyone waits.
    pub fn oldest_wait(&self) -> Option<Duration> {
        self.waiters.iter().map(|p| p.age).max()
    }
}

/// One registered owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerInfo {
    /// Owner record index.
    pub idx: u32,
    /// Process id.
    pub pid: u32,
    /// Kind (`None` if the record holds an unknown number).
    pub kind: Option<OwnerKind>,
    /// Label.
    pub label: String,
    /// The pool state's name (`LIVE`, or another non-free state a newer build adds).
    pub state: &'static str,
    /// True if a process with this pid and start time exists (`/proc/PID/stat`).
    pub alive: bool,
    /// How long ago it registered.
    pub registered_for: Duration,
    /// The process's start time as its owner record holds it: clock ticks since boot (field 22
    /// of `/proc/PID/stat`), 0 if it was not known at registration.
    pub start_time: u64,
    /// [`start_time`](Self::start_time) as a wall-clock time (the boot time from `/proc/stat`
    /// plus the ticks at `sysconf(_SC_CLK_TCK)`, so to the second at best), if both are known.
    pub started_at: Option<SystemTime>,
    /// Locks it holds (in either mode).
    pub holds: u32,
    /// Requests it has queued.
    pub waits: u32,
}

/// What turns a process's start time (clock ticks since boot) into a wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BootClock {
    /// The boot time, seconds since the epoch (`btime` in `/proc/stat`).
    btime: u64,
    /// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
    hz: u64,
}

impl BootClock {
    /// Reads the boot time and the tick rate; `None` if either is unknown.
    pub(super) fn read() -> Option<BootClock> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        Self::parse(&stat, u64::try_from(hz).ok()?)
    }

    /// From `/proc/stat`'s text and the tick rate `hz`.
    pub(super) fn parse(stat: &str, hz: u64) -> Option<BootClock> {
        let btime = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        (hz > 0).then_some(BootClock { btime, hz })
    }

    /// The wall-clock time `ticks` after boot; `None` for 0 (unknown) or a time after the
    /// year 9999 (a start time read from the segment is not trusted to be a date).
    pub(super) fn wall_time(self, ticks: u64) -> Option<SystemTime> {
        /// 9999-12-31T23:59:59Z, the last time RFC 3339 writes.
        const LAST: u64 = 253_402_300_799;
        if ticks == 0 {
            return None;
        }
        let secs = self.btime.checked_add(ticks / self.hz).filter(|&s| s <= LAST)?;
        let nanos = (ticks % self.hz).checked_mul(1_000_000_000)? / self.hz;
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, u32::try_from(nanos).ok()?))
    }
}

/// How many records of one pool are in each state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCounts {
    /// The pool's name.
    pub pool: &'static str,
    /// Capacity (all shards).
    pub capacity: u64,
    /// `(state name, count)` for every state, in the state's numeric order.
    pub states: Vec<(&'static str, u64)>,
}

/// What is happening in the table now, for metrics ([`LockTable::activity`]): counted from the
/// records' words without any latch, so a display (each number right at some instant of the
/// scan, not all at one instant), never a proof.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    /// Locks held, in either mode (fast exclusive holds included).
    pub held: u64,
    /// Locks with at least one queued request.
    pub waited_on: u64,
    /// Queued requests (waiters), over all locks.
    pub waiters: u64,
    /// For each bound given to [`LockTable::activity`], the queued requests that have waited
    /// at most that long so far (cumulative, as a histogram's buckets; the last count, for no
    /// bound, is `waiters`).
    pub waiting_at_most: Vec<u64>,
    /// How long the oldest queued request has waited so far (zero if none waits).
    pub oldest_wait: Duration,
    /// Registered owners of processes on this machine ([`OwnerKind::Local`]).
    pub local_owners: u64,
    /// Registered owners of gateway sessions ([`OwnerKind::Remote`]).
    pub remote_owners: u64,
    /// Registered owners whose record holds an unknown kind.
    pub other_owners: u64,
    /// Owners being reaped right now.
    pub reaping_owners: u64,
}

/// What [`LockTable::force_release`] took away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forced {
    /// The mode the lock was held in.
    pub mode: Mode,
    /// The holders forced out.
    pub holders: Vec<Party>,
    /// Waiters queued when it was released (the oldest is granted next).
    pub waiters: u32,
}

/// A holder or waiter copied under a shard latch: `(owner, mode, token, since)`.
pub(super) type RawParty = (u32, u32, u64, Nanos);

/// A lock's words, copied under its shard latch; its parties are `parties[from..to]` of a vector
/// shared by the shard's locks (holders first, up to `waiters`), resolved to owners later.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawLock {
    mode: u32,
    token: u64,
    flags: u32,
    from: usize,
    waiters: usize,
    to: usize,
}

/// One shard's locks as copied under its latch.
#[derive(Debug)]
struct ShardCopy {
    shard: u32,
    locks: Vec<(RawLock, Vec<u8>)>,
    parties: Vec<RawParty>,
}

impl LockTable {
    /// Every lock that is held or waited on, shard by shard, each copied under its shard latch.
    /// Unordered. Ages are measured from one instant, taken after the last shard was copied.
    pub fn locks(&self) -> Vec<LockInfo> {
        self.copy_all(EntryState::Held)
    }

    /// Every lock whose holder died (or was forced out) with nobody waiting: free, and carrying
    /// the owner-died notice that its next holder is told (pool state DIED), each copied under
    /// its shard latch. [`locks`](Self::locks) does not list them (nobody holds or waits on
    /// them). A dead holder is released, and its lock listed here, once it is reaped: at once by
    /// `shmlockd`, else when someone wants the lock; until then [`locks`](Self::locks) lists it
    /// with its dead holder. Unordered; no holders, no waiters, `owner_died` set.
    pub fn died_locks(&self) -> Vec<LockInfo> {
        self.copy_all(EntryState::Died)
    }

    /// The locks in entry state `state`, shard by shard.
    fn copy_all(&self, state: EntryState) -> Vec<LockInfo> {
        let copies: Vec<ShardCopy> = (0..self.geo.shards)
            .map(|s| self.copy_shard(&self.shard(s), state))
            .collect();
        let now = clock::now();
        let mut out = Vec::with_capacity(copies.iter().map(|c| c.locks.len()).sum());
        for c in copies {
            for (r, name) in c.locks {
                out.push(self.resolve(&r, &c.parties, name, c.shard, now));
            }
        }
        out
    }

    /// The lock named `name`, if it is in the index (held, waited on, or idle).
    pub fn lock_info(&self, name: &[u8]) -> Result<Option<LockInfo>> {
        let name = LockName::new(name, self.geo.max_name_len as usize)?.as_bytes();
        let h = name::hash(self.seed, name);
        let sh = self.shard(self.shard_of(h));
        let mut parties = Vec::with_capacity(16);
        let r = {
            let _g = self.lock_shard(&sh, pid_latch_id());
            let Some(i) = self.lookup(&sh, h, name) else {
                return Ok(None);
            };
            sh.pin(i)?;
            let r = Self::copy_entry(&sh, i, &mut parties, usize::MAX);
            sh.publish(i);
            r
        };
        Ok(Some(self.resolve(&r, &parties, name.to_vec(), sh.no, clock::now())))
    }

    /// Copies shard `sh`'s entries in `state` (HELD: held or waited on; DIED: free with an
    /// owner-died notice) with their names.
    fn copy_shard(&self, sh: &Shard<'_>, state: EntryState) -> ShardCopy {
        // Reserve outside the latch; counts read without it are a good guess. They are read
        // from the segment, so each is capped by the capacity fixed at open (a garbage count
        // must not size an allocation).
        let (entries, holds) = (sh.entries().len(), sh.holds().len());
        let n = (sh.epool().count(state) as usize).min(entries) + 4;
        let waiting = (sh.hpool().count(HoldState::Waiting) as usize).min(holds);
        let mut locks = Vec::with_capacity(n);
        let mut names: Vec<u64> = Vec::with_capacity(n.saturating_mul(sh.words));
        let mut parties = Vec::with_capacity(n + waiting + 4);
        // In a consistent shard each entry names at most one exclusive holder and each hold sits
        // in at most one reader list or queue: more parties than that means torn lists, whose
        // excess is not copied (each entry's walks are bounded too, but not their sum).
        let budget = entries + holds;
        {
            let _g = self.lock_shard(sh, pid_latch_id());
            // A failure leaves some fast holds out of the copy; nothing to repair.
            let _ = sh.pin_fast_holds(None);
            // (A torn list may reach entries in other states: only those in `state` are copied.)
            let listed = sh.epool().iter(state);
            for (i, _) in listed.filter(|&(i, _)| sh.epool().state(i).ok() == Some(state)) {
                let r = Self::copy_entry(sh, i.0, &mut parties, budget);
                let len = sh.entries().get(i.get()).map_or(0, |e| e.name_len.load(Relaxed));
                locks.push((r, len as usize));
                let at = i.get() * sh.words;
                names.extend(sh.names()[at..at + sh.words].iter().map(|w| w.load(Relaxed)));
            }
        }
        let locks = locks
            .into_iter()
            .zip(names.chunks(sh.words))
            .map(|((r, len), words)| {
                let mut name: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                name.truncate(len.min(sh.words * 8));
                (r, name)
            })
            .collect();
        ShardCopy {
            shard: sh.no,
            locks,
            parties,
        }
    }

    /// Copies entry `i`'s words, holders and queue (under the shard latch), appending its
    /// parties to `parties` while it has fewer than `budget` (each walk is bounded by the hold
    /// capacity as well, so a torn list cannot loop).
    pub(super) fn copy_entry(sh: &Shard<'_>, i: u32, parties: &mut Vec<RawParty>, budget: usize) -> RawLock {
        let from = parties.len();
        let mut r = RawLock {
            mode: MODE_NONE,
            token: 0,
            flags: 0,
            from,
            waiters: from,
            to: from,
        };
        let Ok(e) = sh.entry(i) else { return r };
        r.mode = e.mode.load(Relaxed);
        r.token = e.last_token();
        r.flags = if e.died() { OWNER_DIED } else { 0 };
        match Mode::from_u32(r.mode) {
            Some(Mode::Exclusive) if parties.len() < budget => {
                let since = e.since(clock::coarse());
                parties.push((e.owner.load(Relaxed), r.mode, r.token, since));
            }
            Some(Mode::Shared) => {
                for (h, hold) in Self::readers(sh, e).take(budget.saturating_sub(parties.len())) {
                    let since = sh.hpool().time(Idx(h)).unwrap_or(Nanos::ZERO);
                    parties.push((hold.owner.load(Relaxed), r.mode, hold.token.load(Relaxed), since));
                }
            }
            _ => {}
        }
        r.waiters = parties.len();
        let holds = sh.holds();
        let mut cur = e.wait_head.load(Relaxed);
        for _ in 0..holds.len() {
            let Some(hold) = holds.get(cur as usize) else { break };
            if parties.len() >= budget {
                break;
            }
            let since = sh.hpool().time(Idx(cur)).unwrap_or(Nanos::ZERO);
            parties.push((hold.owner.load(Relaxed), hold.mode.load(Relaxed), 0, since));
            cur = hold.next.load(Relaxed);
        }
        r.to = parties.len();
        r
    }

    /// Turns a copied lock into a [`LockInfo`], looking owners up (outside any latch).
    pub(super) fn resolve(&self, r: &RawLock, parties: &[RawParty], name: Vec<u8>, shard: u32, now: Nanos) -> LockInfo {
        let party = |&(owner, mode, token, since): &RawParty| {
            let o = self.owners().get(owner as usize);
            Party {
                owner,
                pid: o.map_or(0, |o| o.pid.load(Relaxed)),
                kind: o.and_then(|o| OwnerKind::from_u32(o.kind.load(Relaxed))),
                label: o.map(Owner::label).unwrap_or_default(),
                mode: Mode::from_u32(mode).unwrap_or(Mode::Exclusive),
                token,
                age: now.since(since),
            }
        };
        let mut holders: Vec<Party> = parties[r.from..r.waiters].iter().map(party).collect();
        holders.sort_by_key(|p| std::cmp::Reverse(p.age));
        LockInfo {
            name,
            shard,
            mode: Mode::from_u32(r.mode),
            holders,
            waiters: parties[r.waiters..r.to].iter().map(party).collect(),
            token: r.token,
            owner_died: r.flags & OWNER_DIED != 0,
        }
    }

    /// Every registered owner, with the locks it holds and the requests it has queued (counted
    /// from `locks`, a snapshot taken by [`locks`](Self::locks)).
    pub fn owners_info(&self, locks: &[LockInfo]) -> Vec<OwnerInfo> {
        let pool = self.owner_pool();
        // The FREE count is read from the segment: the reservation is capped by the capacity.
        let cap = pool.capacity();
        let mut raw = Vec::with_capacity(cap.saturating_sub(pool.count(OwnerState::Free)) as usize + 4);
        {
            let _g = self.lock_owners();
            for v in 1..OwnerState::COUNT as u32 {
                let Some(state) = OwnerState::from_u32(v) else { continue };
                for (i, since) in pool.iter(state) {
                    raw.push((i.0, state, since));
                }
            }
        }
        let mut holds: HashMap<u32, u32> = HashMap::new();
        let mut waits: HashMap<u32, u32> = HashMap::new();
        for l in locks {
            for p in &l.holders {
                *holds.entry(p.owner).or_default() += 1;
            }
            for p in &l.waiters {
                *waits.entry(p.owner).or_default() += 1;
            }
        }
        let now = clock::now();
        let boot = BootClock::read();
        raw.into_iter()
            .filter_map(|(idx, state, since)| {
                let o = self.owners().get(idx as usize)?;
                let pid = o.pid.load(Relaxed);
                let start_time = o.start_time.load(Relaxed);
                Some(OwnerInfo {
                    idx,
                    pid,
                    kind: OwnerKind::from_u32(o.kind.load(Relaxed)),
                    label: o.label(),
                    state: state.name(),
                    alive: o.process().is_alive(),
                    registered_for: now.since(since),
                    start_time,
                    started_at: boot.and_then(|b| b.wall_time(start_time)),
                    holds: holds.get(&idx).copied().unwrap_or(0),
                    waits: waits.get(&idx).copied().unwrap_or(0),
                })
            })
            .collect()
    }

    /// Locks held and waited on, the queued requests and how long they have waited so far, and
    /// the owners by kind (see [`Activity`]); `age_bounds` (ascending) are the buckets of
    /// [`Activity::waiting_at_most`]. Reads words only, without a latch or a syscall: O(locks
    /// in use + waiters + owners). Every walk is bounded by its pool's capacity, so a list a
    /// concurrent change (or a corruption) leaves odd ends early and never loops.
    pub fn activity(&self, age_bounds: &[Duration]) -> Activity {
        let mut a = Activity {
            waiting_at_most: vec![0; age_bounds.len()],
            ..Activity::default()
        };
        let now = clock::now();
        for s in 0..self.geo.shards {
            let sh = self.shard(s);
            let ep = sh.epool();
            let entries = sh.entries();
            for (i, _) in ep.iter(EntryState::Held) {
                let Some(e) = entries.get(i.get()) else { continue };
                let fast = lw_val(e.lw.load(Relaxed)) & FAST_OWNER != 0;
                if fast || e.mode.load(Relaxed) != MODE_NONE {
                    a.held += 1;
                }
                if e.waiters.load(Relaxed) != 0 {
                    a.waited_on += 1;
                }
            }
            // Fast holds leave their entries IDLE (as in `stats`).
            a.held += ep
                .iter(EntryState::Idle)
                .filter(|(i, _)| {
                    entries
                        .get(i.get())
                        .is_some_and(|e| lw_val(e.lw.load(Relaxed)) & FAST_OWNER != 0)
                })
                .count() as u64;
            for (_, since) in sh.hpool().iter(HoldState::Waiting) {
                let age = now.since(since);
                a.waiters += 1;
                a.oldest_wait = a.oldest_wait.max(age);
                for (n, bound) in a.waiting_at_most.iter_mut().zip(age_bounds) {
                    *n += u64::from(age <= *bound);
                }
            }
        }
        let op = self.owner_pool();
        for (i, _) in op.iter(OwnerState::Live) {
            match self
                .owners()
                .get(i.get())
                .and_then(|o| OwnerKind::from_u32(o.kind.load(Relaxed)))
            {
                Some(OwnerKind::Local) => a.local_owners += 1,
                Some(OwnerKind::Remote) => a.remote_owners += 1,
                None => a.other_owners += 1,
            }
        }
        a.reaping_owners = op.iter(OwnerState::Reaping).count() as u64;
        a
    }

    /// Counts per state of the lock entry, hold/wait and owner pools (read without latches).
    pub fn pool_counts(&self) -> Vec<PoolCounts> {
        fn counts<S: PoolState>(pools: &[StatePool<'_, S>]) -> PoolCounts {
            PoolCounts {
                pool: S::POOL,
                capacity: pools.iter().map(|p| u64::from(p.capacity())).sum(),
                states: (0..S::COUNT as u32)
                    .filter_map(S::from_u32)
                    .map(|s| (s.name(), pools.iter().map(|p| u64::from(p.count(s))).sum()))
                    .collect(),
            }
        }
        let shards: Vec<Shard<'_>> = (0..self.geo.shards).map(|s| self.shard(s)).collect();
        let entries: Vec<_> = shards.iter().map(Shard::epool).collect();
        let holds: Vec<_> = shards.iter().map(Shard::hpool).collect();
        vec![counts(&entries), counts(&holds), counts(&[self.owner_pool()])]
    }

    /// Takes lock `name` away from its holder(s): the lock is released as if they had released
    /// it, with `OWNER_DIED` set so the next grantee is told; the oldest waiter is woken or
    /// granted as on any release. [`Error::NotHeld`] if nobody holds it.
    ///
    /// A holder forced out learns it on its next use of the guard ([`Error::NotHeld`]); until
    /// then it may still believe it holds the lock, so use this only on holders that are stuck
    /// or gone, and use fencing tokens where that matters.
    pub fn force_release(&self, name: &[u8]) -> Result<Forced> {
        let name = LockName::new(name, self.geo.max_name_len as usize)?.as_bytes();
        let h = name::hash(self.seed, name);
        let sh = self.shard(self.shard_of(h));
        let mut parties = Vec::with_capacity(16);
        let mut grants = Vec::with_capacity(16);
        let mut uncollected = Vec::with_capacity(4);
        let mut wakes: Vec<&AtomicU32> = Vec::with_capacity(2);
        let mode;
        let r;
        {
            let _g = self.lock_shard(&sh, pid_latch_id());
            let i = self.lookup(&sh, h, name).ok_or(Error::NotHeld)?;
            sh.pin(i)?;
            let e = sh.entry(i)?;
            let Some(m) = Mode::from_u32(e.mode.load(Relaxed)) else {
                sh.publish(i);
                return Err(Error::NotHeld);
            };
            mode = m;
            r = Self::copy_entry(&sh, i, &mut parties, usize::MAX);
            match mode {
                Mode::Exclusive => {
                    let owner = e.owner.load(Relaxed);
                    grants.push((owner, RawGrant::existing(sh.no, i, NIL, e.last_token(), mode)));
                    // Handed over, and its waiter has not come for it yet (see below).
                    uncollected.extend(sh.hpool().iter(HoldState::Granted).map(|(h, _)| h.0).filter(|&h| {
                        let hold = &sh.holds()[h as usize];
                        hold.entry.load(Relaxed) == i && hold.owner.load(Relaxed) == owner
                    }));
                }
                Mode::Shared => {
                    for (hi, hold) in Self::readers(&sh, e) {
                        if hold.futex.load(Relaxed) != COLLECTED {
                            // Handed to a waiter that has not come for it yet (GRANTED, or WAIT if
                            // its granter died before the store).
                            uncollected.push(hi);
                        } else {
                            let g = RawGrant::existing(sh.no, i, hi, hold.token.load(Relaxed), mode);
                            grants.push((hold.owner.load(Relaxed), g));
                        }
                    }
                }
            }
            // Set before the last release, whose hand-off or next grant passes it on.
            let died = e.died();
            e.set_died(true);
            // A grant its waiter has not collected is forced out as any other, but its record
            // stays the waiter's (GRANTED and FORCED; a shared one leaves the reader list) until
            // the waiter collects it: the waiter returns the grant (whose unlock then says
            // `NotHeld`, as a forced-out holder's does), never `Cancelled` for a request that
            // nobody cancelled.
            for &hi in &uncollected {
                let hold = &sh.holds()[hi as usize];
                hold.flags.store(hold.flags.load(Relaxed) | FORCED, Relaxed);
                if mode == Mode::Shared {
                    sh.remove_reader(e, hi);
                    sh.hpool()
                        .transition(Idx(hi), HoldState::Held, HoldState::Granted, clock::coarse())?;
                    if hold.futex.load(Relaxed) != GRANTED {
                        // Its granter died before the wake-up: the waiter may be asleep.
                        hold.futex.store(GRANTED, std::sync::atomic::Ordering::Release);
                        wakes.push(&hold.futex);
                    }
                }
            }
            if grants.is_empty() {
                e.mode.store(MODE_NONE, Relaxed);
                wakes.extend(self.after_release(&sh, i)?);
            }
            for (owner, g) in &grants {
                let as_holder = OwnerRef { idx: *owner, gen: 0 };
                match self.release_locked(&sh, as_holder, g) {
                    Ok(w) => wakes.extend(w),
                    Err(err) => {
                        if e.mode.load(Relaxed) != MODE_NONE {
                            e.set_died(died);
                        }
                        return Err(err);
                    }
                }
            }
        }
        for w in wakes {
            futex_wake(w, 1);
        }
        let info = self.resolve(&r, &parties, name.to_vec(), sh.no, clock::now());
        Ok(Forced {
            mode,
            holders: info.holders,
            waiters: info.waiters.len() as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::client::Client;
    use crate::config::Capacities;
    use crate::error::Error;
    use crate::table::{LockTable, Mode};

    fn table() -> Arc<LockTable> {
        let caps = Capacities {
            max_locks: 16,
            max_holds: 16,
            max_owners: 8,
            shards: 1,
            ..Default::default()
        };
        Arc::new(LockTable::anonymous(&caps).expect("table"))
    }

    #[test]
    fn snapshots_show_holders_and_the_queue_in_order() {
        let t = table();
        let (a, b, c) = (
            Client::with_table(t.clone(), "a").expect("a"),
            Client::with_table(t.clone(), "b").expect("b"),
            Client::with_table(t.clone(), "c").expect("c"),
        );
        let ga = a.lock_shared("n").expect("a");
        let gb = b.lock_shared("n").expect("b");
        // Snapshot while the writer waits, then force the readers out (before asserting
        // anything, so that a failed assertion cannot leave the writer waiting forever).
        let (locks, one, owners, forced, told) = std::thread::scope(|s| {
            let waiter = s.spawn(|| c.lock("n").map(|g| g.owner_died()));
            while t.stats().waiting == 0 {
                std::thread::yield_now();
            }
            let locks = t.locks();
            let one = t.lock_info(b"n");
            let owners = t.owners_info(&locks);
            let forced = t.force_release(b"n");
            (locks, one, owners, forced, waiter.join().expect("waiter"))
        });
        assert_eq!(locks.len(), 1);
        let l = &locks[0];
        assert_eq!((l.name.as_slice(), l.mode), (&b"n"[..], Some(Mode::Shared)));
        let labels: Vec<&str> = l.holders.iter().map(|p| p.label.as_str()).collect();
        assert!(labels.contains(&"a") && labels.contains(&"b"), "{labels:?}");
        assert_eq!(l.waiters.len(), 1);
        assert_eq!((l.waiters[0].label.as_str(), l.waiters[0].mode), ("c", Mode::Exclusive));
        let one = one.expect("valid name").expect("in the index");
        assert_eq!(
            (&one.name, one.token, one.holders.len(), one.waiters.len()),
            (&l.name, l.token, 2, 1)
        );
        let by_label = |x: &str| owners.iter().find(|o| o.label == x).expect("owner");
        assert_eq!((by_label("a").holds, by_label("a").waits), (1, 0));
        assert_eq!((by_label("c").holds, by_label("c").waits), (0, 1));
        assert!(owners.iter().all(|o| o.alive && o.pid == std::process::id()));
        // Forcing out both readers granted the writer, which was told.
        let forced = forced.expect("force");
        assert_eq!(
            (forced.mode, forced.holders.len(), forced.waiters),
            (Mode::Shared, 2, 1)
        );
        assert!(told.expect("lock"), "the writer must be told");
        assert!(matches!(ga.unlock(), Err(Error::NotHeld)));
        assert!(matches!(gb.unlock(), Err(Error::NotHeld)));
        assert!(t.check().is_empty(), "{:?}", t.check());
        assert!(t.locks().is_empty());
    }

    #[test]
    fn owners_show_their_start_time_as_a_wall_clock_time() {
        use std::time::{Duration, SystemTime};

        use super::BootClock;

        let b = BootClock::parse("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n", 100).expect("parse");
        let at = |s: u64, ms: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms);
        assert_eq!(b.wall_time(12_345), Some(at(1_700_000_123, 450)));
        assert_eq!(b.wall_time(0), None);
        // Garbage from the segment gives no date past what RFC 3339 writes, and no panic.
        assert_eq!(b.wall_time(u64::MAX), None);
        assert_eq!(BootClock { btime: u64::MAX, hz: 1 }.wall_time(1), None);
        assert!(BootClock { btime: 0, hz: 1 }.wall_time(253_402_300_799).is_some());
        assert_eq!(BootClock::parse("cpu 1\n", 100), None);
        assert_eq!(BootClock::parse("btime 1\n", 0), None);

        // This process: registered a moment ago, started before that, and not in the future.
        let t = table();
        let _a = Client::with_table(t.clone(), "a").expect("a");
        let owners = t.owners_info(&t.locks());
        let me = crate::owner::ProcessId::current();
        assert_eq!(owners[0].start_time, me.start_time);
        let started = owners[0].started_at.expect("start time known on Linux");
        let now = SystemTime::now();
        assert!(started <= now + Duration::from_secs(1), "{started:?} after {now:?}");
        let boot = BootClock::read().expect("boot clock");
        assert!(started >= SystemTime::UNIX_EPOCH + Duration::from_secs(boot.btime));
    }

    #[test]
    fn died_locks_lists_the_free_locks_that_carry_an_owner_died_notice() {
        let t = table();
        let a = Client::with_table(t.clone(), "a").expect("a");
        let _held = a.lock("held").expect("lock");
        drop(a.lock("idle").expect("lock"));
        let _forced = a.lock("forced").expect("lock");
        t.force_release(b"forced").expect("force");
        assert!(t.locks().iter().all(|l| l.name != b"forced"));
        let died = t.died_locks();
        assert_eq!(died.len(), 1, "{died:?}");
        let d = &died[0];
        assert_eq!((d.name.as_slice(), d.mode, d.owner_died), (&b"forced"[..], None, true));
        assert!(d.holders.is_empty() && d.waiters.is_empty());
        assert_eq!(
            t.lock_info(b"forced").expect("name").expect("in the index").token,
            d.token
        );
        // The next locker is told, and the notice is gone.
        assert!(a.lock("forced").expect("lock").owner_died());
        assert!(t.died_locks().is_empty());
        assert_eq!(t.locks().len(), 1);
    }

    #[test]
    fn force_release_of_a_free_or_unknown_lock_is_not_held() {
        let t = table();
        let a = Client::with_table(t.clone(), "a").expect("a");
        drop(a.lock("idle").expect("lock"));
        assert!(matches!(t.force_release(b"idle"), Err(Error::NotHeld)));
        assert!(matches!(t.force_release(b"never"), Err(Error::NotHeld)));
        assert!(matches!(t.force_release(b""), Err(Error::NameInvalid { .. })));
        // Not forced: the next grant is not told anything.
        assert!(!a.lock("idle").expect("lock").owner_died());
        assert!(t.check().is_empty());
    }

    #[test]
    fn pool_counts_cover_every_state_and_sum_to_capacity() {
        let t = table();
        let a = Client::with_table(t.clone(), "a").expect("a");
        let _g = a.lock_shared("x").expect("lock");
        for p in t.pool_counts() {
            let sum: u64 = p.states.iter().map(|(_, n)| n).sum();
            assert_eq!(sum, p.capacity, "{p:?}");
        }
        let counts = t.pool_counts();
        assert_eq!(counts[0].states, [("FREE", 15), ("IDLE", 0), ("HELD", 1), ("DIED", 0)]);
        assert!(counts[1].states.contains(&("HELD", 1)));
        assert!(counts[2].states.contains(&("LIVE", 1)));
        assert_eq!(t.supervisor(), None);
    }
}
