//! Grants and releases under the latch: who may take a lock, granting now or queueing, shared
//! holders, the latched release and what follows it (handoff, settling the entry), releasing by
//! name and everything of an owner.

use super::*;

impl LockTable {
    pub(super) fn readers<'a>(sh: &'a Shard<'_>, e: &Entry) -> impl Iterator<Item = (u32, &'a Hold)> + 'a {
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

    /// Grants entry `i` to `me` (the caller checked that it may).
    pub(super) fn grant_now(&self, sh: &Shard<'_>, i: u32, mode: Mode, me: OwnerRef, now: Nanos) -> Result<RawGrant> {
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
            hold = sh.claim_hold(i, me, mode, HoldState::Held, now)?;
            sh.add_reader(e, hold);
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

    /// Locks `name` for `me`. (For the gateway's sessions and the table's tests: a `Client`
    /// calls the fast and slow paths itself.)
    #[inline]
    #[cfg_attr(not(feature = "gateway"), allow(dead_code))]
    pub(crate) fn acquire(&self, me: OwnerRef, name: &[u8], mode: Mode, wait: Wait) -> Result<RawGrant> {
        match self.acquire_fast(me, name, mode, wait) {
            Some(r) => r,
            None => self.acquire_slow(me, name, mode, wait, &mut never),
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
        self.try_fast(&self.shard(self.shard_of(h)), h, name, me, wait != Wait::No, true)
    }

    /// Everything [`acquire_fast`](Self::acquire_fast) leaves: name errors, shared mode, and
    /// locks that are not free (or not yet in the index).
    ///
    /// While it waits, `interrupted` is called after every sleep (at most [`POLL`](super::wait::POLL)
    /// apart, and at once after a signal interrupts the sleep), never under a latch: when it
    /// returns true, the request is withdrawn from the queue and [`Error::Interrupted`] returned.
    #[inline(never)]
    pub(crate) fn acquire_slow(
        &self,
        me: OwnerRef,
        name: &[u8],
        mode: Mode,
        wait: Wait,
        interrupted: Interrupt<'_>,
    ) -> Result<RawGrant> {
        let name = LockName::new(name, self.geo.max_name_len as usize)?.as_bytes();
        let h = name::hash(self.seed, name);
        if mode == Mode::Exclusive {
            // The fast path's CAS may have lost to another request's: the lock is then held
            // fast, to be watched (or answered WouldBlock) rather than queued for, which would
            // pin the entry and send the new holder's release to the latch.
            if let Some(r) = self.try_fast(&self.shard(self.shard_of(h)), h, name, me, wait != Wait::No, false) {
                return r;
            }
        }
        self.acquire_latched(me, name, h, mode, wait, true, interrupted)
    }

    /// The latched path of [`acquire`](Self::acquire).
    #[inline(never)]
    #[allow(clippy::too_many_arguments)] // the request, the caller's patience, and the retry's state
    pub(super) fn acquire_latched(
        &self,
        me: OwnerRef,
        name: &[u8],
        h: u64,
        mode: Mode,
        wait: Wait,
        spin: bool,
        interrupted: Interrupt<'_>,
    ) -> Result<RawGrant> {
        let sh = self.shard(self.shard_of(h));
        let guard = self.lock_shard(&sh, me.latch_id());
        let now = clock::coarse();
        let (i, inserted) = match self.lookup(&sh, h, name) {
            Some(i) => {
                sh.pin(i)?;
                (i, false)
            }
            // A new entry's word was stored SLOW under this latch: no fast CAS can have changed
            // it, so it needs no pin (which would stall on the new entry's line).
            None => (self.insert(&sh, h, name, now)?, true),
        };
        let e = sh.entry(i)?;
        if sh.holds_it(e, me) {
            sh.publish(i);
            return Err(Error::AlreadyHeld);
        }
        if sh.can_take(e, mode) {
            let g = self.grant_now(&sh, i, mode, me, now);
            sh.publish(i);
            drop(guard);
            if inserted {
                // The shard's next insert will most likely take the FREE entry that is newest
                // now: fetch its lines while the caller goes on, so that they are in the cache
                // by then. Only after the latch is dropped: a locked instruction (the latch's
                // release) would wait for the prefetches to complete.
                sh.prefetch_insert();
            }
            return g;
        }
        // Without shmlockd nobody else may notice that the holder died: a caller that finds the
        // lock kept from it by owners nobody has checked lately checks them now,
        // whatever its timeout, reaps the dead and tries again. (Each owner is checked at most
        // once a `CHECK_PERIOD` by all processes together; see `Owner::claim_check`.)
        let due = self.due_suspects(&sh, e, me);
        if due.iter().any(|&o| o != NIL) {
            sh.publish(i);
            drop(guard);
            self.reap_suspects(due, me)?;
            return self.acquire_latched(me, name, h, mode, wait, spin, interrupted);
        }
        if wait == Wait::No {
            sh.publish(i);
            return Err(Error::WouldBlock);
        }
        if spin && e.mode.load(Relaxed) == Mode::Exclusive.to_u32() {
            // Held by one owner (the latch manages it: others wait, or it was pinned). Its
            // critical section is likely shorter than a sleep and a wake-up: watch for the
            // release a few microseconds before queueing.
            sh.publish(i);
            drop(guard);
            Self::spin_until_free(e);
            return self.acquire_latched(me, name, h, mode, wait, false, interrupted);
        }
        let w = self.enqueue(&sh, i, mode, me);
        sh.publish(i);
        let w = w?;
        drop(guard);
        self.wait_for_grant(&sh, i, w, me, mode, wait, interrupted)
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
        // By value: a reference would keep the caller's grant in memory on the fast path too.
        self.release_latched(me, *g)
    }

    #[inline(never)]
    pub(super) fn release_latched(&self, me: OwnerRef, g: RawGrant) -> Result<()> {
        let g = &g;
        let sh = self.shard(g.shard);
        let guard = self.lock_shard(&sh, me.latch_id());
        sh.pin(g.entry)?;
        let wake = self.release_locked(&sh, me, g);
        sh.publish(g.entry);
        drop(guard);
        if let Some(w) = wake? {
            futex_wake(w, 1);
        }
        Ok(())
    }

    pub(super) fn release_locked<'a>(
        &self,
        sh: &'a Shard<'_>,
        me: OwnerRef,
        g: &RawGrant,
    ) -> Result<Option<&'a AtomicU32>> {
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
                sh.remove_reader(e, g.hold);
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
    pub(super) fn after_release<'a>(&self, sh: &'a Shard<'_>, i: u32) -> Result<Option<&'a AtomicU32>> {
        let e = sh.entry(i)?;
        if e.waiters.load(Relaxed) == 0 {
            sh.settle(i)?;
            return Ok(None);
        }
        let head = e.wait_head.load(Relaxed);
        let hold = sh.hold(head)?;
        if hold.mode.load(Relaxed) == Mode::Shared.to_u32() || sh.starving(head) {
            return self.hand_off(sh, i);
        }
        if hold.futex.load(Relaxed) == WAIT {
            hold.futex.store(WOKEN, std::sync::atomic::Ordering::Release);
            return Ok(Some(&hold.futex));
        }
        Ok(None)
    }

    /// Looks up who holds entry `i`, for a timeout error.
    pub(super) fn holder_info(&self, sh: &Shard<'_>, i: u32) -> Option<HolderInfo> {
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
        sh.pin(i)?;
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
        sh.publish(i);
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

impl Shard<'_> {
    /// Does `me` hold entry `e` in any mode?
    pub(super) fn holds_it(&self, e: &Entry, me: OwnerRef) -> bool {
        match e.mode.load(Relaxed) {
            m if m == Mode::Exclusive.to_u32() => e.owner.load(Relaxed) == me.idx,
            m if m == Mode::Shared.to_u32() => {
                LockTable::readers(self, e).any(|(_, h)| h.owner.load(Relaxed) == me.idx)
            }
            _ => false,
        }
    }
    pub(super) fn starving(&self, head: u32) -> bool {
        match self.hpool().time(Idx(head)) {
            Ok(t) => clock::now().since(t) >= FAIR_AFTER,
            Err(_) => true,
        }
    }
    /// May a new request in `mode` take entry `e` now?
    pub(super) fn can_take(&self, e: &Entry, mode: Mode) -> bool {
        let waiters = e.waiters.load(Relaxed);
        match e.mode.load(Relaxed) {
            MODE_NONE => waiters == 0 || !self.starving(e.wait_head.load(Relaxed)),
            m => m == Mode::Shared.to_u32() && mode == Mode::Shared && waiters == 0,
        }
    }
    /// Takes a FREE hold record for a request of `me` on entry `i`: fills it in, then publishes
    /// it in state `to` (so a record that is not FREE is always complete). Returns its index.
    pub(super) fn claim_hold(&self, i: u32, me: OwnerRef, mode: Mode, to: HoldState, now: Nanos) -> Result<u32> {
        let h = self.hpool().newest(HoldState::Free).ok_or(Error::PoolFull {
            pool: "hold/wait",
            shard: Some(self.no),
            capacity: self.holds().len() as u32,
        })?;
        let hold = &self.holds()[h.get()];
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
        self.hpool().transition(h, HoldState::Free, to, now)?;
        Ok(h.0)
    }
    /// Links the filled-in hold `h` into entry `e`'s reader list.
    pub(super) fn add_reader(&self, e: &Entry, h: u32) {
        let hold = &self.holds()[h as usize];
        let head = e.reader_head.load(Relaxed);
        hold.prev.store(NIL, Relaxed);
        hold.next.store(head, Relaxed);
        if let Some(hh) = self.holds().get(head as usize) {
            hh.prev.store(h, Relaxed);
        }
        e.reader_head.store(h, Relaxed);
        e.readers.store(e.readers.load(Relaxed).saturating_add(1), Relaxed);
    }
    pub(super) fn remove_reader(&self, e: &Entry, h: u32) {
        let hold = &self.holds()[h as usize];
        let (p, n) = (hold.prev.load(Relaxed), hold.next.load(Relaxed));
        match self.holds().get(p as usize) {
            Some(ph) => ph.next.store(n, Relaxed),
            None => e.reader_head.store(n, Relaxed),
        }
        if let Some(nh) = self.holds().get(n as usize) {
            nh.prev.store(p, Relaxed);
        }
        hold.next.store(NIL, Relaxed);
        hold.prev.store(NIL, Relaxed);
        e.readers.store(e.readers.load(Relaxed).saturating_sub(1), Relaxed);
    }
    /// Entry `i`, free and with nobody waiting, goes IDLE (evictable), or DIED if it carries an
    /// OWNER_DIED notice (evicted only when no IDLE entry is left).
    pub(super) fn settle(&self, i: u32) -> Result<()> {
        let to = if self.entry(i)?.died() {
            EntryState::Died
        } else {
            EntryState::Idle
        };
        // An IDLE entry's stamp is its last grant's: no clock read on the release path.
        let pool = self.epool();
        pool.transition(Idx(i), EntryState::Held, to, pool.time(Idx(i))?)
    }
}
