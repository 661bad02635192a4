//! The shared-memory segment: create, open, map, validate; the only module with unsafe code.
//!
//! # Layout
//! A POSIX shared-memory object (a file in `/dev/shm`, which is where glibc's `shm_open` puts
//! them) holding a [`Header`] and up to [`MAX_REGIONS`] regions described by offset, count and
//! stride. No pointer is ever stored in it; regions are reached through [`Region<T>`] handles,
//! validated once at open, and turned into `&[T]` of all-atomic types by [`Segment::slice`].
//!
//! # Crash safety
//! Creation builds the whole segment in a private temporary object, publishes `magic` with
//! Release, and only then `link(2)`s it under its real name: nobody can open a half-built
//! segment, and a creator killed midway leaves at most a `.tmp` object behind (removed by the
//! next creator). Memory is reserved with `posix_fallocate`, so a full `/dev/shm` fails creation
//! with an error instead of a later SIGBUS.
//!
//! # Concurrency
//! After creation every field is an atomic reached through `&`: any process may read anything at
//! any time without undefined behaviour; the meaning of concurrent writes is the table's business.

#![allow(unsafe_code)]

pub mod layout;
pub mod sys;

use std::fs::File;
use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::posix_fallocate;
use nix::sys::stat::{fchmod, fstat, Mode};

use crate::error::{Error, Result};
pub use layout::{Header, RegionSpec, ShmSafe, LAYOUT_VERSION, MAGIC, MAX_REGIONS, PARAMS};

/// Default segment name.
pub const DEFAULT_SEGMENT: &str = "/shmlock";

/// Environment variable that overrides the default segment name.
pub const SEGMENT_ENV: &str = "SHMLOCK_SEGMENT";

/// The segment name to use: `$SHMLOCK_SEGMENT` if set and non-empty, else [`DEFAULT_SEGMENT`].
pub fn default_segment_name() -> String {
    match std::env::var(SEGMENT_ENV) {
        Ok(s) if !s.is_empty() => s,
        _ => DEFAULT_SEGMENT.to_string(),
    }
}

fn check_name(name: &str) -> Result<()> {
    let bad = |why| {
        Err(Error::SegmentNameInvalid {
            name: name.to_string(),
            why,
        })
    };
    let Some(rest) = name.strip_prefix('/') else {
        return bad("must start with '/'");
    };
    if rest.is_empty() || rest.len() > 200 {
        return bad("must have 1..=200 characters after '/'");
    }
    if rest.contains('/') || rest.contains('\0') || rest == "." || rest == ".." {
        return bad("must not contain '/' or NUL after the first character");
    }
    Ok(())
}

fn shm_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm{name}"))
}

/// Removes `NAME.tmp.PID` objects left by creators of `name` that were killed half way (their
/// pid no longer runs), so they do not hold /dev/shm space forever.
fn remove_stale_tmp(name: &str) {
    let prefix = format!("{}.tmp.", name.trim_start_matches('/'));
    let Ok(dir) = std::fs::read_dir("/dev/shm") else { return };
    for entry in dir.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(Errno::ESRCH);
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A typed handle to one region, valid for the segment that produced it.
#[derive(Debug)]
pub struct Region<T> {
    seg: u64,
    offset: usize,
    count: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Region<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Region<T> {}

impl<T> Region<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.count
    }
    /// True if the region has no elements.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A mapped segment.
#[derive(Debug)]
pub struct Segment {
    id: u64,
    name: String,
    base: NonNull<u8>,
    len: usize,
    _fd: Option<File>,
}

// SAFETY: `Segment` owns a MAP_SHARED mapping that stays mapped until Drop. All access to its
// contents goes through `&Header` / `&[T]` with `T: ShmSafe`, i.e. through atomics, which are Sync;
// no `&mut` into the mapping is ever created after creation. So sharing a `&Segment` between
// threads, or moving a `Segment` to another thread, is as safe as sharing `&[AtomicU64]`.
unsafe impl Send for Segment {}
// SAFETY: see the `Send` impl above.
unsafe impl Sync for Segment {}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are this Segment's own mapping (made in `map_*`); every reference
        // into it borrows `&self`, so none outlives this drop.
        unsafe { sys::unmap(self.base, self.len) }
    }
}

impl Segment {
    /// Creates segment `name` with `specs` regions and `params`; `init` fills the regions before
    /// the segment is published. Fails with [`Error::SegmentExists`] if the name is taken.
    pub fn create(
        name: &str,
        specs: &[RegionSpec],
        params: &[u64; PARAMS],
        mode: u32,
        init: impl FnOnce(&Segment) -> Result<()>,
    ) -> Result<Segment> {
        check_name(name)?;
        let (offsets, total) = layout::plan(specs).ok_or(Error::Config {
            key: "capacities",
            why: "segment size overflows".into(),
        })?;
        if specs.len() > MAX_REGIONS {
            return Err(Error::Config {
                key: "regions",
                why: format!("{} > {MAX_REGIONS}", specs.len()),
            });
        }
        let final_path = shm_path(name);
        if final_path.exists() {
            return Err(Error::SegmentExists { name: name.to_string() });
        }
        remove_stale_tmp(name);
        let tmp_name = format!("{name}.tmp.{}", std::process::id());
        let tmp_path = shm_path(&tmp_name);
        let _ = std::fs::remove_file(&tmp_path);
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp_path)
            .map_err(|e| Error::Io {
                op: "create",
                segment: name.to_string(),
                source: e,
            })?;
        let cleanup = |e: Error| {
            let _ = std::fs::remove_file(&tmp_path);
            e
        };
        // The umask may have narrowed the mode; set it exactly.
        fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(|e| cleanup(Error::io("fchmod", name, e)))?;
        let len = usize::try_from(total).map_err(|_| {
            cleanup(Error::Config {
                key: "capacities",
                why: "too large".into(),
            })
        })?;
        posix_fallocate(fd.as_raw_fd(), 0, total as i64).map_err(|e| {
            cleanup(if e == Errno::ENOSPC {
                Error::Io {
                    op: "reserve memory (posix_fallocate; is /dev/shm big enough?)",
                    segment: name.to_string(),
                    source: e.into(),
                }
            } else {
                Error::io("posix_fallocate", name, e)
            })
        })?;
        let seg = Self::map_file(name, fd, len).map_err(cleanup)?;
        seg.write_header(specs, &offsets, total, params);
        if let Err(e) = init(&seg) {
            return Err(cleanup(e));
        }
        seg.header().magic.store(MAGIC, Ordering::Release);
        // Publish: link(2) fails if the final name appeared meanwhile, so two creators never
        // both win and nobody ever sees a half-built segment under the real name.
        let linked = std::fs::hard_link(&tmp_path, &final_path);
        let _ = std::fs::remove_file(&tmp_path);
        match linked {
            Ok(()) => Ok(seg),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(Error::SegmentExists { name: name.to_string() })
            }
            Err(e) => Err(Error::Io {
                op: "link",
                segment: name.to_string(),
                source: e,
            }),
        }
    }

    /// Creates an anonymous segment (not named, shared only with forked children). For tests
    /// and benchmarks of the logic without a name in /dev/shm.
    pub fn anonymous(
        specs: &[RegionSpec],
        params: &[u64; PARAMS],
        init: impl FnOnce(&Segment) -> Result<()>,
    ) -> Result<Segment> {
        let (offsets, total) = layout::plan(specs).ok_or(Error::Config {
            key: "capacities",
            why: "segment size overflows".into(),
        })?;
        let len = total as usize;
        let base = sys::map_anonymous(len).map_err(|e| Error::io("mmap", "(anonymous)", e))?;
        let seg = Segment {
            id: next_id(),
            name: "(anonymous)".into(),
            base,
            len,
            _fd: None,
        };
        seg.write_header(specs, &offsets, total, params);
        init(&seg)?;
        seg.header().magic.store(MAGIC, Ordering::Release);
        Ok(seg)
    }

    fn map_file(name: &str, fd: File, len: usize) -> Result<Segment> {
        let base = sys::map_shared(&fd, len).map_err(|e| Error::io("mmap", name, e))?;
        Ok(Segment {
            id: next_id(),
            name: name.to_string(),
            base,
            len,
            _fd: Some(fd),
        })
    }

    fn write_header(&self, specs: &[RegionSpec], offsets: &[u64], total: u64, params: &[u64; PARAMS]) {
        let h = self.header();
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.region_count.store(specs.len() as u32, Ordering::Relaxed);
        h.total_size.store(total, Ordering::Relaxed);
        h.created_ns.store(crate::clock::now().0, Ordering::Relaxed);
        let boot = boot_id();
        h.boot_id[0].store(boot[0], Ordering::Relaxed);
        h.boot_id[1].store(boot[1], Ordering::Relaxed);
        for (i, p) in params.iter().enumerate() {
            h.params[i].store(*p, Ordering::Relaxed);
        }
        for (i, (s, off)) in specs.iter().zip(offsets).enumerate() {
            h.regions[i].offset.store(*off, Ordering::Relaxed);
            h.regions[i].count.store(s.count, Ordering::Relaxed);
            h.regions[i].stride.store(s.stride, Ordering::Relaxed);
        }
    }

    /// Opens the existing segment `name` and validates its header.
    pub fn open(name: &str) -> Result<Segment> {
        check_name(name)?;
        let path = shm_path(name);
        let fd = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::SegmentMissing { name: name.to_string() })
            }
            Err(e) => {
                return Err(Error::Io {
                    op: "open",
                    segment: name.to_string(),
                    source: e,
                })
            }
        };
        let st = fstat(fd.as_raw_fd()).map_err(|e| Error::io("fstat", name, e))?;
        let size = st.st_size as u64;
        let hsize = size_of::<Header>() as u64;
        if size < hsize {
            return Err(Error::SegmentTooSmall { size, needed: hsize });
        }
        let len = size as usize;
        let seg = Self::map_file(name, fd, len)?;
        seg.validate()?;
        Ok(seg)
    }

    /// Removes segment `name` from /dev/shm. Mappings stay valid until their owners drop them.
    pub fn unlink(name: &str) -> Result<()> {
        check_name(name)?;
        match std::fs::remove_file(shm_path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::SegmentMissing { name: name.to_string() }),
            Err(e) => Err(Error::Io {
                op: "unlink",
                segment: name.to_string(),
                source: e,
            }),
        }
    }

    fn validate(&self) -> Result<()> {
        let h = self.header();
        let magic = h.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(Error::WrongMagic {
                found: magic,
                expected: MAGIC,
            });
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(Error::WrongVersion {
                found: version,
                expected: LAYOUT_VERSION,
            });
        }
        let total = h.total_size.load(Ordering::Relaxed);
        if (self.len as u64) < total {
            return Err(Error::SegmentTooSmall {
                size: self.len as u64,
                needed: total,
            });
        }
        let n = h.region_count.load(Ordering::Relaxed) as usize;
        if n > MAX_REGIONS {
            return Err(Error::Corrupt {
                what: format!("region count {n} > {MAX_REGIONS}"),
            });
        }
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(n);
        for i in 0..n {
            let r = &h.regions[i];
            let (off, count, stride) = (
                r.offset.load(Ordering::Relaxed),
                r.count.load(Ordering::Relaxed),
                r.stride.load(Ordering::Relaxed),
            );
            let end = count.checked_mul(stride).and_then(|b| b.checked_add(off));
            match end {
                Some(end) if off >= size_of::<Header>() as u64 && end <= total && off % layout::REGION_ALIGN == 0 => {
                    spans.push((off, end))
                }
                _ => {
                    return Err(Error::Corrupt {
                        what: format!(
                            "region {i} (offset {off}, {count} x {stride} B) lies outside the {total}-byte segment"
                        ),
                    })
                }
            }
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(Error::Corrupt {
                what: "regions overlap".into(),
            });
        }
        Ok(())
    }

    /// The segment's name (`(anonymous)` for anonymous ones).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size of the mapping in bytes.
    pub fn size(&self) -> usize {
        self.len
    }

    /// The header.
    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is at least size_of::<Header>() bytes (checked in `open`; `plan`
        // puts regions after the header in `create`), page-aligned (so aligned for Header), and
        // Header is ShmSafe: valid at any bit pattern of its atomics and only atomically mutable.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    /// A typed handle to region `id`, checking its stride, alignment and bounds.
    pub fn region<T: ShmSafe>(&self, id: usize) -> Result<Region<T>> {
        let h = self.header();
        if id >= h.region_count.load(Ordering::Relaxed) as usize {
            return Err(Error::Corrupt {
                what: format!("region {id} missing"),
            });
        }
        let r = &h.regions[id];
        let (off, count, stride) = (
            r.offset.load(Ordering::Relaxed),
            r.count.load(Ordering::Relaxed),
            r.stride.load(Ordering::Relaxed),
        );
        if stride != size_of::<T>() as u64 {
            return Err(Error::Corrupt {
                what: format!("region {id} has stride {stride}, this build needs {}", size_of::<T>()),
            });
        }
        if off % align_of::<T>() as u64 != 0 {
            return Err(Error::Corrupt {
                what: format!("region {id} misaligned at {off}"),
            });
        }
        match count.checked_mul(stride).and_then(|b| b.checked_add(off)) {
            Some(end) if end <= self.len as u64 => {}
            _ => {
                return Err(Error::Corrupt {
                    what: format!("region {id} exceeds the segment"),
                })
            }
        }
        Ok(Region {
            seg: self.id,
            offset: off as usize,
            count: count as usize,
            _t: PhantomData,
        })
    }

    /// The elements of a region as a slice of atomics.
    ///
    /// Panics if `r` was made by another segment.
    #[inline]
    pub fn slice<T: ShmSafe>(&self, r: Region<T>) -> &[T] {
        assert!(r.seg == self.id, "region handle does not belong to this segment");
        // SAFETY: `r` was made by `region()` of this very segment (ids are unique per process),
        // which checked that [offset, offset + count * size_of::<T>()) lies inside this live
        // mapping with T's alignment; T: ShmSafe makes every bit pattern valid and all mutation
        // atomic, so a shared slice may alias other processes' writes without UB. The slice
        // borrows `self`, so it cannot outlive the mapping.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(r.offset).cast::<T>(), r.count) }
    }
}

fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The current boot id as two u64s (zeros if /proc is unreadable).
pub fn boot_id() -> [u64; 2] {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let a = u64::from_str_radix(hex.get(0..16).unwrap_or("0"), 16).unwrap_or(0);
    let b = u64::from_str_radix(hex.get(16..32).unwrap_or("0"), 16).unwrap_or(0);
    [a, b]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, AtomicU64};

    fn unique(tag: &str) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        format!(
            "/shmlock-u-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    #[test]
    fn create_removes_what_killed_creators_left_behind() {
        let name = unique("stale");
        // A pid that cannot run (above pid_max).
        let dead = shm_path(&format!("{name}.tmp.2147483646"));
        let other = shm_path(&format!("{name}x.tmp.2147483646"));
        for p in [&dead, &other] {
            std::fs::write(p, b"half built").unwrap();
        }
        let seg = Segment::create(
            &name,
            &[RegionSpec::of::<AtomicU32>(1)],
            &[0; PARAMS],
            0o600,
            |_| Ok(()),
        )
        .unwrap();
        assert!(!dead.exists(), "a dead creator's object is removed");
        assert!(other.exists(), "another segment's objects are left alone");
        drop(seg);
        let _ = std::fs::remove_file(&other);
        Segment::unlink(&name).unwrap();
    }

    #[test]
    fn create_open_and_refuse_garbage() {
        let name = unique("seg");
        let specs = [RegionSpec::of::<AtomicU64>(100), RegionSpec::of::<AtomicU32>(7)];
        let seg = Segment::create(&name, &specs, &[3; PARAMS], 0o600, |s| {
            let r = s.region::<AtomicU64>(0)?;
            s.slice(r)[99].store(42, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert!(matches!(
            Segment::create(&name, &specs, &[0; PARAMS], 0o600, |_| Ok(())),
            Err(Error::SegmentExists { .. })
        ));
        let other = Segment::open(&name).unwrap();
        let r = other.region::<AtomicU64>(0).unwrap();
        assert_eq!(other.slice(r)[99].load(Ordering::Relaxed), 42);
        assert!(
            matches!(other.region::<AtomicU64>(1), Err(Error::Corrupt { .. })),
            "stride mismatch"
        );
        assert_eq!(other.header().params[5].load(Ordering::Relaxed), 3);
        drop(seg);

        // Wrong version.
        other.header().version.store(LAYOUT_VERSION + 1, Ordering::Relaxed);
        let e = Segment::open(&name).unwrap_err();
        assert!(
            matches!(e, Error::WrongVersion { found, expected } if found == LAYOUT_VERSION + 1 && expected == LAYOUT_VERSION),
            "{e}"
        );
        other.header().version.store(LAYOUT_VERSION, Ordering::Relaxed);
        // Garbage magic.
        other.header().magic.store(0x1234, Ordering::Relaxed);
        let e = Segment::open(&name).unwrap_err();
        assert!(matches!(e, Error::WrongMagic { found: 0x1234, .. }), "{e}");
        other.header().magic.store(MAGIC, Ordering::Relaxed);
        // Truncated.
        std::fs::OpenOptions::new()
            .write(true)
            .open(shm_path(&name))
            .unwrap()
            .set_len(1024)
            .unwrap();
        let e = Segment::open(&name).unwrap_err();
        assert!(matches!(e, Error::SegmentTooSmall { size: 1024, .. }), "{e}");
        drop(other);
        Segment::unlink(&name).unwrap();
        assert!(matches!(Segment::open(&name), Err(Error::SegmentMissing { .. })));
    }

    #[test]
    fn bad_names_are_refused() {
        for n in ["noslash", "/", "/a/b", ""] {
            assert!(matches!(Segment::open(n), Err(Error::SegmentNameInvalid { .. })), "{n}");
        }
    }

    #[test]
    fn mode_is_applied() {
        use std::os::unix::fs::PermissionsExt;
        let name = unique("mode");
        let _s = Segment::create(
            &name,
            &[RegionSpec::of::<AtomicU64>(1)],
            &[0; PARAMS],
            0o640,
            |_| Ok(()),
        )
        .unwrap();
        let m = std::fs::metadata(shm_path(&name)).unwrap().permissions().mode() & 0o777;
        Segment::unlink(&name).unwrap();
        assert_eq!(m, 0o640);
    }
}
