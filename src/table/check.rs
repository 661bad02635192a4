//! `check`: verifies every invariant of the table; `stats`: counts for status displays.
//!
//! `check` takes each shard's latch in turn (by pid, as [`pid_latch_id`]), so each shard is seen
//! at one instant even while other processes lock and unlock. Taking a latch whose holder died
//! repairs the shard first, so `check` reports what survives repair, not a dead process's
//! half-done section. Before any latch, [`LockTable::check_headers`] looks at the table and
//! shard headers alone, so a header overwritten with garbage is reported as such (and its shard
//! left alone) rather than mended by the repair that taking its latch may start.

use std::collections::HashSet;

use crate::pool::PoolState;
use std::sync::atomic::Ordering::Relaxed;

use super::*;

/// Above any fencing token a real shard reaches (2^63 grants: centuries at a billion a second):
/// a shard counter beyond it was written by a corruption.
const TOKEN_LIMIT: u64 = 1 << 63;

/// Counts over the whole table (read without latches: a consistent sum only when quiet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct TableStats {
    /// Entries held or waited on.
    pub held: u64,
    /// Entries in the index but neither held nor waited on.
    pub idle: u64,
    /// Entries neither held nor waited on that carry an owner-died notice for the next holder.
    pub died: u64,
    /// Free entries.
    pub free: u64,
    /// Entry capacity (all shards).
    pub entry_capacity: u64,
    /// Shared holds.
    pub shared_holds: u64,
    /// Waiting requests.
    pub waiting: u64,
    /// Hold/wait capacity (all shards).
    pub hold_capacity: u64,
    /// Live owners.
    pub owners: u64,
    /// Owner capacity.
    pub owner_capacity: u64,
    /// Grants since creation.
    pub grants: u64,
    /// Requests that had to wait.
    pub waits: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Grants handed directly to a waiter.
    pub handoffs: u64,
    /// Highest fencing token granted: of the names in the table, and the shards' counters (which
    /// give names their first token).
    pub max_token: u64,
    /// Owners being reaped right now.
    pub reaping: u64,
    /// Owners reaped (their process died) since creation.
    pub reaps: u64,
    /// Shards repaired after a process died inside their critical section, since creation.
    pub repairs: u64,
}

impl LockTable {
    /// Counts of every pool state and the statistics counters. Every count and counter is read
    /// from the segment, so the sums saturate: a corrupted counter shows as a huge number, never
    /// an overflow.
    pub fn stats(&self) -> TableStats {
        let mut st = TableStats::default();
        let add = |sum: &mut u64, v: u64| *sum = sum.saturating_add(v);
        for s in 0..self.geo.shards {
            let sh = self.shard(s);
            let (ep, hp) = (sh.epool(), sh.hpool());
            let count = |n: u32| u64::from(n);
            add(&mut st.held, count(ep.count(EntryState::Held)));
            // Fast holds leave their entries IDLE: count them as held.
            let fast = ep
                .iter(EntryState::Idle)
                .filter(|(i, _)| {
                    sh.entries()
                        .get(i.get())
                        .is_some_and(|e| lw_val(e.lw.load(Relaxed)) & FAST_OWNER != 0)
                })
                .count() as u64;
            add(&mut st.held, fast);
            add(&mut st.idle, count(ep.count(EntryState::Idle)).saturating_sub(fast));
            add(&mut st.died, count(ep.count(EntryState::Died)));
            add(&mut st.free, count(ep.count(EntryState::Free)));
            add(&mut st.entry_capacity, count(ep.capacity()));
            add(&mut st.shared_holds, count(hp.count(HoldState::Held)));
            add(&mut st.waiting, count(hp.count(HoldState::Waiting)));
            add(&mut st.hold_capacity, count(hp.capacity()));
            add(&mut st.grants, sh.hdr.stats[STAT_GRANTS].load(Relaxed));
            add(&mut st.waits, sh.hdr.stats[STAT_WAITS].load(Relaxed));
            add(&mut st.timeouts, sh.hdr.stats[STAT_TIMEOUTS].load(Relaxed));
            add(&mut st.handoffs, sh.hdr.stats[STAT_HANDOFFS].load(Relaxed));
            // The shard's counter gives names their first token; grants since (fast ones
            // included) live in each entry's last token.
            st.max_token = st.max_token.max(sh.hdr.token.load(Relaxed));
            for (i, _) in ep
                .iter(EntryState::Held)
                .chain(ep.iter(EntryState::Idle))
                .chain(ep.iter(EntryState::Died))
            {
                if let Some(e) = sh.entries().get(i.get()) {
                    st.max_token = st.max_token.max(e.last_token());
                }
            }
            add(&mut st.repairs, sh.hdr.stats[STAT_REPAIRS].load(Relaxed));
        }
        let op = self.owner_pool();
        st.owners = u64::from(op.count(OwnerState::Live));
        st.reaping = u64::from(op.count(OwnerState::Reaping));
        st.reaps = self.table_hdr().reaps.load(Relaxed);
        add(&mut st.grants, self.table_hdr().retired_fast_grants.load(Relaxed));
        for (i, _) in op.iter(OwnerState::Live).chain(op.iter(OwnerState::Reaping)) {
            add(
                &mut st.grants,
                self.owners().get(i.get()).map_or(0, |o| o.fast_grants.load(Relaxed)),
            );
        }
        st.owner_capacity = u64::from(op.capacity());
        st
    }

    /// Checks the table header and every shard header without waiting for a latch, taking one
    /// over or repairing anything: list counts within the capacities, list heads and tails in
    /// range, latch words that name a possible holder, fencing counters that can still grow.
    /// A header whose latch is free is also checked for heads that agree with each other (counts
    /// summing to the capacity, a list empty exactly when counted empty), under the latch taken
    /// by a plain try (so nobody is half way through a change); a taken latch leaves only the
    /// checks that hold at every instant. Costs O(shards); one line per finding,
    /// `table header: ...` or `shard N header: ...`.
    ///
    /// Nothing a process killed at any instruction leaves behind fails these checks (its latch
    /// names it, and the lists it was changing are checked only once its latch is free, that is
    /// after the repair); a finding means the headers were overwritten. [`check`](Self::check)
    /// runs this first, and shmlockd refuses to adopt a segment that fails it.
    pub fn check_headers(&self) -> Vec<String> {
        self.headers_report().0
    }

    /// [`check_headers`](Self::check_headers)' findings, and for the owner pool and for each
    /// shard whether its latch must not be taken to check further: its header has findings and
    /// its latch was not free, so taking it could mean taking over a garbage word and repairing.
    fn headers_report(&self) -> (Vec<String>, bool, Vec<bool>) {
        let mut out = Vec::new();
        let hdr = self.table_hdr();
        let prefixed = |out: &mut Vec<String>, prefix: &str, lines: Vec<String>| {
            out.extend(lines.into_iter().map(|l| format!("{prefix}: {l}")));
        };
        let owners = self.owner_pool();
        let settled = Latch::new(&hdr.owner_latch).try_lock(pid_latch_id());
        let owners_free = settled.is_some();
        prefixed(&mut out, "table header", owners.check_heads(owners_free));
        drop(settled);
        if let Some(why) = self.bad_latch_word(hdr.owner_latch.load(Relaxed)) {
            out.push(format!("table header: owner latch {why}"));
        }
        let skip_owners = !out.is_empty() && !owners_free;
        let mut skip_shards = Vec::with_capacity(self.geo.shards as usize);
        for s in 0..self.geo.shards {
            let before = out.len();
            let sh = self.shard(s);
            let prefix = format!("shard {s} header");
            let settled = Latch::new(&sh.hdr.latch).try_lock(pid_latch_id());
            let free = settled.is_some();
            prefixed(&mut out, &prefix, sh.epool().check_heads(free));
            prefixed(&mut out, &prefix, sh.hpool().check_heads(free));
            drop(settled);
            if let Some(why) = self.bad_latch_word(sh.hdr.latch.load(Relaxed)) {
                out.push(format!("{prefix}: latch {why}"));
            }
            let token = sh.hdr.token.load(Relaxed);
            if token > TOKEN_LIMIT {
                out.push(format!(
                    "{prefix}: fencing token counter {token} is beyond any real count (2^63)"
                ));
            }
            skip_shards.push(out.len() > before && !free);
        }
        (out, skip_owners, skip_shards)
    }

    /// Why latch word `w` names no process that could hold it, if it does not: ids are an
    /// owner index + 1, or [`PID_ID`] with a pid (at most 2^22 on Linux).
    fn bad_latch_word(&self, w: u32) -> Option<String> {
        const PID_MAX_LIMIT: u32 = 1 << 22;
        let id = w & !(1 << 31); // the WAITERS bit
        let ok = match id {
            0 => true,
            id if id & PID_ID != 0 => (id & !PID_ID) <= PID_MAX_LIMIT,
            id => id <= self.geo.owners,
        };
        (!ok).then(|| format!("word {w:#x} names no possible holder"))
    }

    /// Verifies every invariant; one line per violation, empty when the table is consistent.
    ///
    /// First [`check_headers`](Self::check_headers), which takes no latch. A header with
    /// findings whose latch was not free is reported and its part (the owner pool, or the shard)
    /// is not checked further: taking its latch could judge a garbage latch word a dead holder
    /// and repair the shard, and what was wrong would be rebuilt away unreported.
    pub fn check(&self) -> Vec<String> {
        let (mut out, skip_owners, skip_shards) = self.headers_report();
        let op = self.owner_pool();
        if skip_owners {
            out.push(
                "owner pool: not checked further, its header is corrupt and its latch taken (not taken over, so nothing was repaired)"
                    .into(),
            );
        } else {
            let _g = self.lock_owners();
            out.extend(op.check());
        }
        // A REAPING owner still holds what its reaper has not released yet.
        let live = |o: u32| matches!(op.state(Idx(o)), Ok(OwnerState::Live | OwnerState::Reaping));
        for s in 0..self.geo.shards {
            if skip_shards[s as usize] {
                out.push(format!(
                    "shard {s}: not checked further, its header is corrupt and its latch taken (not taken over, so nothing was repaired)"
                ));
                continue;
            }
            let sh = self.shard(s);
            let _g = self.lock_shard(&sh, pid_latch_id());
            // Fast holds into the latched form, so the HELD list names every holder.
            if let Err(e) = sh.pin_fast_holds(None) {
                out.push(format!("shard {s}: {e}"));
            }
            let before = out.len();
            self.check_shard(&sh, &live, &mut out);
            for line in &mut out[before..] {
                *line = format!("shard {s}: {line}");
            }
        }
        out
    }

    fn check_shard(&self, sh: &Shard<'_>, live: &dyn Fn(u32) -> bool, out: &mut Vec<String>) {
        let (ep, hp, entries, holds) = (sh.epool(), sh.hpool(), sh.entries(), sh.holds());
        out.extend(ep.check());
        out.extend(hp.check());
        // The index: chains reach exactly the IDLE, HELD and DIED entries, each once, in the right bucket.
        let mut indexed = HashSet::new();
        let mut names = HashSet::new();
        for (b, first) in sh.buckets().iter().enumerate() {
            let mut cur = head(first, Relaxed);
            while cur != NIL {
                let Some(e) = entries.get(cur as usize) else {
                    out.push(format!("bucket {b} reaches entry {cur}, out of range"));
                    break;
                };
                if !indexed.insert(cur) {
                    out.push(format!("entry {cur} reached twice from the buckets (bucket {b})"));
                    break;
                }
                let h = e.hash.load(Relaxed);
                if self.bucket_of(h) != b || self.shard_of(h) != sh.no {
                    out.push(format!("entry {cur} is in bucket {b} but its hash belongs elsewhere"));
                }
                match ep.state(Idx(cur)) {
                    Ok(EntryState::Idle | EntryState::Held | EntryState::Died) => {}
                    st => out.push(format!("bucket {b} reaches entry {cur} in state {st:?}")),
                }
                let name = sh.name_of(cur);
                if name::hash(self.seed, &name) != h {
                    out.push(format!("entry {cur}: stored hash does not match its name"));
                }
                if !names.insert(name) {
                    out.push(format!("entry {cur}: name indexed twice"));
                }
                cur = e.next.load(Relaxed);
            }
        }
        let in_use = [EntryState::Idle, EntryState::Held, EntryState::Died]
            .map(|s| u64::from(ep.count(s)))
            .iter()
            .sum::<u64>();
        if indexed.len() as u64 != in_use {
            out.push(format!(
                "{} entries indexed but {in_use} are IDLE, HELD or DIED",
                indexed.len()
            ));
        }
        let (mut readers_total, mut waiters_total) = (0u64, 0u64);
        for (i, e) in entries.iter().enumerate() {
            let i = i as u32;
            let Ok(state) = ep.state(Idx(i)) else { continue };
            if state == EntryState::Free {
                continue;
            }
            let (mode, owner, readers, waiters) = (
                e.mode.load(Relaxed),
                e.owner.load(Relaxed),
                e.readers.load(Relaxed),
                e.waiters.load(Relaxed),
            );
            // A fast hold may appear at any moment, latch or not, on an IDLE entry or on a free
            // HELD one whose head waiter was woken (`publish`); it must name an owner, and
            // nothing else may carry one.
            let w = lw_val(e.lw.load(Relaxed));
            let fast = w & FAST_OWNER;
            let may_open = state == EntryState::Idle
                || (state == EntryState::Held && mode == MODE_NONE && readers == 0 && waiters > 0);
            if fast != 0 {
                if !may_open || w & SLOW != 0 {
                    out.push(format!(
                        "entry {i}: a fast hold on a {} entry (word {w:#x})",
                        state.name()
                    ));
                } else if !live(fast - 1) {
                    out.push(format!("entry {i}: fast holder {} is not a live owner", fast - 1));
                }
            } else if w == 0 && !may_open {
                out.push(format!("entry {i} is {} but open to fast locking", state.name()));
            }
            // Open with waiters only while the head waiter is awake: a fast release wakes nobody.
            let head_woken = sh
                .holds()
                .get(e.wait_head.load(Relaxed) as usize)
                .is_some_and(|h| h.futex.load(Relaxed) == WOKEN);
            if w & SLOW == 0 && state == EntryState::Held && !head_woken {
                out.push(format!(
                    "entry {i} is open to fast locking while its head waiter sleeps"
                ));
            }
            if state == EntryState::Idle || state == EntryState::Died {
                if mode != MODE_NONE || owner != NIL || readers != 0 || waiters != 0 {
                    out.push(format!(
                        "entry {i} is {} but has mode {mode}, {readers} readers, {waiters} waiters",
                        state.name()
                    ));
                }
                if (state == EntryState::Died) != e.died() {
                    out.push(format!(
                        "entry {i} is {} but its owner-died flag disagrees",
                        state.name()
                    ));
                }
                continue;
            }
            if mode == MODE_NONE && waiters == 0 {
                out.push(format!("entry {i} is HELD but nobody holds or waits"));
            }
            match Mode::from_u32(mode) {
                Some(Mode::Exclusive) => {
                    if readers != 0 {
                        out.push(format!("entry {i}: exclusive holder and {readers} readers at once"));
                    }
                    if !live(owner) {
                        out.push(format!("entry {i}: exclusive holder {owner} is not a live owner"));
                    }
                }
                Some(Mode::Shared) => {
                    let list: Vec<(u32, &Hold)> = Self::readers(sh, e).collect();
                    if list.len() != readers as usize || readers == 0 {
                        out.push(format!("entry {i}: {readers} readers counted, {} linked", list.len()));
                    }
                    for (h, hold) in list {
                        if hp.state(Idx(h)).ok() != Some(HoldState::Held) || hold.entry.load(Relaxed) != i {
                            out.push(format!("entry {i}: reader {h} is not a HELD hold of this entry"));
                        }
                        if !live(hold.owner.load(Relaxed)) {
                            out.push(format!(
                                "entry {i}: reader {h} belongs to owner {} which is not live",
                                hold.owner.load(Relaxed)
                            ));
                        }
                    }
                }
                None if mode == MODE_NONE => {}
                None => out.push(format!("entry {i}: mode {mode} is not a mode")),
            }
            readers_total += u64::from(readers);
            // The queue: well formed, every member WAITING on this entry, count right.
            let (mut prev, mut cur, mut n) = (NIL, e.wait_head.load(Relaxed), 0u32);
            while cur != NIL {
                let Some(hold) = holds.get(cur as usize) else {
                    out.push(format!("entry {i}: queue reaches hold {cur}, out of range"));
                    break;
                };
                n += 1;
                if n > holds.len() as u32 {
                    out.push(format!("entry {i}: queue loops"));
                    break;
                }
                if hp.state(Idx(cur)).ok() != Some(HoldState::Waiting) || hold.entry.load(Relaxed) != i {
                    out.push(format!("entry {i}: queued hold {cur} is not WAITING on this entry"));
                }
                if !live(hold.owner.load(Relaxed)) {
                    out.push(format!(
                        "entry {i}: queued hold {cur} belongs to owner {} which is not live",
                        hold.owner.load(Relaxed)
                    ));
                }
                if hold.prev.load(Relaxed) != prev {
                    out.push(format!("entry {i}: queued hold {cur} has a wrong prev link"));
                }
                prev = cur;
                cur = hold.next.load(Relaxed);
            }
            if e.wait_tail.load(Relaxed) != prev {
                out.push(format!(
                    "entry {i}: queue tail is {} but the last member is {prev}",
                    e.wait_tail.load(Relaxed)
                ));
            }
            if n != waiters {
                out.push(format!("entry {i}: {waiters} waiters counted, {n} queued"));
            }
            waiters_total += u64::from(n);
        }
        if readers_total != u64::from(hp.count(HoldState::Held)) {
            out.push(format!(
                "{readers_total} readers on entries but {} HELD holds",
                hp.count(HoldState::Held)
            ));
        }
        if waiters_total != u64::from(hp.count(HoldState::Waiting)) {
            out.push(format!(
                "{waiters_total} queued but {} WAITING holds",
                hp.count(HoldState::Waiting)
            ));
        }
        for (h, _) in hp.iter(HoldState::Granted) {
            let hold = &holds[h.get()];
            let e = entries.get(hold.entry.load(Relaxed) as usize);
            // A FORCED one was taken away before its waiter came for it (see `force_release`).
            let forced = hold.flags.load(Relaxed) & FORCED != 0;
            if !forced && e.is_none_or(|e| e.owner.load(Relaxed) != hold.owner.load(Relaxed)) {
                out.push(format!(
                    "hold {} is GRANTED but its entry is not held by its owner",
                    h.0
                ));
            }
        }
    }
}
