//! The segment header and region table: the only layout `shm` knows.
//!
//! # Layout
//! ```text
//! offset 0     Header (512 B): magic, version, sizes, boot id, params[16], regions[12]
//! offset 512+  region 0 .. region n-1, each 128-byte aligned, described by regions[i]
//! ```
//! What the regions hold is decided by the table module; `shm` only checks that each lies inside
//! the segment, does not overlap another, and has the stride the caller's type needs.

use std::mem::{align_of, offset_of, size_of};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64};

/// "SHMLOCK1" read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SHMLOCK1");

/// Bumped on any change to any shared struct or to the meaning of a param (4: `Header::retired`).
pub const LAYOUT_VERSION: u32 = 4;

/// Most regions a segment can describe.
pub const MAX_REGIONS: usize = 12;

/// Number of u64 parameters the header carries for its user.
pub const PARAMS: usize = 16;

/// Alignment of every region (two cache lines: no false sharing with the adjacent-line prefetcher).
pub const REGION_ALIGN: u64 = 128;

/// Marker for types that may live in the segment.
///
/// # Safety
/// An implementor must be `#[repr(C)]`, valid when all its bytes are zero, mutable only through
/// atomics (no `UnsafeCell` outside them), and hold no pointers, references or file descriptors.
pub unsafe trait ShmSafe: Sync + Sized {}

// SAFETY: atomics are repr(transparent)-like integers, valid at zero, interior-mutable only atomically.
unsafe impl ShmSafe for AtomicU32 {}
// SAFETY: as for AtomicU32.
unsafe impl ShmSafe for AtomicU64 {}
// SAFETY: as for AtomicU32.
unsafe impl ShmSafe for AtomicU16 {}

/// One region's place in the segment.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RegionDesc {
    /// Byte offset from the start of the segment.
    pub offset: AtomicU64,
    /// Number of elements.
    pub count: AtomicU64,
    /// Size of one element in bytes.
    pub stride: AtomicU64,
}

/// The header at offset 0. Written by the creator before `magic` is published (Release);
/// read by openers after `magic` is seen (Acquire). Never changed afterwards except where noted.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Header {
    /// [`MAGIC`], stored last by the creator with Release.
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`] of the creating build.
    pub version: AtomicU32,
    /// Number of regions in use.
    pub region_count: AtomicU32,
    /// Size of the whole segment in bytes.
    pub total_size: AtomicU64,
    /// CLOCK_MONOTONIC at creation.
    pub created_ns: AtomicU64,
    /// The boot id (from /proc/sys/kernel/random/boot_id) the segment was made under.
    pub boot_id: [AtomicU64; 2],
    /// Parameters whose meaning belongs to the segment's user (the lock table).
    pub params: [AtomicU64; PARAMS],
    /// The region table.
    pub regions: [RegionDesc; MAX_REGIONS],
    /// 0 while the segment is in use; the pid of the supervisor that retired it (stored with
    /// Release, under the table's owner latch, just before it unlinks the name) once it is being
    /// removed. An opener refuses a retired segment and registration refuses new owners in it.
    /// The only header field written after creation.
    pub retired: AtomicU64,
    _reserved: [AtomicU64; 1],
}

// SAFETY: repr(C), only atomics and arrays of atomics, valid at zero.
unsafe impl ShmSafe for Header {}

const _: () = assert!(size_of::<RegionDesc>() == 24 && align_of::<RegionDesc>() == 8);
const _: () = assert!(size_of::<Header>() == 512 && align_of::<Header>() == 64);
const _: () = assert!(offset_of!(Header, magic) == 0);
const _: () = assert!(offset_of!(Header, version) == 8);
const _: () = assert!(offset_of!(Header, total_size) == 16);
const _: () = assert!(offset_of!(Header, params) == 48);
const _: () = assert!(offset_of!(Header, regions) == 176);
const _: () = assert!(offset_of!(Header, retired) == 464);

/// Declares that a type outside `shm` satisfies the [`ShmSafe`] contract, checking at compile time
/// what can be checked (size a multiple of 4, alignment at most 128). The caller states why the
/// rest holds in a `// SAFETY:` comment; this keeps every `unsafe` token inside `shm`.
///
/// Crate-private: exported, it would let safe code in any crate declare any type `ShmSafe` and
/// so reach undefined behaviour through [`Segment::slice`](crate::shm::Segment::slice). Outside
/// the crate, `ShmSafe` can only be implemented with an `unsafe impl`, whose contract is the
/// implementor's:
///
/// ```compile_fail
/// // Not reachable from another crate (this once compiled, in safe code).
/// struct NotForShm(std::sync::atomic::AtomicU64);
/// shmlock::impl_shm_safe!(NotForShm);
/// ```
macro_rules! impl_shm_safe {
    ($($t:ty),+ $(,)?) => {$(
        const _: () = assert!(
            ::std::mem::size_of::<$t>() % 4 == 0 && ::std::mem::align_of::<$t>() <= 128
        );
        // SAFETY: asserted by the caller of `impl_shm_safe!` (see its SAFETY comment).
        #[allow(unsafe_code)]
        unsafe impl $crate::shm::ShmSafe for $t {}
    )+};
}
pub(crate) use impl_shm_safe;

/// What a caller asks for when creating a segment: per region, element count and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Number of elements.
    pub count: u64,
    /// Size of one element (`size_of::<T>()`).
    pub stride: u64,
}

impl RegionSpec {
    /// A region of `count` elements of `T`.
    pub const fn of<T: ShmSafe>(count: u64) -> Self {
        RegionSpec {
            count,
            stride: size_of::<T>() as u64,
        }
    }
}

/// Computes region offsets and the total size for `specs`, or None on overflow.
pub fn plan(specs: &[RegionSpec]) -> Option<(Vec<u64>, u64)> {
    let mut off = size_of::<Header>() as u64;
    let mut offsets = Vec::with_capacity(specs.len());
    for s in specs {
        off = off.checked_add(REGION_ALIGN - 1)? & !(REGION_ALIGN - 1);
        offsets.push(off);
        off = off.checked_add(s.count.checked_mul(s.stride)?)?;
    }
    let page = 4096;
    let total = off.checked_add(page - 1)? & !(page - 1);
    Some((offsets, total))
}
