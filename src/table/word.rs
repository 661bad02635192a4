//! The lock word's protocol (the state table is in `entry.rs`): the fast CAS and its spin, the
//! latch's pin and publish, and the waits for a word to open. `model.rs` checks it over every
//! interleaving of a few actors.

use super::*;

impl LockTable {
    /// The exclusive lock of `me` on `name` by one CAS on the entry's lock word, without the
    /// latch; `None` sends the caller to the latched path (name not indexed, lock not free, or
    /// the entry changed under us). With `spin`, a lock held fast by another owner (so nobody is
    /// queued) is watched for [`SPIN_POLLS`] polls before giving up (see
    /// [`spin_fast`](Self::spin_fast)); without it, such a lock answers WouldBlock (see
    /// [`busy_fast`](Self::busy_fast)). With `prefetch_on_miss`, a name not in the index starts
    /// the insert's cache misses (`prefetch_insert`). `acquire_slow`'s second look passes false:
    /// the first has started them, and prefetches issued again just before the latch is taken
    /// hold up the latch's locked instruction (+7 ns an insert, `many-held` at 10,000 names).
    #[inline(always)]
    pub(super) fn try_fast(
        &self,
        sh: &Shard<'_>,
        h: u64,
        name: &[u8],
        me: OwnerRef,
        spin: bool,
        prefetch_on_miss: bool,
    ) -> Option<Result<RawGrant>> {
        use std::sync::atomic::Ordering::Acquire;
        let entries = sh.entries();
        let mut cur = head(&sh.buckets()[self.bucket_of(h)], Acquire);
        for _ in 0..entries.len() {
            let Some(e) = entries.get(cur as usize) else {
                // Not in the index: the latched path will insert it.
                if prefetch_on_miss {
                    sh.prefetch_insert();
                }
                return None;
            };
            if e.hash.load(Relaxed) == h {
                // Read the word before the name: if the CAS below succeeds, the entry was not
                // reused in between (reuse pins, then bumps the generation), so the name held.
                let w = e.lw.load(Acquire);
                if Self::has_name(sh, e, cur, name) {
                    return match lw_val(w) {
                        // A lost CAS: `None`, and `acquire_slow` looks again before the latch
                        // (handling it here would keep this path's state alive across the CAS,
                        // in saved registers the uncontended lock pays for).
                        0 => self.fast_grant(sh, e, cur, w, me).map(Ok),
                        v if v == me.idx + 1 => Some(Err(Error::AlreadyHeld)),
                        v if v & SLOW != 0 => None,
                        _ if spin => self.spin_fast(sh, e, cur, w, (h, name), me).map(Ok),
                        v => self.busy_fast(v, me),
                    };
                }
            }
            cur = e.next.load(Acquire);
        }
        None
    }

    /// Watches the word of entry `i` (`w` when last read) for [`SPIN_POLLS`] polls,
    /// [`SPIN_PAUSES`] pauses apart, and takes the lock when it finds it free; `None` once the
    /// latch has pinned the word, the entry names another lock, or the polls run out.
    ///
    /// It follows the lock from holder to holder: a new generation of the word is a release and
    /// another fast grant, and a try at a free word may lose to another CAS (a CAS lost in
    /// `try_fast` is looked at again by `acquire_slow`, which comes here). Giving up on either
    /// would queue the request, which pins the entry: the holder's release would then take
    /// the latch and wake us, and every request behind us would queue too, while the lock
    /// changes hands every few hundred nanoseconds. The polls are spaced out so that a holder
    /// that takes the lock again at once (a loop) keeps its cache line for a few grants: a poll
    /// that reads the line makes the holder's next CAS fetch it back, and a handoff per grant
    /// costs two such transfers. (Measured on the 2-vCPU VM, Python and Rust, 2 and 4 processes on
    /// one name: polls 16 pauses apart did 1.3-1.4x the grants of polls 1 pause apart, at the same
    /// spread; 32 apart let one Rust process take 30-50% more than its share.)
    ///
    /// The name is checked before each CAS at a new generation, after reading the word, as in
    /// `try_fast`: the entry may have been reused for another name in between. Out of line: the
    /// uncontended path stays small enough to inline.
    #[inline(never)]
    pub(super) fn spin_fast(
        &self,
        sh: &Shard<'_>,
        e: &Entry,
        i: u32,
        mut w: u64,
        key: (u64, &[u8]),
        me: OwnerRef,
    ) -> Option<RawGrant> {
        let named = lw_gen(w);
        for _ in 0..SPIN_POLLS {
            for _ in 0..SPIN_PAUSES {
                std::hint::spin_loop();
            }
            // Acquire, as in `try_fast`: the grant reads the token base after the word.
            w = e.lw.load(std::sync::atomic::Ordering::Acquire);
            match lw_val(w) {
                0 if lw_gen(w) == named || Self::still_named(sh, e, i, key) => {
                    if let Some(g) = self.fast_grant(sh, e, i, w, me) {
                        return Some(g);
                    }
                    if e.lw.load(Relaxed) == w {
                        // Not a lost race: a word only the latch may move (see `fast_grant`).
                        return None;
                    }
                }
                0 => return None,
                v if v & SLOW != 0 || v == me.idx + 1 => return None,
                _ => {}
            }
        }
        None
    }

    /// Does entry `i` (`e`) hold `name`? Read without the latch, so only a CAS from a word
    /// loaded before it makes the answer hold (see `try_fast`).
    #[inline(always)]
    fn has_name(sh: &Shard<'_>, e: &Entry, i: u32, name: &[u8]) -> bool {
        e.name_len.load(Relaxed) as usize == name.len() && sh.name_eq(i as usize, name)
    }

    /// Does entry `i` hold the name of `key` (its hash and the name)? For a fast request that
    /// read a new generation of the word: the entry may have been reused since it was looked up.
    fn still_named(sh: &Shard<'_>, e: &Entry, i: u32, (h, name): (u64, &[u8])) -> bool {
        e.hash.load(Relaxed) == h && Self::has_name(sh, e, i, name)
    }

    /// A one-try request that finds the lock held fast by owner `v - 1`: WouldBlock, after
    /// checking that the holder is alive if nobody has checked it within `CHECK_PERIOD`, as the
    /// latched path does for a request kept from a lock. A dead holder is reaped, and `None`
    /// sends the request to the latched path, to find the lock free. Taking the latch and pinning
    /// the entry only to say that it is busy would turn the holder's fast hold into a latched one,
    /// so its release, and every request behind it, would take the latch too: a process polling
    /// a busy lock (a Python `acquire` tries once under the GIL before it waits without it) would
    /// push every other user of the lock onto the latched path.
    #[inline(never)]
    fn busy_fast(&self, v: u32, me: OwnerRef) -> Option<Result<RawGrant>> {
        let idx = (v & FAST_OWNER).checked_sub(1)?;
        let o = self.owners().get(idx as usize)?;
        let period = reap::CHECK_PERIOD.as_millis() as u32;
        if o.claim_check(clock::coarse().millis32(), period) && !o.process().is_alive() {
            return match self.reap_if_dead(idx, me.latch_id()) {
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            };
        }
        Some(Err(Error::WouldBlock))
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
