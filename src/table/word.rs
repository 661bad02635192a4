//! The lock word's protocol (the state table is in `entry.rs`): the fast CAS and its spin, the
//! latch's pin and publish, and the waits for a word to open. `model.rs` checks it over every
//! interleaving of a few actors.

use super::*;

impl LockTable {
    /// The exclusive lock of `me` on `name` by one CAS on the entry's lock word, without the
    /// latch; `None` sends the caller to the latched path (name not indexed, lock not free, or
    /// the entry changed under us). With `spin`, a lock held fast by another owner (so nobody is
    /// queued) is watched for [`SPIN`] rounds before giving up: a critical section is usually far
    /// shorter than the sleep and cross-CPU wake-up that queueing costs.
    #[inline(always)]
    pub(super) fn try_fast(
        &self,
        sh: &Shard<'_>,
        h: u64,
        name: &[u8],
        me: OwnerRef,
        spin: bool,
    ) -> Option<Result<RawGrant>> {
        use std::sync::atomic::Ordering::Acquire;
        let entries = sh.entries();
        let mut cur = head(&sh.buckets()[self.bucket_of(h)], Acquire);
        for _ in 0..entries.len() {
            let Some(e) = entries.get(cur as usize) else {
                // Not in the index: the latched path will insert it.
                sh.prefetch_insert();
                return None;
            };
            if e.hash.load(Relaxed) == h {
                // Read the word before the name: if the CAS below succeeds, the entry was not
                // reused in between (reuse pins, then bumps the generation), so the name held.
                let w = e.lw.load(Acquire);
                if e.name_len.load(Relaxed) as usize == name.len() && sh.name_eq(cur as usize, name) {
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

    /// Watches a word `w` held fast by another owner for [`SPIN`] rounds and takes it if it
    /// comes free; `None` once it is held longer, reused, or taken over by the latch. Out of line:
    /// the uncontended path stays small enough to inline.
    #[inline(never)]
    pub(super) fn spin_fast(&self, sh: &Shard<'_>, e: &Entry, i: u32, w: u64, me: OwnerRef) -> Option<RawGrant> {
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
    pub(super) fn fast_grant(&self, sh: &Shard<'_>, e: &Entry, i: u32, w: u64, me: OwnerRef) -> Option<RawGrant> {
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

    /// Watches entry `e` for [`SPIN`] rounds at most, until nobody holds it exclusively.
    #[inline(never)]
    pub(super) fn spin_until_free(e: &Entry) {
        for _ in 0..SPIN {
            std::hint::spin_loop();
            if e.mode.load(Relaxed) != Mode::Exclusive.to_u32() {
                return;
            }
        }
    }
}

impl Shard<'_> {
    /// Pins entry `i` for a latched section (see [`entry`]): sets SLOW so no fast CAS can change
    /// its lock word, and turns a fast hold into the latched form (mode, owner, pool state HELD).
    pub(super) fn pin(&self, i: u32) -> Result<()> {
        let e = self.entry(i)?;
        let old = e.lw.fetch_or(u64::from(SLOW), std::sync::atomic::Ordering::Acquire);
        let holder = lw_val(old) & FAST_OWNER;
        if holder != 0 {
            e.lw.store(lock_word(lw_gen(old), SLOW), Relaxed);
            e.owner.store(holder - 1, Relaxed);
            e.mode.store(Mode::Exclusive.to_u32(), Relaxed);
            // Its grant moved nothing in the pool; the stamp is from when the latch first saw it.
            if let s @ (EntryState::Idle | EntryState::Died) = self.epool().state(Idx(i))? {
                self.epool().transition(Idx(i), s, EntryState::Held, clock::coarse())?;
            }
        }
        Ok(())
    }
    /// Pins every fast hold in shard `self` (of owner `who` only, if given), so that the HELD list
    /// names every holder. For inspection, `check` and reaping; the latch is held.
    pub(super) fn pin_fast_holds(&self, who: Option<u32>) -> Result<()> {
        // Fast holds sit on IDLE entries, and on HELD ones whose word was opened while their
        // head waiter was awake (see `publish`).
        let fast: Vec<u32> = self
            .epool()
            .iter(EntryState::Idle)
            .chain(self.epool().iter(EntryState::Held))
            .map(|(i, _)| i.0)
            .filter(|&i| {
                let holder = self.entries()[i as usize].lw.load(Relaxed) as u32 & FAST_OWNER;
                holder != 0 && who.is_none_or(|w| holder == w + 1)
            })
            .collect();
        for i in fast {
            self.pin(i)?;
        }
        Ok(())
    }
    /// Ends a latched section on entry `i`: if the lock is free and needs nothing of the latch,
    /// opens it to fast CASes again. That is when it is IDLE (no holders, waiters or notice), and
    /// also when it is free with exclusive waiters whose head has been woken and has not waited
    /// [`FAIR_AFTER`] yet (see [`open_to_barging`](Self::open_to_barging)).
    pub(super) fn publish(&self, i: u32) {
        let Some(e) = self.entries().get(i as usize) else {
            return;
        };
        let w = e.lw.load(Relaxed);
        if lw_val(w) != SLOW {
            // Granted as a fast hold in this section, or already open (published earlier in
            // it): only a pinned word is safe to store, since no CAS can change it meanwhile.
            // Storing over an open one could wipe out a fast hold taken since it was read.
            return;
        }
        let free = e.mode.load(Relaxed) == MODE_NONE && e.readers.load(Relaxed) == 0 && !e.died();
        let open = free
            && match self.epool().state(Idx(i)) {
                Ok(EntryState::Idle) => e.waiters.load(Relaxed) == 0,
                Ok(EntryState::Held) => self.open_to_barging(e),
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
    pub(super) fn open_to_barging(&self, e: &Entry) -> bool {
        let head = e.wait_head.load(Relaxed);
        self.holds().get(head as usize).is_some_and(|h| {
            h.futex.load(Relaxed) == WOKEN && h.mode.load(Relaxed) == Mode::Exclusive.to_u32() && !self.starving(head)
        })
    }
    /// Starts the cache misses of an [`insert`](Self::insert): the shard's newest FREE entry (the
    /// one insert takes, if nobody takes it first), its pool node and its name. Called by a
    /// lookup that misses, before it takes the latch, and by each insert for the next one, once
    /// its latch is dropped; so under the latch these lines are found in the cache instead of
    /// fetched one after the other. Reads the FREE list head without the latch: at worst it
    /// prefetches the wrong record.
    #[cold]
    #[inline(never)]
    pub(super) fn prefetch_insert(&self) {
        if let Some(i) = self.epool().newest_hint(EntryState::Free) {
            if let Some(e) = self.entries().get(i.get()) {
                crate::shm::sys::prefetch(e);
            }
            if let Some(w) = self.names().get(i.get() * self.words) {
                crate::shm::sys::prefetch(w);
            }
        }
    }
}
