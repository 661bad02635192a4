//! Owners: the client handles that hold and wait for locks.
//!
//! An owner is a record, never "the process": a process may open several handles, and closing any
//! unrelated file never drops anyone's locks. The record names its process by pid plus the
//! process's start time (field 22 of `/proc/PID/stat`), so a recycled pid is never mistaken for it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::pool::PoolState;

/// Owner record (64 bytes). Written under the owner-pool latch while the record is FREE, before
/// it turns LIVE; read by anyone.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Owner {
    /// Process id.
    pub pid: AtomicU32,
    /// [`OwnerKind`] as a number.
    pub kind: AtomicU32,
    /// Process start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_time: AtomicU64,
    /// Bumped each time the record is registered.
    pub gen: AtomicU32,
    /// Length of the label in bytes.
    pub label_len: AtomicU32,
    /// Free-form label (up to 24 bytes), e.g. a program name or a remote address.
    pub label: [AtomicU64; 3],
    /// Grants this owner took on the fast path (written only by the owner; summed by `stats`).
    pub fast_grants: AtomicU64,
    /// While REAPING: the pid of the process reaping this record (a reaper that dies is replaced).
    pub reaper: AtomicU32,
    /// When some process last checked whether this owner's process is alive: CLOCK_MONOTONIC
    /// (coarse) milliseconds, truncated to 32 bits. Claimed by a CAS, without a latch, by any
    /// process that finds a lock it wants held or waited on by this owner, so the owner's
    /// `/proc` entry is read at most once a poll period whoever asks, and however often.
    pub checked: AtomicU32,
}

// SAFETY: repr(C), atomics only, valid at zero, no pointers.
crate::shm::impl_shm_safe!(Owner);
const _: () = assert!(std::mem::size_of::<Owner>() == 64 && std::mem::align_of::<Owner>() == 8);

/// Maximum label length.
pub const LABEL_MAX: usize = 24;

/// Owner pool states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OwnerState {
    /// Unused.
    Free = 0,
    /// Registered by a handle (whose process may have died since: liveness is the process's).
    Live = 1,
    /// Its process died; a reaper is releasing what it held. Never re-registered until FREE.
    Reaping = 2,
}

impl PoolState for OwnerState {
    const COUNT: usize = 3;
    const POOL: &'static str = "owner";
    fn to_u32(self) -> u32 {
        self as u32
    }
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(OwnerState::Free),
            1 => Some(OwnerState::Live),
            2 => Some(OwnerState::Reaping),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            OwnerState::Free => "FREE",
            OwnerState::Live => "LIVE",
            OwnerState::Reaping => "REAPING",
        }
    }
}

/// What kind of client an owner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OwnerKind {
    /// A process on this machine using the library.
    Local = 1,
    /// A gateway session on behalf of a remote client.
    Remote = 2,
}

impl OwnerKind {
    /// From the stored number.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(OwnerKind::Local),
            2 => Some(OwnerKind::Remote),
            _ => None,
        }
    }
}

/// Identity of a process: pid plus start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId {
    /// The pid.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcessId {
    /// This process.
    pub fn current() -> ProcessId {
        let pid = std::process::id();
        ProcessId {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        }
    }

    /// Is this process still running? It is while any of its threads is: a thread-group leader
    /// that has exited (`pthread_exit`, or a Rust main thread that ended while others run) shows
    /// `Z` in `/proc/PID/stat` although the process still runs. A process is dead once every
    /// thread is gone (a zombie waiting to be reaped, or no such pid), and a pid now used by a
    /// process that started at another time (pid reuse) is not this process.
    pub fn is_alive(self) -> bool {
        match proc_stat(self.pid) {
            Some((state, start)) => (self.start_time == 0 || start == self.start_time) && running(self.pid, state),
            None => false,
        }
    }
}

/// The process that opened a client handle, to tell when the handle is used in a child after
/// `fork()`: the child inherits the handle's memory (its owner record's index, a gateway
/// session's socket) but is not its owner, so it must open its own. Comparing fork counts costs
/// one load, where `getpid()` would cost a system call on every lock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpenedBy {
    pid: u32,
    forks: u32,
}

impl OpenedBy {
    /// This process, now.
    pub(crate) fn now() -> OpenedBy {
        OpenedBy {
            forks: crate::shm::sys::forks(),
            pid: std::process::id(),
        }
    }

    /// Is this a child (forked since) of the process that opened the handle?
    #[inline(always)]
    pub(crate) fn forked(self) -> bool {
        // `now()` called `forks()`, which installed the handler that counts.
        crate::shm::sys::forks_watched() != self.forks
    }

    /// [`Error::ForkedClient`](crate::Error::ForkedClient) in a forked child.
    #[inline(always)]
    pub(crate) fn check(self) -> crate::Result<()> {
        if self.forked() {
            return Err(self.forked_error());
        }
        Ok(())
    }

    #[cold]
    fn forked_error(self) -> crate::Error {
        crate::Error::ForkedClient {
            opened_by: self.pid,
            pid: std::process::id(),
        }
    }
}

/// Start time of process `pid` (field 22 of /proc/PID/stat), or None if it does not exist.
pub fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// Is some process with this pid running (any of its threads not a zombie)? For ids that name a
/// process by pid only.
pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && proc_stat(pid).is_some_and(|(state, _)| running(pid, state))
}

/// Given the state letter of process `pid`'s thread-group leader: does any thread of it still
/// run? The leader's own state says so unless the leader has exited (`Z`/`X`); then the process
/// runs while another thread does. The kernel keeps an exited leader's `/proc/PID/task/PID` entry
/// until the whole group has exited, and reports the process's exit (pidfd readable, `waitpid`)
/// only then, so this agrees with the pidfd `shmlockd` watches.
fn running(pid: u32, leader: char) -> bool {
    if !matches!(leader, 'Z' | 'X') {
        return true;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    // Bounded by the process's own thread count (the kernel lists each thread once).
    let leader = pid.to_string();
    tasks.filter_map(|t| t.ok()).any(|t| {
        t.file_name().to_str() != Some(&leader)
            && read_stat(&t.path().join("stat")).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
    })
}

/// State letter (field 3) and start time (field 22) of process `pid`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    read_stat(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

/// State letter (field 3) and start time (field 22) from a `stat` file of `/proc`.
fn read_stat(path: &std::path::Path) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces and ')'; fields after the last ')' are plain.
    let mut rest = stat[stat.rfind(')')? + 1..].split_ascii_whitespace();
    // rest starts with field 3 (state); field 22 is the 20th field of rest.
    let state = rest.next()?.chars().next()?;
    Some((state, rest.nth(18)?.parse().ok()?))
}

impl Owner {
    /// Writes the label, truncated to [`LABEL_MAX`] bytes.
    pub fn set_label(&self, label: &[u8]) {
        let label = &label[..label.len().min(LABEL_MAX)];
        let mut buf = [0u8; LABEL_MAX];
        buf[..label.len()].copy_from_slice(label);
        for (i, w) in self.label.iter().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
            w.store(u64::from_le_bytes(b), Relaxed);
        }
        self.label_len.store(label.len() as u32, Relaxed);
    }

    /// Claims the liveness check of this owner if nobody has checked it within `period`
    /// (stamped `now_ms`, coarse-clock milliseconds). Returns whether the caller should check.
    pub fn claim_check(&self, now_ms: u32, period_ms: u32) -> bool {
        let last = self.checked.load(Relaxed);
        now_ms.wrapping_sub(last) >= period_ms && self.checked.compare_exchange(last, now_ms, Relaxed, Relaxed).is_ok()
    }

    /// The process this record names.
    pub fn process(&self) -> ProcessId {
        ProcessId {
            pid: self.pid.load(Relaxed),
            start_time: self.start_time.load(Relaxed),
        }
    }

    /// The label (lossy UTF-8).
    pub fn label(&self) -> String {
        let mut buf = [0u8; LABEL_MAX];
        for (i, w) in self.label.iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&w.load(Relaxed).to_le_bytes());
        }
        let n = (self.label_len.load(Relaxed) as usize).min(LABEL_MAX);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_stable_and_of_a_missing_pid_is_none() {
        let me = ProcessId::current();
        assert!(me.start_time > 0);
        assert_eq!(start_time(me.pid), Some(me.start_time));
        assert_eq!(start_time(u32::MAX - 1), None);
        assert!(me.is_alive());
        assert!(
            !ProcessId {
                start_time: me.start_time + 1,
                ..me
            }
            .is_alive(),
            "pid reuse"
        );
        assert!(pid_alive(me.pid) && !pid_alive(u32::MAX - 1));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId {
            pid: child.id(),
            start_time: start_time(child.id()).unwrap_or(0),
        };
        // Not waited for yet: it becomes a zombie once it exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while id.is_alive() {
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!pid_alive(id.pid));
        child.wait().unwrap();
    }

    #[test]
    fn label_round_trips_and_truncates() {
        let o = Owner::default();
        o.set_label(b"worker 7");
        assert_eq!(o.label(), "worker 7");
        o.set_label(&[b'x'; 40]);
        assert_eq!(o.label().len(), LABEL_MAX);
    }
}
