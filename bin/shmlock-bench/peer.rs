//! The systems under test behind one small trait (parking_lot's benchmark pattern).
//!
//! A peer is built over a fixed set of lock names and addresses them by index, so the timed loops
//! do no formatting or allocation. The loops are generic over `P: Peer` (static dispatch): each
//! peer's calls are inlined into its own copy of the loop, and none pays for a virtual call.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use shmlock::prelude::*;
use shmlock::remote::RemoteClient;
use shmlock::Client;

use crate::raw::RawConn;
use crate::sys;

/// A lock system under test.
pub(crate) trait Peer {
    /// Its name in the output.
    fn name(&self) -> &'static str;
    /// Locks name `i` exclusively, waiting as long as it takes.
    fn lock(&mut self, i: usize) -> Result<()>;
    /// Unlocks name `i`, locked by this peer.
    fn unlock(&mut self, i: usize) -> Result<()>;
    /// Locks name `i` exclusively and unlocks it again, as a caller with nothing to do in
    /// between writes it (for a guard-based API: the guard on the stack, not stored away).
    #[inline]
    fn pair(&mut self, i: usize) -> Result<()> {
        self.lock(i)?;
        self.unlock(i)
    }
    /// `depth` x { lock name `i`; unlock it } sent in one batch before any answer is read, as
    /// redis-benchmark -P does. Only systems with a network protocol can.
    fn pipelined(&mut self, i: usize, depth: usize) -> Result<()> {
        let _ = (i, depth);
        bail!("{} has no pipelining (--pipeline is for remote and redis)", self.name())
    }
}

/// shmlock through the public [`Locker`] contract, written once for both backends: a local
/// [`Client`] (`client.lock(name)` in the segment) and a [`RemoteClient`] (`client.lock(name)`
/// over TCP; `guard.unlock()` waits for the answer, so each pair is two round trips). Unlock
/// goes through the guard. A gateway's pipelined batches go over a second, bare connection
/// ([`RawConn`]) opened at the first batch.
pub(crate) struct LockerPeer<'c, L: Locker> {
    label: &'static str,
    client: &'c L,
    names: Vec<String>,
    guards: Vec<Option<L::Guard<&'c L>>>,
    /// The gateway's address, for pipelined batches (None: a local client, which has none).
    addr: Option<String>,
    raw: Option<RawConn>,
}

impl<'c, L: Locker> LockerPeer<'c, L> {
    fn with(label: &'static str, client: &'c L, addr: Option<&str>, names: Vec<String>) -> Self {
        let mut guards = Vec::with_capacity(names.len());
        guards.resize_with(names.len(), || None);
        LockerPeer {
            label,
            client,
            names,
            guards,
            addr: addr.map(str::to_string),
            raw: None,
        }
    }
}

impl<'c> LockerPeer<'c, Client> {
    /// The local peer, named `shmlock` in the output.
    pub(crate) fn local(client: &'c Client, names: Vec<String>) -> Self {
        Self::with("shmlock", client, None, names)
    }
}

impl<'c> LockerPeer<'c, RemoteClient> {
    /// The gateway peer at `addr`, named `remote` in the output.
    pub(crate) fn remote(client: &'c RemoteClient, addr: &str, names: Vec<String>) -> Self {
        Self::with("remote", client, Some(addr), names)
    }
}

impl<L: Locker> Peer for LockerPeer<'_, L> {
    fn name(&self) -> &'static str {
        self.label
    }

    #[inline]
    fn lock(&mut self, i: usize) -> Result<()> {
        let g = self.client.lock(self.names[i].as_bytes())?;
        self.guards[i] = Some(g);
        Ok(())
    }

    #[inline]
    fn unlock(&mut self, i: usize) -> Result<()> {
        let g = self.guards[i]
            .take()
            .context("unlock of a name this peer does not hold")?;
        Ok(g.unlock()?)
    }

    #[inline]
    fn pair(&mut self, i: usize) -> Result<()> {
        Ok(self.client.lock(self.names[i].as_bytes())?.unlock()?)
    }

    fn pipelined(&mut self, i: usize, depth: usize) -> Result<()> {
        let Some(addr) = &self.addr else {
            bail!("{} has no pipelining (--pipeline is for remote and redis)", self.label)
        };
        let raw = match &mut self.raw {
            Some(r) => r,
            None => self.raw.insert(RawConn::connect(addr)?),
        };
        raw.pipelined_pairs(&self.names[i], depth)
    }
}

/// flock(2) by name: lock = open(O_CREAT) + flock(LOCK_EX); unlock = close(2), which releases
/// the lock. One file per name.
pub(crate) struct FlockPeer {
    paths: Vec<PathBuf>,
    files: Vec<Option<File>>,
    open: OpenOptions,
}

impl FlockPeer {
    /// One file per name in `dir`; `create` makes them now, outside any timed loop.
    pub(crate) fn new(dir: &Path, names: &[String], create: bool) -> Result<Self> {
        let mut open = OpenOptions::new();
        open.read(true).write(true).create(true).mode(0o600);
        let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        if create {
            for p in &paths {
                open.open(p).with_context(|| format!("create {}", p.display()))?;
            }
        }
        let mut files = Vec::with_capacity(paths.len());
        files.resize_with(paths.len(), || None);
        Ok(FlockPeer { paths, files, open })
    }
}

impl Peer for FlockPeer {
    fn name(&self) -> &'static str {
        "flock"
    }

    #[inline]
    fn lock(&mut self, i: usize) -> Result<()> {
        let f = self
            .open
            .open(&self.paths[i])
            .with_context(|| format!("open {}", self.paths[i].display()))?;
        sys::flock_exclusive(&f).context("flock")?;
        self.files[i] = Some(f);
        Ok(())
    }

    #[inline]
    fn unlock(&mut self, i: usize) -> Result<()> {
        let f = self.files[i]
            .take()
            .context("unlock of a name this peer does not hold")?;
        drop(f); // close(2) releases the flock
        Ok(())
    }
}

/// Robust process-shared pthread mutexes, one per name, addressed by index (no name lookup).
pub(crate) struct PthreadPeer {
    mutexes: sys::MutexArray,
    /// Times a lock found its previous owner dead (EOWNERDEAD) and made it consistent.
    pub(crate) recovered: u64,
}

impl PthreadPeer {
    pub(crate) fn new(mutexes: sys::MutexArray) -> Self {
        PthreadPeer { mutexes, recovered: 0 }
    }
}

impl Peer for PthreadPeer {
    fn name(&self) -> &'static str {
        "pthread"
    }

    #[inline]
    fn lock(&mut self, i: usize) -> Result<()> {
        if self.mutexes.lock(i).context("pthread_mutex_lock")? {
            self.recovered += 1;
        }
        Ok(())
    }

    #[inline]
    fn unlock(&mut self, i: usize) -> Result<()> {
        Ok(self.mutexes.unlock(i)?)
    }
}

/// The cost floor of locking by name in shared memory: a bare open-addressing hash table
/// ([`sys::ProbeTable`]) with the name and the lock word in one 64-byte slot, looked up by the
/// same hash shmlock uses; lock = probe + CAS, unlock = one store. No owner records, no fencing
/// tokens, no crash safety, no fairness and no sleeping (a waiter spins, yielding the CPU after
/// a few rounds): what any by-name lock must pay at least, to compare shmlock's costs with.
pub(crate) struct ProbePeer {
    table: sys::ProbeTable,
    names: Vec<String>,
    /// The slot each name was found in by its last lock.
    held: Vec<u32>,
}

impl ProbePeer {
    pub(crate) fn new(table: sys::ProbeTable, names: Vec<String>) -> Result<Self> {
        if let Some(n) = names.iter().find(|n| n.len() > sys::PROBE_NAME_LEN) {
            bail!("probe: name {n:?} is longer than {} bytes", sys::PROBE_NAME_LEN);
        }
        let held = vec![u32::MAX; names.len()];
        Ok(ProbePeer { table, names, held })
    }

    /// The slot holding `name` (hash `h`), claimed for it if it was not in the table.
    #[inline]
    fn slot(&self, name: &[u8], h: u64) -> Result<usize> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
        let slots = self.table.slots();
        let mask = slots.len() - 1;
        let mut i = h as usize & mask;
        for _ in 0..slots.len() {
            let s = &slots[i];
            match s.hash.load(Acquire) {
                0 => {
                    if s.hash.compare_exchange(0, h, AcqRel, Acquire).is_err() {
                        continue; // claimed meanwhile: look at it again
                    }
                    for (w, c) in s.name.iter().zip(name.chunks(8)) {
                        w.store(shmlock::name::word(c), Relaxed);
                    }
                    s.len.store(name.len() as u64 | 1 << 63, Release);
                    return Ok(i);
                }
                x if x == h => {
                    // Claimed: wait for the claimer to write the name (bit 63 of len).
                    let len = loop {
                        let l = s.len.load(Acquire);
                        if l != 0 {
                            break l & !(1 << 63);
                        }
                        std::hint::spin_loop();
                    };
                    if len == name.len() as u64
                        && s.name
                            .iter()
                            .zip(name.chunks(8))
                            .all(|(w, c)| w.load(Relaxed) == shmlock::name::word(c))
                    {
                        return Ok(i);
                    }
                }
                _ => {}
            }
            i = (i + 1) & mask;
        }
        bail!("probe table full")
    }
}

impl Peer for ProbePeer {
    fn name(&self) -> &'static str {
        "probe"
    }

    #[inline]
    fn lock(&mut self, i: usize) -> Result<()> {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        let name = self.names[i].as_bytes();
        let h = shmlock::name::hash(0x5eed, name) | 1;
        let s = self.slot(name, h)?;
        let word = &self.table.slots()[s].word;
        let mut spins = 0u32;
        while word.compare_exchange(0, 1, Acquire, Relaxed).is_err() {
            while word.load(Relaxed) != 0 {
                spins += 1;
                if spins % 64 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        self.held[i] = s as u32;
        Ok(())
    }

    #[inline]
    fn unlock(&mut self, i: usize) -> Result<()> {
        let s = std::mem::replace(&mut self.held[i], u32::MAX);
        let slot = self
            .table
            .slots()
            .get(s as usize)
            .context("unlock of a name not held")?;
        slot.word.store(0, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
