//! Waiting: the FIFO queue of an entry, sleeping on a waiter's own futex, handoff and timeouts.
//!
//! A waiter's Hold record sits in its entry's queue (oldest first) in state WAITING. It sleeps on
//! `Hold::futex`, so a release wakes exactly the one waiter it chose, never a herd:
//! - `WOKEN`: the lock was freed and this (oldest) waiter may try for it; a barging request may
//!   have beaten it, in which case it sleeps again, keeping its place;
//! - `GRANTED`: the lock was handed to it (after [`FAIR_AFTER`](super::FAIR_AFTER), or because it
//!   asked for shared mode); its grant is already recorded in the entry.
//!
//! Every sleep is bounded ([`POLL`]), so a waiter re-examines its state even if a wake-up was
//! lost (for instance because the releasing process was killed between its store and its wake).
//! After each sleep it asks its caller's [`Interrupt`] whether to give up (Ctrl-C in a Python
//! wait, a cancelled gateway request): then it withdraws its request as a timeout does.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::*;
use crate::shm::sys::futex_wait;

const R: Ordering = Ordering::Relaxed;

/// Longest single sleep of a waiter before it re-examines its request.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// Longest single sleep of a waiter when no supervisor watches the segment: a little over
/// [`CHECK_PERIOD`](super::reap::CHECK_PERIOD), so that a waiter finds its holder's check due
/// after every sleep (the coarse clock that stamps checks moves in steps of a few ms).
pub(crate) const UNSUPERVISED_POLL: Duration = Duration::from_millis(30);

impl LockTable {
    /// Appends a WAITING request of `me` for entry `i`; returns its Hold index and generation.
    pub(super) fn enqueue(&self, sh: &Shard<'_>, i: u32, mode: Mode, me: OwnerRef) -> Result<(u32, u32)> {
        let e = sh.entry(i)?;
        let w = sh.claim_hold(i, me, mode, HoldState::Waiting, clock::now())?;
        let hold = &sh.holds()[w as usize];
        crate::chaos::point();
        Self::link_waiter(sh, e, w);
        if let s @ (EntryState::Idle | EntryState::Died) = sh.epool().state(Idx(i))? {
            sh.epool().transition(Idx(i), s, EntryState::Held, clock::coarse())?;
        }
        sh.bump(STAT_WAITS);
        Ok((w, hold.gen.load(R)))
    }

    /// Appends the filled-in WAITING hold `w` to entry `e`'s queue.
    pub(super) fn link_waiter(sh: &Shard<'_>, e: &Entry, w: u32) {
        let hold = &sh.holds()[w as usize];
        let tail = e.wait_tail.load(R);
        hold.prev.store(tail, R);
        hold.next.store(NIL, R);
        match sh.holds().get(tail as usize) {
            Some(t) => t.next.store(w, R),
            None => e.wait_head.store(w, R),
        }
        e.wait_tail.store(w, R);
        e.waiters.store(e.waiters.load(R).saturating_add(1), R);
    }

    /// Takes Hold `w` out of entry `i`'s queue.
    pub(super) fn dequeue(sh: &Shard<'_>, e: &Entry, w: u32) {
        let hold = &sh.holds()[w as usize];
        let (p, n) = (hold.prev.load(R), hold.next.load(R));
        match sh.holds().get(p as usize) {
            Some(ph) => ph.next.store(n, R),
            None => e.wait_head.store(n, R),
        }
        match sh.holds().get(n as usize) {
            Some(nh) => nh.prev.store(p, R),
            None => e.wait_tail.store(p, R),
        }
        hold.next.store(NIL, R);
        hold.prev.store(NIL, R);
        e.waiters.store(e.waiters.load(R).saturating_sub(1), R);
    }

    /// Hands the free entry `i` to its oldest waiter (and, if that waiter wants shared mode, to
    /// the whole run of shared waiters behind it). Wakes shared grantees here; returns the
    /// exclusive grantee's futex for the caller to wake after dropping the latch.
    ///
    /// The entry's owner-died notice is cleared only once the grant that carries it is recorded
    /// (the grantee's hold says GRANTED with the flag): a process killed anywhere before leaves
    /// the notice on the entry, and repair, finishing the handoff, passes it on.
    pub(super) fn hand_off<'a>(&self, sh: &'a Shard<'_>, i: u32) -> Result<Option<&'a AtomicU32>> {
        let e = sh.entry(i)?;
        let now = clock::coarse();
        let died = if e.died() { OWNER_DIED } else { 0 };
        let head = e.wait_head.load(R);
        let hold = sh.hold(head)?;
        sh.epool().touch(Idx(i), now)?;
        if hold.mode.load(R) == Mode::Exclusive.to_u32() {
            // First: a counter that cannot grow (a corrupt shard) fails before anything moves.
            let token = sh.next_token(e)?;
            Self::dequeue(sh, e, head);
            crate::chaos::point();
            e.set_last_token(token);
            e.owner.store(hold.owner.load(R), R);
            e.stamp(now);
            e.mode.store(Mode::Exclusive.to_u32(), R);
            crate::chaos::point();
            hold.token.store(token, R);
            hold.flags.store(died, R);
            sh.hpool()
                .transition(Idx(head), HoldState::Waiting, HoldState::Granted, now)?;
            crate::chaos::point();
            e.set_died(false);
            hold.futex.store(GRANTED, Ordering::Release);
            sh.bump(STAT_GRANTS);
            sh.bump(STAT_HANDOFFS);
            return Ok(Some(&hold.futex));
        }
        self.grant_shared_run(sh, i, now)?;
        Ok(None)
    }

    /// Grants every shared waiter at the head of entry `i`'s queue (up to the first exclusive
    /// one) and wakes each, telling each of the entry's owner-died notice, which is cleared once
    /// the whole run is granted (so a process killed half way leaves it for the rest, whom
    /// repair grants). The entry must be free or held shared.
    pub(super) fn grant_shared_run(&self, sh: &Shard<'_>, i: u32, now: Nanos) -> Result<()> {
        let e = sh.entry(i)?;
        let died = if e.died() { OWNER_DIED } else { 0 };
        let mut granted = false;
        let mut cur = e.wait_head.load(R);
        while let Some(h) = sh.holds().get(cur as usize) {
            if h.mode.load(R) != Mode::Shared.to_u32() {
                break;
            }
            let next = h.next.load(R);
            // The grant's token and notice go into the hold before it is HELD: a granter killed
            // after the transition must leave a complete grant (repair keeps HELD holds as they
            // are), never a reader with token 0 and no notice.
            let token = sh.next_token(e)?;
            e.set_last_token(token);
            h.token.store(token, R);
            h.flags.store(died, R);
            e.mode.store(Mode::Shared.to_u32(), R);
            Self::dequeue(sh, e, cur);
            crate::chaos::point();
            sh.hpool()
                .transition(Idx(cur), HoldState::Waiting, HoldState::Held, now)?;
            sh.add_reader(e, cur);
            crate::chaos::point();
            h.futex.store(GRANTED, Ordering::Release);
            futex_wake(&h.futex, 1);
            sh.bump(STAT_GRANTS);
            sh.bump(STAT_HANDOFFS);
            granted = true;
            cur = next;
        }
        if granted && died != 0 {
            crate::chaos::point();
            e.set_died(false);
        }
        Ok(())
    }

    /// Withdraws the WAITING request `w` on entry `i` (timeout or cleanup). If it had been woken
    /// to take a free lock, the wake passes to the next waiter, which is returned to be woken.
    pub(super) fn cancel_wait<'a>(&self, sh: &'a Shard<'_>, i: u32, w: u32) -> Result<Option<&'a AtomicU32>> {
        let e = sh.entry(i)?;
        let hold = sh.hold(w)?;
        let was_head = e.wait_head.load(R) == w;
        Self::dequeue(sh, e, w);
        hold.futex.store(WAIT, R);
        sh.hpool()
            .transition(Idx(w), HoldState::Waiting, HoldState::Free, clock::coarse())?;
        if e.mode.load(R) == Mode::Shared.to_u32() {
            // Readers hold it: shared requests that queued behind the one leaving may join now.
            self.grant_shared_run(sh, i, clock::coarse())?;
            return Ok(None);
        }
        if e.mode.load(R) != MODE_NONE {
            return Ok(None);
        }
        if e.waiters.load(R) == 0 {
            sh.settle(i)?;
            return Ok(None);
        }
        if was_head {
            // The lock is free and we were first in line: let the next one go.
            return self.after_release(sh, i);
        }
        Ok(None)
    }

    /// Is hold `w` still the request (generation `gen`) of `me` on entry `i`?
    fn still_mine(sh: &Shard<'_>, w: u32, gen: u32, i: u32, me: OwnerRef) -> bool {
        let hold = &sh.holds()[w as usize];
        hold.gen.load(R) == gen
            && hold.owner.load(R) == me.idx
            && hold.entry.load(R) == i
            && !matches!(sh.hpool().state(Idx(w)), Ok(HoldState::Free) | Err(_))
    }

    /// Sleeps until the request `w` of `me` on entry `i` is granted, or the deadline passes.
    #[allow(clippy::too_many_arguments)] // the request, its queue record, and the caller's patience
    pub(super) fn wait_for_grant(
        &self,
        sh: &Shard<'_>,
        i: u32,
        (w, gen): (u32, u32),
        me: OwnerRef,
        mode: Mode,
        wait: Wait,
        interrupted: Interrupt<'_>,
    ) -> Result<RawGrant> {
        let hold = sh.hold(w)?;
        let started = sh.hpool().time(Idx(w))?;
        // Whether this wake-up already watched the holder (see the WOKEN arms below).
        let mut spun = false;
        // Whether the last pass reaped someone: then look again at once, since the lock may be
        // ours now, or handed to a waiter that died too (each of a chain of dead owners would
        // otherwise cost a sleep).
        let mut reaped = false;
        loop {
            let now = clock::now();
            let expired = matches!(wait, Wait::Until(d) if now >= d);
            if !expired && !reaped && hold.futex.load(Ordering::Acquire) == WAIT {
                let poll = self.poll_period();
                let sleep = match wait {
                    Wait::Until(d) => Duration::from_nanos(d.0 - now.0).min(poll),
                    _ => poll,
                };
                futex_wait(&hold.futex, WAIT, Some(sleep));
            }
            // Asked outside the latch: the caller may take its time (a Python binding takes the
            // GIL to run signal handlers).
            let give_up = interrupted();
            let guard = self.lock_shard(sh, me.latch_id());
            sh.pin(i)?;
            let e = sh.entry(i)?;
            if !Self::still_mine(sh, w, gen, i, me) {
                // Cancelled for us (release_all on this owner) or cleared by a repair.
                sh.publish(i);
                return Err(Error::Cancelled);
            }
            // The pool state is the truth (the futex word only wakes the sleeper): a grant whose
            // maker died before storing GRANTED into the futex is still a grant.
            let granted = matches!(sh.hpool().state(Idx(w)), Ok(HoldState::Granted | HoldState::Held));
            match hold.futex.load(R) {
                _ if granted => {
                    let g = RawGrant {
                        shard: sh.no,
                        entry: i,
                        hold: if mode == Mode::Shared { w } else { NIL },
                        token: hold.token.load(R),
                        owner_died: hold.flags.load(R) & OWNER_DIED != 0,
                        mode,
                        gen: lw_gen(e.lw.load(R)),
                    };
                    match (mode, sh.hpool().state(Idx(w))?) {
                        // A shared grant stays the reader's hold; marked COLLECTED, so a forced
                        // release tells it from one handed over and not yet taken.
                        (Mode::Shared, HoldState::Held) => hold.futex.store(COLLECTED, R),
                        // An exclusive handoff, or a shared grant forced out before we came
                        // (see `force_release`): the record has served its purpose.
                        _ => sh
                            .hpool()
                            .transition(Idx(w), HoldState::Granted, HoldState::Free, clock::coarse())?,
                    }
                    return Ok(g);
                }
                WOKEN if e.mode.load(R) == MODE_NONE => {
                    Self::dequeue(sh, e, w);
                    sh.hpool()
                        .transition(Idx(w), HoldState::Waiting, HoldState::Free, clock::coarse())?;
                    hold.futex.store(WAIT, R);
                    let g = self.grant_now(sh, i, mode, me, clock::coarse());
                    sh.publish(i);
                    return g;
                }
                WOKEN if !spun && e.mode.load(R) == Mode::Exclusive.to_u32() => {
                    // A barging request got it first, but we are running now and its critical
                    // section is likely short: watch it for a few microseconds, still WOKEN (so
                    // its release needs no wake and leaves the lock open), then look again.
                    // Without this a woken waiter would mostly find the lock taken by the
                    // processes that never slept, and get it only by a handoff.
                    spun = true;
                    sh.publish(i);
                    drop(guard);
                    Self::spin_until_free(e);
                    continue;
                }
                WOKEN => {
                    // Still taken: sleep until a release wakes us again.
                    hold.futex.store(WAIT, R);
                    spun = false;
                }
                _ => {}
            }
            let timed_out = matches!(wait, Wait::Until(d) if clock::now() >= d);
            if timed_out || give_up {
                let holder = if timed_out { self.holder_info(sh, i) } else { None };
                let wake = self.cancel_wait(sh, i, w);
                sh.publish(i);
                let wake = wake?;
                if timed_out {
                    sh.bump(STAT_TIMEOUTS);
                }
                drop(guard);
                if let Some(f) = wake {
                    futex_wake(f, 1);
                }
                return Err(if timed_out {
                    Error::TimedOut {
                        waited: clock::now().since(started),
                        holder,
                    }
                } else {
                    Error::Interrupted
                });
            }
            // Without shmlockd nobody else may notice that the holder died: check the owners
            // this request waits on that nobody has checked lately, and reap the dead.
            let due = self.due_suspects(sh, e, me);
            drop(guard);
            reaped = self.reap_suspects(due, me)?;
        }
    }

    /// How long a waiter sleeps before it looks at its request again: [`POLL`] while a
    /// supervisor has claimed the segment (it reaps dead holders itself, at once), else
    /// [`UNSUPERVISED_POLL`], so that without shmlockd a dead holder is found by its waiters
    /// within about 30 ms (the checks themselves stay at most one per period per owner, whoever
    /// makes them: see `Owner::claim_check`).
    fn poll_period(&self) -> Duration {
        if self.table_hdr().supervisor_pid.load(R) != 0 {
            POLL
        } else {
            UNSUPERVISED_POLL
        }
    }
}
