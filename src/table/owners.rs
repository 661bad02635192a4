//! Owners: registering and deregistering them in the owner pool (under the table's owner latch),
//! and the latches a dead owner left held.

use super::*;

impl LockTable {
    pub(crate) fn table_hdr(&self) -> &TableHdr {
        &self.seg.slice(self.r.hdr)[0]
    }

    pub(super) fn owner_pool(&self) -> StatePool<'_, OwnerState> {
        StatePool::new(self.seg.slice(self.r.owner_nodes), &self.table_hdr().owner_lists)
    }

    #[inline]
    pub(super) fn owners(&self) -> &[Owner] {
        self.seg.slice(self.r.owners)
    }

    /// Moves owner `idx`'s fast-grant count into the table's (owner latch held).
    pub(super) fn retire_fast_grants(&self, idx: u32) {
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
    pub(super) fn register_at(&self, idx: Idx, kind: OwnerKind, label: &[u8]) -> Result<OwnerRef> {
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
    pub(super) fn recover_latches_naming(&self, id: u32) {
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
}
