//! Crash safety: latches whose holder died, shard repair, and reaping dead owners.
//!
//! # What is the truth
//! Each record's own words are the truth: a pool node's state (FREE, IDLE, HELD, WAITING, ...),
//! an entry's name, hash, mode, exclusive owner, flags and token, a hold's entry, owner, mode and
//! token. Records are filled in while FREE and published by their state change, so a record that
//! is not FREE is complete. Everything else is derived and can be rebuilt from the records: the
//! pool lists and counts, the hash chains, each entry's reader list, wait queue and counts, and
//! the entry's HELD/IDLE state.
//!
//! # Who repairs, and how
//! - A process killed inside a shard's critical section leaves the latch word naming it. The next
//!   process to want the latch sees the same holder for `LATCH_SLEEP`, finds it dead, takes
//!   the latch over with one CAS, and [`repair`](LockTable::repair)s the shard before going on.
//! - A dead owner's holds and waits are released by [`reap_if_dead`](LockTable::reap_if_dead):
//!   by `shmlockd` as soon as the process's pidfd fires, or, without the daemon, by any caller
//!   that finds the lock it wants kept from it by an owner nobody has checked for a
//!   [`CHECK_PERIOD`] (a `try_lock` or a short timeout included; a sleeping waiter looks again
//!   after each sleep, of at most 30 ms while no supervisor has claimed the segment, and at once
//!   after a reap, so a chain of dead waiters handed the lock in turn costs no sleeps). The
//!   owner record goes LIVE -> REAPING (under the owner latch, so one reaper wins) -> FREE; a
//!   record stuck in REAPING because its reaper died too is taken over by the next reaper.
//! - Every lock a dead owner held is released with the entry's OWNER_DIED flag set; the next
//!   grantee is told. Until then the entry stays HELD (never evicted), so the notice is not lost.

use std::sync::atomic::{AtomicU32, Ordering, Ordering::Relaxed};

use super::shard::LatchGuard;
use super::*;
use crate::owner::pid_alive;
use crate::shm::sys::futex_wake;

/// Latch ids with this bit name a process by pid (a process with no owner record, such as the
/// CLI or a registering process); other ids are an owner index + 1.
pub const PID_ID: u32 = 1 << 30;

/// How often, at most, the processes that want a lock check together that an owner keeping it
/// from them is alive (without `shmlockd`, this is how a dead holder is noticed). Shorter than
/// the waiters' sleeps, so a waiter that sleeps a whole sleep finds the check due.
pub(crate) const CHECK_PERIOD: std::time::Duration = std::time::Duration::from_millis(25);

/// The latch id of this process, for latches taken without an owner record.
pub fn pid_latch_id() -> u32 {
    PID_ID | (std::process::id() & (PID_ID - 1))
}

impl LockTable {
    /// Is the holder named by latch id `id` dead (or not a holder at all)?
    pub(super) fn holder_dead(&self, id: u32) -> bool {
        if id & PID_ID != 0 {
            return !pid_alive(id & !PID_ID);
        }
        let idx = id.wrapping_sub(1);
        match (self.owners().get(idx as usize), self.owner_pool().state(Idx(idx))) {
            (Some(o), Ok(OwnerState::Live)) => !o.process().is_alive(),
            _ => true,
        }
    }

    /// Takes shard `sh`'s latch as `id`. If the previous holder died inside its critical section,
    /// repairs the shard first.
    pub(super) fn lock_shard<'s>(&self, sh: &Shard<'s>, id: u32) -> LatchGuard<'s> {
        let g = Latch::new(&sh.hdr.latch).lock(id, &|h| self.holder_dead(h));
        if let Some(dead) = g.recovered() {
            tracing::warn!(
                shard = sh.no,
                holder = dead,
                "a latch holder died inside its critical section; repairing the shard"
            );
            if let Err(e) = self.repair(sh) {
                tracing::error!(shard = sh.no, "shard repair failed: {e}");
            }
            sh.bump(STAT_REPAIRS);
        }
        g
    }

    /// Takes the owner-pool latch (by pid). If its holder died, rebuilds the owner pool's lists.
    pub(crate) fn lock_owners(&self) -> LatchGuard<'_> {
        // Only ids by pid take this latch: a word naming an owner record is garbage.
        let dead = |h: u32| h & PID_ID == 0 || self.holder_dead(h);
        let g = Latch::new(&self.table_hdr().owner_latch).lock(pid_latch_id(), &dead);
        if g.recovered().is_some() {
            tracing::warn!("an owner-latch holder died; rebuilding the owner pool");
            self.owner_pool().rebuild();
        }
        g
    }

    /// Rebuilds everything derived in shard `sh` from its records (the latch is held): pool
    /// lists, hash chains, reader lists, wait queues (in request order), counts and entry states.
    /// Drops records that are not whole; finishes a handoff that was cut short; grants or wakes
    /// waiters of locks left free.
    pub(super) fn repair(&self, sh: &Shard<'_>) -> Result<()> {
        let (ep, hp) = (sh.epool(), sh.hpool());
        ep.rebuild();
        hp.rebuild();
        let now = clock::now();
        // Close every lock word to fast CASes and take fast holds into the latched form (the
        // states are recomputed below). Published again at the end.
        for e in sh.entries() {
            let old = e.lw.fetch_or(u64::from(SLOW), Ordering::Acquire);
            let holder = lw_val(old) & FAST_OWNER;
            if holder != 0 {
                e.lw.store(lock_word(lw_gen(old), SLOW), Relaxed);
                e.owner.store(holder - 1, Relaxed);
                e.mode.store(Mode::Exclusive.to_u32(), Relaxed);
            }
        }
        let (entries, holds) = (sh.entries(), sh.holds());
        let max_len = self.geo.max_name_len as usize;

        // Entries: keep those whose name is whole and unique; chain them.
        for b in sh.buckets() {
            set_head(b, NIL, Relaxed);
        }
        let mut names = std::collections::HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            let idx = Idx(i as u32);
            let state = ep.state(idx)?;
            if state == EntryState::Free {
                continue;
            }
            let name = sh.name_of(i as u32);
            let whole = (1..=max_len).contains(&(e.name_len.load(Relaxed) as usize))
                && name.len() == e.name_len.load(Relaxed) as usize
                && name::hash(self.seed, &name) == e.hash.load(Relaxed);
            if !whole || !names.insert(name) {
                ep.transition(idx, state, EntryState::Free, now)?;
                continue;
            }
            e.readers.store(0, Relaxed);
            e.reader_head.store(NIL, Relaxed);
            e.wait_head.store(NIL, Relaxed);
            e.wait_tail.store(NIL, Relaxed);
            e.waiters.store(0, Relaxed);
            let b = &sh.buckets()[self.bucket_of(e.hash.load(Relaxed))];
            e.next.store(head(b, Relaxed), Relaxed);
            set_head(b, i as u32, Relaxed);
        }

        // Holds: drop those that name nothing valid; relink readers; queue waiters by age.
        let mut waiting = Vec::new();
        let mut granted = Vec::new();
        for (h, hold) in holds.iter().enumerate() {
            let idx = Idx(h as u32);
            let state = hp.state(idx)?;
            if state == HoldState::Free {
                continue;
            }
            let i = hold.entry.load(Relaxed);
            let mode = Mode::from_u32(hold.mode.load(Relaxed));
            let valid = matches!(
                ep.state(Idx(i)),
                Ok(EntryState::Idle | EntryState::Held | EntryState::Died)
            ) && (hold.owner.load(Relaxed) as usize) < self.owners().len()
                && match state {
                    HoldState::Held => mode == Some(Mode::Shared),
                    HoldState::Granted => mode == Some(Mode::Exclusive) || hold.flags.load(Relaxed) & FORCED != 0,
                    _ => mode.is_some(),
                };
            if !valid {
                hp.transition(idx, state, HoldState::Free, now)?;
                futex_wake(&hold.futex, 1); // a thread sleeping on it finds it gone
                continue;
            }
            match state {
                HoldState::Held => {
                    sh.add_reader(&entries[i as usize], h as u32);
                    if hold.futex.load(Relaxed) == WAIT {
                        // Its granter died between the grant and the wake-up: wake it.
                        hold.futex.store(GRANTED, Ordering::Release);
                        futex_wake(&hold.futex, 1);
                    }
                }
                HoldState::Waiting => waiting.push((hp.time(idx)?, h as u32)),
                _ => granted.push(h as u32),
            }
        }
        waiting.sort_unstable();
        for &(_, w) in &waiting {
            Self::link_waiter(sh, &entries[holds[w as usize].entry.load(Relaxed) as usize], w);
        }

        // Modes: readers make it shared; an exclusive owner must be a valid index.
        let mut token = sh.hdr.token.load(Relaxed);
        for (i, e) in entries.iter().enumerate() {
            if ep.state(Idx(i as u32))? == EntryState::Free {
                continue;
            }
            token = token.max(e.last_token());
            let owner = e.owner.load(Relaxed);
            if e.readers.load(Relaxed) > 0 {
                e.mode.store(Mode::Shared.to_u32(), Relaxed);
                e.owner.store(NIL, Relaxed);
            } else if e.mode.load(Relaxed) != Mode::Exclusive.to_u32() || owner as usize >= self.owners().len() {
                e.mode.store(MODE_NONE, Relaxed);
                e.owner.store(NIL, Relaxed);
            }
        }
        for hold in holds {
            token = token.max(hold.token.load(Relaxed));
        }
        sh.hdr.token.store(token, Relaxed);

        // A handoff whose grantee has not picked it up must match the entry; else it waits again.
        // (One forced out before its waiter came stays for the waiter: see `force_release`.)
        for h in granted {
            let hold = &holds[h as usize];
            let e = &entries[hold.entry.load(Relaxed) as usize];
            if hold.flags.load(Relaxed) & FORCED != 0 {
                continue;
            }
            if e.mode.load(Relaxed) != Mode::Exclusive.to_u32() || e.owner.load(Relaxed) != hold.owner.load(Relaxed) {
                hp.transition(Idx(h), HoldState::Granted, HoldState::Waiting, now)?;
                hold.futex.store(WAIT, Relaxed);
                Self::link_waiter(sh, e, h);
            } else {
                // The grant is recorded; a handing process that died before clearing the
                // entry's notice had already stored it into the grant.
                if e.died() {
                    hold.flags.store(OWNER_DIED, Relaxed);
                    e.set_died(false);
                }
                if hold.futex.load(Relaxed) != GRANTED {
                    // The handing process died between the grant and the wake-up: wake it.
                    hold.futex.store(GRANTED, Ordering::Release);
                    futex_wake(&hold.futex, 1);
                }
            }
        }
        // An exclusive owner that also waits on the same entry was being handed the lock when the
        // handing process died: finish the handoff.
        for (_, w) in waiting {
            let hold = &holds[w as usize];
            let e = &entries[hold.entry.load(Relaxed) as usize];
            if e.mode.load(Relaxed) == Mode::Exclusive.to_u32() && e.owner.load(Relaxed) == hold.owner.load(Relaxed) {
                Self::dequeue(sh, e, w);
                hold.token.store(e.last_token(), Relaxed);
                // The entry still carries the notice the handoff was passing on.
                hold.flags.store(if e.died() { OWNER_DIED } else { 0 }, Relaxed);
                e.set_died(false);
                hp.transition(Idx(w), HoldState::Waiting, HoldState::Granted, now)?;
                hold.futex.store(GRANTED, Ordering::Release);
                futex_wake(&hold.futex, 1);
            }
        }

        // Entry states follow from the above; a lock left free with waiters goes to the next one.
        for i in 0..entries.len() as u32 {
            let state = ep.state(Idx(i))?;
            if state == EntryState::Free {
                continue;
            }
            let e = &entries[i as usize];
            let busy = e.mode.load(Relaxed) != MODE_NONE || e.waiters.load(Relaxed) > 0;
            let want = match (busy, e.died()) {
                (true, _) => EntryState::Held,
                (false, true) => EntryState::Died,
                (false, false) => EntryState::Idle,
            };
            if state != want {
                ep.transition(Idx(i), state, want, ep.time(Idx(i))?)?;
            }
            let head = e.wait_head.load(Relaxed);
            let head_shared = holds
                .get(head as usize)
                .is_some_and(|h| h.mode.load(Relaxed) == Mode::Shared.to_u32());
            match e.mode.load(Relaxed) {
                MODE_NONE if e.waiters.load(Relaxed) > 0 => {
                    if let Some(f) = self.hand_off(sh, i)? {
                        futex_wake(f, 1);
                    }
                }
                m if m == Mode::Shared.to_u32() && head_shared => self.grant_shared_run(sh, i, now)?,
                _ => {}
            }
            sh.publish(i);
        }
        Ok(())
    }

    /// Owners worth checking for death when a request on entry `e` cannot be granted
    /// (the latch is held): the exclusive holder, some shared holders, or, if the lock is free, the
    /// oldest waiter (a dead one woken to take the lock would block the queue). NIL pads.
    pub(super) fn suspects(sh: &Shard<'_>, e: &Entry, me: OwnerRef) -> [u32; 4] {
        let mut out = [NIL; 4];
        match Mode::from_u32(e.mode.load(Relaxed)) {
            Some(Mode::Exclusive) => out[0] = e.owner.load(Relaxed),
            Some(Mode::Shared) => {
                for (slot, (_, h)) in out.iter_mut().zip(Self::readers(sh, e)) {
                    *slot = h.owner.load(Relaxed);
                }
            }
            None => {
                if let Some(h) = sh.holds().get(e.wait_head.load(Relaxed) as usize) {
                    out[0] = h.owner.load(Relaxed);
                }
            }
        }
        out.map(|o| if o == me.idx { NIL } else { o })
    }

    /// The owners of [`suspects`](Self::suspects) that nobody has checked for a
    /// [`CHECK_PERIOD`], each claimed for the caller to check (NIL for the rest).
    pub(super) fn due_suspects(&self, sh: &Shard<'_>, e: &Entry, me: OwnerRef) -> [u32; 4] {
        let now = clock::coarse().millis32();
        let period = CHECK_PERIOD.as_millis() as u32;
        Self::suspects(sh, e, me).map(|o| match self.owners().get(o as usize) {
            Some(rec) if rec.claim_check(now, period) => o,
            _ => NIL,
        })
    }

    /// Reaps those of `owners` (NIL pads) whose processes are dead, latching as `me`. Returns
    /// whether any was reaped.
    pub(super) fn reap_suspects(&self, owners: [u32; 4], me: OwnerRef) -> Result<bool> {
        let mut reaped = false;
        for o in owners.into_iter().filter(|&o| o != NIL) {
            reaped |= self.reap_if_dead(o, me.latch_id())?;
        }
        Ok(reaped)
    }

    /// Reaps owner `idx` if its process is dead: releases everything it holds (telling the next
    /// holders that their predecessor died) and cancels its waits, then frees the record.
    /// `as_id` is the reaper's latch id. Returns whether this call reaped it.
    pub(crate) fn reap_if_dead(&self, idx: u32, as_id: u32) -> Result<bool> {
        let Some(o) = self.owners().get(idx as usize) else {
            return Ok(false);
        };
        let me = std::process::id();
        {
            let _g = self.lock_owners();
            let pool = self.owner_pool();
            match pool.state(Idx(idx))? {
                OwnerState::Live if !o.process().is_alive() => {
                    pool.transition(Idx(idx), OwnerState::Live, OwnerState::Reaping, clock::now())?;
                }
                OwnerState::Reaping if !pid_alive(o.reaper.load(Relaxed)) => {}
                _ => return Ok(false),
            }
            o.reaper.store(me, Relaxed);
            let hdr = self.table_hdr();
            hdr.reaps.store(hdr.reaps.load(Relaxed).saturating_add(1), Relaxed);
        }
        let who = o.process();
        let n = self.release_owner(as_id, idx, 0..self.geo.shards, true)?;
        {
            let _g = self.lock_owners();
            if self.owner_pool().state(Idx(idx))? == OwnerState::Reaping && o.reaper.load(Relaxed) == me {
                self.retire_fast_grants(idx);
                self.owner_pool()
                    .transition(Idx(idx), OwnerState::Reaping, OwnerState::Free, clock::now())?;
            }
        }
        tracing::info!(
            owner = idx,
            pid = who.pid,
            released = n,
            "reaped an owner whose process died"
        );
        Ok(true)
    }

    /// Finishes every reap left half done by a reaper that died (owner records in REAPING whose
    /// reaper is gone). Costs one load when there are none. Returns how many were finished.
    pub(crate) fn finish_abandoned_reaps(&self, as_id: u32) -> Result<usize> {
        let pool = self.owner_pool();
        if pool.count(OwnerState::Reaping) == 0 {
            return Ok(0);
        }
        // Read without the latch: `reap_if_dead` looks again under it.
        let stuck: Vec<u32> = pool
            .iter(OwnerState::Reaping)
            .map(|(i, _)| i.0)
            .take(self.geo.owners as usize)
            .collect();
        let mut n = 0;
        for idx in stuck {
            n += usize::from(self.reap_if_dead(idx, as_id)?);
        }
        Ok(n)
    }

    /// Reaps every owner whose process is dead (a full scan). Returns how many were reaped.
    pub fn reap_dead(&self, as_id: u32) -> Result<usize> {
        let mut n = 0;
        for idx in 0..self.geo.owners {
            if matches!(
                self.owner_pool().state(Idx(idx)),
                Ok(OwnerState::Live | OwnerState::Reaping)
            ) && self.reap_if_dead(idx, as_id)?
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Reaps every owner record of process `pid` (which the caller knows has exited).
    pub fn reap_pid(&self, pid: u32, as_id: u32) -> Result<usize> {
        let mut n = 0;
        for idx in 0..self.geo.owners {
            if self.owners()[idx as usize].pid.load(Relaxed) == pid && self.reap_if_dead(idx, as_id)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Gives up every lock that this process's owner records hold as if the process had died:
    /// each is released marked OWNER_DIED for its next holder, and every wait is cancelled (a
    /// thread blocked on one returns [`Error::Cancelled`]). The records stay registered, and the
    /// guards' unlocks then say [`Error::NotHeld`]. For a process that holds a lock on behalf of
    /// others and learns that they ended without finishing: `shmlock run`'s keeper, once the
    /// command and the wrapper are gone without the wrapper's word that the command exited.
    /// Returns how many locks and waits were given up.
    pub fn abandon_own_locks(&self) -> Result<usize> {
        let me = ProcessId::current();
        let mut n = 0;
        for idx in 0..self.geo.owners {
            let mine = self.owners().get(idx as usize).is_some_and(|o| o.process() == me);
            if mine && matches!(self.owner_pool().state(Idx(idx)), Ok(OwnerState::Live)) {
                n += self.release_owner(pid_latch_id(), idx, 0..self.geo.shards, true)?;
            }
        }
        Ok(n)
    }

    /// Releases every hold and cancels every wait of owner `who` in `shards`, latching as
    /// `as_id`; with `died`, each lock released is marked OWNER_DIED for its next holder. Wakes
    /// any thread of `who` blocked on a cancelled request (it returns `Error::Cancelled`).
    pub(super) fn release_owner(
        &self,
        as_id: u32,
        who: u32,
        shards: impl Iterator<Item = u32>,
        died: bool,
    ) -> Result<usize> {
        let who_ref = OwnerRef { idx: who, gen: 0 };
        let mut n = 0;
        for s in shards.filter(|&s| s < self.geo.shards) {
            let sh = self.shard(s);
            let guard = self.lock_shard(&sh, as_id);
            sh.pin_fast_holds(Some(who))?;
            let mut wakes: Vec<&AtomicU32> = Vec::new();
            let mut touched: Vec<u32> = Vec::new();
            let mark = |e: &Entry| {
                if died {
                    e.set_died(true);
                }
            };
            let held: Vec<u32> = sh.epool().iter(EntryState::Held).map(|(i, _)| i.0).collect();
            for i in held {
                let e = sh.entry(i)?;
                if e.mode.load(Relaxed) == Mode::Exclusive.to_u32() && e.owner.load(Relaxed) == who {
                    mark(e);
                    let g = RawGrant::existing(s, i, NIL, e.last_token(), Mode::Exclusive);
                    wakes.extend(self.release_locked(&sh, who_ref, &g)?);
                    touched.push(i);
                    n += 1;
                }
            }
            for state in [HoldState::Held, HoldState::Waiting, HoldState::Granted] {
                let mine: Vec<u32> = sh
                    .hpool()
                    .iter(state)
                    .map(|(i, _)| i.0)
                    .filter(|&i| sh.holds()[i as usize].owner.load(Relaxed) == who)
                    .collect();
                for h in mine {
                    let hold = &sh.holds()[h as usize];
                    let entry = hold.entry.load(Relaxed);
                    sh.pin(entry)?;
                    touched.push(entry);
                    match state {
                        HoldState::Held => {
                            mark(sh.entry(entry)?);
                            let g = RawGrant::existing(s, entry, h, hold.token.load(Relaxed), Mode::Shared);
                            wakes.extend(self.release_locked(&sh, who_ref, &g)?);
                        }
                        HoldState::Waiting => wakes.extend(self.cancel_wait(&sh, entry, h)?),
                        _ => sh
                            .hpool()
                            .transition(Idx(h), HoldState::Granted, HoldState::Free, clock::coarse())?,
                    }
                    if state != HoldState::Held {
                        // A thread of this owner may sleep on the request: it wakes, finds the
                        // record no longer its own, and returns Error::Cancelled.
                        wakes.push(&hold.futex);
                    }
                    n += 1;
                }
            }
            for i in touched {
                sh.publish(i);
            }
            drop(guard);
            for w in wakes {
                futex_wake(w, 1);
            }
        }
        Ok(n)
    }
}
