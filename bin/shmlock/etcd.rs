//! `--etcd URL[,URL...]`: `run` and `locks` on an etcd v3 cluster, through `shmlock::etcd`
//! (feature `etcd`; a build without it parses the options and says how to get one).
//!
//! `run --etcd` is `run --remote` with an etcd session in place of a gateway session: the keeper
//! (see `exec`) connects, takes the lock under its session's lease (TTL `--etcd-ttl`), and holds
//! it while the command runs; `kill -9` of the wrapper leaves the lease, and so the lock, with
//! the command. If the lease cannot be renewed within its TTL (the cluster unreachable or without
//! quorum) or the cluster says it is gone, the lock is lost: the keeper says so on stderr at once
//! and again when the command ends, and lets the command run (SIGTERM with `--kill-on-loss`), as
//! through a gateway. When the keeper is killed, its lease expires after the TTL and the next
//! holder is told the owner died.
//!
//! Keys are laid out as etcd's `concurrency.Mutex` lays them out (`<prefix><name>/<lease>`), so
//! with the default empty `--etcd-prefix`, `shmlock run --etcd URL NAME` and `etcdctl lock NAME`
//! are the same lock, and `locks --etcd` lists `etcdctl`'s holders too (with what is known of
//! them: their lease).

use std::ffi::OsString;

use anyhow::{bail, Result};

use crate::{Cli, Command};

/// What a build without the `etcd` feature says to `--etcd`.
#[cfg(not(feature = "etcd"))]
const NO_ETCD: &str = "this shmlock was built without etcd support: rebuild with `--features etcd` (needs protoc)";

/// The `--etcd` options of `run` and `locks`.
#[derive(Debug, Clone, Default, clap::Args)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) struct EtcdArgs {
    /// Use the etcd v3 cluster at these client URLs (comma separated, e.g.
    /// http://10.0.0.1:2379,http://10.0.0.2:2379) instead of the segment; needs a shmlock built
    /// with `--features etcd`.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        num_args = 1,
        conflicts_with = "remote"
    )]
    pub(crate) etcd: Vec<String>,
    /// With --etcd: the session's lease TTL, in whole seconds: how long a lock stays held after
    /// its holder (`run`'s keeper) is killed or cut off, and how long the cluster may be
    /// unreachable before a held lock is reported lost [default: 10].
    #[arg(long, value_name = "SECONDS", requires = "etcd", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) etcd_ttl: Option<u64>,
    /// With --etcd: put PREFIX (bytes, as given) before every lock name: lock NAME's keys are
    /// PREFIXNAME/LEASE [default: none, so that `etcdctl lock NAME` is the same lock].
    #[arg(long, value_name = "PREFIX", requires = "etcd")]
    pub(crate) etcd_prefix: Option<OsString>,
}

/// Does `command` ask for etcd (`locks --etcd`, `run --etcd`)?
pub(crate) fn asked(command: &Command) -> bool {
    match command {
        Command::Locks(a) => !a.etcd.etcd.is_empty(),
        Command::Run(a) => !a.etcd.etcd.is_empty(),
        _ => false,
    }
}

/// `locks --etcd` and `run --etcd`.
pub(crate) fn run(cli: Cli) -> Result<u8> {
    #[cfg(not(feature = "etcd"))]
    {
        let _ = cli;
        bail!("{NO_ETCD}");
    }
    #[cfg(feature = "etcd")]
    {
        if cli.global.segment.is_some() || cli.global.segment_owner.is_some() {
            bail!(
                "--segment and --etcd exclude each other (--segment-owner and --etcd too): with --etcd \
                 the locks live in the cluster"
            );
        }
        imp::run(cli)
    }
}

#[cfg(feature = "etcd")]
pub(crate) use imp::{Etcd, Target};

#[cfg(feature = "etcd")]
mod imp {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use anyhow::{anyhow, bail, Result};
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use serde_json::{json, Value};
    use shmlock::etcd::{EtcdClient, EtcdGuard, EtcdKey, EtcdLock, EtcdOptions};
    use shmlock::prelude::*;
    use shmlock::table::{LockInfo, Party};
    use shmlock::{Error, Mode};

    use super::EtcdArgs;
    use crate::exec::{Job, Place};
    use crate::keeper::{Backend, Lost};
    use crate::render::{escape_name, human, table};
    use crate::{name_error, name_prefix, write_json, Cli, Command, LocksArgs};

    /// How often the watch over a held lock looks whether the command has ended (it waits for
    /// the session's loss in between).
    const WATCH_SLICE: Duration = Duration::from_millis(100);

    /// The cluster and the options of one `--etcd` command.
    #[derive(Debug, Clone)]
    pub(crate) struct Target {
        endpoints: Vec<String>,
        ttl: Duration,
        prefix: Vec<u8>,
    }

    impl Target {
        fn new(a: &EtcdArgs) -> Result<Target> {
            let endpoints: Vec<String> = a
                .etcd
                .iter()
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect();
            if endpoints.is_empty() {
                bail!("--etcd wants at least one URL, e.g. http://127.0.0.1:2379");
            }
            Ok(Target {
                endpoints,
                ttl: Duration::from_secs(a.etcd_ttl.unwrap_or(10)),
                prefix: a.etcd_prefix.as_deref().map_or(Vec::new(), |p| p.as_bytes().to_vec()),
            })
        }

        /// The endpoints, for messages.
        fn shown(&self) -> String {
            self.endpoints.join(",")
        }

        /// How `$SHMLOCK_HELD` names this place (see `exec::Held`).
        pub(crate) fn key(&self) -> String {
            format!(
                "etcd:{}:{}",
                escape_name(self.shown().as_bytes()),
                escape_name(&self.prefix)
            )
        }

        /// A session, its keys labelled `label`.
        fn connect(&self, label: String) -> Result<EtcdClient> {
            let opts = EtcdOptions {
                ttl: self.ttl,
                prefix: self.prefix.clone(),
                label: Some(label),
                ..EtcdOptions::default()
            };
            EtcdClient::connect(&self.endpoints, opts).map_err(|e| match e {
                Error::Etcd { why, .. } => anyhow!("cannot reach etcd at {}: {why}", self.shown()),
                e => anyhow!("cannot reach etcd at {}: {e}", self.shown()),
            })
        }
    }

    pub(super) fn run(cli: Cli) -> Result<u8> {
        match cli.command {
            Command::Run(a) => {
                let place = Place::Etcd(Target::new(&a.etcd)?);
                crate::exec::run(place, &a)
            }
            Command::Locks(a) => {
                if a.died {
                    bail!(
                        "--died needs the segment: in etcd a dead holder's key goes when its lease \
                         expires, and the next holder is told then"
                    );
                }
                let prefix = name_prefix(&a)?;
                let target = Target::new(&a.etcd)?;
                let client = target.connect("shmlock locks".into())?;
                let locks = client
                    .locks(prefix.as_deref().unwrap_or_default())
                    .map_err(|e| anyhow!("cannot list the locks on etcd at {}: {}", target.shown(), why(e)))?;
                let mut out = std::io::stdout().lock();
                print_locks(locks, &a, unix_ms(), &mut out)?;
                out.flush()?;
                Ok(0)
            }
            _ => unreachable!("only locks and run take --etcd"),
        }
    }

    /// An error's reason, without the endpoints that the message names already.
    fn why(e: Error) -> String {
        match e {
            Error::Etcd { why, .. } => why,
            e => e.to_string(),
        }
    }

    fn unix_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// How long ago `key` was put, by the putting host's clock (None: not put by shmlock).
    fn age(key: &EtcdKey, now_ms: u64) -> Option<Duration> {
        key.info
            .since_ms
            .map(|since| Duration::from_millis(now_ms.saturating_sub(since)))
    }

    fn mode_str(m: Mode) -> &'static str {
        match m {
            Mode::Exclusive => "exclusive",
            Mode::Shared => "shared",
        }
    }

    // ---- locks --etcd ----------------------------------------------------------------------

    /// Filters (`--held-longer-than`: by the keys' ages where known) and prints `locks --etcd`,
    /// in the cluster's order (the lock whose oldest key is oldest first).
    fn print_locks(mut locks: Vec<EtcdLock>, a: &LocksArgs, now_ms: u64, out: &mut impl Write) -> Result<()> {
        if let Some(d) = a.held_longer_than {
            locks.retain(|l| l.holders.iter().any(|h| age(h, now_ms).is_some_and(|t| t > d)));
        }
        if a.json {
            write_json(out, &locks.iter().map(|l| lock_json(l, now_ms)).collect())
        } else {
            out.write_all(locks_text(&locks, now_ms).as_bytes())?;
            Ok(())
        }
    }

    fn key_json(k: &EtcdKey, now_ms: u64) -> Value {
        json!({
            "lease": format!("{:x}", k.lease),
            "create_revision": k.create_revision,
            "mode": mode_str(k.info.mode()),
            "age_ms": age(k, now_ms).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            "pid": k.info.pid,
            "host": k.info.host,
            "label": k.info.label,
        })
    }

    /// One lock as JSON: `name` (escaped as `locks` prints names), `mode` (the holders'),
    /// `holders` and `queue` (the waiters in order), each key with `lease` (hex),
    /// `create_revision` (a holder's fencing token), `mode`, `age_ms` (since its key was put; null
    /// when not put by shmlock), `pid`, `host` and `label` (null when unknown); `waiters` (how
    /// many) and `token` (the latest grant's, the highest holder's create revision).
    pub(super) fn lock_json(l: &EtcdLock, now_ms: u64) -> Value {
        json!({
            "name": escape_name(&l.name),
            "mode": l.holders.first().map(|h| mode_str(h.info.mode())),
            "holders": l.holders.iter().map(|k| key_json(k, now_ms)).collect::<Vec<_>>(),
            "waiters": l.waiters.len(),
            "queue": l.waiters.iter().map(|k| key_json(k, now_ms)).collect::<Vec<_>>(),
            "token": l.holders.iter().map(|h| h.create_revision).max(),
        })
    }

    /// The `locks --etcd` table: one line per key, holders first, then the waiters in queue
    /// order; `-` where a key does not say (keys not put by shmlock, such as `etcdctl lock`'s,
    /// carry nothing but their lease).
    pub(super) fn locks_text(locks: &[EtcdLock], now_ms: u64) -> String {
        if locks.is_empty() {
            return "no locks held or waited on\n".into();
        }
        let dash = || "-".to_string();
        let mut rows = Vec::new();
        for l in locks {
            let keys = l.holders.iter().map(|k| ("holds".to_string(), k));
            let waits = l
                .waiters
                .iter()
                .enumerate()
                .map(|(i, k)| (format!("waits #{}", i + 1), k));
            for (state, k) in keys.chain(waits) {
                rows.push(vec![
                    escape_name(&l.name),
                    state,
                    mode_str(k.info.mode()).to_string(),
                    format!("{:x}", k.lease),
                    age(k, now_ms).map_or_else(dash, human),
                    k.info.pid.map_or_else(dash, |p| p.to_string()),
                    k.info.host.clone().unwrap_or_else(dash),
                    k.info.label.clone().unwrap_or_else(dash),
                    k.create_revision.to_string(),
                ]);
            }
        }
        table(
            &[
                "NAME", "STATE", "MODE", "LEASE", "AGE", "PID", "HOST", "LABEL", "REVISION",
            ],
            &rows,
        )
    }

    // ---- run --etcd: the keeper's backend ----------------------------------------------------

    /// The lock in an etcd session (the keeper's).
    pub(crate) struct Etcd {
        client: EtcdClient,
        target: Target,
    }

    impl Etcd {
        pub(crate) fn connect(target: &Target, job: &Job<'_>) -> Result<Etcd> {
            Ok(Etcd {
                client: target.connect(format!("run {}", job.program))?,
                target: target.clone(),
            })
        }

        fn lock(&self, name: &[u8]) -> Option<EtcdLock> {
            self.client.locks(name).ok()?.into_iter().find(|l| l.name == name)
        }
    }

    fn party(k: &EtcdKey, now_ms: u64, holder: bool) -> Party {
        Party {
            owner: 0,
            pid: k.info.pid.unwrap_or(0),
            kind: None,
            label: k.info.label.clone().unwrap_or_default(),
            mode: k.info.mode(),
            token: if holder { k.create_revision as u64 } else { 0 },
            age: age(k, now_ms).unwrap_or_default(),
        }
    }

    /// `lease 694d... (pid 1234 on box, run make) for 2.0s`, or what is known.
    fn describe(k: &EtcdKey, now_ms: u64) -> String {
        let i = &k.info;
        let mut about = Vec::new();
        match (i.pid, &i.host) {
            (Some(p), Some(h)) => about.push(format!("pid {p} on {h}")),
            (Some(p), None) => about.push(format!("pid {p}")),
            (None, Some(h)) => about.push(format!("on {h}")),
            (None, None) => {}
        }
        about.extend(i.label.clone());
        if about.is_empty() && i.since_ms.is_none() {
            about.push("not shmlock's: etcdctl lock or another etcd client".into());
        }
        let about = if about.is_empty() {
            String::new()
        } else {
            format!(" ({})", about.join(", "))
        };
        let age = age(k, now_ms).map_or(String::new(), |a| format!(" for {}", human(a)));
        format!("lease {:x}{about}{age}", k.lease)
    }

    impl Backend for Etcd {
        type Client = EtcdClient;
        fn client(&self) -> &EtcdClient {
            &self.client
        }
        /// As `locks --etcd` reads it (best effort): holders' tokens are their create revisions.
        fn info(&self, name: &[u8]) -> Option<LockInfo> {
            let l = self.lock(name)?;
            let now = unix_ms();
            Some(LockInfo {
                name: l.name.clone(),
                shard: 0,
                mode: l.holders.first().map(|h| h.info.mode()),
                holders: l.holders.iter().map(|k| party(k, now, true)).collect(),
                waiters: l.waiters.iter().map(|k| party(k, now, false)).collect(),
                token: l.holders.iter().map(|h| h.create_revision as u64).max().unwrap_or(0),
                owner_died: false,
            })
        }
        fn held_by(&self, name: &[u8]) -> String {
            let Some(l) = self.lock(name).filter(|l| !l.holders.is_empty()) else {
                return String::new();
            };
            let now = unix_ms();
            let who: Vec<String> = l.holders.iter().map(|k| describe(k, now)).collect();
            format!(", held by {}", who.join(", "))
        }
        fn lock_error(&self, name: &[u8], e: Error) -> anyhow::Error {
            let shown = escape_name(name);
            match e {
                e @ Error::NameInvalid { .. } => name_error(name, e),
                Error::Lost { why } => anyhow!(
                    "lost the etcd session at {} while locking \"{shown}\": {why}",
                    self.target.shown()
                ),
                e => anyhow!("cannot lock \"{shown}\" on etcd at {}: {}", self.target.shown(), why(e)),
            }
        }
        /// The wait keeps its place in the queue while it asks whether the wrapper is gone; then
        /// it withdraws its key.
        fn wait_for<'c>(
            &'c self,
            name: &[u8],
            mode: Mode,
            wait: Wait,
            gone: &AtomicBool,
        ) -> shmlock::Result<EtcdGuard<&'c EtcdClient>> {
            self.client
                .acquire_interruptible(name, mode, wait, &mut || gone.load(Ordering::SeqCst))
        }
        fn watch<'s, 'e, 'c: 'e>(
            &'e self,
            scope: &'s std::thread::Scope<'s, 'e>,
            guard: &'e EtcdGuard<&'c EtcdClient>,
            job: &Job<'_>,
            pid: &Arc<AtomicI32>,
            lost: &Lost,
        ) -> Option<mpsc::Sender<()>> {
            let (stop, stopped) = mpsc::channel::<()>();
            let (lost, endpoints) = (lost.clone(), self.target.shown());
            let (shown, program) = (job.shown.clone(), job.program.clone());
            let pid = job.a.kill_on_loss.then(|| Arc::clone(pid));
            let watcher = std::thread::Builder::new()
                .name("etcd-watch".into())
                .spawn_scoped(scope, move || loop {
                    if guard.wait_lost(Some(WATCH_SLICE)) {
                        let why = guard.lost_reason().unwrap_or_else(|| "the lease ended".into());
                        report(&lost, &endpoints, &shown, &program, pid.as_deref(), why);
                        return;
                    }
                    if let Err(mpsc::TryRecvError::Disconnected) = stopped.try_recv() {
                        return;
                    }
                });
            if watcher.is_err() {
                eprintln!("shmlock: warning: cannot start a thread to watch the etcd session");
            }
            Some(stop)
        }
        fn place(&self) -> String {
            format!(" on etcd at {}", self.target.shown())
        }
        /// An unlock is one request, which gives up after the client's request timeout.
        fn unlock_deadline(&self) -> Option<Duration> {
            None
        }
        /// Nothing: [`wait_for`](Backend::wait_for) sees the wrapper gone and withdraws.
        fn give_up(&self) -> Box<dyn Fn() + Send> {
            Box::new(|| {})
        }
        /// Leaves the key to the session: the keeper's exit drops the client, which revokes its
        /// lease (or the lease expires after its TTL), and the next holder, seeing the key go
        /// with its lease, is told the owner died.
        fn abandon<G: Guard>(&self, guard: G, done: &dyn Fn()) {
            std::mem::forget(guard);
            done();
        }
    }

    /// Says that the lock was lost while the command runs, and stops the command if asked.
    fn report(lost: &Lost, endpoints: &str, shown: &str, program: &str, pid: Option<&AtomicI32>, why: String) {
        if lost.finished.load(Ordering::Acquire) {
            return;
        }
        let what = match pid {
            Some(_) => format!("stopping {program} (SIGTERM), as --kill-on-loss asks"),
            None => format!("{program} keeps running (--kill-on-loss would stop it)"),
        };
        eprintln!("shmlock: lost the etcd session at {endpoints} ({why}): lock \"{shown}\" is no longer held; {what}");
        *lost.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        if let Some(pid) = pid.map(|p| p.load(Ordering::Acquire)).filter(|&p| p > 0) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use shmlock::etcd::KeyInfo;

        fn key(lease: i64, rev: i64, info: KeyInfo) -> EtcdKey {
            EtcdKey {
                lease,
                create_revision: rev,
                info,
            }
        }

        #[test]
        fn locks_text_and_json_show_holders_then_the_queue_and_dashes_for_the_unknown() {
            let now = 1_000_000_000;
            let ours = KeyInfo {
                shared: false,
                pid: Some(42),
                host: Some("box".into()),
                since_ms: Some(now - 5_600),
                label: Some("run make".into()),
            };
            let l = EtcdLock {
                name: b"a\xffb".to_vec(),
                holders: vec![key(0x1f, 7, KeyInfo::default())],
                waiters: vec![
                    key(0x2a, 9, ours.clone()),
                    key(0x3b, 12, KeyInfo { shared: true, ..ours }),
                ],
            };
            let text = locks_text(std::slice::from_ref(&l), now);
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 4, "{text}");
            assert!(lines[0].starts_with("NAME") && lines[0].ends_with("REVISION"), "{text}");
            let cells = |i: usize| lines[i].split_whitespace().collect::<Vec<_>>();
            assert_eq!(
                cells(1),
                ["a\\xffb", "holds", "exclusive", "1f", "-", "-", "-", "-", "7"]
            );
            assert_eq!(
                cells(2),
                [
                    "a\\xffb",
                    "waits",
                    "#1",
                    "exclusive",
                    "2a",
                    "5.6s",
                    "42",
                    "box",
                    "run",
                    "make",
                    "9"
                ]
            );
            assert_eq!(cells(3)[2..4], ["#2", "shared"]);
            let j = lock_json(&l, now);
            assert_eq!(j["name"], "a\\xffb");
            assert_eq!(j["mode"], "exclusive");
            assert_eq!(j["holders"][0]["lease"], "1f");
            assert_eq!(j["holders"][0]["age_ms"], Value::Null);
            assert_eq!(j["waiters"], 2);
            assert_eq!(j["queue"][0]["age_ms"], 5_600);
            assert_eq!(j["queue"][1]["mode"], "shared");
            assert_eq!(j["token"], 7);
            assert_eq!(locks_text(&[], now), "no locks held or waited on\n");
        }
    }
}
