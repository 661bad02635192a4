//! The supervisor's side of the table: one supervisor per segment, and the reaper.
//!
//! The [`Reaper`] holds a pidfd for every process that has an owner record and waits on all of
//! them with one epoll: a process that dies (SIGKILL included) makes its pidfd readable at once,
//! and its owners are reaped in the same round. A registration bumps a futex word in the table;
//! a small thread sleeping on it pokes an eventfd in the same epoll, so a new owner's process is
//! watched at once. A full scan of the owner records every [`FULL_SCAN`] is the safety net for
//! anything missed. Pid reuse cannot
//! fool it: a pidfd names one process, and owner records carry the process start time.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::Capacities;
use crate::error::{Error, Result};
use crate::owner::ProcessId;
use crate::shm::sys::{futex_wait, pidfd_open};
use crate::table::{pid_latch_id, LockTable};

/// How often the reaper checks every owner record, whatever the pidfds say.
pub const FULL_SCAN: Duration = Duration::from_secs(1);

impl LockTable {
    /// Claims the segment for this process as its only supervisor. Fails with
    /// [`Error::SupervisorRunning`] if another live process holds the claim; takes over a claim
    /// left by a dead one.
    pub fn claim_supervisor(&self) -> Result<()> {
        let me = ProcessId::current();
        let _g = self.lock_owners();
        let hdr = self.table_hdr();
        let cur = ProcessId {
            pid: hdr.supervisor_pid.load(Relaxed),
            start_time: hdr.supervisor_start.load(Relaxed),
        };
        if cur.pid != 0 && cur != me && cur.is_alive() {
            return Err(Error::SupervisorRunning { pid: cur.pid });
        }
        hdr.supervisor_start.store(me.start_time, Relaxed);
        hdr.supervisor_pid.store(me.pid, Relaxed);
        Ok(())
    }

    /// Opens segment `name` for a supervisor to adopt: owned as `caps.owner` requires (see
    /// [`LockTable::open_as`]) and with no permission bit beyond `caps.mode`
    /// ([`Error::SegmentModeTooWide`]): a segment anyone may write is not one to supervise on
    /// a configuration that says otherwise.
    pub fn adopt(name: &str, caps: &Capacities) -> Result<LockTable> {
        let table = LockTable::open_as(name, caps.owner)?;
        if let Some(found) = table.segment().file_mode()? {
            if found & !caps.mode != 0 {
                return Err(Error::SegmentModeTooWide {
                    name: name.to_string(),
                    found,
                    allowed: caps.mode,
                });
            }
        }
        Ok(table)
    }

    /// Removes the segment's name from /dev/shm if no live process but this one has an owner
    /// record in it (`shmlockd --remove-on-exit`); otherwise leaves it and returns
    /// [`Error::SegmentInUse`] naming those processes.
    ///
    /// Owners of dead processes are reaped first: they are no users. The check, the retirement
    /// ([`Segment::retire`](crate::shm::Segment::retire)) and the unlink happen under the owner
    /// latch, which every registration also takes, and a registration refuses a retired segment
    /// ([`Error::SegmentRemoved`]). So every registration either happened before the check (it is
    /// seen, and the segment stays) or is refused: no process can go on locking in a segment
    /// whose name is gone while the next one locks in a new segment of the same name. A process
    /// that opened the segment before and registers after gets `SegmentRemoved` and may open the
    /// name again. Processes that only read it (`shmlock status`) have no owner and keep a
    /// mapping of the removed segment until they drop it.
    pub fn remove_if_unused(&self) -> Result<()> {
        let me = std::process::id();
        self.reap_dead(pid_latch_id())?;
        let _g = self.lock_owners();
        let pids: Vec<u32> = self
            .owner_processes()
            .into_iter()
            .filter(|p| p.pid != me && p.is_alive())
            .map(|p| p.pid)
            .collect();
        if !pids.is_empty() {
            return Err(Error::SegmentInUse {
                name: self.segment().name().to_string(),
                pids,
            });
        }
        self.segment().retire();
        self.segment().unlink_self()
    }

    /// Gives up this process's supervisor claim (if it holds it).
    pub fn release_supervisor(&self) {
        let _g = self.lock_owners();
        let hdr = self.table_hdr();
        if hdr.supervisor_pid.load(Relaxed) == std::process::id() {
            hdr.supervisor_pid.store(0, Relaxed);
            hdr.supervisor_start.store(0, Relaxed);
        }
    }

    /// The process that claimed the segment as supervisor, if any (it may have died since: see
    /// [`ProcessId::is_alive`]).
    pub fn supervisor(&self) -> Option<ProcessId> {
        let hdr = self.table_hdr();
        let pid = hdr.supervisor_pid.load(Relaxed);
        (pid != 0).then(|| ProcessId {
            pid,
            start_time: hdr.supervisor_start.load(Relaxed),
        })
    }

    /// Owner record `idx` (for inspection, and for tests that fake a recycled pid).
    pub fn owner_record(&self, idx: u32) -> Option<&crate::owner::Owner> {
        self.owners_slice().get(idx as usize)
    }

    /// Owners reaped since the segment was created.
    pub fn reaps(&self) -> u64 {
        self.table_hdr().reaps.load(Relaxed)
    }

    /// Processes with a LIVE owner record.
    pub(crate) fn owner_processes(&self) -> Vec<ProcessId> {
        let mut out: Vec<ProcessId> = self.live_owners().map(|o| o.process()).collect();
        out.sort_unstable_by_key(|p| (p.pid, p.start_time));
        out.dedup();
        out
    }

    pub(crate) fn registrations(&self) -> u32 {
        self.table_hdr().registrations.load(Relaxed)
    }
}

/// Epoll data of the registration eventfd (pids are below 2^22).
const REGISTERED: u64 = u64::MAX;

/// Watches owner processes and reaps the ones that die.
#[derive(Debug)]
pub struct Reaper {
    table: Arc<LockTable>,
    epoll: Epoll,
    watched: HashMap<u32, (ProcessId, OwnedFd)>,
    seen_registrations: Option<u32>,
    last_full: Instant,
    registered: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // The watcher thread sees this within one FULL_SCAN and ends.
        self.stop.store(true, Relaxed);
    }
}

impl Reaper {
    /// A reaper for `table`. Call [`run_once`](Self::run_once) in a loop.
    pub fn new(table: Arc<LockTable>) -> Result<Reaper> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| Error::io("epoll_create", "-", e))?;
        let registered = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| Error::io("eventfd", "-", e))?,
        );
        epoll
            .add(registered.as_ref(), EpollEvent::new(EpollFlags::EPOLLIN, REGISTERED))
            .map_err(|e| Error::io("epoll_ctl", "-", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (table, registered, stop) = (Arc::clone(&table), Arc::clone(&registered), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("registrations".into())
                .spawn(move || {
                    let word = &table.table_hdr().registrations;
                    while !stop.load(Relaxed) {
                        let seen = word.load(Relaxed);
                        futex_wait(word, seen, Some(FULL_SCAN));
                        if word.load(Relaxed) != seen {
                            let _ = registered.write(1);
                        }
                    }
                })
                .map_err(|e| Error::Io {
                    op: "spawn the registration watcher",
                    segment: "-".into(),
                    source: e,
                })?;
        }
        Ok(Reaper {
            table,
            epoll,
            watched: HashMap::new(),
            seen_registrations: None,
            last_full: Instant::now(),
            registered,
            stop,
        })
    }

    /// Processes currently watched through a pidfd.
    pub fn watched(&self) -> usize {
        self.watched.len()
    }

    /// One round: waits up to `timeout` for a watched process to exit, reaps whatever died,
    /// and starts watching owners registered since the last round. Returns owners reaped.
    pub fn run_once(&mut self, timeout: Duration) -> Result<usize> {
        let mut reaped = 0;
        let mut events = [EpollEvent::empty(); 64];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let n = match self.epoll.wait(&mut events, EpollTimeout::from(ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(Error::io("epoll_wait", "-", e)),
        };
        for ev in &events[..n] {
            if ev.data() == REGISTERED {
                let _ = self.registered.read();
                continue;
            }
            let pid = ev.data() as u32;
            if let Some((_, fd)) = self.watched.remove(&pid) {
                let _ = self.epoll.delete(&fd);
            }
            reaped += self.table.reap_pid(pid, pid_latch_id())?;
        }
        let regs = self.table.registrations();
        if self.seen_registrations != Some(regs) {
            self.seen_registrations = Some(regs);
            reaped += self.watch_new()?;
        }
        if self.last_full.elapsed() >= FULL_SCAN {
            self.last_full = Instant::now();
            reaped += self.table.reap_dead(pid_latch_id())?;
            reaped += self.watch_new()?;
        }
        Ok(reaped)
    }

    /// Opens pidfds for owner processes not yet watched, and closes those of processes that no
    /// longer have an owner. A process that is already gone is reaped now.
    fn watch_new(&mut self) -> Result<usize> {
        let procs = self.table.owner_processes();
        let mut reaped = 0;
        for p in &procs {
            if self.watched.get(&p.pid).is_some_and(|(w, _)| w == p) {
                continue;
            }
            if let Some((_, fd)) = self.watched.remove(&p.pid) {
                let _ = self.epoll.delete(&fd);
            }
            let fd = match pidfd_open(p.pid) {
                Ok(fd) => fd,
                Err(_) => {
                    reaped += self.table.reap_pid(p.pid, pid_latch_id())?;
                    continue;
                }
            };
            // The pidfd names whatever process has the pid now: it must be the owner's.
            if !p.is_alive() {
                reaped += self.table.reap_pid(p.pid, pid_latch_id())?;
                continue;
            }
            let ev = EpollEvent::new(EpollFlags::EPOLLIN, u64::from(p.pid));
            self.epoll.add(&fd, ev).map_err(|e| Error::io("epoll_ctl", "-", e))?;
            self.watched.insert(p.pid, (*p, fd));
        }
        let gone: Vec<u32> = self
            .watched
            .keys()
            .copied()
            .filter(|pid| procs.binary_search_by_key(pid, |p| p.pid).is_err())
            .collect();
        for pid in gone {
            if let Some((_, fd)) = self.watched.remove(&pid) {
                let _ = self.epoll.delete(&fd);
            }
        }
        Ok(reaped)
    }
}
