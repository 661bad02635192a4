//! Per-run objects of each system (a segment, a directory of lock files, a mutex array), made
//! before a run and removed after it, and the generic entry point that builds a [`Peer`] over
//! them and runs a [`Job`] with static dispatch.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use shmlock::gateway::{self, Gateway, GatewayConfig};
use shmlock::remote::RemoteClient;
use shmlock::{Capacities, Client, LockTable};

use crate::cleanup::{self, Registered};
use crate::peer::{FlockPeer, LockerPeer, Peer, ProbePeer, PthreadPeer};
use crate::sys::{MutexArray, ProbeTable};

/// A lock system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum System {
    /// shmlock, in-process client on a named segment.
    Shmlock,
    /// flock(2) on one file per name.
    Flock,
    /// Robust process-shared pthread mutexes, one per name, by index.
    Pthread,
    /// A bare shared-memory hash table, name lookup + CAS: the cost floor of locking by name.
    /// Not part of `all`.
    Probe,
    /// shmlock through the TCP gateway: `--remote ADDR`, else a gateway started in the bench
    /// process on a fresh segment. Not part of `all`.
    Remote,
    /// Redis at `--redis-url` (feature `peers`). Not part of `all`.
    Redis,
    /// PostgreSQL advisory locks at `--pg-url` (feature `peers`). Not part of `all`.
    Postgres,
}

/// The gateway address given with `--remote`, if any (set once, from the command line).
pub(crate) static REMOTE_ADDR: OnceLock<String> = OnceLock::new();
/// `--redis-url`.
pub(crate) static REDIS_URL: OnceLock<String> = OnceLock::new();
/// `--pg-url`.
pub(crate) static PG_URL: OnceLock<String> = OnceLock::new();

#[cfg(not(feature = "peers"))]
const NO_PEERS: &str = "this shmlock-bench was built without Redis and PostgreSQL clients: \
                        build it with `--features peers`";

impl System {
    pub(crate) const ALL: [System; 3] = [System::Shmlock, System::Flock, System::Pthread];

    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Shmlock => "shmlock",
            System::Flock => "flock",
            System::Pthread => "pthread",
            System::Probe => "probe",
            System::Remote => "remote",
            System::Redis => "redis",
            System::Postgres => "postgres",
        }
    }
}

/// Names objects of one bench process: `{prefix}-{kind}-{seq}`.
#[derive(Debug)]
pub(crate) struct Namer {
    prefix: String,
    seq: std::cell::Cell<u32>,
}

impl Namer {
    pub(crate) fn new(prefix: String) -> Result<Namer> {
        match prefix.strip_prefix('/') {
            Some(rest) if !rest.is_empty() && !rest.contains('/') && rest.len() <= 150 => {}
            _ => bail!("--segment {prefix:?}: must be '/' followed by 1..=150 characters, none of them '/'"),
        }
        Ok(Namer {
            prefix,
            seq: std::cell::Cell::new(0),
        })
    }

    /// A fresh `/dev/shm` object name.
    pub(crate) fn shm(&self, kind: &str) -> String {
        let k = self.seq.get();
        self.seq.set(k + 1);
        format!("{}-{kind}-{k}", self.prefix)
    }

    /// A fresh directory path under the temp dir (usually /tmp).
    pub(crate) fn dir(&self, kind: &str) -> PathBuf {
        std::env::temp_dir().join(&self.shm(kind)[1..])
    }
}

/// A system's objects, opened in this process.
pub(crate) enum Opened {
    Shmlock(Arc<LockTable>),
    Flock(PathBuf),
    /// The mapping made at creation is reused by the creating process (its pages are faulted in
    /// already, as the shmlock creator's are); other processes map it again.
    Pthread(Option<MutexArray>, String),
    /// As for Pthread.
    Probe(Option<ProbeTable>, String),
    /// A gateway address (and the gateway, when this process runs it).
    Remote {
        addr: String,
        /// Kept running while the fixture lives.
        _gateway: Option<Gateway>,
    },
    /// A server URL, and the prefix of this run's keys.
    Redis {
        url: String,
        prefix: String,
    },
    Postgres {
        url: String,
        prefix: String,
    },
}

/// A server's target string: `{prefix} {url}` (the prefix has no spaces).
fn split_target(target: &str) -> Result<(String, String)> {
    let (prefix, url) = target
        .split_once(' ')
        .with_context(|| format!("target {target:?}: expected PREFIX URL"))?;
    Ok((prefix.to_string(), url.to_string()))
}

impl Opened {
    /// Opens the objects another process created at `target` (segment, directory, object name).
    pub(crate) fn open(system: System, target: &str) -> Result<Opened> {
        Ok(match system {
            System::Shmlock => Opened::Shmlock(Arc::new(
                LockTable::open(target).with_context(|| format!("open segment {target}"))?,
            )),
            System::Flock => Opened::Flock(PathBuf::from(target)),
            System::Pthread => Opened::Pthread(None, target.to_string()),
            System::Probe => Opened::Probe(None, target.to_string()),
            System::Remote => Opened::Remote {
                addr: target.to_string(),
                _gateway: None,
            },
            System::Redis => {
                let (prefix, url) = split_target(target)?;
                Opened::Redis { url, prefix }
            }
            System::Postgres => {
                let (prefix, url) = split_target(target)?;
                Opened::Postgres { url, prefix }
            }
        })
    }
}

/// What a run made; removed on drop.
pub(crate) struct Fixture {
    pub(crate) opened: Opened,
    /// The name other processes open it by.
    pub(crate) target: String,
    _reg: Option<Registered>,
}

impl Fixture {
    /// Makes `system`'s objects for lock names `names`; `caps` sizes a shmlock segment.
    pub(crate) fn create(system: System, namer: &Namer, names: &[String], caps: &Capacities) -> Result<Fixture> {
        match system {
            System::Shmlock => {
                let name = namer.shm("seg");
                let (table, reg) = cleanup::segment(&name, || {
                    LockTable::create(&name, caps).with_context(|| format!("create segment {name}"))
                })?;
                Ok(Fixture {
                    opened: Opened::Shmlock(Arc::new(table)),
                    target: name,
                    _reg: Some(reg),
                })
            }
            System::Flock => {
                let dir = namer.dir("flock");
                let reg = cleanup::dir(dir.clone())?;
                FlockPeer::new(&dir, names, true)?;
                Ok(Fixture {
                    target: dir.to_string_lossy().into_owned(),
                    opened: Opened::Flock(dir),
                    _reg: Some(reg),
                })
            }
            System::Remote => {
                let name = namer.shm("seg");
                let (table, reg) = cleanup::segment(&name, || {
                    LockTable::create(&name, caps).with_context(|| format!("create segment {name}"))
                })?;
                let (addr, gw) = match REMOTE_ADDR.get() {
                    Some(addr) => (addr.clone(), None),
                    None => {
                        let config = GatewayConfig {
                            listen: "127.0.0.1:0".parse().expect("valid address"),
                            idle_timeout: None,
                            max_connections: 1 << 16,
                            max_locks_per_session: caps.max_locks as usize,
                            ..GatewayConfig::default()
                        };
                        let gw = gateway::serve(config, Arc::new(table)).context("start the gateway")?;
                        (gw.local_addr().to_string(), Some(gw))
                    }
                };
                Ok(Fixture {
                    opened: Opened::Remote {
                        addr: addr.clone(),
                        _gateway: gw,
                    },
                    target: addr,
                    _reg: Some(reg),
                })
            }
            System::Redis | System::Postgres => {
                #[cfg(not(feature = "peers"))]
                bail!(NO_PEERS);
                #[cfg(feature = "peers")]
                {
                    let (kind, url) = match system {
                        System::Redis => ("redis", REDIS_URL.get()),
                        _ => ("postgres", PG_URL.get()),
                    };
                    let url = url.context("no server URL")?.clone();
                    // The prefix names this run's keys; a check that the server answers.
                    let prefix = namer.shm(kind)[1..].to_string();
                    let target = format!("{prefix} {url}");
                    let mut opened = Opened::open(system, &target)?;
                    with_peer(&mut opened, names[..1].to_vec(), "bench-check", CheckJob)?;
                    Ok(Fixture {
                        opened,
                        target,
                        _reg: None,
                    })
                }
            }
            System::Probe => {
                let name = namer.shm("probe");
                let (table, reg) = cleanup::shm_object(&name, || ProbeTable::create(&name, names.len()))?;
                Ok(Fixture {
                    opened: Opened::Probe(Some(table), name.clone()),
                    target: name,
                    _reg: Some(reg),
                })
            }
            System::Pthread => {
                let name = namer.shm("pthread");
                let (arr, reg) = cleanup::shm_object(&name, || MutexArray::create(&name, names.len()))?;
                Ok(Fixture {
                    opened: Opened::Pthread(Some(arr), name.clone()),
                    target: name,
                    _reg: Some(reg),
                })
            }
        }
    }
}

/// Work to run against any peer; generic, so each peer gets its own monomorphized copy.
pub(crate) trait Job {
    type Out;
    fn run<P: Peer>(self, peer: &mut P) -> Result<Self::Out>;
}

/// Builds the peer for `opened` over `names` (shmlock owner label `label`) and runs `job`.
pub(crate) fn with_peer<J: Job>(opened: &mut Opened, names: Vec<String>, label: &str, job: J) -> Result<J::Out> {
    match opened {
        Opened::Shmlock(table) => {
            let client = Client::with_table(Arc::clone(table), label).context("register a shmlock client")?;
            let mut peer = LockerPeer::local(&client, names);
            run_job(&mut peer, job)
        }
        Opened::Remote { addr, .. } => {
            let client = RemoteClient::connect(addr.as_str()).with_context(|| format!("connect to gateway {addr}"))?;
            let mut peer = LockerPeer::remote(&client, addr, names);
            run_job(&mut peer, job)
        }
        Opened::Redis { url, prefix } => {
            #[cfg(feature = "peers")]
            {
                let mut peer = crate::peers::RedisPeer::connect(url, prefix, &names)?;
                run_job(&mut peer, job)
            }
            #[cfg(not(feature = "peers"))]
            {
                let _ = (url, prefix, job);
                bail!(NO_PEERS)
            }
        }
        Opened::Postgres { url, prefix } => {
            #[cfg(feature = "peers")]
            {
                let mut peer = crate::peers::PgPeer::connect(url, prefix, &names)?;
                run_job(&mut peer, job)
            }
            #[cfg(not(feature = "peers"))]
            {
                let _ = (url, prefix, job);
                bail!(NO_PEERS)
            }
        }
        Opened::Flock(dir) => {
            let mut peer = FlockPeer::new(dir, &names, false)?;
            run_job(&mut peer, job)
        }
        Opened::Probe(table, name) => {
            let table = match table.take() {
                Some(t) => t,
                None => ProbeTable::open(name)?,
            };
            let mut peer = ProbePeer::new(table, names)?;
            run_job(&mut peer, job)
        }
        Opened::Pthread(arr, name) => {
            let arr = match arr.take() {
                Some(a) => a,
                None => MutexArray::open(name)?,
            };
            if arr.len() < names.len() {
                bail!("{name} has {} mutexes, {} needed", arr.len(), names.len());
            }
            let mut peer = PthreadPeer::new(arr);
            let out = run_job(&mut peer, job);
            if peer.recovered > 0 {
                eprintln!(
                    "shmlock-bench: pthread: {} locks found their owner dead (EOWNERDEAD)",
                    peer.recovered
                );
            }
            out
        }
    }
}

/// One lock and unlock: the server is there and answers as expected.
#[cfg(feature = "peers")]
struct CheckJob;

#[cfg(feature = "peers")]
impl Job for CheckJob {
    type Out = ();
    fn run<P: Peer>(self, p: &mut P) -> Result<()> {
        p.lock(0)?;
        p.unlock(0)
    }
}

fn run_job<P: Peer, J: Job>(peer: &mut P, job: J) -> Result<J::Out> {
    let out = job.run(peer);
    out.with_context(|| format!("{} peer", peer.name()))
}
