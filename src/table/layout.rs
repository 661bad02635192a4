//! The lock table's segment: creating it (the regions' plan and their first contents), opening
//! and validating it, and the views of its regions.

use super::*;

impl LockTable {
    /// Creates segment `name` sized for `caps`. Fails if it exists.
    pub fn create(name: &str, caps: &Capacities) -> Result<LockTable> {
        let geo = caps.geometry()?;
        let (specs, params) = Self::plan(&geo, caps);
        let seg = Segment::create(name, &specs, &params, caps.mode, caps.owner, |s| Self::init(s, &geo))?;
        Self::from_segment(Arc::new(seg))
    }

    /// Opens an existing segment (owned as `$SHMLOCK_SEGMENT_OWNER` says: see [`Segment::open`]).
    pub fn open(name: &str) -> Result<LockTable> {
        Self::from_segment(Arc::new(Segment::open(name)?))
    }

    /// Opens an existing segment whose file is owned as `owner` requires.
    pub fn open_as(name: &str, owner: crate::shm::SegmentOwner) -> Result<LockTable> {
        Self::from_segment(Arc::new(Segment::open_as(name, owner)?))
    }

    /// Opens segment `name`, creating it with `caps` if it does not exist.
    pub fn create_or_open(name: &str, caps: &Capacities) -> Result<LockTable> {
        match Self::open(name) {
            Err(Error::SegmentMissing { .. }) => match Self::create(name, caps) {
                Err(Error::SegmentExists { .. }) => Self::open(name),
                other => other,
            },
            other => other,
        }
    }

    /// A table in anonymous shared memory (shared with forked children only).
    pub fn anonymous(caps: &Capacities) -> Result<LockTable> {
        let geo = caps.geometry()?;
        let (specs, params) = Self::plan(&geo, caps);
        let seg = Segment::anonymous(&specs, &params, |s| Self::init(s, &geo))?;
        Self::from_segment(Arc::new(seg))
    }

    pub(super) fn plan(g: &Geometry, caps: &Capacities) -> (Vec<RegionSpec>, [u64; PARAMS]) {
        let (s, e, h, b, o) = (
            u64::from(g.shards),
            u64::from(g.entries_per_shard),
            u64::from(g.holds_per_shard),
            u64::from(g.buckets_per_shard),
            u64::from(g.owners),
        );
        let specs = vec![
            RegionSpec::of::<TableHdr>(1),
            RegionSpec::of::<ShardHdr>(s),
            RegionSpec::of::<Entry>(s * e),
            RegionSpec::of::<PoolNode>(s * e),
            RegionSpec::of::<AtomicU64>(s * e * u64::from(g.name_words)),
            RegionSpec::of::<AtomicU16>(s * b),
            RegionSpec::of::<Hold>(s * h),
            RegionSpec::of::<PoolNode>(s * h),
            RegionSpec::of::<Owner>(o),
            RegionSpec::of::<PoolNode>(o),
        ];
        let mut p = [0u64; PARAMS];
        p[P_SHARDS] = s;
        p[P_ENTRIES] = e;
        p[P_HOLDS] = h;
        p[P_BUCKETS] = b;
        p[P_OWNERS] = o;
        p[P_NAME_LEN] = u64::from(g.max_name_len);
        p[P_NAME_WORDS] = u64::from(g.name_words);
        p[P_SEED] = random_seed();
        p[P_MAX_LOCKS] = u64::from(caps.max_locks);
        p[P_MAX_HOLDS] = u64::from(caps.max_holds);
        (specs, p)
    }

    /// Bytes a segment for `caps` occupies.
    pub fn segment_size(caps: &Capacities) -> Result<u64> {
        let geo = caps.geometry()?;
        let (specs, _) = Self::plan(&geo, caps);
        crate::shm::layout::plan(&specs)
            .map(|(_, total)| total)
            .ok_or(Error::Config {
                key: "capacities",
                why: "segment size overflows".into(),
            })
    }

    pub(super) fn init(seg: &Segment, g: &Geometry) -> Result<()> {
        let r = Self::regions(seg)?;
        let now = clock::now();
        for e in seg.slice(r.entries) {
            for w in [&e.next, &e.owner, &e.reader_head, &e.wait_head, &e.wait_tail] {
                w.store(NIL, Relaxed);
            }
            e.lw.store(lock_word(0, SLOW), Relaxed); // FREE: no fast CAS may touch it
        }
        for h in seg.slice(r.holds) {
            for w in [&h.entry, &h.owner, &h.next, &h.prev] {
                w.store(NIL, Relaxed);
            }
        }
        for b in seg.slice(r.buckets) {
            set_head(b, NIL, Relaxed);
        }
        let (e, h) = (g.entries_per_shard as usize, g.holds_per_shard as usize);
        let (en, hn) = (seg.slice(r.entry_nodes), seg.slice(r.hold_nodes));
        for (s, hdr) in seg.slice(r.shards).iter().enumerate() {
            StatePool::<EntryState>::new(&en[s * e..(s + 1) * e], &hdr.entry_lists).init(now);
            StatePool::<HoldState>::new(&hn[s * h..(s + 1) * h], &hdr.hold_lists).init(now);
        }
        let hdr = &seg.slice(r.hdr)[0];
        StatePool::<OwnerState>::new(seg.slice(r.owner_nodes), &hdr.owner_lists).init(now);
        Ok(())
    }

    pub(super) fn regions(seg: &Segment) -> Result<Regions> {
        Ok(Regions {
            hdr: seg.region(0)?,
            shards: seg.region(1)?,
            entries: seg.region(2)?,
            entry_nodes: seg.region(3)?,
            names: seg.region(4)?,
            buckets: seg.region(5)?,
            holds: seg.region(6)?,
            hold_nodes: seg.region(7)?,
            owners: seg.region(8)?,
            owner_nodes: seg.region(9)?,
        })
    }

    pub(super) fn from_segment(seg: Arc<Segment>) -> Result<LockTable> {
        let p = |i: usize| seg.header().params[i].load(Relaxed);
        let as_u32 = |i: usize, what: &str| {
            u32::try_from(p(i)).map_err(|_| corrupt(format!("{what} parameter {} out of range", p(i))))
        };
        let geo = Geometry {
            shards: as_u32(P_SHARDS, "shards")?,
            entries_per_shard: as_u32(P_ENTRIES, "entries")?,
            holds_per_shard: as_u32(P_HOLDS, "holds")?,
            buckets_per_shard: as_u32(P_BUCKETS, "buckets")?,
            owners: as_u32(P_OWNERS, "owners")?,
            max_name_len: as_u32(P_NAME_LEN, "name length")?,
            name_words: as_u32(P_NAME_WORDS, "name words")?,
        };
        let r = Self::regions(&seg)?;
        let (s, e, h, b, w) = (
            geo.shards as usize,
            geo.entries_per_shard as usize,
            geo.holds_per_shard as usize,
            geo.buckets_per_shard as usize,
            geo.name_words as usize,
        );
        // An owner is named in the lock word as its index + 1 in FAST_OWNER's bits (and in a
        // latch word below PID_ID): more owners than that would make two owners one.
        if geo.owners > FAST_OWNER {
            return Err(corrupt(format!(
                "owner count {} is beyond what the lock word can name ({FAST_OWNER})",
                geo.owners
            )));
        }
        let ok = s.is_power_of_two()
            && b >= 1
            && e <= crate::config::MAX_ENTRIES_PER_SHARD as usize
            && e >= 1
            && e < NIL as usize
            && h < NIL as usize
            && (geo.owners as usize) < NIL as usize - 1
            && w * 8 >= geo.max_name_len as usize
            && r.hdr.len() == 1
            && r.shards.len() == s
            && r.entries.len() == s * e
            && r.entry_nodes.len() == s * e
            && r.names.len() == s * e * w
            && r.buckets.len() == s * b
            && r.holds.len() == s * h
            && r.hold_nodes.len() == s * h
            && r.owners.len() == geo.owners as usize
            && r.owner_nodes.len() == geo.owners as usize;
        if !ok {
            return Err(corrupt(format!("table geometry {geo:?} does not match its regions")));
        }
        Ok(LockTable {
            seed: p(P_SEED),
            seg,
            geo,
            r,
        })
    }

    /// The segment.
    pub fn segment(&self) -> &Segment {
        &self.seg
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The capacities the segment was created with (max_locks and max_holds as requested).
    pub fn requested(&self) -> (u64, u64) {
        let p = &self.seg.header().params;
        (p[P_MAX_LOCKS].load(Relaxed), p[P_MAX_HOLDS].load(Relaxed))
    }

    #[inline]
    pub(super) fn shard(&self, s: u32) -> Shard<'_> {
        Shard {
            no: s,
            t: self,
            hdr: &self.seg.slice(self.r.shards)[s as usize],
            words: self.geo.name_words as usize,
        }
    }
}
