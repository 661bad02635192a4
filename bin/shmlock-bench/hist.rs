//! A fixed, preallocated log-linear histogram of durations in nanoseconds.
//!
//! Values below 16 have a bucket each; above, every power-of-two octave is split into 16 linear
//! sub-buckets, so a bucket is at most 1/16 (6.25%) of its value wide. Recording is an index
//! computation and one add: no allocation in the timed loop.

/// Linear sub-buckets per octave, as a power of two.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Enough buckets for every u64.
pub(crate) const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// Counts per bucket.
pub(crate) struct Hist {
    counts: Box<[u64; BUCKETS]>,
}

impl Hist {
    pub(crate) fn new() -> Hist {
        Hist {
            counts: Box::new([0; BUCKETS]),
        }
    }

    #[inline]
    fn bucket(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS
        let sub = (v >> (e - SUB_BITS)) as usize & (SUB - 1);
        (e - SUB_BITS + 1) as usize * SUB + sub
    }

    /// The smallest value in bucket `b`.
    fn low(b: usize) -> u64 {
        if b < SUB {
            return b as u64;
        }
        let e = (b / SUB) as u32 + SUB_BITS - 1;
        ((SUB + b % SUB) as u64) << (e - SUB_BITS)
    }

    /// A representative value of bucket `b` (its midpoint).
    fn mid(b: usize) -> f64 {
        let lo = Self::low(b) as f64;
        let hi = if b + 1 < BUCKETS {
            Self::low(b + 1) as f64
        } else {
            u64::MAX as f64
        };
        if b < SUB {
            lo
        } else {
            (lo + hi) / 2.0
        }
    }

    /// Records one value.
    #[inline]
    pub(crate) fn record(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
    }

    /// Number of values recorded.
    pub(crate) fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The value at quantile `q` (0..=1), in ns; 0 if empty.
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::mid(b);
            }
        }
        Self::mid(BUCKETS - 1)
    }

    /// The non-empty buckets, as (bucket, count).
    pub(crate) fn sparse(&self) -> Vec<(u16, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c != 0)
            .map(|(b, &c)| (b as u16, c))
            .collect()
    }

    /// Adds buckets produced by [`Hist::sparse`] (out-of-range buckets are ignored).
    pub(crate) fn merge_sparse(&mut self, buckets: &[(u16, u64)]) {
        for &(b, c) in buckets {
            if let Some(slot) = self.counts.get_mut(b as usize) {
                *slot += c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_tight() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 2, u64::MAX]) {
            let b = Hist::bucket(v);
            assert!(b >= last && b < BUCKETS, "{v}");
            assert!(Hist::low(b) <= v, "{v}");
            if b + 1 < BUCKETS {
                assert!(Hist::low(b + 1) > v, "{v}");
            }
            last = b;
        }
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut h = Hist::new();
        for v in 1..=1000 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5);
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "{p50}");
    }
}
