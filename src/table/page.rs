//! A page of the locks held or waited on, read from a cursor in table order: for the gateway's
//! `LOCKS`, whose cost must follow the page, not the table.
//!
//! # Order and cursor
//! Locks are visited in table order: shard by shard, and in each shard by entry index. A
//! [`Cursor`] names one entry slot (`<shard>.<entry>`, as on the wire); a page starts at the
//! slot after it. An entry keeps its slot for as long as its name is in the index (held, waited
//! on, or idle), so a lock that is held or waited on during a whole walk of pages is returned
//! exactly once; one taken or released during the walk is returned at most once for each slot
//! its name had while held (a name released, evicted and taken again may come back in a new
//! slot).
//!
//! # Cost
//! A page looks at no more than [`PAGE_SCAN`] slots, and at most `limit` locks, however big the
//! table is: a page of a sparse table may then hold no lock at all and say where to go on from
//! ([`Page::next`]). The latch of a shard is taken for at most [`SCAN_PER_LATCH`] slots at a
//! time, so lockers on that shard wait for a few microseconds at most.
//!
//! # Concurrency
//! As in `inspect`: under the latch only words are copied; owners are resolved after it. Every
//! index is a slot of the shard's own arrays (bounded by the geometry validated at open), and
//! every count or index read from an entry is bounded before use (`copy_entry` walks lists at
//! most the pool's size).

use std::fmt;

use super::inspect::{RawLock, RawParty};
use super::*;

/// Most entry slots one page looks at.
pub const PAGE_SCAN: u32 = 16_384;
/// Most entry slots looked at under one take of a shard latch.
pub const SCAN_PER_LATCH: u32 = 256;

/// An entry slot: a page starts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// The shard.
    pub shard: u32,
    /// The entry's index in its shard.
    pub entry: u32,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.shard, self.entry)
    }
}

impl Cursor {
    /// Parses `<shard>.<entry>` (two decimal u32s); None if it is anything else.
    pub fn parse(w: &[u8]) -> Option<Cursor> {
        let s = std::str::from_utf8(w).ok()?;
        let (a, b) = s.split_once('.')?;
        let num = |x: &str| {
            (!x.is_empty() && x.len() <= 10 && x.bytes().all(|c| c.is_ascii_digit()))
                .then(|| x.parse::<u32>().ok())
                .flatten()
        };
        Some(Cursor {
            shard: num(a)?,
            entry: num(b)?,
        })
    }
}

/// One page: the locks found, each with its slot, and where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The locks, in table order, each with its slot.
    pub locks: Vec<(Cursor, LockInfo)>,
    /// Where the next page starts (after this slot); None when the walk reached the table's end.
    pub next: Option<Cursor>,
    /// Entry slots looked at (at most [`PAGE_SCAN`]): the work the page cost.
    pub scanned: u32,
}

impl LockTable {
    /// A page of at most `limit` (at least 1) locks held or waited on whose name starts with
    /// `prefix`, in table order from the slot after `after` (from the first slot if None).
    /// Looks at no more than [`PAGE_SCAN`] slots. A cursor outside the table gives an empty last
    /// page.
    pub fn locks_page(&self, after: Option<Cursor>, prefix: &[u8], limit: usize) -> Page {
        let (shards, per) = (self.geo.shards, self.geo.entries_per_shard);
        let mut at = match after {
            None => Some(Cursor { shard: 0, entry: 0 }),
            Some(c) => step(c, shards, per),
        };
        let mut page = Page {
            locks: Vec::with_capacity(limit.min(SCAN_PER_LATCH as usize)),
            next: None,
            scanned: 0,
        };
        let limit = limit.max(1);
        while let Some(c) = at {
            if c.shard >= shards || c.entry >= per {
                // A cursor from another table (or a different geometry): nothing there.
                return page;
            }
            if page.locks.len() >= limit || page.scanned >= PAGE_SCAN {
                // Stopped before slot `c` (never the first: a page looks at one slot at least):
                // the next page starts there.
                page.next = prev(c, per);
                return page;
            }
            let budget = SCAN_PER_LATCH.min(PAGE_SCAN - page.scanned).min(per - c.entry);
            let want = limit - page.locks.len();
            let (found, looked) = self.scan_run(c, budget, prefix, want);
            page.scanned += looked;
            page.locks.extend(found);
            at = step(
                Cursor {
                    shard: c.shard,
                    entry: c.entry + looked - 1,
                },
                shards,
                per,
            );
        }
        page
    }

    /// Looks at up to `budget` slots of shard `from.shard` from `from.entry` (at least one),
    /// under one take of its latch, stopping after `want` locks; returns them and the number of
    /// slots looked at.
    fn scan_run(&self, from: Cursor, budget: u32, prefix: &[u8], want: usize) -> (Vec<(Cursor, LockInfo)>, u32) {
        let sh = self.shard(from.shard);
        let words = sh.words;
        let mut raw: Vec<(u32, RawLock, Vec<u8>)> = Vec::with_capacity((budget as usize).min(want));
        let mut parties: Vec<RawParty> = Vec::with_capacity((budget as usize).min(want) * 2 + 4);
        let mut name = Vec::with_capacity(words * 8);
        let mut looked = 0;
        {
            let _g = self.lock_shard(&sh, pid_latch_id());
            let (entries, names) = (sh.entries(), sh.names());
            for i in from.entry..from.entry.saturating_add(budget) {
                if raw.len() >= want {
                    break;
                }
                looked += 1;
                let Some(e) = entries.get(i as usize) else { break };
                let fast = e.lw.load(Relaxed) as u32 & FAST_OWNER != 0;
                let held = matches!(sh.epool().state(Idx(i)), Ok(EntryState::Held));
                if !fast && !held {
                    continue;
                }
                let at = i as usize * words;
                let Some(ws) = names.get(at..at + words) else { break };
                let len = (e.name_len.load(Relaxed) as usize).min(words * 8);
                name.clear();
                for w in ws {
                    name.extend_from_slice(&w.load(Relaxed).to_le_bytes());
                }
                name.truncate(len);
                if !name.starts_with(prefix) {
                    continue;
                }
                if fast {
                    // A fast hold: into the latched form, so its holder shows (as `lock_info`).
                    if sh.pin(i).is_err() {
                        continue;
                    }
                }
                // One entry's parties are at most its shard's holds plus its holder (each walk
                // is bounded so, whatever the lists say), and a page's at most PAGE_PARTIES, so
                // torn lists in a corrupt segment cannot make a page's memory grow with the table.
                let budget = (parties.len() + self.geo.holds_per_shard as usize + 1).min(PAGE_PARTIES);
                let r = Self::copy_entry(&sh, i, &mut parties, budget);
                if fast {
                    sh.publish(i);
                }
                raw.push((i, r, name.clone()));
            }
        }
        let now = clock::now();
        let found = raw
            .into_iter()
            .map(|(i, r, name)| {
                let c = Cursor {
                    shard: from.shard,
                    entry: i,
                };
                (c, self.resolve(&r, &parties, name, from.shard, now))
            })
            .collect();
        (found, looked.max(1))
    }
}

/// Most parties (holders and waiters) one page copies: far above what a consistent table puts
/// in a page, a bound for a corrupt one (a few MiB).
const PAGE_PARTIES: usize = 1 << 18;

/// The slot before `c` in table order; None before the first one.
fn prev(c: Cursor, per: u32) -> Option<Cursor> {
    match (c.shard, c.entry) {
        (0, 0) => None,
        (s, 0) => Some(Cursor {
            shard: s - 1,
            entry: per - 1,
        }),
        (s, e) => Some(Cursor { shard: s, entry: e - 1 }),
    }
}

/// The slot after `c` in table order; None after the last one.
fn step(c: Cursor, shards: u32, per: u32) -> Option<Cursor> {
    if c.entry.saturating_add(1) < per {
        Some(Cursor {
            shard: c.shard,
            entry: c.entry + 1,
        })
    } else if c.shard.saturating_add(1) < shards {
        Some(Cursor {
            shard: c.shard + 1,
            entry: 0,
        })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::client::Client;
    use crate::config::Capacities;

    fn table(max_locks: u32, shards: u32) -> Arc<LockTable> {
        let caps = Capacities {
            max_locks,
            max_holds: 64,
            max_owners: 8,
            shards,
            ..Default::default()
        };
        Arc::new(LockTable::anonymous(&caps).expect("table"))
    }

    /// Every page from the start: the names seen, in order, and the largest page cost.
    fn walk(t: &LockTable, prefix: &[u8], limit: usize) -> (Vec<Vec<u8>>, u32) {
        let (mut names, mut worst, mut after) = (Vec::new(), 0, None);
        for _ in 0..1_000_000 {
            let p = t.locks_page(after, prefix, limit);
            worst = worst.max(p.scanned);
            assert!(p.locks.len() <= limit);
            let mut last = after;
            for (c, l) in p.locks {
                assert!(last.is_none_or(|a| c > a), "{c} after {last:?}");
                assert_eq!(c.shard, l.shard);
                last = Some(c);
                names.push(l.name);
            }
            match p.next {
                None => return (names, worst),
                Some(n) => {
                    assert!(after.is_none_or(|a| n > a), "the cursor must move: {n} after {after:?}");
                    after = Some(n);
                }
            }
        }
        panic!("the walk did not end");
    }

    #[test]
    fn cursors_round_trip_and_reject_anything_else() {
        let c = Cursor { shard: 7, entry: 4095 };
        assert_eq!(Cursor::parse(c.to_string().as_bytes()), Some(c));
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "1.2.3",
            "a.1",
            "1.-1",
            "4294967296.0",
            " 1.2",
            "+1.2",
        ] {
            assert_eq!(Cursor::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn pages_list_every_lock_once_fast_holds_and_waiters_included() {
        let t = table(2000, 4);
        let a = Client::with_table(t.clone(), "a").expect("a");
        let guards: Vec<_> = (0..700).map(|i| a.lock(format!("n{i:04}")).expect("lock")).collect();
        let shared = a.lock_shared("s").expect("shared");
        for limit in [1, 3, 100, 10_000] {
            let (mut names, _) = walk(&t, b"", limit);
            assert_eq!(names.len(), 701, "limit {limit}");
            names.sort();
            names.dedup();
            assert_eq!(names.len(), 701, "limit {limit}: a lock came twice");
        }
        let (names, _) = walk(&t, b"n01", 7);
        assert_eq!(names.len(), 100);
        assert!(names.iter().all(|n| n.starts_with(b"n01")));
        // The pages show holders as the snapshot does.
        let all: HashMap<Vec<u8>, LockInfo> = t.locks().into_iter().map(|l| (l.name.clone(), l)).collect();
        let p = t.locks_page(None, b"s", 10);
        assert_eq!(p.locks.len(), 1);
        let mut l = p.locks[0].1.clone();
        let mut want = all[&b"s"[..]].clone();
        for x in l.holders.iter_mut().chain(want.holders.iter_mut()) {
            x.age = Duration::ZERO;
        }
        assert_eq!(l, want);
        drop((guards, shared));
        assert!(t.check().is_empty(), "{:?}", t.check());
        assert_eq!(walk(&t, b"", 5).0.len(), 0);
    }

    #[test]
    fn a_page_costs_what_it_lists_not_what_the_table_holds() {
        // LIMIT 1 on a full table looks at one slot, and on any table at most PAGE_SCAN slots.
        for (max, shards, held) in [(512, 1, 500), (40_000, 8, 39_000), (40_000, 8, 3)] {
            let t = table(max, shards);
            let a = Client::with_table(t.clone(), "a").expect("a");
            let mut gs = Vec::new();
            // Fill from slot 0: the first page of the full tables finds a lock at once.
            for i in 0..held {
                gs.push(a.lock(format!("k{i}")).expect("lock"));
            }
            let p = t.locks_page(None, b"", 1);
            assert!(p.scanned <= PAGE_SCAN, "{max}: {}", p.scanned);
            // A sparse table's few locks may all lie past the first PAGE_SCAN slots (the hash
            // seed is the segment's): then the page is empty, spent, and says where to go on.
            let spent = p.locks.is_empty() && p.scanned == PAGE_SCAN && p.next.is_some();
            assert!(
                p.locks.len() == 1 || (held <= 100 && spent),
                "{max}: {} locks",
                p.locks.len()
            );
            if held > 100 {
                let first = p.locks[0].0.entry;
                assert_eq!(p.scanned, first + 1, "{max}: LIMIT 1 looked past its lock");
            }
            let (names, worst) = walk(&t, b"", 1);
            assert_eq!(names.len(), held as usize);
            assert!(worst <= PAGE_SCAN, "{worst}");
            // A cursor outside the table: an empty last page.
            let out = t.locks_page(Some(Cursor { shard: 99, entry: 0 }), b"", 5);
            assert_eq!((out.locks.len(), out.next), (0, None));
        }
    }

    #[test]
    fn locks_held_through_a_walk_come_exactly_once_while_others_churn() {
        let t = table(4000, 4);
        let a = Client::with_table(t.clone(), "keep").expect("a");
        let keep: Vec<_> = (0..300).map(|i| a.lock(format!("keep{i}")).expect("lock")).collect();
        let b = Client::with_table(t.clone(), "churn").expect("b");
        let mut churn: Vec<_> = Vec::new();
        let (mut seen, mut after, mut round) = (HashMap::<Vec<u8>, u32>::new(), None, 0u32);
        loop {
            // Between pages: take some names and release others.
            for k in 0..20 {
                churn.push(b.lock(format!("c{round}-{k}")).expect("churn lock"));
            }
            if churn.len() > 100 {
                churn.drain(..40);
            }
            round += 1;
            let p = t.locks_page(after, b"", 7);
            for (_, l) in p.locks {
                *seen.entry(l.name).or_default() += 1;
            }
            match p.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        for i in 0..300 {
            assert_eq!(seen.get(format!("keep{i}").as_bytes()), Some(&1), "keep{i}");
        }
        assert!(seen.values().all(|&n| n == 1), "a lock came twice");
        drop((keep, churn));
    }
}
