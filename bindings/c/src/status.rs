//! The status codes, the mapping of every library [`Error`] to one, and the thread-local record
//! of the last failure (its message and OS error).

use std::cell::RefCell;
use std::ffi::c_char;

use shmlock_core::proto::ErrorCode;
use shmlock_core::Error;

/// What a call of this library did. `SHMLOCK_OK` (0) is success; every other value names a
/// failure, and `shmlock_last_error_message()` then describes it in full. New codes may be
/// added at the end in later versions: treat an unknown one as a failure.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmlock_status {
    /// Success.
    SHMLOCK_OK = 0,
    /// A lock request that was not to wait (`SHMLOCK_NO_WAIT`) found the lock held in a
    /// conflicting mode, or others queued for it. Nothing is held.
    SHMLOCK_WOULD_BLOCK = 1,
    /// A timed lock request gave up at its deadline; the message names the holder, where known.
    /// Nothing is held.
    SHMLOCK_TIMED_OUT = 2,
    /// This client already holds the lock (re-locking is an error, never a self-deadlock).
    SHMLOCK_ALREADY_HELD = 3,
    /// An unlock of a lock this client no longer holds (taken away by `shmlock release
    /// --force`, or a remote session that ended).
    SHMLOCK_NOT_HELD = 4,
    /// A lock name is empty, longer than the segment allows, or (through a gateway) has a space
    /// or a control byte.
    SHMLOCK_BAD_NAME = 5,
    /// The lock table has no room left (locks, holds or owners), or the gateway's table is full.
    SHMLOCK_TABLE_FULL = 6,
    /// No segment of that name exists: start `shmlockd`, or name the right segment.
    SHMLOCK_SEGMENT_MISSING = 7,
    /// The client (or the lock) was opened by another process: this process is a child made by
    /// `fork()`. The child must open a client of its own; the parent's locks stay the parent's.
    SHMLOCK_FORKED = 8,
    /// An interruptible wait was given up because its callback asked to. Nothing is held.
    SHMLOCK_INTERRUPTED = 9,
    /// A wait was withdrawn because its owner's locks were released meanwhile.
    SHMLOCK_CANCELLED = 10,
    /// A segment name is not of the form `/name`.
    SHMLOCK_BAD_SEGMENT_NAME = 11,
    /// The segment is not a shmlock segment, or is smaller than its header says.
    SHMLOCK_SEGMENT_INVALID = 12,
    /// The segment was made by a build with another layout version.
    SHMLOCK_SEGMENT_VERSION = 13,
    /// The segment's file is refused for safety: owned by an unexpected user, a symbolic link,
    /// not a regular file, hard-linked, or with too wide a mode.
    SHMLOCK_SEGMENT_REFUSED = 14,
    /// The segment was retired by its supervisor (`shmlockd --remove-on-exit`) or is still in
    /// use where it should not be; open it again once `shmlockd` has restarted.
    SHMLOCK_SEGMENT_RETIRED = 15,
    /// A segment of that name exists already.
    SHMLOCK_SEGMENT_EXISTS = 16,
    /// Another live process already supervises the segment.
    SHMLOCK_SUPERVISOR_RUNNING = 17,
    /// The segment contradicts its own invariants.
    SHMLOCK_CORRUPT = 18,
    /// A configuration value is out of range.
    SHMLOCK_CONFIG = 19,
    /// A system call failed: `shmlock_last_os_error()` gives its errno.
    SHMLOCK_IO = 20,
    /// The connection to the gateway failed, closed, or carried something unexpected.
    SHMLOCK_CONNECTION = 21,
    /// The gateway speaks another version of the protocol.
    SHMLOCK_PROTOCOL_VERSION = 22,
    /// The gateway wants authentication, or refused the token.
    SHMLOCK_AUTH = 23,
    /// A limit of the gateway: locks or waits per session, or waits in all.
    SHMLOCK_LIMIT = 24,
    /// The gateway refused the request with another of its error codes (in the message).
    SHMLOCK_REMOTE = 25,
    /// A null pointer where one is not allowed, an unknown mode, a string that is not UTF-8
    /// where one must be. Nothing was done.
    SHMLOCK_INVALID_ARGUMENT = 26,
    /// A bug: the library panicked. The panic was caught at the boundary (nothing unwinds into
    /// C); the message says what happened. The client may be left in any state but a memory-safe
    /// one: close it.
    SHMLOCK_PANIC = 27,
    /// A failure this version of the header has no code for (a newer library's error).
    SHMLOCK_ERROR = 28,
}

use shmlock_status::*;

/// The highest status code (for tables indexed by status).
pub(crate) const LAST_STATUS: i32 = SHMLOCK_ERROR as i32;

/// Why a call failed.
pub(crate) enum Failure {
    /// The library said no.
    Lib(Error),
    /// The caller's arguments: `SHMLOCK_INVALID_ARGUMENT`.
    Invalid(String),
    /// A panic, caught.
    Panic(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Lib(e)
    }
}

/// `SHMLOCK_INVALID_ARGUMENT` with `why`.
pub(crate) fn invalid(why: impl Into<String>) -> Failure {
    Failure::Invalid(why.into())
}

/// The status of a library error.
pub(crate) fn status_of(e: &Error) -> shmlock_status {
    match e {
        Error::NameInvalid { .. } => SHMLOCK_BAD_NAME,
        Error::SegmentNameInvalid { .. } => SHMLOCK_BAD_SEGMENT_NAME,
        Error::PoolFull { .. } => SHMLOCK_TABLE_FULL,
        Error::WouldBlock => SHMLOCK_WOULD_BLOCK,
        Error::TimedOut { .. } => SHMLOCK_TIMED_OUT,
        Error::Cancelled => SHMLOCK_CANCELLED,
        Error::Interrupted => SHMLOCK_INTERRUPTED,
        Error::ForkedClient { .. } => SHMLOCK_FORKED,
        Error::SupervisorRunning { .. } => SHMLOCK_SUPERVISOR_RUNNING,
        Error::AlreadyHeld => SHMLOCK_ALREADY_HELD,
        Error::NotHeld => SHMLOCK_NOT_HELD,
        Error::WrongMagic { .. } | Error::SegmentTooSmall { .. } => SHMLOCK_SEGMENT_INVALID,
        Error::WrongVersion { .. } => SHMLOCK_SEGMENT_VERSION,
        Error::SegmentMissing { .. } => SHMLOCK_SEGMENT_MISSING,
        Error::SegmentExists { .. } => SHMLOCK_SEGMENT_EXISTS,
        Error::SegmentWrongOwner { .. }
        | Error::SegmentSymlink { .. }
        | Error::SegmentNotRegular { .. }
        | Error::SegmentLinked { .. }
        | Error::SegmentModeTooWide { .. } => SHMLOCK_SEGMENT_REFUSED,
        Error::SegmentInUse { .. } | Error::SegmentRemoved { .. } => SHMLOCK_SEGMENT_RETIRED,
        Error::Corrupt { .. } | Error::WrongState { .. } => SHMLOCK_CORRUPT,
        Error::Config { .. } => SHMLOCK_CONFIG,
        Error::Remote { code, .. } => match code {
            ErrorCode::BadName => SHMLOCK_BAD_NAME,
            ErrorCode::TableFull => SHMLOCK_TABLE_FULL,
            ErrorCode::AuthRequired | ErrorCode::AuthFailed => SHMLOCK_AUTH,
            ErrorCode::TooManyLocks | ErrorCode::TooManyWaits | ErrorCode::ServerBusy => SHMLOCK_LIMIT,
            ErrorCode::AlreadyHeld | ErrorCode::AlreadyWaiting => SHMLOCK_ALREADY_HELD,
            ErrorCode::NotHeld => SHMLOCK_NOT_HELD,
            ErrorCode::Busy => SHMLOCK_WOULD_BLOCK,
            ErrorCode::Timeout => SHMLOCK_TIMED_OUT,
            ErrorCode::Cancelled => SHMLOCK_CANCELLED,
            _ => SHMLOCK_REMOTE,
        },
        Error::ProtocolVersion { .. } => SHMLOCK_PROTOCOL_VERSION,
        Error::Connection { .. } => SHMLOCK_CONNECTION,
        Error::Io { .. } => SHMLOCK_IO,
        _ => SHMLOCK_ERROR,
    }
}

/// The OS error (errno) behind a library error, if there is one.
fn os_error_of(e: &Error) -> i32 {
    match e {
        Error::Io { source, .. } => source.raw_os_error().unwrap_or(0),
        _ => 0,
    }
}

/// The last failure of this thread.
struct Last {
    /// Its message, without a NUL.
    message: Vec<u8>,
    /// Its errno, or 0.
    os_error: i32,
}

thread_local! {
    static LAST: RefCell<Last> = const {
        RefCell::new(Last {
            message: Vec::new(),
            os_error: 0,
        })
    };
}

/// Records `f` as this thread's last failure; returns its status.
pub(crate) fn record(f: Failure) -> shmlock_status {
    let (status, message, os_error) = match f {
        Failure::Lib(e) => (status_of(&e), e.to_string(), os_error_of(&e)),
        Failure::Invalid(why) => (SHMLOCK_INVALID_ARGUMENT, format!("invalid argument: {why}"), 0),
        Failure::Panic(what) => (
            SHMLOCK_PANIC,
            format!("shmlock panicked (a bug; please report it): {what}"),
            0,
        ),
    };
    // A thread being torn down has no record left: the status alone says it.
    let _ = LAST.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            l.message.clear();
            // The message goes to C as a string: no NUL inside it.
            l.message.extend(message.bytes().map(|b| if b == 0 { b'?' } else { b }));
            l.os_error = os_error;
        }
    });
    status
}

/// Copies this thread's last message into `buf` (`len` bytes), NUL-terminated and cut to fit;
/// returns its full length (without the NUL).
///
/// # Safety
/// `buf` is null with `len` 0, or valid for writes of `len` bytes.
pub(crate) unsafe fn copy_message(buf: *mut c_char, len: usize) -> usize {
    LAST.try_with(|l| {
        let Ok(l) = l.try_borrow() else { return 0 };
        let msg = &l.message;
        if !buf.is_null() && len > 0 {
            let n = msg.len().min(len - 1);
            // SAFETY: the caller gives `len` writable bytes at `buf`; `n + 1 <= len`, and `msg`
            // is our own buffer, which cannot overlap the caller's.
            unsafe {
                std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        msg.len()
    })
    .unwrap_or(0)
}

/// This thread's last OS error, or 0.
pub(crate) fn last_os_error() -> i32 {
    LAST.try_with(|l| l.try_borrow().map(|l| l.os_error).unwrap_or(0))
        .unwrap_or(0)
}

/// The enumerator's name of status `s`, NUL-terminated; "SHMLOCK_UNKNOWN" for another value.
pub(crate) fn name_of(s: i32) -> &'static [u8] {
    const NAMES: [&[u8]; LAST_STATUS as usize + 1] = [
        b"SHMLOCK_OK\0",
        b"SHMLOCK_WOULD_BLOCK\0",
        b"SHMLOCK_TIMED_OUT\0",
        b"SHMLOCK_ALREADY_HELD\0",
        b"SHMLOCK_NOT_HELD\0",
        b"SHMLOCK_BAD_NAME\0",
        b"SHMLOCK_TABLE_FULL\0",
        b"SHMLOCK_SEGMENT_MISSING\0",
        b"SHMLOCK_FORKED\0",
        b"SHMLOCK_INTERRUPTED\0",
        b"SHMLOCK_CANCELLED\0",
        b"SHMLOCK_BAD_SEGMENT_NAME\0",
        b"SHMLOCK_SEGMENT_INVALID\0",
        b"SHMLOCK_SEGMENT_VERSION\0",
        b"SHMLOCK_SEGMENT_REFUSED\0",
        b"SHMLOCK_SEGMENT_RETIRED\0",
        b"SHMLOCK_SEGMENT_EXISTS\0",
        b"SHMLOCK_SUPERVISOR_RUNNING\0",
        b"SHMLOCK_CORRUPT\0",
        b"SHMLOCK_CONFIG\0",
        b"SHMLOCK_IO\0",
        b"SHMLOCK_CONNECTION\0",
        b"SHMLOCK_PROTOCOL_VERSION\0",
        b"SHMLOCK_AUTH\0",
        b"SHMLOCK_LIMIT\0",
        b"SHMLOCK_REMOTE\0",
        b"SHMLOCK_INVALID_ARGUMENT\0",
        b"SHMLOCK_PANIC\0",
        b"SHMLOCK_ERROR\0",
    ];
    usize::try_from(s)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or(b"SHMLOCK_UNKNOWN\0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_enumerators() {
        for (s, n) in [
            (SHMLOCK_OK, "SHMLOCK_OK"),
            (SHMLOCK_FORKED, "SHMLOCK_FORKED"),
            (SHMLOCK_INVALID_ARGUMENT, "SHMLOCK_INVALID_ARGUMENT"),
            (SHMLOCK_ERROR, "SHMLOCK_ERROR"),
        ] {
            assert_eq!(name_of(s as i32), format!("{n}\0").as_bytes());
            assert_eq!(format!("{s:?}"), n);
        }
        assert_eq!(name_of(-1), b"SHMLOCK_UNKNOWN\0");
        assert_eq!(name_of(LAST_STATUS + 1), b"SHMLOCK_UNKNOWN\0");
    }

    #[test]
    fn each_error_family_has_its_status() {
        let seg = || "/s".to_string();
        let cases = [
            (Error::NameInvalid { len: 0, max: 64 }, SHMLOCK_BAD_NAME),
            (
                Error::SegmentNameInvalid { name: seg(), why: "x" },
                SHMLOCK_BAD_SEGMENT_NAME,
            ),
            (
                Error::PoolFull {
                    pool: "owner",
                    shard: None,
                    capacity: 1,
                },
                SHMLOCK_TABLE_FULL,
            ),
            (Error::WouldBlock, SHMLOCK_WOULD_BLOCK),
            (
                Error::TimedOut {
                    waited: std::time::Duration::ZERO,
                    holder: None,
                },
                SHMLOCK_TIMED_OUT,
            ),
            (Error::Cancelled, SHMLOCK_CANCELLED),
            (Error::Interrupted, SHMLOCK_INTERRUPTED),
            (Error::ForkedClient { opened_by: 1, pid: 2 }, SHMLOCK_FORKED),
            (Error::AlreadyHeld, SHMLOCK_ALREADY_HELD),
            (Error::NotHeld, SHMLOCK_NOT_HELD),
            (Error::WrongMagic { found: 0, expected: 1 }, SHMLOCK_SEGMENT_INVALID),
            (Error::WrongVersion { found: 0, expected: 1 }, SHMLOCK_SEGMENT_VERSION),
            (Error::SegmentMissing { name: seg() }, SHMLOCK_SEGMENT_MISSING),
            (Error::SegmentExists { name: seg() }, SHMLOCK_SEGMENT_EXISTS),
            (
                Error::SegmentSymlink {
                    name: seg(),
                    target: None,
                },
                SHMLOCK_SEGMENT_REFUSED,
            ),
            (Error::SegmentRemoved { name: seg(), pid: 1 }, SHMLOCK_SEGMENT_RETIRED),
            (Error::Corrupt { what: "x".into() }, SHMLOCK_CORRUPT),
            (
                Error::Remote {
                    code: ErrorCode::AuthFailed,
                    message: String::new(),
                },
                SHMLOCK_AUTH,
            ),
            (
                Error::Remote {
                    code: ErrorCode::TooManyLocks,
                    message: String::new(),
                },
                SHMLOCK_LIMIT,
            ),
            (
                Error::Remote {
                    code: ErrorCode::Internal,
                    message: String::new(),
                },
                SHMLOCK_REMOTE,
            ),
            (
                Error::Connection {
                    addr: "a".into(),
                    why: "b".into(),
                },
                SHMLOCK_CONNECTION,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(status_of(&e), want, "{e:?}");
        }
    }

    #[test]
    fn an_os_error_and_the_message_are_kept_per_thread() {
        let e = Error::Io {
            op: "open",
            segment: "/s".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(record(Failure::Lib(e)), SHMLOCK_IO);
        assert_eq!(last_os_error(), libc::EACCES);
        let mut buf = [0x55 as c_char; 8];
        // SAFETY: `buf` has 8 writable bytes.
        let n = unsafe { copy_message(buf.as_mut_ptr(), buf.len()) };
        assert_eq!(n, "open failed for segment /s".len());
        assert_eq!(buf[7], 0, "cut to fit and NUL-terminated");
        std::thread::spawn(|| assert_eq!(last_os_error(), 0)).join().unwrap();
        assert_eq!(record(invalid("x")), SHMLOCK_INVALID_ARGUMENT);
        assert_eq!(last_os_error(), 0, "a later failure without one clears it");
    }
}
