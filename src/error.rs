//! The library's one error type.
//!
//! Ordinary outcomes (`WouldBlock`, `TimedOut`, `AlreadyHeld`) are kept apart from failures of the
//! segment or the system; every variant carries what was found and, where it applies, what was
//! expected.

use std::fmt;
use std::time::Duration;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who held a lock when a wait for it timed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    /// Process id of the (first) holder.
    pub pid: u32,
    /// The holder's owner label (may be empty).
    pub label: String,
    /// How long it had held the lock.
    pub held_for: Duration,
    /// Number of holders (more than one in shared mode).
    pub holders: u32,
}

impl fmt::Display for HolderInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "held by pid {}", self.pid)?;
        if !self.label.is_empty() {
            write!(f, " ({})", self.label)?;
        }
        write!(f, " for {}", crate::clock::human(self.held_for))?;
        if self.holders > 1 {
            write!(f, " with {} other holders", self.holders - 1)?;
        }
        Ok(())
    }
}

/// Everything that can go wrong in shmlock.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A lock name is empty or longer than the segment allows.
    #[error("lock name is {len} bytes; names must be 1..={max} bytes")]
    NameInvalid {
        /// Length of the rejected name.
        len: usize,
        /// The segment's maximum name length.
        max: usize,
    },
    /// A segment name is not of the form `/name`.
    #[error("segment name {name:?} is invalid: {why}")]
    SegmentNameInvalid {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A fixed-size pool has no free record left. Nothing held is lost; the pools are sized
    /// when the segment is created.
    #[error(
        "{pool} pool is full ({capacity} records{}): raise {} in shmlockd's configuration; it takes \
         effect in a new segment (stop shmlockd, remove the segment, start it again)",
        shard.map(|s| format!(" in shard {s}")).unwrap_or_default(),
        pool_setting(pool)
    )]
    PoolFull {
        /// Which pool: "lock entry", "hold/wait" or "owner".
        pool: &'static str,
        /// The shard, for per-shard pools.
        shard: Option<u32>,
        /// The pool's capacity (per shard for per-shard pools).
        capacity: u32,
    },
    /// `try_lock`: the lock is held in a conflicting mode (or fairness queues this request).
    #[error("lock is busy")]
    WouldBlock,
    /// A timed lock request gave up.
    #[error("timed out after {} waiting for the lock{}", crate::clock::human(*waited), holder.as_ref().map(|h| format!(", {h}")).unwrap_or_default())]
    TimedOut {
        /// How long the request waited.
        waited: Duration,
        /// Who held the lock at the deadline, if anyone.
        holder: Option<HolderInfo>,
    },
    /// A waiting request was withdrawn on its owner's behalf: the owner's locks were released
    /// (its handle or session was closed) while the request waited.
    #[error("the lock request was cancelled: its owner's locks were released")]
    Cancelled,
    /// A wait was given up because its caller asked to (a signal such as Ctrl-C, in a binding
    /// that checks for one while it waits): the request was withdrawn and nothing is held.
    #[error("the wait for the lock was interrupted; the request was withdrawn")]
    Interrupted,
    /// A client handle was used in a child process after `fork()`. The handle belongs to the
    /// process that opened it (its locks are that process's): the child must open its own.
    #[error(
        "this client was opened by process {opened_by} and cannot be used after fork() in process \
         {pid}: open a new client in the child (the parent's locks stay the parent's)"
    )]
    ForkedClient {
        /// The process that opened the handle.
        opened_by: u32,
        /// This process (the child).
        pid: u32,
    },
    /// Another live process already supervises the segment.
    #[error("segment is already supervised by shmlockd pid {pid}")]
    SupervisorRunning {
        /// The running supervisor's pid.
        pid: u32,
    },
    /// This owner already holds the lock (re-locking is an error, never a self-deadlock).
    #[error("this owner already holds the lock")]
    AlreadyHeld,
    /// An unlock for a grant this owner does not (or no longer) hold.
    #[error("this owner does not hold the lock")]
    NotHeld,
    /// The segment does not start with shmlock's magic number.
    #[error("not a shmlock segment: found magic {found:#018x}, expected {expected:#018x}")]
    WrongMagic {
        /// The magic found.
        found: u64,
        /// The magic expected.
        expected: u64,
    },
    /// The segment was made by a build with another layout.
    #[error("segment has layout version {found}, this build expects {expected}")]
    WrongVersion {
        /// The version found.
        found: u32,
        /// The version expected.
        expected: u32,
    },
    /// The segment is smaller than its header says it must be.
    #[error("segment is {size} bytes but needs {needed}")]
    SegmentTooSmall {
        /// The size found.
        size: u64,
        /// The size needed.
        needed: u64,
    },
    /// No segment of that name exists.
    #[error("segment {name} does not exist: start shmlockd, which creates it (`shmlockd --segment {name}`)")]
    SegmentMissing {
        /// The segment name.
        name: String,
    },
    /// A segment of that name already exists.
    #[error("segment {name} already exists")]
    SegmentExists {
        /// The segment name.
        name: String,
    },
    /// The segment's file belongs to a user this process does not accept (see
    /// [`SegmentOwner`](crate::shm::SegmentOwner)): whoever owns it can rewrite the table,
    /// release others' locks, or remove it.
    #[error(
        "segment {name} (/dev/shm{name}) is owned by {owner}, expected {expected}: refusing it \
         (if that owner is trusted, name it with --segment-owner or $SHMLOCK_SEGMENT_OWNER; \
         otherwise remove the file)"
    )]
    SegmentWrongOwner {
        /// The segment name.
        name: String,
        /// The owner's uid.
        uid: u32,
        /// The owner, as `name (uid N)`.
        owner: String,
        /// Who was expected, as `name (uid N)` or two of them joined by `or`.
        expected: String,
    },
    /// The segment's name in /dev/shm is a symbolic link, which is never followed.
    #[error(
        "segment {name} (/dev/shm{name}) is a symbolic link{}: refusing to follow it",
        target.as_ref().map(|t| format!(" to {t}")).unwrap_or_default()
    )]
    SegmentSymlink {
        /// The segment name.
        name: String,
        /// Where it points, if readable.
        target: Option<String>,
    },
    /// The segment's name in /dev/shm is not a regular file (a directory, a FIFO, ...).
    #[error("segment {name} (/dev/shm{name}) is {kind}, not a regular file: refusing it")]
    SegmentNotRegular {
        /// The segment name.
        name: String,
        /// What it is instead, e.g. "a directory".
        kind: &'static str,
    },
    /// The segment's file has more than one name (a hard link made to it, or by it).
    #[error(
        "segment {name} (/dev/shm{name}) has {links} hard links; a segment has exactly one: \
         refusing it"
    )]
    SegmentLinked {
        /// The segment name.
        name: String,
        /// The link count found.
        links: u64,
    },
    /// `shmlockd` adopting a segment whose permissions are wider than it is configured with.
    #[error(
        "segment {name} (/dev/shm{name}) has mode {found:#o}, wider than the configured mode \
         {allowed:#o}: refusing to adopt it (narrow it with chmod, or configure its mode)"
    )]
    SegmentModeTooWide {
        /// The segment name.
        name: String,
        /// The file's permission bits.
        found: u32,
        /// The configured mode.
        allowed: u32,
    },
    /// `--remove-on-exit`: live processes other than the supervisor still have owners in the
    /// segment, so it is left in place.
    #[error(
        "segment {name} is still used by pid {}: not removing it (its users would go on with a \
         table that nobody else can open)",
        pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    )]
    SegmentInUse {
        /// The segment name.
        name: String,
        /// The processes that still have owner records in it.
        pids: Vec<u32>,
    },
    /// The segment was retired by its supervisor (`shmlockd --remove-on-exit`) and is being
    /// removed: it takes no new owners.
    #[error(
        "segment {name} was retired by shmlockd pid {pid} (--remove-on-exit) and takes no new \
         users: open it again once shmlockd has restarted"
    )]
    SegmentRemoved {
        /// The segment name.
        name: String,
        /// The supervisor that retired it.
        pid: u32,
    },
    /// Something in the segment contradicts its invariants.
    #[error("segment corrupt: {what}")]
    Corrupt {
        /// What was found.
        what: String,
    },
    /// A pool state transition named the wrong old state.
    #[error("{pool} record {index}: expected state {expected} but found {found}")]
    WrongState {
        /// The pool.
        pool: &'static str,
        /// The record.
        index: u32,
        /// The state the caller expected.
        expected: &'static str,
        /// The state the record was in.
        found: &'static str,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {key}: {why}")]
    Config {
        /// The key.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The gateway refused a request with one of the protocol's own error codes (see
    /// docs/PROTOCOL.md): those with a library variant of their own (`BUSY` is
    /// [`WouldBlock`](Error::WouldBlock), `TIMEOUT` is [`TimedOut`](Error::TimedOut), ...) come
    /// as that variant instead ([`crate::proto::error_of`]).
    #[error("gateway error {code}: {message}")]
    Remote {
        /// The protocol's error code, e.g. [`ErrorCode::TooManyLocks`](crate::proto::ErrorCode::TooManyLocks).
        code: crate::proto::ErrorCode,
        /// The gateway's message.
        message: String,
    },
    /// The gateway speaks another version of the protocol than this client.
    #[error("gateway {addr} speaks shmlock protocol version {found}; this client speaks version {expected}")]
    ProtocolVersion {
        /// The gateway's address.
        addr: String,
        /// The version its greeting names.
        found: u32,
        /// The version of this client.
        expected: u32,
    },
    /// The connection to the gateway failed, closed, or carried something unexpected.
    #[error("gateway {addr}: {why}")]
    Connection {
        /// The gateway's address.
        addr: String,
        /// What happened.
        why: String,
    },
    /// A lock was lost while it was held or waited for: its backend's session ended without an
    /// unlock (an etcd lease that expired or could not be renewed in time). The lock may now be
    /// another's: stop using what it protected.
    #[error("the lock was lost: {why}")]
    Lost {
        /// What ended the session.
        why: String,
    },
    /// The etcd cluster refused a request or could not be reached (feature `etcd`).
    #[error("etcd {endpoints}: {why}")]
    Etcd {
        /// The endpoints of the cluster, joined by commas.
        endpoints: String,
        /// What happened.
        why: String,
    },
    /// A system call failed.
    #[error("{op} failed{}", for_segment(.segment))]
    Io {
        /// The operation.
        op: &'static str,
        /// The segment involved (empty for a socket of the gateway).
        segment: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The setting (config key and shmlockd flag) that sizes the pool named `pool`.
fn pool_setting(pool: &str) -> &'static str {
    match pool {
        "lock entry" => "max_locks (--max-locks)",
        "hold/wait" => "max_holds (--max-holds)",
        "owner" => "max_owners (--max-owners)",
        _ => "its capacity",
    }
}

/// " for segment NAME", or nothing for an operation on no segment (the gateway's socket).
fn for_segment(segment: &str) -> String {
    if segment.is_empty() {
        String::new()
    } else {
        format!(" for segment {segment}")
    }
}

impl Error {
    pub(crate) fn io(op: &'static str, segment: &str, errno: nix::errno::Errno) -> Self {
        Error::Io {
            op,
            segment: segment.to_string(),
            source: std::io::Error::from(errno),
        }
    }
}
