//! The same locks on an etcd v3 cluster, for locks that must outlive one machine (feature
//! `etcd`). etcd (Raft) is the engine; this module only lays out keys as etcd's own
//! `concurrency.Mutex` does, so `etcdctl lock NAME` and Go programs queue with it.
//!
//! ```no_run
//! use shmlock::etcd::{EtcdClient, EtcdOptions};
//! use shmlock::{Guard, Locker};
//! let client = EtcdClient::connect(["http://127.0.0.1:2379"], EtcdOptions::default())?;
//! let guard = client.lock("orders/42")?;        // waits as long as it takes
//! println!("fencing token {}", guard.token());  // the key's create revision
//! assert!(!guard.lost());                       // the session's lease is alive
//! guard.unlock()?;                              // Err(Lost) had the lease expired meanwhile
//! # Ok::<(), shmlock::Error>(())
//! ```
//!
//! # Sessions
//! A client is one **session**: one lease (TTL [`EtcdOptions::ttl`], 10 s by default) kept alive
//! in the background, under which it puts one key per lock it holds or waits for. When the
//! session cannot renew its lease in time (the cluster unreachable or without quorum), or the
//! cluster says the lease is gone, every guard of it is **lost**: [`EtcdGuard::lost`] turns true,
//! [`EtcdGuard::wait_lost`] returns, waits end in [`Error::Lost`], and unlocking reports
//! [`Error::Lost`]. The next request on the client starts a new session.
//!
//! # Requests (none of them polls)
//! - lock, uncontended: one `Txn` (put the key if absent with the lease, and read the oldest key
//!   of the name); a busy try-lock: that `Txn` and a `DeleteRange` taking the key back;
//! - lock, contended: that `Txn`, then per change of the key waited for: a `Range` of the keys
//!   up to ours, a `Watch` of the one just before ours (no herd: each waiter watches one other
//!   key) from the present until its deletion (plus a `Range` of that key when the store moved
//!   between the two), and `LeaseTimeToLive` of its lease, sent beside the next `Range` (gone:
//!   its holder died, so [`Guard::owner_died`]; then a `Range` at the revision before the
//!   deletion tells whether that key held the lock or only waited);
//! - unlock: one `DeleteRange` of the key.
//!
//! # A blocking API
//! Every call blocks its thread until etcd answers (the client runs a runtime of its own on one
//! background thread). Call it from threads, not from async code: in a tokio task, use
//! `spawn_blocking`. A guard's drop blocks too (for its unlock, at most the request timeout).
//!
//! # Tokens
//! A grant's fencing token is its key's create revision: etcd's revision counter is one for the
//! whole cluster and only grows, so tokens of one name strictly increase across holders on any
//! machine. A holder passes it with every write to the resource, which refuses tokens lower than
//! the highest it has seen (fencing): after a lease was lost, a holder that did not notice (a
//! stalled process) is refused.

mod layout;
mod session;

use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchFilterType, WatchOptions,
};
use tokio::time::{sleep, Instant};

use crate::client::{FencingToken, Grant};
use crate::error::{Error, HolderInfo, Result};
use crate::lock::{Guard, Locker, Wait, INTERRUPT_CHECK};
use crate::owner::OpenedBy;
use crate::table::Mode;

use layout::Queued;
pub use layout::{parse_value, KeyInfo};
use session::Session;

/// The longest lock name, in bytes (etcd takes keys up to its request size limit, 1.5 MiB by
/// default; a lock name is not a payload).
pub const MAX_NAME: usize = 4096;

/// How an [`EtcdClient`] connects and keeps its session.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// The session's lease TTL: how long after this client stops renewing (it crashed, hung, or
    /// was cut off) its locks are freed, and how long a partition may last before this client
    /// reports its locks lost. Whole seconds, at least 1 (etcd's unit). Default 10 s.
    pub ttl: Duration,
    /// Put before every lock name to make its key prefix (`<prefix><name>/`). Default empty,
    /// as `etcdctl lock NAME` lays out NAME; with a prefix `p/`, `etcdctl lock p/NAME` is the
    /// same lock.
    pub prefix: Vec<u8>,
    /// How long connecting may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long one request to the cluster may take, its retries on a member that went away
    /// included. Default 5 s.
    pub request_timeout: Duration,
    /// A label stored with each key (shown by `shmlock locks --etcd`). Default: this program's
    /// name.
    pub label: Option<String>,
    /// User name and password, for a cluster with authentication on.
    pub user: Option<(String, String)>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            ttl: Duration::from_secs(10),
            prefix: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            label: None,
            user: None,
        }
    }
}

/// A session with an etcd cluster: one lease, one owner (re-locking a name it holds or waits for
/// is [`Error::AlreadyHeld`]). Any number of threads may share it.
pub struct EtcdClient {
    /// The runtime its requests run on (one worker thread); None only while it is dropped in
    /// a forked child, which must not wait for a thread it does not have.
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    opts: EtcdOptions,
    /// The endpoints, for messages.
    endpoints: String,
    /// The session now; replaced by the next request once it is lost.
    session: Mutex<Arc<Session>>,
    /// The names this client holds or waits for.
    names: Mutex<HashSet<Vec<u8>>>,
    /// A delete of one of its keys failed: the session may hold a key nobody will delete.
    dirty: std::sync::atomic::AtomicBool,
    /// Keys whose delete failed: each is deleted before its name is locked again, so that a new
    /// grant never reuses an old grant's key (and token).
    leftovers: Mutex<HashSet<Vec<u8>>>,
    host: String,
    label: String,
    opened_by: OpenedBy,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.endpoints)
            .field("lease", &format_args!("{:x}", self.lease_id()))
            .finish_non_exhaustive()
    }
}

/// A lock held in etcd. Dropping it deletes its key (waiting at most the request timeout);
/// [`unlock`](Guard::unlock) does and reports.
#[derive(Debug)]
pub struct EtcdGuard<H: Deref<Target = EtcdClient>> {
    client: H,
    name: Vec<u8>,
    key: Vec<u8>,
    session: Arc<Session>,
    grant: Grant,
    released: bool,
}

/// One session's key in a lock's queue, as [`EtcdClient::locks`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdKey {
    /// The session's lease id.
    pub lease: i64,
    /// The key's create revision: the grant's fencing token, and its place in the queue.
    pub create_revision: i64,
    /// What its value says (mode; pid, host, label and start time when shmlock put it).
    pub info: KeyInfo,
}

/// One lock with holders or waiters, as [`EtcdClient::locks`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdLock {
    /// The lock's name (its key prefix less the client's prefix and the final `/`).
    pub name: Vec<u8>,
    /// The keys that hold it, oldest first.
    pub holders: Vec<EtcdKey>,
    /// The keys that wait, in queue order.
    pub waiters: Vec<EtcdKey>,
}

/// A request that failed: `unknown` if it may have been applied all the same.
struct Failure {
    error: Error,
    unknown: bool,
}

/// How a watch of the key waited for ended.
enum Watched {
    /// It was deleted at this revision (None: by an unlock, at a revision not asked for).
    Deleted(Option<i64>),
    /// The wait stopped (the session lost, the deadline passed).
    Stop(Stop),
}

/// Why a lock request stopped waiting without a grant.
enum Stop {
    /// The deadline passed; who held the lock then, where its key says.
    Deadline(Option<HolderInfo>),
    Lost,
}

impl EtcdClient {
    /// Connects to the cluster at `endpoints` (URLs such as `http://10.0.0.1:2379`; several
    /// members are used in turn) and starts a session.
    pub fn connect<E: AsRef<str>>(endpoints: impl IntoIterator<Item = E>, opts: EtcdOptions) -> Result<EtcdClient> {
        let endpoints: Vec<String> = endpoints.into_iter().map(|e| e.as_ref().to_string()).collect();
        let shown = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(Error::Etcd {
                endpoints: shown,
                why: "no endpoint given".into(),
            });
        }
        if opts.ttl < Duration::from_secs(1) {
            return Err(Error::Config {
                key: "ttl",
                why: format!("{:?} is under etcd's smallest lease TTL, 1 s", opts.ttl),
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shmlock-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::Etcd {
                endpoints: shown.clone(),
                why: format!("starting the client's runtime: {e}"),
            })?;
        let mut copts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            // A member cut off from the leader refuses requests (and ends watches) rather than
            // answering from a stale copy: a waiter must not watch a member that hears nothing.
            .with_require_leader(true);
        if let Some((user, password)) = &opts.user {
            copts = copts.with_user(user.clone(), password.clone());
        }
        let client = rt
            .block_on(async {
                tokio::time::timeout(opts.connect_timeout, Client::connect(&endpoints, Some(copts)))
                    .await
                    .map_err(|_| format!("no answer within {}", crate::clock::human(opts.connect_timeout)))?
                    .map_err(|e| e.to_string())
            })
            .map_err(|why| Error::Etcd {
                endpoints: shown.clone(),
                why: format!("connecting: {why}"),
            })?;
        let session = rt
            .block_on(Session::start(&client, opts.ttl, opts.request_timeout))
            .map_err(|why| Error::Etcd {
                endpoints: shown.clone(),
                why,
            })?;
        let label = opts.label.clone().unwrap_or_else(program_name);
        Ok(EtcdClient {
            rt: Some(rt),
            client,
            endpoints: shown,
            session: Mutex::new(session),
            names: Mutex::new(HashSet::new()),
            dirty: std::sync::atomic::AtomicBool::new(false),
            leftovers: Mutex::new(HashSet::new()),
            host: hostname(),
            label,
            opts,
            opened_by: OpenedBy::now(),
        })
    }

    /// The lease id of the session now (lowercase hex in the keys).
    pub fn lease_id(&self) -> i64 {
        lock(&self.session).id
    }

    /// The options it was opened with.
    pub fn options(&self) -> &EtcdOptions {
        &self.opts
    }

    /// Every lock under this client's prefix (and `name_prefix`, if not empty) that has holders
    /// or waiters, by name. Only keys laid out as locks are (`.../<lease id in hex>`, put with a
    /// lease) are read as such.
    pub fn locks(&self, name_prefix: &[u8]) -> Result<Vec<EtcdLock>> {
        self.opened_by.check()?;
        let mut start = self.opts.prefix.clone();
        start.extend_from_slice(name_prefix);
        let end = layout::prefix_end(&start);
        let resp = self.rt().block_on(self.retry("range", |mut c| {
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_sort(SortTarget::Create, SortOrder::Ascend);
            let start = if start.is_empty() { vec![0] } else { start.clone() };
            async move { c.get(start, Some(opts)).await }
        }))?;
        let mut by_name: Vec<(Vec<u8>, Vec<Queued>, Vec<EtcdKey>)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for kv in resp.kvs() {
            let Some((name, lease)) = layout::split_session_key(&self.opts.prefix, kv.key()) else {
                continue;
            };
            if kv.lease() == 0 || kv.lease() != lease {
                continue; // a key that looks like one but is not a session's
            }
            let info = parse_value(kv.value());
            let at = *index.entry(name.to_vec()).or_insert_with(|| {
                by_name.push((name.to_vec(), Vec::new(), Vec::new()));
                by_name.len() - 1
            });
            by_name[at].1.push(Queued {
                key: kv.key().to_vec(),
                create_revision: kv.create_revision(),
                lease,
                shared: info.shared,
            });
            by_name[at].2.push(EtcdKey {
                lease,
                create_revision: kv.create_revision(),
                info,
            });
        }
        Ok(by_name
            .into_iter()
            .map(|(name, queue, mut keys)| {
                let waiters = keys.split_off(layout::holders(&queue));
                EtcdLock {
                    name,
                    holders: keys,
                    waiters,
                }
            })
            .collect())
    }

    /// The benchmark's floor: one put (with the session's lease) and one delete of `key`, the
    /// raw writes a lock and an unlock make, through the same connection.
    pub fn put_delete(&self, key: &[u8]) -> Result<()> {
        self.opened_by.check()?;
        let lease = self.session()?.id;
        self.rt().block_on(async {
            self.retry("put", |mut c| {
                let key = key.to_vec();
                async move {
                    c.put(key, b"".to_vec(), Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await?;
            self.retry("delete", |mut c| {
                let key = key.to_vec();
                async move { c.delete(key, None).await }
            })
            .await
        })?;
        Ok(())
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives as long as the client")
    }

    /// The session for a new request: the current one, or a new one if it was lost.
    fn session(&self) -> Result<Arc<Session>> {
        let mut current = lock(&self.session);
        if current.is_lost() {
            let old = Arc::clone(&current);
            *current = self
                .rt()
                .block_on(Session::start(&self.client, self.opts.ttl, self.opts.request_timeout))
                .map_err(|why| self.error(why))?;
            // The old lease may still live at the cluster (a partition that healed): revoke it,
            // so that no key of a session reported lost keeps a lock.
            let mut c = self.client.clone();
            self.rt().spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), c.lease_revoke(old.id)).await;
            });
        }
        Ok(Arc::clone(&current))
    }

    fn error(&self, why: String) -> Error {
        Error::Etcd {
            endpoints: self.endpoints.clone(),
            why,
        }
    }

    /// Runs one request, again while it fails for a reason that another member or a moment
    /// may cure (unavailable, no leader, a broken connection), for at most the request timeout.
    async fn retry<T, F, Fut>(&self, what: &str, call: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.attempts(what, call).await.map_err(|f| f.error)
    }

    /// [`retry`](Self::retry), telling a refusal (the request was not applied) from a failure
    /// whose outcome is unknown (no answer, or a broken connection: it may have been applied).
    /// Each attempt may take a quarter of the request timeout (at least 500 ms): a member that
    /// lost its leader holds a request until its own timeout, while another member may answer
    /// at once.
    async fn attempts<T, F, Fut>(&self, what: &str, mut call: F) -> std::result::Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let until = Instant::now() + self.opts.request_timeout;
        let attempt = (self.opts.request_timeout / 4).max(Duration::from_millis(500));
        loop {
            let this_one = (Instant::now() + attempt).min(until);
            match tokio::time::timeout_at(this_one, call(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if transient(&e) && Instant::now() + Duration::from_millis(50) < until => {
                    sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(e)) => {
                    return Err(Failure {
                        unknown: transient(&e),
                        error: self.error(format!("{what}: {e}")),
                    })
                }
                Err(_) if Instant::now() < until => {}
                Err(_) => {
                    return Err(Failure {
                        unknown: true,
                        error: self.error(format!(
                            "{what}: no answer within {} (is a majority of the cluster up?)",
                            crate::clock::human(self.opts.request_timeout)
                        )),
                    })
                }
            }
        }
    }

    /// Deletes `key`; Ok(false) if it was already gone (as far as can be told: when an attempt
    /// went unanswered, a later attempt's "nothing deleted" may be the first one's doing, and
    /// counts as deleted). A failure leaves the key to be deleted before its name is locked
    /// again (`leftovers`).
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        let tries = std::cell::Cell::new(0u32);
        let resp = self
            .retry("delete", |mut c| {
                tries.set(tries.get() + 1);
                let key = key.to_vec();
                async move { c.delete(key, None).await }
            })
            .await
            .inspect_err(|_| {
                self.dirty.store(true, std::sync::atomic::Ordering::Release);
                lock(&self.leftovers).insert(key.to_vec());
            })?;
        Ok(resp.deleted() > 0 || tries.get() > 1)
    }

    /// The whole lock request: put the key, then wait in the queue.
    async fn request(&self, session: &Session, name: &[u8], mode: Mode, wait: Wait) -> Result<(Vec<u8>, Grant)> {
        let started = Instant::now();
        let pfx = layout::name_prefix(&self.opts.prefix, name);
        let key = layout::session_key(&pfx, session.id);
        let shared = mode == Mode::Shared;
        let my_rev = match self.enqueue(session, &pfx, &key, mode).await {
            Ok(Enqueued::Granted(rev)) => return Ok((key, grant(rev, false, mode))),
            Ok(Enqueued::Busy(_)) if wait == Wait::No => {
                self.delete(&key).await?;
                return Err(Error::WouldBlock);
            }
            Ok(Enqueued::Busy(rev) | Enqueued::Queued(rev)) => rev,
            Err(e) => {
                // The put may have been applied before the answer was lost: take it back, so
                // that no key of ours queues for a request that failed.
                let _ = self.delete(&key).await;
                // A lease found gone: lost (and the request goes on in a new session); else
                // the request's own failure.
                let gone = matches!(&e, Error::Etcd { why, .. } if why.contains("lease not found"));
                return Err(if gone { lost_error(session) } else { e });
            }
        };
        let deadline = match wait {
            Wait::No => Some(Instant::now()),
            Wait::Until(d) => Some(Instant::from_std(d)),
            Wait::Forever => None,
        };
        let outcome = self.wait_in_queue(session, &pfx, &key, my_rev, shared, deadline).await;
        match outcome {
            Ok(Ok(owner_died)) => Ok((key, grant(my_rev, owner_died, mode))),
            Ok(Err(stop)) => {
                // Withdraw: nothing may stay queued (the lease would keep it until it ends).
                let withdrawn = self.delete(&key).await;
                match stop {
                    Stop::Lost => Err(lost_error(session)),
                    _ if session.is_lost() => Err(lost_error(session)),
                    Stop::Deadline(_) if matches!(wait, Wait::No) => withdrawn.map(|_| ()).and(Err(Error::WouldBlock)),
                    Stop::Deadline(holder) => withdrawn.map(|_| ()).and(Err(Error::TimedOut {
                        waited: started.elapsed(),
                        holder,
                    })),
                }
            }
            Err(e) => {
                let _ = self.delete(&key).await;
                Err(if session.is_lost() { lost_error(session) } else { e })
            }
        }
    }

    /// Puts the session's key for the lock (one `Txn`, which also reads the oldest key): granted
    /// at once when ours is the oldest, else queued at our create revision.
    async fn enqueue(&self, session: &Session, pfx: &[u8], key: &[u8], mode: Mode) -> Result<Enqueued> {
        let value = layout::value(mode, std::process::id(), &self.host, unix_ms(), &self.label);
        let oldest = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        // A key of an earlier grant whose unlock failed: delete it first (reusing it would give
        // this grant the old one's token).
        if lock(&self.leftovers).remove(key) {
            self.delete(key).await?;
        }
        for _ in 0..2 {
            let txn = Txn::new()
                .when([Compare::create_revision(key.to_vec(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(
                        key.to_vec(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(session.id)),
                    ),
                    TxnOp::get(pfx.to_vec(), Some(oldest.clone())),
                ])
                .or_else([
                    TxnOp::get(key.to_vec(), None),
                    TxnOp::get(pfx.to_vec(), Some(oldest.clone())),
                ]);
            let resp = self
                .attempts("txn", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await
                .map_err(|f| {
                    if matches!(&f.error, Error::Etcd { why, .. } if why.contains("lease not found")) {
                        // Our lease is gone at the cluster (it expired while nothing renewed it).
                        session.mark_lost(format!(
                            "lease {:x} is not found at the cluster: it expired",
                            session.id
                        ));
                    } else if f.unknown {
                        // The put may yet be applied (a member holding it without a leader), after
                        // any withdrawal: a key nobody waits for would hold the lock. Only the
                        // lease's end removes it for sure: retire the session (its other locks
                        // with it: the cluster did not answer for the whole request timeout).
                        session.mark_lost(format!(
                            "a lock request got no answer within {}, so it may still be applied: the \
                             session (lease {:x}) is retired",
                            crate::clock::human(self.opts.request_timeout),
                            session.id
                        ));
                    }
                    f.error
                })?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let ops = resp.op_responses();
            let first_kv = |i: usize| match ops.get(i) {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().cloned(),
                _ => None,
            };
            let my_rev = if resp.succeeded() {
                revision
            } else {
                // Our key is there already: a retry of a request whose answer was lost, or a
                // key left by a withdrawal that failed. Ours either way (the lease is ours);
                // reuse it if it asks for this mode, else replace it.
                match first_kv(0) {
                    Some(kv) if parse_value(kv.value()).mode() == mode => kv.create_revision(),
                    _ => {
                        self.delete(key).await?;
                        continue;
                    }
                }
            };
            if my_rev <= 0 {
                return Err(self.error(format!("txn: the answer carries no revision ({revision})")));
            }
            return Ok(match first_kv(1) {
                Some(kv) if kv.create_revision() == my_rev => Enqueued::Granted(my_rev),
                // An older exclusive session key of this very name: busy, without a range.
                Some(kv)
                    if mode == Mode::Exclusive
                        && layout::is_session_key(pfx, kv.key())
                        && !parse_value(kv.value()).shared =>
                {
                    Enqueued::Busy(my_rev)
                }
                _ => Enqueued::Queued(my_rev),
            });
        }
        Err(self.error("txn: the session's key for this lock keeps changing".into()))
    }

    /// Waits until no key before ours blocks it. Ok(Ok(owner_died)) when granted.
    async fn wait_in_queue(
        &self,
        session: &Session,
        pfx: &[u8],
        key: &[u8],
        my_rev: i64,
        shared: bool,
        deadline: Option<Instant>,
    ) -> Result<std::result::Result<bool, Stop>> {
        let mut lost = session.subscribe();
        let mut owner_died = false;
        // The key just deleted, and at what revision, whose holder's death is to be asked.
        let mut gone: Option<(Queued, i64)> = None;
        loop {
            if session.is_lost() {
                return Ok(Err(Stop::Lost));
            }
            // The keys up to ours, oldest first; beside it (not before: a handoff costs one
            // round trip, not two), whether the key that went was a dead holder's.
            let range = self.retry("range", |mut c| {
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_max_create_revision(my_rev);
                let pfx = pfx.to_vec();
                async move { c.get(pfx, Some(opts)).await }
            });
            let ranged = match gone.take() {
                Some((key, at)) if !owner_died => {
                    let (ranged, died) = tokio::join!(range, self.died_holding(pfx, &key, at));
                    owner_died = died;
                    ranged
                }
                _ => range.await,
            };
            let resp = match ranged {
                Ok(r) => r,
                Err(_) if session.is_lost() => return Ok(Err(Stop::Lost)),
                Err(_) if deadline.is_some_and(|d| d <= Instant::now()) => return Ok(Err(Stop::Deadline(None))),
                // The cluster answers keep-alives meanwhile: not an outage, a failure to report.
                Err(e) if session.answered_within(self.opts.request_timeout / 2) => return Err(e),
                // An outage (a leader's election, a partition): wait on, until it ends, the
                // deadline passes, or the session is lost.
                Err(_) => {
                    sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let queue = queue_of(pfx, resp.kvs());
            let holder = holder_info(pfx, resp.kvs(), layout::holders(&queue) as u32);
            let Some(mine) = queue.iter().position(|q| q.key == key) else {
                // Our key is gone: only the lease's end removes it.
                session.mark_lost(format!(
                    "the key {} of lease {:x} vanished while it waited: the lease expired",
                    String::from_utf8_lossy(key),
                    session.id
                ));
                return Ok(Err(Stop::Lost));
            };
            let Some(blocker) = layout::blocker(&queue[..mine], shared).cloned() else {
                return Ok(Ok(owner_died));
            };
            if deadline.is_some_and(|d| d <= Instant::now()) {
                return Ok(Err(Stop::Deadline(holder)));
            }
            // Watch the one key we wait for. A watch from the present is served at once; one
            // from a past revision waits for etcd's catch-up loop (every 100 ms), so the watch
            // starts now, and if anything was written since the range, a read of the key tells
            // whether it went meanwhile (only then is it watched from the range's revision, to
            // learn when).
            let Some(deleted_at) = self
                .watch_deletion(session, &blocker, revision, deadline, &mut lost)
                .await?
            else {
                sleep(Duration::from_millis(20)).await;
                continue;
            };
            let deleted_at = match deleted_at {
                Watched::Deleted(at) => at,
                Watched::Stop(stop) => {
                    return Ok(Err(match stop {
                        Stop::Deadline(_) => Stop::Deadline(holder),
                        other => other,
                    }))
                }
            };
            gone = deleted_at.map(|at| (blocker, at));
        }
    }

    /// Waits for the deletion of `blocker`, seen in a range at revision `seen`: Some(Deleted(at))
    /// with its revision, Some(Stop) for the session's loss or the deadline, None when the watch
    /// ended or could not start (look again).
    async fn watch_deletion(
        &self,
        session: &Session,
        blocker: &Queued,
        seen: i64,
        deadline: Option<Instant>,
        lost: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Watched>> {
        // None: from now on; Some(r): from revision r.
        let mut from: Option<i64> = None;
        'watch: loop {
            let watched = self
                .retry("watch", |mut c| {
                    let mut opts = WatchOptions::new().with_filters([WatchFilterType::NoPut]);
                    if let Some(r) = from {
                        opts = opts.with_start_revision(r);
                    }
                    let k = blocker.key.clone();
                    async move { c.watch(k, Some(opts)).await }
                })
                .await;
            let mut stream = match watched {
                Ok(s) => s,
                Err(_) if !session.is_lost() => return Ok(None),
                Err(e) => return Err(e),
            };
            loop {
                let deadline_sleep = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            if let Some(ev) = resp.events().iter().find(|e| e.event_type() == EventType::Delete) {
                                return Ok(Some(Watched::Deleted(Some(ev.kv().map(|kv| kv.mod_revision()).unwrap_or(0)))));
                            }
                            if resp.canceled() {
                                return Ok(None); // compacted, or the member lost its leader
                            }
                            let now = resp.header().map(|h| h.revision()).unwrap_or(0);
                            if resp.created() && from.is_none() && now != seen {
                                // Written to since the range: is this incarnation of the key
                                // still there? (Its session may have put it again since.)
                                let key = blocker.key.clone();
                                let got = self
                                    .retry("range", |mut c| {
                                        let key = key.clone();
                                        async move { c.get(key, Some(GetOptions::new().with_keys_only())).await }
                                    })
                                    .await;
                                match got {
                                    Ok(r) if r.kvs().first().is_some_and(|kv| kv.create_revision() == blocker.create_revision) => {}
                                    // Gone meanwhile. Its lease lives: an unlock, whose revision
                                    // nothing needs. Else a death, which needs the revision of
                                    // the deletion: watch from the range's revision (slower,
                                    // only on a death).
                                    Ok(_) if self.lease_lives(blocker.lease).await == Some(true) => {
                                        return Ok(Some(Watched::Deleted(None)));
                                    }
                                    Ok(_) => {
                                        from = Some(seen + 1);
                                        continue 'watch;
                                    }
                                    Err(_) => return Ok(None),
                                }
                            }
                        }
                        // The stream ended (a member went away).
                        _ => return Ok(None),
                    },
                    _ = lost.wait_for(|l| *l) => return Ok(Some(Watched::Stop(Stop::Lost))),
                    _ = deadline_sleep => return Ok(Some(Watched::Stop(Stop::Deadline(None)))),
                }
            }
        }
    }

    /// Does lease `id` live (Some(true)), or has it ended (Some(false))? None if the cluster did
    /// not say.
    async fn lease_lives(&self, id: i64) -> Option<bool> {
        self.retry("lease time-to-live", |mut c| async move {
            c.lease_time_to_live(id, None).await
        })
        .await
        .ok()
        .map(|t| t.ttl() > 0)
    }

    /// Did `gone`, deleted at revision `at`, hold the lock when its lease ended? Its lease must
    /// be gone (an unlock deletes the key and keeps the lease), and at the revision before the
    /// deletion it must have been among the holders (not a waiter that crashed). When a request
    /// fails, or that revision was compacted away, it says yes: a notice too many makes its
    /// reader check data that was fine; one too few hides a holder's death.
    async fn died_holding(&self, pfx: &[u8], gone: &Queued, at: i64) -> bool {
        match self.lease_lives(gone.lease).await {
            Some(true) => return false,
            Some(false) => {}
            None => return true,
        }
        if at <= 1 {
            return true;
        }
        let before = self
            .retry("range", |mut c| {
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_max_create_revision(gone.create_revision)
                    .with_revision(at - 1);
                let pfx = pfx.to_vec();
                async move { c.get(pfx, Some(opts)).await }
            })
            .await;
        match before {
            Ok(resp) => {
                let queue = queue_of(pfx, resp.kvs());
                queue[..layout::holders(&queue)].iter().any(|q| q.key == gone.key)
            }
            Err(_) => true,
        }
    }

    fn acquire_inner<H: Deref<Target = Self>>(
        this: H,
        name: &[u8],
        mode: Mode,
        wait: Wait,
        interrupted: Option<&mut dyn FnMut() -> bool>,
    ) -> Result<EtcdGuard<H>> {
        this.opened_by.check()?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(Error::NameInvalid {
                len: name.len(),
                max: MAX_NAME,
            });
        }
        if !lock(&this.names).insert(name.to_vec()) {
            return Err(Error::AlreadyHeld);
        }
        let mut interrupted = interrupted;
        let mut outcome;
        let mut attempt = 0;
        loop {
            outcome = this.session().and_then(|session| {
                let r = match interrupted.as_deref_mut() {
                    None => this.rt().block_on(this.request(&session, name, mode, wait)),
                    Some(interrupted) => this.request_interruptible(&session, name, mode, wait, interrupted),
                };
                r.map(|(key, grant)| (session, key, grant))
            });
            // A session lost while this request waited (or before it, unnoticed) held nothing
            // of it: once, go on in a new session (whose creation fails if the cluster is
            // still unreachable), unless the deadline has passed.
            let expired = match wait {
                Wait::No => false,
                Wait::Until(d) => d <= std::time::Instant::now(),
                Wait::Forever => false,
            };
            attempt += 1;
            if !(matches!(outcome, Err(Error::Lost { .. })) && attempt < 2 && !expired) {
                break;
            }
        }
        match outcome {
            Ok((session, key, grant)) => Ok(EtcdGuard {
                client: this,
                name: name.to_vec(),
                key,
                session,
                grant,
                released: false,
            }),
            Err(e) => {
                lock(&this.names).remove(name);
                Err(e)
            }
        }
    }

    /// [`request`](Self::request) run in slices of [`INTERRUPT_CHECK`], asking `interrupted`
    /// between them outside the runtime (so it may block, or use another client): the request
    /// keeps its key and its watch meanwhile; when it is interrupted, its key is deleted.
    fn request_interruptible(
        &self,
        session: &Session,
        name: &[u8],
        mode: Mode,
        wait: Wait,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<(Vec<u8>, Grant)> {
        let mut request = std::pin::pin!(self.request(session, name, mode, wait));
        loop {
            let slice = self
                .rt()
                .block_on(async { tokio::time::timeout(INTERRUPT_CHECK, request.as_mut()).await });
            if let Ok(r) = slice {
                return r;
            }
            if interrupted() {
                let key = layout::session_key(&layout::name_prefix(&self.opts.prefix, name), session.id);
                self.rt().block_on(self.delete(&key))?;
                return Err(Error::Interrupted);
            }
        }
    }
}

enum Enqueued {
    /// Ours is the oldest key: granted, at this create revision.
    Granted(i64),
    /// Behind an older exclusive key: a one-try request is busy (the key must be taken back);
    /// queued at this create revision.
    Busy(i64),
    /// Queued at this create revision (whether something blocks it needs the queue).
    Queued(i64),
}

impl Drop for EtcdClient {
    fn drop(&mut self) {
        if self.opened_by.forked() {
            // The parent's session: not this process's to end. Its runtime's worker thread is
            // the parent's too: dropping the runtime would wait for it forever, so leak it.
            std::mem::forget(self.rt.take());
            return;
        }
        // When every guard is gone and each deleted its key, the lease holds nothing and expires
        // by itself within its TTL. It is not revoked then, because a waiter that saw our last
        // unlock asks whether our lease lives to tell an unlock from a death: a revocation
        // right after the unlock would make it see a death. If a key of ours may remain (a
        // delete failed, a guard was forgotten) the lease is revoked, which deletes every key
        // of it at once, and a waiter behind one of them rightly sees its holder's death.
        if !self.dirty.load(std::sync::atomic::Ordering::Acquire) && lock(&self.names).is_empty() {
            return;
        }
        let session = Arc::clone(&lock(&self.session));
        let mut c = self.client.clone();
        let timeout = self.opts.request_timeout.min(Duration::from_secs(2));
        self.rt().block_on(async move {
            let _ = tokio::time::timeout(timeout, c.lease_revoke(session.id)).await;
        });
    }
}

impl Locker for EtcdClient {
    type Guard<H: Deref<Target = Self>> = EtcdGuard<H>;

    fn acquire_with<H: Deref<Target = Self>>(this: H, name: &[u8], mode: Mode, wait: Wait) -> Result<EtcdGuard<H>> {
        Self::acquire_inner(this, name, mode, wait, None)
    }

    /// Keeps its place in the queue while it asks `interrupted` (the key stays; the watch goes
    /// on); `interrupted` runs outside the client's runtime, so it may block.
    fn acquire_interruptible_with<H: Deref<Target = Self> + Clone>(
        this: H,
        name: &[u8],
        mode: Mode,
        wait: Wait,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<EtcdGuard<H>> {
        Self::acquire_inner(this, name, mode, wait, Some(interrupted))
    }
}

crate::lock::forward_contract!(EtcdClient, EtcdGuard);

impl<H: Deref<Target = EtcdClient>> EtcdGuard<H> {
    /// Has this lock been lost (its session's lease expired, was revoked, or could not be
    /// renewed in time)? Then the cluster may have granted it to another: stop using what it
    /// protects.
    pub fn lost(&self) -> bool {
        self.session.is_lost()
    }

    /// Why it was lost, once it was.
    pub fn lost_reason(&self) -> Option<String> {
        self.session.why()
    }

    /// Waits until the lock is lost, at most `timeout` (None: as long as it takes); true if it
    /// was.
    pub fn wait_lost(&self, timeout: Option<Duration>) -> bool {
        let mut rx = self.session.subscribe();
        self.client.rt().block_on(async {
            let lost = rx.wait_for(|l| *l);
            match timeout {
                Some(t) => matches!(tokio::time::timeout(t, lost).await, Ok(Ok(_))),
                None => lost.await.is_ok(),
            }
        }) || self.session.is_lost()
    }

    /// The key that holds the lock (`<prefix><name>/<lease id in hex>`).
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The lease the key is put with.
    pub fn lease_id(&self) -> i64 {
        self.session.id
    }

    fn release(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.released, true) {
            return Ok(());
        }
        let client = &*self.client;
        lock(&client.names).remove(&self.name);
        client.opened_by.check()?;
        if self.session.is_lost() {
            return Err(lost_error(&self.session));
        }
        match client.rt().block_on(client.delete(&self.key)) {
            Ok(true) => Ok(()),
            Ok(false) => {
                // Only the lease's end deletes our key behind our back.
                self.session.mark_lost(format!(
                    "the key {} was gone at unlock: lease {:x} had expired",
                    String::from_utf8_lossy(&self.key),
                    self.session.id
                ));
                Err(lost_error(&self.session))
            }
            Err(e) if self.session.is_lost() => {
                let _ = e;
                Err(lost_error(&self.session))
            }
            Err(e) => Err(e),
        }
    }
}

impl<H: Deref<Target = EtcdClient>> Guard for EtcdGuard<H> {
    fn grant(&self) -> Grant {
        self.grant
    }

    fn name(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.name)
    }

    fn unlock(mut self) -> Result<()> {
        self.release()
    }

    fn lost(&self) -> bool {
        self.session.is_lost()
    }
}

impl<H: Deref<Target = EtcdClient>> Drop for EtcdGuard<H> {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::debug!("etcd unlock on drop: {e}");
        }
    }
}

fn grant(revision: i64, owner_died: bool, mode: Mode) -> Grant {
    Grant {
        token: FencingToken(revision as u64),
        owner_died,
        mode,
    }
}

fn lost_error(session: &Session) -> Error {
    Error::Lost {
        why: session.why().unwrap_or_else(|| format!("lease {:x} ended", session.id)),
    }
}

/// The session keys of the lock at `pfx` among `kvs` (sorted by create revision), with their
/// modes; other keys under the prefix (a longer name's) are left out.
fn queue_of(pfx: &[u8], kvs: &[etcd_client::KeyValue]) -> Vec<Queued> {
    kvs.iter()
        .filter(|kv| layout::is_session_key(pfx, kv.key()))
        .map(|kv| Queued {
            key: kv.key().to_vec(),
            create_revision: kv.create_revision(),
            lease: kv.lease(),
            shared: parse_value(kv.value()).shared,
        })
        .collect()
}

/// Who holds the lock at `pfx` among `kvs` (sorted by create revision), for a timeout's
/// message: known only when its key was put by shmlock (etcdctl's and Go's carry no pid).
fn holder_info(pfx: &[u8], kvs: &[etcd_client::KeyValue], holders: u32) -> Option<HolderInfo> {
    let kv = kvs.iter().find(|kv| layout::is_session_key(pfx, kv.key()))?;
    let info = parse_value(kv.value());
    let pid = info.pid?;
    let held_for = info
        .since_ms
        .map(|since| Duration::from_millis(unix_ms().saturating_sub(since)))
        .unwrap_or_default();
    let label = format!(
        "{}lease {:x} on {}",
        info.label.map(|l| format!("{l}, ")).unwrap_or_default(),
        kv.lease(),
        info.host.as_deref().unwrap_or("?")
    );
    Some(HolderInfo {
        pid,
        label,
        held_for,
        holders: holders.max(1),
    })
}

/// Worth another try: the member is unavailable, has no leader, or the connection broke.
pub(crate) fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic_code::Unavailable | tonic_code::Unknown | tonic_code::DeadlineExceeded | tonic_code::Aborted
        ),
        _ => false,
    }
}

use tonic::Code as tonic_code;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !h.contains(' '))
        .unwrap_or_else(|| "?".into())
}

fn program_name() -> String {
    std::env::args()
        .next()
        .map(|a| a.rsplit('/').next().unwrap_or(&a).to_string())
        .unwrap_or_default()
}
