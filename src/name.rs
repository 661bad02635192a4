//! Lock names: validation and the seeded hash that places a name in a shard and a bucket.

use crate::error::{Error, Result};

/// A validated lock name: 1..=max_name_len bytes, any byte values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockName<'a>(&'a [u8]);

impl<'a> LockName<'a> {
    /// Validates `bytes` against the segment's maximum name length.
    pub fn new(bytes: &'a [u8], max_len: usize) -> Result<Self> {
        if bytes.is_empty() || bytes.len() > max_len {
            return Err(Error::NameInvalid {
                len: bytes.len(),
                max: max_len,
            });
        }
        Ok(LockName(bytes))
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
}

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xa076_1d64_78bd_642f;
const K3: u64 = 0xe703_7ed1_a0b4_28db;

#[inline(always)]
fn fold_mul(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

/// Up to 8 bytes as a little-endian u64, zero-extended, without a memcpy (overlapping loads).
#[inline(always)]
pub fn word(c: &[u8]) -> u64 {
    let n = c.len();
    if n >= 8 {
        u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
    } else if n >= 4 {
        let lo = u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        let hi = u64::from(u32::from_le_bytes([c[n - 4], c[n - 3], c[n - 2], c[n - 1]]));
        lo | (hi << (8 * (n - 4)))
    } else if n > 0 {
        u64::from(c[0]) | (u64::from(c[n / 2]) << (8 * (n / 2))) | (u64::from(c[n - 1]) << (8 * (n - 1)))
    } else {
        0
    }
}

/// Seeded 64-bit hash of a name (a folded-multiply hash in the wyhash family).
///
/// The seed is random per segment, so names a remote client chooses cannot be aimed at one
/// bucket. Stable for a given seed: part of the segment's layout version.
#[inline]
pub fn hash(seed: u64, name: &[u8]) -> u64 {
    let mut h = seed ^ fold_mul(name.len() as u64 ^ K3, K1);
    let mut chunks = name.chunks_exact(8);
    for c in &mut chunks {
        h = fold_mul(h ^ word(c), K2);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        h = fold_mul(h ^ word(rest), K3);
    }
    fold_mul(h, K1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_long_names() {
        assert!(matches!(
            LockName::new(b"", 8),
            Err(Error::NameInvalid { len: 0, max: 8 })
        ));
        assert!(matches!(
            LockName::new(b"123456789", 8),
            Err(Error::NameInvalid { len: 9, max: 8 })
        ));
        assert_eq!(LockName::new(b"12345678", 8).unwrap().as_bytes(), b"12345678");
        assert!(LockName::new(&[0, 255, 10], 8).is_ok());
    }

    #[test]
    fn word_matches_a_zero_padded_copy() {
        let bytes: Vec<u8> = (1..=8).collect();
        for n in 0..=8 {
            let mut buf = [0u8; 8];
            buf[..n].copy_from_slice(&bytes[..n]);
            assert_eq!(word(&bytes[..n]), u64::from_le_bytes(buf), "len {n}");
        }
    }

    #[test]
    fn hash_depends_on_seed_length_and_every_byte() {
        assert_ne!(hash(1, b"ABCD"), hash(2, b"ABCD"));
        assert_ne!(hash(1, b"ABCD"), hash(1, b"ABCD\0"));
        let base = b"0123456789abcdefXYZ".to_vec();
        for i in 0..base.len() {
            let mut v = base.clone();
            v[i] ^= 1;
            assert_ne!(hash(7, &base), hash(7, &v), "byte {i}");
        }
    }
}
