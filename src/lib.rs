//! shmlock: named locks for processes on one machine, in shared memory, safe when processes die.
//!
//! ```
//! # let seg = shmlock::doc_segment();
//! use shmlock::Client;
//! let client = Client::open(&seg)?;
//! let guard = client.lock("orders/42")?;          // exclusive, waits as long as it takes
//! println!("fencing token {}", guard.token());     // strictly increasing per name
//! assert!(client.try_lock("orders/42").is_err());  // re-locking is an error, never a hang
//! drop(guard);                                     // unlocks
//! let r1 = client.lock_shared("config")?;          // shared mode: many readers
//! # drop(r1);
//! # shmlock::Segment::unlink(&seg)?;
//! # Ok::<(), shmlock::Error>(())
//! ```
//!
//! # Layout
//! - [`shm`]: the segment (create, open, validate, map); the only unsafe code.
//! - [`pool`]: generic state pools (per-state FIFO lists of fixed records).
//! - [`table`]: the lock table: shards, name index, grants, queues, fairness.
//! - [`lock`]: the locking contract of every backend: [`Locker`] and [`Guard`].
//! - [`client`]: [`Client`] handles and RAII [`LockGuard`]s (borrowed) and [`ArcLockGuard`]s (owned).
//! - [`proto`]: the wire protocol of `docs/PROTOCOL.md`, sans I/O, shared by both sides: the
//!   request/response codec and the one mapping between [`Error`] and the protocol's error codes.
//! - [`gateway`]: the TCP gateway (`shmlockd` serves remote clients with it).
//! - [`remote`]: [`RemoteClient`](remote::RemoteClient), the same API through a gateway.
//! - [`daemon`], [`metrics`], [`systemd`]: `shmlockd`'s lifecycle, its Prometheus metrics and
//!   its systemd notifications.
//! - [`owner`], [`name`], [`clock`], [`config`], [`error`]: the vocabulary.

#[doc(hidden)] // the crash tests' fault injection (feature `chaos`)
pub mod chaos;
pub mod client;
pub mod clock;
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "gateway")]
pub mod gateway;
pub mod lock;
#[cfg(feature = "daemon")]
pub mod metrics;
pub mod name;
pub mod owner;
pub mod pool;
pub mod proto;

/// The traits a locking program needs in scope: `use shmlock::prelude::*;`.
pub mod prelude {
    pub use crate::lock::{Guard, Locker, Wait};
}
#[cfg(feature = "remote")]
pub mod remote;
pub mod shm;
pub mod supervisor;
#[cfg(feature = "daemon")]
pub mod systemd;
pub mod table;
#[cfg(feature = "tls")]
mod tls;

pub use client::{ArcLockGuard, Client, FencingToken, Grant, LocalGuard, LockGuard};
pub use config::Capacities;
pub use error::{Error, HolderInfo, Result};
pub use lock::{Guard, Locker, Wait};
pub use shm::Segment;
pub use table::{LockTable, Mode};

/// Creates a small uniquely named segment for documentation examples.
#[doc(hidden)]
pub fn doc_segment() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "/shmlock-doc-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let caps = Capacities {
        max_locks: 64,
        max_holds: 64,
        max_owners: 8,
        ..Default::default()
    };
    LockTable::create(&name, &caps).expect("create doc segment");
    name
}
