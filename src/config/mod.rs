//! Segment capacities and the geometry derived from them.
//!
//! [`Capacities`] is what a user asks for; [`Geometry`] is what the segment gets: a power-of-two
//! number of shards, each with its own share of the lock-entry and hold/wait pools (plus headroom
//! for an uneven hash spread) and a bucket array at least twice its entry capacity.

#[cfg(feature = "gateway")]
mod duration;
#[cfg(feature = "daemon")]
mod file;
#[cfg(feature = "gateway")]
pub use duration::{deserialize_duration, duration_text, parse_duration, DurationError};
#[cfg(feature = "daemon")]
pub use file::{parse_metrics_addr, ConfigFile};

use crate::error::{Error, Result};
use crate::shm::SegmentOwner;

/// What a segment is sized for. All pools are fixed at creation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields, default))]
pub struct Capacities {
    /// Distinct lock names that can be held or waited on at once.
    pub max_locks: u32,
    /// Shared holds plus waiting requests at once (exclusive holds need no record).
    pub max_holds: u32,
    /// Client handles (owners) attached at once.
    pub max_owners: u32,
    /// Longest lock name in bytes.
    pub max_name_len: u32,
    /// Number of shards (power of two); 0 picks one from `max_locks`.
    pub shards: u32,
    /// Permission bits of the segment object.
    pub mode: u32,
    /// Who must own the segment's file (`[segment] owner`): a user name or uid; `""` (the
    /// default) is the process's own user or root. See [`SegmentOwner`].
    pub owner: SegmentOwner,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            max_locks: 65_536,
            max_holds: 65_536,
            max_owners: 4_096,
            max_name_len: 64,
            shards: 0,
            mode: 0o600,
            owner: SegmentOwner::MeOrRoot,
        }
    }
}

/// The sizes a segment is built with, derived from [`Capacities`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Number of shards (power of two).
    pub shards: u32,
    /// Lock entries per shard.
    pub entries_per_shard: u32,
    /// Hold/wait records per shard.
    pub holds_per_shard: u32,
    /// Hash buckets per shard: twice the entries, rounded up to 32 (one cache line of 16-bit
    /// chain heads).
    pub buckets_per_shard: u32,
    /// Owner records.
    pub owners: u32,
    /// Longest name in bytes.
    pub max_name_len: u32,
    /// u64 words per stored name.
    pub name_words: u32,
}

/// Per-shard share of `total`: the mean plus six standard deviations of a uniform hash spread,
/// rounded up to 16 records (whole cache lines of pool nodes at shard boundaries).
fn per_shard(total: u32, shards: u32) -> u32 {
    if shards == 1 {
        return total.max(1);
    }
    let mean = f64::from(total) / f64::from(shards);
    let with_headroom = (mean + 6.0 * mean.sqrt() + 8.0).ceil() as u32;
    with_headroom.div_ceil(16) * 16
}

/// Most lock entries one shard may have: bucket heads are 16-bit entry indices (`u16::MAX` is
/// "empty"), which keeps the bucket array a quarter of the size of 32-bit heads in a
/// power-of-two table, and so far more of it in the cache and the TLB.
pub const MAX_ENTRIES_PER_SHARD: u32 = u16::MAX as u32 - 1;

impl Capacities {
    /// Checks every value, naming the key at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |key, why: String| Err(Error::Config { key, why });
        if !(1..=1 << 26).contains(&self.max_locks) {
            return bad("max_locks", format!("{} is not in 1..=67108864", self.max_locks));
        }
        if !(1..=1 << 26).contains(&self.max_holds) {
            return bad("max_holds", format!("{} is not in 1..=67108864", self.max_holds));
        }
        // The lock word names a fast holder in 24 bits (owner index + 1), latch words below
        // PID_ID: the bound keeps every owner nameable in both.
        const _: () = assert!(1 << 20 <= crate::table::FAST_OWNER && 1 << 20 < crate::table::PID_ID);
        if !(1..=1 << 20).contains(&self.max_owners) {
            return bad("max_owners", format!("{} is not in 1..=1048576", self.max_owners));
        }
        if !(1..=1024).contains(&self.max_name_len) {
            return bad("max_name_len", format!("{} is not in 1..=1024", self.max_name_len));
        }
        if self.shards != 0 && (!self.shards.is_power_of_two() || self.shards > 4096) {
            return bad(
                "shards",
                format!("{} is not 0 (auto) or a power of two up to 4096", self.shards),
            );
        }
        if self.mode & !0o777 != 0 || self.mode & 0o600 != 0o600 {
            return bad(
                "mode",
                format!(
                    "0{:o} must be permission bits including owner read-write (0600)",
                    self.mode
                ),
            );
        }
        Ok(())
    }

    /// The geometry these capacities give.
    pub fn geometry(&self) -> Result<Geometry> {
        self.validate()?;
        let shards = if self.shards != 0 {
            self.shards
        } else {
            // About 256 locks per shard at least, at most 256 shards unless a shard would
            // outgrow its 16-bit bucket heads.
            let mut s = (self.max_locks / 256).max(1).next_power_of_two().min(256);
            while per_shard(self.max_locks, s) > MAX_ENTRIES_PER_SHARD {
                s *= 2;
            }
            s
        };
        let entries_per_shard = per_shard(self.max_locks, shards);
        if entries_per_shard > MAX_ENTRIES_PER_SHARD {
            return Err(Error::Config {
                key: "shards",
                why: format!(
                    "{shards} shards for max_locks = {} need {entries_per_shard} lock entries per \
                     shard, more than the {MAX_ENTRIES_PER_SHARD} a shard can index: use more \
                     shards, or 0 (auto)",
                    self.max_locks
                ),
            });
        }
        let holds_per_shard = per_shard(self.max_holds, shards);
        let buckets_per_shard = (entries_per_shard * 2).div_ceil(32) * 32;
        Ok(Geometry {
            shards,
            entries_per_shard,
            holds_per_shard,
            buckets_per_shard,
            owners: self.max_owners,
            max_name_len: self.max_name_len,
            name_words: self.max_name_len.div_ceil(8),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let g = Capacities::default().geometry().unwrap();
        assert_eq!(g.shards, 256);
        assert!(g.entries_per_shard * g.shards >= 65_536);
        assert!(g.buckets_per_shard >= 2 * g.entries_per_shard);
    }

    #[test]
    fn one_shard_is_exact() {
        let c = Capacities {
            max_locks: 5,
            max_holds: 3,
            shards: 1,
            ..Default::default()
        };
        let g = c.geometry().unwrap();
        assert_eq!(
            (g.entries_per_shard, g.holds_per_shard, g.buckets_per_shard),
            (5, 3, 32)
        );
    }

    #[test]
    fn shards_grow_so_that_no_shard_outgrows_its_16_bit_bucket_heads() {
        let c = Capacities {
            max_locks: 1 << 26,
            ..Default::default()
        };
        let g = c.geometry().unwrap();
        assert!(g.shards > 256, "{g:?}");
        assert!(g.entries_per_shard <= MAX_ENTRIES_PER_SHARD);
        assert!(g.entries_per_shard as u64 * g.shards as u64 >= 1 << 26);
        let too_few = Capacities {
            max_locks: 1 << 20,
            shards: 8,
            ..Default::default()
        };
        match too_few.geometry() {
            Err(Error::Config { key: "shards", why }) => assert!(why.contains("65534"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_million_locks_have_headroom_in_every_shard() {
        let c = Capacities {
            max_locks: 1_000_000,
            max_holds: 1_000_000,
            ..Default::default()
        };
        let g = c.geometry().unwrap();
        let mean = 1_000_000 / g.shards;
        assert!(g.entries_per_shard as f64 >= mean as f64 + 5.0 * (mean as f64).sqrt());
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                Capacities {
                    max_locks: 0,
                    ..Default::default()
                },
                "max_locks",
            ),
            (
                Capacities {
                    max_name_len: 0,
                    ..Default::default()
                },
                "max_name_len",
            ),
            (
                Capacities {
                    shards: 3,
                    ..Default::default()
                },
                "shards",
            ),
            (
                Capacities {
                    mode: 0o400,
                    ..Default::default()
                },
                "mode",
            ),
        ];
        for (c, key) in cases {
            match c.validate() {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
    }
}
