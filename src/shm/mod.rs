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
//! Release, and only then renames it to its real name (`renameat2(RENAME_NOREPLACE)`): nobody
//! can open a half-built segment, and a creator killed midway leaves at most a `.tmp` object
//! behind (removed by the next creator). Memory is reserved with `posix_fallocate`, so a full
//! `/dev/shm` fails creation with an error instead of a later SIGBUS.
//!
//! # Trust
//! `/dev/shm` is writable by every user, so a name there may have been made by anyone. Opening
//! never follows a symbolic link (`O_NOFOLLOW`), and then checks the open file itself (`fstat`,
//! so nothing can be swapped in between): a regular file, one link, owned by the expected user
//! ([`SegmentOwner`]). Creation makes its temporary object with `O_CREAT | O_EXCL | O_NOFOLLOW`
//! (a file or link planted under that name fails it) and publishes without replacing anything.
//!
//! # Concurrency
//! After creation every field is an atomic reached through `&`: any process may read anything at
//! any time without undefined behaviour; the meaning of concurrent writes is the table's business.

#![allow(unsafe_code)]

pub mod layout;
pub(crate) mod sys;

use std::fs::File;
use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::{posix_fallocate, renameat2, RenameFlags};
use nix::sys::stat::{fchmod, Mode};
use nix::unistd::{fchown, geteuid, Uid, User};

use crate::error::{Error, Result};
pub(crate) use layout::impl_shm_safe;
pub use layout::{Header, RegionSpec, ShmSafe, LAYOUT_VERSION, MAGIC, MAX_REGIONS, PARAMS};

/// Whether segments this process maps from now on get their page tables populated up front (the
/// default: the lock path then never takes a page fault on first touch). A short-lived process
/// that touches a few pages, such as the `shmlock` CLI, turns it off: populating the page tables of
/// a segment of a few dozen MiB costs milliseconds, far more than the few faults it saves.
pub fn populate_on_map(on: bool) {
    sys::set_populate(on);
}

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

/// Environment variable naming the user who must own the segment's file: a user name or a uid.
pub const SEGMENT_OWNER_ENV: &str = "SHMLOCK_SEGMENT_OWNER";

/// Who must own a segment's file for this process to open it (or `shmlockd` to adopt it), and
/// who owns one it creates.
///
/// Whoever owns the file can rewrite the table: release anyone's locks, forge grants, remove it.
/// So a segment made by some other user (who got to the name first) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SegmentOwner {
    /// This process's effective uid, or root (uid 0): a root `shmlockd` serving other users is
    /// the normal deployment. A segment this process creates is its own.
    #[default]
    MeOrRoot,
    /// Exactly this uid (a configured owner). A segment this process creates is given to it
    /// (`fchown`, which needs the privilege to do so unless it is this process's own uid).
    Uid(u32),
}

impl SegmentOwner {
    /// Parses a user name or a numeric uid; `""` is [`SegmentOwner::MeOrRoot`]. `key` names the
    /// setting in the error.
    pub fn parse(s: &str, key: &'static str) -> Result<SegmentOwner> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(SegmentOwner::MeOrRoot);
        }
        if let Ok(uid) = s.parse::<u32>() {
            return Ok(SegmentOwner::Uid(uid));
        }
        match User::from_name(s) {
            Ok(Some(u)) => Ok(SegmentOwner::Uid(u.uid.as_raw())),
            Ok(None) => Err(Error::Config {
                key,
                why: format!("no user named {s:?} (give a user name or a uid)"),
            }),
            Err(e) => Err(Error::Config {
                key,
                why: format!("cannot look up user {s:?}: {e}"),
            }),
        }
    }

    /// `$SHMLOCK_SEGMENT_OWNER` if set and non-empty, else [`SegmentOwner::MeOrRoot`].
    pub fn from_env() -> Result<SegmentOwner> {
        match std::env::var(SEGMENT_OWNER_ENV) {
            Ok(s) => Self::parse(&s, SEGMENT_OWNER_ENV),
            Err(_) => Ok(SegmentOwner::MeOrRoot),
        }
    }

    /// Does this rule accept a file owned by `uid`?
    pub fn accepts(self, uid: u32) -> bool {
        match self {
            SegmentOwner::MeOrRoot => uid == 0 || uid == geteuid().as_raw(),
            SegmentOwner::Uid(want) => uid == want,
        }
    }

    /// Who is accepted, for messages: `alice (uid 1000) or root (uid 0)`.
    pub fn describe(self) -> String {
        match self {
            SegmentOwner::MeOrRoot if geteuid().is_root() => user_and_uid(0),
            SegmentOwner::MeOrRoot => format!("{} or {}", user_and_uid(geteuid().as_raw()), user_and_uid(0)),
            SegmentOwner::Uid(u) => user_and_uid(u),
        }
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for SegmentOwner {
    /// A user name or uid as a string (`""`: the default), or a uid as an integer.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SegmentOwner;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a user name or a uid, e.g. \"shmlock\" or 0 (\"\" for the default)")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<SegmentOwner, E> {
                SegmentOwner::parse(s, "owner").map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<SegmentOwner, E> {
                u32::try_from(v)
                    .map(SegmentOwner::Uid)
                    .map_err(|_| E::custom(format!("uid {v} is out of range")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<SegmentOwner, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        d.deserialize_any(V)
    }
}

/// `name (uid N)`, or `uid N (no such user)`.
fn user_and_uid(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{} (uid {uid})", u.name),
        _ => format!("uid {uid} (no such user)"),
    }
}

/// Checks an opened segment file (`fstat` of it): a regular file with one link, owned as
/// `owner` requires.
fn check_file(name: &str, st: &std::fs::Metadata, owner: SegmentOwner) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = st.file_type();
    if !t.is_file() {
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_symlink() {
            "a symbolic link"
        } else {
            "of an unknown file type"
        };
        return Err(Error::SegmentNotRegular {
            name: name.to_string(),
            kind,
        });
    }
    if !owner.accepts(st.uid()) {
        return Err(Error::SegmentWrongOwner {
            name: name.to_string(),
            uid: st.uid(),
            owner: user_and_uid(st.uid()),
            expected: owner.describe(),
        });
    }
    if st.nlink() != 1 {
        return Err(Error::SegmentLinked {
            name: name.to_string(),
            links: st.nlink(),
        });
    }
    Ok(())
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
    fd: Option<File>,
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
    /// Creates segment `name` with `specs` regions and `params`, permission bits `mode`, owned
    /// as `owner` says; `init` fills the regions before the segment is published. Fails with
    /// [`Error::SegmentExists`] if the name is taken (by anything: a file, a link).
    pub fn create(
        name: &str,
        specs: &[RegionSpec],
        params: &[u64; PARAMS],
        mode: u32,
        owner: SegmentOwner,
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
        // lstat: a dangling symbolic link takes the name too.
        if final_path.symlink_metadata().is_ok() {
            return Err(Error::SegmentExists { name: name.to_string() });
        }
        remove_stale_tmp(name);
        let tmp_name = format!("{name}.tmp.{}", std::process::id());
        let tmp_path = shm_path(&tmp_name);
        let _ = std::fs::remove_file(&tmp_path);
        // O_CREAT | O_EXCL (create_new) never follows a link and fails on anything already
        // there: whatever another user planted under the temporary name makes creation fail
        // rather than be written through. O_NOFOLLOW says so once more; O_CLOEXEC is std's.
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
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
        if let SegmentOwner::Uid(uid) = owner {
            if uid != geteuid().as_raw() {
                fchown(fd.as_raw_fd(), Some(Uid::from_raw(uid)), None)
                    .map_err(|e| cleanup(Error::io("fchown (give the segment to its configured owner)", name, e)))?;
            }
        }
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
        // Publish: the rename moves the object's one link to the real name and fails if that
        // name appeared meanwhile (RENAME_NOREPLACE), so two creators never both win, nobody
        // ever sees a half-built segment under the real name, and the published file never has
        // a second link (which openers refuse), not even for an instant.
        match renameat2(None, &tmp_path, None, &final_path, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(seg),
            Err(Errno::EEXIST) => Err(cleanup(Error::SegmentExists { name: name.to_string() })),
            Err(e) => Err(cleanup(Error::io("rename (publish)", name, e))),
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
            fd: None,
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
            fd: Some(fd),
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

    /// Opens the existing segment `name` and validates it, accepting the owner that
    /// `$SHMLOCK_SEGMENT_OWNER` names (else this process's user or root: see [`SegmentOwner`]).
    pub fn open(name: &str) -> Result<Segment> {
        Self::open_as(name, SegmentOwner::from_env()?)
    }

    /// Opens the existing segment `name` if its file is owned as `owner` requires, and
    /// validates it. Refuses a symbolic link ([`Error::SegmentSymlink`]; never followed), anything
    /// but a regular file, a file with more than one link, and another owner
    /// ([`Error::SegmentWrongOwner`]), all checked on the open file itself.
    pub fn open_as(name: &str, owner: SegmentOwner) -> Result<Segment> {
        check_name(name)?;
        let path = shm_path(name);
        // O_NOFOLLOW: a symbolic link as the last component fails with ELOOP (glibc's shm_open
        // passes it too). O_CLOEXEC is std's default. A FIFO does not block an O_RDWR open.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path);
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::SegmentMissing { name: name.to_string() })
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(Error::SegmentSymlink {
                    name: name.to_string(),
                    target: std::fs::read_link(&path).ok().map(|t| t.display().to_string()),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                return Err(Error::SegmentNotRegular {
                    name: name.to_string(),
                    kind: "a directory",
                })
            }
            Err(e) => {
                return Err(Error::Io {
                    op: "open",
                    segment: name.to_string(),
                    source: e,
                })
            }
        };
        let st = fd.metadata().map_err(|e| Error::Io {
            op: "fstat",
            segment: name.to_string(),
            source: e,
        })?;
        check_file(name, &st, owner)?;
        let size = st.len();
        let hsize = size_of::<Header>() as u64;
        if size < hsize {
            return Err(Error::SegmentTooSmall { size, needed: hsize });
        }
        let len = size as usize;
        let seg = Self::map_file(name, fd, len)?;
        seg.validate()?;
        Ok(seg)
    }

    /// Permission bits of the segment's file (None for anonymous segments).
    pub fn file_mode(&self) -> Result<Option<u32>> {
        match &self.fd {
            None => Ok(None),
            Some(f) => match f.metadata() {
                Ok(st) => Ok(Some(st.mode() & 0o7777)),
                Err(e) => Err(Error::Io {
                    op: "fstat",
                    segment: self.name.clone(),
                    source: e,
                }),
            },
        }
    }

    /// The supervisor that retired this segment (see [`Header::retired`]), if one has.
    pub fn retired_by(&self) -> Option<u32> {
        match self.header().retired.load(Ordering::Acquire) {
            0 => None,
            pid => Some(u32::try_from(pid).unwrap_or(u32::MAX)),
        }
    }

    /// Marks the segment retired by this process: openers refuse it from now on, and the table
    /// registers no new owner in it. For the supervisor, under the table's owner latch, just
    /// before [`unlink_self`](Self::unlink_self). There is no way back.
    pub fn retire(&self) {
        self.header()
            .retired
            .store(u64::from(std::process::id()).max(1), Ordering::Release);
    }

    /// Removes this segment's name from /dev/shm, if the name still names this very file (same
    /// device and inode): never someone else's file put there since.
    pub fn unlink_self(&self) -> Result<()> {
        let Some(fd) = &self.fd else {
            return Ok(());
        };
        let mine = fd.metadata().map_err(|e| Error::Io {
            op: "fstat",
            segment: self.name.clone(),
            source: e,
        })?;
        let path = shm_path(&self.name);
        match path.symlink_metadata() {
            Ok(m) if m.dev() == mine.dev() && m.ino() == mine.ino() => Self::unlink(&self.name),
            Ok(_) => Err(Error::Io {
                op: "unlink (the name now names another file; left alone)",
                segment: self.name.clone(),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::SegmentMissing {
                name: self.name.clone(),
            }),
            Err(e) => Err(Error::Io {
                op: "stat",
                segment: self.name.clone(),
                source: e,
            }),
        }
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
        if let Some(pid) = self.retired_by() {
            return Err(Error::SegmentRemoved {
                name: self.name.clone(),
                pid,
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

    /// A segment of one small region, `mode` and `owner`, nothing initialised.
    fn tiny(name: &str, mode: u32, owner: SegmentOwner) -> Result<Segment> {
        Segment::create(
            name,
            &[RegionSpec::of::<AtomicU64>(1)],
            &[0; PARAMS],
            mode,
            owner,
            |_| Ok(()),
        )
    }

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
            SegmentOwner::MeOrRoot,
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
        let seg = Segment::create(&name, &specs, &[3; PARAMS], 0o600, SegmentOwner::MeOrRoot, |s| {
            let r = s.region::<AtomicU64>(0)?;
            s.slice(r)[99].store(42, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert!(matches!(
            Segment::create(&name, &specs, &[0; PARAMS], 0o600, SegmentOwner::MeOrRoot, |_| Ok(())),
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
    fn owners_parse_from_names_and_uids() {
        assert_eq!(SegmentOwner::parse("", "k").unwrap(), SegmentOwner::MeOrRoot);
        assert_eq!(SegmentOwner::parse("root", "k").unwrap(), SegmentOwner::Uid(0));
        assert_eq!(SegmentOwner::parse(" 4242 ", "k").unwrap(), SegmentOwner::Uid(4242));
        match SegmentOwner::parse("no-such-user-x", "owner") {
            Err(Error::Config { key: "owner", why }) => assert!(why.contains("no user named"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(SegmentOwner::MeOrRoot.accepts(0));
        assert!(SegmentOwner::MeOrRoot.accepts(geteuid().as_raw()));
        assert!(
            !SegmentOwner::Uid(7).accepts(0),
            "a configured owner is the only one accepted"
        );
        assert_eq!(SegmentOwner::Uid(0).describe(), "root (uid 0)");
    }

    #[test]
    fn a_segment_created_for_another_owner_is_given_to_it() {
        if !geteuid().is_root() {
            eprintln!("shm tests: not root: cannot create a segment for another uid; checking the refusal only");
            let e = tiny(&unique("chown"), 0o600, SegmentOwner::Uid(geteuid().as_raw() + 1)).unwrap_err();
            assert!(matches!(e, Error::Io { op, .. } if op.starts_with("fchown")), "{e}");
            return;
        }
        let name = unique("chown");
        let seg = tiny(&name, 0o600, SegmentOwner::Uid(65534)).unwrap();
        let uid = std::fs::metadata(shm_path(&name)).unwrap().uid();
        let refused = Segment::open_as(&name, SegmentOwner::MeOrRoot).map(|_| ());
        let accepted = Segment::open_as(&name, SegmentOwner::Uid(65534)).map(|_| ());
        Segment::unlink(&name).unwrap();
        drop(seg);
        assert_eq!(uid, 65534);
        assert!(
            matches!(refused, Err(Error::SegmentWrongOwner { uid: 65534, .. })),
            "{refused:?}"
        );
        accepted.unwrap();
    }

    #[test]
    fn a_retired_segment_is_refused_and_unlink_self_removes_only_itself() {
        let name = unique("retired");
        let seg = tiny(&name, 0o600, SegmentOwner::MeOrRoot).unwrap();
        // Another file put under the name since: left alone.
        Segment::unlink(&name).unwrap();
        std::fs::write(shm_path(&name), b"someone else's").unwrap();
        assert!(seg.unlink_self().is_err());
        assert!(shm_path(&name).exists());
        std::fs::remove_file(shm_path(&name)).unwrap();
        drop(seg);

        let seg = tiny(&name, 0o600, SegmentOwner::MeOrRoot).unwrap();
        assert_eq!(seg.retired_by(), None);
        seg.retire();
        assert_eq!(seg.retired_by(), Some(std::process::id()));
        let e = Segment::open(&name).unwrap_err();
        assert!(
            matches!(e, Error::SegmentRemoved { pid, .. } if pid == std::process::id()),
            "{e}"
        );
        seg.unlink_self().unwrap();
        assert!(!shm_path(&name).exists());
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
        let _s = tiny(&name, 0o640, SegmentOwner::MeOrRoot).unwrap();
        let m = std::fs::metadata(shm_path(&name)).unwrap().permissions().mode() & 0o777;
        Segment::unlink(&name).unwrap();
        assert_eq!(m, 0o640);
    }
}
