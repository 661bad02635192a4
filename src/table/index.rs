//! The name index: a name's shard and bucket, lookup along the bucket chain, insertion (with
//! eviction of an owner-died notice when the shard is full) and unlinking.

use super::*;

impl LockTable {
    /// The shard that `name` lives in (any bytes; an invalid name maps somewhere harmless).
    #[cfg(feature = "gateway")]
    pub(crate) fn shard_of_name(&self, name: &[u8]) -> u32 {
        self.shard_of(name::hash(self.seed, name))
    }

    #[inline]
    pub(super) fn shard_of(&self, h: u64) -> u32 {
        ((h >> 40) as u32) & (self.geo.shards - 1)
    }

    /// The bucket of hash `h` in its shard: the low 32 bits scaled to the bucket count
    /// (multiply and shift, so the count need not be a power of two; the shard comes from bits
    /// 40 and up).
    #[inline]
    pub(super) fn bucket_of(&self, h: u64) -> usize {
        ((u64::from(h as u32) * u64::from(self.geo.buckets_per_shard)) >> 32) as usize
    }

    #[inline]
    pub(super) fn lookup(&self, sh: &Shard<'_>, h: u64, name: &[u8]) -> Option<u32> {
        let mut cur = head(&sh.buckets()[self.bucket_of(h)], Relaxed);
        let mut steps = sh.entries().len();
        while let Some(e) = sh.entries().get(cur as usize) {
            if e.hash.load(Relaxed) == h
                && e.name_len.load(Relaxed) as usize == name.len()
                && sh.name_eq(cur as usize, name)
            {
                return Some(cur);
            }
            steps = steps.checked_sub(1)?;
            cur = e.next.load(Relaxed);
        }
        None
    }

    /// Removes entry `i` from its bucket chain.
    pub(super) fn unlink_from_bucket(&self, sh: &Shard<'_>, i: u32) -> Result<()> {
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
    pub(super) fn insert(&self, sh: &Shard<'_>, h: u64, name: &[u8], now: Nanos) -> Result<u32> {
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
            sh.pin(victim.0)?;
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

    /// The name of a grant's entry, read back from the table (the entry cannot change name
    /// while the grant holds it).
    pub(crate) fn grant_name(&self, g: &RawGrant) -> Vec<u8> {
        if g.shard >= self.geometry().shards {
            return Vec::new();
        }
        self.shard(g.shard).name_of(g.entry)
    }
}

impl Shard<'_> {
    #[inline(always)]
    pub(super) fn name_eq(&self, e: usize, name: &[u8]) -> bool {
        let words = &self.names()[e * self.words..(e + 1) * self.words];
        words
            .iter()
            .zip(name.chunks(8))
            .all(|(w, c)| w.load(Relaxed) == name::word(c))
    }
    /// The name of entry `e` (for inspection and errors).
    pub(super) fn name_of(&self, e: u32) -> Vec<u8> {
        let i = e as usize;
        let len = self
            .entries()
            .get(i)
            .map_or(0, |x| x.name_len.load(Relaxed) as usize)
            .min(self.words * 8);
        let mut out = Vec::with_capacity(self.words * 8);
        for w in &self.names()[i * self.words..(i + 1) * self.words] {
            out.extend_from_slice(&w.load(Relaxed).to_le_bytes());
        }
        out.truncate(len);
        out
    }
}
